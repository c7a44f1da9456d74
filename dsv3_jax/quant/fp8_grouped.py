"""FP8 operands of the routed experts (fprop, dgrad and wgrad in FP8).

The routed experts (`layers/experts.py`) run as batched GEMMs over capacity buckets
(`[E, C, D]`: expert e's rows in slots 0..C-1) with an exact overflow pass that loops over
expert-sorted blocks of S rows. Both apply DeepSeek-V3's fine-grained recipe
(`dsv3_jax.quant.fp8`, arXiv 2412.19437 §3.3) through the two functions here:

* fprop:  the rows are quantized per 1x128 tile along D (`tiles(x)`), every expert's weight
          per 128x128 block (`expert_weights`); the SwiGLU output per 1x128 tile along F.
* dgrad:  the output gradient per 1x128 tile along its contraction axis, against the same
          128x128 weight blocks, transposed (not requantized).
* wgrad:  a contraction over tokens: both operands re-tiled 128x1 along the token axis
          (`tiles(a, axis=...)`): along an expert's C bucket slots, or a block's S rows, so a
          tile never mixes two experts' rows (empty slots are zeros and take no part).
* Each operand is dequantized (``q * s``) into bf16 and every GEMM accumulates in FP32, as
  `fp8.fp8_dot` does (exact for power-of-two scales; `dsv3_jax.quant.fp8` documents the
  promotion semantics vs the report's N_C = 128). The experts' weights are dequantized once
  per layer, outside any loop: one bf16 copy of the (local) experts' weights while the layer
  runs, half the size of their FP32 masters.
* The bucket buffer is kept for backward as its FP8 tiles and scales (`fp8.as_bytes`), never
  in high precision; the weights, inputs of the layer, are re-quantized in backward (the
  same blocks, bit for bit). Weight gradients are FP32.

Legend: E experts, K input features, F output features, C bucket slots, S rows per block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.quant import fp8

__all__ = ["expert_weights", "tiles"]


def tiles(a, axis: int = -1, pow2: bool = False, dtype=jnp.bfloat16):
  """`a` as an FP8 GEMM operand: 1x128 tiles along `axis` (the contraction axis) quantized to
  e4m3 and dequantized into `dtype`, the operand `fp8.fp8_dot` multiplies. The last axis tiles
  an activation for fprop/dgrad, the token axis the 128x1 tiles of a wgrad operand."""
  q, s = fp8.quantize_act(a, pow2, axis=axis)
  return fp8.dequantize_act(q, s, a.shape[axis], dtype, axis=axis)


def expert_weights(w_ExKxF, pow2: bool = False, dtype=jnp.bfloat16):
  """Every expert's weight as an FP8 GEMM operand: 128x128 blocks quantized to e4m3 and
  dequantized into `dtype`, [E, K, F] (its transpose is the dgrad operand, as in
  `fp8.fp8_matmul`)."""
  k, f = w_ExKxF.shape[1:]

  def one(w_KxF):
    return fp8.dequantize_weight(*fp8.quantize_weight(w_KxF, pow2), k, f, dtype)

  return jax.vmap(one)(w_ExKxF)
