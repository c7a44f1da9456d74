"""The training planner (`parallel/planner.py`) against XLA, and DeepSeek-V3's layout.

On 8 emulated devices the planned per-device memory of a small config (parameters, gradients,
ZeRO-1 optimizer state from the sharding plan's specs, and the activations this code keeps,
traced) is within 10% of `compiled.memory_analysis()` of the real train step (the activation
part alone within 14%: a fixed gap, see the test). The 671B layout of the report (PP16 x
EP64 x ZeRO-1 on 2048 H800s, arXiv 2412.19437 §3.2) plans without devices; a mesh that does
not divide the config fails before anything is traced or compiled, naming both numbers.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from configs.dsv3 import get_config
from dsv3_jax import config as config_lib
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.parallel import planner

SEQ = 16


def _tiny(**model) -> config_lib.Config:
  c = get_config("tiny")
  c.train.seq_len = SEQ
  c.model.update(model)
  return config_lib.from_dict(c)


def _xla_memory(trainer, global_batch: int):
  """(argument bytes, temp bytes) of the compiled train step, per device."""
  state = trainer.abstract_state()
  batch = {
    "tokens": jax.ShapeDtypeStruct(
      (global_batch, SEQ + 1), jnp.int32, sharding=trainer.batch_sharding
    )
  }
  steps = jax.ShapeDtypeStruct((), jnp.int32)
  ma = trainer.step_fn.lower(state, batch, steps).compile().memory_analysis()
  return ma.argument_size_in_bytes, ma.temp_size_in_bytes


def _compare(plan: dict, arg: int, temp: int) -> dict:
  mem = plan["memory"]
  state = mem["params"] + mem["optimizer"] + mem["router_biases"] + mem["step"] + mem["batch"]
  # Temp: gradients, then the larger of two phases -- the forward/backward (the pipeline's
  # accumulators and the activations) and the update (the new state beside the old).
  planned_temp = mem["total_traced"] - state
  others = mem["grads"] + mem["pipeline_accumulators"]
  report = {
    "argument": (state, arg),
    "temp": (planned_temp, temp),
    "total": (mem["total_traced"], arg + temp),
    "activations": (mem["activations_traced"], temp - others),
  }
  print({k: (p, x, f"{p / x - 1:+.1%}") for k, (p, x) in report.items()})
  return report


def test_shard_shape_and_mesh_parsing():
  sizes = planner.parse_mesh("data:2,expert:64,pipe:16")
  assert sizes == {"data": 2, "expert": 64, "pipe": 16}
  assert planner.parse_mesh("expert:4") == {"data": 1, "expert": 4, "pipe": 1}
  with pytest.raises(ValueError, match="tensor:2"):
    planner.parse_mesh("tensor:2")
  assert planner.shard_shape((58, 256, 7168, 2048), P("pipe", "expert"), sizes) == (
    4,
    4,
    7168,
    2048,
  )  # 58 layers over 16 stages: the busiest holds 4
  assert planner.shard_shape((7168, 24), P(None, ("data", "expert")), sizes) == (7168, 1)
  assert planner.abstract_mesh(sizes).size == 2048
  assert planner.node_extents(sizes, 8) == {"expert": 8, "data": 1, "pipe": 1}
  assert planner.node_extents({"data": 2, "expert": 2, "pipe": 2}, 8) == {
    "expert": 2,
    "data": 2,
    "pipe": 2,
  }


@pytest.mark.parametrize("remat", ["none", "blocks"])
def test_plain_step_memory_matches_xla(remat):
  """tiny on data 2 x expert 4 (expert-parallel all-to-all, ZeRO-1), 4 sequences of 16
  tokens per device: arguments exact, the total within 10% of XLA's, the activations
  alone within 14% (see below). With recomputation (`remat="blocks"`) too: the blocks'
  inputs kept, plus the largest piece the backward reruns."""
  from dsv3_jax.train.step import Trainer

  cfg = _tiny(remat=remat)
  gb = 32
  plan = planner.plan_training(
    cfg, "data:2,expert:4", node_size=1, global_batch=gb, hardware_name="h800"
  )
  run_cfg = config_lib.replace(
    cfg, train={"global_batch": gb}, parallel={"data": 2, "expert": 4, "ep_ranks_per_node": 1}
  )
  trainer = Trainer(run_cfg, mesh_lib.make_mesh(run_cfg.parallel, jax.devices()[:8]))
  mem = trainer.memory_per_device()
  assert plan["memory"]["params"] == mem["params"]
  assert plan["memory"]["optimizer"] == mem["opt_state"]
  arg, temp = _xla_memory(trainer, gb)
  report = _compare(plan, arg, temp)
  assert report["argument"][0] == arg
  # The traced activations are the residuals autodiff keeps, counted at JAX's level: since
  # the expert dispatch fills and reads its buffers by gathers, XLA's own temporaries fell by
  # more than those residuals (223 KB vs 121 KB here), and the estimate sits ~305 KB above
  # XLA's. That gap stayed when the dispatch's extra rounds stopped keeping per-round copies
  # of the expert weights (both figures fell by 197 KB), so relative to the smaller
  # activations it is now 13% (11.9% before); the total stays within the 10% the plan promises.
  # (Those figures are the step without recomputation; with it: total -4.2%, activations
  # -8.5%.)
  for key, tolerance in (("total", 0.10), ("activations", 0.14)):
    planned, xla = report[key]
    assert abs(planned / xla - 1) < tolerance, (key, planned, xla)


@pytest.mark.slow  # compiling the pipeline executor takes minutes
def test_pipelined_step_memory_matches_xla():
  """tiny with 4 MoE layers on data 2 x expert 2 x pipe 2, 1F1B with 2 micro-batches: the
  stages own their layers (params and moments over `pipe`), experts stay expert-parallel;
  the executor's residual buffers, accumulators and the updated state within 10% of XLA."""
  from dsv3_jax.train.pipeline_step import PipelineTrainer

  cfg = _tiny(num_hidden_layers=5)
  gb = 16
  plan = planner.plan_training(
    cfg,
    "data:2,expert:2,pipe:2",
    node_size=1,
    global_batch=gb,
    schedule="1f1b",
    microbatches=2,
    hardware_name="h800",
  )
  assert plan["in_flight"] == 2  # 1F1B: rank 0 holds PP micro-batches
  run_cfg = config_lib.replace(
    cfg,
    train={"global_batch": gb},
    parallel={
      "data": 2,
      "expert": 2,
      "pipe": 2,
      "pipeline": "1f1b",
      "microbatches": 2,
      "ep_ranks_per_node": 1,
    },
  )
  trainer = PipelineTrainer(run_cfg, mesh_lib.make_mesh(run_cfg.parallel, jax.devices()[:8]))
  mem = trainer.memory_per_device()
  assert plan["memory"]["params"] == mem["params"]
  assert plan["memory"]["optimizer"] == mem["opt_state"]
  arg, temp = _xla_memory(trainer, gb)
  report = _compare(plan, arg, temp)
  assert report["argument"][0] == arg
  for key in ("total", "activations"):
    planned, xla = report[key]
    assert abs(planned / xla - 1) < 0.10, (key, planned, xla)


def _plan_671b():
  cfg = config_lib.from_dict(get_config("671b"))
  return planner.plan_training(
    cfg,
    "data:2,expert:64,pipe:16",
    node_size=8,
    hardware_name="h800",
    schedule="dualpipe",
    uneven_stages=True,
    trace=False,
  )


def test_671b_dualpipe_plan():
  """The report's layout on 2048 devices, planned from specs on an AbstractMesh."""
  r = _plan_671b()
  print("\n" + planner.format_table(r))
  mem = r["memory"]
  assert r["devices"] == 2048 and r["nodes_per_ep_group"] == 8
  assert r["in_flight"] == 16 + 1  # DualPipe: PP + 1 on rank 0 (report Table 2)
  assert r["chunks_per_rank"] == 2 and r["moe_layers_per_stage"] == 4  # ceil(58 / 16)
  # Routed experts: 4 layers x 4 experts per device, fp32 (w1, w2, w3 of 7168 x 2048 each).
  m = get_config("671b").model
  experts_per_device = 4 * (m.n_routed_experts // 64) * 3 * m.hidden_size * m.moe_intermediate_size
  assert mem["staged_params"] > experts_per_device * 4
  assert mem["grads"] == mem["params"]
  assert mem["optimizer"] < mem["params"] / 4  # ZeRO-1 bf16 moments vs fp32 masters
  comm = r["communication"]
  assert comm["expert_all_to_all"]["nodes_per_token"] == 4  # topk_group M = 4 of 8 nodes
  assert comm["expert_all_to_all"]["ib"] > 0 and comm["pipeline_sends"]["ib"] > 0
  # The report: cross-node expert parallelism at about a 1:1 computation:communication ratio.
  assert 0.5 < r["time"]["comm_to_compute"] < 2.0
  assert 0 < r["time"]["mfu"] < 1


@pytest.mark.xfail(
  strict=True,
  reason=(
    "the sharding plan keeps fp32 master weights (and their fp32 gradients) replicated over "
    "data x expert and replicates the embedding, head, dense layers and MTP module on every "
    "pipe rank: ~46 GB of parameters and gradients per device before activations, so the "
    "report's <80 GB per H800 does not hold for this plan (see the printed breakdown)"
  ),
)
def test_671b_fits_in_80gb():
  r = _plan_671b()
  print("\n" + planner.format_table(r))
  assert r["memory"]["total_recipe"] < 80e9


def test_671b_report_layout_fits_in_80gb():
  """The report's layout, analytic: each DualPipe rank holds its two stages only (the ends on
  the end ranks), bf16 working weights and fp32 gradients, ZeRO-1 masters and moments, and
  the recipe's activations of the micro-batch-stages the schedule keeps in flight."""
  r = _plan_671b()
  print("\n" + planner.format_table(r))
  lay = r["report_layout"]
  stages = lay["stages"]
  assert [st["dense"] for st in stages][:2] == [3, 0] and stages[0]["moe"] == 0
  assert [st["moe"] for st in stages[1:-1]] == [4] * 14
  assert (stages[-1]["moe"], stages[-1]["mtp"]) == (2, 1)
  assert sum(st["moe"] for st in stages) == 58
  assert len(lay["rank_stages"]) == 2  # DualPipe: stages r and 15 - r
  assert lay["grads"] == 2 * lay["weights"]  # fp32 gradients of bf16 working weights
  assert max(lay["rank_totals"]) == lay["total"] < 80e9
  # The same layout with this code's recipe on every pipe rank is what the plan above shows.
  assert r["memory"]["total_recipe"] > lay["total"]


@pytest.mark.parametrize("schedule,copies", [("1f1b", 1), ("dualpipe", 2)])
def test_report_layout_places_every_parameter(schedule, copies):
  """Summed over the pipe ranks, the report's layout holds every parameter once per copy
  (DualPipe: twice), the routed experts split over `expert`."""
  from dsv3_jax import counts

  cfg = _tiny(num_hidden_layers=5)
  r = planner.plan_training(
    cfg,
    "data:1,expert:2,pipe:2",
    node_size=1,
    global_batch=8,
    schedule=schedule,
    microbatches=4,
    trace=False,
  )
  m, lay = cfg.model, r["report_layout"]
  c, p = counts.param_counts(m), counts.part_counts(m)
  routed = (m.n_moe_layers + m.num_nextn_predict_layers) * p["moe_routed"]
  per_device = c["total"] + c["mtp_unique"] - routed + routed // 2
  assert sum(st["dense"] + st["moe"] + st["mtp"] for st in lay["stages"]) == 6
  assert sum(lay["rank_weights"]) == copies * per_device * 4  # tiny runs float32
  assert all(t > 0 for t in lay["rank_totals"])


def test_misfit_meshes_fail_before_tracing(monkeypatch):
  def no_trace(*a, **k):
    raise AssertionError("traced before checking the mesh")

  monkeypatch.setattr(planner, "traced_activations", no_trace)
  monkeypatch.setattr(planner, "abstract_state", no_trace)
  cfg = _tiny()  # 8 routed experts in 4 groups, 2 MoE layers
  with pytest.raises(ValueError, match=r"8 routed experts.*`expert` mesh axis of 3"):
    planner.plan_training(cfg, "data:1,expert:3", node_size=1)
  with pytest.raises(ValueError, match=r"2 MoE layers .* 4 pipeline stages"):
    planner.plan_training(
      cfg, "data:1,expert:2,pipe:4", node_size=1, schedule="1f1b", global_batch=8, microbatches=4
    )
  odd = _tiny(n_routed_experts=12, n_group=6)  # 6 groups over 4 nodes
  with pytest.raises(ValueError, match=r"6 expert groups .* 4 nodes"):
    planner.plan_training(odd, "data:2,expert:4", node_size=1)
  with pytest.raises(ValueError, match=r"global batch 12 .* 8 batch shards"):
    planner.plan_training(cfg, "data:2,expert:4", node_size=1, global_batch=12)
  big = config_lib.from_dict(get_config("671b"))
  with pytest.raises(ValueError, match=r"58 MoE layers .* 16 pipeline stages"):
    planner.plan_training(big, "data:2,expert:64,pipe:16", schedule="dualpipe")
  with pytest.raises(ValueError, match=r"256 routed experts.*`expert` mesh axis of 48"):
    planner.plan_training(big, "data:2,expert:48,pipe:16", schedule="dualpipe", uneven_stages=True)
