"""The routed-expert kernel: every token copy through its expert's SwiGLU, dropless.

One function, `expert_rows`, is used by every path that runs routed experts — the
single-device MoE layer (`routed_ffn`), the expert-parallel layer on the rows a rank received
(`parallel/expert.py`), decoding and the pipeline — so there is one kernel to test and tune.
Rows whose expert id equals E (the number of experts) are empty slots and come back as zeros.

Three formulations behind it, chosen at trace time from static shapes:

* capacity buckets (training, and inference between a few rows and a block of rows per
  expert; every precision): rows are stably sorted by expert and
  moved into an [E, C, D] buffer, C about capacity_factor x the mean rows per expert: each
  slot gathers its row and the outputs gather back (the backward gathers through the inverse
  maps), so neither direction scatters or zero-fills an [R, D] buffer, and a token's k copies
  are read from the token itself (`copies`), never repeated in memory. The SwiGLU is three
  batched GEMMs over E, under one custom VJP (`_bucket_ffn`) whose backward is six batched
  row-major GEMMs and keeps only the buckets and the two pre-activations: the weights are
  its inputs, so a scan over layers forwards them rather than stacking a copy per layer.
  Copies past an expert's C slots are not dropped: an exact overflow pass (the block path
  below, on the overflowing rows only) runs under `lax.cond` only when some expert
  overflowed, and its backward recomputes it, so balanced routing pays nothing for it.
  Under fp8 the same GEMMs read the report's FP8 operands (§3.3, `quant/fp8_grouped.py`):
  rows in 1x128 tiles along the contraction (fprop, dgrad), each expert's weight in 128x128
  blocks, and for the weight gradients both operands in 128x1 tiles along the bucket's slots
  (the token axis); the bucket buffer is kept for backward as its FP8 tiles.
* padded blocks (the overflow pass; `path="block"`; and every row when the bucket path is
  not differentiated and experts get at least a block of rows each -- prefill, evaluation --
  or at most `FEW_ROWS_PER_EXPERT` -- decode above batch 1, where they read only the experts
  that got rows and the buckets read all of them):
  rows sorted by expert, each expert's group padded to a multiple of S rows, a loop over the
  used blocks (a dynamic trip count, so a small overflow costs little) runs each block's
  SwiGLU with its expert's weights (`_grouped_swiglu`), in every precision, the gate inside
  as on the buckets. Sized by the real counts, it costs a skewed routing (a model at init,
  an unbalanced layer) its rows, where the buckets cost C slots per expert plus the
  overflow pass.
* gathered weights (decode at batch 1, rows <= experts / 4; not fp8): each row gathers its
  expert's weights, one batched product, no padding. Above that, decode takes the blocks
  (one row each while rows are fewer than experts, `effective_block`), which read each
  touched expert's weights once. Measured on 2 cores, 64 experts of 512 x 256 in float32,
  48 rows (batch 8 x 6 copies, ~35 experts touched): blocks 6.0 ms, buckets 14.3 ms (they
  read all 64); 192 rows: 14.5 vs 26.5 ms; from ~6 rows per expert up the two are even, and
  from ~24 the buckets win until a full block per expert.

DeepSeek-V3's experts are SwiGLU FFNs `W2(silu(W1 x) * W3 x)` (arXiv 2412.19437 §2.1.2).

Legend: R rows (token copies), D model, F expert width, E experts, C capacity per expert,
NB blocks, S rows per block, N tokens, k experts per token.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.layers.routing import Routing
from dsv3_jax.quant import fp8, fp8_grouped

CAPACITY_FACTOR = 1.25  # bucket slots per expert, x the mean rows per expert
# Not differentiated, at most this many rows per expert (decode above batch 1): the padded
# blocks, which read only the experts that got rows, where the buckets read all of them.
FEW_ROWS_PER_EXPERT = 4
PATHS = ("bucket", "block", "gather")


# ----------------------------------------------------------------------------- batched GEMM
def _cast(x, precision):
  return x.astype(jnp.bfloat16 if precision in ("bf16", "fp8") else jnp.float32)


def _operand(a, precision, axis=-1):
  """`a` as a bucket GEMM reads it: under fp8, 1x128 FP8 tiles along `axis` (the contraction
  axis; the token axis C for a weight gradient) dequantized into bf16; else `a` itself (cast
  by `_bmm_raw`)."""
  return fp8_grouped.tiles(a, axis) if precision == "fp8" else a


def _weights(w_ExKxF, precision):
  """The experts' weights as the bucket GEMMs read them: 128x128 FP8 blocks under fp8."""
  return fp8_grouped.expert_weights(w_ExKxF) if precision == "fp8" else w_ExKxF


def _bmm_raw(a_ExMxK, b_ExKxN, precision):
  """Per-expert `a[e] @ b[e]` as one canonical batched dot (batch, then row-major GEMM)."""
  return jax.lax.dot_general(
    _cast(a_ExMxK, precision),
    _cast(b_ExKxN, precision),
    (((2,), (1,)), ((0,), (0,))),
    preferred_element_type=jnp.float32,
  )


def capacity(rows: int, n_experts: int, factor: float = CAPACITY_FACTOR) -> int:
  """Bucket slots per expert for `rows` rows spread over E experts (mean m = rows / E).

  m + max((factor - 1) m, 3 sqrt(m) + 1): `factor` x the mean when experts get many rows
  (training, prefill), about three standard deviations of a Poisson count above the mean when
  they get few (decode), so the exact overflow pass stays rare; multiples of 8 above 8.
  """
  m = rows / max(n_experts, 1)
  c = math.ceil(m + max((factor - 1.0) * m, 3.0 * math.sqrt(m) + 1.0))
  return c if c <= 8 else -(-c // 8) * 8


def _gather_rows(src_SxD, idx_T, copies=1):
  """`src[idx // copies]`, zeros where idx is past the (copies-fold repeated) source."""
  n = src_SxD.shape[0]
  idx = jnp.where(idx_T < n * copies, idx_T // copies, n)
  return jnp.take(src_SxD, idx, axis=0, mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def move_rows(src_SxD, take_T, back_S, copies=1):
  """`out[t] = src[take[t] // copies]` (zeros where take[t] is out of range): a gather whose
  gradient is again a gather, through `back`, the inverse map (`back[i]`: the row of `out`
  that row i of the `copies`-fold repeated source went to, or out of range). Rows move one
  to one, so no scatter (slow on CPU) and no zero-filled [R, D] buffer in either direction.
  The expert-parallel dispatches fill their send buffers and read their returns with it."""
  return _gather_rows(src_SxD, take_T, copies)


def move_rows_fwd(src, take, back, copies):
  return move_rows(src, take, back, copies), (take, back, src.shape[0])


def move_rows_bwd(copies, res, g_TxD):
  take, back, n = res
  g = jnp.take(g_TxD, back, axis=0, mode="fill", fill_value=0)  # [n * copies, D]
  if copies > 1:
    g = g.reshape(n, copies, -1).sum(1)
  return g, None, None


move_rows.defvjp(move_rows_fwd, move_rows_bwd)


def _bucket_rows(
  x_SxD, expert_R, w1, w3, w2, block, precision, factor, expected_rows, copies, gate_R
):
  """Row i (of R = S x copies) is source row i // copies through expert expert_R[i], its
  output scaled by gate_R[i]."""
  e = w1.shape[0]
  r = expert_R.shape[0]
  c = min(capacity(expected_rows, e, factor), r)
  order_R = jnp.argsort(expert_R, stable=True)
  sorted_e = expert_R[order_R]
  counts = jnp.zeros((e + 1,), jnp.int32).at[expert_R].add(1)
  start = jnp.cumsum(counts) - counts
  pos = jnp.arange(r, dtype=jnp.int32) - start[sorted_e]
  keep = (pos < c) & (sorted_e < e)
  dest = jnp.where(keep, sorted_e * c + pos, e * c)  # e * c: no slot
  slot_R = jnp.zeros((r,), jnp.int32).at[order_R].set(dest)  # each row's slot
  row_of_slot = jnp.full((e * c,), r, jnp.int32).at[dest].set(order_R, mode="drop")
  layout = _Buckets(row_of_slot, slot_R, expert_R)
  # Not differentiated, the blocks instead when they beat the buckets: with a full block per
  # expert their padding is small, and with few rows per expert (decode) they read only the
  # experts that got rows.
  exact = expected_rows >= e * block or expected_rows <= FEW_ROWS_PER_EXPERT * e
  return _bucket_ffn(x_SxD, w1, w3, w2, gate_R, layout, (c, copies, block, precision, exact))


class _Buckets(NamedTuple):
  """Where rows go: slot s holds row row_of_slot[s] (R: none), row i sits in slot slot_R[i]
  (E x C: none). expert_R: every row's expert (E: none)."""

  row_of_slot: jax.Array
  slot_R: jax.Array
  expert_R: jax.Array

  def overflow_R(self, e: int) -> jax.Array:
    """The rows past their expert's C slots keep their expert (E elsewhere): the exact
    overflow pass's rows."""
    no_slot = self.row_of_slot.shape[0]  # E x C
    return jnp.where((self.slot_R == no_slot) & (self.expert_R < e), self.expert_R, e)


def _swiglu_vjp(a1, a3, dh):
  """The SwiGLU `silu(a1) * a3` (float32) and its pre-activations' gradients given dh."""
  a1, a3 = a1.astype(jnp.float32), a3.astype(jnp.float32)
  sig = jax.nn.sigmoid(a1)
  silu = a1 * sig
  return silu * a3, dh * a3 * sig * (1 + a1 * (1 - sig)), dh * silu


def _gate(y, gate_R):
  """Each row of y scaled by its routing weight, in float32, in y's dtype."""
  return (y.astype(jnp.float32) * gate_R.astype(jnp.float32)[:, None]).astype(y.dtype)


def _bucket_forward(x_SxD, w1, w3, w2, gate_R, lay, static):
  c, copies, _, precision, _ = static
  e, d = w1.shape[0], x_SxD.shape[1]
  buf = _gather_rows(x_SxD, lay.row_of_slot, copies).reshape(e, c, d)
  gate = _gather_rows(gate_R.astype(jnp.float32)[:, None], lay.row_of_slot).reshape(e, c, 1)
  kept = buf
  if precision == "fp8":  # the FP8 tiles are what backward keeps, as raw bytes and scales
    q, s = fp8.quantize_act(buf)
    buf, kept = fp8.dequantize_act(q, s, d, jnp.bfloat16), (fp8.as_bytes(q), s)
  w1, w3, w2 = (_weights(w, precision) for w in (w1, w3, w2))
  a1 = _bmm_raw(buf, w1, precision).astype(x_SxD.dtype)
  a3 = _bmm_raw(buf, w3, precision).astype(x_SxD.dtype)
  h = (jax.nn.silu(a1) * a3 * gate).astype(x_SxD.dtype)  # the gate on the SwiGLU output
  y = _bmm_raw(_operand(h, precision), w2, precision).astype(x_SxD.dtype)
  return _gather_rows(y.reshape(e * c, d), lay.slot_R), (kept, gate, a1, a3)


def _overflow_rows(x_SxD, w1, w3, w2, gate_R, lay, static):
  _, copies, block, precision, _ = static
  return _block_rows(
    x_SxD, lay.overflow_R(w1.shape[0]), w1, w3, w2, block, precision, copies, gate_R
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _bucket_ffn(x_SxD, w1, w3, w2, gate_R, lay, static):
  """Not differentiated (inference, evaluation) with at least a block of rows per expert
  (prefill) or at most a few (decode): every row through the padded blocks instead. Those
  are sized by the real counts, so a skewed routing costs its rows and the blocks' padding
  (under a block per expert), where the buckets cost their fixed C slots per expert plus
  the overflow pass, and they read only the experts that got rows; the backward's reason
  for the buckets (the kept pre-activations, six batched GEMMs) is moot.
  Differentiated, JAX runs `_bucket_ffn_fwd` instead."""
  _, copies, block, precision, exact = static
  if exact:
    return _block_rows(x_SxD, lay.expert_R, w1, w3, w2, block, precision, copies, gate_R)
  return _bucket_ffn_fwd(x_SxD, w1, w3, w2, gate_R, lay, static)[0]


def _bucket_ffn_fwd(x_SxD, w1, w3, w2, gate_R, lay, static):
  """The SwiGLU over the [E, C, D] buckets, plus the overflow pass when some expert
  overflowed. One custom VJP for all of it, so that what the backward keeps is chosen here:
  the buckets and the two pre-activations. The weights and x are the function's own inputs
  (a scan over layers forwards them instead of stacking copies), and the overflow pass keeps
  nothing: its backward recomputes it, and only when it ran. The routing weight (gate_R)
  scales the SwiGLU output before W2, so the gate's gradient comes from the backward's own
  dh and no [R, D] expert output is kept for the combine (the report's recipe, §3.3.3)."""
  args = (x_SxD, w1, w3, w2, gate_R)  # arrays (`expert_rows` converts numpy inputs)
  y_RxD, (buf, gate, a1, a3) = _bucket_forward(*args, lay, static)
  overflow = jnp.any(lay.overflow_R(w1.shape[0]) < w1.shape[0])

  def add_overflow_rows(y):
    with jax.named_scope("overflow"):  # profiles tell the overflow pass apart by this scope
      return y + _overflow_rows(*args, lay, static)

  y_RxD = jax.lax.cond(overflow, add_overflow_rows, lambda y: y, y_RxD)
  return y_RxD, (*args, lay, buf, gate, a1, a3, overflow)


def _bucket_ffn_bwd(static, res, g_RxD):
  x_SxD, w1, w3, w2, gate_R, lay, buf, gate, a1, a3, overflow = res
  c, copies, _, precision, _ = static
  e, d = w1.shape[0], x_SxD.shape[1]
  if precision == "fp8":
    buf = fp8.dequantize_act(fp8.from_bytes(buf[0]), buf[1], d)
  g_y = _gather_rows(g_RxD, lay.row_of_slot).reshape(e, c, d)  # each slot's row's cotangent
  t = lambda a: jnp.swapaxes(a, 1, 2)
  op = functools.partial(_operand, precision=precision)  # dgrad: tiles along the contraction
  tok = functools.partial(_operand, precision=precision, axis=1)  # wgrad: along the tokens
  o1, o3, o2 = (_weights(w, precision) for w in (w1, w3, w2))
  # Every product below is a batched row-major GEMM (contraction on lhs last, rhs first).
  dh_gated = _bmm_raw(op(g_y), t(o2), precision)
  u, da1, da3 = _swiglu_vjp(a1, a3, dh_gated * gate)  # u: the SwiGLU output before the gate
  dgate = jnp.sum(u * dh_gated, axis=-1, keepdims=True)  # [E, C, 1]
  h = (u * gate).astype(x_SxD.dtype)
  da1, da3 = da1.astype(x_SxD.dtype), da3.astype(x_SxD.dtype)
  buf_t = tok(buf)
  dw2 = _bmm_raw(t(tok(h)), tok(g_y), precision).astype(w2.dtype)
  dw1 = _bmm_raw(t(buf_t), tok(da1), precision).astype(w1.dtype)
  dw3 = _bmm_raw(t(buf_t), tok(da3), precision).astype(w3.dtype)
  dbuf = _bmm_raw(op(da1), t(o1), precision) + _bmm_raw(op(da3), t(o3), precision)
  dx = _gather_rows(dbuf.reshape(e * c, d), lay.slot_R)  # [R, D]: row i's slot, or zeros
  dx = dx.reshape(-1, copies, d).sum(1).astype(x_SxD.dtype)
  dgate_R = _gather_rows(dgate.reshape(e * c, 1), lay.slot_R)[:, 0].astype(gate_R.dtype)

  def add_overflow(grads):
    with jax.named_scope("overflow"):
      _, vjp = jax.vjp(lambda *a: _overflow_rows(*a, lay, static), x_SxD, w1, w3, w2, gate_R)
      return jax.tree.map(jnp.add, grads, vjp(g_RxD))

  grads = (dx, dw1, dw3, dw2, dgate_R)
  return jax.lax.cond(overflow, add_overflow, lambda g: g, grads) + (None,)


_bucket_ffn.defvjp(_bucket_ffn_fwd, _bucket_ffn_bwd)


# ----------------------------------------------------------------------------- padded blocks
def _dot(a, b, precision):
  return jnp.dot(_cast(a, precision), _cast(b, precision), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _grouped_swiglu(x_NBxSxD, gate_NBxS, w1, w3, w2, block_expert_NB, n_used, precision):
  """`out[b] = SwiGLU of block b through expert block_expert[b]`, for b < n_used; zeros beyond.
  Each row's SwiGLU output is scaled by its gate before W2, as on the bucket path, so the
  gate's gradient comes from the backward's own dh and the backward never needs the output.

  One loop over the used blocks does all three products of a block, so no elementwise work
  or intermediate touches the unused blocks (the bound for the exact overflow pass is the
  worst case, its real blocks usually a few); the backward recomputes a block's two
  pre-activations instead of keeping them. Under fp8 the GEMMs read FP8 operands as the
  buckets do (`_operand`, `_weights`; the weights dequantized once, outside the loop), the
  weight gradients' 128x1 tiles running along the block's rows.
  """
  args = (x_NBxSxD, gate_NBxS, w1, w3, w2, block_expert_NB, n_used, precision)
  return _grouped_swiglu_fwd(*args)[0]


def _grouped_swiglu_fwd(x, gate, w1, w3, w2, block_expert, n_used, precision):
  zero = jnp.zeros((), jnp.int32)
  o1, o3, o2 = (_weights(w, precision) for w in (w1, w3, w2))  # once, outside the loop
  gate = gate.astype(jnp.float32)

  def body(b, out):
    e, xb = block_expert[b], _operand(x[b], precision)
    h = jax.nn.silu(_dot(xb, o1[e], precision)) * _dot(xb, o3[e], precision)
    h = _operand((h * gate[b][:, None]).astype(x.dtype), precision)
    yb = _dot(h, o2[e], precision).astype(x.dtype)
    return jax.lax.dynamic_update_slice(out, yb[None], (b, zero, zero))

  out = jax.lax.fori_loop(0, n_used, body, jnp.zeros(x.shape[:2] + w2.shape[2:], x.dtype))
  residuals = tuple(map(jnp.asarray, (x, gate, w1, w3, w2, block_expert, n_used)))
  return out, residuals


def _grouped_swiglu_bwd(precision, res, g_NBxSxD):
  x, gate, w1, w3, w2, block_expert, n_used = res
  zero = jnp.zeros((), jnp.int32)
  o1, o3, o2 = (_weights(w, precision) for w in (w1, w3, w2))
  op = functools.partial(_operand, precision=precision)  # tiles along the contraction
  tok = functools.partial(_operand, precision=precision, axis=0)  # wgrad: along the rows

  def acc(dw, e, value):
    cur = jax.lax.dynamic_slice(dw, (e, zero, zero), (1,) + dw.shape[1:])
    return jax.lax.dynamic_update_slice(dw, cur + value[None], (e, zero, zero))

  def body(b, carry):
    dx, dgate, dw1, dw3, dw2 = carry
    e, xb, gb, gv = block_expert[b], x[b], g_NBxSxD[b], gate[b][:, None]
    xq = op(xb)
    a1, a3 = _dot(xq, o1[e], precision), _dot(xq, o3[e], precision)
    dh_gated = _dot(op(gb), o2[e].T, precision)  # the cotangent of the gated SwiGLU output
    u, da1, da3 = _swiglu_vjp(a1, a3, dh_gated * gv)
    dgate = jax.lax.dynamic_update_slice(dgate, jnp.sum(u * dh_gated, -1)[None], (b, zero))
    da1, da3 = da1.astype(x.dtype), da3.astype(x.dtype)
    dxb = _dot(op(da1), o1[e].T, precision) + _dot(op(da3), o3[e].T, precision)
    dx = jax.lax.dynamic_update_slice(dx, dxb.astype(x.dtype)[None], (b, zero, zero))
    xt = tok(xb)
    dw1 = acc(dw1, e, _dot(xt.T, tok(da1), precision))
    dw3 = acc(dw3, e, _dot(xt.T, tok(da3), precision))
    dw2 = acc(dw2, e, _dot(tok((u * gv).astype(x.dtype)).T, tok(gb), precision))
    return dx, dgate, dw1, dw3, dw2

  f32 = lambda w: jnp.zeros(w.shape, jnp.float32)
  dx, dgate, dw1, dw3, dw2 = jax.lax.fori_loop(
    0, n_used, body, (jnp.zeros_like(x), f32(gate), f32(w1), f32(w3), f32(w2))
  )
  dw1, dw3, dw2 = dw1.astype(w1.dtype), dw3.astype(w3.dtype), dw2.astype(w2.dtype)
  return dx, dgate, dw1, dw3, dw2, None, None


_grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)


class BlockLayout(NamedTuple):
  """Where each sorted row sits in the padded, expert-sorted block buffer."""

  order_R: jax.Array  # row index in expert-sorted order
  dest_R: jax.Array  # row of each sorted row in the padded buffer
  block_expert_NB: jax.Array
  n_used: jax.Array  # blocks holding at least one real row
  n_blocks: int


def block_layout(expert_R: jax.Array, n_experts: int, block: int) -> BlockLayout:
  """Sort rows by expert and pad each expert's group to a multiple of `block` rows."""
  r = expert_R.shape[0]
  order = jnp.argsort(expert_R, stable=True)
  sorted_e = expert_R[order]
  counts_E = jnp.zeros((n_experts,), jnp.int32).at[expert_R].add(1)
  padded_E = (counts_E + block - 1) // block * block
  pad_end_E = jnp.cumsum(padded_E)
  pad_start_E = pad_end_E - padded_E
  cnt_start_E = jnp.cumsum(counts_E) - counts_E
  dest = pad_start_E[sorted_e] + jnp.arange(r) - cnt_start_E[sorted_e]
  # Each non-empty expert adds at most one partial block: a bound that never overflows.
  n_blocks = r // block + 1 + min(n_experts, r)
  starts = jnp.arange(n_blocks) * block
  block_expert = jnp.minimum(jnp.searchsorted(pad_end_E, starts, side="right"), n_experts - 1)
  n_used = pad_end_E[-1] // block
  return BlockLayout(order, dest, block_expert.astype(jnp.int32), n_used, n_blocks)


# With at least a block of rows per expert, blocks of at most a third of the mean rows per
# expert (a power of two): each expert's last block pads it by half a block on average.
PADDING_DIVISOR = 3


def effective_block(block: int, rows: int, n_experts: int, fp8: bool = False) -> int:
  """Rows per block: `block`, shrunk (to a power of two) when experts get few rows each, and
  (not under `fp8`, whose weight-gradient tiles are 128 rows of a block) kept to a third of
  an expert's mean rows when they get more than a block each.

  A decode step routes a handful of copies over many experts; padding each to a 64-row block
  would multiply the expert FLOPs by ~64. A prefill of 2048 tokens x 6 copies over 64
  experts has 192 rows per expert: 128-row blocks would pad each to 256 (a third more work),
  64-row blocks fit 192 exactly and pad a skewed count by 32 rows on average. Shapes are
  static, so this is a trace-time choice.
  """
  per_expert = max(1, rows // max(n_experts, 1))
  if per_expert >= block and not fp8:
    return max(1, min(block, 1 << (per_expert // PADDING_DIVISOR).bit_length() - 1))
  return min(block, 1 << (per_expert - 1).bit_length())


def _block_rows(x_SxD, expert_R, w1, w3, w2, block, precision, copies=1, gate_R=None):
  """Row i (of R = S x copies) is source row i // copies through expert expert_R[i], its
  SwiGLU output scaled by gate_R[i] (default 1) before W2."""
  e_loc = w1.shape[0]
  r, d = expert_R.shape[0], x_SxD.shape[1]
  block = effective_block(block, r, e_loc, precision == "fp8")
  lay = block_layout(expert_R, e_loc + 1, block)  # empty slots: an extra last group
  counts = jnp.zeros((e_loc,), jnp.int32).at[expert_R].add(1, mode="drop")
  real_blocks = jnp.sum((counts + block - 1) // block)
  lay = lay._replace(
    block_expert_NB=jnp.minimum(lay.block_expert_NB, e_loc - 1), n_used=real_blocks
  )
  rows = lay.n_blocks * block
  slot_R = jnp.zeros((r,), jnp.int32).at[lay.order_R].set(lay.dest_R)
  row_of_slot = jnp.full((rows,), r, jnp.int32).at[lay.dest_R].set(lay.order_R)
  xs_NBxSxD = move_rows(x_SxD, row_of_slot, slot_R, copies).reshape(lay.n_blocks, block, d)
  gate_R = jnp.ones((r,), jnp.float32) if gate_R is None else gate_R.astype(jnp.float32)
  gs_NBxS = move_rows(gate_R[:, None], row_of_slot, slot_R, 1).reshape(lay.n_blocks, block)
  ys = _grouped_swiglu(xs_NBxSxD, gs_NBxS, w1, w3, w2, lay.block_expert_NB, lay.n_used, precision)
  return move_rows(ys.reshape(rows, d), slot_R, row_of_slot, 1)


# ----------------------------------------------------------------------------- gathered
def _gathered_rows(x_RxD, expert_R, w1, w3, w2):
  """Few rows (decode): gather each row's expert weights and run one batched product."""
  e = w1.shape[0]
  ex = jnp.minimum(expert_R, e - 1)
  h = jax.nn.silu(jnp.einsum("cd,cdf->cf", x_RxD, w1[ex].astype(x_RxD.dtype))) * jnp.einsum(
    "cd,cdf->cf", x_RxD, w3[ex].astype(x_RxD.dtype)
  )
  y = jnp.einsum("cf,cfd->cd", h, w2[ex].astype(x_RxD.dtype))
  return jnp.where((expert_R < e)[:, None], y, 0)


# ----------------------------------------------------------------------------- the kernel
def expert_rows(
  x_RxD: jax.Array,
  expert_R: jax.Array,
  w1_ExDxF: jax.Array,
  w3_ExDxF: jax.Array,
  w2_ExFxD: jax.Array,
  *,
  block: int,
  precision: str,
  capacity_factor: float = CAPACITY_FACTOR,
  expected_rows: int | None = None,
  path: str | None = None,
  copies: int = 1,
  gate_R: jax.Array | None = None,
) -> jax.Array:
  """SwiGLU of each row through its expert: [R, D]; rows with expert id E are zeros.

  `expected_rows`: the real (non-empty) rows to size the buckets for, when the buffer holds
  empty slots (the expert-parallel receive buffer); default all R rows. `path` forces one
  formulation ("bucket", "block", "gather"; tests and benchmarks), default chosen by shape.
  `copies`: x holds R / copies source rows and row i is x[i // copies] (a token's k routed
  copies, without materialising the repeat on the bucket path). `gate_R`: each row's output
  scaled by its routing weight; the bucket and block paths apply it to the SwiGLU output
  before W2 (so their backward needs no [R, D] output for the gate's gradient), the gather
  path to the output.
  """
  # numpy inputs (constants under a trace) as arrays, once for every path: the block loop
  # indexes them by a tracer, and the bucket VJP keeps them as residuals
  x_RxD, w1_ExDxF, w3_ExDxF, w2_ExFxD = map(jnp.asarray, (x_RxD, w1_ExDxF, w3_ExDxF, w2_ExFxD))
  gate_R = None if gate_R is None else jnp.asarray(gate_R)
  e = w1_ExDxF.shape[0]
  r = expert_R.shape[0]
  if x_RxD.shape[0] * copies != r:
    raise ValueError(f"{x_RxD.shape[0]} rows x {copies} copies != {r} expert ids")
  if path is None:
    # Gathering copies each row's expert weights (~3x their bytes per row); buckets read every
    # expert's weights once, in place: gather only while rows are a small fraction of experts.
    path = "gather" if 4 * r <= e and precision != "fp8" else "bucket"
  if path not in PATHS:
    raise ValueError(f"unknown expert kernel path {path!r}: must be one of {PATHS}")
  if path == "bucket":
    return _bucket_rows(
      x_RxD,
      expert_R,
      w1_ExDxF,
      w3_ExDxF,
      w2_ExFxD,
      block,
      precision,
      capacity_factor,
      r if expected_rows is None else expected_rows,
      copies,
      jnp.ones((r,), jnp.float32) if gate_R is None else gate_R,
    )
  if path == "block" or precision == "fp8":
    w = (w1_ExDxF, w3_ExDxF, w2_ExFxD)
    return _block_rows(x_RxD, expert_R, *w, block, precision, copies, gate_R)
  x_RxD = jnp.repeat(x_RxD, copies, axis=0) if copies > 1 else x_RxD
  y = _gathered_rows(x_RxD, expert_R, w1_ExDxF, w3_ExDxF, w2_ExFxD)
  return y if gate_R is None else _gate(y, gate_R)


def combine(y_CxD: jax.Array, k: int, dtype) -> jax.Array:
  """Each token's sum of its k copies' outputs [N, D] (copy c is token c // k), the copies
  already gated by their routing weights inside the kernel (`gate_R`). A sum, not a weighted
  one: the backward keeps nothing of y for it."""
  y = y_CxD.astype(jnp.float32)
  return y.reshape(-1, k, y.shape[-1]).sum(1).astype(dtype)


def routed_ffn(
  x_NxD: jax.Array,
  routing: Routing,
  w1_ExDxF,
  w3_ExDxF,
  w2_ExFxD,
  block: int,
  precision: str,
  capacity_factor: float = CAPACITY_FACTOR,
  path: str | None = None,
) -> jax.Array:
  """Dropless routed-expert SwiGLU on one device, combined with the routing weights: [N, D].

  The routing weights gate each copy inside the kernel (`gate_R`), and the combine is the sum
  of a token's k gated copies."""
  n, k = routing.experts_Nxk.shape
  y_CxD = expert_rows(  # copy c is token c // k
    x_NxD,
    routing.experts_Nxk.reshape(-1),
    w1_ExDxF,
    w3_ExDxF,
    w2_ExFxD,
    block=block,
    precision=precision,
    capacity_factor=capacity_factor,
    path=path,
    copies=k,
    gate_R=routing.weights_Nxk.reshape(-1),
  )
  return combine(y_CxD, k, x_NxD.dtype)


def dense_reference(x_NxD, routing: Routing, w1, w3, w2) -> jax.Array:
  """Every expert on every token, masked by the routing: an O(E) reference for tests."""
  h = jax.nn.silu(jnp.einsum("nd,edf->enf", x_NxD, w1)) * jnp.einsum("nd,edf->enf", x_NxD, w3)
  y_ExNxD = jnp.einsum("enf,efd->end", h, w2)
  e = w1.shape[0]
  gate_NxE = (
    jnp.zeros((x_NxD.shape[0], e), jnp.float32)
    .at[jnp.arange(x_NxD.shape[0])[:, None], routing.experts_Nxk]
    .add(routing.weights_Nxk)
  )
  return jnp.einsum("ne,end->nd", gate_NxE, y_ExNxD).astype(x_NxD.dtype)
