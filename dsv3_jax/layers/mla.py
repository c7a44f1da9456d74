"""Multi-head Latent Attention (arXiv 2412.19437 §2.1.1, eqs. 1-11).

Queries go through an optional low-rank bottleneck (`W_qa`, RMSNorm, `W_qb`); keys and
values are compressed into one `kv_lora_rank` latent `c_kv` per token (RMSNorm'd) plus one
rotary key `k_pe` shared by all heads. Only `c_kv` and `k_pe` are ever cached.

Two ways to attend over the latents, equal up to rounding:
  * naive   -- expand every cached latent into per-head keys/values with `W_kvb`
               (cheap when many queries share the keys: training, prefill);
  * absorbed -- fold `W_UK` into the query and `W_UV` after the softmax, so attention runs
               directly on the latents (cheap at decode: nothing is re-expanded).

Legend: B batch, L query length, T key length, H heads, D model, K kv_lora_rank,
R rope dim, N nope dim, V value dim, Q q_lora_rank.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import rope
from dsv3_jax.layers.linear import Linear
from dsv3_jax.layers.norms import RMSNorm


class LatentCache(NamedTuple):
  """One layer's cache: what MLA needs of each past token, and nothing more."""

  c_kv_BxTxK: jax.Array
  k_pe_BxTxR: jax.Array


def init_latent_cache(
  cfg: ModelConfig, batch: int, length: int, dtype=jnp.bfloat16, n_layers: Optional[int] = None
) -> LatentCache:
  lead = () if n_layers is None else (n_layers,)
  return LatentCache(
    jnp.zeros(lead + (batch, length, cfg.kv_lora_rank), dtype),
    jnp.zeros(lead + (batch, length, cfg.qk_rope_head_dim), dtype),
  )


def cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
  """Per token, per layer: (kv_lora_rank + rope dim) values."""
  return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(dtype).itemsize


def _write(cache_BxTxC: jax.Array, new_BxLxC: jax.Array, positions_BxL: jax.Array) -> jax.Array:
  b = jnp.arange(cache_BxTxC.shape[0])[:, None]
  return cache_BxTxC.at[b, positions_BxL].set(new_BxLxC.astype(cache_BxTxC.dtype), mode="drop")


# Queries per causal attention block (`MLA.__call__(..., causal=True)`).
QUERY_BLOCK = 128
# From this many queries on, the causal attention's backward recomputes each block's
# probabilities instead of keeping them (`causal_attend`).
RECOMPUTE_FROM = 2048


def _softmax(scores_BxHxLxT, mask_Bx1xLxT, scale: float, dtype):
  """Masked softmax over keys, in float32: (probabilities in `dtype`, log-sum-exp [B, H, L])."""
  scores = jnp.where(mask_Bx1xLxT, scores_BxHxLxT.astype(jnp.float32) * scale, -jnp.inf)
  top = jnp.max(scores, axis=-1, keepdims=True)
  e = jnp.exp(scores - top)
  total = jnp.sum(e, axis=-1, keepdims=True)
  return (e / total).astype(dtype), (top + jnp.log(total))[..., 0]


def _probabilities(scores_BxHxLxT, mask_Bx1xLxT, scale: float, dtype):
  """Masked softmax over keys, in float32, returned in `dtype`."""
  return _softmax(scores_BxHxLxT, mask_Bx1xLxT, scale, dtype)[0]


def _attend_probs(q_BxHxLxQK, k_BxHxTxQK, v_BxHxTxV, mask_Bx1xLxT, scale):
  """(output, probabilities in v's dtype, log-sum-exp per query)."""
  scores = jnp.einsum("bhlq,bhtq->bhlt", q_BxHxLxQK, k_BxHxTxQK)
  p_BxHxLxT, lse_BxHxL = _softmax(scores, mask_Bx1xLxT, scale, v_BxHxTxV.dtype)
  return jnp.einsum("bhlt,bhtv->bhlv", p_BxHxLxT, v_BxHxTxV), p_BxHxLxT, lse_BxHxL


def _attend_grads(q, k, v, p, do_BxHxLxV, delta_BxHxL, scale):
  """dQ (q's dtype), dK and dV (float32) of softmax attention from its probabilities, with
  delta = rowsum(dO * O) (equal to rowsum(P * dP) since O = P V: one [B, H, L] reduction
  over V instead of over T). dP is float32: it nearly cancels against delta."""
  f32 = jnp.float32
  do = do_BxHxLxV.astype(v.dtype)
  dv = jnp.einsum("bhlt,bhlv->bhtv", p, do, preferred_element_type=f32)
  dp = jnp.einsum("bhlv,bhtv->bhlt", do, v, preferred_element_type=f32)
  ds = ((dp - delta_BxHxL[..., None]) * p.astype(f32) * scale).astype(q.dtype)
  dq = jnp.einsum("bhlt,bhtq->bhlq", ds, k)
  dk = jnp.einsum("bhlt,bhlq->bhtq", ds, q, preferred_element_type=f32)
  return dq, dk, dv


def _delta(do_BxHxLxV, o_BxHxLxV):
  return jnp.sum(do_BxHxLxV.astype(jnp.float32) * o_BxHxLxV.astype(jnp.float32), -1)


def _attend_fwd(q_BxHxLxQK, k_BxHxTxQK, v_BxHxTxV, mask_Bx1xLxT, scale):
  o_BxHxLxV, p_BxHxLxT, _ = _attend_probs(q_BxHxLxQK, k_BxHxTxQK, v_BxHxTxV, mask_Bx1xLxT, scale)
  return o_BxHxLxV, (q_BxHxLxQK, k_BxHxTxQK, v_BxHxTxV, p_BxHxLxT, o_BxHxLxV)


def _attend_bwd(scale, res, do_BxHxLxV):
  q, k, v, p, o = res
  dq, dk, dv = _attend_grads(q, k, v, p, do_BxHxLxV, _delta(do_BxHxLxV, o), scale)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q_BxHxLxQK, k_BxHxTxQK, v_BxHxTxV, mask_Bx1xLxT, scale: float):
  """softmax(scale * q k^T, masked) v per head, with the usual attention backward.

  Autodiff of the softmax keeps its exponentials and sums and runs several passes over the
  [B, H, L, T] scores; this backward keeps the probabilities and forms dS = P * (dP - delta)
  in one pass, delta = rowsum(dO * O) (equal to rowsum(P * dP) since O = P V).
  """
  return _attend_fwd(q_BxHxLxQK, k_BxHxTxQK, v_BxHxTxV, mask_Bx1xLxT, scale)[0]


attend.defvjp(_attend_fwd, _attend_bwd)


def _causal_blocks(l: int):
  """(first, end) query rows of each causal block; a block reads keys [0, end)."""
  return [(a, min(a + QUERY_BLOCK, l)) for a in range(0, l, QUERY_BLOCK)]


def _add_head(acc_BxHxTxX, part_BxHxExX):
  """acc[:, :, :E] += part, in place (`.at[].add` lowers to a scatter, slow on CPU)."""
  e = part_BxHxExX.shape[2]
  return jax.lax.dynamic_update_slice(
    acc_BxHxTxX, acc_BxHxTxX[:, :, :e] + part_BxHxExX, (0, 0, 0, 0)
  )


def _causal_attend_fwd(q_BxHxLxQK, k_BxHxTxQK, v_BxHxTxV, mask_Bx1xLxT, scale, recompute):
  outs, probs, lses = [], [], []
  for a, e in _causal_blocks(q_BxHxLxQK.shape[2]):
    o, p, lse = _attend_probs(
      q_BxHxLxQK[:, :, a:e], k_BxHxTxQK[:, :, :e], v_BxHxTxV[:, :, :e],
      mask_Bx1xLxT[:, :, a:e, :e], scale,
    )  # fmt: skip
    outs.append(o)
    probs.append(p)
    lses.append(lse)
  o_BxHxLxV = jnp.concatenate(outs, axis=2)
  kept = jnp.concatenate(lses, axis=2) if recompute else tuple(probs)
  return o_BxHxLxV, (q_BxHxLxQK, k_BxHxTxQK, v_BxHxTxV, mask_Bx1xLxT, o_BxHxLxV, kept)


def _causal_attend_bwd(scale, recompute, res, do_BxHxLxV):
  q, k, v, mask, o, kept = res
  dq_blocks = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  delta_BxHxL = _delta(do_BxHxLxV, o)
  for i, (a, e) in enumerate(_causal_blocks(q.shape[2])):
    q_b, k_b, v_b = q[:, :, a:e], k[:, :, :e], v[:, :, :e]
    if recompute:  # the block's probabilities again, from its scores and the log-sum-exp
      scores = jnp.einsum("bhlq,bhtq->bhlt", q_b, k_b).astype(jnp.float32) * scale
      p = jnp.where(mask[:, :, a:e, :e], jnp.exp(scores - kept[:, :, a:e, None]), 0.0)
      p = p.astype(v.dtype)
    else:
      p = kept[i]
    dq_b, dk_b, dv_b = _attend_grads(
      q_b, k_b, v_b, p, do_BxHxLxV[:, :, a:e], delta_BxHxL[:, :, a:e], scale
    )
    dq_blocks.append(dq_b)
    dk, dv = _add_head(dk, dk_b), _add_head(dv, dv_b)
  dq = jnp.concatenate(dq_blocks, axis=2)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def causal_attend(
  q_BxHxLxQK, k_BxHxTxQK, v_BxHxTxV, mask_Bx1xLxT, scale: float, recompute: bool = False
):
  """`attend` for queries at key indices 0 .. L-1 (every later key masked), in blocks of
  `QUERY_BLOCK` queries, each reading only the keys up to its last query (about half the
  work of the full [L, T] scores, for many blocks).

  The backward keeps q, k, v, the mask and the output once (autodiff of the blocks would
  keep each block's own copy of the keys and values up to its end), and either each block's
  probabilities or, with `recompute`, only each query's log-sum-exp, from which it
  recomputes a block's probabilities (what flash attention keeps: one more score GEMM per
  block in the backward). Each block's gradients are `attend`'s (`_attend_grads`). At
  DeepSeek-V3's 4096 tokens and 128 heads autodiff of the blocks kept 9.2 GB per layer;
  recomputing keeps 0.8 GB. `MLA` recomputes from `RECOMPUTE_FROM` queries on: below it the
  probabilities are small and the extra GEMM costs time (bench model, 2 CPU cores,
  alternated: train step 10.16 s keeping them, 10.80 recomputing, 11.04 for autodiff of the
  blocks).
  """
  return _causal_attend_fwd(q_BxHxLxQK, k_BxHxTxQK, v_BxHxTxV, mask_Bx1xLxT, scale, recompute)[0]


causal_attend.defvjp(_causal_attend_fwd, _causal_attend_bwd)


class HeadMajor(nnx.Variable):
  """Derived weights kept for decoding (not trained, not checkpointed): (W_UK, W_UV)."""


class MLA(nnx.Module):
  """MLA with decoupled RoPE; `__call__` returns (output, updated cache or None)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h = cfg.hidden_size, cfg.num_attention_heads
    lin = dict(std=cfg.init_std, precision=cfg.matmul_precision, rngs=rngs)
    if cfg.q_lora_rank:
      self.wq_a = Linear(d, cfg.q_lora_rank, axes=("embed", "q_lora"), **lin)
      self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, "q_lora")
      self.wq_b = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, axes=("q_lora", "heads"), **lin)
    else:
      self.wq = Linear(d, h * cfg.qk_head_dim, axes=("embed", "heads"), **lin)
    self.wkv_a = Linear(
      d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, axes=("embed", "kv_lora"), **lin
    )
    self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, "kv_lora")
    self.wkv_b = Linear(
      cfg.kv_lora_rank,
      h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
      axes=("kv_lora", "heads"),
      **lin,
    )
    self.wo = Linear(h * cfg.v_head_dim, d, axes=("heads", "embed"), **lin)

  def arrange_for_decoding(self) -> None:
    """Keeps W_UK and W_UV (slices of `wkv_b`) as head-major copies, [H, N, K] and [H, K, V],
    for the absorbed path. Its two products are batched over heads, and a batched dot reads
    its weight head-major: sliced from `wkv_b` ([K, H, N + V]) the backend copies them into
    that order on every decode step (XLA does not hoist the copy out of the decode loop).
    A snapshot of the current weights, for a model that only decodes (`unstack_layers`)."""
    w_uk_KxHxN, w_uv_KxHxV = self._split_kvb()
    self.head_major = nnx.data(
      (HeadMajor(jnp.transpose(w_uk_KxHxN, (1, 2, 0))), HeadMajor(w_uv_KxHxV.transpose(1, 0, 2)))
    )

  def queries(self, x_BxLxD, cos, sin):
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    if cfg.q_lora_rank:
      q = self.wq_b(self.q_norm(self.wq_a(x_BxLxD)))
    else:
      q = self.wq(x_BxLxD)
    q_BxLxHxQK = q.reshape(b, l, cfg.num_attention_heads, cfg.qk_head_dim)
    q_nope = q_BxLxHxQK[..., : cfg.qk_nope_head_dim]
    q_pe = rope.apply_rope(q_BxLxHxQK[..., cfg.qk_nope_head_dim :], cos, sin)
    return q_nope, q_pe

  def latents(self, x_BxLxD, cos, sin):
    cfg = self.cfg
    kv = self.wkv_a(x_BxLxD)
    c_kv_BxLxK = self.kv_norm(kv[..., : cfg.kv_lora_rank])
    k_pe_BxLxR = rope.apply_rope(kv[..., None, cfg.kv_lora_rank :], cos, sin)[:, :, 0]
    return c_kv_BxLxK, k_pe_BxLxR

  def _split_kvb(self):
    cfg = self.cfg
    w = self.wkv_b.kernel[...].reshape(
      cfg.kv_lora_rank, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim
    )
    return w[..., : cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim :]

  def __call__(
    self,
    x_BxLxD: jax.Array,
    positions_BxL: jax.Array,
    cos,
    sin,
    cache: Optional[LatentCache] = None,
    absorb: Optional[bool] = None,
    causal: bool = False,
  ):
    """`causal`: query i sits at key index i and every later key is masked for it (a
    sequence from position 0: training, scoring, a fresh prefill), so queries can attend in
    blocks of `QUERY_BLOCK`, each reading only the keys up to its last query."""
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    q_nope, q_pe = self.queries(x_BxLxD, cos, sin)
    c_kv, k_pe = self.latents(x_BxLxD, cos, sin)
    if cache is None:
      keys_c, keys_pe = c_kv, k_pe
      key_pos_BxT = positions_BxL
    else:
      cache = LatentCache(
        _write(cache.c_kv_BxTxK, c_kv, positions_BxL), _write(cache.k_pe_BxTxR, k_pe, positions_BxL)
      )
      keys_c = cache.c_kv_BxTxK.astype(x_BxLxD.dtype)
      keys_pe = cache.k_pe_BxTxR.astype(x_BxLxD.dtype)
      key_pos_BxT = jnp.broadcast_to(jnp.arange(keys_c.shape[1]), (b, keys_c.shape[1]))
    mask_Bx1xLxT = key_pos_BxT[:, None, None, :] <= positions_BxL[:, None, :, None]
    if absorb is None:
      absorb = cache is not None and l == 1
    if absorb:
      o_BxLxHxV = self._attend_absorbed(q_nope, q_pe, keys_c, keys_pe, mask_Bx1xLxT)
    else:
      o_BxLxHxV = self._attend_naive(q_nope, q_pe, keys_c, keys_pe, mask_Bx1xLxT, causal)
    out = self.wo(o_BxLxHxV.reshape(b, l, cfg.num_attention_heads * cfg.v_head_dim))
    return out, cache

  def _attend_naive(self, q_nope, q_pe, c_kv_BxTxK, k_pe_BxTxR, mask, causal=False):
    cfg = self.cfg
    b, t, _ = c_kv_BxTxK.shape
    kv = self.wkv_b(c_kv_BxTxK).reshape(
      b, t, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim
    )
    k_nope_BxTxHxN, v_BxTxHxV = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim :]
    # One score GEMM over [nope | rope] dims (the shared rotary key broadcast to every head),
    # with heads ahead of positions: two GEMMs and a sum cost ~1.5x as much in backward
    # (the shared key's gradient is a cross-head reduction of its own non-canonical dot).
    h = cfg.num_attention_heads
    k_pe_BxTxHxR = jnp.broadcast_to(k_pe_BxTxR[:, :, None], (b, t, h, k_pe_BxTxR.shape[-1]))
    q_BxHxLxQK = jnp.concatenate([q_nope, q_pe], -1).transpose(0, 2, 1, 3)
    k_BxHxTxQK = jnp.concatenate([k_nope_BxTxHxN, k_pe_BxTxHxR], -1).transpose(0, 2, 1, 3)
    v_BxHxTxV = v_BxTxHxV.transpose(0, 2, 1, 3)
    scale, l = rope.softmax_scale(cfg), q_BxHxLxQK.shape[2]
    if not causal or l <= QUERY_BLOCK:
      o_BxHxLxV = attend(q_BxHxLxQK, k_BxHxTxQK, v_BxHxTxV, mask, scale)
      return o_BxHxLxV.transpose(0, 2, 1, 3)
    o_BxHxLxV = causal_attend(q_BxHxLxQK, k_BxHxTxQK, v_BxHxTxV, mask, scale, l >= RECOMPUTE_FROM)
    return o_BxHxLxV.transpose(0, 2, 1, 3)

  def _attend_absorbed(self, q_nope, q_pe, c_kv_BxTxK, k_pe_BxTxR, mask):
    dtype = q_nope.dtype
    head_major = getattr(self, "head_major", None)  # set by `arrange_for_decoding`
    if head_major is None:
      w_uk_KxHxN, w_uv_KxHxV = self._split_kvb()
      w_uk_HxNxK, w_uv_HxKxV = w_uk_KxHxN.transpose(1, 2, 0), w_uv_KxHxV.transpose(1, 0, 2)
    else:
      w_uk_HxNxK, w_uv_HxKxV = (w[...] for w in head_major)
    q_c_BxLxHxK = jnp.einsum("blhn,hnk->blhk", q_nope, w_uk_HxNxK.astype(dtype))
    scores = jnp.einsum("blhk,btk->bhlt", q_c_BxLxHxK, c_kv_BxTxK) + jnp.einsum(
      "blhr,btr->bhlt", q_pe, k_pe_BxTxR
    )
    p_BxHxLxT = _probabilities(scores, mask, rope.softmax_scale(self.cfg), dtype)
    o_c_BxLxHxK = jnp.einsum("bhlt,btk->blhk", p_BxHxLxT, c_kv_BxTxK)
    return jnp.einsum("blhk,hkv->blhv", o_c_BxLxHxK, w_uv_HxKxV.astype(dtype))
