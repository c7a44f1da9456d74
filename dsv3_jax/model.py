"""The DeepSeek-V3 transformer: embedding, dense blocks, MoE blocks, head, MTP modules.

Blocks of one kind are created stacked (`nnx.vmap` over a leading layer axis) and run with
`jax.lax.scan`, so compile time does not grow with depth and a stack can be cut into
pipeline stages along that axis (`ModelConfig.unroll_layers` unrolls the scan: shallow models
then skip copying each layer's slice of the stacked weights). Every cache is the MLA latent
cache (`LatentCache`), stacked the same way.

`model(tokens)` returns logits; `model.forward(...)` returns everything a training step or a
decoder needs (hidden states, per-layer expert loads, the balance loss, the updated cache).
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import rope
from dsv3_jax.layers.block import Block
from dsv3_jax.layers.linear import Linear
from dsv3_jax.layers.mla import LatentCache, init_latent_cache
from dsv3_jax.layers.moe import RoutedExperts
from dsv3_jax.layers.mtp import MTPModule
from dsv3_jax.layers.norms import RMSNorm


class Output(NamedTuple):
  logits_BxLxV: Optional[jax.Array]  # float32; None from `forward(head=False)`
  hidden_BxLxD: jax.Array  # after the final norm: what the head reads and MTP consumes
  load_LxE: jax.Array  # token copies per expert, per MoE layer
  balance_loss: jax.Array  # sum over MoE layers of the sequence-wise loss (no alpha)
  cache: Optional["ModelCache"]
  # Expert-parallel dispatch statistics summed over the MoE layers (dropped_copies,
  # cross_node_copies, remote_node_sends; see parallel/expert.py); empty on one device.
  stats: Optional[dict] = None
  # With `hidden_states=True`: [embedding output, output of each block] (before the norm).
  hidden_states: Optional[list] = None


class ModelCache(NamedTuple):
  dense: Optional[LatentCache]
  moe: Optional[LatentCache]


class Context(NamedTuple):
  """What every block of one forward pass shares: positions, RoPE angles, how to run."""

  positions_BxL: jax.Array
  cos: jax.Array
  sin: jax.Array
  absorb: Optional[bool] = None  # absorbed MLA (decode) vs naive; None = by cache presence
  routed: Optional[RoutedExperts] = None  # where routed experts run; None = this device
  # Two-micro-batch overlap (arXiv 2412.19437 §3.4): 2 = every block runs the two halves of
  # the batch separately, so one half's attention and MLP do not wait for the other half's
  # expert dispatch/combine. `batch_shards`: how many shards the batch is split over (the
  # halves are taken inside each shard's rows, so no row changes device).
  microbatches: int = 1
  batch_shards: int = 1
  # The sequence sits at positions 0 .. L-1 (`Transformer.context` was given a shape, not
  # positions): attention may skip the keys past each block of queries (`MLA.__call__`).
  causal: bool = False
  # Unroll the scan over a stack's layers (`ModelConfig.unroll_layers`).
  unroll: bool = False
  # Recompute each block's forward in the backward (`ModelConfig.remat` = "blocks").
  remat: bool = False


def _halves(t, shards: int):
  """[B, ...] -> two [B/2, ...]: in each of `shards` contiguous row blocks, its first half of
  rows goes to the first micro-batch and its second half to the second."""
  b = t.shape[0]
  r = t.reshape((shards, 2, b // (2 * shards)) + t.shape[1:])
  return r[:, 0].reshape((b // 2,) + t.shape[1:]), r[:, 1].reshape((b // 2,) + t.shape[1:])


def _join(a, b, shards: int):
  """The inverse of `_halves`."""
  per = a.shape[0] // shards
  r = jnp.stack([a.reshape((shards, per) + a.shape[1:]), b.reshape((shards, per) + b.shape[1:])], 1)
  return r.reshape((2 * a.shape[0],) + a.shape[1:])


class StackResult(NamedTuple):
  x_BxLxD: jax.Array  # the last block's output (before the final norm)
  load_LxE: jax.Array
  balance_loss: jax.Array
  stats: dict
  cache: Optional[LatentCache]
  hidden_LxBxLxD: Optional[jax.Array]  # each block's output, with `collect=True`


def _stack(cfg: ModelConfig, moe: bool, n: int, key: jax.Array) -> Block:
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(k):
    return Block(cfg, moe=moe, rngs=nnx.Rngs(params=k))

  return make(jax.random.split(key, n))


def run_stack(
  stack: Block | nnx.List, x_BxLxD: jax.Array, ctx: Context, cache=None, collect: bool = False
) -> StackResult:
  """Scans the stacked blocks (all of them, or the slice a pipeline stage holds; unrolled
  under `ctx.unroll`; each block rerun in the backward under `ctx.remat`); a stack unstacked
  by `unstack_layers` (a list of blocks, for decoding: nothing to recompute) runs as a loop
  over its layers."""

  def step(block, x, layer_cache):
    if ctx.microbatches == 1:
      x, aux, layer_cache = block(
        x, ctx.positions_BxL, ctx.cos, ctx.sin, layer_cache, ctx.absorb, ctx.routed, ctx.causal
      )
      return x, (aux, layer_cache, x if collect else None)
    # Two independent halves through the same block: nothing of one waits for the other.
    inputs = (x, ctx.positions_BxL, ctx.cos, ctx.sin, layer_cache)
    outs = [
      block(
        *jax.tree.map(lambda t: _halves(t, ctx.batch_shards)[i], inputs),
        ctx.absorb,
        ctx.routed,
        ctx.causal,
      )
      for i in (0, 1)
    ]
    (x0, aux0, c0), (x1, aux1, c1) = outs
    x = _join(x0, x1, ctx.batch_shards)
    layer_cache = jax.tree.map(lambda a, b: _join(a, b, ctx.batch_shards), c0, c1)
    # Loads and statistics are counts (sum); the balance loss is a mean over sequences.
    aux = {k: (v + aux1[k]) / 2 if k == "balance_loss" else v + aux1[k] for k, v in aux0.items()}
    return x, (aux, layer_cache, x if collect else None)

  if isinstance(stack, nnx.List):
    x, outs = x_BxLxD, []
    for i, block in enumerate(stack):
      x, out = step(block, x, None if cache is None else jax.tree.map(lambda c: c[i], cache))
      outs.append(out)
    aux, cache, hidden = jax.tree.map(lambda *layers: jnp.stack(layers), *outs)
  else:
    graphdef, state = nnx.split(stack)

    def body(x, xs):
      layer_state, layer_cache = xs
      return step(nnx.merge(graphdef, layer_state), x, layer_cache)

    unroll = ctx.unroll
    if ctx.remat:  # keep the block's input (the scan's carry); rerun the block for its VJP
      # The rolled loop is what keeps the rerun inside the backward: unrolled, XLA:CPU's
      # temporaries barely fell (tiny: 8.92 -> 8.59 MB, with or without CSE prevention),
      # rolled they fall 39% (8.34 -> 5.06 MB). So recomputation rolls the stack.
      body = jax.checkpoint(body, prevent_cse=False)  # a loop body: nothing to CSE across
      unroll = False
    x, (aux, cache, hidden) = jax.lax.scan(body, x_BxLxD, (state, cache), unroll=unroll)
  stats = {k: v.sum() for k, v in aux.items() if k not in ("load", "balance_loss")}
  return StackResult(x, aux["load"], aux["balance_loss"].sum(), stats, cache, hidden)


def unstack_layers(model: "Transformer") -> "Transformer":
  """`model` with its dense and MoE stacks as lists of per-layer blocks (new arrays, one per
  layer and weight); the other modules are shared with `model`. For decoding.

  A scanned stack hands each layer its weights as a slice of the stacked arrays, and XLA
  copies that slice before its GEMMs: a decode step, bound by reading the weights, then
  reads and writes them all once more. With one array per layer, `run_stack` loops over
  the layers and every GEMM reads its weights in place. Compile time grows with depth.
  Each layer's attention also keeps its absorption weights head-major
  (`MLA.arrange_for_decoding`), which a decode step would otherwise copy into that order.
  """
  graphdef, state = nnx.split(model)
  out = nnx.merge(graphdef, state)
  for name in ("dense", "moe"):
    stack = getattr(out, name)
    if stack is None or isinstance(stack, nnx.List):
      continue
    g, s = nnx.split(stack)
    n = jax.tree.leaves(s)[0].shape[0]
    layers = [nnx.merge(g, jax.tree.map(lambda a: a[i], s)) for i in range(n)]
    for layer in layers:
      layer.attn.arrange_for_decoding()
    setattr(out, name, nnx.List(layers))
  return out


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    d, v = cfg.hidden_size, cfg.vocab_size
    self.embed = nnx.Param(
      jax.random.normal(rngs.params(), (v, d), jnp.float32) * cfg.init_std, axes=("vocab", "embed")
    )
    self.dense = (
      _stack(cfg, False, cfg.n_dense_layers, rngs.params()) if cfg.n_dense_layers else None
    )
    self.moe = _stack(cfg, True, cfg.n_moe_layers, rngs.params()) if cfg.n_moe_layers else None
    self.norm = RMSNorm(d, cfg.rms_norm_eps, "embed")
    self.head = Linear(d, v, axes=("embed", "vocab"), std=cfg.init_std, precision="fp32", rngs=rngs)
    self.mtp = nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.num_nextn_predict_layers)])

  # ------------------------------------------------------------------ the walk
  # One walk serves every caller: `forward` (training, eval, decoding, inspection) runs
  # embed -> dense stack -> MoE stack -> readout (norm + head); a pipeline stage runs the same pieces on its
  # own slice (`train/pipeline_step.py`); the objective (`train/loss.py`) adds MTP on top.
  def context(
    self,
    positions_BxL: jax.Array | tuple[int, int],
    absorb: Optional[bool] = None,
    routed: Optional[RoutedExperts] = None,
    microbatches: int = 1,
    batch_shards: int = 1,
  ) -> Context:
    """`positions_BxL`: int32 [B, L], or the shape (B, L) of sequences at positions 0 .. L-1
    (training, scoring, a fresh prefill), whose attention may then skip the keys past each
    block of queries (`Context.causal`)."""
    causal = isinstance(positions_BxL, tuple)
    if causal:
      b, l = positions_BxL
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    if microbatches not in (1, 2):
      raise ValueError(f"microbatches must be 1 or 2 (two-micro-batch overlap), got {microbatches}")
    b = positions_BxL.shape[0]
    if microbatches == 2 and b % (2 * batch_shards):
      raise ValueError(
        f"two micro-batches split each of the {batch_shards} batch shard(s) in two: the batch "
        f"({b}) must be a multiple of {2 * batch_shards}"
      )
    cos, sin = rope.rope_angles(self.cfg, positions_BxL)
    return Context(
      positions_BxL,
      cos,
      sin,
      absorb,
      routed,
      microbatches,
      batch_shards,
      causal,
      self.cfg.unroll_layers,
      self.cfg.recomputes,
    )

  def embed_tokens(self, tokens_BxL: jax.Array) -> jax.Array:
    return jnp.take(self.embed[...], tokens_BxL, axis=0).astype(self.cfg.dtype)

  def run_dense(
    self, x_BxLxD: jax.Array, ctx: Context, cache=None, collect: bool = False
  ) -> StackResult:
    return run_stack(self.dense, x_BxLxD, ctx, cache, collect)

  def run_moe(
    self, x_BxLxD: jax.Array, ctx: Context, cache=None, collect: bool = False
  ) -> StackResult:
    return run_stack(self.moe, x_BxLxD, ctx, cache, collect)

  def readout(self, x_BxLxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(final-normed hidden state, logits f32): what MTP consumes and what the head says."""
    h = self.norm(x_BxLxD)
    return h, self.logits(h)

  def logits(self, h_normed_BxLxD: jax.Array) -> jax.Array:
    return self.head(h_normed_BxLxD.astype(jnp.float32))

  def forward(
    self,
    tokens_BxL: jax.Array,
    positions_BxL: Optional[jax.Array] = None,
    cache: Optional[ModelCache] = None,
    absorb: Optional[bool] = None,
    routed: Optional[RoutedExperts] = None,
    hidden_states: bool = False,
    microbatches: int = 1,
    batch_shards: int = 1,
    logits_at_B: Optional[jax.Array] = None,
    head: bool = True,
  ) -> Output:
    """The model walk. `logits_at_B`: one position per sequence whose logits alone are
    computed (logits [B, 1, V]; a prefill samples only from its last token, and the head is
    the largest GEMM of a short model); None = every position. The hidden state stays
    whole. `head=False`: no logits (None); the objective applies the head itself
    (`train/loss.head_losses`)."""
    cfg = self.cfg
    b, l = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = (b, l)  # from position 0
    ctx = self.context(positions_BxL, absorb, routed, microbatches, batch_shards)
    x = self.embed_tokens(tokens_BxL)
    hiddens = [x]
    dense_cache = moe_cache = None
    load = jnp.zeros((0, max(cfg.n_routed_experts, 1)), jnp.float32)
    balance, stats = jnp.zeros((), jnp.float32), {}
    if self.dense is not None:
      res = self.run_dense(x, ctx, cache.dense if cache else None, hidden_states)
      x, dense_cache = res.x_BxLxD, res.cache
      hiddens.append(res.hidden_LxBxLxD)
    if self.moe is not None:
      res = self.run_moe(x, ctx, cache.moe if cache else None, hidden_states)
      x, moe_cache = res.x_BxLxD, res.cache
      load, balance, stats = res.load_LxE, res.balance_loss, res.stats
      hiddens.append(res.hidden_LxBxLxD)
    if not head:
      h, logits = self.norm(x), None
    elif logits_at_B is None:
      h, logits = self.readout(x)
    else:
      h = self.norm(x)
      logits = self.logits(jnp.take_along_axis(h, logits_at_B[:, None, None], axis=1))
    new_cache = ModelCache(dense_cache, moe_cache) if cache is not None else None
    layer_outputs = None
    if hidden_states:
      layer_outputs = [hiddens[0]] + [s[i] for s in hiddens[1:] for i in range(s.shape[0])]
    return Output(logits, h, load, balance, new_cache, stats, layer_outputs)

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    """Logits [B, L, V] (float32) for int token ids [B, L]."""
    return self.forward(tokens_BxL).logits_BxLxV

  def init_cache(self, batch: int, length: int, dtype=jnp.bfloat16) -> ModelCache:
    cfg = self.cfg
    dense = (
      init_latent_cache(cfg, batch, length, dtype, cfg.n_dense_layers)
      if cfg.n_dense_layers
      else None
    )
    moe = (
      init_latent_cache(cfg, batch, length, dtype, cfg.n_moe_layers) if cfg.n_moe_layers else None
    )
    return ModelCache(dense, moe)

  # ------------------------------------------------------------------ MTP
  def mtp_forward(
    self,
    hidden_BxLxD: jax.Array,
    tokens_BxLpD: jax.Array,
    positions_BxL: Optional[jax.Array] = None,
    routed: Optional[RoutedExperts] = None,
    emb_DxBxLxD: Optional[jax.Array] = None,
    head: bool = True,
  ):
    """Runs every MTP depth over the main model's hidden states.

    `tokens_BxLpD` holds the main inputs followed by D more tokens (D = depth), so depth k
    sees `tokens[:, k : k+L]`; `emb_DxBxLxD`, when given, is their embeddings, looked up by
    the caller. Returns (list of logits [B, L, V] predicting t_{i+k+1}, loads [D, E],
    balance loss summed over depths); `head=False`: each depth's normed hidden state [B, L,
    hidden] in place of its logits (the objective applies the head itself).
    """
    cfg = self.cfg
    b, l, _ = hidden_BxLxD.shape
    ctx = self.context((b, l) if positions_BxL is None else positions_BxL, routed=routed)
    h = hidden_BxLxD
    outs, loads, balance = [], [], jnp.zeros((), jnp.float32)
    for k, module in enumerate(self.mtp, start=1):
      if emb_DxBxLxD is None:
        emb = self.embed_tokens(tokens_BxLpD[:, k : k + l])
      else:
        emb = emb_DxBxLxD[k - 1]
      # Each depth consumes the previous depth's normed hidden state (what its head read),
      # as transformers' and vLLM's MTP drafting do with the published checkpoint.
      _, h, aux, _ = module(
        h, emb, ctx.positions_BxL, ctx.cos, ctx.sin, routed=ctx.routed, causal=ctx.causal
      )
      outs.append(self.logits(h) if head else h)
      loads.append(aux["load"])
      balance = balance + aux["balance_loss"]
    loads = jnp.stack(loads) if loads else jnp.zeros((0, cfg.n_routed_experts), jnp.float32)
    return outs, loads, balance


def create(cfg: ModelConfig, seed: int = 0) -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig) -> Transformer:
  """The model with ShapeDtypeStruct leaves: no memory is allocated."""
  return nnx.eval_shape(lambda: create(cfg))
