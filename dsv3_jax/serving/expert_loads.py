"""Expert loads observed while serving, and the EPLB placement they call for.

DeepSeek-V3 report (arXiv 2412.19437) §3.4: the deployment detects high-load experts "based
on statistics collected during the online service" and re-chooses the redundant experts
periodically. `ExpertLoadMonitor` is that collection for the serving engine: every decode
step's per-layer routed-token counts go into a sliding `eplb.LoadWindow`; every
`rebalance_every` steps the window's total is re-placed with `eplb.rebalance_experts`
(`placement`: phy2log, log2phy, logcnt) and `report` holds max / mean load per GPU before
(contiguous experts) and after (`eplb.compare_placements`).

The engine runs on one device, where there is no expert-parallel layout to apply the
placement to, so its outputs do not change; `eplb.with_redundant_experts(model,
monitor.placement)` builds the model an expert-parallel deployment serves with it (the
decode mesh of `serving/disaggregation.py` takes it as `decode_placement`). The
decode step routes every slot's token, idle slots' placeholders included, so with few busy
slots the statistics carry some of that noise.
"""

from typing import Optional

import numpy as np

from dsv3_jax.serving import eplb


class ExpertLoadMonitor:
  """Sliding-window expert loads of the MoE layers and a periodic EPLB re-placement.

  Args:
    cfg: the served model's ModelConfig.
    num_gpus: GPUs of the (notional) expert-parallel group; divides n_routed_experts
      (default: the router's group count, as node-limited routing lays groups on nodes).
    num_nodes: nodes those GPUs sit on (1 = the global policy).
    num_replicas: physical expert slots per layer (default: one redundant expert per GPU).
    window: decode steps kept in the window.
    rebalance_every: decode steps between re-placements.
  """

  def __init__(
    self,
    cfg,
    num_gpus: Optional[int] = None,
    num_nodes: int = 1,
    num_replicas: Optional[int] = None,
    window: int = 256,
    rebalance_every: int = 64,
  ):
    if cfg.n_moe_layers == 0 or cfg.n_routed_experts == 0:
      raise ValueError("EPLB needs routed experts: this model has no MoE layer")
    self.num_layers, self.num_experts = cfg.n_moe_layers, cfg.n_routed_experts
    self.num_groups = max(cfg.n_group, 1)
    self.num_gpus = num_gpus or self.num_groups
    self.num_nodes = num_nodes
    self.num_replicas = num_replicas or self.num_experts + self.num_gpus
    if self.num_experts % self.num_gpus:
      raise ValueError(
        f"EPLB num_gpus={self.num_gpus} must divide the {self.num_experts} routed experts"
      )
    self.window = eplb.LoadWindow(self.num_layers, self.num_experts, window, rebalance_every)
    self.steps = 0
    self.placement = None  # (phy2log [L, R], log2phy [L, E, M], logcnt [L, E])
    self.report: Optional[dict] = None
    # Validates the sizes once, up front, rather than at the first rebalance.
    eplb.rebalance_experts(
      np.ones((1, self.num_experts)),
      self.num_replicas,
      self.num_groups,
      self.num_nodes,
      self.num_gpus,
    )

  def record(self, load_LxE) -> bool:
    """Adds one step's loads; re-places when due. Returns True when it re-placed."""
    self.window.add(np.asarray(load_LxE, np.float64))
    self.steps += 1
    if not self.window.should_rebalance(self.steps):
      return False
    self.rebalance()
    return True

  def rebalance(self) -> dict:
    total = self.window.total()
    self.placement = eplb.rebalance_experts(
      total, self.num_replicas, self.num_groups, self.num_nodes, self.num_gpus
    )
    report = eplb.compare_placements(
      total, self.num_replicas, self.num_groups, self.num_nodes, self.num_gpus
    )
    self.report = dict(report, steps=self.steps, window=len(self.window))
    return self.report
