"""The two-stage (node, then GPU) expert dispatch (parallel/node_dispatch.py).

DeepSeek-V3 sends a token over IB once to each node hosting its experts, then forwards it
over NVLink inside the node (arXiv 2412.19437 §3.2.2), and node-limited routing (§2.1.2)
bounds the nodes a token reaches. On 8 emulated devices split into nodes (4 x 2 and 2 x 4
ranks) the two-stage layer must equal the single-device layer and the flat dispatch —
values, loads, balance loss and gradients — stay dropless on skewed routings that fill its
worst-case buffers exactly, and count cross-node traffic as a count from the routing does.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig, ParallelConfig
from dsv3_jax.layers import experts as experts_lib
from dsv3_jax.layers import routing as routing_lib
from dsv3_jax.parallel import expert, node_dispatch
from dsv3_jax.parallel import mesh as mesh_lib

# (data, expert, ranks per node): 4 nodes x 2 GPUs, 2 nodes x 4 GPUs, 2 data x 2 nodes x 2,
# and `make run`'s 2 data x 4 nodes of one rank (a token crosses once per rank it routes to).
MESHES = [(1, 8, 2), (1, 8, 4), (2, 4, 2), (2, 4, 1)]
IDS = ["4x2", "2x4", "dp2-2x2", "dp2-4x1"]
B, L = 8, 6


def _cfg(n_nodes: int, **overrides) -> ModelConfig:
  base = {
    "hidden_size": 32,
    "moe_intermediate_size": 16,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": n_nodes,
    "topk_group": 2,
    "expert_block_size": 8,
  }
  base.update(overrides)
  return ModelConfig(**base).validate()


def _ep(data: int, exp: int, per_node: int, **kw) -> expert.ExpertParallel:
  mesh = mesh_lib.make_mesh(ParallelConfig(data=data, expert=exp))
  return expert.ExpertParallel(mesh, ranks_per_node=per_node, **kw)


def _params(cfg: ModelConfig, seed: int = 0) -> dict:
  d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
  ks = jax.random.split(jax.random.key(seed), 5)
  return {
    "gate": jax.random.normal(ks[0], (d, e)) * d**-0.5,
    "bias": jax.random.normal(ks[1], (e,)) * 0.02,
    "w1": jax.random.normal(ks[2], (e, d, f)) * d**-0.5,
    "w3": jax.random.normal(ks[3], (e, d, f)) * d**-0.5,
    "w2": jax.random.normal(ks[4], (e, f, d)) * f**-0.5,
  }


def _objective(y, balance):
  return jnp.sum(y * jnp.sin(y)) + balance  # every output element gets its own cotangent


def _single(cfg):
  def f(p, x):
    b, l, d = x.shape
    routing = routing_lib.route(x.reshape(-1, d), p["gate"], p["bias"], cfg)
    y = experts_lib.routed_ffn(
      x.reshape(-1, d),
      routing,
      p["w1"],
      p["w3"],
      p["w2"],
      cfg.expert_block_size,
      cfg.matmul_precision,
    ).reshape(b, l, d)
    aux = {
      "load": routing_lib.expert_load(routing.experts_Nxk, cfg.n_routed_experts),
      "balance_loss": routing_lib.sequence_balance_loss(routing, b, cfg),
    }
    return _objective(y, aux["balance_loss"]), (y, aux)

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def _parallel(layer_fn, cfg, ep):
  def f(p, x):
    y, aux = layer_fn(x, p["gate"], p["bias"], p["w1"], p["w3"], p["w2"], cfg, ep)
    return _objective(y, aux["balance_loss"]), (y, aux)

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def _x(cfg, seed=1):
  return jax.random.normal(jax.random.key(seed), (B, L, cfg.hidden_size), jnp.float32)


def _buffer_loads(experts_Nxk, cfg, ep):
  """(max tokens one rank sends to one node, max copies one forwarder sends to one rank),
  counted from the routing in numpy: what S1 and S2 must hold."""
  experts_Nxk = np.asarray(experts_Nxk)
  n_local = len(experts_Nxk) // ep.n_shards
  r, j, g = ep.size, ep.n_nodes, ep.ranks_per_node
  e_loc = cfg.n_routed_experts // r
  stage1, stage2 = 0, 0
  for shard in range(ep.n_shards):  # shards are (data, expert)-major: rank = shard % R
    rows = experts_Nxk[shard * n_local : (shard + 1) * n_local]
    nodes = rows // (e_loc * g)
    for node in range(j):
      stage1 = max(stage1, int(np.any(nodes == node, axis=1).sum()))
  for data in range(ep.n_shards // r):
    fwd = np.zeros((j, g, r), int)  # [forwarder node, forwarder local rank, destination]
    for rank in range(r):
      shard = data * r + rank
      rows = experts_Nxk[shard * n_local : (shard + 1) * n_local]
      for dst in (rows // e_loc).reshape(-1):
        fwd[dst // g, rank % g, dst] += 1
    stage2 = max(stage2, int(fwd.max()))
  return stage1, stage2


@pytest.mark.parametrize("data,exp,per_node", MESHES, ids=IDS)
def test_two_stage_equals_single_device_and_flat(data, exp, per_node):
  cfg = _cfg(exp // per_node)
  ep = _ep(data, exp, per_node, dispatch_factor=2.0)
  p, x = _params(cfg), _x(cfg)
  (ref_loss, (ref_y, ref_aux)), ref_grads = _single(cfg)(p, x)
  (loss, (y, aux)), grads = _parallel(node_dispatch.routed_experts, cfg, ep)(p, x)
  chex.assert_trees_all_close(y, ref_y, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(loss, ref_loss, rtol=1e-6)
  np.testing.assert_array_equal(aux["load"], ref_aux["load"])
  chex.assert_trees_all_close(aux["balance_loss"], ref_aux["balance_loss"], rtol=1e-6)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(grads[0]["w1"]).max()) > 0 and float(jnp.abs(grads[1]).max()) > 0
  assert float(jnp.abs(grads[0]["gate"]).max()) > 0  # the routing weights' path is live
  # The flat dispatch: same outputs and the same traffic statistics.
  flat_y, flat_aux = jax.jit(
    lambda p, x: expert.routed_experts(x, p["gate"], p["bias"], p["w1"], p["w3"], p["w2"], cfg, ep)
  )(p, x)
  chex.assert_trees_all_close(y, flat_y, rtol=1e-5, atol=1e-6)
  for name in ("cross_node_copies", "remote_node_sends", "dropped_copies"):
    assert float(aux[name]) == float(flat_aux[name]), name
  # Random routing stays within the fast buffers, and they are smaller than the worst case.
  assert float(aux["dispatch_fallbacks"]) == 0.0
  n_local = B * L // ep.n_shards
  fast = node_dispatch.fast_two_stage_slots(n_local, cfg, ep)
  worst = node_dispatch.two_stage_slots(n_local, cfg, ep)
  assert fast[1] < worst[1]
  routing = routing_lib.route(x.reshape(-1, cfg.hidden_size), p["gate"], p["bias"], cfg)
  loads = _buffer_loads(routing.experts_Nxk, cfg, ep)
  assert loads[0] <= fast[0] and loads[1] <= fast[1]


@pytest.mark.parametrize("dispatch_factor", [0.0, 2.0], ids=["worst_case", "fallback"])
def test_skewed_routing_fills_the_worst_case_buffers_exactly_and_drops_nothing(dispatch_factor):
  """Every token picks experts 0..3 (node 0; ranks 0 and 1 with 2 experts each): every
  source fills its S1 slots to node 0 and every node-0 forwarder its S2 slots to ranks 0
  and 1 — the bounds are tight — and the fast path falls back to them."""
  cfg = _cfg(4)
  ep = _ep(1, 8, 2, dispatch_factor=dispatch_factor)
  p, x = _params(cfg, seed=2), _x(cfg, seed=3)
  p["bias"] = p["bias"].at[: cfg.num_experts_per_tok].add(10.0)
  routing = routing_lib.route(x.reshape(-1, cfg.hidden_size), p["gate"], p["bias"], cfg)
  np.testing.assert_array_equal(
    np.sort(routing.experts_Nxk, axis=1), np.tile(np.arange(4), (B * L, 1))
  )
  n_local = B * L // ep.n_shards
  assert (
    _buffer_loads(routing.experts_Nxk, cfg, ep)
    == node_dispatch.two_stage_slots(n_local, cfg, ep)
    == (n_local, ep.n_nodes * n_local * 2)
  )
  (_, (y, aux)), grads = _parallel(node_dispatch.routed_experts, cfg, ep)(p, x)
  (_, (ref_y, _)), ref_grads = _single(cfg)(p, x)
  chex.assert_trees_all_close(y, ref_y, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-5)
  assert float(aux["dropped_copies"]) == 0.0
  assert float(aux["dispatch_fallbacks"]) == (1.0 if dispatch_factor else 0.0)
  if dispatch_factor:
    # The fallback holds no worst-case stage-2 buffer: it sent the forwarders' 2 x S2-fast
    # copies in two rounds of the fast buffer (its all-to-alls' rows: at most the stage-1
    # bound J x S1 or G x fast S2; the worst-case G x S2 is twice that).
    (s1, s2), (_, f2) = (
      node_dispatch.two_stage_slots(n_local, cfg, ep),
      node_dispatch.fast_two_stage_slots(n_local, cfg, ep),
    )
    assert node_dispatch.fallback_rounds(n_local, cfg, ep) == 2 == s2 // f2
    hlo = _parallel(node_dispatch.routed_experts, cfg, ep).lower(p, x).compile().as_text()
    rows = [  # each all-to-all of [.., D] rows: its operands' rows summed
      sum(int(a) * int(b) for a, b in re.findall(rf"\[(\d+),(\d+),{cfg.hidden_size}\]", lhs))
      for lhs in (line.split(" all-to-all(")[0] for line in hlo.splitlines())
      if " = " in lhs and "all-to-all" in lhs.split(" = ")[0]
    ]
    bound = max(ep.n_nodes * s1, ep.ranks_per_node * f2)
    assert rows and max(rows) <= bound < ep.ranks_per_node * s2, (rows, bound)
    sizes = node_dispatch.buffer_bytes(n_local, cfg, ep, 4)
    assert sizes["fallback_send_buffer_bytes"] == (ep.n_nodes * s1 + 2 * f2) * 32 * 4
    assert sizes["worst_case_send_buffer_bytes"] > sizes["fallback_send_buffer_bytes"]


def test_cross_node_traffic_counts_sends_like_the_layer_and_a_loop():
  cfg = _cfg(4)
  ep = _ep(1, 8, 2)
  p, x = _params(cfg, seed=4), _x(cfg, seed=5)
  n = B * L
  _, aux = jax.jit(
    lambda p, x: node_dispatch.routed_experts(
      x, p["gate"], p["bias"], p["w1"], p["w3"], p["w2"], cfg, ep
    )
  )(p, x)
  experts_Nxk = np.asarray(
    routing_lib.route(x.reshape(n, -1), p["gate"], p["bias"], cfg).experts_Nxk
  )
  src_node_N = (np.arange(n) // (n // ep.size)) // ep.ranks_per_node
  t = node_dispatch.cross_node_traffic(
    experts_Nxk, src_node_N, cfg.n_routed_experts, ep.n_nodes, hidden_size=cfg.hidden_size
  )
  nodes_Nxk = experts_Nxk // (cfg.n_routed_experts // ep.n_nodes)
  flat = sum(int(e != s) for row, s in zip(nodes_Nxk, src_node_N) for e in row)
  sends = sum(len(set(row) - {s}) for row, s in zip(nodes_Nxk, src_node_N))
  assert t["flat_sends_per_token"] == pytest.approx(flat / n)
  assert t["two_stage_sends_per_token"] == pytest.approx(sends / n)
  assert float(aux["cross_node_copies"]) == flat and float(aux["remote_node_sends"]) == sends
  assert t["two_stage_bytes_per_token"] == pytest.approx(sends / n * cfg.hidden_size * 3)
  assert t["flat_bytes_per_token"] == pytest.approx(flat / n * cfg.hidden_size * 3)
  # One send per remote node: never more than the copies, nor than M = topk_group nodes.
  assert sends < flat
  assert t["two_stage_sends_max"] <= cfg.topk_group


def test_groups_and_settings():
  ep = _ep(1, 8, 2)
  assert node_dispatch.node_groups(ep) == [[0, 2, 4, 6], [1, 3, 5, 7]]
  assert node_dispatch.gpu_groups(ep) == [[0, 1], [2, 3], [4, 5], [6, 7]]
  cfg = _cfg(4)
  assert node_dispatch.two_stage_slots(6, cfg, ep) == (6, 4 * 6 * 2)
  with pytest.raises(ValueError, match="parallel.capacity_factor"):
    node_dispatch.validate(cfg, _ep(1, 8, 2, capacity_factor=1.0))
  with pytest.raises(ValueError, match="parallel.ep_ranks_per_node"):
    node_dispatch.validate(cfg, _ep(1, 8, 3))
