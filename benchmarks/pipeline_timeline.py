"""Pipeline bubbles, simulated and measured: the harness behind `experiments/pipeline_schedules`.

For each schedule the same DeepSeek-V3 model (``2 * pp`` MoE layers, so that 1F1B,
DualPipe and DualPipeV cut it into equal stages) runs one pipelined forward+backward on a
``pipe`` mesh with per-tick timestamps (a `TickClock` passed as the executor's ``probe``);
the measured timeline is compared with the simulator's, under unit costs (``F = B = W = 1``)
and under the measured median cost of each op kind.

Bubble, as in DeepSeek-V3's Table 2 (arXiv 2412.19437, §3.2.1) and `schedules.simulate`:
per rank, the time inside the makespan that the rank does not spend in ops; the largest over
ranks is reported, and also divided by the makespan (comparable across units).  Measured busy
time counts only the ops themselves; waiting for the tick's `ppermute` and for slower ranks is
bubble.  The Gantt PNGs need matplotlib (the `plots` extra).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import config as config_lib
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.parallel import schedules as S
from dsv3_jax.parallel.pipeline import UNIT_COSTS, Plan
from dsv3_jax.parallel.timeline import plot_timeline
from dsv3_jax.train.pipeline_step import PipelineTrainer, make_schedule


class TickClock:
  """A `Pipeline` probe that records ``(rank, tick, 0|1, perf_counter)`` at the start and end
  of every tick's op into ``stamps`` (a host callback; the ops wait for it)."""

  def __init__(self):
    self.stamps: list[tuple[int, int, int, float]] = []

  def __call__(self, rank, tick, phase: int, dep):
    def record(r, t, d):
      del d
      self.stamps.append((int(r), int(t), phase, time.perf_counter()))
      return np.zeros((), np.float32)

    return jax.pure_callback(record, jax.ShapeDtypeStruct((), jnp.float32), rank, tick, dep)

  def clear(self):
    self.stamps.clear()


def _ticks(stamps) -> dict:
  at: dict = {}
  for r, t, phase, s in stamps:
    at.setdefault((r, t), [None, None])[phase] = s
  if not at:
    raise ValueError("no timing stamps: run the pipeline with probe=TickClock() first")
  return at


def measured_timeline(plan: Plan, stamps, *, merge: bool = True) -> list[list[tuple]]:
  """Per-rank boxes ``(start, end, kind, mb, direction)`` in seconds from ``stamps``.

  Every executed op of ``plan`` (a `Pipeline.plan`) is one box from its tick's start stamp to
  its end stamp.  With ``merge``, the unit ops of one generated op (a ``BW`` run as ``B, W``,
  an ``FB`` run as ``F, B, W``) become one box of the generated kind, from the first start to
  the last end, so the chart reads like the simulated one; the time between its unit ops
  (waiting on the other ranks' ticks) is not counted as busy by :func:`busy_time`.
  """
  at = _ticks(stamps)
  t0 = min(v[0] for v in at.values() if v[0] is not None)
  rows = []
  for r, placed in enumerate(plan.placed):
    spans = []
    for p in placed:
      start, end = at[(r, p.tick)]
      src = plan.source.ops[r][p.origin]
      if merge and spans and spans[-1][-1] == p.origin:
        spans[-1] = (spans[-1][0], end - t0) + spans[-1][2:]
        continue
      op = src if merge else p.op
      pair = op.kind == "FB"
      spans.append(
        (
          start - t0,
          end - t0,
          op.kind,
          (op.mb, op.mb2) if pair else op.mb,
          (op.direction, op.direction2) if pair else op.direction,
          p.origin,
        )
      )
    rows.append([s[:5] for s in spans])
  return rows


def busy_time(plan: Plan, stamps) -> list[float]:
  """Per-rank seconds spent inside ops (the sum of its ticks' op durations)."""
  at = _ticks(stamps)
  return [
    float(sum(at[(r, p.tick)][1] - at[(r, p.tick)][0] for p in placed))
    for r, placed in enumerate(plan.placed)
  ]


def busy_by_kind(plan: Plan, stamps) -> dict:
  """Median measured seconds of each executed op kind (costs for the simulator)."""
  at = _ticks(stamps)
  out: dict[str, list] = {}
  for r, placed in enumerate(plan.placed):
    for p in placed:
      a, b = at[(r, p.tick)]
      out.setdefault(p.op.kind, []).append(b - a)
  return {k: float(np.median(v)) for k, v in out.items()}


def bench_config(
  cfg: config_lib.Config, pp: int, n_mb: int, mb_size: int, seq_len: int | None = None
) -> config_lib.Config:
  """``cfg`` with ``2 * pp`` MoE layers, a ``pipe = pp`` mesh and ``n_mb`` micro-batches."""
  m = cfg.model
  return config_lib.replace(
    cfg,
    model={"num_hidden_layers": m.n_dense_layers + 2 * pp},
    train={"global_batch": n_mb * mb_size, "seq_len": seq_len or cfg.train.seq_len},
    parallel={"data": 1, "expert": 1, "pipe": pp, "microbatches": n_mb},
  )


def simulated(schedule: S.Schedule, costs: S.Costs) -> dict:
  sim = S.simulate(schedule, costs)
  return {
    "makespan": float(sim.makespan),
    "bubble": float(sim.max_bubble),
    "bubble_fraction": float(sim.max_bubble / sim.makespan),
    "bubble_per_rank": [float(b) for b in sim.bubble],
    "peak_activations": [int(a) for a in sim.peak_activations],
  }


def lockstep_makespan(trainer: PipelineTrainer, cost: dict) -> float:
  """The executor's makespan predicted from per-kind costs: every tick lasts its longest op."""
  plan = trainer.pipeline.plan
  total = 0.0
  for t in range(plan.T):
    total += max(
      (cost.get(p.op.kind, 0.0) for row in plan.placed for p in row if p.tick == t), default=0.0
    )
  return total


def pipeline_devices(pp: int) -> list[jax.Device]:
  """The default devices, or the host's (emulated) CPU devices when there are fewer than ``pp``
  accelerators and enough CPU devices."""
  devices = jax.devices()
  if len(devices) < pp and devices[0].platform != "cpu":
    cpus = jax.devices("cpu")
    if len(cpus) >= pp:
      return cpus
  return devices


def measure(
  cfg: config_lib.Config,
  name: str,
  *,
  repeats: int = 3,
  granularity: str = "unit",
  devices: Sequence[jax.Device] | None = None,
  outdir: str | None = None,
  seed: int = 0,
) -> dict:
  """Runs schedule ``name`` ``repeats`` times (after a compile run) and returns its stats.

  ``measured`` holds the run with the median makespan; ``runs`` every run's bubble
  fraction.  With ``outdir``, Gantt PNGs of the simulated and measured timelines are
  written there.
  """
  pp, n_mb = cfg.parallel.pipe, cfg.parallel.microbatches
  devices = list(pipeline_devices(pp) if devices is None else devices)[:pp]
  mesh = mesh_lib.make_mesh(cfg.parallel, devices)
  trainer = PipelineTrainer(cfg, mesh, schedule_name=name, granularity=granularity)
  pipe = trainer.pipeline
  state = trainer.init()
  tokens = jax.random.randint(
    jax.random.key(seed), (cfg.train.global_batch, cfg.train.seq_len + 1), 0, cfg.model.vocab_size
  )
  # Everything is returned: unused gradients would let XLA drop every backward op.
  clock = TickClock()
  step = jax.jit(lambda p, b, t: trainer.loss_and_grads(p, b, t, probe=clock))
  t0 = time.perf_counter()
  jax.block_until_ready(step(state.params, state.biases, tokens))
  compile_s = time.perf_counter() - t0
  runs = []
  for _ in range(repeats):
    clock.clear()
    jax.block_until_ready(step(state.params, state.biases, tokens))
    stamps = list(clock.stamps)
    rows = measured_timeline(pipe.plan, stamps)
    busy = busy_time(pipe.plan, stamps)
    makespan = max(s[1] for row in rows for s in row) - min(s[0] for row in rows for s in row)
    bubble = [makespan - b for b in busy]
    runs.append(
      dict(
        stamps=stamps,
        rows=rows,
        makespan=makespan,
        busy=busy,
        bubble=bubble,
        cost=busy_by_kind(pipe.plan, stamps),
      )
    )
  runs.sort(key=lambda r: r["makespan"])
  best = runs[len(runs) // 2]
  cost = best["cost"]
  sched = trainer.schedule
  kind_cost = S.Costs(
    F=cost["F"], B=cost.get("B", 0.0), W=cost.get("W", 0.0), BW=cost.get("BW"), FB=cost.get("FB")
  )
  out: dict[str, Any] = {
    "schedule": name,
    "pp": pp,
    "microbatches": n_mb,
    "granularity": granularity,
    "ticks": pipe.plan.T,
    "compile_and_first_run_s": compile_s,
    "buffers": dict(pipe.plan.sizes),
    "residual_bytes_per_microbatch": pipe.stage_vjp.residual_bytes(),
    "simulated_unit_costs": simulated(sched, UNIT_COSTS),
    "simulated_measured_costs": dict(
      simulated(sched, kind_cost), costs_s={k: float(v) for k, v in cost.items()}
    ),
    "lockstep_makespan_s": lockstep_makespan(trainer, cost),
    "measured": {
      "makespan_s": best["makespan"],
      "bubble_s": max(best["bubble"]),
      "bubble_fraction": max(best["bubble"]) / best["makespan"],
      "bubble_per_rank_s": best["bubble"],
      "busy_per_rank_s": best["busy"],
    },
    "runs_bubble_fraction": [max(r["bubble"]) / r["makespan"] for r in runs],
  }
  if outdir:
    os.makedirs(outdir, exist_ok=True)
    sim = S.simulate(sched, UNIT_COSTS)
    out["png_simulated"] = plot_timeline(
      sim.timelines,
      os.path.join(outdir, f"{name}_pp{pp}_mb{n_mb}_simulated.png"),
      f"{name}: simulated, F = B = W = 1 (pp={pp}, {n_mb} micro-batches)",
      time_unit="cost units",
    )
    out["png_measured"] = plot_timeline(
      [[(s[0] * 1e3, s[1] * 1e3) + tuple(s[2:]) for s in row] for row in best["rows"]],
      os.path.join(outdir, f"{name}_pp{pp}_mb{n_mb}_measured.png"),
      f"{name}: measured on {len(devices)} emulated devices (pp={pp}, {n_mb} micro-batches)",
      time_unit="ms",
    )
  return out


def table(results: Sequence[dict]) -> str:
  """A plain-text table of the bubbles of several `measure` results."""
  head = (
    f"{'schedule':<10} {'pp':>3} {'mb':>3} {'sim bubble':>11} {'sim frac':>9} "
    f"{'sim(meas.) frac':>16} {'meas. bubble ms':>16} {'meas. frac':>11} "
    f"{'makespan ms':>12}"
  )
  lines = [head, "-" * len(head)]
  for r in results:
    su, sm, me = r["simulated_unit_costs"], r["simulated_measured_costs"], r["measured"]
    lines.append(
      f"{r['schedule']:<10} {r['pp']:>3} {r['microbatches']:>3} "
      f"{su['bubble']:>11.1f} {su['bubble_fraction']:>9.3f} "
      f"{sm['bubble_fraction']:>16.3f} {me['bubble_s'] * 1e3:>16.2f} "
      f"{me['bubble_fraction']:>11.3f} {me['makespan_s'] * 1e3:>12.2f}"
    )
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Request:
  """What to compare (the binary's flags)."""

  schedules: tuple[str, ...] = ("1f1b", "dualpipe")
  pp: int = 4
  microbatches: int = 8
  mb_size: int = 1
  seq_len: int = 0  # 0 = the config's
  repeats: int = 3
  granularity: str = "unit"


def compare(cfg: config_lib.Config, req: Request, outdir: str | None = None) -> list[dict]:
  for name in req.schedules:  # fail fast on a bad schedule / pp / micro-batch combination
    make_schedule(name, req.pp, req.microbatches)
  bcfg = bench_config(cfg, req.pp, req.microbatches, req.mb_size, req.seq_len or None)
  return [
    measure(bcfg, name, repeats=req.repeats, granularity=req.granularity, outdir=outdir)
    for name in req.schedules
  ]


def run(cfg: config_lib.Config, req: Request, outdir: str | None = None) -> dict:
  """`compare`, as the JSON report `experiments/pipeline_schedules.py` writes: the request,
  the platform, the model, `summary` and every schedule's result."""
  results = compare(cfg, req, outdir)
  devices = pipeline_devices(req.pp)
  return {
    "request": req.__dict__,
    "platform": devices[0].platform,
    "n_devices": len(devices),
    "cpu_count": os.cpu_count(),
    "model": config_lib.to_dict(cfg)["model"],
    "summary": summary(results),
    "results": results,
  }


def summary(results: Sequence[dict]) -> dict:
  """DualPipe against 1F1B, simulated and measured (when both ran)."""
  by = {r["schedule"]: r for r in results}
  if "1f1b" not in by or "dualpipe" not in by:
    return {}
  a, b = by["dualpipe"], by["1f1b"]
  return {
    "dualpipe_below_1f1b_simulated": a["simulated_unit_costs"]["bubble"]
    < b["simulated_unit_costs"]["bubble"],
    "dualpipe_below_1f1b_measured": a["measured"]["bubble_s"] < b["measured"]["bubble_s"],
    "bubble_ratio_measured": a["measured"]["bubble_s"] / b["measured"]["bubble_s"],
    "bubble_ratio_simulated": (
      a["simulated_unit_costs"]["bubble"] / b["simulated_unit_costs"]["bubble"]
    ),
  }


__all__ = [
  "Request",
  "TickClock",
  "bench_config",
  "busy_by_kind",
  "busy_time",
  "compare",
  "measure",
  "measured_timeline",
  "pipeline_devices",
  "run",
  "simulated",
  "summary",
  "table",
]
