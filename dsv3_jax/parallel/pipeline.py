"""Runs a pipeline schedule in SPMD JAX: a `lax.scan` over ticks inside `shard_map`.

The schedule is data (`schedules.to_tables`): a static int32 table with one row of
ops per rank and one column per tick.  Inside `jax.shard_map` over the `pipe` axis
every rank reads its own row with `lax.axis_index('pipe')`, and at each tick

1. reads what its op needs from fixed-size buffers (received activations and
   gradients, residuals kept since the forward), at indices precomputed here;
2. runs its op, chosen with `lax.switch`: ``F`` (forward), ``B`` (input
   gradient), ``W`` (weight gradient, deferred), ``BW`` (both) or ``FB`` (a
   forward and a full backward of two micro-batches in one tick, as one loop over
   the layers of both) -- the programs come from one traced VJP of the stage
   (`stage_vjp.StageVJP`);
3. ends with the same `ppermute`s on every rank: activations and gradients, to
   the next and to the previous rank (idle ranks send zeros).

Stages are model chunks.  A rank holds one chunk per *slot*: 1F1B/GPipe/ZB1P one
(chunk ``r``), DualPipe two (chunk ``r`` for direction 0 and ``pp-1-r`` for
direction 1), DualPipeV two (``r`` and ``2pp-1-r``).  The executor builds the
per-slot copies of the stacked chunk parameters with a static gather before
`shard_map` and maps their gradients back with that gather's VJP, so DualPipe's
two copies of a chunk add their gradients exactly as its all-reduce would.

Buffers are allocated here in numpy by a free-list over the static schedule, so
their sizes are the schedule's true peaks (1F1B holds ``pp - r`` activations,
GPipe all of them); one extra entry per buffer always reads zero and one takes
writes that go nowhere, so no op needs a branch to skip a read or a write.

Ticks are lock-step: every rank's op of a tick must finish before the tick's
`ppermute`s.  `granularity="op"` runs one generated op per tick
(`schedules.to_tables`), so a tick where one rank runs ``F`` and its neighbour a
full backward lasts a full backward.  `granularity="unit"` (the default) gives
every tick about one unit of work instead: it places the generated schedule at
its simulated times with ``F = B = W = 1`` and runs each ``BW`` as ``B, W`` and
each ``FB`` as ``F, B, W`` on consecutive ticks -- the generated schedule's op
order, data and timing, on a finer clock.

Known costs (measured by `experiments/pipeline_schedules.py`): every tick reads one
entry of each residual buffer and writes one (the scratch entry when the op has
nothing to write), so a tick moves a micro-batch's residuals even when idle;
writing inside the switched branches instead made XLA copy whole buffers, which
is slower still.  Gradients are summed per leaf in the scan carry; the op's `switch`
returns the new sums in buffers of its own (XLA:CPU gives a conditional's outputs their
own buffers here, measured), so a rank keeps two copies of the gradients of what it holds.
(Flattening them into one vector per slot, as before, added the op's flat gradient as a
third.)  For the MoE layers ``B`` then ``W`` can cost more than
``BW``: partial evaluation of the routed experts' overflow ``cond`` hands ``W`` that
branch's known values (see `stage_vjp`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from dsv3_jax.parallel import schedules as S
from dsv3_jax.parallel.stage_vjp import StageVJP

GRANULARITIES = ("unit", "op")
# Row fields of the executor's table, per rank and tick.
FIELDS = (
  "kind",
  "f_slot",
  "f_stage",
  "f_mb",
  "f_act",
  "f_r1w",
  "b_slot",
  "b_stage",
  "b_mb",
  "b_grad",
  "b_r1",
  "b_r2w",
  "b_r2",
  "send_act",
  "send_grad",
  "arr_act_r",
  "arr_act_l",
  "arr_act_s",
  "arr_grad_r",
  "arr_grad_l",
  "arr_grad_s",
)
FI = {f: i for i, f in enumerate(FIELDS)}
SEND = {"none": 0, "right": 1, "left": 2, "self": 3}  # right: to rank r+1
BUFFERS = ("act", "grad", "r1", "r2")
ZERO, SCRATCH = -1, -2  # placeholders for each buffer's always-zero / write-only entry


UNIT_COSTS = S.Costs(F=1.0, B=1.0, W=1.0)  # BW = 2 and FB = 3 units


def unit_ops(op: S.Op) -> list[S.Op]:
  """The unit ops an op runs as under ``granularity="unit"``: ``BW -> B, W`` and
  ``FB -> F, B, W``; ``F``, ``B`` and ``W`` stay as they are."""
  out = []
  for k, d, m, s in op.halves():
    out += [S.Op(p, m, s, d) for p in (("B", "W") if k == "BW" else (k,))]
  return out


class Placed(NamedTuple):
  """One executed op: its tick, the (unit) op, the index of the generated op it
  belongs to in its rank's program, and the values it sends at the end of the tick."""

  tick: int
  op: S.Op
  origin: int
  sends: tuple


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything static the executor needs, computed once in numpy.

  ``fields`` is int32 ``[len(FIELDS), pp, T]``; ``placed[r]`` lists rank ``r``'s
  executed ops; ``slot_stage[k, r]`` is the chunk held in slot ``k`` of rank ``r``;
  ``sizes`` the entries of each buffer (without the zero and scratch entries);
  ``perms`` the ppermute directions in use per payload.
  """

  source: S.Schedule
  granularity: str
  placed: tuple[tuple[Placed, ...], ...]
  fields: np.ndarray
  slot_stage: np.ndarray
  sizes: dict
  perms: dict
  kinds: tuple[int, ...]

  @property
  def pp(self) -> int:
    return self.source.pp

  @property
  def T(self) -> int:
    return self.fields.shape[2]

  @property
  def n_slots(self) -> int:
    return self.slot_stage.shape[0]


class _Alloc:
  """A free-list allocator; ``peak`` is the number of entries ever needed."""

  def __init__(self):
    self.free, self.where, self.peak = [], {}, 0

  def put(self, key) -> int:
    if key in self.where:
      raise AssertionError(f"buffer key {key} allocated twice")
    idx = min(self.free) if self.free else self.peak
    if self.free:
      self.free.remove(idx)
    else:
      self.peak += 1
    self.where[key] = idx
    return idx

  def get(self, key, release: bool) -> int:
    idx = self.where[key]
    if release:
      del self.where[key]
      self.free.append(idx)
    return idx


def _place(schedule: S.Schedule, granularity: str) -> list[list[Placed]]:
  """Ticks of every executed op.  ``op``: one tick per generated op, as soon as its
  inputs exist (`schedules.to_tables`).  ``unit``: the generated schedule simulated
  with ``F = B = W = 1``; an op starting at ``t`` runs its unit ops at ``t, t+1, ...``.
  A unit op sends what it made at the end of its tick (a ``BW``'s gradient after
  its ``B``): never later than the generated op would, and its receiver still runs
  at the generated time, so only the inbox holds the value a little longer."""
  costs = S.Costs(F=1, B=1, W=1, BW=1, FB=1) if granularity == "op" else UNIT_COSTS
  sim = S.simulate(schedule, costs)
  rows = []
  for r, spans in enumerate(sim.timelines):
    row = []
    for i, span in enumerate(spans):
      parts = [span.op] if granularity == "op" else unit_ops(span.op)
      for j, part in enumerate(parts):
        row.append(Placed(int(round(span.start)) + j, part, i, tuple(S.op_sends(schedule, part))))
    rows.append(row)
  return rows


def make_plan(schedule: S.Schedule, granularity: str = "unit") -> Plan:
  """Validate ``schedule`` and lay it out as executor tables (see :class:`Plan`)."""
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r} must be one of {GRANULARITIES}")
  S.validate(schedule)
  placed = _place(schedule, granularity)
  pp, n_st = schedule.pp, schedule.n_stages
  T = max((p.tick + 1 for row in placed for p in row), default=0)
  holds = [
    sorted(
      {(d, s) for d in range(schedule.n_dirs) for s in range(n_st) if schedule.rank_of(s, d) == r}
    )
    for r in range(pp)
  ]
  if len({len(h) for h in holds}) != 1:
    raise ValueError(f"schedule {schedule.name!r}: every rank must hold the same number of stages")
  slot_of = [{ds: k for k, ds in enumerate(h)} for h in holds]
  slot_stage = np.array(
    [[holds[r][k][1] for r in range(pp)] for k in range(len(holds[0]))], np.int32
  )

  f = np.full((len(FIELDS), pp, T), ZERO, np.int32)
  for name in (
    "f_r1w",
    "b_r2w",
    "arr_act_r",
    "arr_act_l",
    "arr_act_s",
    "arr_grad_r",
    "arr_grad_l",
    "arr_grad_s",
  ):
    f[FI[name]] = SCRATCH
  for name in (
    "kind",
    "f_slot",
    "f_stage",
    "f_mb",
    "b_slot",
    "b_stage",
    "b_mb",
    "send_act",
    "send_grad",
  ):
    f[FI[name]] = 0
  alloc = [{b: _Alloc() for b in BUFFERS} for _ in range(pp)]
  gmb = lambda d, m: d * schedule.mb_per_dir + m
  perms = {"act": set(), "grad": set()}
  at = {}
  for r, row in enumerate(placed):
    for p in row:
      if (r, p.tick) in at:
        raise AssertionError(f"rank {r} has two ops at tick {p.tick}")
      at[(r, p.tick)] = p

  for t in range(T):
    here = {r: at[(r, t)] for r in range(pp) if (r, t) in at}
    for r, p in here.items():
      op, a = p.op, alloc[r]
      f[FI["kind"], r, t] = S.KIND_CODES[op.kind]
      for k, d, m, s in op.halves():
        key = (d, m, s)
        if k == "F":
          f[FI["f_slot"], r, t], f[FI["f_stage"], r, t] = slot_of[r][(d, s)], s
          f[FI["f_mb"], r, t] = gmb(d, m)
          if s > 0:
            f[FI["f_act"], r, t] = a["act"].get(key, release=True)
        else:
          f[FI["b_slot"], r, t], f[FI["b_stage"], r, t] = slot_of[r][(d, s)], s
          f[FI["b_mb"], r, t] = gmb(d, m)
          if k in ("B", "BW") and s < n_st - 1:
            f[FI["b_grad"], r, t] = a["grad"].get(key, release=True)
          f[FI["b_r1"], r, t] = a["r1"].get(key, release=k in ("W", "BW"))
          if k == "W":
            f[FI["b_r2"], r, t] = a["r2"].get(key, release=True)
      for k, d, m, s in op.halves():  # writes come after every read of the tick
        if k == "F":
          f[FI["f_r1w"], r, t] = a["r1"].put((d, m, s))
        elif k == "B":
          f[FI["b_r2w"], r, t] = a["r2"].put((d, m, s))
    for r, p in here.items():  # sends land at the end of the tick
      for tr in p.sends:
        step = tr.dst - tr.src
        way = {0: "self", 1: "right", -1: "left"}.get(step)
        if way is None:
          raise ValueError(f"schedule {schedule.name!r}: rank {r} sends to non-neighbour {tr.dst}")
        if f[FI["send_" + tr.payload], r, t]:
          raise AssertionError(f"rank {r} sends two {tr.payload}s at tick {t}")
        f[FI["send_" + tr.payload], r, t] = SEND[way]
        perms[tr.payload].add(way)
        key = (tr.direction, tr.mb, tr.stage)
        f[FI[f"arr_{tr.payload}_{way[0]}"], tr.dst, t] = alloc[tr.dst][tr.payload].put(key)

  sizes = {b: max(a[b].peak for a in alloc) for b in BUFFERS}
  for b, names in (
    ("act", ("f_act", "arr_act_r", "arr_act_l", "arr_act_s")),
    ("grad", ("b_grad", "arr_grad_r", "arr_grad_l", "arr_grad_s")),
    ("r1", ("f_r1w", "b_r1")),
    ("r2", ("b_r2w", "b_r2")),
  ):
    for name in names:
      v = f[FI[name]]
      v[v == ZERO] = sizes[b]
      v[v == SCRATCH] = sizes[b] + 1
  kinds = tuple(sorted({int(k) for k in np.unique(f[FI["kind"]])} - {0}))
  return Plan(
    schedule,
    granularity,
    tuple(tuple(r) for r in placed),
    f,
    slot_stage,
    sizes,
    {k: tuple(sorted(v)) for k, v in perms.items()},
    kinds,
  )


# ------------------------------------------------------------------------- executor
class _Packer:
  """Packs a list of arrays into one flat vector per dtype, so that buffers of many
  residuals are a handful of scan-carry leaves (XLA compiles far faster)."""

  def __init__(self, avals: Sequence[Any]):
    self.sizes: dict[str, int] = {}
    self.slots = []
    for a in avals:
      key = jnp.dtype(a.dtype).name
      off = self.sizes.get(key, 0)
      self.slots.append((key, off, int(np.prod(a.shape, dtype=np.int64)), tuple(a.shape)))
      self.sizes[key] = off + self.slots[-1][2]

  def buffers(self, n: int) -> dict:
    return {k: jnp.zeros((n, s), k) for k, s in self.sizes.items()}

  def zeros(self) -> dict:
    return {k: jnp.zeros((s,), k) for k, s in self.sizes.items()}

  def pack(self, values: Sequence[jax.Array]) -> dict:
    parts: dict[str, list] = {k: [] for k in self.sizes}
    for v, (k, _, _, _) in zip(values, self.slots):
      parts[k].append(jnp.reshape(v, (-1,)).astype(k))
    return {k: jnp.concatenate(p) for k, p in parts.items()}

  def unpack(self, flat: dict) -> list:
    return [flat[k][o : o + n].reshape(shape) for k, o, n, shape in self.slots]


def _index(tree, i):
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _zeros(tree):
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)


def _to_slots(a: jax.Array, idx: np.ndarray) -> jax.Array:
  """`a[idx]` ([n_stages, ...] -> [n_slots, pp, ...]) written so that a stage-sharded `a`
  stays local: a slot holding chunk r on rank r is `a` itself, DualPipe's mirrored slot
  (chunk pp-1-r) is `a` reversed (a collective permute), anything else a gather."""
  pp = idx.shape[1]
  rows = []
  for row in idx:
    if a.shape[0] == pp and np.array_equal(row, np.arange(pp)):
      rows.append(a)
    elif a.shape[0] == pp and np.array_equal(row, np.arange(pp)[::-1]):
      rows.append(jnp.flip(a, 0))
    else:
      rows.append(a[row])
  return jnp.stack(rows)


class Pipeline:
  """Runs ``stage_fn`` under ``schedule`` over the ``pipe_axis`` of ``mesh``.

  ``stage_fn(stage_params, shared_params, x, stage_consts, shared_consts, mb, stage)
  -> ((y, loss), aux)`` computes one stage (model chunk ``stage``, an int32
  scalar) for one micro-batch: ``x`` is the previous stage's ``y`` (ignored by
  stage 0), ``loss`` the scalar this stage adds to the objective, ``aux`` a
  pytree of float arrays summed over micro-batches (metrics, loads).
  ``shared_params`` (embedding, head, ...) are replicated; ``stage_fn`` decides
  with ``stage`` where it uses them.  ``batch_axes`` are further mesh axes that
  split the batch (data parallelism); their gradients are summed.
  """

  def __init__(
    self,
    stage_fn: Callable,
    schedule: S.Schedule,
    mesh: Mesh,
    *,
    pipe_axis: str = "pipe",
    batch_axes: Sequence[str] = (),
    granularity: str = "unit",
    stage_specs: Any = None,
    shared_specs: Any = None,
  ):
    if pipe_axis not in mesh.shape:
      raise ValueError(f"mesh has no axis {pipe_axis!r} (axes: {tuple(mesh.shape)})")
    if mesh.shape[pipe_axis] != schedule.pp:
      raise ValueError(
        f"schedule {schedule.name!r} has pp={schedule.pp} ranks but mesh axis "
        f"{pipe_axis!r} has {mesh.shape[pipe_axis]} devices"
      )
    self.stage_fn, self.mesh, self.pipe_axis = stage_fn, mesh, pipe_axis
    self.batch_axes = tuple(a for a in batch_axes if a in mesh.shape)
    self.plan = make_plan(schedule, granularity)
    self.stage_vjp: StageVJP | None = None  # set when traced (residual sizes, for reports)
    # Placements inside the shard_map (from the sharding plan): per stage-param leaf a
    # PartitionSpec of its [n_stages, ...] array whose first entry is the pipe axis (each
    # rank holds its own stages) and whose others may split further dims (routed experts
    # over `expert`); per shared-param leaf its spec. None: the pipe axis only / replicated.
    self.stage_specs, self.shared_specs = stage_specs, shared_specs

  @property
  def n_stages(self) -> int:
    return self.plan.source.n_stages

  @property
  def n_mb(self) -> int:
    return self.plan.source.n_mb

  def __call__(
    self,
    stage_params,
    shared_params,
    stage_consts,
    shared_consts,
    batch,
    act: jax.ShapeDtypeStruct,
    *,
    probe: Callable | None = None,
  ):
    """Loss, aux and gradients of one pipelined step, summed over micro-batches and
    batch shards: ``(loss, aux, stage_grads, shared_grads)``.

    ``stage_params``/``stage_consts`` have a leading axis of ``n_stages`` (one entry
    per chunk); ``batch`` leaves a leading batch axis, split over ``batch_axes``
    and then into ``n_mb`` micro-batches per shard; ``act`` is one local
    micro-batch's activation.

    ``probe(rank, tick, phase, dep) -> float32 scalar``, when given, is traced at
    the start (``phase`` 0, ``dep`` the loss carried from the previous tick) and
    the end (``phase`` 1, ``dep`` the op's loss) of every tick's op, and the op
    (resp. the tick's loss) is made to depend on its result, which must be 0.
    It is the executor's one instrumentation point: `benchmarks.pipeline_timeline`
    records host timestamps there to measure each op.
    """
    plan = self.plan
    idx = plan.slot_stage
    lead = {jnp.shape(a)[0] for a in jax.tree.leaves((stage_params, stage_consts))}
    if lead != {self.n_stages}:
      raise ValueError(
        f"stage_params/stage_consts need a leading axis of n_stages="
        f"{self.n_stages}, got {sorted(lead)}"
      )
    to_slots = lambda tree: jax.tree.map(lambda a: _to_slots(a, idx), tree)  # [n_slots, pp, ..]
    slot_params, unslot = jax.vjp(to_slots, stage_params)
    slot_consts = to_slots(stage_consts)
    slots_spec, rep = P(None, self.pipe_axis), P()
    p_specs = (self._slot_specs(stage_params), self._shared_specs(shared_params))
    batch_spec = P(self.batch_axes) if self.batch_axes else P()
    body = jax.shard_map(
      lambda *a: self._body(*a, act=act, probe=probe, p_specs=p_specs),
      mesh=self.mesh,
      in_specs=(p_specs[0], p_specs[1], slots_spec, rep, batch_spec),
      out_specs=(rep, rep, p_specs[0], p_specs[1]),
      check_vma=False,
    )
    loss, aux, g_slots, g_shared = body(
      slot_params, shared_params, slot_consts, shared_consts, batch
    )
    (g_stage,) = unslot(g_slots)
    return loss, aux, g_stage, g_shared

  def _slot_specs(self, stage_params):
    if self.stage_specs is None:
      return jax.tree.map(lambda _: P(None, self.pipe_axis), stage_params)
    return jax.tree.map(lambda s: P(None, *s), self.stage_specs, is_leaf=lambda x: isinstance(x, P))

  def _shared_specs(self, shared_params):
    if self.shared_specs is None:
      return jax.tree.map(lambda _: P(), shared_params)
    return self.shared_specs

  def _reduce_axes(self, spec: P, extra: tuple = ()) -> tuple:
    """The axes a leaf's gradient sums over: the batch axes (and `extra`) it is not split
    over; a leaf split over `expert` keeps its own experts' gradient per expert rank."""
    used = set()
    for entry in spec:
      used.update(entry if isinstance(entry, tuple) else (entry,) if entry else ())
    return tuple(a for a in extra + self.batch_axes if a not in used)

  # ----------------------------------------------------------------- on one rank
  def _body(self, slot_p, shared_p, slot_c, shared_c, batch, *, act, probe, p_specs):
    plan, n_mb = self.plan, self.n_mb
    slot_p = jax.tree.map(lambda a: a[:, 0], slot_p)  # [n_slots, ...]
    slot_c = jax.tree.map(lambda a: a[:, 0], slot_c)
    rank = jax.lax.axis_index(self.pipe_axis)
    b_loc = {jnp.shape(a)[0] for a in jax.tree.leaves(batch)}
    if len(b_loc) != 1 or next(iter(b_loc)) % n_mb:
      raise ValueError(
        f"the local batch {sorted(b_loc)} must split into n_mb={n_mb} equal micro-batches"
      )
    mbs = jax.tree.map(lambda a: a.reshape(n_mb, a.shape[0] // n_mb, *a.shape[1:]), batch)

    def fn(params, x, consts):
      (sp, shp), (sc, shc, mb, stage) = params, consts
      return self.stage_fn(sp, shp, x, sc, shc, mb, stage)

    x0 = jnp.zeros(act.shape, act.dtype)
    p0 = (_index(slot_p, 0), shared_p)
    consts0 = (_index(slot_c, 0), shared_c, _index(mbs, 0), jnp.int32(0))
    n_leaves = lambda t: len(jax.tree.leaves(t))
    varying = (
      [False] * n_leaves(consts0[:2]) + [True] * n_leaves(consts0[2]) + [False]
    )  # only the micro-batch's own inputs vary per micro-batch
    sv = StageVJP(fn, p0, x0, consts0, varying)
    self.stage_vjp = sv
    (y0, loss0), aux0 = jax.eval_shape(fn, p0, x0, consts0)
    pk1, pk2 = _Packer(sv.r1_avals), _Packer(sv.r2_avals)
    size = plan.sizes
    buf = lambda n, a: jnp.zeros((n + 2, *a.shape), a.dtype)
    carry = dict(
      act=buf(size["act"], act),
      grad=buf(size["grad"], act),
      r1=pk1.buffers(size["r1"] + 2),
      r2=pk2.buffers(size["r2"] + 2),
      g_slot=_zeros(slot_p),
      g_shared=_zeros(shared_p),
      loss=jnp.zeros((), loss0.dtype),
      aux=_zeros(aux0),
    )
    one = jnp.ones((), loss0.dtype)

    def consts_of(row, half):
      return (
        _index(slot_c, row[FI[half + "_slot"]]),
        shared_c,
        _index(mbs, row[FI[half + "_mb"]]),
        row[FI[half + "_stage"]],
      )

    def params_of(row, half):
      return (_index(slot_p, row[FI[half + "_slot"]]), shared_p)

    def add_grads(gs, gsh, row, dp):
      dsp, dshp = dp
      gs = jax.tree.map(lambda a, d: a.at[row[FI["b_slot"]]].add(d), gs, dsp)
      return gs, jax.tree.map(jnp.add, gsh, dshp)

    # Branch outputs: (y, loss, aux, packed r1, dx, packed r2, g_slot, g_shared).
    def noop(gs, gsh, row, x, g, r1, r2):
      return (
        _zeros(y0),
        jnp.zeros_like(one),
        _zeros(aux0),
        pk1.zeros(),
        jnp.zeros_like(g),
        pk2.zeros(),
        gs,
        gsh,
      )

    def op_f(gs, gsh, row, x, g, r1, r2):
      (y, loss), aux, r1n = sv.forward(params_of(row, "f"), x, consts_of(row, "f"))
      return (y, loss, aux, pk1.pack(r1n)) + noop(gs, gsh, row, x, g, r1, r2)[4:]

    def op_b(gs, gsh, row, x, g, r1, r2):
      dx, dp, r2n = sv.backward_input(
        pk1.unpack(r1), params_of(row, "b"), consts_of(row, "b"), (g, one)
      )
      return (
        noop(gs, gsh, row, x, g, r1, r2)[:4] + (dx, pk2.pack(r2n)) + add_grads(gs, gsh, row, dp)
      )

    def op_w(gs, gsh, row, x, g, r1, r2):
      dp = sv.backward_weight(
        pk1.unpack(r1), pk2.unpack(r2), params_of(row, "b"), consts_of(row, "b")
      )
      return noop(gs, gsh, row, x, g, r1, r2)[:6] + add_grads(gs, gsh, row, dp)

    def op_bw(gs, gsh, row, x, g, r1, r2):
      dp, dx = sv.backward(pk1.unpack(r1), params_of(row, "b"), consts_of(row, "b"), (g, one))
      out = noop(gs, gsh, row, x, g, r1, r2)
      return out[:4] + (dx, out[5]) + add_grads(gs, gsh, row, dp)

    def op_fb(gs, gsh, row, x, g, r1, r2):  # one loop over both chunks' layers
      (y, loss), aux, r1n, dp, dx = sv.forward_backward(
        params_of(row, "f"),
        x,
        consts_of(row, "f"),
        pk1.unpack(r1),
        params_of(row, "b"),
        consts_of(row, "b"),
        (g, one),
      )
      return (y, loss, aux, pk1.pack(r1n), dx, pk2.zeros()) + add_grads(gs, gsh, row, dp)

    table = {1: op_f, 2: op_b, 3: op_w, 4: op_bw, 5: op_fb}
    branches = [noop] + [table[k] for k in plan.kinds]
    branch_of = np.zeros(len(S.KIND_CODES), np.int32)
    for i, k in enumerate(plan.kinds, start=1):
      branch_of[k] = i
    branch_of = jnp.asarray(branch_of)
    fields = jnp.asarray(plan.fields)
    rows = jnp.swapaxes(jax.lax.dynamic_index_in_dim(fields, rank, 1, keepdims=False), 0, 1)
    pp, axis = plan.pp, self.pipe_axis
    ring = {
      "right": [(i, i + 1) for i in range(pp - 1)],
      "left": [(i, i - 1) for i in range(1, pp)],
    }

    def tick(c, inp):
      row, t = inp
      kind = row[FI["kind"]]
      if probe is not None:
        s0 = probe(rank, t, 0, c["loss"])
        kind = jnp.where(s0 != 0, 0, kind)  # a data dependence: the op starts after the probe
      x = c["act"][row[FI["f_act"]]]
      g = c["grad"][row[FI["b_grad"]]]
      r1 = {k: v[row[FI["b_r1"]]] for k, v in c["r1"].items()}
      r2 = {k: v[row[FI["b_r2"]]] for k, v in c["r2"].items()}
      y, loss, aux, r1n, dx, r2n, g_slot, g_shared = jax.lax.switch(
        branch_of[kind], branches, c["g_slot"], c["g_shared"], row, x, g, r1, r2
      )
      if probe is not None:
        s1 = probe(rank, t, 1, loss)
        loss = jnp.where(s1 != 0, 0.0, loss)
      c = dict(
        c,
        g_slot=g_slot,
        g_shared=g_shared,
        loss=c["loss"] + loss,
        aux=jax.tree.map(jnp.add, c["aux"], aux),
      )
      c["r1"] = {k: v.at[row[FI["f_r1w"]]].set(r1n[k]) for k, v in c["r1"].items()}
      c["r2"] = {k: v.at[row[FI["b_r2w"]]].set(r2n[k]) for k, v in c["r2"].items()}
      for payload, value in (("act", y), ("grad", dx)):
        inbox = c[payload]
        for way in plan.perms[payload]:
          if way == "self":
            got = value
          else:
            sent = jnp.where(row[FI["send_" + payload]] == SEND[way], value, jnp.zeros_like(value))
            got = jax.lax.ppermute(sent, axis, ring[way])
          inbox = inbox.at[row[FI[f"arr_{payload}_{way[0]}"]]].set(got)
        c[payload] = inbox
      return c, None

    c, _ = jax.lax.scan(tick, carry, (rows, jnp.arange(plan.T, dtype=jnp.int32)))
    all_axes = (axis,) + self.batch_axes
    is_spec = lambda x: isinstance(x, P)

    def reduce(g, spec, extra=()):
      axes = self._reduce_axes(spec, extra)
      return jax.lax.psum(g, axes) if axes else g

    g_slot = jax.tree.map(
      lambda s, g: reduce(g, s)[:, None], p_specs[0], c["g_slot"], is_leaf=is_spec
    )
    g_shared = jax.tree.map(
      lambda s, g: reduce(g, s, (axis,)), p_specs[1], c["g_shared"], is_leaf=is_spec
    )
    loss, aux = jax.lax.psum((c["loss"], c["aux"]), all_axes)
    return loss, aux, g_slot, g_shared
