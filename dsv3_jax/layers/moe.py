"""DeepSeekMoE (arXiv 2412.19437 §2.1.2): shared experts + routed experts.

  h' = x + sum_i FFN_shared_i(x) + sum_{i in top-k} g_i FFN_routed_i(x)      (eq. 12)

Routing and balancing are `layers/routing.py`; the routed experts' computation is one kernel,
`layers/experts.py`. *Where* the routed experts run is not this file's business: `MoE` takes a
routed-expert function (`RoutedExperts`) from its caller — `local_routed_experts` on one
device by default, the expert-parallel all-to-all version from the sharding plan
(`parallel/sharding.py`) on a mesh with an `expert` axis. Layers never import parallel code.

Legend: B batch, L length, N = B*L tokens, D model, E experts, F expert width.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import experts, routing
from dsv3_jax.layers.mlp import MLP
from dsv3_jax.layers.routing import RouterBias

# (x [B, L, D], gate [D, E], bias [E], w1 [E, D, F], w3 [E, D, F], w2 [E, F, D], cfg,
#  [replicas=(slots [E, M], counts [E])])
#   -> (y [B, L, D] without the shared experts, aux {load [E], balance_loss, ...stats})
# With `replicas` (redundant experts), w1/w3/w2 hold R >= E physical experts.
RoutedExperts = Callable[..., tuple]


class ExpertReplicas(nnx.Variable):
  """Redundant experts (EPLB, §3.4): a logical expert's physical slots, or their count.

  Serving only (`serving/eplb.with_redundant_experts` sets them, with physical expert
  weights); never trained."""


def local_routed_experts(
  x_BxLxD, gate_DxE, bias_E, w1_ExDxF, w3_ExDxF, w2_ExFxD, cfg: ModelConfig, replicas=None
):
  """The routed half of DeepSeekMoE with every expert on this device."""
  b, l, d = x_BxLxD.shape
  x_NxD = x_BxLxD.reshape(b * l, d)
  r = routing.route(x_NxD, gate_DxE, bias_E, cfg)
  physical = r
  if replicas is not None:
    physical = r._replace(experts_Nxk=routing.to_replicas(r.experts_Nxk, *replicas))
  y = experts.routed_ffn(
    x_NxD,
    physical,
    w1_ExDxF,
    w3_ExDxF,
    w2_ExFxD,
    block=cfg.expert_block_size,
    precision=cfg.matmul_precision,
  )
  aux = {
    "load": routing.expert_load(r.experts_Nxk, cfg.n_routed_experts),
    "balance_loss": routing.sequence_balance_loss(r, b, cfg),
  }
  return y.reshape(b, l, d), aux


class MoE(nnx.Module):
  """Shared experts + routed experts; returns (y, aux) with aux = loads and balance loss."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    std = cfg.init_std
    normal = lambda shape: jax.random.normal(rngs.params(), shape, jnp.float32) * std
    self.gate = nnx.Param(normal((d, e)), axes=("embed", "experts_gate"))
    self.bias = RouterBias(jnp.zeros((e,), jnp.float32))
    self.w1 = nnx.Param(normal((e, d, f)), axes=("expert", "embed", "expert_mlp"))
    self.w3 = nnx.Param(normal((e, d, f)), axes=("expert", "embed", "expert_mlp"))
    self.w2 = nnx.Param(normal((e, f, d)), axes=("expert", "expert_mlp", "embed"))
    self.shared = MLP(cfg, cfg.n_shared_experts * f, rngs=rngs) if cfg.n_shared_experts else None

  def __call__(self, x_BxLxD: jax.Array, routed: Optional[RoutedExperts] = None):
    b, l, d = x_BxLxD.shape
    routed = routed or local_routed_experts
    # Redundant experts, when a deployment set them (`ExpertReplicas`): w1/w3/w2 are physical.
    slots = getattr(self, "replica_slots", None)
    extra = {} if slots is None else {"replicas": (slots[...], self.replica_counts[...])}
    y, aux = routed(
      x_BxLxD,
      self.gate[...],
      self.bias[...],
      self.w1[...],
      self.w3[...],
      self.w2[...],
      self.cfg,
      **extra,
    )
    if self.shared is not None:
      y = y + self.shared(x_BxLxD.reshape(b * l, d)).reshape(b, l, d)
    return y, aux
