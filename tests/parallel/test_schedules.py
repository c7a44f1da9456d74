"""Pipeline schedules: generators, dependency checker, simulator, op tables, Gantt plots."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_jax.parallel import schedules as S
from dsv3_jax.parallel.timeline import plot_timeline, timeline_from_tables, timeline_stats


def _cases():
  out = []
  for pp in (1, 2, 3, 4, 8):
    for n in sorted({1, 3, pp, 2 * pp}):
      out.append(("gpipe", pp, n))
    for n in sorted({pp, pp + 1, 2 * pp, 20}):
      out += [("1f1b", pp, n), ("zb1p", pp, n)]
    for n in sorted({2 * pp, 2 * pp + 1, 20}):
      if n >= 2 * pp:
        out.append(("dualpipev", pp, n))
  for pp in (2, 4, 6, 8):
    for n in sorted({2 * pp, 2 * pp + 2, 16, 20, 32}):
      if n >= 2 * pp:
        out.append(("dualpipe", pp, n))
  return out


CASES = _cases()
UNIT = S.Costs(F=1, B=1, W=1, BW=1, FB=1)


def _build(name, pp, n):
  return S.SCHEDULES[name](pp, n)


def _check_tables(sched: S.Schedule, tab: S.OpTables):
  """Tables hold exactly the schedule's ops, in rank order, dependency- and ASAP-tight."""
  assert tab.stacked().shape == (len(S.TABLE_FIELDS), sched.pp, tab.T)
  assert tab.stacked().dtype == np.int32
  made, at = {}, {}
  for r in range(sched.pp):
    ticks = np.flatnonzero(tab.kind[r] != S.KIND_CODES["NOOP"])
    got = []
    for t in ticks:
      kind = S.CODE_KINDS[int(tab.kind[r, t])]
      fields = {
        f: int(getattr(tab, f)[r, t])
        for f in ("mb", "stage", "direction", "mb2", "stage2", "direction2")
      }
      op = S.Op(kind, **fields)
      got.append(op)
      at[(r, int(t))] = op
      for e in S._produces(op):
        made[e] = int(t)
      sends = {tr.payload: tr.dst for tr in S.op_sends(sched, op)}
      assert tab.act_dst[r, t] == sends.get("act", -1)
      assert tab.grad_dst[r, t] == sends.get("grad", -1)
    assert tuple(got) == sched.ops[r], f"rank {r} ops differ"
  assert len(made) == 3 * sched.n_dirs * sched.mb_per_dir * sched.n_stages
  for (r, t), op in at.items():
    deps = [made[e] for e in S._needs(op, sched.n_stages)]
    assert all(d < t for d in deps), f"rank {r} tick {t}: {op} uses a value made later"
    # ASAP: the op could not start a tick earlier.
    if t > 0:
      assert (r, t - 1) in at or (t - 1) in deps, f"rank {r} tick {t}: {op} not tight"
  assert tab.T == S.simulate(sched, UNIT).makespan


# ---------------------------------------------------------------- generators
@pytest.mark.parametrize("name,pp,n", CASES)
def test_generated_schedules_are_valid(name, pp, n):
  sched = _build(name, pp, n)
  S.validate(sched)
  assert sched.pp == pp and sched.n_mb == n
  for row in sched.ops:  # sends only ever go to a neighbour or the rank itself
    for op in row:
      for tr in S.op_sends(sched, op) + S.op_recvs(sched, op):
        assert abs(tr.src - tr.dst) <= 1


@pytest.mark.parametrize(
  "fn,kwargs,param",
  [
    (S.gpipe, dict(pp=0, n_mb=4), "pp"),
    (S.gpipe, dict(pp=2, n_mb=0), "n_mb"),
    (S.one_f_one_b, dict(pp=4, n_mb=3), "n_mb"),
    (S.one_f_one_b, dict(pp=2.0, n_mb=4), "pp"),
    (S.zb1p, dict(pp=8, n_mb=7), "n_mb"),
    (S.dualpipe, dict(pp=3, n_mb=12), "pp"),
    (S.dualpipe, dict(pp=4, n_mb=6), "n_mb"),
    (S.dualpipe, dict(pp=4, n_mb=9), "n_mb"),
    (S.dualpipev, dict(pp=4, n_mb=7), "n_mb"),
  ],
)
def test_generators_reject_bad_sizes(fn, kwargs, param):
  with pytest.raises(ValueError, match=rf"^{param}=.*invalid: .*"):
    fn(**kwargs)


def test_dualpipe_phase_structure():
  """Rank 0 of pp=4, n_mb=8, spelled out (``^`` = direction 1)."""
  sched = S.dualpipe(4, 8)
  row0 = " ".join(map(str, sched.ops[0]))
  assert row0 == (
    "F0@s0 F1@s0 F2@s0 F^0@s3 B^0@s3 W^0@s3 F^1@s3 F3@s0&BW^1@s3 "
    "F^2@s3&BW0@s0 BW^2@s3 F^3@s3&BW1@s0 BW^3@s3 B2@s0 W2@s0 B3@s0 W3@s0"
  )
  # DualPipe is mirror-symmetric: rank pp-1-r runs rank r's program with directions swapped.
  for r in range(4):
    mirrored = tuple(
      dataclasses.replace(
        o, direction=1 - o.direction, direction2=-1 if o.kind != "FB" else 1 - o.direction2
      )
      for o in sched.ops[3 - r]
    )
    assert mirrored == sched.ops[r]
  assert sched.ops[1][4].kind == "FB"
  assert S.dualpipe(4, 8, split_middle_first=True).ops[1][4:6] == (
    S.Op("F", 2, 1, 0),
    S.Op("BW", 0, 2, 1),
  )


def test_layouts():
  dp, dv = S.dualpipe(6, 12), S.dualpipev(3, 6)
  assert [dp.rank_of(s, 1) for s in range(6)] == [5, 4, 3, 2, 1, 0]
  assert [dv.rank_of(s) for s in range(6)] == [0, 1, 2, 2, 1, 0]
  assert list(dp.params_per_rank()) == [2.0] * 6
  assert list(dv.params_per_rank()) == [1.0] * 3
  assert list(S.one_f_one_b(4, 4).params_per_rank()) == [1.0] * 4


# ----------------------------------------------------------------- validate
def _replace_row(sched, r, row):
  ops = list(sched.ops)
  ops[r] = tuple(row)
  return dataclasses.replace(sched, ops=tuple(ops))


def test_validate_rejects_missing_and_duplicate_ops():
  sched = S.one_f_one_b(2, 2)
  with pytest.raises(S.ScheduleError, match="F of direction 0 mb 1 stage 1 runs 0 times"):
    S.validate(_replace_row(sched, 1, [o for o in sched.ops[1] if o != S.Op("F", 1, 1)]))
  with pytest.raises(S.ScheduleError, match="runs 2 times"):
    S.validate(_replace_row(sched, 0, sched.ops[0] + (S.Op("W", 0, 0),)))
  with pytest.raises(S.ScheduleError, match="lives on rank 1"):
    S.validate(_replace_row(sched, 0, sched.ops[0] + (S.Op("F", 0, 1),)))
  with pytest.raises(S.ScheduleError, match="stage_rank"):
    S.validate(dataclasses.replace(sched, stage_rank=((0, 2),)))
  with pytest.raises(S.ScheduleError, match="out of range"):
    S.validate(_replace_row(sched, 0, sched.ops[0] + (S.Op("F", 5, 0),)))


def test_validate_rejects_bad_orders():
  sched = S.one_f_one_b(2, 2)  # rank 0: F0 F1 BW0 BW1, rank 1: F0 BW0 F1 BW1
  local = _replace_row(
    sched, 1, [S.Op("BW", 0, 1), S.Op("F", 0, 1), S.Op("F", 1, 1), S.Op("BW", 1, 1)]
  )
  with pytest.raises(S.ScheduleError, match=r"deadlocks:\n  rank 0 .*\n  rank 1 op #0 BW0@s1"):
    S.validate(local)
  cross = _replace_row(
    _replace_row(sched, 0, [S.Op("F", 0, 0), S.Op("BW", 0, 0), S.Op("F", 1, 0), S.Op("BW", 1, 0)]),
    1,
    [S.Op("F", 0, 1), S.Op("F", 1, 1), S.Op("BW", 0, 1), S.Op("BW", 1, 1)],
  )
  with pytest.raises(S.ScheduleError, match="deadlocks"):
    S.validate(cross)
  # W before its B on the same rank.
  z = S.zb1p(2, 2)
  row = list(z.ops[1])
  i, j = row.index(S.Op("B", 0, 1)), row.index(S.Op("W", 0, 1))
  row[i], row[j] = row[j], row[i]
  with pytest.raises(S.ScheduleError, match="deadlocks"):
    S.validate(_replace_row(z, 1, row))


def test_op_rejects_bad_fields():
  with pytest.raises(ValueError, match="kind"):
    S.Op("X", 0, 0)
  with pytest.raises(ValueError, match="FB"):
    S.Op("FB", 0, 0)
  assert S.Op("FB", 1, 0, 0, 0, 3, 1).halves() == (("F", 0, 1, 0), ("BW", 1, 0, 3))


# ---------------------------------------------------------------- simulator
COSTS = [
  dict(F=1, B=1, W=1, FB=3),
  dict(F=1, B=2, W=1, FB=3),
  dict(F=1, B=1, W=1),
  dict(F=2, B=2, W=1, FB=4),
  dict(F=1, B=1.5, W=0.5, FB=2.5),
  dict(F=1, B=1, W=1, FB=2),
]


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("gen", [S.one_f_one_b, S.gpipe])
def test_1f1b_bubble_formula(gen, pp, cost):
  c = S.Costs(**cost)
  for n in (pp, pp + 3, 16, 20):
    res = S.simulate(gen(pp, n), c)
    np.testing.assert_allclose(res.bubble, (pp - 1) * (c.F + c.of("BW")))  # every rank
    np.testing.assert_allclose(res.busy, n * (c.F + c.of("BW")))


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("pp", [2, 4, 8])
def test_dualpipe_bubble_formula(pp, cost):
  """Max bubble = (pp/2-1)(F&B + B_full - 3W) when W <= B and F <= B."""
  c = S.Costs(**cost)
  assert c.W <= c.B and c.F <= c.B
  formula = (pp // 2 - 1) * (c.of("FB") + c.of("BW") - 3 * c.W)
  for n in sorted({2 * pp, 2 * pp + 2, 16, 20}):
    paper = S.simulate(S.dualpipe(pp, n), c)
    assert paper.max_bubble == pytest.approx(formula)
    upstream = S.simulate(S.dualpipe(pp, n, split_middle_first=True), c)
    assert upstream.max_bubble <= formula + 1e-9
    gain = c.F + c.of("BW") - c.of("FB")  # busy time the split adds on middle ranks
    assert paper.makespan - 1e-9 <= upstream.makespan + gain
    assert upstream.makespan <= paper.makespan + gain + 1e-9


@pytest.mark.parametrize("cost", COSTS)
def test_dualpipev_bubble_and_memory(cost):
  """DualPipeV on pp ranks behaves like DualPipe on 2*pp ranks."""
  c = S.Costs(**cost)
  for pp in (1, 2, 4):
    res = S.simulate(S.dualpipev(pp, 2 * pp + 6), c)
    assert res.max_bubble == pytest.approx((pp - 1) * (c.of("FB") + c.of("BW") - 3 * c.W))
    assert list(res.peak_activations) == [2 * pp + 1] * pp


def test_dualpipe_bubble_outside_formula_conditions():
  """With F > B or W > B the formula undercounts; the upstream middle split can beat it."""
  for cost in (dict(F=2, B=1, W=1), dict(F=1, B=1, W=2, FB=4)):
    c = S.Costs(**cost)
    formula = 3 * (c.of("FB") + c.of("BW") - 3 * c.W)
    assert S.simulate(S.dualpipe(8, 20), c).max_bubble > formula
  c = S.Costs(F=1, B=2, W=1, FB=3)
  split = S.simulate(S.dualpipe(8, 20, split_middle_first=True), c)
  assert split.max_bubble == pytest.approx(8.0)  # formula: 9


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_zb1p_bubble_formula(pp):
  for cost in (dict(F=1, B=1, W=1), dict(F=1, B=2, W=1), dict(F=2, B=1, W=0.5)):
    c = S.Costs(**cost)
    for n in (pp, 2 * pp + 1, 20):
      res = S.simulate(S.zb1p(pp, n), c)
      assert res.max_bubble == pytest.approx((pp - 1) * (c.F + c.B - c.W))


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_activation_memory(pp):
  for n in (2 * pp, 20):
    one = S.simulate(S.one_f_one_b(pp, n))
    assert one.peak_activations[0] == pp
    assert list(one.peak_activations) == list(range(pp, 0, -1))
    assert list(S.peak_activations(S.zb1p(pp, n))) == list(range(pp, 0, -1))
    dual = S.simulate(S.dualpipe(pp, n), S.Costs(F=1, B=2, W=1, FB=3))
    assert list(dual.peak_activations) == [pp + 1] * pp
    assert list(dual.params) == [2.0] * pp and list(one.params) == [1.0] * pp
  assert list(S.peak_activations(S.gpipe(pp, 7))) == [7] * pp


def test_simulate_comm_latency_and_dict_costs():
  sched = S.dualpipe(4, 12)
  base = S.simulate(sched, {"F": 1, "B": 2, "W": 1, "FB": 3})
  slow = S.simulate(sched, {"F": 1, "B": 2, "W": 1, "FB": 3, "comm": 0.5})
  assert slow.makespan > base.makespan
  np.testing.assert_allclose(slow.busy, base.busy)
  for rank, spans in enumerate(slow.timelines):
    assert [s.op for s in spans] == list(sched.ops[rank])
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))
  fb = next(s for s in base.timelines[0] if s.kind == "FB")
  assert isinstance(fb.mb, tuple) and isinstance(fb.direction, tuple)
  stats = timeline_stats(base.timelines)
  assert stats["makespan"] == pytest.approx(base.makespan)
  np.testing.assert_allclose(stats["bubble"], base.bubble)


# --------------------------------------------------------------- op tables
@pytest.mark.parametrize("name,pp,n", CASES)
def test_tables_respect_dependencies(name, pp, n):
  sched = _build(name, pp, n)
  _check_tables(sched, S.to_tables(sched))


def test_table_codes_and_sizes():
  assert S.KIND_CODES == {"NOOP": 0, "F": 1, "B": 2, "W": 3, "BW": 4, "FB": 5}
  tab = S.to_tables(S.one_f_one_b(4, 8))
  assert tab.T == 2 * (8 + 4 - 1)  # 1F1B on a unit tick grid
  assert tab.kind[0, :4].tolist() == [1, 1, 1, 1] and tab.act_dst[0, 0] == 1
  assert tab.grad_dst[0].max() == -1 and tab.act_dst[3].max() == -1
  dv = S.to_tables(S.dualpipev(2, 4))
  turn = (dv.stage == 1) & (dv.kind == S.KIND_CODES["F"])
  assert set(dv.act_dst[turn].tolist()) == {1}  # stage 1 -> stage 2 is a local hand-off


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(S.SCHEDULES)), pp=st.integers(1, 8), extra=st.integers(0, 9))
def test_random_sizes(name, pp, extra):
  if name == "dualpipe":
    pp += pp % 2
    n = 2 * pp + 2 * extra
  else:
    n = (2 * pp if name == "dualpipev" else pp) + extra
  sched = _build(name, pp, n)
  S.validate(sched)
  _check_tables(sched, S.to_tables(sched))


# ---------------------------------------------------------------- plotting
def _is_png(path):
  data = path.read_bytes()
  return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_simulated_and_measured(tmp_path):
  res = S.simulate(S.dualpipe(4, 10), S.Costs(F=1, B=2, W=1, FB=3))
  out = plot_timeline(res.timelines, tmp_path / "dualpipe.png", "DualPipe pp=4")
  assert out.endswith("dualpipe.png") and _is_png(tmp_path / "dualpipe.png")
  measured = [
    [(0.0, 0.01, "F", 0), (0.012, 0.02, "F&B", (1, 0), (0, 1)), (0.02, 0.03, "W", 0)],
    [(0.005, 0.015, "send", None)],
    [],
  ]
  plot_timeline(measured, tmp_path / "measured.png", "measured", time_unit="s")
  assert _is_png(tmp_path / "measured.png")
  ticks = timeline_from_tables(S.to_tables(S.dualpipev(2, 4)))
  plot_timeline(ticks, tmp_path / "ticks.png")
  assert _is_png(tmp_path / "ticks.png")
