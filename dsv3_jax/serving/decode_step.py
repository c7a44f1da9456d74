"""The compiled programs behind the serving engine: prefill, insert, release, decode step.

The engine (`serving/engine.py`) owns a fixed pool of S cache slots: one `ModelCache` of
batch S and length T (the longest context served), plus per-slot state as arrays [S]: the
token to feed next and its position, whether the slot is in use, and the slot's sampling
settings and PRNG key. Everything here is jitted once per shape:

  prefill  one request, its prompt right-padded to a static length bucket (so only a few
           programs compile), through the model with a fresh latent cache of that length;
           samples the first new token (one program per bucket);
  insert   writes the prefilled latent rows into slot `slot` of the pool (`dynamic_update_slice`
           at a traced slot index: one program per bucket, whatever the slot) and sets the
           slot's state; the pool is donated, so nothing is copied;
  release  marks a slot free (its stale rows stay: a later request overwrites them, and
           positions beyond a request's own are masked until it writes them);
  step     ONE decode step of every slot: the absorbed-MLA forward of [S, 1] tokens at their
           own positions over the latent cache, then per-slot sampling
           (`serving/sampling.py`). Idle slots compute too (static shapes) and are ignored.

The pieces mirror `inference/generate.py` (prefill naive, decode absorbed, the same key
split and sampling), so a request gets the tokens `Generator` gives it alone.

`DecodeProgram` is the engine's extension point: another decoding scheme (MTP
self-speculation, DeepSeek-V3 report arXiv 2412.19437 §2.2 / §5.4.3) subclasses it or
implements the same methods, and a step may emit up to `tokens_per_step` tokens per slot
(`StepOutput.counts_S` says how many).
"""

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import model as model_lib
from dsv3_jax.serving.sampling import sample_rows


class SlotState(NamedTuple):
  tokens_S: jax.Array  # int32: the token each slot feeds next (its last sampled one)
  positions_S: jax.Array  # int32: that token's position
  active_S: jax.Array  # bool
  temperature_S: jax.Array  # float32, 0 = greedy
  top_k_S: jax.Array  # int32, 0 = off
  top_p_S: jax.Array  # float32, 1 = off
  keys_S: jax.Array  # typed PRNG keys


class Carry(NamedTuple):
  """Everything a step reads and writes: the slot pool's cache and the slots' state."""

  cache: object  # model.ModelCache of batch S, length T
  slots: SlotState


class StepOutput(NamedTuple):
  tokens_SxN: jax.Array  # int32: tokens each slot emitted this step, the first counts_S valid
  counts_S: jax.Array  # int32
  load_LxE: jax.Array  # routed-token copies per expert per MoE layer (EPLB statistics)


class Admitted(NamedTuple):
  carry: Carry
  first: jax.Array  # int32 scalar: the request's first new token, sampled at prefill


def default_buckets(max_len: int, smallest: int = 16) -> tuple:
  """Prompt paddings: powers of two from `smallest`, the last one `max_len`."""
  out, b = [], smallest
  while b < max_len:
    out.append(b)
    b *= 2
  return tuple(out) + (max_len,)


class DecodeProgram:
  """Plain decoding: one token per slot per step.

  Args:
    model: a `Transformer`.
    n_slots: S, requests decoded together.
    max_len: T, cache positions per slot (prompt + new tokens of any request fit in it).
    cache_dtype: latent cache dtype (bfloat16 by default, as `Generator`).
    vocab_limit: only ids below it are sampled (the tokenizer's vocabulary when the
      embedding table is padded).
    buckets: prompt padding lengths (ascending, the last >= the longest prompt served).
  """

  tokens_per_step = 1

  def __init__(
    self,
    model,
    n_slots: int,
    max_len: int,
    cache_dtype=jnp.bfloat16,
    vocab_limit: Optional[int] = None,
    buckets: Optional[Sequence[int]] = None,
  ):
    cfg = model.cfg
    if n_slots < 1:
      raise ValueError(f"n_slots must be >= 1, got {n_slots}")
    if not 1 < max_len <= cfg.max_position_embeddings:
      raise ValueError(
        f"max_len must be in (1, {cfg.max_position_embeddings}] (the model's "
        f"context), got {max_len}"
      )
    self.cfg = cfg
    self.n_slots, self.max_len = n_slots, max_len
    self.cache_dtype = jnp.dtype(cache_dtype)
    self.vocab_limit = vocab_limit
    self.buckets = tuple(
      sorted(set(min(int(b), max_len) for b in (buckets or default_buckets(max_len))))
    )
    if self.buckets[-1] < max_len - 1:
      raise ValueError(
        f"buckets {self.buckets} must reach max_len - 1 = {max_len - 1} (the longest prompt)"
      )
    # Per-layer weights: each decode step reads them in place (see `model.unstack_layers`).
    self.graphdef, self.state = nnx.split(model_lib.unstack_layers(model))
    self._prefill = jax.jit(self._prefill_fn)
    self._insert = jax.jit(self._insert_fn, donate_argnums=0)
    self._release = jax.jit(self._release_fn, donate_argnums=0)
    self._step = jax.jit(self._step_fn, donate_argnums=1)

  # ------------------------------------------------------------------ helpers
  def _model(self, state):
    return nnx.merge(self.graphdef, state)

  def _limit(self, logits_BxV):
    if self.vocab_limit is None or self.vocab_limit >= logits_BxV.shape[-1]:
      return logits_BxV
    valid = jnp.arange(logits_BxV.shape[-1]) < self.vocab_limit
    return jnp.where(valid[None, :], logits_BxV, -jnp.inf)

  def bucket(self, length: int) -> int:
    for b in self.buckets:
      if b >= length:
        return b
    raise ValueError(
      f"a prompt of {length} tokens is longer than the largest bucket {self.buckets[-1]}"
    )

  # ------------------------------------------------------------------ compiled pieces
  def _prefill_fn(self, state, tokens_1xL, length, seed, temperature, top_k, top_p):
    model = self._model(state)
    cache = model.init_cache(1, tokens_1xL.shape[1], self.cache_dtype)
    out = model.forward(tokens_1xL, cache=cache, absorb=False, logits_at_B=(length - 1)[None])
    last_1xV = out.logits_BxLxV[0]
    key_prefill, key_decode = jax.random.split(jax.random.key(seed))
    first = sample_rows(
      self._limit(last_1xV), key_prefill[None], temperature[None], top_k[None], top_p[None]
    )[0]
    return first, key_decode, out.cache

  @staticmethod
  def _write_slot(pool, one, slot):
    """Rows of a batch-1 cache (any leading layer axes, then [1, L, C]) into slot `slot`."""
    lead = pool.ndim - 3
    return jax.lax.dynamic_update_slice(pool, one.astype(pool.dtype), (0,) * lead + (slot, 0, 0))

  @staticmethod
  def _set_slot(s: SlotState, slot, first, key, length, temperature, top_k, top_p) -> SlotState:
    return SlotState(
      s.tokens_S.at[slot].set(first),
      s.positions_S.at[slot].set(length),
      s.active_S.at[slot].set(True),
      s.temperature_S.at[slot].set(temperature),
      s.top_k_S.at[slot].set(top_k),
      s.top_p_S.at[slot].set(top_p),
      s.keys_S.at[slot].set(key),
    )

  def _insert_fn(self, carry, slot, length, temperature, top_k, top_p, first, key, cache_1):
    cache = jax.tree.map(lambda pool, one: self._write_slot(pool, one, slot), carry.cache, cache_1)
    slots = self._set_slot(carry.slots, slot, first, key, length, temperature, top_k, top_p)
    return Carry(cache, slots)

  def _release_fn(self, carry, slot):
    s = carry.slots
    return carry._replace(slots=s._replace(active_S=s.active_S.at[slot].set(False)))

  def _step_fn(self, state, carry):
    model = self._model(state)
    s = carry.slots
    split_Sx2 = jax.vmap(jax.random.split)(s.keys_S)
    keys, subkeys = split_Sx2[:, 0], split_Sx2[:, 1]
    res = model.forward(
      s.tokens_S[:, None], positions_BxL=s.positions_S[:, None], cache=carry.cache, absorb=True
    )
    nxt_S = sample_rows(
      self._limit(res.logits_BxLxV[:, 0]), subkeys, s.temperature_S, s.top_k_S, s.top_p_S
    )
    nxt_S = jnp.where(s.active_S, nxt_S, s.tokens_S)
    slots = s._replace(
      tokens_S=nxt_S,
      positions_S=s.positions_S + s.active_S.astype(jnp.int32),
      keys_S=jnp.where(s.active_S, keys, s.keys_S),
    )
    out = StepOutput(nxt_S[:, None], s.active_S.astype(jnp.int32), res.load_LxE)
    return Carry(res.cache, slots), out

  # ------------------------------------------------------------------ what the engine calls
  def init(self) -> Carry:
    """An empty pool: every slot free."""
    s = self.n_slots
    cache = self._model(self.state).init_cache(s, self.max_len, self.cache_dtype)
    keys = jax.random.split(jax.random.key(0), s)
    slots = SlotState(
      jnp.zeros((s,), jnp.int32),
      jnp.zeros((s,), jnp.int32),
      jnp.zeros((s,), bool),
      jnp.zeros((s,), jnp.float32),
      jnp.zeros((s,), jnp.int32),
      jnp.ones((s,), jnp.float32),
      keys,
    )
    return Carry(cache, slots)

  def admit(
    self,
    carry: Carry,
    prompt: Sequence[int],
    slot: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
  ) -> Admitted:
    """Prefills one (validated) prompt and inserts it into free slot `slot`."""
    length = len(prompt)
    tokens = np.zeros((1, self.bucket(length)), np.int32)
    tokens[0, :length] = prompt
    settings = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    # The prefill returns (first token, ...what the insert needs of this request).
    prefilled = self._prefill(
      self.state, jnp.asarray(tokens), jnp.int32(length), jnp.uint32(seed), *settings
    )
    carry = self._insert(carry, jnp.int32(slot), jnp.int32(length), *settings, *prefilled)
    return Admitted(carry, prefilled[0])

  def release(self, carry: Carry, slot: int) -> Carry:
    return self._release(carry, jnp.int32(slot))

  def step(self, carry: Carry) -> tuple[Carry, StepOutput]:
    return self._step(self.state, carry)
