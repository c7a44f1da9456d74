"""Multi-Token Prediction module (arXiv 2412.19437 §2.2, eqs. 21-25).

Depth k combines the previous depth's hidden state at position i with the embedding of
token i+k and predicts token i+k+1:

  h'_i = W_eh [RMSNorm(emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]      (embedding first, as in the
                                                                public checkpoint)
  h^k_i = Block(h'_i);   logits = Head(RMSNorm_k(h^k_i))

The embedding and the output head are the main model's; each module owns its norms, its
projection and one full transformer block (MLA + MoE).
"""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.block import Block
from dsv3_jax.layers.linear import Linear
from dsv3_jax.layers.mla import LatentCache
from dsv3_jax.layers.moe import RoutedExperts
from dsv3_jax.layers.norms import RMSNorm


class MTPModule(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.enorm = RMSNorm(d, cfg.rms_norm_eps, "embed")
    self.hnorm = RMSNorm(d, cfg.rms_norm_eps, "embed")
    self.eh_proj = Linear(
      2 * d,
      d,
      axes=("mtp_in", "embed"),
      std=cfg.init_std,
      precision=cfg.matmul_precision,
      rngs=rngs,
    )
    self.block = Block(cfg, moe=True, rngs=rngs)
    self.norm = RMSNorm(d, cfg.rms_norm_eps, "embed")

  def __call__(
    self,
    h_prev_BxLxD: jax.Array,
    emb_next_BxLxD: jax.Array,
    positions_BxL,
    cos,
    sin,
    cache: Optional[LatentCache] = None,
    routed: Optional[RoutedExperts] = None,
    absorb: Optional[bool] = None,
    causal: bool = False,
  ):
    """Returns (h^k [B, L, D] before the final norm, normed h^k, aux, cache)."""
    x = jnp.concatenate([self.enorm(emb_next_BxLxD), self.hnorm(h_prev_BxLxD)], axis=-1)
    h, aux, cache = self.block(
      self.eh_proj(x), positions_BxL, cos, sin, cache, absorb, routed=routed, causal=causal
    )
    return h, self.norm(h), aux, cache
