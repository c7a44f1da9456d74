"""Tests for dsv3_jax.model's walk: an unrolled stack (`ModelConfig.unroll_layers`) computes
what the scanned stack computes, without the scans over its layers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

from configs.dsv3 import get_config
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax.train.loss import model_losses


class UnrollLayersTest(absltest.TestCase):
  def test_unrolled_stack_equals_scan(self):
    cfg = config_lib.from_dict(get_config("tiny"))
    self.assertGreater(cfg.model.n_moe_layers, 1)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 17))
    tokens = jnp.asarray(tokens, jnp.int32)

    def loss_and_grads(unroll):
      model = model_lib.create(dataclasses.replace(cfg.model, unroll_layers=unroll), seed=0)
      graphdef, params = nnx.split(model)
      fn = jax.jit(
        jax.value_and_grad(lambda p: model_losses(nnx.merge(graphdef, p), tokens, cfg.train)[0])
      )
      loops = fn.lower(params).as_text().count("stablehlo.while")
      return fn(params), loops

    (loss, grads), scan_loops = loss_and_grads(False)
    (loss_u, grads_u), unrolled_loops = loss_and_grads(True)
    # The layer scans (forward and backward) are gone; the expert kernel's own loops remain.
    self.assertLess(unrolled_loops, scan_loops)
    np.testing.assert_allclose(loss_u, loss, rtol=1e-6)
    for g, g_u in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_u)):
      np.testing.assert_allclose(g_u, g, rtol=1e-5, atol=1e-7)


if __name__ == "__main__":
  absltest.main()
