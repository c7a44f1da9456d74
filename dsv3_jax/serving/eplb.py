"""Redundant experts for deployment: the expert-parallel load balancer (EPLB).

DeepSeek-V3 report (arXiv 2412.19437) §3.4 (inference and deployment). Under expert
parallelism every GPU hosts a slice of the routed experts, so the GPU holding the popular
experts sets the pace of the whole all-to-all. §3.4.1 (prefilling) introduces *redundant
experts*: high-load experts, detected from statistics collected while serving and re-chosen
periodically (e.g. every 10 minutes), are duplicated, and experts are rearranged among the GPUs
of a node from the observed loads, without adding cross-node all-to-all traffic. The prefilling
unit (4 nodes, 32 GPUs) hosts 32 redundant experts: each GPU keeps its 8 experts plus one.
§3.4.2 (decoding) applies the same idea with one expert per GPU and 64 GPUs that host the
redundant and shared experts.

Placement (`rebalance_experts`) turns per-layer loads [L, E] of the E logical experts into R >= E
physical slots, R / num_gpus per GPU, GPU g holding slots [g * R/num_gpus, (g+1) * R/num_gpus):

  hierarchical policy (num_groups % num_nodes == 0). Every expert group stays on one node, so
  the node-limited routing of §2.1.2 still bounds the nodes a token is sent to:
    1. pack the expert groups onto the nodes, num_groups / num_nodes each, by balanced packing:
       heaviest group first, each into the lightest node that still has room;
    2. replicate inside each node: one slot per expert, then every extra slot goes to the expert
       with the largest load / replica count (the one whose replicas are hottest);
    3. pack the node's replicas, each carrying load / count, onto the node's GPUs by balanced
       packing;
    4. map node-local ids back to global logical and physical ids.
  global policy (otherwise): the same steps with one node and one group.

Ties break towards the lower index (sorting is stable). This reproduces the worked example of
DeepSeek's EPLB release exactly; that release sorts with an unstable sort, so where loads tie
exactly its greedy layout may differ from this one. The outputs are the tables a serving engine
needs: phy2log [L, R] (the logical expert each slot holds), log2phy [L, E, max_count] (the slots
of each expert by replica rank, padded with -1) and logcnt [L, E] (replicas per expert).

At run time the router still selects logical experts (scores, biases, group limits and gate
weights unchanged); `physical_experts` maps each (token, choice) to one replica of its expert
and `replicate_weights` builds the slot-ordered weights, so the layer's output is unchanged.
`LoadWindow` keeps recent load statistics and the rebalancing schedule; `device_loads`,
`imbalance` and `compare_placements` measure max / mean load per GPU before and after;
`loads_from_metrics` reads the per-expert loads a training run logged, `zipf_load` makes skewed
synthetic ones.
"""

import json
import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
  return int(value)


def _check_load(name: str, load, ndim: int) -> np.ndarray:
  arr = np.asarray(load, dtype=np.float64)
  if arr.ndim != ndim:
    raise ValueError(f"`{name}` must have {ndim} dimensions, got shape {arr.shape}")
  if not np.all(np.isfinite(arr)) or np.any(arr < 0):
    raise ValueError(f"`{name}` must hold finite, non-negative loads")
  return arr


def _balanced_packing(weight_XxN: np.ndarray, num_packs: int) -> Tuple[np.ndarray, np.ndarray]:
  """Splits each row's N items into `num_packs` packs of N / num_packs items, greedily.

  Items go heaviest first into the lightest pack that still has room. Returns the pack of every
  item and its position inside the pack (its arrival order), both [X, N].
  """
  rows, n = weight_XxN.shape
  per_pack = n // num_packs
  if per_pack == 1:  # one item per pack: every assignment is as balanced, keep the order
    pack_XxN = np.broadcast_to(np.arange(n), (rows, n)).copy()
    return pack_XxN, np.zeros((rows, n), np.int64)
  pack_XxN = np.empty((rows, n), np.int64)
  pos_XxN = np.empty((rows, n), np.int64)
  for r in range(rows):
    load_P = np.zeros(num_packs)
    fill_P = np.zeros(num_packs, np.int64)
    for item in np.argsort(-weight_XxN[r], kind="stable"):
      p = int(np.argmin(np.where(fill_P < per_pack, load_P, np.inf)))
      pack_XxN[r, item], pos_XxN[r, item] = p, fill_P[p]
      load_P[p] += weight_XxN[r, item]
      fill_P[p] += 1
  return pack_XxN, pos_XxN


def _replicate(weight_XxM: np.ndarray, num_slots: int):
  """Gives M experts `num_slots` >= M slots: each extra one to the largest load / count.

  Returns slot2exp [X, S] (slots 0..M-1 hold the experts in order), the replica rank of every
  slot [X, S] and the replica count of every expert [X, M].
  """
  rows, m = weight_XxM.shape
  slot2exp_XxS = np.zeros((rows, num_slots), np.int64)
  slot2exp_XxS[:, :m] = np.arange(m)
  rank_XxS = np.zeros((rows, num_slots), np.int64)
  count_XxM = np.ones((rows, m), np.int64)
  row_X = np.arange(rows)
  for s in range(m, num_slots):
    hot_X = np.argmax(weight_XxM / count_XxM, axis=1)
    slot2exp_XxS[:, s] = hot_X
    rank_XxS[:, s] = count_XxM[row_X, hot_X]
    count_XxM[row_X, hot_X] += 1
  return slot2exp_XxS, rank_XxS, count_XxM


def _inverse(perm_XxN: np.ndarray) -> np.ndarray:
  inv_XxN = np.empty_like(perm_XxN)
  np.put_along_axis(
    inv_XxN, perm_XxN, np.broadcast_to(np.arange(perm_XxN.shape[1]), perm_XxN.shape), axis=1
  )
  return inv_XxN


def _place(weight_LxE, num_replicas, num_groups, num_nodes, num_gpus):
  """The hierarchical policy; returns phy2log [L, R], replica ranks [L, R], logcnt [L, E]."""
  num_layers, num_experts = weight_LxE.shape
  group_size = num_experts // num_groups
  experts_per_node = num_experts // num_nodes
  slots_per_node = num_replicas // num_nodes
  slots_per_gpu = num_replicas // num_gpus

  # 1. Groups onto nodes. "Node-major" ids number the experts node by node, a node's groups in
  # their packing order, so node n owns node-major ids [n * E/nodes, (n+1) * E/nodes).
  group_load_LxG = weight_LxE.reshape(num_layers, num_groups, group_size).sum(-1)
  node_LxG, pos_LxG = _balanced_packing(group_load_LxG, num_nodes)
  block_LxG = node_LxG * (num_groups // num_nodes) + pos_LxG
  log2nm_LxE = (block_LxG[:, :, None] * group_size + np.arange(group_size)).reshape(
    num_layers, num_experts
  )
  nm2log_LxE = _inverse(log2nm_LxE)

  # 2. Replicas inside each node; rows are (layer, node) pairs.
  nm_load_XxM = np.take_along_axis(weight_LxE, nm2log_LxE, axis=1).reshape(
    num_layers * num_nodes, experts_per_node
  )
  slot2nm_XxS, rank_XxS, count_XxM = _replicate(nm_load_XxM, slots_per_node)

  # 3. The node's replicas onto its GPUs; a replica's final slot is gpu * per_gpu + position.
  slot_load_XxS = np.take_along_axis(nm_load_XxM / count_XxM, slot2nm_XxS, axis=1)
  gpu_XxS, pos_XxS = _balanced_packing(slot_load_XxS, num_gpus // num_nodes)
  final2slot_XxS = _inverse(gpu_XxS * slots_per_gpu + pos_XxS)

  # 4. Back to global ids.
  local_nm_XxS = np.take_along_axis(slot2nm_XxS, final2slot_XxS, axis=1)
  offset_N = np.arange(num_nodes) * experts_per_node
  nm_LxR = (
    local_nm_XxS.reshape(num_layers, num_nodes, slots_per_node) + offset_N[None, :, None]
  ).reshape(num_layers, num_replicas)
  phy2log_LxR = np.take_along_axis(nm2log_LxE, nm_LxR, axis=1)
  rank_LxR = np.take_along_axis(rank_XxS, final2slot_XxS, axis=1).reshape(num_layers, -1)
  logcnt_LxE = np.take_along_axis(count_XxM.reshape(num_layers, num_experts), log2nm_LxE, axis=1)
  return phy2log_LxR, rank_LxR, logcnt_LxE


def rebalance_experts(
  weight_LxE, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Places `num_replicas` physical experts per layer from the loads `weight_LxE`.

  Args:
    weight_LxE: per-layer load (e.g. tokens routed) of every logical expert, [L, E].
    num_replicas: physical expert slots per layer (R), a multiple of `num_gpus`, >= E.
    num_groups: expert groups of the router (node-limited routing); divides E.
    num_nodes: server nodes (fast intra-node links); divides `num_gpus`.
    num_gpus: GPUs in the expert-parallel group, each hosting R / num_gpus slots.

  Returns:
    phy2log [L, R], log2phy [L, E, max replicas] (-1 padded), logcnt [L, E]; all int64.
  """
  weight_LxE = _check_load("weight_LxE", weight_LxE, 2)
  num_replicas = _positive_int("num_replicas", num_replicas)
  num_groups = _positive_int("num_groups", num_groups)
  num_nodes = _positive_int("num_nodes", num_nodes)
  num_gpus = _positive_int("num_gpus", num_gpus)
  num_layers, num_experts = weight_LxE.shape
  if num_experts == 0:
    raise ValueError("`weight_LxE` must hold at least one expert")
  if num_experts % num_groups:
    raise ValueError(f"`num_groups` = {num_groups} must divide the {num_experts} experts")
  if num_gpus % num_nodes:
    raise ValueError(f"`num_gpus` = {num_gpus} must be a multiple of `num_nodes` = {num_nodes}")
  if num_replicas % num_gpus:
    raise ValueError(
      f"`num_replicas` = {num_replicas} must be a multiple of `num_gpus` = {num_gpus}"
    )
  if num_replicas < num_experts:
    raise ValueError(
      f"`num_replicas` = {num_replicas} must be at least the {num_experts} logical experts"
    )
  if num_groups % num_nodes == 0:
    phy2log_LxR, rank_LxR, logcnt_LxE = _place(
      weight_LxE, num_replicas, num_groups, num_nodes, num_gpus
    )
  else:
    phy2log_LxR, rank_LxR, logcnt_LxE = _place(weight_LxE, num_replicas, 1, 1, num_gpus)
  log2phy_LxExM = np.full((num_layers, num_experts, int(logcnt_LxE.max())), -1, np.int64)
  log2phy_LxExM[np.arange(num_layers)[:, None], phy2log_LxR, rank_LxR] = np.arange(num_replicas)
  return phy2log_LxR, log2phy_LxExM, logcnt_LxE


# ---------------------------------------------------------------------------------------------
# Run time: logical expert choices -> physical slots (jax.numpy, static shapes, jit-able).


def physical_experts(
  experts_Nxk,
  log2phy_ExM,
  logcnt_E,
  mode: str = "static",
  key: Optional[jax.Array] = None,
  rank=None,
) -> jax.Array:
  """Maps one layer's routed logical experts [N, k] to physical slots [N, k].

  Modes (pass `mode` as a static argument under jit):
    "static": replica `t mod count`, t being the token's row index, or `rank` when given (a
      scalar, e.g. the sending device's rank, or one value per token, [N]);
    "random": a replica drawn uniformly with `key`;
    "round_robin": the j-th (token, choice) routed to an expert in this batch, in row-major
      order, takes replica `j mod count`: the split over replicas is even to within one.
  `experts_Nxk` must hold valid logical ids in [0, E).
  """
  experts_Nxk = jnp.asarray(experts_Nxk)
  log2phy_ExM = jnp.asarray(log2phy_ExM)
  logcnt_E = jnp.asarray(logcnt_E)
  if experts_Nxk.ndim != 2:
    raise ValueError(f"`experts_Nxk` must be [tokens, k], got shape {experts_Nxk.shape}")
  if log2phy_ExM.ndim != 2 or logcnt_E.ndim != 1 or log2phy_ExM.shape[0] != logcnt_E.shape[0]:
    raise ValueError(
      f"`log2phy_ExM` [E, M] and `logcnt_E` [E] disagree: shapes "
      f"{log2phy_ExM.shape} and {logcnt_E.shape}"
    )
  num_tokens, k = experts_Nxk.shape
  count_Nxk = logcnt_E[experts_Nxk]
  if mode == "static":
    if rank is None:
      pick_Nx1 = jnp.arange(num_tokens)[:, None]
    else:
      rank = jnp.asarray(rank)
      if rank.ndim == 0:
        pick_Nx1 = jnp.broadcast_to(rank, (num_tokens, 1))
      elif rank.shape == (num_tokens,):
        pick_Nx1 = rank[:, None]
      else:
        raise ValueError(
          f"`rank` must be a scalar or [tokens] = ({num_tokens},), got shape {rank.shape}"
        )
    replica_Nxk = jnp.broadcast_to(pick_Nx1.astype(count_Nxk.dtype), (num_tokens, k)) % count_Nxk
  elif mode == "random":
    if key is None:
      raise ValueError("`key` is required when `mode` = 'random'")
    replica_Nxk = jax.random.randint(key, (num_tokens, k), 0, count_Nxk)
  elif mode == "round_robin":
    flat_T = experts_Nxk.reshape(-1)
    order_T = jnp.argsort(flat_T, stable=True)
    sorted_T = flat_T[order_T]
    first_T = jnp.searchsorted(sorted_T, sorted_T, side="left")
    seen_T = (
      jnp.zeros_like(flat_T)
      .at[order_T]
      .set((jnp.arange(flat_T.size) - first_T).astype(flat_T.dtype))
    )
    replica_Nxk = seen_T.reshape(num_tokens, k) % count_Nxk.astype(flat_T.dtype)
  else:
    raise ValueError(f"`mode` must be 'static', 'random' or 'round_robin', got {mode!r}")
  return log2phy_ExM[experts_Nxk, replica_Nxk]


def replicate_weights(w_ExDxF, phy2log_R):
  """Physical expert weights [R, ...] from logical ones [E, ...]; also maps over a pytree."""
  phy2log_R = jnp.asarray(phy2log_R)
  if phy2log_R.ndim != 1:
    raise ValueError(f"`phy2log_R` must be one layer's map [R], got shape {phy2log_R.shape}")
  return jax.tree.map(lambda w: jnp.take(jnp.asarray(w), phy2log_R, axis=0), w_ExDxF)


def with_redundant_experts(model, placement):
  """A copy of `model` whose MoE layers run redundant experts: `placement` = (phy2log [L, R],
  log2phy [L, E, M], logcnt [L, E]) from `rebalance_experts` over the model's MoE layers.

  Each layer's routed-expert weights become its R physical experts (replica r holds logical
  expert phy2log[r]'s weights; laid out so that GPU g owns slots g*R/G .. (g+1)*R/G - 1, the
  expert-parallel split), and the router sends each copy to one replica of its expert
  (`layers/routing.to_replicas`). Routing, loads and outputs are the original model's. The
  MTP module is left as it is (it drafts; the main model serves)."""
  from flax import nnx

  from dsv3_jax.layers.moe import ExpertReplicas

  phy2log_LxR, log2phy_LxExM, logcnt_LxE = (np.asarray(a) for a in placement)
  cfg = model.cfg
  if model.moe is None:
    raise ValueError("redundant experts need MoE layers; this model has none")
  want = (cfg.n_moe_layers, cfg.n_routed_experts)
  if phy2log_LxR.ndim != 2 or logcnt_LxE.shape != want or log2phy_LxExM.shape[:2] != want:
    raise ValueError(
      f"placement for {want[0]} MoE layers x {want[1]} experts expected; got phy2log "
      f"{phy2log_LxR.shape}, log2phy {log2phy_LxExM.shape}, logcnt {logcnt_LxE.shape}"
    )
  if not ((phy2log_LxR >= 0) & (phy2log_LxR < cfg.n_routed_experts)).all():
    raise ValueError(f"phy2log holds ids outside [0, {cfg.n_routed_experts})")
  copy = nnx.merge(*nnx.split(model))
  ffn = copy.moe.ffn
  index = jnp.asarray(phy2log_LxR, jnp.int32)
  for name in ("w1", "w3", "w2"):
    w = getattr(ffn, name)
    setattr(ffn, name, w.replace(jax.vmap(replicate_weights)(w[...], index)))
  ffn.replica_slots = ExpertReplicas(jnp.asarray(log2phy_LxExM, jnp.int32))
  ffn.replica_counts = ExpertReplicas(jnp.asarray(logcnt_LxE, jnp.int32))
  return copy


# ---------------------------------------------------------------------------------------------
# Load statistics.


class LoadWindow:
  """The last `capacity` per-layer expert loads and an every-N-forward-passes schedule."""

  def __init__(self, num_layers: int, num_experts: int, capacity: int, rebalance_every: int):
    self.num_layers = _positive_int("num_layers", num_layers)
    self.num_experts = _positive_int("num_experts", num_experts)
    self.capacity = _positive_int("capacity", capacity)
    self.rebalance_every = _positive_int("rebalance_every", rebalance_every)
    self._loads_CxLxE = np.zeros((self.capacity, self.num_layers, self.num_experts))
    self._next = 0
    self._size = 0

  def __len__(self) -> int:
    return self._size

  def add(self, load_LxE) -> None:
    """Records one forward pass's loads, dropping the oldest once full."""
    load_LxE = _check_load("load_LxE", load_LxE, 2)
    if load_LxE.shape != (self.num_layers, self.num_experts):
      raise ValueError(
        f"`load_LxE` must have shape {(self.num_layers, self.num_experts)}, got {load_LxE.shape}"
      )
    self._loads_CxLxE[self._next] = load_LxE
    self._next = (self._next + 1) % self.capacity
    self._size = min(self._size + 1, self.capacity)

  def total(self) -> np.ndarray:
    """Summed load over the window, [L, E] (zeros when empty)."""
    return self._loads_CxLxE.sum(axis=0)

  def should_rebalance(self, step: int) -> bool:
    """True after every `rebalance_every` forward passes (step counts them) with data."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"`step` must be a non-negative integer, got {step!r}")
    return step > 0 and step % self.rebalance_every == 0 and self._size > 0


def loads_from_metrics(path: str, last: int = 0) -> np.ndarray:
  """Sums the per-expert "load" [L, E] of a training run's metrics.jsonl (the last `last`
  records that have one; 0 = all). `path` may be the file or the workdir holding it."""
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  with open(path) as f:
    loads = [json.loads(line)["load"] for line in f if '"load"' in line]
  if not loads:
    raise ValueError(f"`path` = {path!r} holds no records with a 'load' field")
  if last < 0:
    raise ValueError(f"`last` must be >= 0, got {last}")
  return np.sum(np.asarray(loads[-last:] if last else loads, np.float64), axis=0)


def zipf_load(
  num_layers: int, num_experts: int, tokens: int, exponent: float = 1.0, seed: int = 0
) -> np.ndarray:
  """Skewed synthetic loads [L, E]: per layer, expert popularity ~ 1 / rank**exponent over a
  random permutation of the experts, `tokens` routed choices drawn multinomially."""
  rng = np.random.default_rng(seed)
  p_E = 1.0 / np.arange(1, num_experts + 1) ** exponent
  p_E /= p_E.sum()
  return np.stack(
    [rng.multinomial(tokens, p_E[rng.permutation(num_experts)]) for _ in range(num_layers)]
  ).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Measurement.


def device_loads(load_LxE, phy2log_LxR, logcnt_LxE, num_gpus: int) -> np.ndarray:
  """Per-GPU load [L, num_gpus] when every expert's load splits evenly over its replicas."""
  load_LxE = _check_load("load_LxE", load_LxE, 2)
  phy2log_LxR = np.asarray(phy2log_LxR)
  logcnt_LxE = np.asarray(logcnt_LxE)
  num_gpus = _positive_int("num_gpus", num_gpus)
  if logcnt_LxE.shape != load_LxE.shape or phy2log_LxR.shape[0] != load_LxE.shape[0]:
    raise ValueError(
      f"shapes disagree: load_LxE {load_LxE.shape}, phy2log_LxR "
      f"{phy2log_LxR.shape}, logcnt_LxE {logcnt_LxE.shape}"
    )
  num_layers, num_replicas = phy2log_LxR.shape
  if num_replicas % num_gpus:
    raise ValueError(f"`num_gpus` = {num_gpus} must divide the {num_replicas} slots")
  slot_LxR = np.take_along_axis(load_LxE / logcnt_LxE, phy2log_LxR, axis=1)
  return slot_LxR.reshape(num_layers, num_gpus, num_replicas // num_gpus).sum(-1)


def imbalance(per_device_xG) -> np.ndarray:
  """max / mean over the last (device) axis; 1.0 is perfect balance (and an idle layer)."""
  per_device_xG = _check_load("per_device_xG", per_device_xG, np.ndim(per_device_xG))
  mean_x = per_device_xG.mean(axis=-1)
  return np.where(mean_x > 0, per_device_xG.max(axis=-1) / np.where(mean_x > 0, mean_x, 1), 1.0)


def contiguous_placement(num_layers: int, num_experts: int) -> Tuple[np.ndarray, np.ndarray]:
  """No redundancy: slot e holds expert e, so GPU g hosts experts [g * E/G, (g+1) * E/G)."""
  phy2log_LxE = np.tile(np.arange(num_experts), (num_layers, 1))
  return phy2log_LxE, np.ones((num_layers, num_experts), np.int64)


def compare_placements(
  load_LxE, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> dict:
  """max / mean GPU load per layer, contiguous experts (before) vs rebalanced (after)."""
  load_LxE = _check_load("load_LxE", load_LxE, 2)
  num_layers, num_experts = load_LxE.shape
  if num_experts % num_gpus:
    raise ValueError(f"`num_gpus` = {num_gpus} must divide the {num_experts} experts")
  before_L = imbalance(
    device_loads(load_LxE, *contiguous_placement(num_layers, num_experts), num_gpus)
  )
  phy2log_LxR, _, logcnt_LxE = rebalance_experts(
    load_LxE, num_replicas, num_groups, num_nodes, num_gpus
  )
  after_L = imbalance(device_loads(load_LxE, phy2log_LxR, logcnt_LxE, num_gpus))
  return dict(
    layers=num_layers,
    experts=num_experts,
    replicas=num_replicas,
    groups=num_groups,
    nodes=num_nodes,
    gpus=num_gpus,
    hierarchical=num_groups % num_nodes == 0,
    before_mean=float(before_L.mean()),
    before_worst=float(before_L.max()),
    after_mean=float(after_L.mean()),
    after_worst=float(after_L.max()),
    before_per_layer=before_L.tolist(),
    after_per_layer=after_L.tolist(),
  )
