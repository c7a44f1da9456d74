"""Node-limited two-stage expert dispatch: each token crosses to a node once, then fans out.

DeepSeek-V3's cross-node all-to-all (arXiv 2412.19437 §3.2.2) sends each token over IB to
each node hosting one of its chosen experts exactly once — to the GPU with the same in-node
index as the sender — and that GPU forwards it over NVLink to the GPUs of its node hosting
the experts. Node-limited routing (§2.1.2: with expert groups nested in nodes, n_group a
multiple of the node count, `topk_group = M` keeps a token within M nodes; M = 4 of 8 nodes
in the report) bounds the IB sends per token by M, where a flat all-to-all of copies sends up
to k = 8 per token. Combine runs in reverse: each expert's output returns to the forwarding
GPU, which pre-sums the copies of a token that went to its node (weighted by the routing
weights), and a single vector per (token, node) goes back over IB to the source, which sums
over nodes.

Here that is SPMD inside the `shard_map` over the `expert` axis of `parallel/expert.py`, with
EP rank = node * G + local rank (G = `ranks_per_node`, the ranks of one node are
consecutive). The two stages are `all_to_all`s over the same axis restricted to subgroups
(`axis_index_groups`; the tests run them on emulated XLA:CPU devices), so the layer runs in
the same shard_map as the flat dispatch:

  stage 1 (IB)     groups of the J nodes' peers with one local rank ([l, G + l, 2G + l, ...]);
                   buffer [J, S1, D]: row [j, t] is the t-th token (token order) this rank
                   sends to node j, with the token's k expert ids in node j (sentinel when an
                   expert lies elsewhere) and their routing weights [J, S1, k];
  stage 2 (NVLink) groups of one node's G ranks; the forwarder splits each received token
                   into its copies and sends each to the rank of its expert: buffer [G, S2, D]
                   plus local expert ids [G, S2] (empty slots carry El);
  experts          `layers/experts.expert_rows` on the G*S2 received rows (stage 2 and
                   its inverse are `expert.exchange`, as the flat dispatch's one stage);
  combine          inverse stage 2 (outputs back to the forwarder; it sums a token's copies,
                   each gated by its routing weight at its expert as in the flat dispatch),
                   inverse stage 1 (one vector per (token, node) back to the source; it sums
                   over nodes).

Dropless with fixed buffers, never overflowing (`two_stage_slots`):
  S1 = N        a token goes to a node at most once, so a source sends at most its N tokens
                to one node;
  S2 = J * N * min(k, El)
                a forwarder receives at most N tokens from each of its J peers (itself
                included), and a token has at most min(k, El) of its k distinct experts on one
                rank (El = E / R experts per rank).
Both are reached: when every token picks the same k experts on one node, every source fills
its S1 slots to that node and every forwarder there fills its S2 slots (`min(k, El)` copies of
J*N tokens) to the rank holding them. The worst case is R * N * min(k, El) received rows, as
for the flat dispatch, so a dropless step first uses buffers of `dispatch_factor` x the mean
(S1: N * min(M, J) / J tokens per node pair; S2: N * k / G copies per rank pair, which is the
mean under balanced routing) and falls back — every rank together, the overflow flag of
either stage psum'ed so the all_to_alls stay aligned — only when some rank would overflow one
of them. The fallback never takes the worst-case S2 (R * min(k, El) / (factor * k) times the
fast one, 16x at the report's shape): stage 1 takes its exact bound S1 = N (at most
J / (factor * min(M, J)) times the fast S1, and equal to it at the report's shape with
factor 2) and stage 2 sends in rounds of the fast S2, as many as the fullest forwarder needs
(`fallback_rounds` at most; the count pmax'ed over the mesh, each extra round
rematerialised), as the flat dispatch does with its single stage. Stage 2's counts are
known before stage 1 runs: each rank all-gathers the [R] copy counts per destination rank of
every rank (R*R integers) and sums them per forwarder.

Traffic (`cross_node_traffic`): the flat dispatch sends every copy whose expert is on another
node across nodes (and its output back); the two-stage one sends one vector per distinct
remote node of a token each way. The report dispatches in FP8 and combines in BF16 (§3.3.3),
the default item sizes here. Metadata (k ids and weights per (token, node): 8k bytes vs
D = 7168 activations) is left out of both.

Legend: N local tokens, k experts per token, D model, E experts, R expert ranks, J nodes,
G ranks per node, El = E / R experts per rank, En = E / J experts per node, T = J * S1 rows a
forwarder receives, S1 / S2 slots per destination in stage 1 / 2.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.experts import combine, move_rows
from dsv3_jax.layers.routing import Routing
from dsv3_jax.parallel import expert as expert_lib
from dsv3_jax.parallel.expert import EXPERT, ExpertParallel, max_nodes_per_token
from dsv3_jax.parallel.mesh import BATCH


# ----------------------------------------------------------------------------- groups, sizes
def node_groups(ep: ExpertParallel) -> list[list[int]]:
  """Stage 1's all_to_all groups: per local rank l, the ranks with in-node index l, in node
  order (so a rank's index in its group is its node)."""
  g = ep.ranks_per_node
  return [[node * g + local for node in range(ep.n_nodes)] for local in range(g)]


def gpu_groups(ep: ExpertParallel) -> list[list[int]]:
  """Stage 2's all_to_all groups: per node, its ranks in local-rank order."""
  g = ep.ranks_per_node
  return [[node * g + local for local in range(g)] for node in range(ep.n_nodes)]


def _all_to_all(x, groups: list[list[int]]):
  """all_to_all over the `expert` axis within `groups` (leading axis = group size)."""
  if len(groups[0]) == 1:
    return x  # a group of one rank: nothing moves
  return jax.lax.all_to_all(x, EXPERT, 0, 0, axis_index_groups=None if len(groups) == 1 else groups)


def two_stage_slots(n_local_tokens: int, cfg: ModelConfig, ep: ExpertParallel) -> tuple[int, int]:
  """(S1, S2): the worst-case slots per destination of stage 1 and stage 2, which never
  overflow (the module docstring proves both bounds and that they are reached)."""
  e_loc = cfg.n_routed_experts // ep.size
  return n_local_tokens, ep.n_nodes * n_local_tokens * min(cfg.num_experts_per_tok, e_loc)


def _round8(x: float) -> int:
  return -(-math.ceil(x) // 8) * 8


def fast_two_stage_slots(
  n_local_tokens: int, cfg: ModelConfig, ep: ExpertParallel
) -> tuple[int, int]:
  """The dropless fast path's (S1, S2): `dispatch_factor` x the mean (rounded up to 8), never
  more than the worst case; the worst case when the fast path is off (`dispatch_factor` 0)."""
  s1, s2 = two_stage_slots(n_local_tokens, cfg, ep)
  if not ep.dispatch_factor:
    return s1, s2
  j, f = ep.n_nodes, ep.dispatch_factor
  mean1 = n_local_tokens * max_nodes_per_token(cfg, j) / j
  mean2 = n_local_tokens * cfg.num_experts_per_tok / ep.ranks_per_node
  return min(s1, _round8(f * mean1)), min(s2, _round8(f * mean2))


def fallback_rounds(n_local_tokens: int, cfg: ModelConfig, ep: ExpertParallel) -> int:
  """The most stage-2 rounds of the fast buffer the fallback can need: the worst-case S2
  slots over the fast S2, rounded up."""
  s2 = two_stage_slots(n_local_tokens, cfg, ep)[1]
  return -(-s2 // fast_two_stage_slots(n_local_tokens, cfg, ep)[1])


def buffer_bytes(n_local_tokens: int, cfg: ModelConfig, ep: ExpertParallel, itemsize: int) -> dict:
  """Per-device send buffers of both stages vs the real copies: the fast path's, the
  fallback's (stage 1 at its bound, stage 2 in rounds of the fast buffer) and the worst-case
  pair the fallback avoids."""
  (s1, s2), (f1, f2) = (
    two_stage_slots(n_local_tokens, cfg, ep),
    fast_two_stage_slots(n_local_tokens, cfg, ep),
  )
  j, g, d = ep.n_nodes, ep.ranks_per_node, cfg.hidden_size
  rows = lambda a, b: j * a + g * b  # stage-1 rows sent, stage-2 rows sent
  real = n_local_tokens * cfg.num_experts_per_tok
  return {
    "stage_slots": [s1, s2],
    "fast_stage_slots": [f1, f2],
    "real_copies": real,
    "fast_send_buffer_bytes": rows(f1, f2) * d * itemsize,
    "fallback_send_buffer_bytes": rows(s1, f2) * d * itemsize,
    "fallback_rounds_max": fallback_rounds(n_local_tokens, cfg, ep),
    "worst_case_send_buffer_bytes": rows(s1, s2) * d * itemsize,
    "fast_overhead_vs_real": rows(f1, f2) / real,
    "fallback_overhead_vs_real": rows(s1, f2) / real,
    "worst_case_overhead_vs_real": rows(s1, s2) / real,
  }


def validate(cfg: ModelConfig, ep: ExpertParallel) -> ExpertParallel:
  ep.validate(cfg)
  if ep.capacity_factor:
    raise ValueError(
      f"invalid config field `parallel.capacity_factor` = {ep.capacity_factor}: "
      f"the two-stage dispatch is dropless only (must be 0)"
    )
  return ep


# ----------------------------------------------------------------------------- dispatch
def _dispatch(
  x_NxD,
  experts_Nxk,
  weights_Nxk,
  w1,
  w3,
  w2,
  s1: int,
  s2: int,
  *,
  cfg: ModelConfig,
  ep: ExpertParallel,
  rounds_up_to: int = 1,
):
  """Both stages with S1 / S2 slots, the local experts and the reverse combine: [N, D].

  `rounds_up_to` > 1: stage 2 sends a forwarder's copies in rounds of S2 slots (copy slots
  [0, S2), [S2, 2 S2), ...), as many as the fullest forwarder needs (agreed over the mesh, so
  every rank runs the same all_to_alls), at most `rounds_up_to`; 1: one round, which the
  caller has checked holds every copy."""
  n, d = x_NxD.shape
  k = experts_Nxk.shape[1]
  j, g = ep.n_nodes, ep.ranks_per_node
  e_loc = cfg.n_routed_experts // ep.size
  e_node = e_loc * g
  node_Nxk = experts_Nxk // e_node

  # Stage 1: one row per (token, node it reaches), to the peer with this rank's local index.
  in_node_NxJxk = node_Nxk[:, None, :] == jnp.arange(j, dtype=node_Nxk.dtype)[None, :, None]
  to_node_NxJ = jnp.any(in_node_NxJxk, axis=2)
  slot1_NxJ = jnp.cumsum(to_node_NxJ.astype(jnp.int32), axis=0) - 1  # token order
  slot1_NxJ = jnp.where(to_node_NxJ & (slot1_NxJ < s1), slot1_NxJ, s1)  # s1: dropped
  node_NxJ = jnp.broadcast_to(jnp.arange(j)[None, :], (n, j))
  # The buffers are filled and read by `move_rows` through both slot maps (`expert.slot_maps`).
  src1_S, where1_T = expert_lib.slot_maps(node_NxJ.reshape(-1), slot1_NxJ.reshape(-1), j, s1)
  send_x_JxSxD = move_rows(x_NxD, src1_S, where1_T, j).reshape(j, s1, d)
  e_NxJxk = jnp.where(in_node_NxJxk, (experts_Nxk % e_node)[:, None, :], e_node)
  w_NxJxk = jnp.where(in_node_NxJxk, weights_Nxk[:, None, :], 0.0)
  send_e_JxSxk = (
    e_NxJxk.astype(jnp.int32)
    .reshape(n * j, k)
    .at[src1_S]
    .get(mode="fill", fill_value=e_node)
    .reshape(j, s1, k)
  )
  send_w_JxSxk = move_rows(w_NxJxk.reshape(n * j, k), src1_S, where1_T).reshape(j, s1, k)
  nodes = node_groups(ep)
  recv_x_TxD = _all_to_all(send_x_JxSxD, nodes).reshape(j * s1, d)
  recv_e_C = _all_to_all(send_e_JxSxk, nodes).reshape(j * s1 * k)  # copy c: row c // k
  recv_w_Txk = _all_to_all(send_w_JxSxk, nodes).reshape(j * s1, k)

  # Stage 2 (at the forwarder): each copy to the rank of its node holding its expert.
  real_C = recv_e_C < e_node
  dst_C = jnp.where(real_C, recv_e_C // e_loc, g)
  slot2_C = expert_lib.slot_positions(dst_C, g)  # -1: no copy (an expert elsewhere)
  recv_w_C = recv_w_Txk.reshape(-1)
  gpus = gpu_groups(ep)
  a2a = lambda a: _all_to_all(a, gpus)

  def stage2(lo=0):
    """Copies in slots [lo, lo + S2) to their experts and back (outputs gated, as in the
    flat dispatch, so neither combine keeps expert outputs for the backward); at the
    forwarder, each token's copies in this node pre-summed: [T, D]."""
    sent_C = (slot2_C >= lo) & (slot2_C < lo + s2)
    slot_C = jnp.where(sent_C, slot2_C - lo, s2)  # s2: not in this round
    # Copies elsewhere (dst g) or in another round come back as zeros.
    y_CxD = expert_lib.exchange(
      recv_x_TxD, k, recv_e_C % e_loc, recv_w_C, dst_C, slot_C, g, s2, a2a, w1, w3, w2,
      cfg=cfg, expected_rows=n * k,
    )  # fmt: skip
    return combine(y_CxD, k, x_NxD.dtype)

  y_TxD = stage2()
  if rounds_up_to > 1:  # further rounds of the same buffer, all ranks together
    rounds = jax.lax.pmax(jnp.max(slot2_C) // s2 + 1, BATCH)
    y_TxD = expert_lib.further_rounds(y_TxD, rounds, rounds_up_to, lambda r: stage2(r * s2))

  # Stage 1 inverse: one vector per (token, node) back to the source, summed over nodes.
  back1_JxSxD = _all_to_all(y_TxD.reshape(j, s1, d), nodes)
  y_TxD = move_rows(back1_JxSxD.reshape(j * s1, d), where1_T, src1_S)  # s1: zeros
  return combine(y_TxD, j, x_NxD.dtype)  # row t is token t // J


def _overflows(experts_Nxk, s1: int, s2: int, *, cfg: ModelConfig, ep: ExpertParallel):
  """Whether this rank's stage-1 sends or, for some forwarder, the stage-2 copies it gets
  from this rank's node peers overflow S1 / S2 slots."""
  j, g, r = ep.n_nodes, ep.ranks_per_node, ep.size
  e_loc = cfg.n_routed_experts // r
  node_Nxk = experts_Nxk // (e_loc * g)
  to_node_NxJ = jnp.any(node_Nxk[:, :, None] == jnp.arange(j)[None, None, :], axis=1)
  over1 = jnp.any(to_node_NxJ.sum(0) > s1)
  copies_R = jnp.zeros((r,), jnp.int32).at[experts_Nxk.reshape(-1) // e_loc].add(1)
  # Forwarder (node i, local l) gets, for rank (i, h), the copies of every source with
  # local rank l: sum over the sources' nodes.
  copies_RxR = jax.lax.all_gather(copies_R, EXPERT)  # [source, destination]
  fwd_GxJxG = copies_RxR.reshape(j, g, j, g).sum(0)  # [local l, node i, rank h in node i]
  over2 = jnp.any(fwd_GxJxG > s2)
  return over1 | over2


def two_stage_dispatch(
  x_NxD: jax.Array, routing: Routing, w1, w3, w2, *, cfg: ModelConfig, ep: ExpertParallel
):
  """The routed experts' output [N, D] of this shard's tokens by the two-stage dispatch
  (inside a shard_map over the whole mesh), and whether this layer fell back to the
  worst-case buffers (a bool every rank agrees on). Dropless: every copy is computed, so
  the kept-copies mask [N*k] is all true. Plugs into `expert.shard_routed_experts` as its
  `dispatch` (the sharding plan does it when `parallel.ep_two_stage` is set)."""
  n = x_NxD.shape[0]
  keep_C = jnp.ones((n * cfg.num_experts_per_tok,), bool)
  s1, s2 = two_stage_slots(n, cfg, ep)
  f1, f2 = fast_two_stage_slots(n, cfg, ep)
  run = functools.partial(
    _dispatch, x_NxD, routing.experts_Nxk, routing.weights_Nxk, w1, w3, w2, cfg=cfg, ep=ep
  )
  if (f1, f2) == (s1, s2):
    return run(s1, s2), keep_C, jnp.zeros((), bool)
  over = _overflows(routing.experts_Nxk, f1, f2, cfg=cfg, ep=ep).astype(jnp.int32)
  fallback = jax.lax.psum(over, BATCH) > 0
  # The fallback: stage 1 with its exact bound (N tokens per node: at most
  # J / (factor x min(M, J)) times the fast buffer, equal to it at the report's shape with
  # factor 2) and stage 2 in rounds of the fast buffer, never its worst case (16x the fast one
  # there). It is rematerialised: a differentiated `cond` would otherwise keep its buffers as
  # residuals whichever branch ran.
  rounds = fallback_rounds(n, cfg, ep)
  slow = jax.checkpoint(lambda: run(s1, f2, rounds_up_to=rounds))
  return jax.lax.cond(fallback, slow, lambda: run(f1, f2)), keep_C, fallback


# ----------------------------------------------------------------------------- the EP layer
def routed_experts(
  x_BxLxD, gate_DxE, bias_E, w1_ExDxF, w3_ExDxF, w2_ExFxD, cfg: ModelConfig, ep: ExpertParallel
):
  """`parallel/expert.routed_experts` with the two-stage dispatch (same outputs and aux)."""
  validate(cfg, ep)
  return expert_lib.routed_experts(
    x_BxLxD, gate_DxE, bias_E, w1_ExDxF, w3_ExDxF, w2_ExFxD, cfg, ep, dispatch=two_stage_dispatch
  )


# ----------------------------------------------------------------------------- traffic
def cross_node_traffic(
  experts_Nxk,
  src_node_N,
  n_experts: int,
  n_nodes: int,
  *,
  hidden_size: int = 1,
  dispatch_itemsize: int = 1,
  combine_itemsize: int = 2,
) -> dict:
  """Cross-node sends and bytes per token of a routing (numpy), flat vs two-stage dispatch,
  for tokens living on nodes `src_node_N`. Flat: every copy whose expert is on another node
  crosses (dispatch) and its output crosses back (combine). Two-stage: one vector per
  distinct remote node each way. Bytes = sends x D x (dispatch + combine item sizes)."""
  experts_Nxk, src_node_N = np.asarray(experts_Nxk), np.asarray(src_node_N)
  node_Nxk = experts_Nxk // (n_experts // n_nodes)
  flat_N = (node_Nxk != src_node_N[:, None]).sum(1)
  reached_NxJ = np.zeros((len(node_Nxk), n_nodes), bool)
  np.put_along_axis(reached_NxJ, node_Nxk, True, axis=1)
  two_stage_N = reached_NxJ.sum(1) - reached_NxJ[np.arange(len(node_Nxk)), src_node_N]
  per_send = hidden_size * (dispatch_itemsize + combine_itemsize)
  return {
    "flat_sends_per_token": float(flat_N.mean()),
    "two_stage_sends_per_token": float(two_stage_N.mean()),
    "two_stage_sends_max": int(two_stage_N.max()),
    "flat_bytes_per_token": float(flat_N.mean()) * per_send,
    "two_stage_bytes_per_token": float(two_stage_N.mean()) * per_send,
  }


def traffic_ratios(limited: dict, unlimited: dict) -> dict:
  """Cross-node bytes per token compared, from `cross_node_traffic` of the same tokens routed
  node-limited (M < nodes) and unlimited: two-stage M vs flat unlimited (the report's
  "about halves"), two-stage M vs two-stage unlimited, and two-stage vs flat at M."""
  return {
    "two_stage_limited_vs_flat_unlimited": (
      limited["two_stage_bytes_per_token"] / unlimited["flat_bytes_per_token"]
    ),
    "two_stage_limited_vs_two_stage_unlimited": (
      limited["two_stage_bytes_per_token"] / unlimited["two_stage_bytes_per_token"]
    ),
    "two_stage_vs_flat_limited": (
      limited["two_stage_bytes_per_token"] / limited["flat_bytes_per_token"]
    ),
  }
