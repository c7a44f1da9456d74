r"""Trains a DeepSeek-V3 model; resumes if `--workdir` already holds a checkpoint.

  python -m experiments.train --config=configs/dsv3.py:small --devices=8 --workdir=runs/small
  python -m experiments.train --config=configs/dsv3.py:tiny --workdir=/tmp/t \
      --config.train.steps=20 --config.parallel.data=2 --config.parallel.expert=4

Emulate N CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N (set before
start; `--devices=N` does it for you).

Multi-process (one per host; or several on one machine, here 2 x 4 CPU devices):
  python -m experiments.train --config=configs/dsv3.py:tiny --devices=4 \
      --coordinator=127.0.0.1:12345 --num_processes=2 --process_id=0   # and =1 in another
The coordinator / process count / id may also come from $DSV3_COORDINATOR,
$DSV3_NUM_PROCESSES and $DSV3_PROCESS_ID. Each process loads only its rows of every batch.
"""

import json
import sys

from absl import app, flags, logging

from experiments import common

_CONFIG = common.define_config_file("config", "configs/dsv3.py:small", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/small", "Checkpoints, metrics and summary.")
_DEVICES = flags.DEFINE_integer(
  "devices",
  -1,
  "Emulated CPU devices: -1 = what the config's mesh needs (unless XLA_FLAGS sets a count "
  "or the job has several processes), 0 = leave XLA_FLAGS.",
)
_COORDINATOR = flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job (0 = env / 1).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (-1 = env).")
_INIT_TIMEOUT = flags.DEFINE_integer("init_timeout", 120, "Seconds to wait for all processes.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
  "heartbeat_timeout", 30, "Seconds without heartbeats after which a process counts as dead."
)
_STEP_TIMEOUT = flags.DEFINE_integer(
  "step_timeout",
  900,
  "Multi-process: exit if no training step finishes for this many "
  "seconds (a hung peer); 0 = no watchdog.",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from dsv3_jax.parallel import distributed  # reads flags and env only; no device yet

  spec = distributed.resolve(
    _COORDINATOR.value,
    _NUM_PROCESSES.value,
    _PROCESS_ID.value,
    init_timeout_s=_INIT_TIMEOUT.value,
    heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
  )
  # A multi-process job's devices are its processes' own: the mesh default applies to one.
  devices = 0 if spec is not None and _DEVICES.value < 0 else _DEVICES.value
  common.emulate_cpu_devices(devices, _CONFIG.value.parallel)
  import jax  # after XLA_FLAGS

  jax.config.update("jax_threefry_partitionable", True)
  distributed.initialize(spec)  # before anything touches a device
  common.check_mesh_fits(_CONFIG.value.parallel, jax.device_count())
  if spec is not None and _STEP_TIMEOUT.value > 0:
    distributed.start_watchdog(_STEP_TIMEOUT.value)
  if jax.process_count() > 1:  # shown even at the default (quiet) verbosity
    print(f"process {jax.process_index()} of {jax.process_count()}", flush=True)
  from dsv3_jax.train.loop import train_and_evaluate

  summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  distributed.stop_watchdog()
  if jax.process_index() == 0:
    print(
      json.dumps(
        {
          k: summary[k]
          for k in ("steps", "final_loss", "heldout_loss", "unigram_entropy", "wall_time_s")
        },
        indent=1,
      )
    )
  logging.flush()


if __name__ == "__main__":
  sys.exit(app.run(main))
