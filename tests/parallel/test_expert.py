"""Expert parallelism (parallel/expert.py) against the single-device MoE layer.

The EP layer must equal the unsharded layer — outputs, loads, balance loss and gradients —
on every (data, expert) mesh of 8 devices; drop nothing by default, even when every token
picks the same experts; drop exactly what it says under a capacity factor; and keep every
token within `topk_group` groups and so within that many nodes.
"""

import dataclasses
import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from dsv3_jax import config as config_lib
from dsv3_jax.config import ModelConfig, ParallelConfig
from dsv3_jax.layers import experts as experts_lib, routing as routing_lib
from dsv3_jax.layers import moe as moe_lib
from dsv3_jax.parallel import expert
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.parallel import sharding

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]  # (data, expert)


def _cfg(**overrides) -> ModelConfig:
  base = dict(
    hidden_size=32,
    moe_intermediate_size=16,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    expert_block_size=8,
  )
  base.update(overrides)
  return ModelConfig(**base).validate()


def _ep(data: int, exp: int, **kw) -> expert.ExpertParallel:
  mesh = mesh_lib.make_mesh(ParallelConfig(data=data, expert=exp))
  return expert.ExpertParallel(mesh, **kw)


def _layer(cfg: ModelConfig, seed: int = 0):
  module = moe_lib.MoE(cfg, rngs=nnx.Rngs(params=seed))
  # A non-zero router bias, so that selection (s + b) and weights (s) differ.
  module.bias[...] = jax.random.normal(jax.random.key(seed + 7), module.bias[...].shape) * 0.02
  return nnx.split(module)


def _objective(y, aux):
  # A non-linear read-out so that every output element gets its own cotangent.
  return jnp.sum(y * jnp.sin(y)) + aux["balance_loss"]


@functools.partial(jax.jit, static_argnums=(0,))
def _reference(graphdef, state, x):
  def f(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    return _objective(y, aux), (y, aux)

  return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(state, x)


def _sharded(graphdef, state, x, ep):
  """The MoE layer with its routed experts expert-parallel (any expert-axis size)."""

  def f(state, x):
    m = nnx.merge(graphdef, state)
    y, aux = expert.routed_experts(
      x, m.gate[...], m.bias[...], m.w1[...], m.w3[...], m.w2[...], m.cfg, ep
    )
    b, l, d = x.shape
    y = y + m.shared(x.reshape(b * l, d)).reshape(b, l, d)
    return _objective(y, aux), (y, aux)

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(state, x)


@pytest.fixture(scope="module")
def layer():
  cfg = _cfg()
  graphdef, state = _layer(cfg)
  x = jax.random.normal(jax.random.key(1), (8, 6, cfg.hidden_size), jnp.float32)
  return cfg, graphdef, state, x, _reference(graphdef, state, x)


@pytest.mark.parametrize("data,exp", MESHES, ids=[f"{d}x{e}" for d, e in MESHES])
def test_ep_forward_and_gradients_equal_unsharded(layer, data, exp):
  cfg, graphdef, state, x, ((ref_loss, (ref_y, ref_aux)), ref_grads) = layer
  ep = _ep(data, exp)
  (loss, (y, aux)), grads = _sharded(graphdef, state, x, ep)
  chex.assert_trees_all_close(y, ref_y, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(loss, ref_loss, rtol=1e-6)
  np.testing.assert_array_equal(aux["load"], ref_aux["load"])
  chex.assert_trees_all_close(aux["balance_loss"], ref_aux["balance_loss"], rtol=1e-6)
  assert float(aux["dropped_copies"]) == 0.0
  # Gradients w.r.t. the input, the gate, every expert and the shared expert.
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
  g_w1 = nnx.to_pure_dict(grads[0])["w1"]
  assert float(jnp.abs(g_w1).max()) > 0  # the comparison is not vacuous


def test_moe_runs_the_routed_experts_the_sharding_plan_gives_it(layer):
  cfg, graphdef, state, x, ((_, (ref_y, ref_aux)), _) = layer
  full = config_lib.from_dict({"model": dataclasses.asdict(cfg)})
  plan = sharding.plan(
    config_lib.replace(full, parallel={"data": 2, "expert": 4}),
    mesh_lib.make_mesh(ParallelConfig(data=2, expert=4)),
  )
  assert plan.routed is not None

  @jax.jit
  def run(state, x):
    return nnx.merge(graphdef, state)(x, plan.routed)

  y, aux = run(state, x)
  assert set(expert.STATS) <= set(aux)  # the EP path ran (the one-device path has no stats)
  chex.assert_trees_all_close(y, ref_y, rtol=1e-5, atol=1e-6)
  # With an expert axis of 1 the plan has no routed function: the one-device path runs.
  one = sharding.plan(
    config_lib.replace(full, parallel={"data": 8, "expert": 1}),
    mesh_lib.make_mesh(ParallelConfig(data=8, expert=1)),
  )
  assert one.routed is None
  _, aux1 = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x, one.routed), state, x)
  assert set(aux1) == {"load", "balance_loss"}


def _all_to_first_experts(cfg):
  """A layer on which every token picks experts 0..k-1 (all on EP rank 0 when k <= E / R)."""
  m = nnx.merge(*_layer(cfg))
  bias = np.zeros((cfg.n_routed_experts,), np.float32)
  bias[: cfg.num_experts_per_tok] = 10.0
  m.bias[...] = jnp.asarray(bias)
  return m


def test_dropless_when_every_token_picks_the_same_experts():
  cfg = _cfg()
  m = _all_to_first_experts(cfg)
  ep = _ep(2, 4)  # 4 experts per rank: all k=4 copies of every token go to rank 0
  x = jax.random.normal(jax.random.key(2), (8, 6, cfg.hidden_size), jnp.float32)
  routing = routing_lib.route(x.reshape(-1, cfg.hidden_size), m.gate[...], m.bias[...], cfg)
  np.testing.assert_array_equal(
    np.sort(routing.experts_Nxk, axis=1), np.tile(np.arange(4), (48, 1))
  )
  n_local = 8 * 6 // ep.n_shards
  # The buffer is exactly full: each source sends N_local * k copies to rank 0.
  assert expert.slots_per_rank(n_local, cfg, ep) == n_local * cfg.num_experts_per_tok
  y, aux = jax.jit(
    lambda x: expert.routed_experts(
      x, m.gate[...], m.bias[...], m.w1[...], m.w3[...], m.w2[...], cfg, ep
    )
  )(x)
  ref = experts_lib.dense_reference(
    x.reshape(-1, cfg.hidden_size), routing, m.w1[...], m.w3[...], m.w2[...]
  )
  assert float(aux["dropped_copies"]) == 0.0
  chex.assert_trees_all_close(y.reshape(-1, cfg.hidden_size), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(aux["load"][:4], np.full(4, 48.0))
  assert float(aux["load"][4:].sum()) == 0.0


@pytest.mark.parametrize("skewed", [False, True], ids=["balanced", "skewed"])
def test_bounded_dispatch_falls_back_exactly(layer, skewed):
  """The fast buffer (dispatch_factor x the mean copies) and, when any rank overflows it,
  the worst-case buffer taken by every rank together: dropless either way."""
  cfg, graphdef, state, x, ((_, (ref_y, _)), ref_grads) = layer
  ep = _ep(2, 4, dispatch_factor=1.0)
  n_local = x.shape[0] * x.shape[1] // ep.n_shards
  fast = expert.fast_slots_per_rank(n_local, cfg, ep)
  assert fast < expert.slots_per_rank(n_local, cfg, ep)
  sizes = expert.buffer_bytes(n_local, cfg, ep, itemsize=4)
  assert sizes["fast_send_buffer_bytes"] < sizes["send_buffer_bytes"]
  if skewed:
    m = _all_to_first_experts(cfg)
    routing = routing_lib.route(x.reshape(-1, cfg.hidden_size), m.gate[...], m.bias[...], cfg)
    y, aux = jax.jit(
      lambda x: expert.routed_experts(
        x, m.gate[...], m.bias[...], m.w1[...], m.w3[...], m.w2[...], cfg, ep
      )
    )(x)
    ref = experts_lib.dense_reference(
      x.reshape(-1, cfg.hidden_size), routing, m.w1[...], m.w3[...], m.w2[...]
    )
    chex.assert_trees_all_close(y.reshape(ref.shape), ref, rtol=1e-5, atol=1e-6)
    assert float(aux["dispatch_fallbacks"]) == 1.0  # 24 copies to rank 0 > fast slots
    # The extra rounds' backward (a written-out VJP) against autodiff of the reference, for
    # the input, the gate and every expert weight.
    d = cfg.hidden_size
    r = jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(-1, d)

    def ep_loss(x, gate, w1, w3, w2):
      y = expert.routed_experts(x, gate, m.bias[...], w1, w3, w2, cfg, ep)[0]
      return jnp.sum(y.reshape(-1, d) * r)

    def ref_loss(x, gate, w1, w3, w2):
      x_NxD = x.reshape(-1, d)
      routing = routing_lib.route(x_NxD, gate, m.bias[...], cfg)
      return jnp.sum(experts_lib.dense_reference(x_NxD, routing, w1, w3, w2) * r)

    args = (x, m.gate[...], m.w1[...], m.w3[...], m.w2[...])
    grads = jax.jit(jax.grad(ep_loss, argnums=range(5)))(*args)
    chex.assert_trees_all_close(
      grads, jax.grad(ref_loss, argnums=range(5))(*args), rtol=1e-4, atol=1e-5
    )
    assert float(jnp.abs(grads[2]).max()) > 0
  else:
    (_, (y, aux)), grads = _sharded(graphdef, state, x, ep)
    chex.assert_trees_all_close(y, ref_y, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
  assert float(aux["dropped_copies"]) == 0.0


def test_bounded_dispatch_keeps_no_worst_case_buffers_for_backward():
  """The compiled training step (value and grad) of the bounded dispatch needs less memory
  than the worst-case buffers: the fallback branch is rematerialised, so a differentiated
  `cond` does not keep its big residuals whichever branch ran."""
  cfg = _cfg(n_routed_experts=32, n_group=4, topk_group=4, num_experts_per_tok=4)
  graphdef, state = _layer(cfg)
  x = jax.ShapeDtypeStruct((8, 64, cfg.hidden_size), jnp.float32)

  def temp_bytes(ep):
    def f(state, x):
      m = nnx.merge(graphdef, state)
      y, aux = expert.routed_experts(
        x, m.gate[...], m.bias[...], m.w1[...], m.w3[...], m.w2[...], m.cfg, ep
      )
      return jnp.sum(y * y) + aux["balance_loss"]

    lowered = jax.jit(jax.grad(f, argnums=(0, 1))).lower(state, x)
    return lowered.compile().memory_analysis().temp_size_in_bytes

  worst, bounded = temp_bytes(_ep(1, 8)), temp_bytes(_ep(1, 8, dispatch_factor=1.25))
  assert bounded < 0.6 * worst, (bounded, worst)


@pytest.mark.parametrize("two_stage", [False, True], ids=["flat", "two_stage"])
def test_extra_rounds_are_one_loop_in_the_program(two_stage):
  """The bounded dispatches' extra rounds are one `scan` step each: the compiled training
  program holds the same all-to-alls whether the bound allows 4 rounds or 8 (unrolled, each
  round would add its all-to-alls and a copy of the expert kernel)."""
  from dsv3_jax.parallel import node_dispatch

  cfg = _cfg(n_routed_experts=32, n_group=4, topk_group=4, num_experts_per_tok=4)
  graphdef, state = _layer(cfg)
  x = jax.ShapeDtypeStruct((8, 64, cfg.hidden_size), jnp.float32)
  n_local = 8 * 64 // 8

  def program(factor):
    if two_stage:
      ep = _ep(1, 8, ranks_per_node=2, dispatch_factor=factor)
      dispatch, bound = node_dispatch.two_stage_dispatch, node_dispatch.fallback_rounds
    else:
      ep = _ep(1, 8, dispatch_factor=factor)
      dispatch = expert.flat_dispatch
      bound = lambda n, cfg, ep: (
        -(-expert.slots_per_rank(n, cfg, ep) // expert.fast_slots_per_rank(n, cfg, ep))
      )

    def f(state, x):
      m = nnx.merge(graphdef, state)
      y, aux = expert.routed_experts(
        x, m.gate[...], m.bias[...], m.w1[...], m.w3[...], m.w2[...], m.cfg, ep, dispatch=dispatch
      )
      return jnp.sum(y * y) + aux["balance_loss"]

    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(state, x).compile().as_text()
    return bound(n_local, cfg, ep), hlo.count(" all-to-all(")

  (few, a2a_few), (many, a2a_many) = program(2.0), program(1.0)
  assert (few, many) == (4, 8)
  assert a2a_few == a2a_many > 0, (a2a_few, a2a_many)


@pytest.mark.parametrize("two_stage", [False, True], ids=["flat", "two_stage"])
def test_extra_rounds_keep_their_inputs_once_for_backward(two_stage):
  """What the backward keeps does not grow with the number of rounds the bound allows: the
  rounds' inputs (the local expert weights among them) are kept once, not stacked per
  possible round (a differentiated scan of `cond`s keeps every step's branch inputs: 15 x the
  local expert weights at DeepSeek-V3's shape, whether or not a round runs). Before the
  written-out VJP the flat case kept 885 KB more with the larger bound (4 x the weights are
  786 KB); the two-stage one did not grow at this shape."""
  from dsv3_jax.parallel import node_dispatch

  cfg = _cfg(n_routed_experts=32, n_group=4, topk_group=4, num_experts_per_tok=4)
  graphdef, state = _layer(cfg)
  m = nnx.merge(graphdef, state)
  x = jax.random.normal(jax.random.key(3), (8, 64, cfg.hidden_size), jnp.float32)

  def kept_bytes(factor):
    if two_stage:
      ep = _ep(1, 8, ranks_per_node=2, dispatch_factor=factor)
      dispatch = node_dispatch.two_stage_dispatch
    else:
      ep, dispatch = _ep(1, 8, dispatch_factor=factor), expert.flat_dispatch

    def f(x, w1, w3, w2):
      return expert.routed_experts(
        x, m.gate[...], m.bias[...], w1, w3, w2, cfg, ep, dispatch=dispatch
      )[0]

    # Shapes only (nothing runs): the residuals of a traced VJP.
    vjp = jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], x, m.w1[...], m.w3[...], m.w2[...])
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(vjp))

  weights = sum(w.nbytes for w in (m.w1[...], m.w3[...], m.w2[...]))
  few, many = kept_bytes(2.0), kept_bytes(1.0)  # bounds of 4 and 8 rounds
  # Half the fast buffer (factor 1): the rounds' buffers shrink; nothing grows by a
  # per-round copy of the weights (which would add 4 x their bytes here).
  assert many <= few + weights // 2, (many, few, weights)


@pytest.mark.parametrize("two_stage", [False, True], ids=["flat", "two_stage"])
def test_backward_keeps_no_row_per_copy_outside_the_expert_kernel(layer, two_stage):
  """The routing weights gate each copy at its expert (sent with it), and every buffer is
  filled and read by gathers: what the backward keeps of [.., D] rows is only the expert
  kernel's own (the received rows and its buckets), never a row per routed copy, per
  (token, node) or per forwarded copy (a weighted combine at the source would keep the
  returned expert outputs: 14 KB per copy at the 671B shape, in BF16)."""
  cfg, graphdef, state, x, _ = layer
  m = nnx.merge(graphdef, state)
  if two_stage:
    from dsv3_jax.parallel import node_dispatch

    ep, dispatch = _ep(2, 4, ranks_per_node=2), node_dispatch.two_stage_dispatch
  else:
    ep, dispatch = _ep(2, 4), expert.flat_dispatch

  def f(x, w1, gate):
    return expert.routed_experts(
      x, gate, m.bias[...], w1, m.w3[...], m.w2[...], cfg, ep, dispatch=dispatch
    )[0]

  # Shapes only: the residuals of the traced VJP (run eagerly, op by op, it took ~45 s).
  vjp = jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], x, m.w1[...], m.gate[...])
  d, k = cfg.hidden_size, cfg.num_experts_per_tok
  n_local = x.shape[0] * x.shape[1] // ep.n_shards
  rows = {leaf.shape for leaf in jax.tree.leaves(vjp) if leaf.shape[-1:] == (d,)}
  forbidden = {(ep.n_shards * n_local * k, d), (ep.n_shards * n_local, ep.n_nodes, d)}
  if two_stage:  # the forwarder's copies: J * S1 rows of k
    forbidden.add((ep.n_shards * ep.n_nodes * n_local * k, d))
  assert rows and not rows & forbidden, rows
  # Besides the router's input (x, for the gate's gradient): the received rows and the
  # kernel's two bucket shapes.
  assert len(rows - {(ep.n_shards * n_local, d)}) <= 3, rows


@pytest.mark.parametrize("two_stage", [False, True], ids=["flat", "two_stage"])
def test_gradient_moves_rows_by_gathers_only(layer, two_stage):
  """Both directions of both dispatches move rows through the two slot maps
  (`experts.move_rows`), so the compiled gradient has no scatter of [.., D] rows: a gather's
  plain transpose is a scatter-add into a zero-filled buffer, slow on CPU."""
  cfg, graphdef, state, x, _ = layer
  m = nnx.merge(graphdef, state)
  if two_stage:
    from dsv3_jax.parallel import node_dispatch

    ep, dispatch = _ep(2, 4, ranks_per_node=2), node_dispatch.two_stage_dispatch
  else:
    ep, dispatch = _ep(2, 4), expert.flat_dispatch

  def loss(x, w1, gate):
    y = expert.routed_experts(
      x, gate, m.bias[...], w1, m.w3[...], m.w2[...], cfg, ep, dispatch=dispatch
    )[0]
    return jnp.sum(y * jnp.sin(y))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  hlo = grad.lower(x, m.w1[...], m.gate[...]).compile().as_text()
  row_scatter = re.compile(r"= f32\[[\d,]*\b%d\]\S* scatter\(" % cfg.hidden_size)
  assert not [line for line in hlo.splitlines() if row_scatter.search(line)]
  assert " all-to-all(" in hlo  # the dispatch is in the program


def test_capacity_factor_drops_and_counts_exactly():
  cfg = _cfg()
  m = _all_to_first_experts(cfg)
  ep = _ep(2, 4, capacity_factor=1.0)
  b, l, d, k = 8, 6, cfg.hidden_size, cfg.num_experts_per_tok
  x = jax.random.normal(jax.random.key(3), (b, l, d), jnp.float32)
  n_local = b * l // ep.n_shards
  slots = expert.slots_per_rank(n_local, cfg, ep)
  assert slots == math.ceil(n_local * k / ep.size)  # = 6 copies of 24 reach rank 0
  # Copies leave in token order (k per token), so each shard keeps its first `slots` copies.
  copy_in_shard_Nxk = (np.arange(b * l) % n_local)[:, None] * k + np.arange(k)[None, :]
  kept_Nxk = jnp.asarray(copy_in_shard_Nxk < slots, jnp.float32)
  assert 0 < kept_Nxk.sum() < kept_Nxk.size

  def sharded(x):
    y, aux = expert.routed_experts(
      x, m.gate[...], m.bias[...], m.w1[...], m.w3[...], m.w2[...], cfg, ep
    )
    return jnp.sum(y * jnp.sin(y)), (y, aux)

  def reference(x):  # dropped copies = zero combine weight
    routing = routing_lib.route(x.reshape(-1, d), m.gate[...], m.bias[...], cfg)
    routing = routing._replace(weights_Nxk=routing.weights_Nxk * kept_Nxk)
    y = experts_lib.dense_reference(
      x.reshape(-1, d), routing, m.w1[...], m.w3[...], m.w2[...]
    ).reshape(b, l, d)
    return jnp.sum(y * jnp.sin(y)), y

  (_, (y, aux)), dx = jax.jit(jax.value_and_grad(sharded, has_aux=True))(x)
  (_, ref), ref_dx = jax.value_and_grad(reference, has_aux=True)(x)
  assert float(aux["dropped_copies"]) == ep.n_shards * (n_local * k - slots)
  chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-6)
  # Dropped copies pass no gradient back to their tokens' inputs.
  chex.assert_trees_all_close(dx, ref_dx, rtol=1e-5, atol=1e-6)


def test_cross_node_statistics_match_a_count_from_the_routing():
  cfg = _cfg(n_group=4, topk_group=2)
  graphdef, state = _layer(cfg, seed=3)
  m = nnx.merge(graphdef, state)
  ep = _ep(1, 8, ranks_per_node=2)  # 8 EP ranks, 4 nodes of 2: one expert group per node
  b, l, d = 8, 4, cfg.hidden_size
  x = jax.random.normal(jax.random.key(4), (b, l, d), jnp.float32)
  _, aux = jax.jit(
    lambda x: expert.routed_experts(
      x, m.gate[...], m.bias[...], m.w1[...], m.w3[...], m.w2[...], cfg, ep
    )
  )(x)
  routing = routing_lib.route(x.reshape(-1, d), m.gate[...], m.bias[...], cfg)
  experts_Nxk = np.asarray(routing.experts_Nxk)
  node_Nxk = np.asarray(expert.node_of_expert(experts_Nxk, cfg.n_routed_experts, ep.n_nodes))
  n_local = b * l // ep.n_shards
  src_node_N = (np.arange(b * l) // n_local % ep.size) // ep.ranks_per_node
  remote = node_Nxk != src_node_N[:, None]
  assert float(aux["cross_node_copies"]) == remote.sum()
  sends = sum(len(set(node_Nxk[i][remote[i]])) for i in range(b * l))
  assert float(aux["remote_node_sends"]) == sends
  # Node-limited: every token reaches at most topk_group = 2 of the 4 nodes.
  assert max(len(set(row)) for row in node_Nxk) <= cfg.topk_group
  assert expert.max_nodes_per_token(cfg, ep.n_nodes) == cfg.topk_group


@settings(max_examples=30, deadline=None)
@given(
  seed=st.integers(0, 2**16),
  n_group=st.sampled_from([2, 4, 8]),
  per_group=st.sampled_from([2, 4]),
  data=st.data(),
)
def test_every_token_stays_within_topk_group_groups_and_nodes(seed, n_group, per_group, data):
  topk_group = data.draw(st.integers(1, n_group), label="topk_group")
  k = data.draw(st.integers(1, min(topk_group * per_group, 8)), label="k")
  n_nodes = data.draw(
    st.sampled_from([n for n in (1, 2, 4, 8) if n_group % n == 0]), label="n_nodes"
  )
  e = n_group * per_group
  cfg = _cfg(n_routed_experts=e, n_group=n_group, topk_group=topk_group, num_experts_per_tok=k)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(24, cfg.hidden_size)), jnp.float32)
  gate = jnp.asarray(rng.normal(size=(cfg.hidden_size, e)) * 0.3, jnp.float32)
  bias = jnp.asarray(rng.normal(size=(e,)) * 0.5, jnp.float32)
  experts_Nxk = np.asarray(routing_lib.route(x, gate, bias, cfg).experts_Nxk)
  groups_Nxk = experts_Nxk // per_group
  nodes_Nxk = np.asarray(expert.node_of_expert(experts_Nxk, e, n_nodes))
  bound = expert.max_nodes_per_token(cfg, n_nodes)
  assert bound <= topk_group
  for row, groups, nodes in zip(experts_Nxk, groups_Nxk, nodes_Nxk):
    assert len(set(row)) == k
    assert len(set(groups)) <= topk_group
    assert len(set(nodes)) <= bound


def test_buffer_bound_and_memory():
  cfg = _cfg()  # E=16, k=4
  ep = _ep(1, 8)  # 2 experts per rank: a token sends at most 2 copies to one rank
  sizes = expert.buffer_bytes(48, cfg, ep, itemsize=4)
  assert sizes["slots_per_rank"] == 48 * 2
  assert sizes["buffer_rows"] == 8 * 96
  assert sizes["overhead_vs_real"] == pytest.approx(8 * 2 / 4)
  assert sizes["send_buffer_bytes"] == 8 * 96 * cfg.hidden_size * 4
  capped = expert.buffer_bytes(
    48, cfg, expert.ExpertParallel(ep.mesh, capacity_factor=1.25), itemsize=4
  )
  assert capped["slots_per_rank"] == math.ceil(1.25 * 48 * 4 / 8)


def test_invalid_settings_name_the_field():
  mesh = mesh_lib.make_mesh(ParallelConfig(data=1, expert=8))
  with pytest.raises(ValueError, match="model.n_routed_experts"):
    expert.ExpertParallel(mesh).validate(_cfg(n_routed_experts=12, n_group=4))
  with pytest.raises(ValueError, match="parallel.ep_ranks_per_node"):
    expert.ExpertParallel(mesh, ranks_per_node=3).validate(_cfg())
  with pytest.raises(ValueError, match="parallel.capacity_factor"):
    expert.ExpertParallel(mesh, capacity_factor=-1.0).validate(_cfg())
  cfg = _cfg()
  x = jnp.zeros((4, 2, cfg.hidden_size))
  graphdef, state = _layer(cfg)
  m = nnx.merge(graphdef, state)
  with pytest.raises(ValueError, match="not divisible"):
    expert.routed_experts(
      x, m.gate[...], m.bias[...], m.w1[...], m.w3[...], m.w2[...], cfg, expert.ExpertParallel(mesh)
    )


def test_mesh_shapes_rules_and_errors():
  mesh = mesh_lib.make_mesh(ParallelConfig(data=2, expert=4))
  assert dict(mesh.shape) == {"data": 2, "expert": 4, "pipe": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(mesh_lib.make_mesh(ParallelConfig(data=-1, expert=2)).shape)["data"] == 4
  with pytest.raises(ValueError, match="does not match 8 devices"):
    mesh_lib.make_mesh(ParallelConfig(data=2, expert=2))
  with pytest.raises(ValueError, match="not divisible"):
    mesh_lib.make_mesh(ParallelConfig(data=-1, expert=3))
  # Routed experts are split over `expert` (after the stacked-layer axis); the rest replicate.
  P = jax.sharding.PartitionSpec
  assert sharding.logical_to_mesh(("expert", "embed", "expert_mlp"), 4) == P(
    None, "expert", None, None
  )
  assert sharding.logical_to_mesh(("embed", "mlp"), 2) == P(None, None)
  with pytest.raises(ValueError, match="no sharding rule"):
    sharding.logical_to_mesh(("nonsense",), 1)
