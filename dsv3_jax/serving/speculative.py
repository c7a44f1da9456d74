"""Self-speculative decoding with the MTP module (arXiv 2412.19437 §2.2 and §5.4.3).

DeepSeek-V3 trains one Multi-Token Prediction module (§2.2): at position i it combines the
main model's final-normed hidden state h_i with the embedding of token t_{i+1} and predicts
t_{i+2}. At inference the report reuses it as a drafter (§5.4.3): the second token is
accepted 85-90% of the time, and decoding runs 1.8x more tokens per second. Here:

  * prefill: the main model over the prompts fills its latent cache; its first token t_n is
    sampled at the last prompt position n-1; the MTP module runs over the prompts (inputs
    h_i and emb(t_{i+1}), the token after the prompt being t_n) filling its own one-layer
    latent cache, and drafts d for position n+1 from position n-1.
  * each step, per sequence (the last emitted token `last` at position `pos`, not yet in the
    cache, and its draft d for pos+1): ONE main forward of the 2 tokens [last, d] at
    [pos, pos+1] over the latent cache gives p (for pos+1) and p' (for pos+2). The draft is
    verified against p: greedy, accepted iff argmax p == d; sampled, accepted with
    probability min(1, p(d) / q(d)) and otherwise replaced by a draw from
    norm(max(p - q, 0)) (`speculative_accept`), so the emitted token has exactly p's law.
    On acceptance a bonus token is drawn from p' too: 2 tokens for one main forward, else 1.
    The MTP module then runs on the same 2 positions (h_pos, emb(t_{pos+1})) and
    (h_{pos+1}, emb(t_{pos+2})) and drafts from the last accepted one.
    A rejected draft leaves a wrong entry at pos+1 in both caches; the next step writes that
    very position before any query reads it, as right padding does in `inference/generate.py`.

Everything is jitted with static shapes: one prefill, one `lax.while_loop` in which each
sequence advances by 1 or 2 positions. Greedy output is token-for-token that of plain
greedy decoding (`Generator`; the 2-token forward computes each position as the 1-token one,
so only a near-tie within rounding of differently shaped products could differ); sampled
output has the plain sampler's distribution.

Only the first MTP depth drafts (the report's deployment: one extra token per step).
`measure` times speculative vs plain decoding on the same prompts and reports the
acceptance rate and tokens per main-model forward.
"""

import dataclasses
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.inference.generate import (
  Generation,
  Generator,
  SamplingConfig,
  _bucket,
  filter_logits,
  sample,
)
from dsv3_jax.layers.mla import init_latent_cache


@dataclasses.dataclass
class SpeculativeGeneration(Generation):
  steps: int = 0  # decode iterations = main-model forwards after the prefill
  drafted: int = 0  # drafts verified (sequence-steps of unfinished sequences)
  accepted: int = 0  # drafts accepted

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / max(self.drafted, 1)

  @property
  def tokens_per_forward(self) -> float:
    """Tokens a sequence gains per main-model forward: 1 + the acceptance rate."""
    return (self.drafted + self.accepted) / max(self.drafted, 1)


def speculative_accept(
  p_BxV: jax.Array, q_BxV: jax.Array, draft_B: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Speculative sampling's verification of one drafted token per row.

  `draft_B` was drawn from q; it is kept with probability min(1, p(d) / q(d)), otherwise the
  token is drawn from norm(max(p - q, 0)). The result is distributed exactly as p, whatever
  q. Returns (token [B] int32, accepted [B] bool).
  """
  if p_BxV.shape != q_BxV.shape or p_BxV.ndim != 2 or draft_B.shape != p_BxV.shape[:1]:
    raise ValueError(
      f"speculative_accept: p {p_BxV.shape} and q {q_BxV.shape} must both be "
      f"[B, V] and the drafts {draft_B.shape} [B]"
    )
  key_u, key_r = jax.random.split(key)
  p_d = jnp.take_along_axis(p_BxV, draft_B[:, None], axis=1)[:, 0]
  q_d = jnp.take_along_axis(q_BxV, draft_B[:, None], axis=1)[:, 0]
  u = jax.random.uniform(key_u, p_d.shape)
  accepted = u * q_d < p_d  # u < p/q without dividing; q(d) > 0 as d was drawn from q
  residual = jnp.maximum(p_BxV - q_BxV, 0.0)
  # p == q leaves no residual mass, but then every draft is accepted; p guards the log.
  residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_BxV)
  resampled = jax.random.categorical(key_r, jnp.log(residual), axis=-1).astype(jnp.int32)
  return jnp.where(accepted, draft_B.astype(jnp.int32), resampled), accepted


def _at(x_BxLx_: jax.Array, index_B: jax.Array) -> jax.Array:
  """Row b's entry at index_B[b] along axis 1."""
  return jnp.take_along_axis(x_BxLx_, index_B.reshape((-1, 1) + (1,) * (x_BxLx_.ndim - 2)), axis=1)[
    :, 0
  ]


def mtp_hidden(
  model,
  h_BxLxD: jax.Array,
  next_BxL: jax.Array,
  positions_BxL: jax.Array,
  cache,
  absorb: Optional[bool] = None,
):
  """MTP depth 1 over the main model's normed hidden states h_i and tokens t_{i+1}:
  (normed MTP hidden state [B, L, D] that the shared head reads, updated MTP cache).

  The module itself, with absorbed MLA at decode like the main blocks (eqs. 21-23,
  embedding first).
  """
  ctx = model.context(positions_BxL, absorb)
  _, h, _, cache = model.mtp[0](
    h_BxLxD,
    model.embed_tokens(next_BxL),
    ctx.positions_BxL,
    ctx.cos,
    ctx.sin,
    cache,
    absorb=ctx.absorb,
  )
  return h, cache


class SpeculativeGenerator(Generator):
  """`Generator` whose decode loop drafts with the MTP module and verifies 2 tokens a step.

  `generate` has the same arguments and result fields as `Generator.generate` (plus
  acceptance statistics); `Generator.generate` itself (plain decoding) stays available as
  `plain_generate`.
  """

  def __init__(self, model, cache_dtype=jnp.bfloat16, vocab_limit: Optional[int] = None):
    if len(getattr(model, "mtp", ())) == 0:
      raise ValueError(
        "speculative decoding drafts with the MTP module, and this model has "
        "none (num_nextn_predict_layers=0; load HF checkpoints with mtp=True)"
      )
    super().__init__(model, cache_dtype=cache_dtype, vocab_limit=vocab_limit)
    self._spec_prefill = jax.jit(self._spec_prefill_fn, static_argnames=("filters",))
    self._spec_decode = jax.jit(self._spec_decode_fn, static_argnames=("filters", "max_new_tokens"))

  def cache_bytes_per_token(self) -> int:
    """Latent cache bytes per token over all layers, the MTP layer included."""
    per_layer = super().cache_bytes_per_token() // self.cfg.num_hidden_layers
    return per_layer * (self.cfg.num_hidden_layers + 1)

  # ---------------------------------------------------------------- drafting
  def _draft(self, model, h_BxD, key, filters):
    """(draft [B], its distribution q [B, V] or None when greedy) from MTP states h."""
    logits = self._limit(model.logits(h_BxD))
    draft = sample(logits, key, *filters)
    q = None if filters[0] == 0.0 else jax.nn.softmax(filter_logits(logits, *filters), -1)
    return draft, q

  def _verify(self, logits_BxV, q_BxV, draft_B, key, filters):
    if filters[0] == 0.0:  # greedy: exactly plain greedy's choice
      token = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
      return token, token == draft_B
    p = jax.nn.softmax(filter_logits(logits_BxV, *filters), -1)
    return speculative_accept(p, q_BxV, draft_B, key)

  # ---------------------------------------------------------------- compiled pieces
  def _spec_prefill_fn(self, state, tokens_BxW, lengths_B, cache, mtp_cache, key, filters):
    model = nnx.merge(self.graphdef, state)
    b, w = tokens_BxW.shape
    key_first, key_draft = jax.random.split(key)
    last_B = lengths_B - 1
    out = model.forward(tokens_BxW, cache=cache, absorb=False, logits_at_B=last_B)
    first_B = sample(self._limit(out.logits_BxLxV[:, 0]), key_first, *filters)
    # The MTP input at position i is t_{i+1}: the prompt shifted left, t_n after the prompt.
    next_BxW = jnp.concatenate([tokens_BxW[:, 1:], tokens_BxW[:, -1:]], axis=1)
    next_BxW = next_BxW.at[jnp.arange(b), last_B].set(first_B)
    positions_BxW = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
    h_mtp, mtp_cache = mtp_hidden(
      model, out.hidden_BxLxD, next_BxW, positions_BxW, mtp_cache, absorb=False
    )
    draft_B, q_BxV = self._draft(model, _at(h_mtp, last_B), key_draft, filters)
    return first_B, draft_B, q_BxV, out.cache, mtp_cache

  def _spec_decode_fn(
    self,
    state,
    cache,
    mtp_cache,
    first_B,
    draft_B,
    q_BxV,
    lengths_B,
    key,
    eos,
    filters,
    max_new_tokens,
  ):
    model = nnx.merge(self.graphdef, state)
    b, n = first_B.shape[0], max_new_tokens
    rows = jnp.arange(b)
    greedy = filters[0] == 0.0
    # One spare column: an accepted draft's bonus token may land one past the budget.
    out_BxN1 = jnp.zeros((b, n + 1), jnp.int32).at[:, 0].set(first_B)
    count_B = jnp.ones((b,), jnp.int32)  # tokens emitted so far
    done_B = (first_B == eos) | (count_B >= n)
    zero = jnp.int32(0)
    if greedy:
      q_BxV = jnp.zeros((b, 1), jnp.float32)  # unused placeholder of static shape

    def cond(c):
      return ~jnp.all(c["done"])

    def body(c):
      key, k_verify, k_bonus, k_draft = jax.random.split(c["key"], 4)
      pos, last, draft, active = c["pos"], c["last"], c["draft"], ~c["done"]
      res = model.forward(
        jnp.stack([last, draft], axis=1),
        positions_BxL=jnp.stack([pos, pos + 1], axis=1),
        cache=c["cache"],
        absorb=True,
      )
      logits0 = self._limit(res.logits_BxLxV[:, 0])
      logits1 = self._limit(res.logits_BxLxV[:, 1])
      t1, acc = self._verify(logits0, c["q"], draft, k_verify, filters)
      t2 = sample(logits1, k_bonus, *filters)  # used only when the draft was accepted
      h_mtp, mtp_cache = mtp_hidden(
        model,
        res.hidden_BxLxD,
        jnp.stack([t1, t2], axis=1),
        jnp.stack([pos, pos + 1], axis=1),
        c["mtp_cache"],
        absorb=True,
      )
      new_draft, new_q = self._draft(model, _at(h_mtp, acc.astype(jnp.int32)), k_draft, filters)
      # Finished rows write nowhere (index n + 1 is out of bounds and dropped).
      count = c["count"]
      out = c["out"].at[rows, jnp.where(active, count, n + 1)].set(t1, mode="drop")
      out = out.at[rows, jnp.where(active & acc, count + 1, n + 1)].set(t2, mode="drop")
      step = jnp.where(active, 1 + acc.astype(jnp.int32), 0)
      new_count = count + step
      hit_eos = (t1 == eos) | (acc & (t2 == eos))
      return dict(
        key=key,
        cache=res.cache,
        mtp_cache=mtp_cache,
        out=out,
        count=new_count,
        pos=pos + step,
        last=jnp.where(active, jnp.where(acc, t2, t1), last),
        draft=jnp.where(active, new_draft, draft),
        q=c["q"] if greedy else jnp.where(active[:, None], new_q, c["q"]),
        done=c["done"] | (new_count >= n) | (active & hit_eos),
        steps=c["steps"] + 1,
        drafted=c["drafted"] + active.sum(dtype=jnp.int32),
        accepted=c["accepted"] + (active & acc).sum(dtype=jnp.int32),
      )

    carry = dict(
      key=key,
      cache=cache,
      mtp_cache=mtp_cache,
      out=out_BxN1,
      count=count_B,
      pos=lengths_B.astype(jnp.int32),
      last=first_B,
      draft=draft_B,
      q=q_BxV,
      done=done_B,
      steps=zero,
      drafted=zero,
      accepted=zero,
    )
    c = jax.lax.while_loop(cond, body, carry)
    return c["out"][:, :n], c["count"], c["steps"], c["drafted"], c["accepted"]

  # ---------------------------------------------------------------- driver
  def plain_generate(
    self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig()
  ) -> Generation:
    """Plain one-token-per-forward decoding of the same model (`Generator.generate`)."""
    return super().generate(prompts, sampling)

  def generate(
    self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig()
  ) -> SpeculativeGeneration:
    sampling.validate()
    self.validate_prompts(prompts, sampling.max_new_tokens)
    n = sampling.max_new_tokens
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = min(_bucket(int(lengths.max())), self.cfg.max_position_embeddings)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, : len(p)] = p
    # A draft is verified one position past the last emitted token: 2 spare positions.
    total = _bucket(width + n + 2)
    model = nnx.merge(self.graphdef, self.state)
    cache = model.init_cache(len(prompts), total, self.cache_dtype)
    mtp_cache = init_latent_cache(self.cfg, len(prompts), total, self.cache_dtype)
    key_prefill, key_decode = jax.random.split(jax.random.key(sampling.seed))
    filters = (sampling.temperature, sampling.top_k, sampling.top_p)
    eos = -1 if sampling.eos_id is None else sampling.eos_id
    t0 = time.perf_counter()
    first, draft, q, cache, mtp_cache = self._spec_prefill(
      self.state,
      jnp.asarray(tokens),
      jnp.asarray(lengths),
      cache,
      mtp_cache,
      key_prefill,
      filters=filters,
    )
    first.block_until_ready()
    t1 = time.perf_counter()
    out, _, steps, drafted, accepted = self._spec_decode(
      self.state,
      cache,
      mtp_cache,
      first,
      draft,
      q,
      jnp.asarray(lengths),
      key_decode,
      jnp.int32(eos),
      filters=filters,
      max_new_tokens=n,
    )
    out = np.asarray(out)
    t2 = time.perf_counter()
    seqs, finished, emitted = [], [], 0
    for row in out.tolist():
      if sampling.eos_id is not None and sampling.eos_id in row:
        seqs.append(row[: row.index(sampling.eos_id)])
        finished.append(True)
      else:
        seqs.append(row)
        finished.append(False)
      emitted += len(seqs[-1]) + finished[-1]
    return SpeculativeGeneration(
      seqs,
      finished,
      t1 - t0,
      t2 - t1,
      emitted,
      steps=int(steps),
      drafted=int(drafted),
      accepted=int(accepted),
    )


def _best_of(fn, reps: int):
  fn()  # compiles
  runs = [fn() for _ in range(max(reps, 1))]
  return min(runs, key=lambda r: r.decode_seconds)


def measure(
  model,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int = 32,
  *,
  sampling: Optional[SamplingConfig] = None,
  reps: int = 2,
  cache_dtype=jnp.bfloat16,
  vocab_limit: Optional[int] = None,
) -> dict:
  """Speculative vs plain decoding of `prompts` on `model` (best of `reps` timed runs each,
  after one compiling run): acceptance rate, tokens per main-model forward, decode tokens/s
  of both (the prefill and the prefill's token excluded), their ratio (`speedup`), and
  `step_cost`, the time of one speculative step in plain decode steps (the speedup at
  acceptance rate a is (1 + a) / step_cost). With greedy sampling (the default), also
  whether both emitted the very same tokens."""
  if sampling is None:
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
  else:
    sampling = dataclasses.replace(sampling, max_new_tokens=max_new_tokens)
  gen = SpeculativeGenerator(model, cache_dtype=cache_dtype, vocab_limit=vocab_limit)
  spec = _best_of(lambda: gen.generate(prompts, sampling), reps)
  plain = _best_of(lambda: gen.plain_generate(prompts, sampling), reps)
  decode_tokens = lambda r: sum(len(t) + f for t, f in zip(r.tokens, r.finished)) - len(prompts)
  spec_tps = decode_tokens(spec) / max(spec.decode_seconds, 1e-9)
  plain_tps = decode_tokens(plain) / max(plain.decode_seconds, 1e-9)
  plain_steps = plain.new_tokens // len(prompts) - 1  # loop iterations after the prefill
  # What one speculative step (2-token main forward + the MTP layer) costs in plain steps:
  # the speedup at acceptance rate a is (1 + a) / step_cost.
  step_cost = (spec.decode_seconds / max(spec.steps, 1)) / max(
    plain.decode_seconds / max(plain_steps, 1), 1e-9
  )
  result = {
    "batch": len(prompts),
    "max_new_tokens": max_new_tokens,
    "acceptance_rate": spec.acceptance_rate,
    "tokens_per_forward": spec.tokens_per_forward,
    "main_forwards": spec.steps + 1,  # the prefill emits the first token
    "plain_main_forwards": plain_steps + 1,
    "speculative_tokens_per_s": spec_tps,
    "plain_tokens_per_s": plain_tps,
    "speedup": spec_tps / max(plain_tps, 1e-9),
    "step_cost": step_cost,
  }
  if sampling.temperature == 0.0:
    result["identical_to_plain"] = spec.tokens == plain.tokens
  return result
