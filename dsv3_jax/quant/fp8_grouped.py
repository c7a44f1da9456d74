"""FP8 grouped GEMM for the dropless routed experts (fprop, dgrad and wgrad in FP8).

The MoE layer sorts token copies by expert into a buffer of `NB` blocks of `S` rows
(`x [NB, S, K]`); block `b` holds rows of expert `block_expert[b]` only, and blocks
`b >= n_used` hold nothing. `grouped_matmul_fp8` computes `out[b] = x[b] @ w[block_expert[b]]`
with DeepSeek-V3's fine-grained FP8 recipe (`dsv3_jax.quant.fp8`), mirroring `fp8_matmul`:

* fprop:  the whole buffer is quantized once per 1x128 tile along K, every expert's weight
          per 128x128 block. Both are dequantized once into the GEMM operand dtype (bf16:
          exact for power-of-two scales; `dsv3_jax.quant.fp8` documents what is exact and
          the promotion semantics vs the report's N_C = 128), and each used block is one
          GEMM with FP32 accumulation against its expert's dequantized weight, as `fp8_dot`.
* dgrad:  the output gradient is quantized per 1x128 tile along F; each block's GEMM contracts
          it over F with the same dequantized weight blocks (transposed, not requantized).
* wgrad:  a contraction over tokens. The cached FP8 activation and the gradient are re-tiled
          128x1 along the token axis of the sorted buffer (one scale per feature per 128
          consecutive rows, the report's granularity) and each used block adds its rows'
          `x_b^T g_b` to its expert's FP32 gradient: both operands dequantized with the
          scales of the 128-row tile each row lies in (for `S >= 128` a block spans
          `S / 128` tiles) and one GEMM over the block's S rows, no per-tile partials.
* All dequantization happens once per buffer, outside the loops over blocks: the loops run
  GEMMs only. The price is one bf16 copy of the (local) experts' weights while the layer
  runs, half the size of their FP32 masters.
* Only the FP8 activation buffer and its scales are saved for backward, never x in high
  precision; the weights are kept as their FP8 blocks. The weight gradient is returned in the
  master weight's dtype (FP32), the input gradient in x's dtype.

Row tiles and blocks must nest, so `S` must divide 128 or be a multiple of it
(`expert_block_size` 16, 32, 64, 128, 256, ... all qualify; `check_block_size`). The
dequantize-then-GEMM wgrad no longer relies on it (every element carries its own tile's
scale); the check stays so that accepted configurations do not change.

Legend: NB blocks, S rows per block, K input features, F output features, E experts,
R = NB * S rows of the sorted buffer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.quant import fp8

__all__ = ["check_block_size", "grouped_matmul_fp8"]


def check_block_size(s: int) -> None:
  """Raises ValueError unless blocks of `s` rows nest with 128-row wgrad tiles."""
  if s <= 0 or (fp8.BLOCK % s and s % fp8.BLOCK):
    raise ValueError(
      f"invalid expert block size (model.expert_block_size) = {s} for fp8: it "
      f"must divide {fp8.BLOCK} or be a multiple of it"
    )


class _Cfg(NamedTuple):  # static (hashable) data for the custom_vjp
  pow2: bool
  k: int
  f: int
  x_dtype: jnp.dtype
  w_dtype: jnp.dtype
  operand_dtype: jnp.dtype


def grouped_matmul_fp8(
  x_NBxSxK: jax.Array,
  w_ExKxF: jax.Array,
  block_expert_NB: jax.Array,
  n_used: jax.Array,
  pow2: bool = False,
  operand_dtype=jnp.bfloat16,
) -> jax.Array:
  """`out[b] = x[b] @ w[block_expert[b]]` for b < n_used (zeros beyond), all GEMMs in FP8.

  `operand_dtype`: what the FP8 tiles are dequantized into for the GEMMs (`fp8.fp8_dot`).
  """
  if x_NBxSxK.ndim != 3 or w_ExKxF.ndim != 3 or x_NBxSxK.shape[2] != w_ExKxF.shape[1]:
    raise ValueError(
      f"bad shapes for grouped_matmul_fp8: x {x_NBxSxK.shape} (want [NB, S, K]), "
      f"w {w_ExKxF.shape} (want [E, K, F])"
    )
  if block_expert_NB.shape != x_NBxSxK.shape[:1]:
    raise ValueError(f"block_expert_NB {block_expert_NB.shape} must be [{x_NBxSxK.shape[0]}]")
  check_block_size(x_NBxSxK.shape[1])
  cfg = _Cfg(
    bool(pow2),
    int(w_ExKxF.shape[1]),
    int(w_ExKxF.shape[2]),
    jnp.dtype(x_NBxSxK.dtype),
    jnp.dtype(w_ExKxF.dtype),
    jnp.dtype(operand_dtype),
  )
  return _grouped(x_NBxSxK, w_ExKxF, block_expert_NB, n_used, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped(x, w, block_expert, n_used, cfg):
  return _grouped_fwd(x, w, block_expert, n_used, cfg)[0]


def _quantize_experts(w_ExKxF, pow2):
  """Every expert's weight per 128x128 block: q [E, Kp, Fp] f8, s [E, Kb, Fb] f32."""
  return jax.vmap(lambda w: fp8.quantize_weight(w, pow2))(w_ExKxF)


def _dequantize_experts(w_q, w_s, cfg):
  """Every expert's weight blocks dequantized for the GEMMs: [E, K, F] in the operand dtype."""
  return jax.vmap(lambda q, s: fp8.dequantize_weight(q, s, cfg.k, cfg.f, cfg.operand_dtype))(
    w_q, w_s
  )


def _grouped_fwd(x, w, block_expert, n_used, cfg):
  nb, s, _ = x.shape
  x_q, x_s = fp8.quantize_act(x, cfg.pow2)  # [NB, S, Kp] f8, [NB, S, Kb]
  w_q, w_s = _quantize_experts(w, cfg.pow2)  # [E, Kp, Fp] f8, [E, Kb, Fb]
  # Dequantized once, outside the loop over blocks (not once per block and expert).
  x_NBxSxK = fp8.dequantize_act(x_q, x_s, cfg.k, cfg.operand_dtype)
  w_ExKxF = _dequantize_experts(w_q, w_s, cfg)
  zeros_SxF = jnp.zeros((s, cfg.f), cfg.x_dtype)

  def body(args):
    x_SxK, e, b = args

    def used():
      return fp8.dot_f32(x_SxK, w_ExKxF[e], ((1,), (0,))).astype(cfg.x_dtype)

    return jax.lax.cond(b < n_used, used, lambda: zeros_SxF)

  out = jax.lax.map(body, (x_NBxSxK, block_expert, jnp.arange(nb)))
  return out, (x_q, x_s, w_q, w_s, block_expert, n_used)


def _row_tiled(a_RxC, nb: int, s: int, pow2: bool, dtype):
  """Re-tiles `[rows, C]` 128x1 along rows and dequantizes it: [NB, S, C] in `dtype`.

  One scale per column per 128 consecutive rows of the sorted buffer (rows padded to a
  multiple of 128); every element is dequantized with the scale of the tile it lies in.
  """
  q_RpxC, s_RbxC = fp8.quantize_act(a_RxC, pow2, axis=0)
  return fp8.dequantize_act(q_RpxC, s_RbxC, nb * s, dtype, axis=0).reshape(nb, s, -1)


def _grouped_bwd(cfg, res, g_NBxSxF):
  x_q, x_s, w_q, w_s, block_expert, n_used = res
  nb, s, _ = x_q.shape
  k, f, dtype = cfg.k, cfg.f, cfg.operand_dtype
  used_NB = jnp.arange(nb) < n_used
  # Unused blocks produced constant zeros: their cotangent is dropped before any scale sees it.
  g = jnp.where(used_NB[:, None, None], g_NBxSxF.astype(jnp.float32), 0.0)

  # dgrad: g tiled 1x128 along F against each expert's 128x128 weight blocks, contracted
  # over F (the transpose of dequantizing w_q^T with w_s^T, exactly).
  g_q, g_s = fp8.quantize_act(g, cfg.pow2)  # [NB, S, Fp], [NB, S, Fb]
  g_NBxSxF_deq = fp8.dequantize_act(g_q, g_s, f, dtype)
  w_ExKxF = _dequantize_experts(w_q, w_s, cfg)
  zeros_SxK = jnp.zeros((s, k), cfg.x_dtype)

  def dgrad(args):
    g_SxF, e, used = args

    def compute():
      return fp8.dot_f32(g_SxF, w_ExKxF[e], ((1,), (1,))).astype(cfg.x_dtype)

    return jax.lax.cond(used, compute, lambda: zeros_SxK)

  dx = jax.lax.map(dgrad, (g_NBxSxF_deq, block_expert, used_NB))

  # wgrad: both operands re-tiled 128x1 along the token rows of the sorted buffer.
  x_NBxSxK = jnp.where(used_NB[:, None, None], fp8.dequantize_act(x_q, x_s, k), 0.0)
  xt_NBxSxK = _row_tiled(x_NBxSxK.reshape(nb * s, k), nb, s, cfg.pow2, dtype)
  gt_NBxSxF = _row_tiled(g.reshape(nb * s, f), nb, s, cfg.pow2, dtype)
  zeros_KxF = jnp.zeros((k, f), jnp.float32)

  def wgrad(dw_ExKxF, args):
    xt_SxK, gt_SxF, e, used = args
    part_KxF = jax.lax.cond(
      used, lambda: fp8.dot_f32(xt_SxK, gt_SxF, ((0,), (0,))), lambda: zeros_KxF
    )
    # The [E, K, F] accumulator stays outside the cond (a cond carrying it copies it per block).
    zero = jnp.zeros((), jnp.int32)
    current = jax.lax.dynamic_slice(dw_ExKxF, (e, zero, zero), (1, k, f))
    return jax.lax.dynamic_update_slice(dw_ExKxF, current + part_KxF[None], (e, zero, zero)), None

  dw0 = jnp.zeros((w_q.shape[0], k, f), jnp.float32)
  dw, _ = jax.lax.scan(wgrad, dw0, (xt_NBxSxK, gt_NBxSxF, block_expert, used_NB))
  return dx, dw.astype(cfg.w_dtype), None, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)
