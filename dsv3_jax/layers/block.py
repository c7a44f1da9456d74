"""One pre-norm transformer block: x + MLA(norm(x)), then + FFN(norm(x)).

The FFN is a dense SwiGLU MLP for the first `first_k_dense_replace` layers and DeepSeekMoE
after that. Every block returns the same aux structure (zeros for dense blocks) so stacks of
either kind scan the same way.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.mla import MLA, LatentCache
from dsv3_jax.layers.mlp import MLP
from dsv3_jax.layers.moe import MoE, RoutedExperts
from dsv3_jax.layers.norms import RMSNorm


def empty_aux(cfg: ModelConfig) -> dict:
  return {
    "load": jnp.zeros((max(cfg.n_routed_experts, 1),), jnp.float32),
    "balance_loss": jnp.zeros((), jnp.float32),
  }


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed")
    self.attn = MLA(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed")
    self.is_moe = moe
    self.ffn = MoE(cfg, rngs=rngs) if moe else MLP(cfg, cfg.intermediate_size, rngs=rngs)

  def __call__(
    self,
    x_BxLxD: jax.Array,
    positions_BxL: jax.Array,
    cos,
    sin,
    cache: Optional[LatentCache] = None,
    absorb: Optional[bool] = None,
    routed: Optional[RoutedExperts] = None,
    causal: bool = False,
  ):
    """`routed`: where the MoE's routed experts run (`layers/moe.py`; None = this device);
    `causal`: the sequence starts at position 0 (`MLA.__call__`)."""
    # Named scopes label the compiled ops (profiles, and the two-micro-batch overlap test
    # reads them from the HLO).
    with jax.named_scope("attention"):
      a, cache = self.attn(self.attn_norm(x_BxLxD), positions_BxL, cos, sin, cache, absorb, causal)
    x_BxLxD = x_BxLxD + a
    with jax.named_scope("moe" if self.is_moe else "mlp"):
      h = self.ffn_norm(x_BxLxD)
      if self.is_moe:
        f, aux = self.ffn(h, routed)
      else:
        f, aux = self.ffn(h), empty_aux(self.cfg)
    return x_BxLxD + f, aux, cache
