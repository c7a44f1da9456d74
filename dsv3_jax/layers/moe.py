"""DeepSeekMoE: sigmoid router with aux-loss-free bias, group-limited top-k, dropless experts.

Routing (REFERENCE §3), in float32:
  s = sigmoid(x W_gate)                    affinities                       [N, E]
  choice = s + b                           b: per-expert bias, selection only
  group score = sum of the top-2 `choice` in each of n_group groups; keep topk_group groups
  (the rest masked to -inf, as DeepSeek's own code does; HF masks to 0, which differs only
  when fewer than k positive scores remain); top-k experts among the kept ones;
  weights = s of the chosen experts, normalised to sum 1, times routed_scaling_factor.

Experts run dropless: token copies are sorted by expert, each expert's group padded to a
multiple of `expert_block_size`, and a loop over blocks multiplies each block by its
expert's weights (`grouped_matmul`). Nothing is dropped, whatever the routing.

Legend: N tokens, D model, E experts, G groups, k experts per token, F expert width,
S block size, NB blocks.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.linear import matmul
from dsv3_jax.layers.mlp import MLP


class RouterBias(nnx.Variable):
  """The aux-loss-free balancing bias: updated from loads, never by the gradient."""


class Routing(NamedTuple):
  experts_Nxk: jax.Array  # int32 chosen experts
  weights_Nxk: jax.Array  # float32 combine weights (sum to routed_scaling_factor if normed)
  scores_NxE: jax.Array   # float32 sigmoid affinities (for the sequence-wise balance loss)


def route(x_NxD: jax.Array, gate_DxE: jax.Array, bias_E: jax.Array, cfg: ModelConfig) -> Routing:
  """Group-limited top-k routing on sigmoid affinities."""
  n = x_NxD.shape[0]
  e, g = cfg.n_routed_experts, cfg.n_group
  logits = jnp.dot(x_NxD.astype(jnp.float32), gate_DxE.astype(jnp.float32))
  scores_NxE = jax.nn.sigmoid(logits)
  choice_NxE = scores_NxE + bias_E.astype(jnp.float32)[None, :]
  if g > 1 and cfg.topk_group < g:
    grouped_NxGxS = choice_NxE.reshape(n, g, e // g)
    group_score_NxG = jax.lax.top_k(grouped_NxGxS, 2)[0].sum(-1)
    _, keep_groups = jax.lax.top_k(group_score_NxG, cfg.topk_group)
    keep_NxG = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], keep_groups].set(True)
    keep_NxE = jnp.repeat(keep_NxG, e // g, axis=1)
    choice_NxE = jnp.where(keep_NxE, choice_NxE, -jnp.inf)
  _, experts_Nxk = jax.lax.top_k(choice_NxE, cfg.num_experts_per_tok)
  weights_Nxk = jnp.take_along_axis(scores_NxE, experts_Nxk, axis=-1)
  if cfg.norm_topk_prob:
    weights_Nxk = weights_Nxk / (weights_Nxk.sum(-1, keepdims=True) + 1e-20)
  weights_Nxk = weights_Nxk * cfg.routed_scaling_factor
  return Routing(experts_Nxk.astype(jnp.int32), weights_Nxk, scores_NxE)


def expert_load(experts_Nxk: jax.Array, n_experts: int) -> jax.Array:
  """Token copies per expert [E] (float32)."""
  return jnp.zeros((n_experts,), jnp.float32).at[experts_Nxk.reshape(-1)].add(1.0)


def sequence_balance_loss(routing: Routing, batch: int, cfg: ModelConfig) -> jax.Array:
  """Complementary sequence-wise balance loss `sum_i f_i P_i`, averaged over sequences.

  f_i = E / (k T) * (copies sent to expert i in the sequence), P_i = mean_t s_i / sum_j s_j.
  Not yet multiplied by alpha.
  """
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  experts_BxTxk = routing.experts_Nxk.reshape(batch, -1, k)
  t = experts_BxTxk.shape[1]
  counts_BxE = jax.vmap(lambda ex: expert_load(ex, e))(experts_BxTxk)
  f_BxE = jax.lax.stop_gradient(counts_BxE * (e / (k * t)))
  s = routing.scores_NxE.reshape(batch, t, e)
  p_BxE = jnp.mean(s / s.sum(-1, keepdims=True), axis=1)
  return jnp.mean(jnp.sum(f_BxE * p_BxE, axis=-1))


# ----------------------------------------------------------------------------- grouped GEMM
def _block_vjp(precision):
  def f(x_SxK, w_KxF):
    return matmul(x_SxK, w_KxF, precision)
  return f


def grouped_matmul(x_NBxSxK, w_ExKxF, block_expert_NB, n_used, precision="fp32"):
  """`out[b] = x[b] @ w[block_expert[b]]` for blocks b < n_used; zeros beyond.

  fp32 / bf16 run each block through `matmul` (its VJP per block in backward); fp8 runs
  `dsv3_jax.quant.fp8_grouped`, whose backward keeps only the FP8 activations and scales and
  computes dgrad and wgrad with FP8 operands too.
  """
  if precision == "fp8":
    from dsv3_jax.quant import fp8_grouped  # local import, as in layers/linear.py
    return fp8_grouped.grouped_matmul_fp8(x_NBxSxK, w_ExKxF, block_expert_NB, n_used)
  return _grouped_hp(x_NBxSxK, w_ExKxF, block_expert_NB, n_used, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_hp(x_NBxSxK, w_ExKxF, block_expert_NB, n_used, precision):
  return _grouped_fwd(x_NBxSxK, w_ExKxF, block_expert_NB, n_used, precision)[0]


def _grouped_fwd(x, w, block_expert, n_used, precision):
  f = _block_vjp(precision)
  zeros = jnp.zeros((x.shape[1], w.shape[2]), x.dtype)

  def body(args):
    xb, e, b = args
    return jax.lax.cond(b < n_used, lambda: f(xb, w[e]).astype(x.dtype), lambda: zeros)

  out = jax.lax.map(body, (x, block_expert, jnp.arange(x.shape[0])))
  return out, (x, w, block_expert, n_used)


def _grouped_bwd(precision, res, g_NBxSxF):
  x, w, block_expert, n_used = res
  f = _block_vjp(precision)

  def step(dw, args):
    xb, gb, e, b = args

    def compute():
      _, vjp = jax.vjp(f, xb, w[e])
      dxb, dwe = vjp(gb.astype(x.dtype))
      return dxb.astype(x.dtype), dwe.astype(dw.dtype)

    def skip():
      return jnp.zeros_like(xb), jnp.zeros(w.shape[1:], dw.dtype)

    # Only the small per-block results go through the cond; the [E, K, F] accumulator is
    # updated in place outside it (a cond carrying it would copy it every block).
    dxb, dwe = jax.lax.cond(b < n_used, compute, skip)
    zero = jnp.zeros((), jnp.int32)
    current = jax.lax.dynamic_slice(dw, (e, zero, zero), (1,) + dw.shape[1:])
    return jax.lax.dynamic_update_slice(dw, current + dwe[None], (e, zero, zero)), dxb

  dw, dx = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32),
                        (x, g_NBxSxF, block_expert, jnp.arange(x.shape[0])))
  return dx, dw.astype(w.dtype), None, None


_grouped_hp.defvjp(_grouped_fwd, _grouped_bwd)


class BlockLayout(NamedTuple):
  """Where each sorted token copy sits in the padded, expert-sorted block buffer."""

  order_C: jax.Array        # copy index (token-major, k per token) in expert-sorted order
  dest_C: jax.Array         # row of each sorted copy in the padded buffer
  block_expert_NB: jax.Array
  n_used: jax.Array         # blocks holding at least one real row
  n_blocks: int


def block_layout(experts_C: jax.Array, n_experts: int, block: int) -> BlockLayout:
  """Sort copies by expert and pad each expert's group to a multiple of `block` rows."""
  c = experts_C.shape[0]
  order = jnp.argsort(experts_C, stable=True)
  sorted_e = experts_C[order]
  counts_E = jnp.zeros((n_experts,), jnp.int32).at[experts_C].add(1)
  padded_E = (counts_E + block - 1) // block * block
  pad_end_E = jnp.cumsum(padded_E)
  pad_start_E = pad_end_E - padded_E
  cnt_start_E = jnp.cumsum(counts_E) - counts_E
  dest = pad_start_E[sorted_e] + jnp.arange(c) - cnt_start_E[sorted_e]
  # Each non-empty expert adds at most one partial block: a bound that never overflows.
  n_blocks = c // block + 1 + min(n_experts, c)
  starts = jnp.arange(n_blocks) * block
  block_expert = jnp.minimum(jnp.searchsorted(pad_end_E, starts, side="right"), n_experts - 1)
  n_used = pad_end_E[-1] // block
  return BlockLayout(order, dest, block_expert.astype(jnp.int32), n_used, n_blocks)


def effective_block(block: int, copies: int, n_experts: int) -> int:
  """Rows per block: `block`, shrunk (to a power of two) when experts get few copies each.

  A decode step routes a handful of copies over many experts; padding each to a 64-row block
  would multiply the expert FLOPs by ~64. Shapes are static, so this is a trace-time choice.
  """
  per_expert = max(1, copies // max(n_experts, 1))
  return min(block, 1 << (per_expert - 1).bit_length())


def grouped_ffn(x_NxD, routing: Routing, w1_ExDxF, w3_ExDxF, w2_ExFxD, block: int,
                precision: str) -> jax.Array:
  """Dropless routed-expert SwiGLU, combined with the routing weights: [N, D]."""
  n, d = x_NxD.shape
  k = routing.experts_Nxk.shape[1]
  e = w1_ExDxF.shape[0]
  if n * k <= e and precision != "fp8":
    return _gathered_ffn(x_NxD, routing, w1_ExDxF, w3_ExDxF, w2_ExFxD)
  block = effective_block(block, n * k, e)
  lay = block_layout(routing.experts_Nxk.reshape(-1), e, block)
  token_of_copy = lay.order_C // k
  rows = lay.n_blocks * block
  xs = jnp.zeros((rows, d), x_NxD.dtype).at[lay.dest_C].set(x_NxD[token_of_copy])
  xs_NBxSxD = xs.reshape(lay.n_blocks, block, d)
  gm = functools.partial(grouped_matmul, block_expert_NB=lay.block_expert_NB,
                         n_used=lay.n_used, precision=precision)
  h = jax.nn.silu(gm(xs_NBxSxD, w1_ExDxF)) * gm(xs_NBxSxD, w3_ExDxF)
  ys = gm(h, w2_ExFxD).reshape(rows, d)
  y_sorted_CxD = ys[lay.dest_C]
  y_CxD = jnp.zeros_like(y_sorted_CxD).at[lay.order_C].set(y_sorted_CxD)
  w_C = routing.weights_Nxk.reshape(-1).astype(jnp.float32)
  y_NxkxD = (y_CxD.astype(jnp.float32) * w_C[:, None]).reshape(n, k, d)
  return y_NxkxD.sum(1).astype(x_NxD.dtype)


def _gathered_ffn(x_NxD, routing: Routing, w1, w3, w2) -> jax.Array:
  """Few copies (decode): gather each copy's expert weights and run one batched product.

  Reads exactly the experts in use, with no block loop; chosen when copies <= experts.
  """
  n, d = x_NxD.shape
  k = routing.experts_Nxk.shape[1]
  ex_C = routing.experts_Nxk.reshape(-1)
  x_CxD = jnp.repeat(x_NxD, k, axis=0)
  h = (jax.nn.silu(jnp.einsum("cd,cdf->cf", x_CxD, w1[ex_C].astype(x_NxD.dtype)))
       * jnp.einsum("cd,cdf->cf", x_CxD, w3[ex_C].astype(x_NxD.dtype)))
  y_CxD = jnp.einsum("cf,cfd->cd", h, w2[ex_C].astype(x_NxD.dtype)).astype(jnp.float32)
  w_C = routing.weights_Nxk.reshape(-1).astype(jnp.float32)
  return (y_CxD * w_C[:, None]).reshape(n, k, d).sum(1).astype(x_NxD.dtype)


def dense_ffn_reference(x_NxD, routing: Routing, w1, w3, w2) -> jax.Array:
  """Every expert on every token, masked by the routing: an O(E) reference for tests."""
  h = jax.nn.silu(jnp.einsum("nd,edf->enf", x_NxD, w1)) * jnp.einsum("nd,edf->enf", x_NxD, w3)
  y_ExNxD = jnp.einsum("enf,efd->end", h, w2)
  e = w1.shape[0]
  gate_NxE = jnp.zeros((x_NxD.shape[0], e), jnp.float32).at[
      jnp.arange(x_NxD.shape[0])[:, None], routing.experts_Nxk].add(routing.weights_Nxk)
  return jnp.einsum("ne,end->nd", gate_NxE, y_ExNxD).astype(x_NxD.dtype)


class MoE(nnx.Module):
  """Shared experts + routed experts; returns (y, aux) with aux = loads and balance loss."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    std = cfg.init_std
    normal = lambda shape: jax.random.normal(rngs.params(), shape, jnp.float32) * std
    self.gate = nnx.Param(normal((d, e)), axes=("embed", "experts_gate"))
    self.bias = RouterBias(jnp.zeros((e,), jnp.float32))
    self.w1 = nnx.Param(normal((e, d, f)), axes=("expert", "embed", "expert_mlp"))
    self.w3 = nnx.Param(normal((e, d, f)), axes=("expert", "embed", "expert_mlp"))
    self.w2 = nnx.Param(normal((e, f, d)), axes=("expert", "expert_mlp", "embed"))
    self.shared = (MLP(cfg, cfg.n_shared_experts * f, rngs=rngs)
                   if cfg.n_shared_experts else None)

  def __call__(self, x_BxLxD: jax.Array):
    ep = _active_expert_parallel()
    if ep is not None:
      return self._call_expert_parallel(x_BxLxD, ep)
    cfg = self.cfg
    b, l, d = x_BxLxD.shape
    x_NxD = x_BxLxD.reshape(b * l, d)
    routing = route(x_NxD, self.gate[...], self.bias[...], cfg)
    y = grouped_ffn(x_NxD, routing, self.w1[...], self.w3[...], self.w2[...],
                    cfg.expert_block_size, cfg.matmul_precision)
    if self.shared is not None:
      y = y + self.shared(x_NxD)
    aux = {"load": expert_load(routing.experts_Nxk, cfg.n_routed_experts),
           "balance_loss": sequence_balance_loss(routing, b, cfg)}
    return y.reshape(b, l, d), aux

  def _call_expert_parallel(self, x_BxLxD: jax.Array, ep):
    """Routed experts in shard_map over the mesh's `expert` axis (`parallel/expert.py`)."""
    from dsv3_jax.parallel import expert  # local import: parallel/expert.py imports this file
    b, l, d = x_BxLxD.shape
    y, aux = expert.routed_experts(x_BxLxD, self.gate[...], self.bias[...], self.w1[...],
                                   self.w3[...], self.w2[...], self.cfg, ep)
    if self.shared is not None:
      y = y + self.shared(x_BxLxD.reshape(b * l, d)).reshape(b, l, d)
    return y, aux


def _active_expert_parallel():
  """The `parallel.expert.use(...)` setting in effect while tracing, or None (one device)."""
  from dsv3_jax.parallel import expert
  return expert.active()
