r"""Redundant experts (EPLB, DeepSeek-V3 report §3.4.1): max / mean load per GPU before/after.

  python -m experiments.eplb
  python -m experiments.eplb --workdir=runs/small --gpus=4 --nodes=2 --redundant=4 \
      --json=runs/eplb.json

Prints the placement of the worked example published with DeepSeek's EPLB release, then max /
mean load per GPU without redundancy (contiguous experts) and after `rebalance_experts`, on a
skewed synthetic load (Zipf, fixed seed) over 256 experts on the §3.4.1 prefilling unit (4 nodes,
32 GPUs, 32 redundant experts) and, with --workdir, on the per-expert loads a training run logged
to metrics.jsonl. The body is `benchmarks.eplb`.
"""

import sys

from absl import app, flags

from experiments import common

_WORKDIR = flags.DEFINE_string(
  "workdir",
  "",
  "A training workdir whose metrics.jsonl holds "
  "per-expert loads (the `load` field); empty = synthetic only.",
)
_GPUS = flags.DEFINE_integer("gpus", 4, "GPUs for the workdir's experts.")
_NODES = flags.DEFINE_integer("nodes", 2, "Nodes for the workdir's experts.")
_REDUNDANT = flags.DEFINE_integer(
  "redundant",
  4,
  "Redundant slots for the workdir's experts (experts + redundant must be a multiple of --gpus).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic Zipf load.")
_JSON = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from benchmarks import eplb as bench

  result = bench.report(
    _WORKDIR.value,
    gpus=_GPUS.value,
    nodes=_NODES.value,
    redundant=_REDUNDANT.value,
    seed=_SEED.value,
  )
  print(bench.format_table(result))
  common.write_json(_JSON.value, result)


if __name__ == "__main__":
  sys.exit(app.run(main))
