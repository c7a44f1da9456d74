"""AdamW's weight decay reaches weight matrices only, stacked norm scales never."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import dsv3
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax.train import optimizer as opt_lib


def _abstract_params(cfg):
  _, params, _ = nnx.split(model_lib.abstract(cfg.model), nnx.Param, ...)
  return nnx.to_pure_dict(params)


def _names(mask, want: bool) -> set:
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path) for path, v in flat if v == want}


def test_decay_mask_of_the_tiny_model():
  cfg = config_lib.from_dict(dsv3.get_config("tiny"))
  params = _abstract_params(cfg)
  mask = opt_lib._decay_mask(params)
  kept = _names(mask, False)
  assert kept == {
    "norm/scale",
    "dense/attn_norm/scale",
    "dense/ffn_norm/scale",
    "dense/attn/q_norm/scale",
    "dense/attn/kv_norm/scale",
    "moe/attn_norm/scale",
    "moe/ffn_norm/scale",
    "moe/attn/q_norm/scale",
    "moe/attn/kv_norm/scale",
    "mtp/0/enorm/scale",
    "mtp/0/hnorm/scale",
    "mtp/0/norm/scale",
    "mtp/0/block/attn_norm/scale",
    "mtp/0/block/ffn_norm/scale",
    "mtp/0/block/attn/q_norm/scale",
    "mtp/0/block/attn/kv_norm/scale",
  }
  # The stacked layers' scales are [n_layers, D] (rank 2), and still not decayed.
  assert params["moe"]["attn_norm"]["scale"].shape == (2, cfg.model.hidden_size)
  decayed = _names(mask, True)
  for name in (
    "embed",
    "head/kernel",
    "dense/attn/wq_a/kernel",
    "dense/ffn/w1/kernel",
    "moe/ffn/gate",
    "moe/ffn/w1",
    "moe/ffn/w2",
    "moe/ffn/w3",
    "moe/ffn/shared/w2/kernel",
    "mtp/0/eh_proj/kernel",
    "mtp/0/block/ffn/w3",
  ):
    assert name in decayed
  assert all(n.endswith(("kernel", "embed", "gate", "w1", "w2", "w3")) for n in decayed)


def test_decay_moves_matrices_not_scales():
  tcfg = config_lib.TrainConfig(weight_decay=0.5, learning_rate=1.0, warmup_steps=0, steps=10)
  tx = opt_lib.make_optimizer(tcfg)
  params = {"layers": {"norm": {"scale": jnp.ones((3, 4))}, "w": {"kernel": jnp.ones((3, 4, 4))}}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["layers"]["norm"]["scale"], 1.0)
  np.testing.assert_allclose(new["layers"]["w"]["kernel"], 0.5)  # 1 - lr * wd * 1


def test_lr_scale_multiplies_the_schedule():
  base = config_lib.TrainConfig(learning_rate=1e-3, warmup_steps=2, steps=10)
  scaled = config_lib.TrainConfig(learning_rate=1e-3, warmup_steps=2, steps=10, lr_scale=0.25)
  for step in (1, 2, 5, 10):
    np.testing.assert_allclose(
      opt_lib.learning_rate_schedule(scaled)(step),
      0.25 * opt_lib.learning_rate_schedule(base)(step),
      rtol=1e-6,
    )
