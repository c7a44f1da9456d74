"""The pipeline executor: F/B/W split, buffer plans, and pipelined == unpipelined gradients.

Fast tests use a toy stage (embedding -> tanh layer -> head) so that compiling the executor
takes seconds; the DeepSeek-V3 tests (`PipelineTrainer` against `Trainer`) are marked slow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from dsv3_jax.parallel import pipeline as P
from dsv3_jax.parallel import schedules as S
from dsv3_jax.parallel.stage_vjp import StageVJP
from dsv3_jax.parallel.timeline import timeline_stats

# --------------------------------------------------------------------------- StageVJP


def _toy_block(p, x, c):
  """Scan over stacked layers, a cond and a custom_vjp: the structures the model has."""

  @jax.custom_vjp
  def scale(h, s):
    return h * s[None]

  scale.defvjp(
    lambda h, s: (h * s[None], (h, s)),
    lambda res, g: (g * res[1][None], jnp.sum(g * res[0], axis=0)),
  )

  def body(h, w):
    h = jnp.tanh(h @ w["a"]) + h
    return scale(h, w["s"]), None

  x = jax.lax.cond(c["first"], lambda: x * 2.0, lambda: x)
  y, _ = jax.lax.scan(body, x * c["tok"][:, None], p)
  return (y, jnp.sum(jnp.sin(y))), {"mean": jnp.mean(y)}


def _toy_args(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  p = {
    "a": jax.random.normal(k[0], (3, 4, 4)) * 0.5,
    "s": 1.0 + 0.1 * jax.random.normal(k[1], (3, 4)),
  }
  x = jax.random.normal(k[2], (5, 4))
  c = {"first": jnp.bool_(True), "tok": jnp.arange(5, dtype=jnp.float32)}
  return p, x, c


def test_stage_vjp_b_then_w_equals_bw_equals_vjp():
  p, x, c = _toy_args()
  sv = StageVJP(_toy_block, p, x, c, varying=[False, True])
  assert sv.deferred
  (outs, aux, r1) = sv.forward(p, x, c)
  ref_outs, vjp, ref_aux = jax.vjp(lambda pp, xx: _toy_block(pp, xx, c), p, x, has_aux=True)
  ct = (jnp.cos(ref_outs[0]), jnp.float32(0.7))
  ref_dp, ref_dx = vjp(ct)
  np.testing.assert_allclose(outs[1], ref_outs[1], rtol=1e-6)
  np.testing.assert_allclose(aux["mean"], ref_aux["mean"], rtol=1e-6)
  dp_bw, dx_bw = sv.backward(r1, p, c, ct)
  dx_b, dp_b, r2 = sv.backward_input(r1, p, c, ct)
  dp_w = sv.backward_weight(r1, r2, p, c)
  for got in (dx_bw, dx_b):
    np.testing.assert_allclose(got, ref_dx, rtol=1e-5, atol=1e-6)
  for got in (dp_bw, jax.tree.map(jnp.add, dp_b, dp_w)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_dp)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_stage_vjp_stores_activations_not_weights():
  """Parameters are re-supplied, not stored; B leaves W only the matmul-side residuals."""
  p, x, c = _toy_args()
  sv = StageVJP(_toy_block, p, x, c, varying=[False, True])
  weight_shapes = {a.shape for a in jax.tree.leaves(p)}
  assert not any(a.shape in weight_shapes for a in sv.r1_avals)
  assert not any(a.shape in weight_shapes for a in sv.r2_avals)
  # W needs the activations' cotangents per layer: [3 layers, 5 rows, 4].
  assert any(a.shape == (3, 5, 4) for a in sv.r2_avals)


def test_stage_vjp_forward_backward_interleaves_the_layer_scans():
  """FB: the forward of one micro-batch and the backward of another run as one loop over the
  layers (forward layer i beside backward layer n-1-i) and equal F and BW run apart."""
  p, x, c = _toy_args()
  sv = StageVJP(_toy_block, p, x, c, varying=[False, True])
  assert sv.interleaves
  p2, x2, _ = _toy_args(seed=1)
  c2 = {"first": jnp.bool_(False), "tok": jnp.arange(5, dtype=jnp.float32) + 1.0}
  _, _, r1 = sv.forward(p2, x2, c2)  # the micro-batch whose backward runs in FB
  ct = (jnp.cos(x2), jnp.float32(0.3))
  fb = jax.jit(sv.forward_backward)
  got = fb(p, x, c, r1, p2, c2, ct)
  want = sv.forward(p, x, c) + sv.backward(r1, p2, c2, ct)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  scans = [
    e.params["length"]
    for e in jax.make_jaxpr(sv.forward_backward)(p, x, c, r1, p2, c2, ct).jaxpr.eqns
    if e.primitive.name == "scan"
  ]
  assert scans == [3]  # one loop over the 3 layers, not a forward scan and a backward scan


# ------------------------------------------------------------------------------- plans
@pytest.mark.parametrize(
  "name,pp,n",
  [
    ("1f1b", 4, 8),
    ("gpipe", 2, 3),
    ("zb1p", 4, 6),
    ("dualpipe", 4, 8),
    ("dualpipe", 6, 12),
    ("dualpipe", 2, 4),
    ("dualpipev", 2, 4),
  ],
)
def test_plan_ticks_follow_the_schedule(name, pp, n):
  """`op`: one tick per generated op; `unit`: the schedule's simulated clock, F = B = W = 1."""
  sched = S.SCHEDULES[name](pp, n)
  op_plan, unit_plan = P.make_plan(sched, "op"), P.make_plan(sched, "unit")
  assert op_plan.T == S.to_tables(sched).T
  assert unit_plan.T == S.simulate(sched, P.UNIT_COSTS).makespan
  assert {S.CODE_KINDS[k] for k in unit_plan.kinds} <= {"F", "B", "W"}
  for plan in (op_plan, unit_plan):
    for r, placed in enumerate(plan.placed):
      ops = [p.op for p in placed]
      expect = (
        list(sched.ops[r])
        if plan is op_plan
        else [u for op in sched.ops[r] for u in P.unit_ops(op)]
      )
      assert ops == expect
      assert [p.tick for p in placed] == sorted({p.tick for p in placed})


@pytest.mark.parametrize("granularity", P.GRANULARITIES)
@pytest.mark.parametrize("name,pp,n", [("1f1b", 4, 8), ("gpipe", 4, 6), ("dualpipe", 4, 8)])
def test_plan_buffers_match_schedule_memory(name, pp, n, granularity):
  sched = S.SCHEDULES[name](pp, n)
  plan = P.make_plan(sched, granularity)
  peak = int(S.peak_activations(sched).max())  # 1F1B: pp, GPipe: n, DualPipe: pp + 1
  # Activations live from F to their (last) backward op.  A whole-tick F&B reads the
  # backward's residuals before it writes the forward's, so it needs one entry less.
  has_fb = any(op.kind == "FB" for row in sched.ops for op in row)
  assert plan.sizes["r1"] == peak - (granularity == "op" and has_fb)
  assert plan.sizes["act"] <= plan.sizes["r1"] and plan.sizes["grad"] <= plan.sizes["r1"]
  # Every rank reads each received value exactly once, from where it was written.
  f = plan.fields
  for b, writes, reads in (
    ("act", ("arr_act_r", "arr_act_l", "arr_act_s"), ("f_act",)),
    ("grad", ("arr_grad_r", "arr_grad_l", "arr_grad_s"), ("b_grad",)),
  ):
    n_writes = sum(int((f[P.FI[w]] < plan.sizes[b]).sum()) for w in writes)
    n_reads = sum(int((f[P.FI[r]] < plan.sizes[b]).sum()) for r in reads)
    assert n_writes == n_reads == n * (sched.n_stages - 1)
  assert plan.slot_stage.shape == (2 if name == "dualpipe" else 1, pp)


def test_plan_rejects_bad_arguments():
  with pytest.raises(ValueError, match="granularity"):
    P.make_plan(S.one_f_one_b(2, 2), "tick")
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("pipe",), axis_types=(AxisType.Auto,))
  with pytest.raises(ValueError, match="pp=4"):
    P.Pipeline(lambda *a: None, S.one_f_one_b(4, 4), mesh)
  with pytest.raises(ValueError, match="no axis 'stage'"):
    P.Pipeline(lambda *a: None, S.one_f_one_b(2, 2), mesh, pipe_axis="stage")


# ------------------------------------------------------------------- toy pipelines
V, D, L, S_MAX = 16, 8, 6, 4


def _toy_stage(n_stages, scale):
  def stage_fn(sp, shp, x, sc, shc, tokens, stage):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    h = jax.lax.cond(stage == 0, lambda: jnp.take(shp["emb"], inputs, axis=0), lambda: x)

    def layer(h, _):  # two layers sharing weights: a scan, so FB interleaves (granularity "op")
      return jnp.tanh(h @ sp["w"] + sp["b"][None, None]) * sc["gain"] + h, None

    h, _ = jax.lax.scan(layer, h, None, length=2)

    def head():
      logp = jax.nn.log_softmax(h @ shp["head"] + shc["bias"][None, None], axis=-1)
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    ce = jax.lax.cond(stage == n_stages - 1, head, lambda: jnp.zeros((), jnp.float32))
    loss = (ce + 1e-2 * jnp.mean(h**2)) * scale
    return (h, loss), {"ce": ce, "visits": jnp.ones((n_stages,)) * (jnp.arange(n_stages) == stage)}

  return stage_fn


def _toy_params(n_stages, batch, seed=0, *, vocab=V, width=D):
  k = jax.random.split(jax.random.key(seed), 5)
  sp = {
    "w": jax.random.normal(k[0], (n_stages, width, width)) * 0.4,
    "b": jax.random.normal(k[1], (n_stages, width)) * 0.1,
  }
  shp = {
    "emb": jax.random.normal(k[2], (vocab, width)),
    "head": jax.random.normal(k[3], (width, vocab)) * 0.3,
  }
  sc = {"gain": 1.0 + 0.1 * jnp.arange(n_stages, dtype=jnp.float32)}
  shc = {"bias": jnp.linspace(-0.1, 0.1, vocab)}
  tokens = jax.random.randint(k[4], (batch, L + 1), 0, vocab)
  return sp, shp, sc, shc, tokens


def _toy_reference(n_stages, n_mb, sp, shp, sc, shc, tokens):
  fn = _toy_stage(n_stages, 1.0 / n_mb)

  def total(sp, shp):
    loss = 0.0
    for mb in jnp.split(tokens, n_mb):
      x = jnp.zeros((mb.shape[0], L, D))
      for s in range(n_stages):
        (x, l), _ = fn(
          jax.tree.map(lambda a: a[s], sp),
          shp,
          x,
          jax.tree.map(lambda a: a[s], sc),
          shc,
          mb,
          jnp.int32(s),
        )
        loss = loss + l
    return loss

  return jax.value_and_grad(total, argnums=(0, 1))(sp, shp)


def _toy_mesh(pp, data=1):
  devices = np.asarray(jax.devices()[: pp * data]).reshape(data, 1, pp)
  return Mesh(devices, ("data", "expert", "pipe"), axis_types=(AxisType.Auto,) * 3)


def _run_toy(name, pp, n_mb, granularity, *, data=1, probe=None):
  sched = S.SCHEDULES[name](pp, n_mb)
  n_st = sched.n_stages
  mesh = _toy_mesh(pp, data)
  mb = 2  # sequences per micro-batch
  sp, shp, sc, shc, tokens = _toy_params(n_st, mb * n_mb * data)
  pipe = P.Pipeline(
    _toy_stage(n_st, 1.0 / (n_mb * data)),
    sched,
    mesh,
    batch_axes=("data", "expert"),
    granularity=granularity,
  )
  act = jax.ShapeDtypeStruct((mb, L, D), jnp.float32)
  run = jax.jit(functools.partial(pipe, act=act, probe=probe))
  loss, aux, g_stage, g_shared = run(sp, shp, sc, shc, tokens)
  ref_loss, (ref_gs, ref_gsh) = _toy_reference(n_st, n_mb * data, sp, shp, sc, shc, tokens)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for got, want in ((g_stage, ref_gs), (g_shared, ref_gsh)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  # Every micro-batch visits every stage once (aux sums over forwards).
  np.testing.assert_allclose(aux["visits"], np.full(n_st, n_mb * data))
  return pipe


@pytest.mark.parametrize(
  "name,pp,n_mb,granularity",
  [
    ("1f1b", 2, 4, "unit"),
    # 4 DualPipe stages: slow (the 2-stage cases here and in the DeepSeek test cover it).
    pytest.param("dualpipe", 4, 8, "unit", marks=pytest.mark.slow),
    ("dualpipe", 2, 4, "op"),
  ],
)
def test_toy_pipeline_grads_equal_unpipelined(name, pp, n_mb, granularity):
  pipe = _run_toy(name, pp, n_mb, granularity)
  assert pipe.stage_vjp.interleaves  # DualPipe's FB ops ran as one loop over both chunks


@pytest.mark.slow
@pytest.mark.parametrize(
  "name,pp,n_mb,granularity",
  [
    ("1f1b", 4, 4, "op"),
    ("1f1b", 4, 6, "unit"),
    ("zb1p", 4, 5, "op"),
    ("gpipe", 2, 3, "op"),
    ("dualpipe", 2, 4, "unit"),
    ("dualpipev", 2, 4, "unit"),
    ("dualpipev", 2, 5, "op"),
    ("dualpipe", 4, 10, "op"),
  ],
)
def test_toy_pipeline_other_schedules(name, pp, n_mb, granularity):
  _run_toy(name, pp, n_mb, granularity)


def test_toy_pipeline_with_data_parallel_axis():
  _run_toy("dualpipe", 2, 4, "unit", data=2)


def test_gradient_sums_are_kept_at_most_twice():
  """The executor sums each op's gradients into its scan carry, leaf by leaf. XLA:CPU gives
  the switch's outputs buffers of their own, so the carried sums and the switch's new sums
  are two copies; that is the most XLA may keep (`planner.state_memory` counts two). Here the shared
  embedding and head (8 MB in f32) outweigh everything else, so the compiled step's
  temporaries stay under 2.2 of them (1.95 measured; 2.44 when the sums were flattened into
  one vector per slot, which added the op's own flat gradient as a third copy)."""
  sched = S.SCHEDULES["1f1b"](2, 4)
  mesh = _toy_mesh(2)
  sp, shp, sc, shc, tokens = _toy_params(sched.n_stages, 2 * 4, vocab=4096, width=256)
  pipe = P.Pipeline(_toy_stage(sched.n_stages, 0.25), sched, mesh, batch_axes=("data", "expert"))
  act = jax.ShapeDtypeStruct((2, L, 256), jnp.float32)
  run = jax.jit(functools.partial(pipe, act=act))
  temp = run.lower(sp, shp, sc, shc, tokens).compile().memory_analysis().temp_size_in_bytes
  shared = sum(a.nbytes for a in jax.tree.leaves(shp))
  assert shared == 8 * 2**20
  assert temp < 2.2 * shared, temp / shared


def test_measured_timeline_has_every_op_once():
  from benchmarks import pipeline_timeline as PT

  clock = PT.TickClock()
  pipe = _run_toy("dualpipe", 2, 4, "unit", probe=clock)
  rows = PT.measured_timeline(pipe.plan, clock.stamps)
  sched = pipe.plan.source
  assert [len(r) for r in rows] == [len(ops) for ops in sched.ops]
  for r, row in enumerate(rows):
    assert [s[2] for s in row] == [op.kind for op in sched.ops[r]]
    starts = [s[0] for s in row]
    assert starts == sorted(starts) and all(s[1] >= s[0] for s in row)
  stats = timeline_stats(rows)
  assert stats["makespan"] > 0 and all(b >= 0 for b in stats["bubble"])
  assert set(PT.busy_by_kind(pipe.plan, clock.stamps)) == {"F", "B", "W"}


# ------------------------------------------------------------- DeepSeek-V3, slow
def _ds_config(pp: int, n_mb: int, *, data: int = 1, expert: int = 1, name: str = "1f1b"):
  from configs.dsv3 import get_config
  from dsv3_jax import config as config_lib

  cfg = config_lib.from_dict(get_config("tiny"))
  return config_lib.replace(
    cfg,
    model={"num_hidden_layers": cfg.model.n_dense_layers + pp},
    train={"global_batch": n_mb * data * expert, "seq_len": 16},
    parallel={"data": data, "expert": expert, "pipe": pp, "pipeline": name, "microbatches": n_mb},
  )


def _ds_reference(trainer, state, tokens):
  """Loss, loads and gradients of the unpipelined model on one device."""
  from dsv3_jax.train.loss import model_losses

  def loss_fn(params):
    loss, metrics, loads = model_losses(
      trainer.merge(params, state.biases), tokens, trainer.cfg.train
    )
    return loss, (metrics, loads)

  (loss, (metrics, loads)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
    jax.device_get(state.params)
  )
  return loss, metrics, loads, grads


def _assert_trees_close(got, want, rtol=2e-4):
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    scale = float(jnp.abs(b).max()) + 1e-12
    err = float(jnp.abs(a - b).max()) / scale
    assert err < rtol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


@pytest.mark.parametrize(
  "name,pp,n_mb,granularity",
  [
    # 1F1B: slow here (the toy 1F1B case covers the schedule, DualPipe the trainer).
    pytest.param("1f1b", 2, 2, "unit", marks=pytest.mark.slow),
    ("dualpipe", 2, 4, "unit"),
    pytest.param("1f1b", 4, 4, "unit", marks=pytest.mark.slow),
    pytest.param("dualpipe", 4, 8, "unit", marks=pytest.mark.slow),
    pytest.param("dualpipe", 2, 4, "op", marks=pytest.mark.slow),  # FB interleaves layers
  ],
)
def test_deepseek_pipelined_grads_equal_unpipelined(name, pp, n_mb, granularity):
  """Loss, loads and every gradient of the DeepSeek-V3 step (MTP, balance loss) match."""
  from dsv3_jax.parallel import mesh as mesh_lib
  from dsv3_jax.train.pipeline_step import PipelineTrainer

  cfg = _ds_config(pp, n_mb, name=name)
  trainer = PipelineTrainer(
    cfg, mesh_lib.make_mesh(cfg.parallel, jax.devices()[:pp]), granularity=granularity
  )
  state = trainer.init()
  tokens = jax.random.randint(jax.random.key(1), (cfg.train.global_batch, 17), 0, 259)
  loss, metrics, loads, grads = jax.jit(trainer.loss_and_grads)(state.params, state.biases, tokens)
  ref_loss, ref_metrics, ref_loads, ref_grads = _ds_reference(trainer, state, tokens)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_array_equal(loads, ref_loads)
  for k in ("ce", "mtp_ce", "balance_loss"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5)
  _assert_trees_close(grads, ref_grads)


@pytest.mark.slow
def test_deepseek_pipe_by_expert_mesh():
  """DualPipe on a data 2 x expert 2 x pipe 2 mesh: the batch splits over data x expert."""
  from dsv3_jax.parallel import mesh as mesh_lib
  from dsv3_jax.train.pipeline_step import PipelineTrainer

  cfg = _ds_config(2, 4, data=2, expert=2, name="dualpipe")
  trainer = PipelineTrainer(cfg, mesh_lib.make_mesh(cfg.parallel, jax.devices()[:8]))
  state = trainer.init()
  tokens = jax.random.randint(jax.random.key(2), (cfg.train.global_batch, 17), 0, 259)
  tokens = jax.device_put(tokens, trainer.batch_sharding)
  loss, metrics, loads, grads = jax.jit(trainer.loss_and_grads)(state.params, state.biases, tokens)
  ref_loss, _, ref_loads, ref_grads = _ds_reference(trainer, state, jax.device_get(tokens))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_array_equal(loads, ref_loads)
  _assert_trees_close(grads, ref_grads)


@pytest.mark.slow
def test_dualpipe_training_follows_the_unpipelined_run():
  """Three optimizer steps: the pipelined run's losses and parameters track `Trainer`'s."""
  from dsv3_jax.parallel import mesh as mesh_lib
  from dsv3_jax.train.pipeline_step import PipelineTrainer
  from dsv3_jax.train.step import Trainer

  cfg = _ds_config(2, 4, name="dualpipe")
  mesh = mesh_lib.make_mesh(cfg.parallel, jax.devices()[:2])
  plain, piped = Trainer(cfg, mesh), PipelineTrainer(cfg, mesh)
  s_plain, s_piped = plain.init(), piped.init()
  for step in range(3):
    tokens = jax.random.randint(jax.random.key(10 + step), (cfg.train.global_batch, 17), 0, 259)
    batch = {"tokens": jax.device_put(tokens, plain.batch_sharding)}
    s_plain, m_plain = plain.train_step(s_plain, batch)
    s_piped, m_piped = piped.train_step(s_piped, batch)
    np.testing.assert_allclose(m_piped["loss"], m_plain["loss"], rtol=1e-5)
    assert bool(m_piped["finite"])
  # Adam divides by sqrt(v): float noise in near-zero gradients moves a few weights by a
  # sizeable part of a step, so parameters agree to 1e-3 of their scale, losses to 1e-5.
  _assert_trees_close(s_piped.params, s_plain.params, rtol=1e-3)
  _assert_trees_close(s_piped.biases, s_plain.biases, rtol=1e-6)


@pytest.mark.slow
def test_train_and_evaluate_selects_the_pipeline(tmp_path):
  from configs.dsv3 import get_config
  from dsv3_jax.train.loop import train_and_evaluate
  from dsv3_jax.train.pipeline_step import PipelineTrainer

  cfg = get_config("tiny")
  cfg.model.num_hidden_layers = 3
  cfg.train.update(steps=2, global_batch=16, seq_len=16, eval_every=2, checkpoint_every=2)
  cfg.parallel.update(data=-1, expert=1, pipe=2, pipeline="dualpipe", microbatches=4)
  out = train_and_evaluate(cfg, str(tmp_path), progress=False)
  assert isinstance(out["trainer"], PipelineTrainer)
  assert out["steps"] == 2 and np.isfinite(out["final_loss"])


def test_pipeline_trainer_rejects_bad_configs():
  from dsv3_jax import config as config_lib
  from dsv3_jax.parallel import mesh as mesh_lib
  from dsv3_jax.train.pipeline_step import PipelineTrainer

  cfg = _ds_config(2, 4, name="dualpipe")
  mesh = mesh_lib.make_mesh(cfg.parallel, jax.devices()[:2])
  with pytest.raises(ValueError, match="num_hidden_layers"):
    PipelineTrainer(config_lib.replace(cfg, model={"num_hidden_layers": 4}), mesh)
  with pytest.raises(ValueError, match="microbatches"):
    PipelineTrainer(config_lib.replace(cfg, parallel={"microbatches": 3}), mesh)
  with pytest.raises(ValueError, match="global_batch"):
    PipelineTrainer(config_lib.replace(cfg, train={"global_batch": 6}), mesh)
