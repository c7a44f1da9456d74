"""Pipeline bubbles, simulated and measured: the library behind `experiments/pipeline_schedules`.

For each schedule the same DeepSeek-V3 model (``2 * pp`` MoE layers, so that 1F1B,
DualPipe and DualPipeV cut it into equal stages) runs one pipelined forward+backward on a
``pipe`` mesh with per-tick timestamps (`Pipeline(timing=True)`); the measured timeline
is compared with the simulator's, under unit costs (``F = B = W = 1``) and under the
measured median cost of each op kind.

Bubble, as in DeepSeek-V3's Table 2 and `schedules.simulate`: per rank, the time inside
the makespan that the rank does not spend in ops; the largest over ranks is reported, and
also divided by the makespan (comparable across units).  Measured busy time counts only
the ops themselves; waiting for the tick's `ppermute` and for slower ranks is bubble.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax

from dsv3_jax import config as config_lib
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.parallel import schedules as S
from dsv3_jax.parallel.pipeline import UNIT_COSTS
from dsv3_jax.parallel.timeline import plot_timeline
from dsv3_jax.train.pipeline_step import PipelineTrainer, make_schedule


def bench_config(cfg: config_lib.Config, pp: int, n_mb: int, mb_size: int,
                 seq_len: int | None = None) -> config_lib.Config:
  """``cfg`` with ``2 * pp`` MoE layers, a ``pipe = pp`` mesh and ``n_mb`` micro-batches."""
  m = cfg.model
  return config_lib.replace(
      cfg, model={"num_hidden_layers": m.n_dense_layers + 2 * pp},
      train={"global_batch": n_mb * mb_size, "seq_len": seq_len or cfg.train.seq_len},
      parallel={"data": 1, "expert": 1, "pipe": pp, "microbatches": n_mb})


def simulated(schedule: S.Schedule, costs: S.Costs) -> dict:
  sim = S.simulate(schedule, costs)
  return {"makespan": float(sim.makespan), "bubble": float(sim.max_bubble),
          "bubble_fraction": float(sim.max_bubble / sim.makespan),
          "bubble_per_rank": [float(b) for b in sim.bubble],
          "peak_activations": [int(a) for a in sim.peak_activations]}


def lockstep_makespan(trainer: PipelineTrainer, cost: dict) -> float:
  """The executor's makespan predicted from per-kind costs: every tick lasts its longest op."""
  plan = trainer.pipeline.plan
  total = 0.0
  for t in range(plan.T):
    total += max((cost.get(p.op.kind, 0.0) for row in plan.placed for p in row if p.tick == t),
                 default=0.0)
  return total


def measure(cfg: config_lib.Config, name: str, *, repeats: int = 3,
            granularity: str = "unit", devices: Sequence[jax.Device] | None = None,
            outdir: str | None = None, seed: int = 0) -> dict:
  """Runs schedule ``name`` ``repeats`` times (after a compile run) and returns its stats.

  ``measured`` holds the run with the median makespan; ``runs`` every run's bubble
  fraction.  With ``outdir``, Gantt PNGs of the simulated and measured timelines are
  written there.
  """
  pp, n_mb = cfg.parallel.pipe, cfg.parallel.microbatches
  devices = list(jax.devices() if devices is None else devices)[:pp]
  mesh = mesh_lib.make_mesh(cfg.parallel, devices)
  trainer = PipelineTrainer(cfg, mesh, schedule_name=name, granularity=granularity)
  pipe = trainer.pipeline
  state = trainer.init()
  tokens = jax.random.randint(jax.random.key(seed), (cfg.train.global_batch,
                                                     cfg.train.seq_len + 1), 0,
                              cfg.model.vocab_size)
  # Everything is returned: unused gradients would let XLA drop every backward op.
  step = jax.jit(lambda p, b, t: trainer.loss_and_grads(p, b, t, timing=True))
  t0 = time.perf_counter()
  jax.block_until_ready(step(state.params, state.biases, tokens))
  compile_s = time.perf_counter() - t0
  runs = []
  for _ in range(repeats):
    pipe.stamps.clear()
    jax.block_until_ready(step(state.params, state.biases, tokens))
    stamps = list(pipe.stamps)
    rows = pipe.measured_timeline(stamps)
    busy = pipe.busy_time(stamps)
    makespan = max(s[1] for row in rows for s in row) - min(s[0] for row in rows for s in row)
    bubble = [makespan - b for b in busy]
    runs.append(dict(stamps=stamps, rows=rows, makespan=makespan, busy=busy, bubble=bubble,
                     cost=pipe.busy_by_kind(stamps)))
  runs.sort(key=lambda r: r["makespan"])
  best = runs[len(runs) // 2]
  cost = best["cost"]
  sched = trainer.schedule
  kind_cost = S.Costs(F=cost["F"], B=cost.get("B", 0.0), W=cost.get("W", 0.0),
                      BW=cost.get("BW"), FB=cost.get("FB"))
  out: dict[str, Any] = {
      "schedule": name, "pp": pp, "microbatches": n_mb, "granularity": granularity,
      "ticks": pipe.plan.T, "compile_and_first_run_s": compile_s,
      "buffers": dict(pipe.plan.sizes),
      "residual_bytes_per_microbatch": pipe.stage_vjp.residual_bytes(),
      "simulated_unit_costs": simulated(sched, UNIT_COSTS),
      "simulated_measured_costs": dict(simulated(sched, kind_cost),
                                       costs_s={k: float(v) for k, v in cost.items()}),
      "lockstep_makespan_s": lockstep_makespan(trainer, cost),
      "measured": {"makespan_s": best["makespan"], "bubble_s": max(best["bubble"]),
                   "bubble_fraction": max(best["bubble"]) / best["makespan"],
                   "bubble_per_rank_s": best["bubble"], "busy_per_rank_s": best["busy"]},
      "runs_bubble_fraction": [max(r["bubble"]) / r["makespan"] for r in runs],
  }
  if outdir:
    os.makedirs(outdir, exist_ok=True)
    sim = S.simulate(sched, UNIT_COSTS)
    out["png_simulated"] = plot_timeline(
        sim.timelines, os.path.join(outdir, f"{name}_pp{pp}_mb{n_mb}_simulated.png"),
        f"{name}: simulated, F = B = W = 1 (pp={pp}, {n_mb} micro-batches)",
        time_unit="cost units")
    out["png_measured"] = plot_timeline(
        [[(s[0] * 1e3, s[1] * 1e3) + tuple(s[2:]) for s in row] for row in best["rows"]],
        os.path.join(outdir, f"{name}_pp{pp}_mb{n_mb}_measured.png"),
        f"{name}: measured on {len(devices)} emulated devices "
        f"(pp={pp}, {n_mb} micro-batches)", time_unit="ms")
  return out


def table(results: Sequence[dict]) -> str:
  """A plain-text table of the bubbles of several `measure` results."""
  head = (f"{'schedule':<10} {'pp':>3} {'mb':>3} {'sim bubble':>11} {'sim frac':>9} "
          f"{'sim(meas.) frac':>16} {'meas. bubble ms':>16} {'meas. frac':>11} "
          f"{'makespan ms':>12}")
  lines = [head, "-" * len(head)]
  for r in results:
    su, sm, me = r["simulated_unit_costs"], r["simulated_measured_costs"], r["measured"]
    lines.append(f"{r['schedule']:<10} {r['pp']:>3} {r['microbatches']:>3} "
                 f"{su['bubble']:>11.1f} {su['bubble_fraction']:>9.3f} "
                 f"{sm['bubble_fraction']:>16.3f} {me['bubble_s'] * 1e3:>16.2f} "
                 f"{me['bubble_fraction']:>11.3f} {me['makespan_s'] * 1e3:>12.2f}")
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
  return [measure(bcfg, name, repeats=req.repeats, granularity=req.granularity, outdir=outdir)
          for name in req.schedules]


def summary(results: Sequence[dict]) -> dict:
  """DualPipe against 1F1B, simulated and measured (when both ran)."""
  by = {r["schedule"]: r for r in results}
  if "1f1b" not in by or "dualpipe" not in by:
    return {}
  a, b = by["dualpipe"], by["1f1b"]
  return {"dualpipe_below_1f1b_simulated":
          a["simulated_unit_costs"]["bubble"] < b["simulated_unit_costs"]["bubble"],
          "dualpipe_below_1f1b_measured":
          a["measured"]["bubble_s"] < b["measured"]["bubble_s"],
          "bubble_ratio_measured": a["measured"]["bubble_s"] / b["measured"]["bubble_s"],
          "bubble_ratio_simulated": (a["simulated_unit_costs"]["bubble"]
                                     / b["simulated_unit_costs"]["bubble"])}


__all__ = ["Request", "bench_config", "compare", "measure", "simulated", "summary", "table"]
