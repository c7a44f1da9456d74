"""The engine's decode programs with MTP self-speculation: up to 2 tokens per slot per step.

DeepSeek-V3 report (arXiv 2412.19437) §2.2 trains one MTP module; §5.4.3 reuses it at
inference to draft the token after next, accepted 85-90% of the time. This is the serving
engine's version of `serving/speculative.py` (whose `mtp_hidden` and `speculative_accept` it
uses): the same scheme, but as a `DecodeProgram` (`serving/decode_step.py`) over the slot
pool, every slot with its own position, settings and key, so requests join and leave between
steps.

  prefill  as the plain program (the first token), then the MTP module over the prompt (h_i,
           emb(t_{i+1}), the token after the prompt being the first one) into its own
           one-layer latent cache, and the first draft d for the position after it;
  insert   the main and MTP latent rows into the slot, and the slot's draft and its draft
           distribution q;
  step     ONE main forward of [last, d] at [pos, pos+1] for every slot: greedy slots accept
           d iff it is the argmax at pos (so they emit exactly plain greedy's tokens); sampled
           slots accept with min(1, p(d) / q(d)) and otherwise resample from norm(max(p - q, 0))
           (`speculative_accept`: the emitted token has exactly p's law). On acceptance a bonus
           token from pos+1 follows: 2 tokens for one main forward, else 1. The MTP module then
           runs on the 2 positions and drafts from the last accepted one. A rejected draft
           leaves a stale entry at pos+1 in both caches, rewritten by the next step before any
           query reads it.

`StepOutput.counts_S` is 1 + accepted; the engine streams that many tokens of each slot.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.layers.mla import init_latent_cache
from dsv3_jax.serving.decode_step import Carry, DecodeProgram, SlotState, StepOutput
from dsv3_jax.serving.sampling import filtered_rows, sample_rows


class SpeculativeCarry(NamedTuple):
  cache: object  # model.ModelCache of batch S, length T
  mtp_cache: object  # LatentCache [S, T, C] of the MTP module's attention
  slots: SlotState
  draft_S: jax.Array  # int32: each slot's draft for the position after its last token
  q_SxV: jax.Array  # float32: the law the draft was drawn from (sampled slots)


def _speculative():
  from dsv3_jax.serving import speculative

  return speculative


class SpeculativeProgram(DecodeProgram):
  """`DecodeProgram` whose step verifies one MTP draft per slot (same arguments)."""

  tokens_per_step = 2

  def __init__(self, model, *args, **kwargs):
    if len(getattr(model, "mtp", ())) == 0:
      raise ValueError(
        "speculative decoding drafts with the MTP module, and this model has "
        "none (num_nextn_predict_layers=0; load HF checkpoints with mtp=True)"
      )
    super().__init__(model, *args, **kwargs)

  def _laws(self, logits_SxV, s: SlotState):
    """Sampling laws [S, V] of the rows (what `sample_rows` draws from)."""
    return jax.nn.softmax(filtered_rows(logits_SxV, s.temperature_S, s.top_k_S, s.top_p_S), -1)

  def _draft(self, model, h_SxD, key_S, s: SlotState):
    logits = self._limit(model.logits(h_SxD))
    draft = sample_rows(logits, key_S, s.temperature_S, s.top_k_S, s.top_p_S)
    return draft, self._laws(logits, s)

  # ------------------------------------------------------------------ compiled pieces
  def _prefill_fn(self, state, tokens_1xL, length, seed, temperature, top_k, top_p):
    mtp_hidden = _speculative().mtp_hidden
    model = self._model(state)
    width = tokens_1xL.shape[1]
    cache = model.init_cache(1, width, self.cache_dtype)
    out = model.forward(tokens_1xL, cache=cache, absorb=False)
    last_1xV = jax.lax.dynamic_index_in_dim(out.logits_BxLxV[0], length - 1, keepdims=True)
    key_prefill, key_decode = jax.random.split(jax.random.key(seed))
    key_first, key_draft = jax.random.split(key_prefill)
    one = SlotState(None, None, None, temperature[None], top_k[None], top_p[None], None)
    first = sample_rows(
      self._limit(last_1xV), key_first[None], temperature[None], top_k[None], top_p[None]
    )
    # The MTP input at position i is t_{i+1}: the prompt shifted left, the first token after it.
    nxt = jnp.concatenate([tokens_1xL[:, 1:], tokens_1xL[:, -1:]], axis=1)
    nxt = jax.lax.dynamic_update_slice(nxt, first[:, None], (0, length - 1))
    positions = jnp.arange(width, dtype=jnp.int32)[None]
    mtp_cache = init_latent_cache(self.cfg, 1, width, self.cache_dtype)
    h_mtp, mtp_cache = mtp_hidden(model, out.hidden_BxLxD, nxt, positions, mtp_cache, absorb=False)
    h_1xD = jax.lax.dynamic_index_in_dim(h_mtp[0], length - 1, keepdims=True)
    draft, q = self._draft(model, h_1xD, key_draft[None], one)
    return first[0], key_decode, out.cache, mtp_cache, draft[0], q[0]

  def _insert_fn(
    self,
    carry,
    slot,
    length,
    temperature,
    top_k,
    top_p,
    first,
    key,
    cache_1,
    mtp_cache_1,
    draft,
    q_V,
  ):
    cache = jax.tree.map(lambda pool, one: self._write_slot(pool, one, slot), carry.cache, cache_1)
    mtp_cache = jax.tree.map(
      lambda pool, one: self._write_slot(pool, one, slot), carry.mtp_cache, mtp_cache_1
    )
    slots = self._set_slot(carry.slots, slot, first, key, length, temperature, top_k, top_p)
    return SpeculativeCarry(
      cache, mtp_cache, slots, carry.draft_S.at[slot].set(draft), carry.q_SxV.at[slot].set(q_V)
    )

  def _step_fn(self, state, carry):
    spec = _speculative()
    model = self._model(state)
    s = carry.slots
    keys_Sx4 = jax.vmap(lambda k: jax.random.split(k, 4))(s.keys_S)
    new_keys, k_verify, k_bonus, k_draft = (keys_Sx4[:, i] for i in range(4))
    pos, last, draft = s.positions_S, s.tokens_S, carry.draft_S
    positions_Sx2 = jnp.stack([pos, pos + 1], axis=1)
    res = model.forward(
      jnp.stack([last, draft], axis=1), positions_BxL=positions_Sx2, cache=carry.cache, absorb=True
    )
    logits0 = self._limit(res.logits_BxLxV[:, 0])
    logits1 = self._limit(res.logits_BxLxV[:, 1])
    # Greedy slots: plain greedy's token; sampled slots: the speculative-sampling rule.
    greedy_t1 = jnp.argmax(logits0, axis=-1).astype(jnp.int32)
    accept_one = lambda p, q, d, k: jax.tree.map(
      lambda x: x[0], spec.speculative_accept(p[None], q[None], d[None], k)
    )
    sampled_t1, sampled_acc = jax.vmap(accept_one)(
      self._laws(logits0, s), carry.q_SxV, draft, k_verify
    )
    greedy = s.temperature_S == 0.0
    t1 = jnp.where(greedy, greedy_t1, sampled_t1)
    accepted = jnp.where(greedy, greedy_t1 == draft, sampled_acc)
    t2 = sample_rows(logits1, k_bonus, s.temperature_S, s.top_k_S, s.top_p_S)
    h_mtp, mtp_cache = spec.mtp_hidden(
      model,
      res.hidden_BxLxD,
      jnp.stack([t1, t2], axis=1),
      positions_Sx2,
      carry.mtp_cache,
      absorb=True,
    )
    h_SxD = jnp.take_along_axis(h_mtp, accepted.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
    new_draft, new_q = self._draft(model, h_SxD, k_draft, s)
    active = s.active_S
    counts = jnp.where(active, 1 + accepted.astype(jnp.int32), 0)
    slots = s._replace(
      tokens_S=jnp.where(active, jnp.where(accepted, t2, t1), last),
      positions_S=pos + counts,
      keys_S=jnp.where(active, new_keys, s.keys_S),
    )
    out = StepOutput(jnp.stack([t1, t2], axis=1), counts, res.load_LxE)
    return SpeculativeCarry(
      res.cache,
      mtp_cache,
      slots,
      jnp.where(active, new_draft, draft),
      jnp.where(active[:, None], new_q, carry.q_SxV),
    ), out

  # ------------------------------------------------------------------ what the engine calls
  def init(self) -> SpeculativeCarry:
    base: Carry = super().init()
    s = self.n_slots
    mtp_cache = init_latent_cache(self.cfg, s, self.max_len, self.cache_dtype)
    return SpeculativeCarry(
      base.cache,
      mtp_cache,
      base.slots,
      jnp.zeros((s,), jnp.int32),
      jnp.zeros((s, self.cfg.vocab_size), jnp.float32),
    )
