"""Serving engine: continuous batching gives each request what `Generator` gives it alone,
plain or with MTP self-speculation; bad requests fail alone; the decode program is pluggable."""

import dataclasses
import threading
import time

import numpy as np
import pytest

from configs import dsv3
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax.inference.generate import Generator, SamplingConfig
from dsv3_jax.serving.decode_step import Admitted, StepOutput, default_buckets
from dsv3_jax.serving.engine import Engine
from dsv3_jax.serving.expert_loads import ExpertLoadMonitor
from dsv3_jax.serving.requests import Request, RequestError, StreamError

NEW = 8  # new tokens of every reference generation (one compiled Generator decode)
PROMPTS = [[5, 17, 33, 2, 9], [100], [7] * 11 + [1], [42, 43]]
SAMPLED = dict(temperature=0.8, top_k=20, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def model():
  cfg = config_lib.from_dict(dsv3.get_config("tiny")).model
  # A larger init makes the random model's argmax decisive (no near-ties).
  return model_lib.create(dataclasses.replace(cfg, init_std=0.5), seed=3)


@pytest.fixture(scope="module")
def reference(model):
  """prompt -> Generator's tokens, greedy and sampled (bfloat16 cache, as the engine)."""
  gen = Generator(model)
  greedy = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=NEW)).tokens
  sampled = [
    gen.generate([p], SamplingConfig(max_new_tokens=NEW, **SAMPLED)).tokens[0] for p in PROMPTS[:2]
  ]
  return {
    "greedy": dict(zip(map(tuple, PROMPTS), greedy)),
    "sampled": dict(zip(map(tuple, PROMPTS[:2]), sampled)),
  }


@pytest.fixture(scope="module")
def engine(model):
  assert default_buckets(64) == (16, 32, 64)
  with Engine(model, n_slots=3, max_len=64) as eng:
    yield eng


def _wait_tokens(stream, n, timeout=120):
  t = time.time()
  while len(stream.tokens) < n and not stream.done:
    assert time.time() - t < timeout, "no progress"
    time.sleep(0.01)


def test_greedy_matches_generator_while_others_decode(engine, reference):
  # Long sampled requests occupy two slots; greedy ones join mid-flight, and more of them
  # than free slots, so slots are reused while the long ones keep decoding.
  busy = [
    engine.submit(Request([3, 1, 4, 1, 5], max_tokens=40, temperature=1.0, seed=s, ignore_eos=True))
    for s in (1, 2)
  ]
  _wait_tokens(busy[0], 3)
  greedy = [engine.submit(Request(p, max_tokens=NEW)) for p in PROMPTS]
  for p, stream in zip(PROMPTS, greedy):
    assert stream.result(timeout=300) == reference["greedy"][tuple(p)]
    assert stream.finish_reason == "length"
  for stream in busy:
    assert len(stream.result(timeout=300)) == 40
  assert busy[0].tokens != busy[1].tokens  # each slot its own key


def test_sampled_matches_generator_per_seed(engine, reference):
  """Per-slot temperature / top-k / top-p / keys: the draws of Generator alone, same seed."""
  streams = [engine.submit(Request(p, max_tokens=NEW, **SAMPLED)) for p in PROMPTS[:2]]
  streams.append(engine.submit(Request(PROMPTS[2], max_tokens=NEW)))  # greedy beside them
  for p, stream in zip(PROMPTS[:2], streams):
    assert stream.result(timeout=300) == reference["sampled"][tuple(p)]
  assert streams[2].result(timeout=300) == reference["greedy"][tuple(PROMPTS[2])]


@pytest.mark.parametrize(
  "fields, param, match",
  [
    (dict(prompt=[1, 2, 99999]), "prompt", "outside the vocabulary"),
    (dict(prompt=[1, -1]), "prompt", "outside the vocabulary"),
    (dict(prompt=[]), "prompt", "empty"),
    (dict(prompt=[1.5]), "prompt", "not an integer"),
    (dict(prompt=[1] * 60, max_tokens=10), "max_tokens", "exceeds the context of 64"),
    (dict(prompt=[1], max_tokens=0), "max_tokens", "max_tokens"),
    (dict(prompt=[1], temperature=-0.5), "temperature", "temperature"),
    (dict(prompt=[1], temperature=float("nan")), "temperature", "finite"),
    (dict(prompt=[1], top_p=0.0), "top_p", "top_p"),
    (dict(prompt=[1], top_p=1.5), "top_p", "top_p"),
    (dict(prompt=[1], top_k=-1), "top_k", "top_k"),
    (dict(prompt=[1], seed=-3), "seed", "seed"),
  ],
)
def test_bad_request_rejected_at_submit(engine, reference, fields, param, match):
  good = engine.submit(Request(PROMPTS[0], max_tokens=NEW))
  with pytest.raises(RequestError, match=match) as err:
    engine.submit(Request(**fields))
  assert err.value.param == param
  assert good.result(timeout=300) == reference["greedy"][tuple(PROMPTS[0])]


def test_eos_stops_and_is_not_streamed(engine, reference):
  free = reference["greedy"][tuple(PROMPTS[0])]
  eos = free[3]
  engine.eos_id = eos  # host-side: read when tokens are streamed
  try:
    stopped = engine.submit(Request(PROMPTS[0], max_tokens=NEW))
    ignoring = engine.submit(Request(PROMPTS[0], max_tokens=NEW, ignore_eos=True))
    assert stopped.result(timeout=300) == free[: free.index(eos)]
    assert stopped.finish_reason == "stop"
    assert ignoring.result(timeout=300) == free
  finally:
    engine.eos_id = None


def test_streaming_events_and_callback(engine, reference):
  seen, done = [], threading.Event()

  def callback(kind, value):
    seen.append((kind, value))
    if kind != "token":
      done.set()

  stream = engine.submit(Request(PROMPTS[1], max_tokens=NEW), callback=callback)
  want = reference["greedy"][tuple(PROMPTS[1])]
  assert list(stream) == want
  assert done.wait(60)
  assert seen == [("token", t) for t in want] + [("done", "length")]
  assert len(stream.token_times) == NEW
  assert np.all(np.diff(stream.token_times) >= 0) and stream.token_times[0] >= stream.submitted_at


def test_cancel_frees_the_slot(engine, reference):
  long = [engine.submit(Request([9, 9], max_tokens=50, ignore_eos=True)) for _ in range(3)]
  _wait_tokens(long[0], 2)
  for s in long:
    s.cancel()
  for s in long:
    s.result(timeout=120)
    assert s.finish_reason == "cancelled" and len(s.tokens) < 50
  after = engine.submit(Request(PROMPTS[3], max_tokens=NEW))
  assert after.result(timeout=300) == reference["greedy"][tuple(PROMPTS[3])]


def test_expert_loads_monitor(engine, model):
  engine.expert_loads = ExpertLoadMonitor(model.cfg, window=16, rebalance_every=4)
  try:
    engine.submit(Request([1, 2, 3], max_tokens=NEW)).result(timeout=300)
  finally:
    monitor, engine.expert_loads = engine.expert_loads, None
  assert monitor.steps >= NEW - 1 and monitor.report is not None
  phy2log, _, logcnt = monitor.placement
  assert phy2log.shape == (model.cfg.n_moe_layers, monitor.num_replicas)
  assert (logcnt.sum(-1) == monitor.num_replicas).all()
  assert monitor.report["after_worst"] <= monitor.report["before_worst"] + 1e-9


def test_run_until_idle_and_stop(model, reference):
  eng = Engine(model, n_slots=3, max_len=64, pipeline=False)  # the module engine's programs
  eng.warmup()  # before start (as the server does): every program compiled when it returns
  programs = {n: getattr(eng.program, n) for n in ("_prefill", "_insert", "_step", "_release")}
  assert {n: f._cache_size() for n, f in programs.items()} == dict.fromkeys(programs, 1)
  assert eng.generate(PROMPTS[:3], max_tokens=NEW) == [
    reference["greedy"][tuple(p)] for p in PROMPTS[:3]
  ]
  queued = eng.submit(Request([1], max_tokens=4))
  eng.stop()
  with pytest.raises(StreamError, match="stopped"):
    queued.result(timeout=10)
  with pytest.raises(RuntimeError, match="stopped"):
    eng.submit(Request([1], max_tokens=4))


def test_bad_engine_settings(model):
  with pytest.raises(ValueError, match="max_len"):
    Engine(model, max_len=10_000)
  with pytest.raises(ValueError, match="n_slots"):
    Engine(model, n_slots=0)
  with pytest.raises(ValueError, match="buckets"):
    Engine(model, max_len=64, buckets=(16,))


class _CountingProgram:
  """A stand-in decode program emitting 2 tokens per slot per step: prompt[-1] + 1, + 2, ..."""

  tokens_per_step = 2

  def __init__(self, n_slots):
    self.n_slots = n_slots

  def init(self):
    return np.zeros(self.n_slots, np.int32)

  def admit(self, carry, prompt, slot, temperature, top_k, top_p, seed):
    carry = carry.copy()
    carry[slot] = prompt[-1] + 2
    return Admitted(carry, np.int32(prompt[-1] + 1))

  def release(self, carry, slot):
    return carry

  def step(self, carry):
    out = StepOutput(
      np.stack([carry, carry + 1], axis=1), np.full(self.n_slots, 2), np.zeros((1, 1))
    )
    return carry + 2, out


def test_pluggable_program_multi_token_steps(model):
  eng = Engine(model, n_slots=2, max_len=64, program=_CountingProgram(2), eos_id=17)
  streams = [
    eng.submit(Request([10], max_tokens=5)),
    eng.submit(Request([12], max_tokens=9)),
    eng.submit(Request([30], max_tokens=4)),
  ]
  eng.run_until_idle()
  assert streams[0].result() == [11, 12, 13, 14, 15]  # cut mid-step at max_tokens
  assert streams[0].finish_reason == "length"
  assert streams[1].result() == [13, 14, 15, 16]  # EOS 17 arrives second in a step
  assert streams[1].finish_reason == "stop"
  assert streams[2].result() == [31, 32, 33, 34]  # took a freed slot
  assert eng.stats["drafts_verified"] > 0


def test_speculative_greedy_matches_generator(model, reference):
  pytest.importorskip("dsv3_jax.serving.speculative")
  with Engine(model, n_slots=3, max_len=64, speculative=True) as eng:
    busy = eng.submit(
      Request([3, 1, 4], max_tokens=30, temperature=1.0, top_p=0.9, seed=1, ignore_eos=True)
    )
    _wait_tokens(busy, 3)
    greedy = [eng.submit(Request(p, max_tokens=NEW)) for p in PROMPTS]
    for p, stream in zip(PROMPTS, greedy):
      assert stream.result(timeout=300) == reference["greedy"][tuple(p)]
    assert len(busy.result(timeout=300)) == 30
  assert eng.stats["drafts_verified"] > 0


def test_speculative_needs_mtp():
  cfg = config_lib.from_dict(dsv3.get_config("tiny")).model
  no_mtp = model_lib.create(dataclasses.replace(cfg, num_nextn_predict_layers=0))
  with pytest.raises(ValueError, match="MTP"):
    Engine(no_mtp, n_slots=2, max_len=64, speculative=True)
