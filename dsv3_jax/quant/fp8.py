"""DeepSeek-V3 fine-grained FP8 (E4M3) quantization and blockwise-scaled GEMM.

Recipe (DeepSeek-V3 report, Sec. 3.3):

* Format: every GEMM operand is ``float8_e4m3fn`` (4 exponent bits, 3 mantissa
  bits, max finite value 448, no infinities; overflow on a plain cast is NaN, so
  every quantization clips to +-448 first).
* Fine-grained scaling, computed online from the current absolute maximum:
  ``scale = max(amax, 1e-4) / 448`` (computed as a product with the float32
  reciprocal of 448) and ``q = clip(x / scale) -> e4m3``, so ``x ~= q * scale``.
  With ``pow2=True`` the scale is rounded *up* to a power of two (UE8M0 style,
  ``2**ceil(log2(scale))``): ``|x/scale| <= 448`` still holds, scaling is
  exact, and re-tiling an already quantized tensor (the wgrad path below)
  rounds again only values pushed into the e4m3 subnormal range.
    - activations / gradients: one scale per 1x128 tile along the contraction
      axis (``quantize_act``);
    - weights: one scale per 128x128 block (``quantize_weight``).
  Axes whose length is not a multiple of 128 are zero-padded (zero tiles get
  the floor scale ``1e-4/448`` and quantize to 0) and results are sliced back.
* Increased accumulation precision: ``fp8_dot`` multiplies the FP8 operands one
  128-wide K block at a time with FP32 accumulation and applies both scales to
  every block partial before the FP32 sum over blocks (the report's
  promotion interval of 128 elements).
* ``fp8_matmul`` (``jax.custom_vjp``) runs all three GEMMs of a linear layer in
  FP8.  Forward ``y = x w``; backward ``dgrad = g w^T`` (g tiled 1x128 along N,
  the 128x128 weight blocks transposed) and ``wgrad = x^T g`` with both
  operands re-tiled along the token axis M (the cached FP8 activation is
  dequantized and re-quantized in 128x1 tiles, and so is g).  Only the FP8
  activation and its scales are saved for backward, never ``x`` in high
  precision; the weight is kept as its FP8 blocks.  The weight gradient is
  returned in the master weight's dtype (FP32), the input gradient in x's.

Shape legend: ``M`` tokens (any leading dims flattened), ``K`` contraction
(input features), ``N`` output features; ``Kp``/``Np``/``Mp`` padded to a
multiple of 128, ``Kb = Kp // 128`` (and so on) the number of blocks.

Checkpoint convention: HF DeepSeek-V3 stores a linear weight as ``[out, in] =
[N, K]`` float8_e4m3fn plus ``weight_scale_inv`` f32 ``[ceil(N/128),
ceil(K/128)]`` with ``dequantized = block * scale_inv`` (edge blocks partial).
``quantize_hf`` / ``dequantize_hf`` convert to and from that layout; they run on
NumPy arrays (e.g. straight from safetensors) in NumPy and on jax arrays in jnp.

Note: ``fp8_dot`` materializes the per-block partials ``[Kb, M, N]`` in FP32
before the scaled sum; this favours clarity and exactness over memory.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 128
E4M3_MAX = 448.0
FP8 = jnp.float8_e4m3fn  # the ml_dtypes type; works for numpy and jnp alike
_AMAX_FLOOR = 1e-4
_INV_E4M3_MAX = np.float32(1.0 / E4M3_MAX)

__all__ = [
    "BLOCK", "E4M3_MAX", "FP8", "quantize_act", "quantize_weight",
    "dequantize_act", "dequantize_weight", "fp8_dot", "fp8_matmul",
    "quantize_hf", "dequantize_hf", "compute_scale",
]


# ----------------------------------------------------------------------------
# Scales and tile quantization (array-namespace generic: numpy or jnp).
# ----------------------------------------------------------------------------
def _xp(*arrays):
  """NumPy when every input is a NumPy array, jnp otherwise."""
  return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def _round_up(n: int) -> int:
  return -(-n // BLOCK) * BLOCK


def _pow2_ceil(s, xp):
  """Smallest power of two >= s (s > 0), exact: via frexp, no log2 rounding."""
  mant, exp = xp.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
  exp = xp.where(mant == 0.5, exp - 1, exp)
  return xp.ldexp(xp.ones_like(s), exp).astype(np.float32)


def compute_scale(amax, pow2: bool = False, xp=jnp):
  """FP32 dequantization scale from a tile's absolute maximum."""
  amax = amax.astype(np.float32)
  # Multiply by the rounded reciprocal rather than divide: XLA rewrites division by a
  # constant this way, and NumPy and jnp must produce bit-identical scales.
  s = xp.maximum(amax, np.float32(_AMAX_FLOOR)) * _INV_E4M3_MAX
  return _pow2_ceil(s, xp) if pow2 else s


def _quantize_tiles(x, axes, pow2, xp):
  """Scale over `axes` (keepdims), clip to +-448 and cast to e4m3."""
  amax = xp.max(xp.abs(x), axis=axes, keepdims=True)
  s = compute_scale(amax, pow2, xp)
  q = xp.clip(x / s, -E4M3_MAX, E4M3_MAX).astype(FP8)
  return q, s


def _pad_to_block(x, axes, xp):
  pad = [(0, 0)] * x.ndim
  for a in axes:
    pad[a] = (0, _round_up(x.shape[a]) - x.shape[a])
  return xp.pad(x, pad) if any(p[1] for p in pad) else x


def _quantize_blocks_2d(w_RxC, pow2, xp):
  """128x128 block quantization of a 2-D array: q [Rp, Cp], s [Rb, Cb]."""
  w = _pad_to_block(w_RxC.astype(np.float32), (0, 1), xp)
  rp, cp = w.shape
  blocks = w.reshape(rp // BLOCK, BLOCK, cp // BLOCK, BLOCK)
  q, s = _quantize_tiles(blocks, (1, 3), pow2, xp)
  return q.reshape(rp, cp), s[:, 0, :, 0]


def _dequantize_blocks_2d(q_RpxCp, s_RbxCb, r, c, xp):
  rp, cp = q_RpxCp.shape
  blocks = q_RpxCp.astype(np.float32).reshape(rp // BLOCK, BLOCK, cp // BLOCK, BLOCK)
  s = s_RbxCb.astype(np.float32)[:, None, :, None]
  return (blocks * s).reshape(rp, cp)[:r, :c]


# ----------------------------------------------------------------------------
# Public quantize / dequantize.
# ----------------------------------------------------------------------------
def quantize_act(x_MxK, pow2: bool = False):
  """Per 1x128 tile along the last axis: ``[..., K] -> (q [..., Kp] f8, s [..., Kb] f32)``."""
  x = _pad_to_block(jnp.asarray(x_MxK).astype(jnp.float32), (-1,), jnp)
  lead, kp = x.shape[:-1], x.shape[-1]
  q, s = _quantize_tiles(x.reshape(*lead, kp // BLOCK, BLOCK), -1, pow2, jnp)
  return q.reshape(*lead, kp), s[..., 0]


def dequantize_act(q_MxKp, s_MxKb, k: int):
  """Inverse of `quantize_act`, padding sliced away: ``-> f32 [..., k]``."""
  lead, kp = q_MxKp.shape[:-1], q_MxKp.shape[-1]
  tiles = q_MxKp.astype(jnp.float32).reshape(*lead, kp // BLOCK, BLOCK)
  return (tiles * s_MxKb[..., None]).reshape(*lead, kp)[..., :k]


def quantize_weight(w_KxN, pow2: bool = False):
  """Per 128x128 block: ``[K, N] -> (q [Kp, Np] f8, s [Kb, Nb] f32)``."""
  return _quantize_blocks_2d(jnp.asarray(w_KxN), pow2, jnp)


def dequantize_weight(q_KpxNp, s_KbxNb, k: int, n: int):
  """Inverse of `quantize_weight`, padding sliced away: ``-> f32 [k, n]``."""
  return _dequantize_blocks_2d(q_KpxNp, s_KbxNb, k, n, jnp)


# ----------------------------------------------------------------------------
# Blockwise-scaled FP8 GEMM.
# ----------------------------------------------------------------------------
def _blockwise_dot(a_MxKp, sa_MxKb, b_KpxN, sb_KbxN):
  """``C[m,n] = sum_kb dot(a[m,kb], b[kb,n]) * sa[m,kb] * sb[kb,n]`` in FP32.

  One batched dot over K blocks (FP8 operands, FP32 accumulation inside each
  128-element block), both scales applied to each block partial, then an FP32
  sum over the block axis.
  """
  m, kp = a_MxKp.shape
  kb, n = kp // BLOCK, b_KpxN.shape[1]
  a_MxKbxB = a_MxKp.reshape(m, kb, BLOCK)
  b_KbxBxN = b_KpxN.reshape(kb, BLOCK, n)
  part_KbxMxN = jax.lax.dot_general(
      a_MxKbxB, b_KbxBxN,
      dimension_numbers=(((2,), (1,)), ((1,), (0,))),  # batch over Kb
      preferred_element_type=jnp.float32)
  part_KbxMxN = part_KbxMxN * sa_MxKb.T[:, :, None] * sb_KbxN[:, None, :]
  return jnp.sum(part_KbxMxN, axis=0)


def fp8_dot(x_q, x_s, w_q, w_s):
  """FP8 GEMM with per-K-block scale promotion.

  x_q [..., Kp] f8 with x_s [..., Kb] (1x128 tiles); w_q [Kp, Np] f8 with
  w_s [Kb, Nb] (128x128 blocks). Returns f32 [..., Np].
  """
  lead, kp = x_q.shape[:-1], x_q.shape[-1]
  if w_q.shape[0] != kp:
    raise ValueError(f"contraction mismatch: {x_q.shape} vs {w_q.shape}")
  sb_KbxNp = jnp.repeat(w_s, BLOCK, axis=1)
  out = _blockwise_dot(x_q.reshape(-1, kp), x_s.reshape(-1, kp // BLOCK), w_q, sb_KbxNp)
  return out.reshape(*lead, w_q.shape[1])


class _Cfg(NamedTuple):  # static (hashable) data for the custom_vjp
  pow2: bool
  k: int
  x_dtype: jnp.dtype
  w_dtype: jnp.dtype


def fp8_matmul(x, w, pow2: bool = False):
  """``x [..., K] @ w [K, N] -> [..., N]`` (x.dtype), all GEMMs in FP8 (fwd + bwd)."""
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"bad shapes for fp8_matmul: x {x.shape}, w {w.shape}")
  cfg = _Cfg(bool(pow2), int(w.shape[0]), jnp.dtype(x.dtype), jnp.dtype(w.dtype))
  return _fp8_matmul(x, w, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_matmul(x, w, cfg):
  return _fp8_matmul_fwd(x, w, cfg)[0]


def _fp8_matmul_fwd(x, w, cfg):
  n = w.shape[1]
  x_q, x_s = quantize_act(x.reshape(-1, cfg.k), cfg.pow2)  # [M, Kp], [M, Kb]
  w_q, w_s = quantize_weight(w, cfg.pow2)                   # [Kp, Np], [Kb, Nb]
  y_MxN = fp8_dot(x_q, x_s, w_q, w_s)[:, :n]
  y = y_MxN.reshape(*x.shape[:-1], n).astype(cfg.x_dtype)
  return y, (x_q, x_s, w_q, w_s)


def _fp8_matmul_bwd(cfg, res, g):
  x_q, x_s, w_q, w_s = res
  k, n = cfg.k, g.shape[-1]
  g_MxN = g.reshape(-1, n).astype(jnp.float32)
  # dgrad: g tiled 1x128 along N, weight blocks transposed.
  g_q, g_s = quantize_act(g_MxN, cfg.pow2)                   # [M, Np], [M, Nb]
  dx_MxK = fp8_dot(g_q, g_s, w_q.T, w_s.T)[:, :k]
  # wgrad: contraction over tokens, both operands re-tiled along M.
  x_KxM = dequantize_act(x_q, x_s, k).T
  xt_q, xt_s = quantize_act(x_KxM, cfg.pow2)                 # [K, Mp], [K, Mb]
  gt_q, gt_s = quantize_act(g_MxN.T, cfg.pow2)               # [N, Mp], [N, Mb]
  dw_KxN = _blockwise_dot(xt_q, xt_s, gt_q.T, gt_s.T)
  dx = dx_MxK.reshape(*g.shape[:-1], k).astype(cfg.x_dtype)
  return dx, dw_KxN.astype(cfg.w_dtype)


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


# ----------------------------------------------------------------------------
# HF checkpoint layout: weight [out, in] f8 + weight_scale_inv [ceil(out/128), ceil(in/128)].
# ----------------------------------------------------------------------------
def quantize_hf(w_out_in, pow2: bool = False):
  """``[out, in]`` float -> ``(w_f8 [out, in], scale_inv f32 [ceil(out/128), ceil(in/128)])``.

  Same 128x128 blocks as ``quantize_weight(w_out_in.T)``, transposed.
  NumPy in -> NumPy out; otherwise jnp.
  """
  xp = _xp(w_out_in)
  out_dim, in_dim = w_out_in.shape
  q, s = _quantize_blocks_2d(w_out_in, pow2, xp)
  return q[:out_dim, :in_dim], s


def dequantize_hf(w_f8, scale_inv):
  """``w_f8 [out, in]`` (e4m3) and ``scale_inv`` -> f32 ``[out, in]`` (block * scale_inv)."""
  xp = _xp(w_f8, scale_inv)
  out_dim, in_dim = w_f8.shape
  nb_out, nb_in = -(-out_dim // BLOCK), -(-in_dim // BLOCK)
  if scale_inv.shape != (nb_out, nb_in):
    raise ValueError(f"scale_inv {scale_inv.shape} != {(nb_out, nb_in)} for {w_f8.shape}")
  q = _pad_to_block(w_f8.astype(np.float32), (0, 1), xp)
  return _dequantize_blocks_2d(q, scale_inv, out_dim, in_dim, xp)
