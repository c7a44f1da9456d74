r"""Bubble of each pipeline schedule, simulated and measured on emulated devices.

  python -m experiments.pipeline_schedules --devices=8 --outdir=runs/pipeline_schedules
  python -m experiments.pipeline_schedules --devices=8 --pp=4 --microbatches=8 \
      --schedules=1f1b,dualpipe,zb1p,gpipe --config=configs/dsv3.py:tiny

Runs one pipelined forward+backward of the same DeepSeek-V3 model per schedule with
per-tick timestamps, prints a table and writes `pipeline_schedules.json` plus simulated
and measured Gantt PNGs to `--outdir`.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dsv3.py:tiny", "Model config.")
_OUTDIR = flags.DEFINE_string("outdir", "runs/pipeline_schedules", "JSON and PNGs go here.")
_DEVICES = flags.DEFINE_integer("devices", 0, "Emulated CPU devices (0 = leave XLA_FLAGS).")
_SCHEDULES = flags.DEFINE_list("schedules", ["1f1b", "dualpipe", "zb1p", "gpipe"],
                               "Schedules to compare (schedules.SCHEDULES).")
_PP = flags.DEFINE_integer("pp", 4, "Pipeline ranks.")
_MB = flags.DEFINE_integer("microbatches", 8, "Micro-batches per step (both directions).")
_MB_SIZE = flags.DEFINE_integer("mb_size", 1, "Sequences per micro-batch.")
_SEQ = flags.DEFINE_integer("seq_len", 0, "Sequence length (0 = the config's).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per schedule (median reported).")
_GRAN = flags.DEFINE_enum("granularity", "unit", ["unit", "op"], "Executor tick granularity.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.emulate_cpu_devices(_DEVICES.value)
  import jax  # after XLA_FLAGS
  jax.config.update("jax_threefry_partitionable", True)
  from dsv3_jax import config as config_lib
  from dsv3_jax.train import pipeline_bench

  cfg = config_lib.from_dict(_CONFIG.value)
  req = pipeline_bench.Request(tuple(_SCHEDULES.value), _PP.value, _MB.value, _MB_SIZE.value,
                               _SEQ.value, _REPEATS.value, _GRAN.value)
  logging.info("devices: %s", jax.devices())
  results = pipeline_bench.compare(cfg, req, _OUTDIR.value)
  print(pipeline_bench.table(results))
  summary = pipeline_bench.summary(results)
  print(json.dumps(summary, indent=1))
  os.makedirs(_OUTDIR.value, exist_ok=True)
  path = os.path.join(_OUTDIR.value, "pipeline_schedules.json")
  with open(path, "w") as f:
    json.dump({"request": req.__dict__, "platform": jax.devices()[0].platform,
               "n_devices": jax.device_count(), "cpu_count": os.cpu_count(),
               "model": config_lib.to_dict(cfg)["model"], "summary": summary,
               "results": results}, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(app.run(main))
