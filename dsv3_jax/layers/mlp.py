"""SwiGLU MLP: `W2(silu(W1 x) * W3 x)` — the dense layers and the shared experts."""

import jax
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.linear import Linear


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, width: int, *, rngs: nnx.Rngs):
    lin = dict(std=cfg.init_std, precision=cfg.matmul_precision, rngs=rngs)
    self.w1 = Linear(cfg.hidden_size, width, axes=("embed", "mlp"), **lin)
    self.w3 = Linear(cfg.hidden_size, width, axes=("embed", "mlp"), **lin)
    self.w2 = Linear(width, cfg.hidden_size, axes=("mlp", "embed"), **lin)

  def __call__(self, x_xD: jax.Array) -> jax.Array:
    return self.w2(jax.nn.silu(self.w1(x_xD)) * self.w3(x_xD))
