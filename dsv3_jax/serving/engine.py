"""Continuous batching over a fixed pool of latent-cache slots.

DeepSeek-V3 report (arXiv 2412.19437) §3.4 serves with prefilling and decoding as separate
stages, decoding many requests together so the expensive weights are read once per step for
all of them. This engine does that on one host: `Engine.submit` (any thread) validates a
request and queues it; the engine thread

  1. admits queued requests into free slots: prefill of the one prompt (padded to a length
     bucket), its latent rows written into the slot (`decode_step.DecodeProgram`), the first
     token streamed right away;
  2. advances every busy slot by one decode step, all slots in one compiled program with
     their own positions and sampling settings;
  3. streams each slot's new token to its request (`requests.TokenStream`), frees slots that
     emitted EOS or reached max_tokens (or whose client cancelled), and loops, so a slot
     freed at one step takes a new request at the next while the others keep decoding.

Steps are pipelined: step t+1 is dispatched before step t's tokens are read back, so the
host's bookkeeping overlaps the device's work (a finished request's slot computes one
discarded extra step).

Extension points: `program=` takes any object with `DecodeProgram`'s methods (`init`,
`admit`, `release`, `step`; a step may emit up to `tokens_per_step` tokens per slot), which
is where MTP self-speculation (§2.2, §5.4.3) plugs in (`speculative=True`, see
`serving/speculative_step.py`); `eplb=True` (or an `ExpertLoadMonitor`) collects every
step's expert loads and re-places redundant experts periodically (§3.4).

A bad request fails at `submit` with `RequestError` and never reaches the shared programs;
a failure inside one request's prefill fails only that request's stream.
"""

import collections
import itertools
import logging
import queue
import threading
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.serving.decode_step import DecodeProgram
from dsv3_jax.serving.expert_loads import ExpertLoadMonitor
from dsv3_jax.serving.requests import (
  FINISH_CANCELLED,
  FINISH_LENGTH,
  FINISH_STOP,
  Request,
  RequestError,
  TokenStream,
)

log = logging.getLogger(__name__)


def _speculative_program(model, *args, **kwargs):
  from dsv3_jax.serving.speculative_step import SpeculativeProgram

  return SpeculativeProgram(model, *args, **kwargs)


class Engine:
  """Serves generation requests from a pool of `n_slots` cache slots.

    engine = Engine(model, n_slots=8, eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
    with engine:                                   # starts / stops the engine thread
      stream = engine.submit(Request(prompt_ids, max_tokens=64, temperature=0.7, top_p=0.9))
      for token in stream: ...

  Without the thread, `run_until_idle()` drives the same loop on the caller's thread.

  Args:
    model: a `Transformer`.
    n_slots: requests decoded together (the cache pool's batch).
    max_len: cache positions per slot, the longest prompt + max_tokens served (default: the
      model's context).
    cache_dtype: latent cache dtype (bfloat16, as `inference/generate.py`).
    vocab_limit: only ids below it are generated (the tokenizer's real vocabulary).
    eos_id: a request stops when it emits this id (not streamed); None = never.
    buckets: prompt padding lengths (default: powers of two from 16 up to max_len).
    program: the decode programs (default `DecodeProgram`); see the module docstring.
    speculative: MTP self-speculative decoding (needs a model with an MTP module).
    eplb: True or an `ExpertLoadMonitor`: collect expert loads and re-place periodically.
    seed: seeds requests that bring none.
    pipeline: dispatch the next step before reading the current one back.
  """

  def __init__(
    self,
    model,
    *,
    n_slots: int = 8,
    max_len: Optional[int] = None,
    cache_dtype=jnp.bfloat16,
    vocab_limit: Optional[int] = None,
    eos_id: Optional[int] = None,
    buckets: Optional[Sequence[int]] = None,
    program=None,
    speculative: bool = False,
    eplb=False,
    seed: int = 0,
    pipeline: bool = True,
  ):
    self.cfg = model.cfg
    self.max_len = int(max_len or self.cfg.max_position_embeddings)
    self.n_slots = int(n_slots)
    self.eos_id = eos_id
    if program is not None and speculative:
      raise ValueError("give either program= or speculative=True, not both")
    if program is None:
      make = _speculative_program if speculative else DecodeProgram
      program = make(
        model,
        self.n_slots,
        self.max_len,
        cache_dtype=cache_dtype,
        vocab_limit=vocab_limit,
        buckets=buckets,
      )
    self.program = program
    self.speculative = bool(speculative)
    if eplb is True:
      eplb = ExpertLoadMonitor(self.cfg)
    self.expert_loads: Optional[ExpertLoadMonitor] = eplb or None
    self.pipeline = pipeline
    self._rng = np.random.default_rng(seed)
    self._ids = itertools.count()
    self._lock = threading.Lock()  # submit-side state: ids, rng, closed
    self._queue: queue.Queue = queue.Queue()
    self._pending: collections.deque = collections.deque()
    self._slots: list = [None] * self.n_slots  # slot -> TokenStream or None
    self._carry = self.program.init()
    self._inflight = None  # (StepOutput, owners at dispatch) not yet read back
    self._thread: Optional[threading.Thread] = None
    self._stop = threading.Event()
    self._closed = False
    self._driving = threading.Lock()  # one loop at a time (thread or run_until_idle)
    self.stats = collections.Counter()

  # ------------------------------------------------------------------ client side
  @property
  def vocab_size(self) -> int:
    return self.cfg.vocab_size

  def submit(self, request, callback: Optional[Callable] = None, **fields) -> TokenStream:
    """Queues `request` (a `Request`, or prompt ids with Request fields as keywords).

    Returns its `TokenStream` at once; raises `RequestError` (a ValueError) for a bad
    request and RuntimeError once the engine is stopped. `callback(kind, value)` is called
    on the engine thread for every event ("token", id), then ("done", reason) or
    ("error", message).
    """
    if not isinstance(request, Request):
      request = Request(prompt=request, **fields)
    elif fields:
      raise TypeError("give Request fields either in the Request or as keywords, not both")
    request.validate(self.cfg.vocab_size, self.max_len)
    with self._lock:
      if self._closed:
        raise RuntimeError("the engine is stopped")
      if request.seed is None:
        request.seed = int(self._rng.integers(0, 2**31))
      stream = TokenStream(request, next(self._ids), callback)
      self._queue.put(stream)
      self.stats["submitted"] += 1
    return stream

  def generate(self, prompts: Sequence[Sequence[int]], **fields) -> list:
    """Submits every prompt, waits, returns their token lists (drives the loop itself when
    the engine thread is not running)."""
    streams = [self.submit(list(p), **fields) for p in prompts]
    if self._thread is None:
      self.run_until_idle()
    return [s.result() for s in streams]

  def warmup(self, prompt_lengths: Sequence[int] = (1,)) -> None:
    """Compiles the prefill of each length's bucket, the decode step and the slot release.

    Call it before `start()`: driven on this thread, it returns once its slots are released
    too. With the engine thread running it returns when its tokens are out, and the release
    may still be compiling on the engine thread.
    """
    self.generate([[0] * n for n in prompt_lengths], max_tokens=2, ignore_eos=True)

  # ------------------------------------------------------------------ lifecycle
  def start(self) -> "Engine":
    if self._thread is not None:
      raise RuntimeError("the engine thread is already running")
    self._stop.clear()
    self._thread = threading.Thread(target=self._serve_forever, name="dsv3-engine", daemon=True)
    self._thread.start()
    return self

  def stop(self, timeout: Optional[float] = 30.0) -> None:
    """Stops the thread; requests still queued or running fail with "engine stopped"."""
    with self._lock:
      self._closed = True
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout)
      self._thread = None
    with self._driving:
      self._drain_queue()
      for stream in list(self._pending):
        stream._fail("the engine stopped before this request ran")
      self._pending.clear()
      for slot, stream in enumerate(self._slots):
        if stream is not None and not stream.done:
          stream._fail("the engine stopped")
        self._slots[slot] = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  def run_until_idle(self) -> None:
    """Runs the loop on this thread until nothing is queued or decoding."""
    if self._thread is not None:
      raise RuntimeError("run_until_idle: the engine thread is running; use the streams")
    with self._driving:
      while self._iterate(block=False):
        pass

  def _serve_forever(self) -> None:
    with self._driving:
      while not self._stop.is_set():
        try:
          self._iterate(block=True)
        except Exception as e:  # noqa: BLE001 -- keep serving; the failed requests are told
          log.exception("engine loop failed")
          self._fail_all(f"engine error: {type(e).__name__}: {e}")

  # ------------------------------------------------------------------ the loop
  def _busy(self) -> bool:
    return any(s is not None for s in self._slots)

  def _drain_queue(self) -> None:
    while True:
      try:
        self._pending.append(self._queue.get_nowait())
      except queue.Empty:
        return

  def _iterate(self, block: bool) -> bool:
    """One round: admit, dispatch a step, read back the previous one. Returns whether work
    remains."""
    self._drain_queue()
    if block and not self._pending and not self._busy() and self._inflight is None:
      try:
        self._pending.append(self._queue.get(timeout=0.05))
      except queue.Empty:
        return False
    self._admit()
    dispatched = None
    if self._busy():
      try:
        self._carry, out = self.program.step(self._carry)
      except Exception as e:  # noqa: BLE001
        self._fail_all(f"decode step failed: {type(e).__name__}: {e}")
        return bool(self._pending)
      self.stats["steps"] += 1
      dispatched = (out, list(self._slots))
    if self._inflight is not None:
      self._read_back(*self._inflight)
      self._inflight = None
    if dispatched is not None:
      if self.pipeline:
        self._inflight = dispatched
      else:
        self._read_back(*dispatched)
    return bool(self._pending) or self._busy() or self._inflight is not None

  def _admit(self) -> None:
    while self._pending:
      try:
        slot = self._slots.index(None)
      except ValueError:
        return
      stream = self._pending.popleft()
      if stream.cancelled:
        stream._finish(FINISH_CANCELLED)
        continue
      r = stream.request
      try:
        admitted = self.program.admit(
          self._carry, r.prompt, slot, r.temperature, r.top_k, r.top_p, r.seed
        )
        first = int(admitted.first)
      except Exception as e:  # noqa: BLE001 -- this request fails, the others go on
        log.exception("prefill of request %d failed", stream.id)
        stream._fail(f"prefill failed: {type(e).__name__}: {e}")
        if _deleted(self._carry):  # the pool was donated to the failed call
          self._fail_all("the cache pool was lost with a failed prefill")
        continue
      self._carry = admitted.carry
      self._slots[slot] = stream
      self.stats["prefills"] += 1
      self.stats["prefill_tokens"] += len(r.prompt)
      if self._emit(stream, first):
        self._free(slot)

  def _read_back(self, out, owners) -> None:
    tokens_SxN = np.asarray(out.tokens_SxN)
    counts_S = np.asarray(out.counts_S)
    if self.expert_loads is not None:
      self.expert_loads.record(np.asarray(out.load_LxE))
    multi = self.program.tokens_per_step > 1
    for slot, stream in enumerate(owners):
      if stream is None or stream.done:
        continue  # idle, or finished after this step was dispatched
      if multi:  # speculative: counts = 1 + accepted draft
        self.stats["drafts_verified"] += 1
        self.stats["drafts_accepted"] += int(counts_S[slot]) - 1
      if stream.cancelled:
        stream._finish(FINISH_CANCELLED)
        self._free(slot)
        continue
      for token in tokens_SxN[slot, : counts_S[slot]].tolist():
        if self._emit(stream, token):
          self._free(slot)
          break

  def _emit(self, stream: TokenStream, token: int) -> bool:
    """Streams one token; returns True when the request is finished."""
    r = stream.request
    if self.eos_id is not None and token == self.eos_id and not r.ignore_eos:
      stream._finish(FINISH_STOP)
      self.stats["finished"] += 1
      return True
    stream._push(token)
    self.stats["tokens"] += 1
    if len(stream.tokens) >= r.max_tokens:
      stream._finish(FINISH_LENGTH)
      self.stats["finished"] += 1
      return True
    return False

  def _free(self, slot: int) -> None:
    self._slots[slot] = None
    self._carry = self.program.release(self._carry, slot)

  def _fail_all(self, message: str) -> None:
    for slot, stream in enumerate(self._slots):
      if stream is not None and not stream.done:
        stream._fail(message)
      self._slots[slot] = None
    self._inflight = None
    self._carry = self.program.init()


def _deleted(tree) -> bool:
  return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(tree))


__all__ = ["Engine", "Request", "RequestError", "TokenStream"]
