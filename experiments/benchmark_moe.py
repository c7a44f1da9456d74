r"""Expert-parallel MoE on 8 emulated devices: node-limited routing's traffic, buffers, time.

  python -m experiments.benchmark_moe --out=runs/benchmark_moe.json
  python -m experiments.benchmark_moe --tokens_per_device=64 --iters=2   # quicker

The `expert` axis spans all devices, `--nodes` groups of consecutive EP ranks form "nodes"
and the router's n_group is set to the node count (DeepSeek-V3's layout: one expert group per
node), so `topk_group = M` caps the nodes a token reaches. For node-limited routing
(M = --limit) and unlimited routing (M = nodes) it reports cross-node copies and remote nodes
per token, dispatch + combine bytes, the fixed all_to_all buffers (dropless vs a capacity
factor) and the EP layer's step time against the single-device layer, plus the routing
statistics at DeepSeek-V3's own shape. `benchmarks/moe_ep.py` is the body and says more.
Prints a table, writes JSON.
"""

import sys

from absl import app, flags

from experiments import common

_CONFIG = flags.DEFINE_string("config", "bench", "Variant of configs/dsv3.py for the layer.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Emulated CPU devices (all on the expert axis).")
_NODES = flags.DEFINE_integer("nodes", 8, "Nodes the EP ranks form (= router groups).")
_LIMIT = flags.DEFINE_integer("limit", 4, "Nodes per token under node-limited routing (M).")
_TOKENS = flags.DEFINE_integer("tokens_per_device", 128, "Tokens per device per step.")
_ITERS = flags.DEFINE_integer("iters", 3, "Timed iterations (after one warm-up).")
_CAPACITY = flags.DEFINE_float(
  "capacity_factor", 1.25, "The capacity factor compared with the dropless buffer."
)
_V3_TOKENS = flags.DEFINE_integer("v3_tokens", 4096, "Tokens for the DeepSeek-V3-shape routing.")
_OUT = flags.DEFINE_string("out", "runs/benchmark_moe.json", "JSON output.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  common.emulate_cpu_devices(_DEVICES.value)
  from benchmarks import moe_ep  # jax starts after XLA_FLAGS

  res = moe_ep.run(
    _CONFIG.value,
    _NODES.value,
    _LIMIT.value,
    _TOKENS.value,
    _ITERS.value,
    _CAPACITY.value,
    _V3_TOKENS.value,
  )
  print(moe_ep.table(res))
  common.write_json(_OUT.value, res)


if __name__ == "__main__":
  sys.exit(app.run(main))
