"""Auxiliary-loss-free load balancing (REFERENCE §3).

After every step each MoE layer's bias moves by `gamma * sign(mean_load - load_i)`: under-
loaded experts become more attractive, overloaded ones less. Loads are counts over the whole
global batch — inside `jit` over a mesh they are global by construction, and sharded code
must `psum` them before calling this — so every rank applies the same update.
MaxVio_batch = (max_i load_i - mean load) / mean load measures the imbalance.
"""

import jax
import jax.numpy as jnp


def bias_update(bias_xE: jax.Array, load_xE: jax.Array, gamma: float) -> jax.Array:
  mean = jnp.mean(load_xE, axis=-1, keepdims=True)
  return bias_xE + gamma * jnp.sign(mean - load_xE)


def max_violation(load_xE: jax.Array) -> jax.Array:
  mean = jnp.mean(load_xE, axis=-1)
  return (jnp.max(load_xE, axis=-1) - mean) / jnp.maximum(mean, 1e-9)
