"""What a client hands the serving engine, and the stream its tokens come back on.

`Request` holds one prompt (token ids) and its sampling settings; `Request.validate` checks
them against the model (vocabulary, context) before anything is queued, raising
`RequestError` (a ValueError naming the offending field) so that a bad request is refused at
`Engine.submit` and never reaches the compiled programs the other requests share.

`TokenStream` is the per-request channel: the engine thread pushes token ids, then one final
event (finished, with the reason, or failed, with the message); any number of other threads
read it, by iteration (tokens as they come), `result()` (block until done) or a callback.
Host-side timestamps of every token are kept for latency measurements (time to first token,
inter-token latency).
"""

import dataclasses
import math
import queue
import threading
import time
from typing import Callable, Optional, Sequence

FINISH_STOP = "stop"  # the model emitted the end-of-sequence token
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_CANCELLED = "cancelled"  # the client went away


class RequestError(ValueError):
  """A request the engine refuses; `param` names the offending field (OpenAI's `param`)."""

  def __init__(self, message: str, param: Optional[str] = None):
    super().__init__(message)
    self.param = param


def _is_int(x) -> bool:
  return (
    isinstance(x, int)
    and not isinstance(x, bool)
    or (hasattr(x, "dtype") and getattr(x.dtype, "kind", "") in "iu" and getattr(x, "ndim", 1) == 0)
  )


@dataclasses.dataclass
class Request:
  """One generation request: `prompt` token ids, at most `max_tokens` new tokens.

  temperature 0 is greedy; `top_k` 0 and `top_p` 1 switch those filters off; `seed` None
  lets the engine pick one. Generation stops at the engine's EOS id unless `ignore_eos`.
  """

  prompt: Sequence[int]
  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: Optional[int] = None
  ignore_eos: bool = False

  def validate(self, vocab_size: int, max_len: int) -> "Request":
    """Checks every field; returns self with `prompt` as a list of ints. Raises RequestError."""
    try:
      prompt = list(self.prompt)
    except TypeError:
      raise RequestError(
        f"prompt must be a sequence of token ids, got {type(self.prompt).__name__}", "prompt"
      ) from None
    if not prompt:
      raise RequestError("prompt is empty: give at least one token", "prompt")
    for t in prompt:
      if not _is_int(t):
        raise RequestError(f"prompt token {t!r} is not an integer id", "prompt")
      if not 0 <= int(t) < vocab_size:
        raise RequestError(
          f"prompt has token id {int(t)} outside the vocabulary [0, {vocab_size})", "prompt"
        )
    self.prompt = [int(t) for t in prompt]
    if not _is_int(self.max_tokens) or self.max_tokens < 1:
      raise RequestError(
        f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens"
      )
    if len(prompt) + self.max_tokens > max_len:
      raise RequestError(
        f"prompt of {len(prompt)} tokens + max_tokens={self.max_tokens} "
        f"exceeds the context of {max_len} tokens",
        "max_tokens",
      )
    for name, lo, hi, lo_open in (("temperature", 0.0, math.inf, False), ("top_p", 0.0, 1.0, True)):
      x = getattr(self, name)
      if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise RequestError(f"{name} must be a finite number, got {x!r}", name)
      if (x <= lo if lo_open else x < lo) or x > hi:
        span = f"({lo}, {hi}]" if lo_open else f">= {lo}"
        raise RequestError(f"{name} must be {'in ' if lo_open else ''}{span}, got {x}", name)
    if not _is_int(self.top_k) or self.top_k < 0:
      raise RequestError(f"top_k must be an integer >= 0, got {self.top_k!r}", "top_k")
    if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
      raise RequestError(f"seed must be an integer in [0, 2**32), got {self.seed!r}", "seed")
    if not isinstance(self.ignore_eos, bool):
      raise RequestError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}", "ignore_eos")
    return self


class StreamError(RuntimeError):
  """The engine could not finish this request (its stream carries the message)."""


_TOKEN, _DONE, _ERROR = "token", "done", "error"


class TokenStream:
  """Tokens of one request as the engine produces them; thread-safe, read by any thread.

  for token in stream: ...          # blocks between tokens; raises StreamError on failure
  tokens = stream.result(timeout)   # all generated ids (EOS excluded)
  stream.finish_reason              # "stop" | "length" | "cancelled" once done
  """

  def __init__(
    self,
    request: Request,
    request_id: int,
    callback: Optional[Callable[[str, object], None]] = None,
  ):
    self.request = request
    self.id = request_id
    self.tokens: list = []
    self.finish_reason: Optional[str] = None
    self.error: Optional[str] = None
    self.submitted_at = time.perf_counter()
    self.token_times: list = []  # perf_counter() when each token was pushed
    self._events: queue.Queue = queue.Queue()
    self._done = threading.Event()
    self._cancelled = threading.Event()
    self._callback = callback

  # -- engine side
  def _push(self, token: int) -> None:
    self.tokens.append(token)
    self.token_times.append(time.perf_counter())
    self._events.put((_TOKEN, token))
    if self._callback:
      self._callback(_TOKEN, token)

  def _finish(self, reason: str) -> None:
    self.finish_reason = reason
    self._events.put((_DONE, reason))
    self._done.set()
    if self._callback:
      self._callback(_DONE, reason)

  def _fail(self, message: str) -> None:
    self.error = message
    self._events.put((_ERROR, message))
    self._done.set()
    if self._callback:
      self._callback(_ERROR, message)

  # -- client side
  @property
  def done(self) -> bool:
    return self._done.is_set()

  @property
  def cancelled(self) -> bool:
    return self._cancelled.is_set()

  def cancel(self) -> None:
    """Asks the engine to stop this request and free its slot (it finishes "cancelled")."""
    self._cancelled.set()

  def events(self, timeout: Optional[float] = None):
    """Yields ("token", id) ... then ("done", reason) or ("error", message)."""
    while True:
      try:
        kind, value = self._events.get(timeout=timeout)
      except queue.Empty:
        raise TimeoutError(f"request {self.id}: no token within {timeout} s") from None
      yield kind, value
      if kind != _TOKEN:
        return

  def __iter__(self):
    for kind, value in self.events():
      if kind == _TOKEN:
        yield value
      elif kind == _ERROR:
        raise StreamError(f"request {self.id}: {value}")

  def result(self, timeout: Optional[float] = None) -> list:
    if not self._done.wait(timeout):
      raise TimeoutError(f"request {self.id} not finished within {timeout} s")
    if self.error is not None:
      raise StreamError(f"request {self.id}: {self.error}")
    return list(self.tokens)
