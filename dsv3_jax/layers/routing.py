"""DeepSeekMoE routing and load balancing (arXiv 2412.19437 §2.1.2, eqs. 12-16 and 17-20).

Routing, in float32:
  s = sigmoid(x W_gate)                    affinities                       [N, E]
  choice = s + b                           b: per-expert bias, selection only (eq. 16)
  group score = sum of the top-2 `choice` in each of n_group groups; keep topk_group groups
  (the rest masked to -inf, as DeepSeek's own code does; HF masks to 0, which differs only
  when fewer than k positive scores remain); top-k experts among the kept ones;
  weights = s of the chosen experts, normalised to sum 1, times routed_scaling_factor.

Balancing, outside the gradient (§2.1.2, "Auxiliary-Loss-Free Load Balancing"): after each
step every MoE layer's bias moves by `gamma * sign(mean_load - load_i)`. Loads are counts over
the whole global batch — inside `jit` over a mesh they are global by construction, and
sharded code must `psum` them first — so every rank applies the same update. The
complementary sequence-wise balance loss (eqs. 17-20) and MaxVio_batch =
(max_i load_i - mean load) / mean load (§4.5.2) complete the set.

Legend: N tokens, D model, E experts, G groups, k experts per token, B sequences, T tokens
per sequence.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig


class RouterBias(nnx.Variable):
  """The aux-loss-free balancing bias: updated from loads, never by the gradient."""


class Routing(NamedTuple):
  experts_Nxk: jax.Array  # int32 chosen experts
  weights_Nxk: jax.Array  # float32 combine weights (sum to routed_scaling_factor if normed)
  scores_NxE: jax.Array  # float32 sigmoid affinities (for the sequence-wise balance loss)


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
  """Complementary sequence-wise balance loss `sum_i f_i P_i` (eqs. 17-20), mean over sequences.

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


def bias_update(bias_xE: jax.Array, load_xE: jax.Array, gamma: float) -> jax.Array:
  """`b_i += gamma * sign(mean_load - load_i)`: under-loaded experts become more attractive."""
  mean = jnp.mean(load_xE, axis=-1, keepdims=True)
  return bias_xE + gamma * jnp.sign(mean - load_xE)


def update_biases(biases, loads_LxE: jax.Array, gamma: float):
  """The bias update over a tree of `RouterBias` values (stacked [n, E] or single [E]).

  The leaves are taken in tree order — the main model's stacked MoE layers, then each MTP
  depth — which is the order the model reports its loads in (`Output.load_LxE`, then MTP).
  """
  leaves, treedef = jax.tree.flatten(biases)
  new, i = [], 0
  for b in leaves:
    rows = b.shape[0] if b.ndim == 2 else 1
    load = loads_LxE[i : i + rows]
    new.append(bias_update(b, load if b.ndim == 2 else load[0], gamma))
    i += rows
  if i != loads_LxE.shape[0]:
    raise ValueError(f"bias update: {loads_LxE.shape[0]} rows of loads for {i} MoE layers")
  return jax.tree.unflatten(treedef, new)


def to_replicas(
  experts_Nxk: jax.Array, slots_ExM: jax.Array, count_E: jax.Array, offset=0
) -> jax.Array:
  """Redundant experts (EPLB, §3.4): each routed copy goes to one replica of its expert.

  `slots_ExM` lists each logical expert's physical slots (padded with -1), `count_E` how many
  it has; copy j of token n takes replica (n + offset) mod count, so an expert's tokens spread
  evenly over its replicas. Returns physical slot ids [N, k], indices into the physical expert
  weights [R, ...]."""
  n = experts_Nxk.shape[0]
  replica_Nxk = (jnp.arange(n, dtype=jnp.int32)[:, None] + offset) % count_E[experts_Nxk]
  return slots_ExM[experts_Nxk, replica_Nxk].astype(jnp.int32)


def max_violation(load_xE: jax.Array) -> jax.Array:
  """MaxVio = (max_i load_i - mean load) / mean load, per row (§4.5.2)."""
  mean = jnp.mean(load_xE, axis=-1)
  return (jnp.max(load_xE, axis=-1) - mean) / jnp.maximum(mean, 1e-9)
