"""Tests for dsv3_jax.train.loss (cross-entropy, the head in pieces) and
dsv3_jax.train.balance (the aux-loss-free bias update and MaxVio), against NumPy formulas
written here.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from configs.dsv3 import get_config
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax.layers import routing as balance
from dsv3_jax.train import loss as loss_lib


def _ref_nll(logits, targets):
  """Per-token negative log-likelihood from a float64 log-softmax."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


def _ref_max_violation(load):
  load = np.asarray(load, np.float64)
  mean = load.mean(-1)
  return (load.max(-1) - mean) / mean


class CrossEntropyTest(parameterized.TestCase):
  def _batch(self, seed=0, b=3, l=5, v=11, offset=0.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((b, l, v)) * 3 + offset).astype(np.float32)
    targets = rng.integers(0, v, size=(b, l))
    return logits, targets

  @parameterized.named_parameters(("plain", 0.0), ("large_offset", 1e4))
  def test_matches_numpy(self, offset):
    logits, targets = self._batch(offset=offset)
    got = loss_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_allclose(got, _ref_nll(logits, targets).mean(), rtol=1e-5)

  def test_masked_matches_numpy(self):
    logits, targets = self._batch(seed=1)
    mask = np.random.default_rng(2).random(targets.shape) < 0.6
    got = loss_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    nll = _ref_nll(logits, targets)
    np.testing.assert_allclose(got, nll[mask].mean(), rtol=1e-5)
    # Masked positions do not matter, whatever their logits hold.
    scrambled = np.where(mask[..., None], logits, np.float32(1e3))
    np.testing.assert_allclose(
      loss_lib.cross_entropy(jnp.asarray(scrambled), jnp.asarray(targets), jnp.asarray(mask)),
      got,
      rtol=1e-6,
    )
    # An all-true mask is the plain mean.
    np.testing.assert_allclose(
      loss_lib.cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), jnp.ones(targets.shape, bool)
      ),
      nll.mean(),
      rtol=1e-5,
    )

  def test_empty_mask_is_zero(self):
    logits, targets = self._batch(seed=3)
    got = loss_lib.cross_entropy(
      jnp.asarray(logits), jnp.asarray(targets), jnp.zeros(targets.shape, bool)
    )
    self.assertEqual(float(got), 0.0)

  def test_bfloat16_logits_computed_in_float32(self):
    logits, targets = self._batch(seed=4)
    lb = jnp.asarray(logits, jnp.bfloat16)
    got = loss_lib.cross_entropy(lb, jnp.asarray(targets))
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_allclose(got, _ref_nll(np.asarray(lb, np.float32), targets).mean(), rtol=1e-5)

  def test_gradient_is_softmax_minus_onehot(self):
    logits, targets = self._batch(seed=5, b=2, l=3, v=7)
    grad = jax.grad(loss_lib.cross_entropy)(jnp.asarray(logits), jnp.asarray(targets))
    z = np.exp(logits - logits.max(-1, keepdims=True))
    p = z / z.sum(-1, keepdims=True)
    want = (p - np.eye(7)[targets]) / targets.size
    np.testing.assert_allclose(grad, want, atol=1e-6)

  def test_masked_bfloat16_gradient_and_what_the_backward_keeps(self):
    logits, targets = self._batch(seed=6, b=2, l=4, v=9, offset=50.0)
    mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], bool)
    for dtype in (jnp.float32, jnp.bfloat16):
      lg = jnp.asarray(logits, dtype)
      args = (jnp.asarray(targets), jnp.asarray(mask))
      grad = jax.grad(loss_lib.cross_entropy)(lg, *args)
      self.assertEqual(grad.dtype, dtype)
      z = np.asarray(lg, np.float64)
      p = np.exp(z - z.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      want = (p - np.eye(9)[targets]) * mask[..., None] / mask.sum()
      np.testing.assert_allclose(
        np.asarray(grad, np.float32), want, atol=1e-6 if dtype == jnp.float32 else 4e-3
      )
      # The backward keeps the logits as they came and a log-sum-exp per position: one
      # [B, L, V] array in the logits' dtype (autodiff of log_softmax kept float32 log-probs).
      _, vjp = jax.vjp(lambda x: loss_lib.cross_entropy(x, *args), lg)
      vocab_sized = [r for r in jax.tree.leaves(vjp) if np.shape(r)[-1:] == (9,)]
      self.assertEqual([r.dtype for r in vocab_sized], [dtype])


class LogitsChunkTest(parameterized.TestCase):
  @parameterized.parameters("none", "blocks")
  def test_keeps_no_logits_and_changes_nothing_else(self, remat):
    """`train.logits_chunk`: the head and its cross-entropy (main and two MTP depths) run a
    piece of positions at a time, rerun in the backward: loss, MTP CE and every gradient
    equal the whole-sequence objective's (a piece that divides L and one that does not),
    with and without the blocks' recomputation; without it, the backward keeps no
    vocabulary-sized array where the whole-sequence objective keeps the logits."""
    depth, b, l = 2, 2, 12
    c = get_config("tiny")
    c.model.update(num_nextn_predict_layers=depth, init_std=0.1, remat=remat)
    cfg = config_lib.from_dict(c)
    model = model_lib.create(cfg.model, seed=5)
    tokens = jax.random.randint(jax.random.key(6), (b, l + 1), 0, cfg.model.vocab_size)
    graphdef, state = nnx.split(model)

    def objective(chunk):
      tcfg = dataclasses.replace(cfg.train, logits_chunk=chunk)

      def f(state):
        loss, metrics, _ = loss_lib.model_losses(nnx.merge(graphdef, state), tokens, tcfg)
        return loss, metrics

      return f

    (want, want_m), want_g = jax.jit(jax.value_and_grad(objective(0), has_aux=True))(state)
    for chunk in (4, 5):
      (got, got_m), got_g = jax.jit(jax.value_and_grad(objective(chunk), has_aux=True))(state)
      np.testing.assert_allclose(got, want, rtol=1e-6)
      np.testing.assert_allclose(got_m["mtp_ce"], want_m["mtp_ce"], rtol=1e-6)
      flat_got = jax.tree_util.tree_flatten_with_path(got_g)[0]
      for (path, g), w in zip(flat_got, jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    if remat == "none":
      v = cfg.model.vocab_size

      def kept(chunk):  # the backward's residuals, traced (shapes only)
        vjp = jax.eval_shape(lambda s: jax.vjp(lambda p: objective(chunk)(p)[0], s)[1], state)
        return [r.shape for r in jax.tree.leaves(vjp) if r.shape[-1:] == (v,) and len(r.shape) >= 3]

      self.assertNotEmpty(kept(0))  # the logits [B, L, V] (main and MTP)
      self.assertEmpty(kept(4))

  def test_held_out_loss_takes_the_head_in_pieces_too(self):
    """`Trainer.eval_step` applies the head as the training loss does: with pieces (5 of 16
    positions) no logits of every position exist, and the held-out cross-entropy is the
    same as without, on one device."""
    from dsv3_jax.parallel import mesh as mesh_lib
    from dsv3_jax.train.step import Trainer

    c = get_config("tiny")
    c.parallel.update(data=1, expert=1, pipe=1)
    c.train.seq_len = 16
    tokens = jax.random.randint(jax.random.key(7), (2, 17), 0, c.model.vocab_size)
    losses = []
    for chunk in (0, 5):
      c.train.logits_chunk = chunk
      cfg = config_lib.from_dict(c)
      trainer = Trainer(cfg, mesh_lib.make_mesh(cfg.parallel, jax.devices()[:1]))
      batch = {"tokens": jax.device_put(tokens, trainer.batch_sharding)}
      state = trainer.init()
      losses.append(float(trainer.eval_step(state, batch)))
      whole = f"f32[2,16,{c.model.vocab_size}]"  # the logits of every position at once
      self.assertEqual(whole in str(jax.make_jaxpr(trainer._eval_fn)(state, batch)), not chunk)
    self.assertGreater(losses[0], 0.0)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)


class BiasUpdateTest(parameterized.TestCase):
  def test_sign_of_the_update(self):
    load = jnp.array([4.0, 1.0, 2.0, 1.0], jnp.float32)  # mean 2
    bias = jnp.array([0.5, 0.0, -0.25, 1.0], jnp.float32)
    new = balance.bias_update(bias, load, 1e-3)
    # overloaded -> down by gamma; under-loaded -> up by gamma; at the mean -> unchanged.
    np.testing.assert_allclose(new - bias, [-1e-3, 1e-3, 0.0, 1e-3], atol=1e-7)
    self.assertEqual(float(new[2]), float(bias[2]))

  def test_per_layer_means_and_random_loads(self):
    rng = np.random.default_rng(0)
    load = rng.integers(0, 20, size=(3, 16)).astype(np.float32)
    load[1] = 5.0  # a perfectly balanced layer: nothing moves
    bias = rng.standard_normal((3, 16)).astype(np.float32)
    gamma = 0.01
    new = np.asarray(balance.bias_update(jnp.asarray(bias), jnp.asarray(load), gamma))
    mean = load.mean(-1, keepdims=True)
    want = bias + gamma * np.sign(mean - load)
    np.testing.assert_allclose(new, want, atol=1e-7)
    np.testing.assert_array_equal(new[1], bias[1])
    np.testing.assert_array_equal(
      np.asarray(balance.bias_update(jnp.asarray(bias), jnp.asarray(load), 0.0)), bias
    )

  def test_update_moves_towards_balance(self):
    # Repeated updates on a fixed preference push the biased choice towards uniform load.
    rng = np.random.default_rng(1)
    scores = rng.random((256, 8)).astype(np.float32) + np.linspace(0, 0.5, 8, dtype=np.float32)
    bias = jnp.zeros((8,), jnp.float32)

    def loads(bias):
      top = np.argsort(-(scores + np.asarray(bias)), axis=-1)[:, :2]
      return jnp.asarray(np.bincount(top.ravel(), minlength=8), jnp.float32)

    before = float(balance.max_violation(loads(bias)))
    for _ in range(200):
      bias = balance.bias_update(bias, loads(bias), 0.01)
    after = float(balance.max_violation(loads(bias)))
    self.assertGreater(before, 1.0)
    self.assertLess(after, 0.5 * before)


class MaxViolationTest(parameterized.TestCase):
  @parameterized.named_parameters(("vector", (16,)), ("per_layer", (4, 16)))
  def test_matches_numpy(self, shape):
    load = np.random.default_rng(0).integers(1, 50, size=shape).astype(np.float32)
    got = balance.max_violation(jnp.asarray(load))
    chex.assert_shape(got, shape[:-1])
    np.testing.assert_allclose(got, _ref_max_violation(load), rtol=1e-6)

  def test_balanced_is_zero_and_one_hot_is_e_minus_one(self):
    np.testing.assert_allclose(balance.max_violation(jnp.full((8,), 3.0)), 0.0, atol=1e-7)
    one_hot = jnp.zeros((8,), jnp.float32).at[2].set(40.0)
    np.testing.assert_allclose(balance.max_violation(one_hot), 7.0, rtol=1e-6)

  def test_empty_load_is_finite(self):
    self.assertEqual(float(balance.max_violation(jnp.zeros((8,)))), 0.0)


if __name__ == "__main__":
  absltest.main()
