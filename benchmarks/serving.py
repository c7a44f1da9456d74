"""Serving benchmark: a request trace through the engine and through HF transformers.

The body of `experiments/benchmark_serving.py` (see it for the flags). A trace of requests
(Poisson arrivals at `rate` per second, prompt and output lengths uniform over given ranges,
random byte prompts, fixed seed) is replayed

  * through `dsv3_jax.serving.Engine` in real time: a submitter thread submits each request
    at its arrival time, the engine thread batches them continuously (DeepSeek-V3 report
    arXiv 2412.19437 §3.4), greedy, every request generating exactly its output length;
  * through HF transformers `generate` on the same weights (exported in the HF layout,
    float32) with static batching: whenever the model is free it takes up to `slots`
    requests that have arrived, left-padded, and generates the longest output among them;
    tokens are timestamped with a streamer. The clock advances by the measured generate time
    (HF runs synchronously, so a simulated clock with measured durations is exact).

Reported per system: throughput (generated tokens / (last token - first arrival)), time to
first token and inter-token latency (p50 / p99, seconds), and their ratios. Both run in one
process on the same cores: `threads` pins the process to that many cores (affinity, so XLA's
and torch's pools both see them), sets torch's thread count, and with one thread XLA's
single-threaded flags. The HF experts implementation is set explicitly (`grouped_mm`, the
fastest on CPU in transformers 5) and recorded with the versions.

Optional rows: the engine with EPLB load collection (`eplb`, §3.4: the placement it would
apply under expert parallelism, and the max / mean GPU load before and after) and with MTP
self-speculation (`speculative`, §5.4.3, with its draft acceptance rate; the benchmark's
weights are random, so its MTP module drafts at chance and the row shows the cost of
verification, not the report's 1.8x).
"""

import dataclasses
import os
import sys
import tempfile
import time
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class TraceSettings:
  requests: int = 64
  rate: float = 4.0  # arrivals per second (Poisson)
  prompt_len: tuple = (16, 128)  # inclusive range, uniform
  output_len: tuple = (16, 64)
  seed: int = 0


QUICK = dict(
  config="tiny",
  slots=4,
  trace=TraceSettings(requests=12, rate=32.0, prompt_len=(4, 24), output_len=(4, 16)),
)


@dataclasses.dataclass(frozen=True)
class TraceRequest:
  arrival_s: float
  prompt: tuple
  output_len: int


def make_trace(settings: TraceSettings, vocab: int) -> list:
  """Poisson arrivals (the first at 0), uniform lengths, random byte-range prompt ids."""
  rng = np.random.default_rng(settings.seed)
  n = settings.requests
  gaps = rng.exponential(1.0 / settings.rate, n)
  arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
  p_lo, p_hi = settings.prompt_len
  o_lo, o_hi = settings.output_len
  prompt_lens = rng.integers(p_lo, p_hi + 1, n)
  output_lens = rng.integers(o_lo, o_hi + 1, n)
  return [
    TraceRequest(float(a), tuple(int(t) for t in rng.integers(0, min(vocab, 256), p)), int(o))
    for a, p, o in zip(arrivals, prompt_lens, output_lens)
  ]


def _pct(xs, q) -> Optional[float]:
  return float(np.percentile(xs, q)) if len(xs) else None


def summarize(records) -> dict:
  """records: (arrival time, [token times]) per request, one clock."""
  ttft = [times[0] - arrival for arrival, times in records]
  itl = [d for _, times in records for d in np.diff(times)]
  tokens = sum(len(times) for _, times in records)
  span = max(times[-1] for _, times in records) - min(a for a, _ in records)
  return {
    "requests": len(records),
    "tokens": tokens,
    "seconds": span,
    "tokens_per_s": tokens / span,
    "ttft_p50_s": _pct(ttft, 50),
    "ttft_p99_s": _pct(ttft, 99),
    "itl_p50_s": _pct(itl, 50),
    "itl_p99_s": _pct(itl, 99),
    "e2e_p50_s": _pct([t[-1] - a for a, t in records], 50),
  }


# ------------------------------------------------------------------------------- threads
def configure_threads(threads: int) -> dict:
  """Pins this process to `threads` cores (0 = leave all) before jax starts its backend."""
  info = {"cpu_count": os.cpu_count()}
  if threads:
    cores = sorted(os.sched_getaffinity(0))
    if threads > len(cores):
      raise ValueError(f"threads={threads} but only {len(cores)} cores are available")
    os.sched_setaffinity(0, cores[:threads])
    if threads == 1:
      os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
        " intra_op_parallelism_threads=1"
      )
  info["threads"] = len(os.sched_getaffinity(0))
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  info["xla_configured_before_jax"] = "jax" not in sys.modules
  return info


# ------------------------------------------------------------------------------- replays
def replay_engine(engine, trace) -> dict:
  """Submits each request at its arrival time (real time) and waits for all of them."""
  from dsv3_jax.serving.requests import Request

  t0 = time.perf_counter()
  streams = []
  for r in trace:
    delay = t0 + r.arrival_s - time.perf_counter()
    if delay > 0:
      time.sleep(delay)
    streams.append(
      engine.submit(
        Request(list(r.prompt), max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
      )
    )
  for s in streams:
    s.result(timeout=3600)
  records = [(s.submitted_at, s.token_times) for s in streams]
  return dict(summarize(records), outputs=[s.tokens for s in streams])


def run_engine(
  model, trace, slots: int, max_len: int, eplb: bool = True, speculative: bool = False
) -> dict:
  """The engine's rows: plain, then (same engine, same programs) with EPLB collection."""
  from dsv3_jax.serving.engine import Engine
  from dsv3_jax.serving.expert_loads import ExpertLoadMonitor

  engine = Engine(model, n_slots=slots, max_len=max_len, speculative=speculative)
  rows = {}
  with engine:
    t = time.perf_counter()
    engine.warmup(sorted({engine.program.bucket(len(r.prompt)) for r in trace}))
    warmup_s = time.perf_counter() - t
    before = dict(engine.stats)
    rows["plain"] = dict(replay_engine(engine, trace), warmup_s=warmup_s)
    delta = {k: engine.stats[k] - before.get(k, 0) for k in engine.stats}
    rows["plain"]["steps"] = delta["steps"]
    if speculative:
      rows["plain"]["acceptance_rate"] = delta["drafts_accepted"] / max(delta["drafts_verified"], 1)
    if eplb and model.cfg.n_moe_layers:
      engine.expert_loads = ExpertLoadMonitor(model.cfg, window=1024, rebalance_every=16)
      row = replay_engine(engine, trace)
      monitor = engine.expert_loads
      if monitor.report is None:
        monitor.rebalance()
      row["eplb"] = {k: v for k, v in monitor.report.items() if not k.endswith("per_layer")}
      row["eplb"]["applied"] = False  # one device: no expert-parallel layout to apply it to
      rows["eplb"] = row
  return rows


class _StepClock:
  """A transformers streamer that timestamps every `put` (the prompt, then each step)."""

  def __init__(self):
    self.times = []

  def put(self, value):
    del value
    self.times.append(time.perf_counter())

  def end(self):
    pass


def run_hf(path: str, trace, slots: int) -> dict:
  """Static batches through `generate`, on a simulated clock advanced by measured times."""
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()  # quiet: no "Loading weights" bar
  model = transformers.AutoModelForCausalLM.from_pretrained(
    path, dtype=torch.float32, experts_implementation="grouped_mm"
  ).eval()

  def generate(batch):
    width = max(len(r.prompt) for r in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(batch):  # left padding, as decoder-only generation wants
      ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
      mask[i, width - len(r.prompt) :] = 1
    n = max(r.output_len for r in batch)
    clock = _StepClock()
    t = time.perf_counter()
    with torch.no_grad():
      out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        streamer=clock,
      )
    return t, clock.times[1:], out[:, width:].tolist()

  warm = generate(trace[: min(slots, len(trace))])  # first-call overheads out of the timing
  del warm
  records, outputs, clock, i = [], [None] * len(trace), 0.0, 0
  while i < len(trace):
    clock = max(clock, trace[i].arrival_s)
    batch_idx = [j for j in range(i, len(trace)) if trace[j].arrival_s <= clock][:slots]
    start, step_times, out = generate([trace[j] for j in batch_idx])
    for k, j in enumerate(batch_idx):
      times = [clock + (s - start) for s in step_times[: trace[j].output_len]]
      records.append((trace[j].arrival_s, times))
      outputs[j] = out[k][: trace[j].output_len]
    clock += time.perf_counter() - start
    i = batch_idx[-1] + 1
  return dict(
    summarize(records),
    outputs=outputs,
    torch=torch.__version__,
    transformers=transformers.__version__,
    torch_threads=torch.get_num_threads(),
    experts_implementation=model.config._experts_implementation,
  )


def _agreement(a, b) -> float:
  """Fraction of generated positions where two greedy runs chose the same token."""
  same = total = 0
  for x, y in zip(a, b):
    n = min(len(x), len(y))
    same += sum(int(p == q) for p, q in zip(x[:n], y[:n]))
    total += n
  return same / max(total, 1)


def run(
  config: str = "small",
  slots: int = 8,
  trace: TraceSettings = TraceSettings(),
  threads: int = 0,
  peer: bool = True,
  eplb: bool = True,
  speculative: Optional[bool] = None,
) -> dict:
  """Replays the trace through every system; returns the JSON-ready result.

  `speculative` None runs the MTP row when the engine has it.
  """
  thread_info = configure_threads(threads)
  import jax

  import flax
  from configs import dsv3
  from dsv3_jax import config as config_lib
  from dsv3_jax import model as model_lib

  cfg = config_lib.from_dict(dsv3.get_config(config)).model
  model = model_lib.create(cfg, seed=0)
  reqs = make_trace(trace, cfg.vocab_size)
  max_len = max(len(r.prompt) + r.output_len for r in reqs)
  if max_len > cfg.max_position_embeddings:
    raise ValueError(
      f"the trace needs {max_len} positions; {config} has {cfg.max_position_embeddings}"
    )
  result = {
    "config": config,
    "slots": slots,
    "max_len": max_len,
    "trace": dataclasses.asdict(trace),
    "threads": thread_info,
    "versions": {"jax": jax.__version__, "flax": flax.__version__},
    "device": jax.devices()[0].device_kind,
    "rows": {},
  }
  rows = result["rows"]
  engine_rows = run_engine(model, reqs, slots, max_len, eplb=eplb)
  rows["dsv3_jax"] = engine_rows["plain"]
  rows["dsv3_jax_eplb"] = engine_rows.get("eplb", {"not_available": "eplb=False or no MoE"})
  spec_available = _has_speculative()
  if speculative or (speculative is None and spec_available):
    if not spec_available:
      rows["dsv3_jax_speculative"] = {"not_available": "the engine has no speculative program"}
    else:
      rows["dsv3_jax_speculative"] = run_engine(
        model, reqs, slots, max_len, eplb=False, speculative=True
      )["plain"]
  else:
    rows["dsv3_jax_speculative"] = {
      "not_available": ("skipped" if spec_available else "the engine has no speculative program")
    }
  if peer:
    try:
      from dsv3_jax.checkpoint.hf import model_state, save_hf_state

      with tempfile.TemporaryDirectory() as tmp:
        mcfg, state = model_state(model)
        # The main model only: HF's DeepseekV3 has no MTP layers to load.
        save_hf_state(
          tmp, dataclasses.replace(mcfg, num_nextn_predict_layers=0), state, dtype="float32"
        )
        hf = run_hf(tmp, reqs, slots)
    except ImportError as e:
      hf = {"not_available": f"install the `hf` extra ({e})"}
    rows["hf_transformers"] = hf
    if "tokens_per_s" in hf:
      ours = rows["dsv3_jax"]
      result["ratios_vs_hf"] = {
        "throughput": ours["tokens_per_s"] / hf["tokens_per_s"],
        "ttft_p50": hf["ttft_p50_s"] / ours["ttft_p50_s"],
        "itl_p50": hf["itl_p50_s"] / ours["itl_p50_s"],
        "greedy_token_agreement": _agreement(ours["outputs"], hf["outputs"]),
      }
  for row in rows.values():
    row.pop("outputs", None)
  return result


def _has_speculative() -> bool:
  try:
    from dsv3_jax.serving import speculative  # noqa: F401  (the MTP drafting pieces)
    from dsv3_jax.serving import speculative_step  # noqa: F401
  except ImportError:
    return False
  return True


def report(result: dict) -> str:
  """The printed table of a `run` result."""
  t = result["threads"]
  lines = [
    f"{result['config']} serving, {result['slots']} slots, {result['trace']['requests']} "
    f"requests at {result['trace']['rate']}/s, {t['threads']} of {t['cpu_count']} cores",
    f"  {'':<22}{'tokens/s':>10}{'TTFT p50':>10}{'p99':>9}{'ITL p50':>10}{'p99':>9}",
  ]
  for name, row in result["rows"].items():
    if "tokens_per_s" not in row:
      lines.append(f"  {name:<22}{row.get('not_available', '-')}")
      continue
    lines.append(
      f"  {name:<22}{row['tokens_per_s']:>10.1f}{row['ttft_p50_s']:>10.3f}"
      f"{row['ttft_p99_s']:>9.3f}{row['itl_p50_s']:>10.4f}{row['itl_p99_s']:>9.4f}"
    )
  spec = result["rows"].get("dsv3_jax_speculative", {})
  if "acceptance_rate" in spec:
    lines.append(
      f"  MTP drafts accepted: {100 * spec['acceptance_rate']:.0f}% (random weights: chance level)"
    )
  eplb = result["rows"].get("dsv3_jax_eplb", {}).get("eplb")
  if eplb:
    lines.append(
      f"  EPLB ({eplb['gpus']} GPUs, {eplb['replicas']} slots): max/mean GPU load "
      f"{eplb['before_mean']:.3f} -> {eplb['after_mean']:.3f} (not applied: one "
      "device)"
    )
  hf = result["rows"].get("hf_transformers", {})
  if "experts_implementation" in hf:
    lines.append(
      f"  HF transformers {hf['transformers']} (torch {hf['torch']}, "
      f"{hf['torch_threads']} threads, experts={hf['experts_implementation']})"
    )
  if "ratios_vs_hf" in result:
    r = result["ratios_vs_hf"]
    lines.append(
      f"  vs HF: throughput {r['throughput']:.2f}x, TTFT p50 {r['ttft_p50']:.2f}x, "
      f"ITL p50 {r['itl_p50']:.2f}x faster; greedy agreement "
      f"{100 * r['greedy_token_agreement']:.0f}%"
    )
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  """Throughput, TTFT and ITL (p50 bars, p99 ticks) per system, as a PNG."""
  from benchmarks.plotting import require_matplotlib

  mpl = require_matplotlib()
  mpl.use("Agg")
  import matplotlib.pyplot as plt

  rows = {k: v for k, v in result["rows"].items() if "tokens_per_s" in v}
  names = list(rows)
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
  x = np.arange(len(names))
  axes[0].bar(x, [rows[n]["tokens_per_s"] for n in names], color="C0")
  axes[0].set_title("throughput (tokens/s)")
  for ax, key, title in (
    (axes[1], "ttft", "time to first token (s)"),
    (axes[2], "itl", "inter-token latency (s)"),
  ):
    ax.bar(x, [rows[n][f"{key}_p50_s"] for n in names], color="C1", label="p50")
    ax.scatter(
      x,
      [rows[n][f"{key}_p99_s"] for n in names],
      color="k",
      marker="_",
      s=400,
      label="p99",
      zorder=3,
    )
    ax.set_title(title)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
  for ax in axes:
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, fontsize=8)
  t = result["trace"]
  fig.suptitle(
    f"{result['config']}: {t['requests']} requests, Poisson {t['rate']}/s, "
    f"{result['slots']} slots, {result['threads']['threads']} cores"
  )
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
