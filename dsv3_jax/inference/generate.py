"""Compiled autoregressive generation over the MLA latent cache.

One jitted prefill runs the (right-padded) prompts through the model and fills the latent
cache; one jitted `lax.while_loop` then decodes token by token with absorbed attention, each
sequence at its own position, until every sequence has emitted EOS or `max_new_tokens`.
Right padding is safe: a padded slot at position p is overwritten by the token generated
for p before any query at position >= p reads it.

Sampling (as DeepSeek-V3's generate code does): temperature 0 is greedy argmax; otherwise
logits / T, optionally restricted to the top-k and to the top-p nucleus, sampled with
`jax.random.categorical`.
"""

import dataclasses
import math
import time
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import model as model_lib
from dsv3_jax.layers.mla import cache_bytes_per_token


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 32
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = no top-k filter
  top_p: float = 1.0  # 1 = no nucleus filter
  eos_id: Optional[int] = None  # stop a sequence when it emits this id
  seed: int = 0

  def validate(self) -> "SamplingConfig":
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    return self


@dataclasses.dataclass
class Generation:
  tokens: list  # per sequence: generated ids, EOS excluded
  finished: list  # per sequence: True if it stopped at EOS
  prefill_seconds: float
  decode_seconds: float
  new_tokens: int  # total generated tokens over the batch (EOS included)


def sample(
  logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
  """Next token ids [B] from float32 logits; the filters are static Python numbers."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits_BxV, temperature, top_k, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def filter_logits(logits_BxV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """The logits `sample` draws from at temperature > 0: scaled by 1/T, tokens outside the
  top-k and the top-p nucleus set to -inf (their softmax is the sampling distribution)."""
  logits = logits_BxV.astype(jnp.float32) / max(temperature, 1e-5)
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it
    # is < top_p.
    keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _bucket(n: int, multiple: int = 16) -> int:
  return -(-n // multiple) * multiple


class Generator:
  """Holds the split model and caches compiled prefill/decode functions per shape."""

  def __init__(
    self,
    model,
    cache_dtype=jnp.bfloat16,
    vocab_limit: Optional[int] = None,
    routed=None,
    microbatches: int = 1,
    batch_shards: int = 1,
    unstack: bool = True,
  ):
    """`vocab_limit`: only ids below it are ever generated (the tokenizer's real vocabulary
    when the model's embedding table is padded beyond it). `routed`: the MoE layers'
    routed-expert function (a sharding plan's `routed` for expert parallelism; None = every
    expert on one device). `microbatches=2`: prefill and decode run every block on two
    halves of the batch that do not wait for each other (two-micro-batch overlap, report
    §3.4), each of `batch_shards` batch shards split in two; the batch is padded to a
    multiple of 2 x batch_shards. `unstack`: run on per-layer copies of the stacked weights
    (`model.unstack_layers`), so each decode step reads the weights once instead of copying
    every layer's slice first; False keeps the scanned stacks (one more copy of the weights
    is not affordable, or compile time matters more)."""
    self.cfg = model.cfg
    self.vocab_limit = vocab_limit
    self.routed = routed
    self.microbatches, self.batch_shards = microbatches, batch_shards
    self._run = dict(routed=routed, microbatches=microbatches, batch_shards=batch_shards)
    self.graphdef, self.state = nnx.split(model_lib.unstack_layers(model) if unstack else model)
    self.cache_dtype = jnp.dtype(cache_dtype)
    # Only what shapes the program is static (filters, length); seed and EOS are traced, so a
    # new seed or EOS id reuses the compiled functions.
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("filters",))
    self._decode = jax.jit(self._decode_fn, static_argnames=("filters", "max_new_tokens"))

  def _limit(self, logits_BxV):
    if self.vocab_limit is None or self.vocab_limit >= logits_BxV.shape[-1]:
      return logits_BxV
    valid = jnp.arange(logits_BxV.shape[-1]) < self.vocab_limit
    return jnp.where(valid[None, :], logits_BxV, -jnp.inf)

  def cache_bytes_per_token(self) -> int:
    """Latent cache bytes per token over all layers (MTP excluded)."""
    return cache_bytes_per_token(self.cfg, self.cache_dtype) * self.cfg.num_hidden_layers

  def _prefill_fn(self, state, tokens_BxL, lengths_B, cache, key, filters):
    model = nnx.merge(self.graphdef, state)
    out = model.forward(
      tokens_BxL, cache=cache, absorb=False, logits_at_B=lengths_B - 1, **self._run
    )
    last_BxV = out.logits_BxLxV[:, 0]
    first = sample(self._limit(last_BxV), key, *filters)
    return first, out.cache

  def _decode_fn(self, state, cache, first_B, lengths_B, key, eos, filters, max_new_tokens):
    model = nnx.merge(self.graphdef, state)
    b = first_B.shape[0]
    n = max_new_tokens
    out_BxN = jnp.zeros((b, n), jnp.int32).at[:, 0].set(first_B)
    done = first_B == eos

    def cond(carry):
      i, _, _, _, done, _ = carry
      return (i < n) & ~jnp.all(done)

    def body(carry):
      i, cache, out, pos, done, key = carry
      key, sub = jax.random.split(key)
      prev = out[:, i - 1]
      res = model.forward(
        prev[:, None], positions_BxL=pos[:, None], cache=cache, absorb=True, **self._run
      )
      nxt = sample(self._limit(res.logits_BxLxV[:, 0]), sub, *filters)
      nxt = jnp.where(done, jnp.maximum(eos, 0), nxt)
      return (i + 1, res.cache, out.at[:, i].set(nxt), pos + 1, done | (nxt == eos), key)

    carry = (jnp.int32(1), cache, out_BxN, lengths_B.astype(jnp.int32), done, key)
    i, _, out_BxN, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return out_BxN, i

  def validate_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    if len(prompts) == 0:
      raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise ValueError(f"prompt {i} is empty: give at least one token")
      bad = [t for t in p if not 0 <= int(t) < self.cfg.vocab_size]
      if bad:
        raise ValueError(
          f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {self.cfg.vocab_size})"
        )
      if len(p) + max_new_tokens > self.cfg.max_position_embeddings:
        raise ValueError(
          f"prompt {i}: {len(p)} tokens + max_new_tokens={max_new_tokens} "
          f"exceeds the model's context of {self.cfg.max_position_embeddings}"
        )

  def prepare(
    self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, batch_multiple: int = 1
  ) -> "Prepared":
    """Validated, right-padded prompts and the run's keys and filters. `batch_multiple`: the
    batch is padded (with copies of the first prompt, dropped afterwards) to a multiple of it,
    e.g. the batch shards of an expert-parallel mesh."""
    sampling.validate()
    self.validate_prompts(prompts, sampling.max_new_tokens)
    n = len(prompts)
    if self.microbatches > 1:
      batch_multiple = math.lcm(batch_multiple, self.microbatches * self.batch_shards)
    rows = list(prompts) + [prompts[0]] * (-n % batch_multiple)
    lengths = np.array([len(p) for p in rows], np.int32)
    width = min(_bucket(int(lengths.max())), self.cfg.max_position_embeddings)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, p in enumerate(rows):
      tokens[i, : len(p)] = p
    total = min(_bucket(width + sampling.max_new_tokens), self.cfg.max_position_embeddings)
    key_prefill, key_decode = jax.random.split(jax.random.key(sampling.seed))
    filters = (sampling.temperature, sampling.top_k, sampling.top_p)
    return Prepared(tokens, lengths, total, key_prefill, key_decode, filters, n, sampling)

  def prefill(self, prep: "Prepared", cache):
    """(first new token per row, the filled latent cache)."""
    return self._prefill(
      self.state,
      jnp.asarray(prep.tokens),
      jnp.asarray(prep.lengths),
      cache,
      prep.key_prefill,
      filters=prep.filters,
    )

  def decode(self, prep: "Prepared", cache, first):
    """(generated ids [rows, max_new_tokens], the number of steps taken)."""
    eos = prep.sampling.eos_id
    return self._decode(
      self.state,
      cache,
      first,
      jnp.asarray(prep.lengths),
      prep.key_decode,
      jnp.int32(-1 if eos is None else eos),
      filters=prep.filters,
      max_new_tokens=prep.sampling.max_new_tokens,
    )

  @staticmethod
  def collect(prep: "Prepared", out, steps) -> tuple[list, list]:
    """Per prompt: the generated ids up to EOS (excluded), and whether EOS came."""
    eos_id = prep.sampling.eos_id
    seqs, finished = [], []
    for row in np.asarray(out)[: prep.n, : int(steps)]:
      row = row.tolist()
      if eos_id is not None and eos_id in row:
        seqs.append(row[: row.index(eos_id)])
        finished.append(True)
      else:
        seqs.append(row)
        finished.append(False)
    return seqs, finished

  def generate(
    self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig()
  ) -> Generation:
    prep = self.prepare(prompts, sampling, self.batch_shards)
    model = nnx.merge(self.graphdef, self.state)
    cache = model.init_cache(len(prep.tokens), prep.total, self.cache_dtype)
    t0 = time.perf_counter()
    first, cache = self.prefill(prep, cache)
    first.block_until_ready()
    t1 = time.perf_counter()
    out, steps = self.decode(prep, cache, first)
    out = np.asarray(out)
    t2 = time.perf_counter()
    seqs, finished = self.collect(prep, out, steps)
    return Generation(seqs, finished, t1 - t0, t2 - t1, int(steps) * len(prompts))


class Prepared(NamedTuple):
  tokens: np.ndarray  # int32 [rows, width], right-padded prompts
  lengths: np.ndarray  # int32 [rows]
  total: int  # cache positions: the padded width plus max_new_tokens, rounded up
  key_prefill: jax.Array
  key_decode: jax.Array
  filters: tuple  # (temperature, top_k, top_p)
  n: int  # the caller's prompts (rows beyond are padding)
  sampling: SamplingConfig


def generate_text(
  model, tokenizer, prompts: Sequence[str], sampling: SamplingConfig = SamplingConfig(), **kw
) -> list:
  """Convenience: strings in, strings out (BOS-less byte or HF tokenizer)."""
  kw.setdefault("vocab_limit", tokenizer.vocab_size)
  gen = Generator(model, **kw)
  if sampling.eos_id is None:
    sampling = dataclasses.replace(sampling, eos_id=tokenizer.eos_id)
  result = gen.generate([tokenizer.encode(p) for p in prompts], sampling)
  return [tokenizer.decode(t) for t in result.tokens]
