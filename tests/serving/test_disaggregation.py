"""Prefill and decode on disjoint meshes (`serving/disaggregation.py`, arXiv 2412.19437 §3.4):
4 + 4 of the 8 emulated devices, expert-parallel on each; only the latent cache moves."""

import jax
import numpy as np
import pytest

from configs.dsv3 import get_config
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax.inference.generate import Generator, SamplingConfig
from dsv3_jax.serving import disaggregation as pd

PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3], [40, 41, 42, 43, 44, 45, 46]]  # 3 rows: padded to 4


@pytest.fixture(scope="module")
def setup():
  cfg = config_lib.from_dict(get_config("tiny")).model
  model = model_lib.create(cfg, seed=3)
  prefill, decode = pd.split_devices(jax.devices(), 4)
  return model, pd.DisaggregatedGenerator(model, prefill, decode), prefill, decode


def test_pd_equals_single_mesh_and_moves_only_the_latent_cache(setup):
  model, gen, prefill, decode = setup
  cfg = model.cfg
  # Each stage is its own expert-parallel mesh: routed experts split over its 4 devices.
  for side, devices in ((gen.prefill_side, prefill), (gen.decode_side, decode)):
    assert set(side.mesh.devices.flat) == set(devices) and side.mesh.shape["expert"] == 4
    assert side.generator.routed is not None
    w1 = side.generator.state["moe"][0]["ffn"]["w1"][...]  # per-layer weights (decode)
    assert w1.sharding.device_set == set(devices)
    assert w1.addressable_shards[0].data.shape[0] == cfg.n_routed_experts // 4
  for temperature in (0.0, 0.8):
    s = SamplingConfig(max_new_tokens=10, temperature=temperature, top_p=0.9, seed=7)
    ref = Generator(model).generate(PROMPTS, s)
    out = gen.generate(PROMPTS, s)
    assert out.tokens == ref.tokens, temperature
  # The hand-off: c_kv and k_pe of every layer for the padded batch (4 rows, 32 positions),
  # bf16 — and nothing else but the first tokens.
  rows, positions = 4, 32
  per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 * cfg.num_hidden_layers
  assert out.transfer.cache_bytes == rows * positions * per_token
  assert out.transfer.other_bytes == rows * 4
  # Full keys and values would be H x (nope + rope) + H x v per token and layer: 80 vs 40.
  h = cfg.num_attention_heads
  full_kv = h * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + h * cfg.v_head_dim
  assert per_token / (2 * cfg.num_hidden_layers) == full_kv / 2


def test_decode_mesh_with_redundant_experts(setup):
  """The decode mesh holds 12 physical experts (8 logical + 4 replicas of the hottest, from an
  EPLB placement of a skewed load), 3 per device; the tokens do not change."""
  from dsv3_jax.serving import eplb

  model, _, prefill, decode = setup
  cfg = model.cfg
  load = eplb.zipf_load(cfg.n_moe_layers, cfg.n_routed_experts, 4000, exponent=1.2, seed=1)
  placement = eplb.rebalance_experts(load, cfg.n_routed_experts + 4, cfg.n_group, 1, 4)
  gen = pd.DisaggregatedGenerator(model, prefill, decode, decode_placement=placement)
  w1 = gen.decode_side.generator.state["moe"][0]["ffn"]["w1"][...]  # per-layer weights
  assert w1.shape[0] == 12 and w1.addressable_shards[0].data.shape[0] == 3
  assert gen.prefill_side.generator.state["moe"][0]["ffn"]["w1"][...].shape[0] == 8
  s = SamplingConfig(max_new_tokens=8)
  assert gen.generate(PROMPTS, s).tokens == Generator(model).generate(PROMPTS, s).tokens
  r = eplb.compare_placements(load, 12, cfg.n_group, 1, 4)
  assert r["after_worst"] < r["before_worst"]  # max / mean load per device


def test_transfer_lands_on_the_decode_mesh(setup):
  model, gen, _, decode = setup
  p = gen.prefill_side
  cache = jax.device_put(gen._init_cache(4, 16), p.cache_sharding(gen._init_cache(4, 16)))
  moved, first, t = gen.transfer(cache, jax.numpy.zeros((4,), jax.numpy.int32))
  for leaf in jax.tree.leaves(moved) + [first]:
    assert leaf.sharding.device_set == set(decode)
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(moved)[0]), 0)
  assert t.cache_bytes == sum(x.nbytes for x in jax.tree.leaves(cache))


def test_bad_layouts_fail_clearly(setup):
  model = setup[0]
  devs = jax.devices()
  with pytest.raises(ValueError, match="n_prefill=8 must leave devices to both stages"):
    pd.split_devices(devs, 8)
  with pytest.raises(ValueError, match="must be disjoint"):
    pd.DisaggregatedGenerator(model, devs[:4], devs[3:])
  with pytest.raises(ValueError, match="expert axis \\(3\\) must divide its 4 devices"):
    pd.DisaggregatedGenerator(model, devs[:4], devs[4:], prefill_expert=3)
