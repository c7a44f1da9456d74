"""RMSNorm, computed in float32 whatever the activation dtype."""

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x_xD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  x = x_xD.astype(jnp.float32)
  y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  scale = scale_D.astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (-1,))
  return (y * scale).astype(x_xD.dtype)


class RMSNorm(nnx.Module):
  """`y = x / rms(x) * scale`; the scale starts at one."""

  def __init__(self, dim: int, eps: float, axis_name: str = "norm"):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=(axis_name,))

  def __call__(self, x_xD: jax.Array) -> jax.Array:
    return rms_norm(x_xD, self.scale[...], self.eps)
