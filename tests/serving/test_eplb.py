"""Redundant experts (EPLB): placement, replica routing, load window and measurement."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.serving import eplb

# The worked example published with DeepSeek's EPLB release: 2 layers of 12 experts in 4 groups,
# 16 slots on 2 nodes of 4 GPUs.
EXAMPLE_LxE = [
  [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
EXAMPLE_PHY2LOG = [
  [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def _check_tables(phy2log_LxR, log2phy_LxExM, logcnt_LxE, num_replicas):
  num_layers, num_experts = logcnt_LxE.shape
  assert phy2log_LxR.shape == (num_layers, num_replicas)
  assert np.all(logcnt_LxE >= 1)
  np.testing.assert_array_equal(logcnt_LxE.sum(-1), num_replicas)
  assert log2phy_LxExM.shape == (num_layers, num_experts, logcnt_LxE.max())
  for l in range(num_layers):
    np.testing.assert_array_equal(np.bincount(phy2log_LxR[l], minlength=num_experts), logcnt_LxE[l])
    for e in range(num_experts):
      slots = log2phy_LxExM[l, e]
      n = logcnt_LxE[l, e]
      assert np.all(slots[n:] == -1) and np.all(slots[:n] >= 0)
      np.testing.assert_array_equal(phy2log_LxR[l, slots[:n]], e)
      assert len(set(slots[:n].tolist())) == n


def test_readme_example():
  phy2log, log2phy, logcnt = eplb.rebalance_experts(EXAMPLE_LxE, 16, 4, 2, 8)
  np.testing.assert_array_equal(phy2log, EXAMPLE_PHY2LOG)
  np.testing.assert_array_equal(
    logcnt, [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
  )
  _check_tables(phy2log, log2phy, logcnt, 16)
  # Replica rank 0 is the slot that kept the expert, later ranks the redundant copies.
  np.testing.assert_array_equal(log2phy[0, 5], [0, 2])
  np.testing.assert_array_equal(log2phy[1, 1], [15, 11])


@pytest.mark.parametrize(
  "E,groups,nodes,gpus,R",
  [
    (16, 4, 2, 4, 20),
    (16, 4, 1, 4, 16),
    (32, 8, 4, 8, 40),
    (16, 4, 2, 8, 24),
    (8, 4, 2, 8, 8),
    (16, 4, 4, 4, 24),
    (24, 6, 4, 4, 28),
    (16, 4, 3, 6, 18),
  ],
)  # the last two: global policy
def test_invariants_and_node_locality(E, groups, nodes, gpus, R):
  rng = np.random.default_rng(E + R)
  load_LxE = rng.integers(0, 100, size=(3, E)).astype(float)
  load_LxE[1] = np.round(load_LxE[1] / 40)  # many exact ties
  phy2log, log2phy, logcnt = eplb.rebalance_experts(load_LxE, R, groups, nodes, gpus)
  _check_tables(phy2log, log2phy, logcnt, R)
  if groups % nodes == 0:  # hierarchical: every group's replicas sit on one node
    group_LxN = (phy2log // (E // groups)).reshape(3, nodes, R // nodes)
    for l in range(3):
      node_of_group = {}
      for n in range(nodes):
        for g in group_LxN[l, n]:
          assert node_of_group.setdefault(int(g), n) == n
      assert len(node_of_group) == groups


def test_no_redundancy_keeps_one_replica_each():
  load_LxE = np.random.default_rng(0).random((2, 16))
  phy2log, log2phy, logcnt = eplb.rebalance_experts(load_LxE, 16, 4, 2, 4)
  np.testing.assert_array_equal(logcnt, 1)
  assert log2phy.shape == (2, 16, 1)
  np.testing.assert_array_equal(np.sort(phy2log, -1), np.tile(np.arange(16), (2, 1)))


def test_replicas_go_to_the_hottest_experts():
  load_LxE = np.array([[1000.0, 1, 1, 1, 1, 1, 1, 1]])
  _, _, logcnt = eplb.rebalance_experts(load_LxE, 12, 1, 1, 4)  # 4 extra slots, global
  np.testing.assert_array_equal(logcnt, [[5, 1, 1, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(num_replicas=15), "num_replicas"),  # not a multiple of num_gpus
    (dict(num_replicas=8, num_gpus=8), "num_replicas"),  # fewer slots than experts
    (dict(num_gpus=7), "num_gpus"),  # not a multiple of num_nodes
    (dict(num_groups=5), "num_groups"),  # does not divide 12 experts
    (dict(num_nodes=0), "num_nodes"),
    (dict(num_gpus=2.0), "num_gpus"),
    (dict(weight_LxE=[1.0, 2.0]), "weight_LxE"),
    (dict(weight_LxE=[[1.0, -2.0]]), "weight_LxE"),
    (dict(weight_LxE=[[1.0, np.nan]]), "weight_LxE"),
  ],
)
def test_rebalance_rejects_bad_arguments(kwargs, match):
  args = dict(weight_LxE=EXAMPLE_LxE, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    eplb.rebalance_experts(**args)


# ---------------------------------------------------------------------------------------------
# Replica routing.


def _example_layer():
  phy2log, log2phy, logcnt = eplb.rebalance_experts(EXAMPLE_LxE, 16, 4, 2, 8)
  return phy2log[1], log2phy[1], logcnt[1]


def _routes(num_tokens, k, num_experts, seed=0):
  rng = np.random.default_rng(seed)
  return np.stack([rng.choice(num_experts, k, replace=False) for _ in range(num_tokens)])


@pytest.mark.parametrize("mode", ["static", "random", "round_robin"])
def test_physical_ids_hold_the_routed_expert(mode):
  phy2log_R, log2phy_ExM, logcnt_E = _example_layer()
  experts_Nxk = _routes(64, 3, 12)
  fn = jax.jit(functools.partial(eplb.physical_experts, mode=mode))
  phys_Nxk = np.asarray(fn(experts_Nxk, log2phy_ExM, logcnt_E, key=jax.random.key(0)))
  assert phys_Nxk.shape == (64, 3) and np.all((phys_Nxk >= 0) & (phys_Nxk < 16))
  np.testing.assert_array_equal(phy2log_R[phys_Nxk], experts_Nxk)


def test_static_mode_by_token_index_or_rank():
  _, log2phy_ExM, logcnt_E = _example_layer()
  experts_Nxk = np.array([[1, 5], [1, 5], [1, 0], [6, 8]])
  by_token = eplb.physical_experts(experts_Nxk, log2phy_ExM, logcnt_E)
  want = [[log2phy_ExM[e, n % logcnt_E[e]] for e in row] for n, row in enumerate(experts_Nxk)]
  np.testing.assert_array_equal(by_token, want)
  by_rank = eplb.physical_experts(experts_Nxk, log2phy_ExM, logcnt_E, rank=3)
  np.testing.assert_array_equal(
    by_rank, [[log2phy_ExM[e, 3 % logcnt_E[e]] for e in row] for row in experts_Nxk]
  )
  per_token = eplb.physical_experts(experts_Nxk, log2phy_ExM, logcnt_E, rank=np.arange(4) + 1)
  np.testing.assert_array_equal(
    per_token,
    [[log2phy_ExM[e, (n + 1) % logcnt_E[e]] for e in row] for n, row in enumerate(experts_Nxk)],
  )


def test_random_mode_uses_every_replica_uniformly():
  _, log2phy_ExM, logcnt_E = _example_layer()
  experts_Nxk = np.full((4000, 1), 8)  # expert 8 has 2 replicas in layer 1
  phys = np.asarray(
    eplb.physical_experts(experts_Nxk, log2phy_ExM, logcnt_E, mode="random", key=jax.random.key(1))
  )
  counts = [np.sum(phys == s) for s in log2phy_ExM[8, :2]]
  assert sum(counts) == 4000 and min(counts) > 1800


def test_round_robin_splits_evenly():
  _, log2phy_ExM, logcnt_E = _example_layer()
  experts_Nxk = _routes(101, 4, 12, seed=3)
  phys = np.asarray(eplb.physical_experts(experts_Nxk, log2phy_ExM, logcnt_E, mode="round_robin"))
  for e in range(12):
    counts = [np.sum(phys == s) for s in log2phy_ExM[e, : logcnt_E[e]]]
    assert sum(counts) == np.sum(experts_Nxk == e) and max(counts) - min(counts) <= 1


def test_physical_experts_rejects_bad_arguments():
  _, log2phy_ExM, logcnt_E = _example_layer()
  experts_Nxk = np.zeros((4, 2), np.int32)
  with pytest.raises(ValueError, match="mode"):
    eplb.physical_experts(experts_Nxk, log2phy_ExM, logcnt_E, mode="hash")
  with pytest.raises(ValueError, match="key"):
    eplb.physical_experts(experts_Nxk, log2phy_ExM, logcnt_E, mode="random")
  with pytest.raises(ValueError, match="rank"):
    eplb.physical_experts(experts_Nxk, log2phy_ExM, logcnt_E, rank=np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="experts_Nxk"):
    eplb.physical_experts(experts_Nxk[0], log2phy_ExM, logcnt_E)
  with pytest.raises(ValueError, match="logcnt_E"):
    eplb.physical_experts(experts_Nxk, log2phy_ExM, logcnt_E[:-1])
  with pytest.raises(ValueError, match="phy2log_R"):
    eplb.replicate_weights(np.zeros((12, 2, 2)), np.zeros((2, 16), np.int32))


def _swiglu(w, x_NxD):
  """A reference SwiGLU expert stack applied to every token: w[gate|up] [J, D, F], w[down]
  [J, F, D] -> [J, N, D]."""
  h_JxNxF = jax.nn.silu(jnp.einsum("nd,jdf->jnf", x_NxD, w["gate"])) * jnp.einsum(
    "nd,jdf->jnf", x_NxD, w["up"]
  )
  return jnp.einsum("jnf,jfd->jnd", h_JxNxF, w["down"])


def _moe(w, x_NxD, ids_Nxk, gates_Nxk):
  """Dispatch form: every expert runs, each token sums its k chosen outputs."""
  y_JxNxD = _swiglu(w, x_NxD)
  picked_NxkxD = y_JxNxD[ids_Nxk, jnp.arange(x_NxD.shape[0])[:, None]]
  return jnp.sum(gates_Nxk[:, :, None] * picked_NxkxD, axis=1)


def _moe_gathered(w, x_NxD, ids_Nxk, gates_Nxk):
  """Gather form: each (token, choice) multiplies by its own expert's weights."""
  g = {name: v[ids_Nxk] for name, v in w.items()}
  h = jax.nn.silu(jnp.einsum("nd,nkdf->nkf", x_NxD, g["gate"])) * jnp.einsum(
    "nd,nkdf->nkf", x_NxD, g["up"]
  )
  return jnp.einsum("nk,nkd->nd", gates_Nxk, jnp.einsum("nkf,nkfd->nkd", h, g["down"]))


@pytest.mark.parametrize("mode", ["static", "random", "round_robin"])
def test_physical_model_matches_logical_model(mode):
  phy2log_R, log2phy_ExM, logcnt_E = _example_layer()
  num_experts, dim, ffn, num_tokens, k = 12, 8, 16, 48, 3
  keys = jax.random.split(jax.random.key(0), 5)
  w = {
    "gate": jax.random.normal(keys[0], (num_experts, dim, ffn)) / dim**0.5,
    "up": jax.random.normal(keys[1], (num_experts, dim, ffn)) / dim**0.5,
    "down": jax.random.normal(keys[2], (num_experts, ffn, dim)) / ffn**0.5,
  }
  x_NxD = jax.random.normal(keys[3], (num_tokens, dim))
  experts_Nxk = jnp.asarray(_routes(num_tokens, k, num_experts, seed=7))
  gates_Nxk = jax.nn.softmax(jax.random.normal(keys[4], (num_tokens, k)), axis=-1)

  w_phys = eplb.replicate_weights(w, phy2log_R)
  assert w_phys["gate"].shape == (16, dim, ffn) and w_phys["down"].shape == (16, ffn, dim)
  phys_Nxk = eplb.physical_experts(
    experts_Nxk, log2phy_ExM, logcnt_E, mode=mode, key=jax.random.key(5)
  )
  assert len(np.unique(np.asarray(phys_Nxk))) > num_experts  # redundant slots really used
  for moe in (_moe, _moe_gathered):
    logical = moe(w, x_NxD, experts_Nxk, gates_Nxk)
    physical = moe(w_phys, x_NxD, phys_Nxk, gates_Nxk)
    np.testing.assert_array_equal(np.asarray(physical), np.asarray(logical))


# ---------------------------------------------------------------------------------------------
# Load statistics.


def test_load_window_slides_and_schedules():
  window = eplb.LoadWindow(num_layers=2, num_experts=3, capacity=3, rebalance_every=4)
  np.testing.assert_array_equal(window.total(), np.zeros((2, 3)))
  assert not window.should_rebalance(4)  # nothing recorded yet
  for i in range(1, 6):
    window.add(np.full((2, 3), float(i)))
  assert len(window) == 3
  np.testing.assert_array_equal(window.total(), np.full((2, 3), 3.0 + 4 + 5))
  assert [s for s in range(13) if window.should_rebalance(s)] == [4, 8, 12]
  with pytest.raises(ValueError, match="load_LxE"):
    window.add(np.ones((3, 2)))
  with pytest.raises(ValueError, match="load_LxE"):
    window.add(-np.ones((2, 3)))
  with pytest.raises(ValueError, match="step"):
    window.should_rebalance(-1)
  with pytest.raises(ValueError, match="capacity"):
    eplb.LoadWindow(2, 3, capacity=0, rebalance_every=1)


def test_loads_from_metrics(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step, value in [(1, 1.0), (2, 2.0), (3, 4.0)]:
      f.write(json.dumps({"step": step, "loss": 1.0, "load": [[value, 0.0], [0.0, value]]}) + "\n")
    f.write(json.dumps({"step": 3, "heldout_loss": 2.0}) + "\n")
  np.testing.assert_array_equal(eplb.loads_from_metrics(str(tmp_path)), [[7, 0], [0, 7]])
  np.testing.assert_array_equal(
    eplb.loads_from_metrics(str(tmp_path / "metrics.jsonl"), last=2), [[6, 0], [0, 6]]
  )
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
  with pytest.raises(ValueError, match="load"):
    eplb.loads_from_metrics(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------
# Measurement.


def test_device_loads_and_imbalance():
  load_LxE = np.array([[8.0, 2, 1, 1]])
  phy2log, logcnt = eplb.contiguous_placement(1, 4)
  np.testing.assert_array_equal(eplb.device_loads(load_LxE, phy2log, logcnt, 2), [[10, 2]])
  np.testing.assert_allclose(eplb.imbalance([[10.0, 2.0]]), [10 / 6])
  # Experts 0 and 1 split over two slots each: GPU 0 gets 4 + 1 + 1, GPU 1 gets 4 + 1 + 1.
  phy2log = np.array([[0, 2, 3, 0, 1, 1]])
  logcnt = np.array([[2, 2, 1, 1]])
  np.testing.assert_array_equal(eplb.device_loads(load_LxE, phy2log, logcnt, 2), [[6, 6]])
  np.testing.assert_array_equal(eplb.imbalance(np.zeros((3, 4))), np.ones(3))
  with pytest.raises(ValueError, match="num_gpus"):
    eplb.device_loads(load_LxE, phy2log, logcnt, 4)


def test_device_loads_conserve_total_load():
  load_LxE = eplb.zipf_load(4, 64, 10_000, seed=1)
  phy2log, _, logcnt = eplb.rebalance_experts(load_LxE, 80, 8, 2, 8)
  np.testing.assert_allclose(
    eplb.device_loads(load_LxE, phy2log, logcnt, 8).sum(-1), load_LxE.sum(-1)
  )


@pytest.mark.parametrize("groups,nodes", [(8, 4), (8, 1), (2, 4)])  # the last: global policy
def test_rebalancing_reduces_imbalance_on_zipf_load(groups, nodes):
  load_LxE = eplb.zipf_load(6, 256, 200_000, exponent=1.0, seed=0)
  result = eplb.compare_placements(load_LxE, 288, groups, nodes, 32)
  assert result["hierarchical"] == (groups % nodes == 0)
  assert all(a < b for a, b in zip(result["after_per_layer"], result["before_per_layer"]))
  assert result["after_mean"] < 1.6 < 4.0 < result["before_mean"]


def test_benchmark_report_on_a_workdir(tmp_path):
  from benchmarks import eplb as bench

  (tmp_path / "config.json").write_text(json.dumps({"model": {"n_group": 4}}))
  load_LxE = eplb.zipf_load(3, 16, 5000, seed=2)
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in range(1, 4):
      f.write(json.dumps({"step": step, "load": (load_LxE / 3).tolist()}) + "\n")
  result = bench.report(
    str(tmp_path), gpus=4, nodes=2, redundant=4, zipf_layers=2, zipf_tokens=20_000
  )
  assert result["example"]["phy2log"] == EXAMPLE_PHY2LOG
  row = result["rows"]["workdir"]
  assert (row["layers"], row["experts"], row["replicas"], row["groups"]) == (3, 16, 20, 4)
  for name, row in result["rows"].items():
    assert row["after_mean"] < row["before_mean"], name
  table = bench.format_table(result)
  assert "workdir" in table and "zipf s=1" in table


# ---------------------------------------------------------------------------------------------
# A model serving redundant experts.


def test_model_with_redundant_experts_equals_the_model():
  """Physical experts (8 logical + 4 replicas, from a skewed load) on one device and split
  over a 4-device expert axis: the same logits and logical loads; bad placements fail."""
  from flax import nnx

  from configs.dsv3 import get_config
  from dsv3_jax import config as config_lib
  from dsv3_jax import model as model_lib
  from dsv3_jax.parallel import mesh as mesh_lib
  from dsv3_jax.parallel import sharding

  cfg = config_lib.from_dict(get_config("tiny"))
  m = cfg.model
  model = model_lib.create(m, seed=3)
  load = eplb.zipf_load(m.n_moe_layers, m.n_routed_experts, 2000, exponent=1.2)
  placement = eplb.rebalance_experts(load, m.n_routed_experts + 4, m.n_group, 1, 4)
  served = eplb.with_redundant_experts(model, placement)
  assert served.moe.ffn.w1[...].shape[1] == 12 and model.moe.ffn.w1[...].shape[1] == 8
  tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, m.vocab_size)
  ref = model.forward(tokens)
  one = served.forward(tokens)
  np.testing.assert_allclose(one.logits_BxLxV, ref.logits_BxLxV, atol=1e-5)
  np.testing.assert_array_equal(one.load_LxE, ref.load_LxE)
  run = config_lib.replace(cfg, parallel={"data": 1, "expert": 4})
  plan = sharding.plan(run, mesh_lib.make_mesh(run.parallel, jax.devices()[:4]))
  graphdef, state = nnx.split(served)
  ep = jax.jit(lambda s, t: nnx.merge(graphdef, s).forward(t, routed=plan.routed))(state, tokens)
  np.testing.assert_allclose(ep.logits_BxLxV, ref.logits_BxLxV, atol=1e-5)
  np.testing.assert_array_equal(ep.load_LxE, ref.load_LxE)
  phy2log, log2phy, logcnt = placement
  with pytest.raises(ValueError, match="placement for 2 MoE layers x 8 experts"):
    eplb.with_redundant_experts(model, (phy2log[:1], log2phy[:1], logcnt[:1]))
  with pytest.raises(ValueError, match=r"phy2log holds ids outside \[0, 8\)"):
    eplb.with_redundant_experts(model, (phy2log + 8, log2phy, logcnt))
  odd = eplb.with_redundant_experts(
    model, eplb.rebalance_experts(load, m.n_routed_experts + 2, m.n_group, 1, 2)
  )  # 10 physical experts cannot split over 4 ranks
  with pytest.raises(ValueError, match="10 physical experts do not split"):
    nnx.merge(*nnx.split(odd)).forward(tokens, routed=plan.routed)
