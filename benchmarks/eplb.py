"""Redundant experts (EPLB): max / mean load per GPU before and after rebalancing (§3.4.1).

DeepSeek-V3 (arXiv 2412.19437, §3.4.1) duplicates high-load experts and rearranges experts
among GPUs from observed loads; `dsv3_jax.serving.eplb` implements the placement. `report`
measures what it buys, as max / mean load per GPU when each expert's load splits evenly over
its replicas (1.0 = perfect balance), for:

  example  the worked example of DeepSeek's EPLB release (2 layers, 12 experts, 16 slots);
  zipf     skewed synthetic loads (popularity ~ 1 / rank**s, fixed seed) over 256 experts in
           8 groups on the §3.4.1 prefilling unit: 4 nodes, 32 GPUs, 32 redundant experts;
           s = 1 and s = 0.5, and s = 1 on one node (no group-per-node constraint);
  workdir  (optional) a training run's real routing statistics: the per-expert loads its loop
           logs to metrics.jsonl, summed, with the run's `model.n_group` expert groups.

"Before" is the layout without redundancy (E / num_gpus contiguous experts per GPU); "after"
is `rebalance_experts`. Numbers are means over layers, plus the worst layer.
"""

import json
import os

from dsv3_jax.serving import eplb

EXAMPLE_LxE = [
  [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]


def report(
  workdir: str = "",
  gpus: int = 4,
  nodes: int = 2,
  redundant: int = 4,
  zipf_layers: int = 58,
  zipf_tokens: int = 1 << 20,
  seed: int = 0,
) -> dict:
  """The example's placement and before/after imbalance rows (zipf, and workdir if given)."""
  phy2log_LxR, _, logcnt_LxE = eplb.rebalance_experts(EXAMPLE_LxE, 16, 4, 2, 8)
  rows = {}
  for name, exponent, nodes_z in (
    ("zipf s=1", 1.0, 4),
    ("zipf s=.5", 0.5, 4),
    ("zipf 1node", 1.0, 1),
  ):
    load_LxE = eplb.zipf_load(zipf_layers, 256, zipf_tokens, exponent=exponent, seed=seed)
    rows[name] = eplb.compare_placements(load_LxE, 256 + 32, 8, nodes_z, 32)
  if workdir:
    with open(os.path.join(workdir, "config.json")) as f:
      num_groups = json.load(f).get("model", {}).get("n_group", 1)
    load_LxE = eplb.loads_from_metrics(workdir)
    rows["workdir"] = eplb.compare_placements(
      load_LxE, load_LxE.shape[1] + redundant, num_groups, nodes, gpus
    )
  return {"example": {"phy2log": phy2log_LxR.tolist(), "logcnt": logcnt_LxE.tolist()}, "rows": rows}


def format_table(result: dict) -> str:
  lines = ["EPLB example (12 experts, 4 groups, 16 slots, 2 nodes x 4 GPUs), phy2log:"]
  lines += [f"  layer {i}: {row}" for i, row in enumerate(result["example"]["phy2log"])]
  lines.append(
    f"{'load':<10} {'layers':>6} {'experts':>7} {'slots':>5} {'nodes':>5} "
    f"{'gpus':>4} {'max/mean before':>15} {'after':>7} {'worst layer before':>18} "
    f"{'after':>7}"
  )
  for name, r in result["rows"].items():
    lines.append(
      f"{name:<10} {r['layers']:>6} {r['experts']:>7} {r['replicas']:>5} "
      f"{r['nodes']:>5} {r['gpus']:>4} {r['before_mean']:>15.3f} "
      f"{r['after_mean']:>7.3f} {r['before_worst']:>18.3f} {r['after_worst']:>7.3f}"
    )
  return "\n".join(lines)
