"""Linear projections whose matmul precision is a config switch.

FP8 is a property of the dot, not of the model: every projection in MLA, the MLPs, the
experts and the MTP combiner goes through `matmul`, which runs in float32, bfloat16 (with
float32 accumulation) or DeepSeek-V3's fine-grained FP8 (`dsv3_jax.quant.fp8`). Master
weights are always float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def matmul(x_xK: jax.Array, w_KxN: jax.Array, precision: str) -> jax.Array:
  """`x @ w` in the chosen precision; the result has x's dtype.

  Leading dims are flattened into one row dim first: the weight gradient is then a plain
  [K, M] x [M, N] GEMM, where with [B, L, K] inputs it contracts two dims at once, which
  XLA:CPU runs about 2x slower (measured on the head, [4, 512, 512] x [512, 8192]).
  """
  if precision == "fp8":
    from dsv3_jax.quant import fp8  # local import: quant depends on nothing here

    return fp8.fp8_matmul(x_xK, w_KxN)
  lead = x_xK.shape[:-1]
  x_MxK = x_xK.reshape(-1, x_xK.shape[-1])
  if precision == "bf16":
    y = jnp.dot(
      x_MxK.astype(jnp.bfloat16), w_KxN.astype(jnp.bfloat16), preferred_element_type=jnp.float32
    )
  elif precision == "fp32":
    y = jnp.dot(x_MxK.astype(jnp.float32), w_KxN.astype(jnp.float32))
  else:
    raise ValueError(f"unknown matmul precision {precision!r}")
  return y.reshape(lead + (w_KxN.shape[-1],)).astype(x_xK.dtype)


class Linear(nnx.Module):
  """A bias-free projection with an `[in, out]` float32 kernel and logical axis names."""

  def __init__(
    self,
    d_in: int,
    d_out: int,
    *,
    axes: tuple[str, str],
    std: float,
    precision: str,
    rngs: nnx.Rngs,
  ):
    init = jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32) * std
    self.kernel = nnx.Param(init, axes=axes)
    self.precision = precision

  def __call__(self, x_xK: jax.Array) -> jax.Array:
    return matmul(x_xK, self.kernel[...], self.precision)
