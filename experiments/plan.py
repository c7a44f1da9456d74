r"""Plans training a config on a mesh: memory, communication and time per device.

  python -m experiments.plan   # 671b on data 2 x expert 64 x pipe 16, DualPipe, H800
  python -m experiments.plan --config=configs/dsv3.py:671b --mesh=data:2,expert:64,pipe:16 \
      --node_size=8 --hardware=h800 --schedule=dualpipe --json=runs/plan_671b.json
  python -m experiments.plan --config=configs/dsv3.py:small --mesh=data:2,expert:4 \
      --node_size=1 --hardware=cpu

Nothing is allocated or compiled: the mesh is a `jax.sharding.AbstractMesh`, so a
2048-device layout plans on this machine. `dsv3_jax/parallel/planner.py` is the body and says
what each number is (DeepSeek-V3 report, arXiv 2412.19437 §3.2). Prints a table; `--json`
writes every number.
"""

import sys

from absl import app, flags

from experiments import common

_CONFIG = common.define_config_file("config", "configs/dsv3.py:671b", "Model config.")
_MESH = flags.DEFINE_string("mesh", "data:2,expert:64,pipe:16", "Mesh axis sizes.")
_NODE = flags.DEFINE_integer(
  "node_size",
  8,
  "Devices per node (EP ranks are packed into nodes; node-limited routing counts nodes).",
)
_HARDWARE = flags.DEFINE_enum(
  "hardware", "h800", ["h800", "h100", "cpu"], "Peaks and link speeds (cpu: measured here)."
)
_SCHEDULE = flags.DEFINE_enum(
  "schedule",
  "dualpipe",
  ["1f1b", "dualpipe", "gpipe", "zb1p", "dualpipev"],
  "Pipeline schedule (used when the mesh has pipe > 1).",
)
_MB = flags.DEFINE_integer(
  "microbatches", 0, "Micro-batches per batch shard (0: one sequence each)."
)
_SEQ = flags.DEFINE_integer("seq_len", 0, "Tokens per sequence (0: the config's).")
_BATCH = flags.DEFINE_integer("global_batch", 0, "Sequences per step (0: the config's).")
_UNEVEN = flags.DEFINE_boolean(
  "uneven_stages",
  True,
  "Plan ceil(MoE layers / stages) on the "
  "busiest stage when they do not split evenly (DeepSeek-V3's 61 "
  "layers over 16 ranks); --nouneven_stages requires the even "
  "split this repo's pipeline runs.",
)
_TRACE = flags.DEFINE_boolean(
  "trace",
  True,
  "Also trace this code's activations at the planned shapes (tens of seconds for 671b).",
)
_EFF = flags.DEFINE_float("efficiency", 1.0, "Fraction of the peak FLOP/s the compute runs at.")
_JSON = flags.DEFINE_string("json", "", "Also write the plan to this JSON file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from dsv3_jax import config as config_lib
  from dsv3_jax.parallel import planner

  try:
    result = planner.plan_training(
      config_lib.from_dict(_CONFIG.value),
      _MESH.value,
      node_size=_NODE.value,
      hardware_name=_HARDWARE.value,
      schedule=_SCHEDULE.value,
      microbatches=_MB.value or None,
      seq_len=_SEQ.value or None,
      global_batch=_BATCH.value or None,
      uneven_stages=_UNEVEN.value,
      trace=_TRACE.value,
      efficiency=_EFF.value,
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(planner.format_table(result))
  common.write_json(_JSON.value, result)


if __name__ == "__main__":
  sys.exit(app.run(main))
