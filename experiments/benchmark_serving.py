r"""Serving benchmark: a Poisson request trace through the engine and through HF transformers.

  python -m experiments.benchmark_serving --quick          # tiny model, 12 requests, ~1-2 min
  python -m experiments.benchmark_serving --out=runs/benchmark_serving.json

Replays one trace (fixed seed) through `dsv3_jax.serving.Engine` (continuous batching) and
through HF transformers `generate` (static batches) on the same weights, cores and threads;
reports throughput, time to first token and inter-token latency (p50 / p99) and their ratios,
plus the engine with EPLB load collection (and MTP speculation when available). Prints a
table, writes JSON and a PNG beside it (the PNG needs the `plots` extra). The body is
`benchmarks/serving.py`.
"""

import os
import sys

from absl import app, flags

from experiments import common

_QUICK = flags.DEFINE_bool("quick", False, "Tiny model and a 12-request trace (a smoke run).")
_CONFIG = flags.DEFINE_string("config", "small", "Variant of configs/dsv3.py.")
_SLOTS = flags.DEFINE_integer("slots", 8, "Engine cache slots = HF static batch size.")
_REQUESTS = flags.DEFINE_integer("requests", 64, "Requests in the trace.")
_RATE = flags.DEFINE_float("rate", 4.0, "Poisson arrivals per second.")
_PROMPT = flags.DEFINE_list("prompt_len", ["16", "128"], "Prompt length range (uniform).")
_OUTPUT = flags.DEFINE_list("output_len", ["16", "64"], "Output length range (uniform).")
_SEED = flags.DEFINE_integer("seed", 0, "Trace seed.")
_THREADS = flags.DEFINE_integer("threads", 0, "Cores for both systems (0 = all).")
_PEER = flags.DEFINE_bool("peer", True, "Also replay through HF transformers (`hf` extra).")
_EPLB = flags.DEFINE_bool("eplb", True, "Also replay with EPLB load collection.")
_SPECULATIVE = flags.DEFINE_bool(
  "speculative", None, "MTP speculation row (default: if the engine has it)."
)
_OUT = flags.DEFINE_string("out", "runs/benchmark_serving.json", "JSON output (PNG beside).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from benchmarks import serving

  if _QUICK.value:
    kwargs = dict(serving.QUICK)
  else:
    lengths = lambda v: tuple(int(x) for x in v)
    kwargs = dict(
      config=_CONFIG.value,
      slots=_SLOTS.value,
      trace=serving.TraceSettings(
        requests=_REQUESTS.value,
        rate=_RATE.value,
        prompt_len=lengths(_PROMPT.value),
        output_len=lengths(_OUTPUT.value),
        seed=_SEED.value,
      ),
    )
  result = serving.run(
    threads=_THREADS.value,
    peer=_PEER.value,
    eplb=_EPLB.value,
    speculative=_SPECULATIVE.value,
    **kwargs,
  )
  print(serving.report(result))
  common.write_json(_OUT.value, result)
  if _OUT.value:
    try:
      serving.plot(result, os.path.splitext(_OUT.value)[0] + ".png")
    except ImportError as e:
      print(f"no plot: {e}")


if __name__ == "__main__":
  sys.exit(app.run(main))
