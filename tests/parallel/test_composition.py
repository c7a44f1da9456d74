"""The parallel axes composed as DeepSeek-V3 trains (arXiv 2412.19437 §3.2): pipeline stages
own their layers' state, and the MoE layers stay expert-parallel inside the pipeline.

On a data x expert x pipe = 2 x 2 x 2 mesh of emulated CPUs: per-device parameter and
optimizer bytes of the staged stack are 1/pipe of the unpipelined step's, the compiled
pipelined step dispatches with all-to-all and never all-gathers routed-expert weights, and
its loss, loads and gradients equal the unpipelined model's, with the flat and with the
node-then-GPU two-stage dispatch.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.dsv3 import get_config
from dsv3_jax import config as config_lib
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.parallel import node_dispatch
from dsv3_jax.parallel import sharding
from dsv3_jax.parallel.sharding import STAGED
from dsv3_jax.train.loss import model_losses
from dsv3_jax.train.pipeline_step import PipelineTrainer
from dsv3_jax.train.step import Trainer


def _cfg(name="1f1b", pp=2, n_mb=2, data=2, expert=2, moe_layers=4, model=None, parallel=None):
  cfg = config_lib.from_dict(get_config("tiny"))
  return config_lib.replace(
    cfg,
    model={"num_hidden_layers": cfg.model.n_dense_layers + moe_layers, **(model or {})},
    train={"global_batch": n_mb * data * expert, "seq_len": 16},
    parallel={
      "data": data,
      "expert": expert,
      "pipe": pp,
      "pipeline": name,
      "microbatches": n_mb,
      **(parallel or {}),
    },
  )


@pytest.fixture(scope="module")
def piped():
  cfg = _cfg()
  return PipelineTrainer(cfg, mesh_lib.make_mesh(cfg.parallel, jax.devices()[:8]))


def _staged_bytes(trainer, state):
  """Per-device bytes of the staged stack's parameters and AdamW moments (live arrays)."""
  opt = [
    o
    for o in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
    if hasattr(o, "mu")
  ][0]
  parts = (state.params[STAGED], opt.mu[STAGED], opt.nu[STAGED])
  return sharding.bytes_per_device(parts), sharding.bytes_per_device(
    (state.params, state.opt_state)
  )


def test_stages_own_their_state(piped):
  cfg = piped.cfg
  plain = Trainer(config_lib.replace(cfg, parallel={"pipeline": "none"}), piped.mesh)
  staged_pp, total_pp = _staged_bytes(piped, piped.init())
  staged_plain, total_plain = _staged_bytes(plain, plain.init())
  assert staged_pp * cfg.parallel.pipe == staged_plain
  assert total_pp < total_plain
  spec = piped.param_specs[STAGED]["ffn"]["w1"]
  assert spec[0] == "pipe" and "expert" in spec  # layers over pipe, experts over expert


def test_experts_stay_expert_parallel_inside_the_pipeline(piped):
  state = piped.init()
  tokens = jax.ShapeDtypeStruct(
    (piped.cfg.train.global_batch, 17), np.int32, sharding=piped.batch_sharding
  )
  hlo = jax.jit(piped.loss_and_grads).lower(state.params, state.biases, tokens).compile()
  text = hlo.as_text()
  assert "all-to-all" in text
  m = piped.cfg.model
  e, d, f = m.n_routed_experts, m.hidden_size, m.moe_intermediate_size
  full = [rf"\b{e},{d},{f}\]", rf"\b{e},{f},{d}\]"]  # a whole [E, D, F] / [E, F, D] weight
  gathers = [l for l in text.splitlines() if re.search(r"all-gather(-start)?\(", l)]
  bad = [l for l in gathers if any(re.search(p, l.split("=")[1].split(" ")[1]) for p in full)]
  assert not bad, bad[:2]


def test_pipelined_ep_step_equals_the_unpipelined_model(piped):
  _assert_equals_unpipelined(piped)


@pytest.mark.slow  # ~50 s; the flat dispatch inside the stages runs by default
def test_pipelined_two_stage_dispatch_equals_the_unpipelined_model():
  """The node-then-GPU dispatch (§3.2.2) inside the pipeline stages: 2 nodes of 2 EP ranks,
  each token's experts on at most one node (n_group = nodes, topk_group = M = 1)."""
  cfg = _cfg(
    data=1,
    expert=4,
    model={"n_group": 2, "topk_group": 1},
    parallel={"ep_ranks_per_node": 2, "ep_two_stage": True},
  )
  piped = PipelineTrainer(cfg, mesh_lib.make_mesh(cfg.parallel, jax.devices()[:8]))
  assert piped.plan.dispatch is node_dispatch.two_stage_dispatch
  metrics = _assert_equals_unpipelined(piped)
  assert float(metrics["cross_node_copies"]) > 0  # tokens did cross nodes


@pytest.mark.slow  # compiles the DualPipe executor with EP inside (~45 s)
def test_dualpipe_with_recomputation_equals_the_unpipelined_model():
  """`ModelConfig.remat` = "blocks" inside DualPipe's stages, whose executor cuts each
  stage's backward into B and W (`parallel/stage_vjp.py`): the rerun blocks' weight
  gradients come out of B (nothing they store is weight-only), and loss, loads and
  gradients still equal the unpipelined model's. The readout runs its head in pieces
  (`train.logits_chunk`, 5 of 16 positions: a checkpointed `lax.map` inside the rerun
  readout inside the last stage's `cond`), in both steps."""
  cfg = _cfg("dualpipe", n_mb=4, model={"remat": "blocks"})
  cfg = config_lib.replace(cfg, train={"logits_chunk": 5})
  piped = PipelineTrainer(cfg, mesh_lib.make_mesh(cfg.parallel, jax.devices()[:8]))
  _assert_equals_unpipelined(piped)
  # The recomputation reached the stages: F stores no vocabulary-sized logits for B, and a
  # rerun block stores nothing only its weight gradient reads, so B computes the staged
  # blocks' weight gradients itself (without recomputation W takes them: 49 of 51 leaves).
  sv = piped.pipeline.stage_vjp
  assert not [a for a in sv.r1_avals if a.shape[-1:] == (cfg.model.vocab_size,)]
  staged_in_w = sv._dp_in_w[: len(jax.tree.leaves(piped.init().params[STAGED]))]
  assert not any(staged_in_w), staged_in_w


def test_recomputed_dualpipe_defers_no_table_gradient():
  """Under the B/W split the first stage's whole backward is weight work (W), while the last
  stage computes the MTP depths' share of the embedding table's gradient in B. Looked up in
  the readout's `cond`, that share crossed from B to W as a [vocab, hidden] float32 table
  gradient in every micro-batch's r2 entry (3.7 of 3.9 GB per entry in the 671B plan under
  recomputation); the stage now looks every embedding up once, outside the conds, and the
  share crosses as the embeddings' cotangent. The step is traced, not compiled; the head
  runs in pieces (`train.logits_chunk`), which the B/W split traces through too."""
  cfg = _cfg("dualpipe", n_mb=4, model={"remat": "blocks"})
  cfg = config_lib.replace(cfg, train={"logits_chunk": 5})
  piped = PipelineTrainer(cfg, mesh_lib.make_mesh(cfg.parallel, jax.devices()[:8]))
  state = piped.init()
  tokens = jax.ShapeDtypeStruct((cfg.train.global_batch, 17), jnp.int32)
  jax.eval_shape(piped.loss_and_grads, state.params, state.biases, tokens)
  sv = piped.pipeline.stage_vjp
  assert cfg.model.num_nextn_predict_layers and sv.deferred  # MTP, and a W to defer to
  table = (cfg.model.vocab_size, cfg.model.hidden_size)
  assert not [a for a in sv.r2_avals if a.shape == table], sv.r2_avals


def _assert_equals_unpipelined(piped):
  """The pipelined step's loss, loads and gradients equal the unpipelined model's (its
  metrics, returned, carry the EP statistics)."""
  state = piped.init()
  tokens = jax.random.randint(jax.random.key(2), (piped.cfg.train.global_batch, 17), 0, 259)
  tokens = jax.device_put(tokens, piped.batch_sharding)
  loss, metrics, loads, grads = jax.jit(piped.loss_and_grads)(state.params, state.biases, tokens)

  def loss_fn(params):
    loss, metrics, loads = model_losses(
      piped.merge(params, jax.device_get(state.biases)), jax.device_get(tokens), piped.cfg.train
    )
    return loss, (metrics, loads)

  (ref_loss, (_, ref_loads)), ref_grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
    jax.device_get(state.params)
  )
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_array_equal(loads, ref_loads)
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)
  ):
    scale = float(np.abs(b).max()) + 1e-12
    err = float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale
    assert err < 2e-4, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"
  # The expert-parallel statistics travel with the pipelined metrics, as in the plain step.
  assert float(metrics["dropped_copies"]) == 0.0
  assert "cross_node_copies" in metrics and "dispatch_fallbacks" in metrics
  return metrics


@pytest.mark.slow  # compiles the DualPipe executor with EP inside (a minute or two)
def test_dualpipe_fb_interleaves_layers_in_hlo():
  """DualPipe's F&B op (`granularity="op"`) at the report's granularity (§3.2.1, Figure 4):
  one loop over the stage's layers whose body holds a forward layer of one micro-batch and a
  backward layer of another -- both chunks' attention, dispatch, MLP and combine -- with no
  data path from the forward chunk's all-to-alls to the backward chunk's GEMMs or from the
  backward chunk's all-to-alls to the forward chunk's GEMMs, so the scheduler may hide
  either chunk's communication under the other's compute."""
  from tests import hlo

  cfg = _cfg("dualpipe", pp=2, n_mb=4)
  trainer = PipelineTrainer(
    cfg, mesh_lib.make_mesh(cfg.parallel, jax.devices()[:8]), granularity="op"
  )
  state = trainer.init()
  tokens = jax.ShapeDtypeStruct(
    (cfg.train.global_batch, 17), np.int32, sharding=trainer.batch_sharding
  )
  text = jax.jit(trainer.loss_and_grads).lower(state.params, state.biases, tokens).compile()
  assert trainer.pipeline.stage_vjp.interleaves
  backward = lambda g, n: "backward_chunk" in g.scope[n]  # `StageVJP.forward_backward`'s
  fused = []
  for name, lines in hlo.computations(text.as_text()).items():
    g = hlo.Graph(lines)
    a2a = g.all_to_alls()
    f_a2a = [n for n in a2a if not backward(g, n)]
    b_a2a = [n for n in a2a if backward(g, n)]
    if not (f_a2a and b_a2a):
      continue
    gemms = [n for n, op in g.ops.items() if op in ("dot", "fusion") and "/moe/" in g.scope[n]]
    f_gemm = [n for n in gemms if not backward(g, n)]
    b_gemm = [n for n in gemms if backward(g, n)]
    assert f_gemm and b_gemm, name
    pairs = [(a, m) for a in f_a2a for m in b_gemm] + [(a, m) for a in b_a2a for m in f_gemm]
    fused.append((name, all(g.independent(a, m) for a, m in pairs), len(pairs)))
  # Exactly one loop body (the F&B branch's) dispatches for both chunks, and nothing in it
  # orders one chunk's communication after the other's compute.
  assert len(fused) == 1 and fused[0][1], fused
