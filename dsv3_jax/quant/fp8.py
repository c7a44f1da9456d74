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
* Increased accumulation precision (the report's N_C = 128 promotion): ``fp8_dot``
  dequantizes every 1x128 tile and 128x128 block (``q * s``) into the GEMM operand
  dtype, bfloat16 by default, and runs ONE GEMM over the whole K with FP32
  accumulation (``preferred_element_type=float32``).  No ``[Kb, M, N]`` per-block
  partials exist: memory is that of a bf16 GEMM (operands, f32 result) whatever K.
  What is exact (see "Promotion semantics" below):
    - power-of-two scales (``pow2=True``): an e4m3 value has 4 significant bits and
      bf16 has 8, so ``q * 2**e`` is exact in bf16 (the exponent range of bf16 is
      that of f32, so the floor scale ``1e-4/448`` times the smallest e4m3
      subnormal ``2**-9`` is still normal), and so is every bf16 x bf16 product in
      the FP32 accumulator (16 <= 24 significant bits).  The GEMM then computes
      ``sum_k (qa sa)(qb sb)`` with FP32 additions as its only roundings.
    - FP32 scales (the default, the report's recipe): ``q * s`` needs up to 28
      significant bits, so no single bf16 GEMM is exact (splitting ``s`` into bf16-
      exact pieces takes six 4-bit pieces, i.e. six GEMMs).  The bf16 operand is
      ``q * s`` rounded to f32 and then to bf16: relative error <= 2**-9 (1 + 2**-14)
      per element, 32x below e4m3's own rounding bound 2**-4.
      ``operand_dtype=jnp.float32`` dequantizes into f32 instead (one rounding of
      2**-24 per element; the GEMM at ``Precision.HIGHEST`` so no backend drops to
      TF32 or bf16 passes): exact to FP32 rounding like a per-block scaled sum, at
      twice the operand memory and FP32 GEMM speed.
* ``fp8_matmul`` (``jax.custom_vjp``) runs all three GEMMs of a linear layer in
  FP8.  Forward ``y = x w``; backward ``dgrad = g w^T`` (g tiled 1x128 along N,
  the 128x128 weight blocks transposed) and ``wgrad = x^T g`` with both
  operands re-tiled along the token axis M (the cached FP8 activation is
  dequantized and re-quantized in 128x1 tiles, and so is g; ``quantize_act(...,
  axis=0)`` tiles in place, no transposes).  Only the FP8
  activation and its scales are saved for backward, never ``x`` in high
  precision; the weight is kept as its FP8 blocks (FP8 residuals are stored as
  their raw bytes, ``as_bytes``: a scan over layers stacks uint8 in place, where
  XLA:CPU rewrites a float8 stack through f16 per layer).  The weight gradient is
  returned in the master weight's dtype (FP32), the input gradient in x's.

Shape legend: ``M`` tokens (any leading dims flattened), ``K`` contraction
(input features), ``N`` output features; ``Kp``/``Np``/``Mp`` padded to a
multiple of 128, ``Kb = Kp // 128`` (and so on) the number of blocks.

Checkpoint convention: HF DeepSeek-V3 stores a linear weight as ``[out, in] =
[N, K]`` float8_e4m3fn plus ``weight_scale_inv`` f32 ``[ceil(N/128),
ceil(K/128)]`` with ``dequantized = block * scale_inv`` (edge blocks partial).
``quantize_hf`` / ``dequantize_hf`` convert to and from that layout; they run on
NumPy arrays (e.g. straight from safetensors) in NumPy and on jax arrays in jnp.

Promotion semantics vs the report (Sec. 3.3.2, "Increasing Accumulation
Precision"): H800 tensor cores accumulate FP8 products with only ~14 significant
bits, so DeepSeek-V3 copies the partial sum to FP32 registers every N_C = 128
elements of K, multiplies it by the two scales there and accumulates the scaled
partials in FP32.  Dequantize-then-GEMM folds the scales into the operands first
and accumulates every single product in FP32, i.e. it promotes at interval 1:
    - with power-of-two scales the operands and their products are exact, so the
      only roundings are FP32 additions: worst case (K - 1) u sum|a||b| with
      u = 2**-24 (7168 u ~ 2**-11 at K = 7168).  The report's scheme makes FP32
      additions too, and before them the in-block ~14-bit accumulation alone is
      bounded by ~127 * 2**-14 ~ 2**-7 of the same sum: the worst case here is
      smaller for any K < 2**17 (DeepSeek-V3's largest K is 18432);
    - with FP32 scales the comparison is no longer one-sided: the report's
      in-block partials carry ~14-bit accumulation error, ours carry the bf16
      rounding of each operand above (<= 2**-9); both are far below e4m3's 2**-4,
      and ``operand_dtype=jnp.float32`` removes ours.
The backend picks the summation order (blocked on CPU, tiled on GPU), so results
match a fixed-order reference to FP32 rounding, not bit for bit, except where every
partial sum is exactly representable (tests/quant/test_fp8.py).
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
  "BLOCK",
  "E4M3_MAX",
  "FP8",
  "compute_scale",
  "dequantize_act",
  "dequantize_hf",
  "dequantize_weight",
  "dot_f32",
  "fp8_dot",
  "fp8_matmul",
  "quantize_act",
  "quantize_hf",
  "quantize_weight",
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
def quantize_act(x_MxK, pow2: bool = False, axis: int = -1):
  """Per 1x128 tile along ``axis`` (the last by default): ``[..., K] -> (q [..., Kp] f8,
  s [..., Kb] f32)``; with ``axis=0`` the 128x1 tiles of the wgrad operands, in place
  (``[M, N] -> (q [Mp, N], s [Mb, N])``, the same tiles as ``quantize_act(x.T)``, transposed,
  without transposing x)."""
  x = jnp.asarray(x_MxK).astype(jnp.float32)
  axis = axis % x.ndim
  x = _pad_to_block(x, (axis,), jnp)
  shape = x.shape
  tiles = x.reshape(*shape[:axis], shape[axis] // BLOCK, BLOCK, *shape[axis + 1 :])
  q, s = _quantize_tiles(tiles, axis + 1, pow2, jnp)
  return q.reshape(shape), jnp.squeeze(s, axis + 1)


def dequantize_act(q_MxKp, s_MxKb, k: int, dtype=jnp.float32, axis: int = -1):
  """Inverse of `quantize_act`, padding sliced away: ``-> [..., k]`` in ``dtype``.

  Each element is ``q * s`` as one float32 product, then cast to ``dtype`` (exact in
  bfloat16 for power-of-two scales; see the module docstring).
  """
  axis = axis % q_MxKp.ndim
  shape = q_MxKp.shape
  tiles = q_MxKp.astype(jnp.float32).reshape(
    *shape[:axis], shape[axis] // BLOCK, BLOCK, *shape[axis + 1 :]
  )
  x = (tiles * jnp.expand_dims(s_MxKb, axis + 1)).reshape(shape)
  return jax.lax.slice_in_dim(x, 0, k, axis=axis).astype(dtype)


def quantize_weight(w_KxN, pow2: bool = False):
  """Per 128x128 block: ``[K, N] -> (q [Kp, Np] f8, s [Kb, Nb] f32)``."""
  return _quantize_blocks_2d(jnp.asarray(w_KxN), pow2, jnp)


def dequantize_weight(q_KpxNp, s_KbxNb, k: int, n: int, dtype=jnp.float32):
  """Inverse of `quantize_weight`, padding sliced away: ``-> [k, n]`` in ``dtype``."""
  return _dequantize_blocks_2d(q_KpxNp, s_KbxNb, k, n, jnp).astype(dtype)


def as_bytes(q):
  """FP8 values as their raw bytes (uint8, a free bitcast), for storage between passes.

  Residuals saved for backward are stacked across the layers of a scan: a dynamic update of
  a float8 buffer is not native on every backend (XLA:CPU widens the whole buffer to f16 and
  back for each layer's slice), while a uint8 one is updated in place. Same bytes either way.
  """
  return jax.lax.bitcast_convert_type(q, jnp.uint8)


def from_bytes(b):
  """Inverse of `as_bytes`."""
  return jax.lax.bitcast_convert_type(b, FP8)


# ----------------------------------------------------------------------------
# Blockwise-scaled FP8 GEMM.
# ----------------------------------------------------------------------------
def dot_f32(a, b, contracting):
  """One GEMM over dequantized operands with FP32 accumulation (``contracting`` as in
  ``lax.dot_general``, no batch dims). f32 operands run at ``Precision.HIGHEST`` so no
  backend drops to TF32 or bf16 passes; bf16 operands are exact products either way."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(
    a, b, (contracting, ((), ())), precision=precision, preferred_element_type=jnp.float32
  )


def fp8_dot(x_q, x_s, w_q, w_s, operand_dtype=jnp.bfloat16, k=None, n=None):
  """Blockwise-scaled FP8 GEMM: ``sum_k (x_q x_s)[m, k] (w_q w_s)[k, n]`` in FP32.

  x_q [..., Kp] f8 with x_s [..., Kb] (1x128 tiles); w_q [Kp, Np] f8 with w_s [Kb, Nb]
  (128x128 blocks). Both are dequantized into ``operand_dtype`` (bfloat16: exact for
  power-of-two scales; float32: one f32 rounding for any scales) and multiplied in one
  GEMM with FP32 accumulation (DeepSeek-V3 report Sec. 3.3.2; the module docstring gives
  the promotion semantics). ``k`` / ``n``, the unpadded sizes, slice the padding off the
  operands before the GEMM (zeros: the same result without their flops). Returns f32
  [..., n] (n defaults to Np).
  """
  lead, kp = x_q.shape[:-1], x_q.shape[-1]
  if w_q.shape[0] != kp:
    raise ValueError(f"contraction mismatch: {x_q.shape} vs {w_q.shape}")
  k = kp if k is None else k
  n = w_q.shape[1] if n is None else n
  x_MxK = dequantize_act(x_q.reshape(-1, kp), x_s.reshape(-1, kp // BLOCK), k, operand_dtype)
  w_KxN = dequantize_weight(w_q, w_s, k, n, operand_dtype)
  return dot_f32(x_MxK, w_KxN, ((1,), (0,))).reshape(*lead, n)


class _Cfg(NamedTuple):  # static (hashable) data for the custom_vjp
  pow2: bool
  k: int
  x_dtype: jnp.dtype
  w_dtype: jnp.dtype
  operand_dtype: jnp.dtype


def fp8_matmul(x, w, pow2: bool = False, operand_dtype=jnp.bfloat16):
  """``x [..., K] @ w [K, N] -> [..., N]`` (x.dtype), all GEMMs in FP8 (fwd + bwd).

  ``operand_dtype``: what the FP8 tiles are dequantized into for the GEMMs (`fp8_dot`).
  """
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"bad shapes for fp8_matmul: x {x.shape}, w {w.shape}")
  cfg = _Cfg(
    bool(pow2), int(w.shape[0]), jnp.dtype(x.dtype), jnp.dtype(w.dtype), jnp.dtype(operand_dtype)
  )
  return _fp8_matmul(x, w, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_matmul(x, w, cfg):
  return _fp8_matmul_fwd(x, w, cfg)[0]


def _fp8_matmul_fwd(x, w, cfg):
  n = w.shape[1]
  x_q, x_s = quantize_act(x.reshape(-1, cfg.k), cfg.pow2)  # [M, Kp], [M, Kb]
  w_q, w_s = quantize_weight(w, cfg.pow2)  # [Kp, Np], [Kb, Nb]
  y_MxN = fp8_dot(x_q, x_s, w_q, w_s, cfg.operand_dtype, cfg.k, n)
  y = y_MxN.reshape(*x.shape[:-1], n).astype(cfg.x_dtype)
  return y, (as_bytes(x_q), x_s, as_bytes(w_q), w_s)


def _fp8_matmul_bwd(cfg, res, g):
  x_q, x_s, w_q, w_s = res
  x_q, w_q = from_bytes(x_q), from_bytes(w_q)
  k, n, dtype = cfg.k, g.shape[-1], cfg.operand_dtype
  g_MxN = g.reshape(-1, n).astype(jnp.float32)
  # dgrad: g tiled 1x128 along N against the same 128x128 weight blocks, contracted over N
  # (dequantizing w_q^T with w_s^T gives exactly the transpose of this operand).
  g_q, g_s = quantize_act(g_MxN, cfg.pow2)  # [M, Np], [M, Nb]
  w_KxN = dequantize_weight(w_q, w_s, k, n, dtype)
  dx_MxK = dot_f32(dequantize_act(g_q, g_s, n, dtype), w_KxN, ((1,), (1,)))
  # wgrad: contraction over tokens, both operands re-tiled 128x1 along M (in place).
  m = g_MxN.shape[0]
  xt_q, xt_s = quantize_act(dequantize_act(x_q, x_s, k), cfg.pow2, axis=0)  # [Mp, K], [Mb, K]
  gt_q, gt_s = quantize_act(g_MxN, cfg.pow2, axis=0)  # [Mp, N], [Mb, N]
  dw_KxN = dot_f32(
    dequantize_act(xt_q, xt_s, m, dtype, axis=0),
    dequantize_act(gt_q, gt_s, m, dtype, axis=0),
    ((0,), (0,)),
  )
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
