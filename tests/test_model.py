"""Tests for dsv3_jax.model's walk: an unrolled stack (`ModelConfig.unroll_layers`) computes
what the scanned stack computes, without the scans over its layers; recomputation
(`ModelConfig.remat`) gives the same loss and gradients while keeping less for the backward."""

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


class RematTest(absltest.TestCase):
  def test_blocks_remat_same_gradients_fewer_residuals(self):
    from dsv3_jax.parallel.planner import _stored_residual_bytes

    cfg = config_lib.from_dict(get_config("tiny"))
    self.assertGreater(cfg.model.num_nextn_predict_layers, 0)  # the readout reruns MTP too
    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (2, 17))
    tokens = jnp.asarray(tokens, jnp.int32)

    def run(remat):
      model = model_lib.create(dataclasses.replace(cfg.model, remat=remat), seed=0)
      graphdef, params = nnx.split(model)
      loss = lambda p, toks: model_losses(nnx.merge(graphdef, p), toks, cfg.train)[0]
      stored, avals = _stored_residual_bytes(
        lambda p, x, toks: ((loss(p, toks) + 0 * x,), {}),
        params,
        jnp.zeros((), jnp.float32),
        tokens,
        [True],
      )
      return jax.jit(jax.value_and_grad(loss))(params, tokens), stored, avals

    (loss, grads), kept, _ = run("none")
    (loss_r, grads_r), kept_r, avals_r = run("blocks")
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
      np.testing.assert_allclose(g_r, g, rtol=1e-5, atol=1e-7)
    # What stays for the backward: each stack's block inputs and the final norm's output
    # (hidden-sized), no fp32 logits and no per-matmul inputs.
    m = cfg.model
    self.assertLess(kept_r, kept / 4)
    largest = max(a.size for a in avals_r)
    self.assertLessEqual(
      largest, max(m.n_dense_layers, m.n_moe_layers) * tokens.size * m.hidden_size
    )
    self.assertFalse([a for a in avals_r if a.shape[-1:] == (m.vocab_size,)])

  def test_blocks_remat_rolls_an_unrolled_stack(self):
    # Unrolled, XLA schedules the reruns early and keeps them (temporaries barely fall), so
    # recomputation runs the stacks as rolled scans whatever `unroll_layers` says.
    cfg = config_lib.from_dict(get_config("tiny"))
    tokens = jnp.zeros((2, 17), jnp.int32)

    def loops(remat):
      m = dataclasses.replace(cfg.model, unroll_layers=True, remat=remat)
      graphdef, params = nnx.split(model_lib.create(m, seed=0))
      fn = jax.grad(lambda p: model_losses(nnx.merge(graphdef, p), tokens, cfg.train)[0])
      return jax.jit(fn).lower(params).as_text().count("stablehlo.while")

    self.assertGreater(loops("blocks"), loops("none"))

  def test_bad_remat_is_named(self):
    cfg = config_lib.from_dict(get_config("tiny"))
    with self.assertRaisesRegex(ValueError, "model.remat"):
      dataclasses.replace(cfg.model, remat="layers").validate()


if __name__ == "__main__":
  absltest.main()
