r"""Bubble of each pipeline schedule, simulated and measured on emulated devices.

  python -m experiments.pipeline_schedules   # 8 emulated CPU devices, runs/pipeline_schedules
  python -m experiments.pipeline_schedules --devices=8 --pp=4 --microbatches=8 \
      --schedules=1f1b,dualpipe,zb1p,gpipe --config=configs/dsv3.py:tiny

Runs one pipelined forward+backward of the same DeepSeek-V3 model per schedule with
per-tick timestamps (`benchmarks/pipeline_timeline.py`), prints a table and writes
`pipeline_schedules.json` plus simulated and measured Gantt PNGs to `--outdir`.
"""

import json
import os
import sys

from absl import app, flags, logging

from experiments import common

_CONFIG = common.define_config_file("config", "configs/dsv3.py:tiny", "Model config.")
_OUTDIR = flags.DEFINE_string("outdir", "runs/pipeline_schedules", "JSON and PNGs go here.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Emulated CPU devices (0 = leave XLA_FLAGS).")
_SCHEDULES = flags.DEFINE_list(
  "schedules", ["1f1b", "dualpipe", "zb1p", "gpipe"], "Schedules to compare (schedules.SCHEDULES)."
)
_PP = flags.DEFINE_integer("pp", 4, "Pipeline ranks.")
_MB = flags.DEFINE_integer("microbatches", 8, "Micro-batches per step (both directions).")
_MB_SIZE = flags.DEFINE_integer("mb_size", 1, "Sequences per micro-batch.")
_SEQ = flags.DEFINE_integer("seq_len", 0, "Sequence length (0 = the config's).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per schedule (median reported).")
_GRAN = flags.DEFINE_enum("granularity", "unit", ["unit", "op"], "Executor tick granularity.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  common.emulate_cpu_devices(_DEVICES.value)
  import jax  # after XLA_FLAGS

  jax.config.update("jax_threefry_partitionable", True)
  from benchmarks import pipeline_timeline
  from dsv3_jax import config as config_lib

  req = pipeline_timeline.Request(
    tuple(_SCHEDULES.value),
    _PP.value,
    _MB.value,
    _MB_SIZE.value,
    _SEQ.value,
    _REPEATS.value,
    _GRAN.value,
  )
  logging.info("devices: %s", jax.devices())
  report = pipeline_timeline.run(config_lib.from_dict(_CONFIG.value), req, _OUTDIR.value)
  print(pipeline_timeline.table(report["results"]))
  print(json.dumps(report["summary"], indent=1))
  common.write_json(os.path.join(_OUTDIR.value, "pipeline_schedules.json"), report)


if __name__ == "__main__":
  sys.exit(app.run(main))
