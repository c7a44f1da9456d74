r"""FP8 vs BF16 training: the same small model, init and data, with bf16 dots and fp8 dots.

A third run with fp32 dots measures the noise floor of the comparison: at this scale, tiny
numerical differences make the trajectories drift apart, so the fp8-vs-bf16 gap means
something only next to the fp32-vs-bf16 gap.

  python -m experiments.fp8_vs_bf16
  python -m experiments.fp8_vs_bf16 --config.train.steps=100 --out=runs/fp8_quick
  python -m experiments.fp8_vs_bf16 --config.model.hidden_size=256 --config.train.seq_len=128
  python -m experiments.fp8_vs_bf16 --precisions=bf16,fp8   # skip the fp32 noise floor

Writes `<out>/results.json` (every loss curve, the relative loss error over the last 10% of
steps, held-out losses, the step time of each run) and `<out>/loss.png`, and prints the
relative loss error. The default (`fp8_parity.experiment_config()`) is sized to finish in a few
minutes on a 2-core CPU. A CPU has no FP8 units: its float8 dots run no faster than FP32 and
the online quantization is extra work, so the step-time ratio measures the emulation's
overhead, not H100 speed. Every field of the config overrides from the
command line (`--config.<section>.<field>=value`). The harness is `benchmarks/fp8_parity.py`.
"""

import json
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging

from benchmarks import fp8_parity
from dsv3_jax import config as config_lib
from experiments import common

_CONFIG = common.define_config_dict(
  "config",
  ml_collections.ConfigDict(config_lib.to_dict(fp8_parity.experiment_config())),
  "Model/train/data/parallel config (default: fp8_parity.experiment_config()); any field "
  "overrides.",
)
_OUT = flags.DEFINE_string("out", "runs/fp8_vs_bf16", "Directory for results.json and loss.png.")
_TAIL = flags.DEFINE_float("tail", 0.1, "Fraction of final steps the relative error averages.")
_PRECISIONS = flags.DEFINE_list(
  "precisions",
  ["bf16", "fp8", "fp32"],
  "Dot precisions to train; the first is the reference. fp32 gives the noise floor: how far "
  "a run with more precise dots drifts from the reference over the same steps.",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  jax.config.update("jax_threefry_partitionable", True)
  jax.config.update("jax_numpy_rank_promotion", "raise")

  logging.info("process %d/%d, devices %s", jax.process_index(), jax.process_count(), jax.devices())
  precisions = _PRECISIONS.value
  result = fp8_parity.compare(
    _CONFIG.value, precisions, reference=precisions[0], tail=_TAIL.value, progress=True
  )
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  fp8_parity.plot(result, os.path.join(_OUT.value, "loss.png"))
  for p in precisions[1:]:
    print(fp8_parity.summary_line(result, p))
  print(
    json.dumps(
      {
        p: {k: v for k, v in c.items() if k not in ("loss", "ce")}
        for p, c in result["curves"].items()
      },
      indent=1,
    )
  )
  logging.flush()


if __name__ == "__main__":
  sys.exit(app.run(main))
