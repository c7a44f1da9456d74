"""Expert parallelism: DeepSeekMoE's routed experts in `jax.shard_map` over the `expert` axis.

The batch is split over data x expert and the routed experts over `expert` (E / R experts
per rank, R = size of the `expert` axis). Each shard of the mesh runs, on its own tokens:

  1. route       `route` (sigmoid + bias, group-limited top-k) on the local tokens;
  2. dispatch    every token copy goes to the rank owning its expert with one `all_to_all`
                 of a fixed-size buffer [R, S, D] (S slots per destination rank; fixed
                 because `ragged_all_to_all` does not compile on XLA:CPU);
  3. experts     the one expert kernel (`layers/experts.expert_rows`) over the local experts
                 on the R*S received rows (empty slots carry expert id El);
  4. combine     the results travel back with the inverse `all_to_all`; each token sums its
                 copies' outputs. Each copy's routing weight travels with it in step 2 and
                 the kernel gates the copy's SwiGLU output with it before W2 (the same
                 function: W2 is linear), so the combine is a plain sum and the backward
                 keeps no [N*k, D] expert outputs for the weights' gradient: that gradient
                 is the recomputed SwiGLU output against W2's input gradient, at the expert,
                 sent back with the inverse `all_to_all` (the report's recipe, §3.3.3).

Dropless by construction: a rank holds E/R experts and a token picks k distinct experts, so a
token sends at most min(k, E/R) copies to one rank and a source sends at most
`N_local * min(k, E/R)` copies to one destination — the worst-case slot count S, which can
never overflow. That buffer is R * min(k, E/R) / k times the real copies (32x at the 671B
shape with EP=64), so a dropless step sends its copies in rounds of a bounded buffer of
`dispatch_factor` x the mean copies per (src, dst) pair: one round unless some rank overflows
it, then further rounds of the same size — all ranks together, the round count pmax'ed so
the all_to_alls stay aligned — until every copy has gone (`dispatch_fallbacks` counts the
layers that needed more than one). Memory is one bounded buffer, whatever the routing.
`capacity_factor` > 0 instead sizes S = ceil(cf * N_local * k / R): copies beyond a
destination's S slots are dropped (their weight zeroed, token order decides) and counted
exactly in the `dropped_copies` statistic, which is provably zero in the default.

Node-limited routing: `ep_ranks_per_node` consecutive EP ranks form a node. With expert
groups nested in nodes (n_group a multiple of the node count; n_group = nodes is DeepSeek-V3's
layout), `topk_group = M` keeps each token's copies within M nodes. The statistics count, per
step, copies whose expert lives on another node (`cross_node_copies`) and the distinct other
nodes each token reaches (`remote_node_sends`: DeepSeek-V3 sends a token once per node over
IB and fans it out inside the node over NVLink, so this is its cross-node traffic).

Balance statistics (expert loads for the bias update and MaxVio, the sequence-wise loss) are
psum'ed over the whole mesh inside the shard_map, so every rank sees the same global values
and applies the same bias update.

Legend: b local batch, N local tokens, C = N*k local copies, R expert ranks, S slots per
destination, D model, E experts, El experts per rank.
"""

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax._src.interpreters import partial_eval as pe  # convert_constvars_jaxpr
from jax.extend import core as jcore
from jax.sharding import Mesh, PartitionSpec as P

from dsv3_jax.config import ModelConfig, ParallelConfig
from dsv3_jax.layers.experts import combine, expert_rows, move_rows
from dsv3_jax.layers.routing import (
  Routing,
  expert_load,
  route,
  sequence_balance_loss,
  to_replicas,
)
from dsv3_jax.parallel.mesh import BATCH

EXPERT = "expert"
STATS = ("dropped_copies", "cross_node_copies", "remote_node_sends", "dispatch_fallbacks")


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Where the routed experts run: a mesh with an `expert` axis and the dispatch settings."""

  mesh: Mesh
  capacity_factor: float = 0.0  # 0 = dropless (the default); else slots per (src, dst) pair
  ranks_per_node: int = 1  # EP ranks forming one node (node-limited routing)
  dispatch_factor: float = 0.0  # dropless fast path: slots x the mean; 0 = worst case only

  @property
  def size(self) -> int:
    return self.mesh.shape[EXPERT]

  @property
  def n_nodes(self) -> int:
    return self.size // self.ranks_per_node

  @property
  def n_shards(self) -> int:
    """Batch shards: data x expert."""
    return math.prod(self.mesh.shape[a] for a in BATCH)

  def validate(self, cfg: ModelConfig) -> "ExpertParallel":
    if EXPERT not in self.mesh.shape:
      raise ValueError(
        f"expert parallelism needs a mesh with an `{EXPERT}` axis; got axes "
        f"{tuple(self.mesh.shape)}"
      )
    if cfg.n_routed_experts % self.size:
      raise ValueError(
        f"invalid config field `model.n_routed_experts` = {cfg.n_routed_experts}:"
        f" must be divisible by the `expert` mesh axis size {self.size}"
      )
    if self.ranks_per_node <= 0 or self.size % self.ranks_per_node:
      raise ValueError(
        f"invalid config field `parallel.ep_ranks_per_node` = "
        f"{self.ranks_per_node}: must divide the `expert` mesh axis size "
        f"{self.size}"
      )
    if self.capacity_factor < 0:
      raise ValueError(
        f"invalid config field `parallel.capacity_factor` = "
        f"{self.capacity_factor}: must be >= 0 (0 = dropless)"
      )
    if self.dispatch_factor and self.dispatch_factor < 1:
      raise ValueError(
        f"invalid config field `parallel.dispatch_factor` = "
        f"{self.dispatch_factor}: must be 0 or >= 1"
      )
    return self


def from_config(mesh: Mesh, parallel: ParallelConfig) -> ExpertParallel:
  return ExpertParallel(
    mesh, parallel.capacity_factor, parallel.ep_ranks_per_node, parallel.dispatch_factor
  )


# ----------------------------------------------------------------------------- sizes
def slots_per_rank(n_local_tokens: int, cfg: ModelConfig, ep: ExpertParallel) -> int:
  """S: the worst-case buffer slots a source reserves for each destination rank (or, with a
  dropping `capacity_factor`, the capped slots)."""
  k = cfg.num_experts_per_tok
  bound = n_local_tokens * min(k, cfg.n_routed_experts // ep.size)  # never overflows
  if ep.capacity_factor == 0:
    return bound
  return max(1, min(bound, math.ceil(ep.capacity_factor * n_local_tokens * k / ep.size)))


def fast_slots_per_rank(n_local_tokens: int, cfg: ModelConfig, ep: ExpertParallel) -> int:
  """The dropless fast path's slots per destination: `dispatch_factor` x the mean copies
  (rounded up to 8), never more than the worst case; equal to it when the fast path is off."""
  bound = slots_per_rank(n_local_tokens, cfg, ep)
  if ep.capacity_factor or not ep.dispatch_factor:
    return bound
  mean = n_local_tokens * cfg.num_experts_per_tok / ep.size
  return min(bound, -(-math.ceil(ep.dispatch_factor * mean) // 8) * 8)


def max_nodes_per_token(cfg: ModelConfig, n_nodes: int) -> int:
  """The most nodes one token's copies can reach under group-limited routing."""
  k, g, m = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
  if m >= g:
    return min(k, n_nodes)
  if g % n_nodes == 0:  # groups nest in nodes: M groups touch at most M nodes
    return min(m, k, n_nodes)
  if n_nodes % g == 0:  # each group spans n_nodes / g nodes
    return min(m * (n_nodes // g), k, n_nodes)
  return min(k, n_nodes)


def node_of_expert(experts: jax.Array, n_experts: int, n_nodes: int) -> jax.Array:
  """Node holding each expert: experts are laid out rank-major, ranks node-major."""
  return experts // (n_experts // n_nodes)


def slot_maps(dst_C: jax.Array, slot_C: jax.Array, n_dst: int, n_slots: int):
  """Both maps of "entry c goes to slot slot_C[c] of destination dst_C[c]" for a buffer
  [n_dst, n_slots], flattened: (the entry each slot holds, C = number of entries where none;
  each entry's flat slot, n_dst x n_slots where none). Entries whose destination or slot is
  out of range go nowhere.

  A send buffer is then filled, and a return read, by `move_rows` through one map with the
  other as its inverse, so both directions of the dispatch and of its gradient are gathers:
  a differentiated scatter-set would keep row-sized masks for its backward, a gather's
  plain transpose is a scatter-add into a zero-filled buffer, and scatters are slow on CPU."""
  c = dst_C.shape[0]
  ok = (dst_C >= 0) & (dst_C < n_dst) & (slot_C >= 0) & (slot_C < n_slots)
  where_C = jnp.where(ok, dst_C * n_slots + slot_C, n_dst * n_slots)
  entries = jnp.arange(c, dtype=jnp.int32)
  src_S = jnp.full((n_dst * n_slots,), c, jnp.int32).at[where_C].set(entries, mode="drop")
  return src_S, where_C.astype(jnp.int32)


def slot_positions(dst_C: jax.Array, n_dst: int) -> jax.Array:
  """Each entry's position (in order) among the entries going to the same destination; -1
  for entries whose destination is outside [0, n_dst)."""
  onehot_CxR = dst_C[:, None] == jnp.arange(n_dst, dtype=dst_C.dtype)[None, :]
  running_CxR = jnp.cumsum(onehot_CxR.astype(jnp.int32), axis=0)
  return jnp.sum(running_CxR * onehot_CxR, axis=1) - 1


def exchange(
  x_SxD,
  copies: int,
  expert_C,
  gate_C,
  dst_C,
  slot_C,
  n_dst: int,
  n_slots: int,
  all_to_all,
  w1,
  w3,
  w2,
  *,
  cfg: ModelConfig,
  expected_rows: int,
):
  """Copy c (source row c // copies of x) to slot slot_C[c] of rank dst_C[c] (out of range:
  not sent) through an [n_dst, n_slots, D] buffer and `all_to_all`, with its local expert id
  (of the w1.shape[0] here) and routing weight; the expert kernel on what arrived (each row
  gated by its weight); the outputs back the same way: [C, D], zeros for copies not sent. The
  one exchange of both dispatches (the flat one over `expert`, the two-stage one's stage 2)."""
  d, e_local = x_SxD.shape[1], w1.shape[0]
  src_S, where_C = slot_maps(dst_C, slot_C, n_dst, n_slots)  # slot -> copy, copy -> slot
  send_x = move_rows(x_SxD, src_S, where_C, copies).reshape(n_dst, n_slots, d)
  send_e = expert_C.at[src_S].get(mode="fill", fill_value=e_local).reshape(n_dst, n_slots)
  send_w = move_rows(gate_C.astype(jnp.float32)[:, None], src_S, where_C)
  recv_x, recv_e = all_to_all(send_x), all_to_all(send_e)
  recv_w = all_to_all(send_w.reshape(n_dst, n_slots))
  y_rows = expert_rows(
    recv_x.reshape(n_dst * n_slots, d),
    recv_e.reshape(n_dst * n_slots),
    w1,
    w3,
    w2,
    block=cfg.expert_block_size,
    precision=cfg.matmul_precision,
    expected_rows=expected_rows,
    gate_R=recv_w.reshape(n_dst * n_slots),
  )
  back = all_to_all(y_rows.reshape(n_dst, n_slots, d))
  return move_rows(back.reshape(n_dst * n_slots, d), where_C, src_S)  # not sent: zeros


def further_rounds(y, rounds: jax.Array, max_rounds: int, round_fn):
  """`y` plus `round_fn(j)` for every round j in [1, max_rounds) below `rounds` (a count every
  rank agrees on, so all run the same all_to_alls): a bounded dispatch's extra rounds.

  One `scan` step per possible round, its body a `cond` on `rounds`: the program holds one
  copy of a round (its all_to_alls and the expert kernel) however many the bound allows, 16
  at DeepSeek-V3's shape. The VJP is written out (`_rounds_sum`): differentiating the
  scan-of-cond directly keeps each possible round's inputs -- the local expert weights among
  them -- as a stacked per-round residual (15 x the weights at DeepSeek-V3's shape) even when
  no round runs. Here the backward keeps only the inputs, once, and reruns each round that
  ran under its VJP (a rematerialised round, as before)."""
  if max_rounds <= 1:
    return y
  js = jnp.arange(1, max_rounds, dtype=jnp.int32)
  # Every value the round closes over becomes an argument (integers too: a closure over
  # them would leak the enclosing trace into the custom VJP).
  closed = jax.make_jaxpr(round_fn)(js[0])
  opened = jcore.ClosedJaxpr(pe.convert_constvars_jaxpr(closed.jaxpr), ())
  fn = lambda j, *consts: jcore.jaxpr_as_fun(opened)(*consts, j)[0]
  return _rounds_sum(fn, y, rounds, js, *closed.consts)


def _add_rounds(fn, y, rounds, js, consts):
  def body(acc, j):
    extra = jax.lax.cond(rounds > j, lambda j: fn(j, *consts), lambda j: jnp.zeros_like(acc), j)
    return acc + extra, None

  return jax.lax.scan(body, y, js)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rounds_sum(fn, y, rounds, js, *consts):
  return _add_rounds(fn, y, rounds, js, consts)


def _rounds_sum_fwd(fn, y, rounds, js, *consts):
  return _add_rounds(fn, y, rounds, js, consts), (rounds, js, consts)


def _rounds_sum_bwd(fn, res, ct):
  rounds, js, consts = res
  inexact = [jnp.issubdtype(c.dtype, jnp.inexact) for c in consts]
  diff = [c for c, d in zip(consts, inexact) if d]

  def with_diff(j, *diff_consts):
    it = iter(diff_consts)
    return fn(j, *[next(it) if d else c for c, d in zip(consts, inexact)])

  def body(acc, j):
    def vjp_round(j):
      return jax.vjp(functools.partial(with_diff, j), *diff)[1](ct)

    grads = jax.lax.cond(rounds > j, vjp_round, lambda j: tuple(jnp.zeros_like(c) for c in diff), j)
    return tuple(a + g for a, g in zip(acc, grads)), None

  acc = jax.lax.scan(body, tuple(jnp.zeros_like(c) for c in diff), js)[0]
  it = iter(acc)
  return (ct, None, None, *[next(it) if d else None for d in inexact])


_rounds_sum.defvjp(_rounds_sum_fwd, _rounds_sum_bwd)


# ----------------------------------------------------------------------------- the EP layer
def flat_dispatch(
  x_NxD: jax.Array, routing: Routing, w1, w3, w2, *, cfg: ModelConfig, ep: ExpertParallel
):
  """This shard's routed-expert output [N, D] by one all_to_all of copies over `expert`
  (inside a shard_map over the whole mesh); also which copies were kept [N*k] (all, unless a
  dropping `capacity_factor` is set) and whether the layer needed more than one round of the
  bounded buffer (a bool every rank agrees on)."""
  n = x_NxD.shape[0]
  k = cfg.num_experts_per_tok
  r = ep.size
  e_loc = cfg.n_routed_experts // r
  s = slots_per_rank(n, cfg, ep)
  experts_C = routing.experts_Nxk.reshape(-1)
  dst_C = experts_C // e_loc
  slot_C = slot_positions(dst_C, r)
  a2a = lambda a: jax.lax.all_to_all(a, EXPERT, 0, 0)
  e_of_C = experts_C % e_loc
  w_C = routing.weights_Nxk.reshape(-1).astype(jnp.float32)

  def run(s, lo=0):
    """Send the copies in slots [lo, lo + s) to their experts' ranks in an [R, s, D] buffer,
    run, and bring them back: (their weighted sum per token [N, D], which copies went)."""
    sent_C = (slot_C >= lo) & (slot_C < lo + s)
    slot_or_oob_C = jnp.where(sent_C, slot_C - lo, s)  # s: not in this round
    # Row [j, t] of the buffer is the (lo + t)-th copy this rank sends to rank j; each copy's
    # routing weight travels with it and gates it at its expert (see the module docstring:
    # the combine is then a plain sum that keeps nothing for the backward).
    y_CxD = exchange(
      x_NxD, k, e_of_C, w_C, dst_C, slot_or_oob_C, r, s, a2a, w1, w3, w2,
      cfg=cfg, expected_rows=n * k,
    )  # fmt: skip
    return combine(y_CxD, k, x_NxD.dtype), sent_C

  s_fast = fast_slots_per_rank(n, cfg, ep)
  if s_fast >= s:
    y_NxD, keep_C = run(s)
    return y_NxD, keep_C, jnp.zeros((), bool)
  # Dropless with bounded buffers: one round of the fast buffer carries every copy unless
  # some rank overflows it; then all ranks run further rounds of the same size together
  # (the round count is pmax'ed, so every rank runs the same all_to_alls) until the last
  # copy has gone — at most ceil(S / s_fast) rounds, never a worst-case buffer.
  y_NxD, _ = run(s_fast)
  rounds = jax.lax.pmax(jnp.max(slot_C) // s_fast + 1, BATCH)
  extra = lambda j: run(s_fast, j * s_fast)[0]
  y_NxD = further_rounds(y_NxD, rounds, -(-s // s_fast), extra)
  return y_NxD, jnp.ones((n * k,), bool), rounds > 1


def shard_routed_experts(
  x_bxLxD,
  gate_DxE,
  bias_E,
  w1,
  w3,
  w2,
  cfg: ModelConfig,
  replicas=None,
  *,
  ep: ExpertParallel,
  reduce_stats: bool = True,
  dispatch: Callable = flat_dispatch,
):
  """One mesh shard (inside a shard_map over the whole mesh): route, dispatch (flat, or the
  two-stage node-then-GPU one of `parallel/node_dispatch.py`), local experts, combine.
  Statistics are psum'ed over the mesh (`reduce_stats`), or left per shard for a caller that
  sums them itself (the pipeline sums its micro-batches and shards). `replicas` (redundant
  experts): each copy goes to one replica of its expert, w1/w3/w2 being the physical
  experts (R / ranks per rank); loads and the balance loss stay per logical expert."""
  b, l, d = x_bxLxD.shape
  n, k = b * l, cfg.num_experts_per_tok
  x_NxD = x_bxLxD.reshape(n, d)
  routing: Routing = route(x_NxD, gate_DxE, bias_E, cfg)
  sent, run_cfg = routing, cfg
  if replicas is not None:
    offset = jax.lax.axis_index(EXPERT)
    sent = routing._replace(experts_Nxk=to_replicas(routing.experts_Nxk, *replicas, offset))
    run_cfg = dataclasses.replace(cfg, n_routed_experts=w1.shape[0] * ep.size)
  e_loc = run_cfg.n_routed_experts // ep.size
  y_NxD, keep_C, fallback = dispatch(x_NxD, sent, w1, w3, w2, cfg=run_cfg, ep=ep)
  dst_C = sent.experts_Nxk.reshape(-1) // e_loc
  psum = functools.partial(jax.lax.psum, axis_name=BATCH)

  # Global statistics: sums over every shard of the mesh (or this shard's share).
  psum_stats = psum if reduce_stats else (lambda v: v)
  load_E = psum_stats(jax.lax.stop_gradient(expert_load(routing.experts_Nxk, cfg.n_routed_experts)))
  balance = sequence_balance_loss(routing, b, cfg)
  if reduce_stats:
    balance = psum(balance) / ep.n_shards
  node_C = dst_C // ep.ranks_per_node
  my_node = jax.lax.axis_index(EXPERT) // ep.ranks_per_node
  remote_C = (node_C != my_node) & keep_C
  reached_NxkxM = (
    (node_C[:, None] == jnp.arange(ep.n_nodes)[None, :]) & remote_C[:, None]
  ).reshape(n, k, ep.n_nodes)
  stats = {
    "dropped_copies": psum_stats(jnp.sum(~keep_C).astype(jnp.float32)),
    "cross_node_copies": psum_stats(jnp.sum(remote_C).astype(jnp.float32)),
    "remote_node_sends": psum_stats(jnp.sum(jnp.any(reached_NxkxM, axis=1)).astype(jnp.float32)),
    # Every shard agrees on it; per shard, a 1/n_shards share sums to the count.
    "dispatch_fallbacks": fallback.astype(jnp.float32) / (1 if reduce_stats else ep.n_shards),
  }
  aux = {"load": load_E, "balance_loss": balance, **jax.lax.stop_gradient(stats)}
  return y_NxD.reshape(b, l, d), aux


def routed_experts(
  x_BxLxD: jax.Array,
  gate_DxE: jax.Array,
  bias_E: jax.Array,
  w1_ExDxF: jax.Array,
  w3_ExDxF: jax.Array,
  w2_ExFxD: jax.Array,
  cfg: ModelConfig,
  ep: ExpertParallel,
  dispatch: Callable = flat_dispatch,
  replicas=None,
):
  """The routed-expert half of DeepSeekMoE, expert-parallel over `ep.mesh`.

  Returns (y [B, L, D] without the shared experts, aux) with aux = {load [E], balance_loss,
  dropped_copies, cross_node_copies, remote_node_sends}, every entry a global value.
  `replicas` = (slots [E, M], counts [E]): redundant experts, w1/w3/w2 holding R physical
  experts split over `expert` (`layers/routing.to_replicas`).
  """
  ep.validate(cfg)
  if replicas is not None:
    if dispatch is not flat_dispatch:
      raise ValueError("redundant experts run with the flat dispatch (ep_two_stage=False)")
    if w1_ExDxF.shape[0] % ep.size:
      raise ValueError(
        f"{w1_ExDxF.shape[0]} physical experts do not split over the `expert` axis of {ep.size}"
      )
  b = x_BxLxD.shape[0]
  if b % ep.n_shards:
    raise ValueError(
      f"expert parallelism splits the batch over data x expert = {ep.n_shards} "
      f"shards; batch {b} is not divisible by it"
    )
  batch_spec = P(BATCH, None, None)
  expert_spec = P(EXPERT, None, None)
  aux_specs = {"load": P(), "balance_loss": P(), **{name: P() for name in STATS}}

  # check_vma=False: the expert kernel's skip branches (cond / scan carries) build
  # mesh-invariant zeros next to per-shard blocks, which the VMA checker rejects. The
  # sharded-vs-unsharded tests check values and gradients instead.
  def shard(x, gate, bias, w1, w3, w2, replicas):
    return shard_routed_experts(x, gate, bias, w1, w3, w2, cfg, replicas, ep=ep, dispatch=dispatch)

  fn = jax.shard_map(
    shard,
    mesh=ep.mesh,
    in_specs=(batch_spec, P(), P(), expert_spec, expert_spec, expert_spec, P()),
    out_specs=(batch_spec, aux_specs),
    check_vma=False,
  )
  return fn(x_BxLxD, gate_DxE, bias_E, w1_ExDxF, w3_ExDxF, w2_ExFxD, replicas)


def buffer_bytes(n_local_tokens: int, cfg: ModelConfig, ep: ExpertParallel, itemsize: int) -> dict:
  """Per-device dispatch buffer sizes vs the real copies: the worst-case (fallback) buffer
  and the fast one a dropless step uses unless some rank overflows it."""
  s = slots_per_rank(n_local_tokens, cfg, ep)
  s_fast = fast_slots_per_rank(n_local_tokens, cfg, ep)
  d = cfg.hidden_size
  real = n_local_tokens * cfg.num_experts_per_tok
  return {
    "slots_per_rank": s,
    "buffer_rows": ep.size * s,
    "real_copies": real,
    "send_buffer_bytes": ep.size * s * d * itemsize,
    "overhead_vs_real": ep.size * s / real,
    "fast_slots_per_rank": s_fast,
    "fast_send_buffer_bytes": ep.size * s_fast * d * itemsize,
    "fast_overhead_vs_real": ep.size * s_fast / real,
  }
