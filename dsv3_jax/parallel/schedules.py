"""Pipeline-parallel schedules as data: generators, checker, simulator, op tables.

Model
-----
A pipeline carries micro-batches through ``n_stages`` stages (layer chunks) laid
out over ``pp`` ranks.  A schedule may run micro-batches in one or two
*directions*; a micro-batch is named by ``(direction, mb)`` with ``mb`` counted
inside its direction (``0 <= mb < n_mb // n_dirs``), and in every direction it
visits stages ``0, 1, ..., n_stages - 1`` in order.  ``Schedule.stage_rank``
says which rank holds each (direction, stage):

* GPipe / 1F1B / ZB1P: one direction, stage ``s`` on rank ``s``.
* DualPipe: two directions, ``pp`` stages each.  Direction 0 enters at rank 0
  (stage ``s`` on rank ``s``); direction 1 enters at rank ``pp - 1`` and runs
  through the second copy of the model (stage ``s`` on rank ``pp - 1 - s``).
  Rank ``r`` therefore holds direction-0 stage ``r`` and direction-1 stage
  ``pp - 1 - r``, i.e. model layer chunks ``r`` and ``pp - 1 - r``.
* DualPipeV: one direction, ``2 * pp`` stages, rank ``r`` holds stages ``r``
  and ``2 * pp - 1 - r`` (a "V": down the ranks and back up).

Each rank runs an ordered list of :class:`Op`.  Kinds:

* ``F``  forward of one stage for one micro-batch;
* ``B``  input-gradient backward (zero-bubble split; a later ``W`` finishes it);
* ``W``  weight-gradient backward of a stage already ``B``-ed on this rank;
* ``BW`` full backward (``B`` and ``W`` fused), as used by GPipe and 1F1B;
* ``FB`` DualPipe's overlapped pair: the forward ``(mb, stage, direction)``
  computed together with the *full* backward ``(mb2, stage2, direction2)`` of
  another micro-batch (the public DualPipe code never splits an overlapped
  backward).

Data dependencies (``S = n_stages``): ``F(s)`` needs ``F(s-1)`` of the same
micro-batch; ``B(s)``/``BW(s)`` need ``F(s)`` and ``B(s+1)``; ``W(s)`` needs
``B(s)``.  Sends are derived from the layout: a forward output goes to the rank
of stage ``s + 1``, an input gradient to the rank of stage ``s - 1``
(:func:`op_sends`); with the layouts above these are always neighbours or the
rank itself.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Mapping, NamedTuple

import numpy as np

KINDS = ("F", "B", "W", "BW", "FB")
#: Integer codes used by :func:`to_tables`; ``NOOP`` marks an idle tick.
KIND_CODES = {"NOOP": 0, "F": 1, "B": 2, "W": 3, "BW": 4, "FB": 5}
CODE_KINDS = {v: k for k, v in KIND_CODES.items()}


class ScheduleError(ValueError):
  """A schedule breaks the exactly-once or the dependency rules."""


@dataclasses.dataclass(frozen=True)
class Op:
  """One unit of work on a rank.  ``mb2/stage2/direction2`` are used by ``FB`` only."""

  kind: str
  mb: int
  stage: int
  direction: int = 0
  mb2: int = -1
  stage2: int = -1
  direction2: int = -1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Op.kind must be one of {KINDS}, got {self.kind!r}")
    if (self.kind == "FB") != (self.mb2 >= 0):
      raise ValueError("Op.mb2/stage2/direction2 are set exactly for kind 'FB'")

  def halves(self) -> tuple[tuple[str, int, int, int], ...]:
    """Primitive parts ``(kind, direction, mb, stage)``; ``FB`` is an ``F`` plus a ``BW``."""
    if self.kind == "FB":
      return (
        ("F", self.direction, self.mb, self.stage),
        ("BW", self.direction2, self.mb2, self.stage2),
      )
    return ((self.kind, self.direction, self.mb, self.stage),)

  def __str__(self) -> str:
    return "&".join(f"{k}{'' if d == 0 else '^'}{m}@s{s}" for k, d, m, s in self.halves())


class Transfer(NamedTuple):
  """A value crossing from ``src`` to ``dst`` (``src == dst``: a local hand-off)."""

  src: int
  dst: int
  payload: str  # "act" (forward output) or "grad" (input gradient)
  direction: int
  mb: int
  stage: int  # stage that consumes the value


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Per-rank op lists plus the stage layout.

  ``ops[r]`` is rank ``r``'s program; ``stage_rank[d][s]`` is the rank of stage
  ``s`` in direction ``d``; ``n_mb`` counts micro-batches over all directions.
  """

  name: str
  n_mb: int
  n_stages: int
  stage_rank: tuple[tuple[int, ...], ...]
  ops: tuple[tuple[Op, ...], ...]

  @property
  def pp(self) -> int:
    return len(self.ops)

  @property
  def n_dirs(self) -> int:
    return len(self.stage_rank)

  @property
  def mb_per_dir(self) -> int:
    return self.n_mb // self.n_dirs

  def rank_of(self, stage: int, direction: int = 0) -> int:
    return self.stage_rank[direction][stage]

  def params_per_rank(self) -> np.ndarray:
    """Parameters held per rank in units of ``1/pp`` of the model (1F1B: 1, DualPipe: 2)."""
    held = np.zeros(self.pp)
    for row in self.stage_rank:
      for r in row:
        held[r] += self.pp / self.n_stages
    return held


# --------------------------------------------------------------------------- deps
def _produces(op: Op):
  out = []
  for k, d, m, s in op.halves():
    if k in ("F", "B", "W"):
      out.append((k, d, m, s))
    else:  # BW
      out += [("B", d, m, s), ("W", d, m, s)]
  return out


def _needs(op: Op, n_stages: int):
  out = []
  for k, d, m, s in op.halves():
    if k == "F" and s > 0:
      out.append(("F", d, m, s - 1))
    elif k in ("B", "BW"):
      out.append(("F", d, m, s))
      if s < n_stages - 1:
        out.append(("B", d, m, s + 1))
    elif k == "W":
      out.append(("B", d, m, s))
  return out


def op_sends(schedule: Schedule, op: Op) -> list[Transfer]:
  """Values ``op`` produces for other stages: forward outputs and input gradients."""
  src, out = None, []
  for k, d, m, s in op.halves():
    src = schedule.rank_of(s, d)
    if k == "F" and s < schedule.n_stages - 1:
      out.append(Transfer(src, schedule.rank_of(s + 1, d), "act", d, m, s + 1))
    if k in ("B", "BW") and s > 0:
      out.append(Transfer(src, schedule.rank_of(s - 1, d), "grad", d, m, s - 1))
  return out


def op_recvs(schedule: Schedule, op: Op) -> list[Transfer]:
  """Values ``op`` consumes that another stage produced (local hand-offs included)."""
  out = []
  for k, d, m, s in op.halves():
    dst = schedule.rank_of(s, d)
    if k == "F" and s > 0:
      out.append(Transfer(schedule.rank_of(s - 1, d), dst, "act", d, m, s))
    if k in ("B", "BW") and s < schedule.n_stages - 1:
      out.append(Transfer(schedule.rank_of(s + 1, d), dst, "grad", d, m, s))
  return out


# --------------------------------------------------------------------- generators
def _check(name: str, value, ok: bool, rule: str) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not ok:
    raise ValueError(f"{name}={value!r} is invalid: {rule}")


def _linear(name: str, n_mb: int, rows) -> Schedule:
  pp = len(rows)
  return Schedule(name, n_mb, pp, (tuple(range(pp)),), tuple(tuple(r) for r in rows))


def gpipe(pp: int, n_mb: int) -> Schedule:
  """GPipe: every rank runs all forwards, then all full backwards."""
  _check("pp", pp, pp >= 1, "pp must be an integer >= 1")
  _check("n_mb", n_mb, n_mb >= 1, "n_mb must be an integer >= 1")
  return _linear(
    "gpipe",
    n_mb,
    [
      [Op("F", m, r) for m in range(n_mb)] + [Op("BW", m, r) for m in range(n_mb)]
      for r in range(pp)
    ],
  )


def _one_f_one_b_rows(pp: int, n_mb: int, split: bool, w_delay: Callable[[int], int]):
  rows = []
  for r in range(pp):
    warm, row, pending = pp - r - 1, [], collections.deque()
    row += [Op("F", m, r) for m in range(warm)]
    for i in range(n_mb):
      if warm + i < n_mb:
        row.append(Op("F", warm + i, r))
      row.append(Op("B" if split else "BW", i, r))
      if split:
        pending.append(i)
        if len(pending) > w_delay(r) or warm + i + 1 >= n_mb:
          row.append(Op("W", pending.popleft(), r))
    row += [Op("W", m, r) for m in pending]
    rows.append(row)
  return rows


def one_f_one_b(pp: int, n_mb: int) -> Schedule:
  """1F1B (PipeDream-flush): ``pp - r - 1`` warm-up forwards, then F/BW alternation."""
  _check("pp", pp, pp >= 1, "pp must be an integer >= 1")
  _check("n_mb", n_mb, n_mb >= pp, f"1F1B needs n_mb >= pp (pp={pp})")
  return _linear("1f1b", n_mb, _one_f_one_b_rows(pp, n_mb, False, lambda r: 0))


def zb1p(pp: int, n_mb: int) -> Schedule:
  """ZB-H1 zero-bubble 1F1B: ``B`` split from ``W``; rank ``r`` defers its ``W`` by
  ``r`` micro-batches in the steady state and flushes them while the cool-down
  ``B`` chain is in flight.  Same activation peak as 1F1B; simulated bubble
  ``(pp - 1)(F + B - W)`` exactly when ``W <= F`` and ``W <= B``."""
  _check("pp", pp, pp >= 1, "pp must be an integer >= 1")
  _check("n_mb", n_mb, n_mb >= pp, f"ZB1P needs n_mb >= pp (pp={pp})")
  return _linear("zb1p", n_mb, _one_f_one_b_rows(pp, n_mb, True, lambda r: r))


def _dualpipe_rank(r: int, pp: int, n_half: int, split_middle_first: bool) -> list[Op]:
  """Rank ``r``'s program in DualPipe's 8 phases; ``n_half`` micro-batches per direction.

  Local phase 0 is the direction entering on this rank's side of the pipeline
  (direction 0 for ``r < pp/2``, direction 1 otherwise), phase 1 the other.
  Split ``B``s (followed later by a FIFO ``W``) are used exactly where the
  public DualPipe code enables zero-bubble; everywhere else backward is ``BW``.
  """
  h, hr = pp // 2, min(r, pp - 1 - r)
  second = int(r >= h)
  stage = {0: r, 1: pp - 1 - r}  # direction -> stage held on this rank
  nf, nb, wq, ops = [0, 0], [0, 0], collections.deque(), []

  def fwd(p):
    d = p ^ second
    ops.append(Op("F", nf[d], stage[d], d))
    nf[d] += 1

  def bwd(p, zb):
    d = p ^ second
    ops.append(Op("B" if zb else "BW", nb[d], stage[d], d))
    if zb:
      wq.append((nb[d], stage[d], d))
    nb[d] += 1

  def wgt():
    ops.append(Op("W", *wq.popleft()))

  def fb(p_f, p_b):
    df, db = p_f ^ second, p_b ^ second
    ops.append(Op("FB", nf[df], stage[df], df, nb[db], stage[db], db))
    nf[df] += 1
    nb[db] += 1

  for _ in range(2 * (h - hr - 1)):  # 1: nF0
    fwd(0)
  for _ in range(hr + 1):  # 2: nF0F1
    fwd(0), fwd(1)
  for _ in range(h - hr - 1):  # 3: nB1W1F1 (zero bubble)
    bwd(1, True), wgt(), fwd(1)
  for i in range(n_half - pp + hr + 1):  # 4: n(F0&B1, F1&B0)
    if i == 0 and hr == h - 1 and split_middle_first:
      fwd(0), bwd(1, False)  # middle ranks: not overlapped, as upstream
    else:
      fb(0, 1)
    fb(1, 0)
  for _ in range(h - hr - 1):  # 5: nB1, F1&B0
    bwd(1, False), fb(1, 0)
  zb = False
  for i in range(hr + 1):  # 6: nB1B0, second half zero bubble
    zb = zb or (i == (hr + 1) // 2 and hr % 2 == 1)
    bwd(1, zb)
    zb = zb or (i == (hr + 1) // 2 and hr % 2 == 0)
    bwd(0, zb)
  for _ in range(h - hr - 1):  # 7: nW, B0 (zero bubble)
    wgt(), bwd(0, True)
  for _ in range(hr + 1):  # 8: nW
    wgt()
  assert not wq and nf == nb == [n_half, n_half]
  return ops


def dualpipe(pp: int, n_mb: int, *, split_middle_first: bool = False) -> Schedule:
  """DualPipe (DeepSeek-V3): bidirectional, ``n_mb // 2`` micro-batches per direction.

  Rank ``r`` (``h = pp/2``, ``hr = min(r, pp-1-r)``) runs 8 phases; "0"/"1" are
  local phases (see :func:`_dualpipe_rank`):
  ``2(h-hr-1) F0 | (hr+1) [F0 F1] | (h-hr-1) [B1 W F1] |
  (n_mb/2-pp+hr+1) [F0&B1 F1&B0] | (h-hr-1) [BW1 F1&B0] | (hr+1) [B1 B0] |
  (h-hr-1) [W B0] | (hr+1) W``.  As in the public DualPipe code, only phase
  3, phase 7 and the second half of phase 6 split ``B``/``W`` (each ``W`` takes
  the oldest pending ``B``, FIFO); phase-5 and the first half of phase-6
  backwards are ``BW`` and overlapped pairs always carry a full backward.

  Simulated with zero latency and costs ``W <= B`` and ``F <= B`` (``B`` =
  input-grad), the largest per-rank bubble is exactly DeepSeek's
  ``(pp/2 - 1)(F&B + BW - 3W)`` for any valid ``n_mb``; when ``F > B`` or
  ``W > B`` it exceeds the formula.  ``split_middle_first=True`` reproduces the
  public code exactly: the two middle ranks run their first phase-4 pair as
  separate ``F`` and ``BW``.  That lowers their bubble, partly because their
  busy time grows by ``F + BW - F&B``; the makespan comes out slightly
  shorter, equal or up to ``F + BW - F&B`` longer depending on the costs (and
  one tick longer on the unit grid of :func:`to_tables` at pp=2), so the
  default keeps the uniform pairs.
  """
  _check("pp", pp, pp >= 2 and pp % 2 == 0, "DualPipe needs an even pp >= 2")
  _check(
    "n_mb",
    n_mb,
    n_mb >= 2 * pp and n_mb % 2 == 0,
    f"DualPipe needs an even n_mb >= 2*pp (pp={pp}); n_mb counts both directions",
  )
  rows = tuple(tuple(_dualpipe_rank(r, pp, n_mb // 2, split_middle_first)) for r in range(pp))
  return Schedule("dualpipe", n_mb, pp, (tuple(range(pp)), tuple(range(pp - 1, -1, -1))), rows)


def dualpipev(pp: int, n_mb: int) -> Schedule:
  """DualPipeV ("cut-in-half" DualPipe): ``2*pp`` stages in a V over ``pp`` ranks.

  It is DualPipe on ``2*pp`` ranks, kept to the first half of the ranks: by the
  mirror symmetry of DualPipe, the direction-1 work of rank ``r < pp`` on stage
  ``2*pp - 1 - r`` is exactly the direction-0 work the mirror rank would do.
  Hence its bubble is DualPipe's for ``2*pp`` ranks, ``(pp - 1)(F&B + BW - 3W)``
  in chunk costs, and its peak is ``2*pp + 1`` chunk activations (chunks are
  half a 1F1B stage here, so ``pp + 1/2`` stage units) with 1x parameters.
  """
  _check("pp", pp, pp >= 1, "DualPipeV needs pp >= 1")
  _check("n_mb", n_mb, n_mb >= 2 * pp, f"DualPipeV needs n_mb >= 2*pp (pp={pp})")
  rows = []
  for r in range(pp):
    ops = _dualpipe_rank(r, 2 * pp, n_mb, False)
    rows.append(
      tuple(dataclasses.replace(o, direction=0, direction2=min(o.direction2, 0)) for o in ops)
    )
  layout = tuple(s if s < pp else 2 * pp - 1 - s for s in range(2 * pp))
  return Schedule("dualpipev", n_mb, 2 * pp, (layout,), tuple(rows))


SCHEDULES: Mapping[str, Callable[[int, int], Schedule]] = {
  "gpipe": gpipe,
  "1f1b": one_f_one_b,
  "zb1p": zb1p,
  "dualpipe": dualpipe,
  "dualpipev": dualpipev,
}


# ------------------------------------------------------------------ list schedule
def _execute(schedule: Schedule, duration: Callable[[Op], float], comm: float):
  """Run every rank's ops in order; each starts once the rank is free and its inputs
  exist (plus ``comm`` when they come from another rank).  Returns per-rank
  ``(start, end)`` lists; raises :class:`ScheduleError` on a deadlock."""
  done: dict = {}
  ptr, free = [0] * schedule.pp, [0.0] * schedule.pp
  times: list[list[tuple[float, float]]] = [[] for _ in range(schedule.pp)]
  left = sum(len(o) for o in schedule.ops)
  while left:
    progressed = False
    for r, row in enumerate(schedule.ops):
      while ptr[r] < len(row):
        op, start = row[ptr[r]], free[r]
        deps = [done.get(e) for e in _needs(op, schedule.n_stages)]
        if any(x is None for x in deps):
          break
        for end, src in deps:
          start = max(start, end + (comm if src != r else 0.0))
        free[r] = start + float(duration(op))
        times[r].append((start, free[r]))
        for e in _produces(op):
          done[e] = (free[r], r)
        ptr[r] += 1
        left -= 1
        progressed = True
    if not progressed:
      stuck = []
      for r, row in enumerate(schedule.ops):
        if ptr[r] < len(row):
          miss = [e for e in _needs(row[ptr[r]], schedule.n_stages) if e not in done]
          stuck.append(f"rank {r} op #{ptr[r]} {row[ptr[r]]} waits for {miss}")
      raise ScheduleError(f"schedule {schedule.name!r} deadlocks:\n  " + "\n  ".join(stuck))
  return times


def validate(schedule: Schedule) -> None:
  """Check placement, exactly-once and dependency order; raise :class:`ScheduleError`.

  Every (direction, mb, stage) must get exactly one forward and exactly one
  input-gradient and one weight-gradient backward (``B`` + ``W`` or ``BW``, an
  ``FB``'s backward half counting as ``BW``); every op must sit on the rank of
  its stage; and executing the ranks' programs in order must never wait for an
  input that no rank can still produce (no op before its inputs exist).
  """
  problems, sched = [], schedule
  if any(
    len(row) != sched.n_stages or not all(0 <= x < sched.pp for x in row)
    for row in sched.stage_rank
  ):
    raise ScheduleError(
      f"schedule {sched.name!r}: stage_rank must be [n_dirs][n_stages] ranks in [0, {sched.pp})"
    )
  if sched.n_mb % sched.n_dirs:
    problems.append(f"n_mb={sched.n_mb} is not divisible by n_dirs={sched.n_dirs}")
  counts = collections.Counter()
  for r, row in enumerate(sched.ops):
    for i, op in enumerate(row):
      for k, d, m, s in op.halves():
        in_range = 0 <= d < sched.n_dirs and 0 <= s < sched.n_stages
        if not (in_range and 0 <= m < sched.mb_per_dir):
          problems.append(f"rank {r} op #{i} {op}: direction/stage/mb out of range")
        elif sched.rank_of(s, d) != r:
          problems.append(
            f"rank {r} op #{i} {op}: stage {s} (direction {d}) lives on rank {sched.rank_of(s, d)}"
          )
      counts.update(_produces(op))
  for k in ("F", "B", "W"):
    for d in range(sched.n_dirs):
      for m in range(sched.mb_per_dir):
        for s in range(sched.n_stages):
          if counts[(k, d, m, s)] != 1:
            problems.append(
              f"{k} of direction {d} mb {m} stage {s} runs "
              f"{counts[(k, d, m, s)]} times (expected once)"
            )
  if problems:
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise ScheduleError(
      f"schedule {sched.name!r} is invalid:\n  " + "\n  ".join(problems[:12]) + more
    )
  _execute(sched, lambda op: 1.0, 0.0)


# --------------------------------------------------------------------- simulator
@dataclasses.dataclass(frozen=True)
class Costs:
  """Op durations.  ``BW`` defaults to ``B + W``; ``FB`` (forward overlapped with a
  full backward) defaults to ``F + BW``, i.e. no overlap gain; ``comm`` is the
  latency added to every input that comes from another rank."""

  F: float = 1.0
  B: float = 1.0
  W: float = 1.0
  BW: float | None = None
  FB: float | None = None
  comm: float = 0.0

  def of(self, kind: str) -> float:
    bw = self.B + self.W if self.BW is None else self.BW
    if kind == "BW":
      return bw
    if kind == "FB":
      return self.F + bw if self.FB is None else self.FB
    return getattr(self, kind)


class Span(NamedTuple):
  """One box of a timeline.  For ``FB``, ``mb`` and ``direction`` are pairs (F half, B half).

  Measured timelines use the same shape; ``op`` may then be left ``None``.
  """

  start: float
  end: float
  kind: str
  mb: int | tuple[int, int]
  direction: int | tuple[int, int] = 0
  op: Op | None = None


@dataclasses.dataclass(frozen=True)
class SimResult:
  """Output of :func:`simulate`; per-rank arrays have shape ``[pp]``.

  ``bubble[r] = makespan - busy[r]`` where ``busy[r]`` is the summed duration of
  rank ``r``'s ops (an ``FB`` counts once, at its overlapped cost): the idle time
  of the rank inside the makespan, which is how DeepSeek-V3's Table 2 counts it
  (there the largest value over ranks).  ``peak_activations[r]`` counts
  micro-batch-stage activations held at once: one unit from the start of an
  ``F`` until the end of the ``B``/``BW`` (or ``FB`` backward half) of the same
  micro-batch and stage; ``W`` holds nothing extra.  ``params[r]`` is in units of
  ``1/pp`` of the model.
  """

  schedule: Schedule
  costs: Costs
  timelines: list[list[Span]]
  makespan: float
  busy: np.ndarray
  bubble: np.ndarray
  peak_activations: np.ndarray
  params: np.ndarray

  @property
  def max_bubble(self) -> float:
    return float(self.bubble.max())


def peak_activations(schedule: Schedule, stage_size=None) -> np.ndarray:
  """Per-rank peak of live activations (see :class:`SimResult`); shape ``[pp]``.

  Counted in micro-batch-stages, or, with ``stage_size(stage)``, in what one micro-batch of
  that stage keeps (e.g. bytes, when stages differ)."""
  size = stage_size or (lambda stage: 1)
  peaks = np.zeros(schedule.pp, dtype=np.int64 if stage_size is None else np.float64)
  for r, row in enumerate(schedule.ops):
    live = 0
    for op in row:
      live += sum(size(s) for k, _, _, s in op.halves() if k == "F")
      peaks[r] = max(peaks[r], live)
      live -= sum(size(s) for k, _, _, s in op.halves() if k in ("B", "BW"))
  return peaks


def simulate(schedule: Schedule, cost: Costs | Mapping[str, float] | None = None) -> SimResult:
  """List-schedule ``schedule`` under ``cost`` (a :class:`Costs` or a dict of its fields)."""
  costs = Costs(**cost) if isinstance(cost, Mapping) else (cost or Costs())
  times = _execute(schedule, lambda op: costs.of(op.kind), costs.comm)
  timelines = []
  for row, tr in zip(schedule.ops, times):
    spans = []
    for op, (t0, t1) in zip(row, tr):
      pair = op.kind == "FB"
      spans.append(
        Span(
          t0,
          t1,
          op.kind,
          (op.mb, op.mb2) if pair else op.mb,
          (op.direction, op.direction2) if pair else op.direction,
          op,
        )
      )
    timelines.append(spans)
  makespan = max((tr[-1][1] for tr in times if tr), default=0.0)
  busy = np.array([sum(t1 - t0 for t0, t1 in tr) for tr in times])
  return SimResult(
    schedule,
    costs,
    timelines,
    makespan,
    busy,
    makespan - busy,
    peak_activations(schedule),
    schedule.params_per_rank(),
  )


# -------------------------------------------------------------------- op tables
TABLE_FIELDS = (
  "kind",
  "mb",
  "stage",
  "direction",
  "mb2",
  "stage2",
  "direction2",
  "act_dst",
  "grad_dst",
)


@dataclasses.dataclass(frozen=True)
class OpTables:
  """Static per-rank op tables on a global tick grid; every array is int32 ``[pp, T]``.

  ``kind`` holds :data:`KIND_CODES` (``0`` = NOOP, idle tick); ``mb``, ``stage``,
  ``direction`` describe the op (the forward half of an ``FB``); ``mb2``,
  ``stage2``, ``direction2`` the backward half of an ``FB``.  ``act_dst`` is the
  rank that receives this tick's forward output (the rank itself for a local
  hand-off) and ``grad_dst`` the rank receiving its input gradient.  Unused
  entries are ``-1``.  A value made at tick ``t`` is consumed at tick ``> t``,
  so one neighbour exchange per tick suffices; each rank sends at most one
  activation and one gradient per tick.
  """

  kind: np.ndarray
  mb: np.ndarray
  stage: np.ndarray
  direction: np.ndarray
  mb2: np.ndarray
  stage2: np.ndarray
  direction2: np.ndarray
  act_dst: np.ndarray
  grad_dst: np.ndarray
  n_stages: int
  n_dirs: int
  n_mb: int

  @property
  def pp(self) -> int:
    return self.kind.shape[0]

  @property
  def T(self) -> int:
    return self.kind.shape[1]

  def stacked(self) -> np.ndarray:
    """All fields stacked in :data:`TABLE_FIELDS` order: int32 ``[9, pp, T]``."""
    return np.stack([getattr(self, f) for f in TABLE_FIELDS])


def to_tables(schedule: Schedule) -> OpTables:
  """Place every op on the earliest tick allowed by its rank order and its inputs.

  With unit-length ops and zero latency, list scheduling is as-soon-as-possible,
  so ``T`` is the minimum for the given per-rank op orders.
  """
  times = _execute(schedule, lambda op: 1.0, 0.0)
  T = int(max((tr[-1][1] for tr in times if tr), default=0))
  tab = {f: np.full((schedule.pp, T), -1, np.int32) for f in TABLE_FIELDS}
  tab["kind"][:] = KIND_CODES["NOOP"]
  for r, (row, tr) in enumerate(zip(schedule.ops, times)):
    for op, (t0, _) in zip(row, tr):
      t = int(t0)
      tab["kind"][r, t] = KIND_CODES[op.kind]
      for f in ("mb", "stage", "direction", "mb2", "stage2", "direction2"):
        tab[f][r, t] = getattr(op, f)
      for tr_ in op_sends(schedule, op):
        tab["act_dst" if tr_.payload == "act" else "grad_dst"][r, t] = tr_.dst
  return OpTables(**tab, n_stages=schedule.n_stages, n_dirs=schedule.n_dirs, n_mb=schedule.n_mb)


def describe(schedule: Schedule) -> str:
  """Human-readable listing, one line per rank (``^`` marks direction 1)."""
  return "\n".join(f"rank {r}: " + " ".join(map(str, row)) for r, row in enumerate(schedule.ops))
