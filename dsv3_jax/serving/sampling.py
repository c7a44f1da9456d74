"""Per-slot sampling: every row of a batch with its own temperature, top-k, top-p and key.

A serving batch mixes requests with different settings, so the settings are arrays
[S] (traced: a new mix reuses the compiled step) rather than the static Python numbers of
`inference/generate.py`'s `sample`. Row by row the arithmetic is that function's: temperature
0 is the argmax; otherwise logits / T, then the top-k cut, then the top-p nucleus, then
`jax.random.categorical` on the row's key over a [1, V] batch, so a request served in any slot
draws the very tokens `Generator` draws for it alone with the same seed.
"""

import jax
import jax.numpy as jnp


def _filtered_row(
  logits_V: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
  """logits / T with the top-k and top-p filters applied where they are on (k > 0, p < 1)."""
  logits_V = logits_V.astype(jnp.float32) / jnp.maximum(temperature, 1e-5)
  v = logits_V.shape[-1]
  sorted_V = jnp.sort(logits_V)[::-1]
  kth = sorted_V[jnp.clip(top_k - 1, 0, v - 1)]
  logits_V = jnp.where((top_k > 0) & (logits_V < kth), -jnp.inf, logits_V)
  # The nucleus of what survived top-k: a token stays if the mass before it is < top_p.
  sorted_V = jnp.sort(logits_V)[::-1]
  probs_V = jax.nn.softmax(sorted_V)
  keep_V = (jnp.cumsum(probs_V) - probs_V) < top_p
  threshold = jnp.min(jnp.where(keep_V, sorted_V, jnp.inf))
  return jnp.where((top_p < 1.0) & (logits_V < threshold), -jnp.inf, logits_V)


def _scaled_row(logits_V, temperature, top_k, top_p):
  del top_k, top_p
  return logits_V.astype(jnp.float32) / jnp.maximum(temperature, 1e-5)


def filtered_rows(
  logits_SxV: jax.Array, temperature_S: jax.Array, top_k_S: jax.Array, top_p_S: jax.Array
) -> jax.Array:
  """The logits each row draws from at temperature > 0 (their softmax is its sampling law):
  scaled by 1/T, tokens outside the row's top-k and top-p nucleus at -inf. The sorts the
  filters need run only when some row asks for a filter."""
  filtering = jnp.any((top_k_S > 0) | (top_p_S < 1.0))
  return jax.lax.cond(
    filtering,
    jax.vmap(_filtered_row),
    jax.vmap(_scaled_row),
    logits_SxV,
    temperature_S,
    top_k_S,
    top_p_S,
  )


def sample_rows(
  logits_SxV: jax.Array,
  keys_S: jax.Array,
  temperature_S: jax.Array,
  top_k_S: jax.Array,
  top_p_S: jax.Array,
) -> jax.Array:
  """Next token ids [S] int32 from float32 logits, one setting and one typed key per row."""
  scaled_SxV = filtered_rows(logits_SxV, temperature_S, top_k_S, top_p_S)
  drawn_S = jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(
    keys_S, scaled_SxV
  )
  greedy_S = jnp.argmax(logits_SxV, axis=-1)
  return jnp.where(temperature_S == 0.0, greedy_S, drawn_S).astype(jnp.int32)
