"""FP8 grouped GEMM for the dropless routed experts (fprop, dgrad and wgrad in FP8).

The MoE layer sorts token copies by expert into a buffer of `NB` blocks of `S` rows
(`x [NB, S, K]`); block `b` holds rows of expert `block_expert[b]` only, and blocks
`b >= n_used` hold nothing. `grouped_matmul_fp8` computes `out[b] = x[b] @ w[block_expert[b]]`
with DeepSeek-V3's fine-grained FP8 recipe (`dsv3_jax.quant.fp8`), mirroring `fp8_matmul`:

* fprop:  the whole buffer is quantized once per 1x128 tile along K, every expert's weight
          per 128x128 block; each block is one `fp8_dot` (per-K-block scale promotion).
* dgrad:  the output gradient is quantized per 1x128 tile along F; each block is
          `fp8_dot(g_q, g_s, w_q[e]^T, w_s[e]^T)` (the weight blocks transposed, not requantized).
* wgrad:  a contraction over tokens. The cached FP8 activation and the gradient are re-tiled
          128x1 along the token axis of the sorted buffer (one scale per feature per 128
          consecutive rows, the report's granularity) and each used block adds its rows'
          partial `x_b^T g_b`, scaled by the scales of the 128-row tile it lies in (for
          `S >= 128` a block spans `S / 128` tiles, one partial per tile), to its expert's
          FP32 gradient.
* Only the FP8 activation buffer and its scales are saved for backward, never x in high
  precision; the weights are kept as their FP8 blocks. The weight gradient is returned in the
  master weight's dtype (FP32), the input gradient in x's dtype.

Row tiles and blocks must nest, so `S` must divide 128 or be a multiple of it
(`expert_block_size` 16, 32, 64, 128, 256, ... all qualify).

Legend: NB blocks, S rows per block, K input features, F output features, E experts,
T the number of 128-row tiles a block spans (1 when S <= 128), R rows per tile in a block.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.quant import fp8

__all__ = ["grouped_matmul_fp8", "check_block_size"]


def check_block_size(s: int) -> None:
  """Raises ValueError unless blocks of `s` rows nest with 128-row wgrad tiles."""
  if s <= 0 or (fp8.BLOCK % s and s % fp8.BLOCK):
    raise ValueError(f"invalid expert block size (model.expert_block_size) = {s} for fp8: it "
                     f"must divide {fp8.BLOCK} or be a multiple of it")


class _Cfg(NamedTuple):  # static (hashable) data for the custom_vjp
  pow2: bool
  k: int
  f: int
  x_dtype: jnp.dtype
  w_dtype: jnp.dtype


def grouped_matmul_fp8(x_NBxSxK: jax.Array, w_ExKxF: jax.Array, block_expert_NB: jax.Array,
                       n_used: jax.Array, pow2: bool = False) -> jax.Array:
  """`out[b] = x[b] @ w[block_expert[b]]` for b < n_used (zeros beyond), all GEMMs in FP8."""
  if x_NBxSxK.ndim != 3 or w_ExKxF.ndim != 3 or x_NBxSxK.shape[2] != w_ExKxF.shape[1]:
    raise ValueError(f"bad shapes for grouped_matmul_fp8: x {x_NBxSxK.shape} (want [NB, S, K]), "
                     f"w {w_ExKxF.shape} (want [E, K, F])")
  if block_expert_NB.shape != x_NBxSxK.shape[:1]:
    raise ValueError(f"block_expert_NB {block_expert_NB.shape} must be [{x_NBxSxK.shape[0]}]")
  check_block_size(x_NBxSxK.shape[1])
  cfg = _Cfg(bool(pow2), int(w_ExKxF.shape[1]), int(w_ExKxF.shape[2]),
             jnp.dtype(x_NBxSxK.dtype), jnp.dtype(w_ExKxF.dtype))
  return _grouped(x_NBxSxK, w_ExKxF, block_expert_NB, n_used, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped(x, w, block_expert, n_used, cfg):
  return _grouped_fwd(x, w, block_expert, n_used, cfg)[0]


def _quantize_experts(w_ExKxF, pow2):
  """Every expert's weight per 128x128 block: q [E, Kp, Fp] f8, s [E, Kb, Fb] f32."""
  return jax.vmap(lambda w: fp8.quantize_weight(w, pow2))(w_ExKxF)


def _grouped_fwd(x, w, block_expert, n_used, cfg):
  nb, s, _ = x.shape
  x_q, x_s = fp8.quantize_act(x, cfg.pow2)        # [NB, S, Kp] f8, [NB, S, Kb]
  w_q, w_s = _quantize_experts(w, cfg.pow2)       # [E, Kp, Fp] f8, [E, Kb, Fb]
  zeros_SxF = jnp.zeros((s, cfg.f), cfg.x_dtype)

  def body(args):
    xq_b, xs_b, e, b = args

    def used():
      return fp8.fp8_dot(xq_b, xs_b, w_q[e], w_s[e])[:, :cfg.f].astype(cfg.x_dtype)

    return jax.lax.cond(b < n_used, used, lambda: zeros_SxF)

  out = jax.lax.map(body, (x_q, x_s, block_expert, jnp.arange(nb)))
  return out, (x_q, x_s, w_q, w_s, block_expert, n_used)


def _row_tiles(a_RxC, nb: int, s: int, pow2: bool):
  """Re-tiles `[rows, C]` 128x1 along rows: q [NB, C, S] f8 and s [NB, C, T] per block."""
  q_CxRp, s_CxRb = fp8.quantize_act(a_RxC.T, pow2)    # tiles of 128 rows, rows padded
  c, rows = q_CxRp.shape[0], nb * s
  q_NBxCxS = q_CxRp[:, :rows].reshape(c, nb, s).transpose(1, 0, 2)
  if s <= fp8.BLOCK:  # each block lies inside one tile
    tile_of_block = jnp.arange(nb) * s // fp8.BLOCK
    s_NBxCxT = s_CxRb[:, tile_of_block].T[:, :, None]
  else:               # each block spans s / 128 whole tiles
    s_NBxCxT = s_CxRb.reshape(c, nb, s // fp8.BLOCK).transpose(1, 0, 2)
  return q_NBxCxS, s_NBxCxT


def _tile_scaled_dot(a_KxS, sa_KxT, b_FxS, sb_FxT):
  """`sum_t dot(a[:, tile t], b[:, tile t]^T) * sa[:, t] * sb[:, t]^T` in FP32: [K, F]."""
  k, s = a_KxS.shape
  f, t = b_FxS.shape[0], sa_KxT.shape[1]
  part_TxKxF = jax.lax.dot_general(
      a_KxS.reshape(k, t, s // t), b_FxS.reshape(f, t, s // t),
      dimension_numbers=(((2,), (2,)), ((1,), (1,))),  # batch over tiles
      preferred_element_type=jnp.float32)
  part_TxKxF = part_TxKxF * sa_KxT.T[:, :, None] * sb_FxT.T[:, None, :]
  return jnp.sum(part_TxKxF, axis=0)


def _grouped_bwd(cfg, res, g_NBxSxF):
  x_q, x_s, w_q, w_s, block_expert, n_used = res
  nb, s, _ = x_q.shape
  k, f = cfg.k, cfg.f
  used_NB = jnp.arange(nb) < n_used
  # Unused blocks produced constant zeros: their cotangent is dropped before any scale sees it.
  g = jnp.where(used_NB[:, None, None], g_NBxSxF.astype(jnp.float32), 0.0)

  # dgrad: g tiled 1x128 along F, each expert's weight blocks transposed.
  g_q, g_s = fp8.quantize_act(g, cfg.pow2)                  # [NB, S, Fp], [NB, S, Fb]
  wt_q, wt_s = w_q.transpose(0, 2, 1), w_s.transpose(0, 2, 1)
  zeros_SxK = jnp.zeros((s, k), cfg.x_dtype)

  def dgrad(args):
    gq_b, gs_b, e, used = args

    def compute():
      return fp8.fp8_dot(gq_b, gs_b, wt_q[e], wt_s[e])[:, :k].astype(cfg.x_dtype)

    return jax.lax.cond(used, compute, lambda: zeros_SxK)

  dx = jax.lax.map(dgrad, (g_q, g_s, block_expert, used_NB))

  # wgrad: both operands re-tiled 128x1 along the token rows of the sorted buffer.
  x_NBxSxK = jnp.where(used_NB[:, None, None], fp8.dequantize_act(x_q, x_s, k), 0.0)
  x_RxK = x_NBxSxK.reshape(nb * s, k)
  xt_q, xt_s = _row_tiles(x_RxK, nb, s, cfg.pow2)           # [NB, K, S], [NB, K, T]
  gt_q, gt_s = _row_tiles(g.reshape(nb * s, f), nb, s, cfg.pow2)  # [NB, F, S], [NB, F, T]

  zeros_KxF = jnp.zeros((k, f), jnp.float32)

  def wgrad(dw_ExKxF, args):
    xq_b, xs_b, gq_b, gs_b, e, used = args
    part_KxF = jax.lax.cond(used, lambda: _tile_scaled_dot(xq_b, xs_b, gq_b, gs_b),
                            lambda: zeros_KxF)
    # The [E, K, F] accumulator stays outside the cond (a cond carrying it copies it per block).
    zero = jnp.zeros((), jnp.int32)
    current = jax.lax.dynamic_slice(dw_ExKxF, (e, zero, zero), (1, k, f))
    return jax.lax.dynamic_update_slice(dw_ExKxF, current + part_KxF[None], (e, zero, zero)), None

  dw0 = jnp.zeros((w_q.shape[0], k, f), jnp.float32)
  dw, _ = jax.lax.scan(wgrad, dw0, (xt_q, xt_s, gt_q, gt_s, block_expert, used_NB))
  return dx, dw.astype(cfg.w_dtype), None, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)
