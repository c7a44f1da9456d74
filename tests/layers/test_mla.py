"""Tests for dsv3_jax.layers.mla: shapes, causality, absorbed == naive, the latent cache.

Properties rather than golden numbers: the output at position i must not depend on later
inputs (checked through gradients), the absorbed decode path must equal the naive one over
the same cache, and decoding token by token through `model.forward` with the cache must
reproduce the full-sequence forward.
"""

import dataclasses
import functools
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from configs.dsv3 import get_config
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax.layers import mla as mla_lib
from dsv3_jax.layers import rope


def _model_cfg(variant: str = "tiny", **overrides) -> config_lib.ModelConfig:
  cfg = config_lib.from_dict(get_config(variant)).model
  return dataclasses.replace(cfg, **overrides).validate()


def _inputs(cfg, b, l, seed=0, offset=0):
  x = jax.random.normal(jax.random.key(seed), (b, l, cfg.hidden_size), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(offset, offset + l, dtype=jnp.int32), (b, l))
  cos, sin = rope.rope_angles(cfg, positions)
  return x, positions, cos, sin


def _make_mla(cfg, seed=0, std=0.3):
  """A jitted `MLA.__call__` (eager NNX dispatches op by op, which is slow on CPU).

  A larger init than the config's keeps the attention far from uniform, so that the
  comparisons below are sensitive to the scores.
  """
  module = mla_lib.MLA(dataclasses.replace(cfg, init_std=std), rngs=nnx.Rngs(params=seed))
  graphdef, state = nnx.split(module)

  @functools.partial(jax.jit, static_argnums=(5,))
  def call(x, positions, cos, sin, cache=None, absorb=None):
    return nnx.merge(graphdef, state)(x, positions, cos, sin, cache, absorb)

  call.module = module
  return call


class ShapeTest(parameterized.TestCase):
  @parameterized.named_parameters(("q_lora", 32), ("no_q_lora", 0))
  def test_shapes(self, q_lora_rank):
    cfg = _model_cfg(q_lora_rank=q_lora_rank)
    attn = _make_mla(cfg)
    self.assertEqual(hasattr(attn.module, "wq_a"), bool(q_lora_rank))
    self.assertEqual(hasattr(attn.module, "wq"), not q_lora_rank)
    b, l = 2, 5
    x, pos, cos, sin = _inputs(cfg, b, l)
    out, cache = attn(x, pos, cos, sin)
    chex.assert_shape(out, (b, l, cfg.hidden_size))
    self.assertIsNone(cache)
    chex.assert_tree_all_finite(out)
    cache = mla_lib.init_latent_cache(cfg, b, 9, jnp.float32)
    out, cache = attn(x, pos, cos, sin, cache)
    chex.assert_shape(out, (b, l, cfg.hidden_size))
    chex.assert_shape(cache.c_kv_BxTxK, (b, 9, cfg.kv_lora_rank))
    chex.assert_shape(cache.k_pe_BxTxR, (b, 9, cfg.qk_rope_head_dim))
    # Written rows are the new latents; rows past the prompt stay empty.
    c_kv, k_pe = attn.module.latents(x, cos, sin)
    np.testing.assert_allclose(cache.c_kv_BxTxK[:, :l], c_kv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cache.k_pe_BxTxR[:, :l], k_pe, rtol=1e-5, atol=1e-6)
    self.assertEqual(float(jnp.abs(cache.c_kv_BxTxK[:, l:]).max()), 0.0)


class CausalityTest(parameterized.TestCase):
  @parameterized.named_parameters(("naive", False), ("absorbed", True))
  def test_no_gradient_from_the_future(self, absorb):
    cfg = _model_cfg()
    attn = _make_mla(cfg)
    b, l = 2, 6
    x, pos, cos, sin = _inputs(cfg, b, l, seed=1)
    r = jax.random.normal(jax.random.key(2), (cfg.hidden_size,))

    def per_position(x_BxLxD):
      out, _ = attn(x_BxLxD, pos, cos, sin, None, absorb)
      return jnp.einsum("ld,d->l", out[0], r)  # one scalar per query position of row 0

    jac_LxBxLxD = jax.jacrev(per_position)(x)
    norms_LxBxL = np.asarray(jnp.linalg.norm(jac_LxBxLxD, axis=-1))
    future = np.triu(np.ones((l, l), bool), k=1)  # [i, j]: j > i
    self.assertEqual(np.abs(norms_LxBxL[:, 0][future]).max(), 0.0)
    self.assertGreater(norms_LxBxL[:, 0][~future].min(), 1e-6)
    self.assertEqual(np.abs(norms_LxBxL[:, 1]).max(), 0.0)  # no mixing across the batch


class AttendGradientTest(parameterized.TestCase):
  """`attend`'s hand-written backward equals autodiff of the same softmax attention."""

  @parameterized.named_parameters(("f32", jnp.float32, 1e-5), ("bf16", jnp.bfloat16, 3e-2))
  def test_vjp_equals_autodiff(self, dtype, tol):
    b, h, l, t, qk, v = 2, 3, 5, 7, 8, 4
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, h, l, qk)).astype(dtype)
    k = jax.random.normal(ks[1], (b, h, t, qk)).astype(dtype)
    val = jax.random.normal(ks[2], (b, h, t, v)).astype(dtype)
    # A prefill over a cache: query i (at position 2 + i) sees keys 0 .. 2 + i; row 1 has an
    # empty slot the causal mask alone would admit.
    mask = (jnp.arange(t)[None, :] <= jnp.arange(l)[:, None] + 2)[None, None]
    mask = jnp.broadcast_to(mask, (b, 1, l, t)).at[1, 0, :, 1].set(False)
    scale = 0.37

    def reference(q, k, val):
      p = mla_lib._probabilities(jnp.einsum("bhlq,bhtq->bhlt", q, k), mask, scale, dtype)
      return jnp.einsum("bhlt,bhtv->bhlv", p, val)

    ct = jax.random.normal(ks[3], (b, h, l, v)).astype(dtype)
    out, vjp = jax.vjp(lambda *a: mla_lib.attend(*a, mask, scale), q, k, val)
    ref_out, ref_vjp = jax.vjp(reference, q, k, val)
    np.testing.assert_allclose(
      np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=tol, rtol=tol
    )
    for got, want, name in zip(vjp(ct), ref_vjp(ct), ("dq", "dk", "dv")):
      got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
      scale_ = np.abs(want).max()
      np.testing.assert_allclose(got / scale_, want / scale_, atol=tol, err_msg=name)
    self.assertEqual(np.abs(np.asarray(vjp(ct)[1], np.float32)[1, :, 1]).max(), 0.0)


class CausalAttendTest(parameterized.TestCase):
  """`causal_attend` (query blocks, a FlashAttention-style backward) equals autodiff of the
  full masked softmax attention, and keeps no probabilities or per-block key copies."""

  @parameterized.product(
    (dict(dtype=jnp.float32, tol=1e-5), dict(dtype=jnp.bfloat16, tol=3e-2)),
    recompute=(False, True),
  )
  def test_vjp_equals_autodiff_of_full_attention(self, dtype, tol, recompute):
    b, h, l, t, qk, v = 2, 3, 10, 13, 8, 4  # blocks of 4, 4, 2 queries; 3 keys never read
    ks = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(ks[0], (b, h, l, qk)).astype(dtype)
    k = jax.random.normal(ks[1], (b, h, t, qk)).astype(dtype)
    val = jax.random.normal(ks[2], (b, h, t, v)).astype(dtype)
    mask = jnp.broadcast_to(
      (jnp.arange(t)[None, :] <= jnp.arange(l)[:, None])[None, None], (b, 1, l, t)
    )
    scale = 0.37

    def reference(q, k, val):
      p = mla_lib._probabilities(jnp.einsum("bhlq,bhtq->bhlt", q, k), mask, scale, dtype)
      return jnp.einsum("bhlt,bhtv->bhlv", p, val)

    ct = jax.random.normal(ks[3], (b, h, l, v)).astype(dtype)
    with mock.patch.object(mla_lib, "QUERY_BLOCK", 4):
      out, vjp = jax.vjp(lambda *a: mla_lib.causal_attend(*a, mask, scale, recompute), q, k, val)
      grads = vjp(ct)
    ref_out, ref_vjp = jax.vjp(reference, q, k, val)
    np.testing.assert_allclose(
      np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=tol, rtol=tol
    )
    for got, want, name in zip(grads, ref_vjp(ct), ("dq", "dk", "dv")):
      self.assertEqual(got.dtype, want.dtype, name)
      got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
      scale_ = np.abs(want).max()
      np.testing.assert_allclose(got / scale_, want / scale_, atol=tol, err_msg=name)
    # Keys past the last query get no gradient.
    self.assertEqual(np.abs(np.asarray(grads[1], np.float32)[:, :, l:]).max(), 0.0)
    # Kept for the backward: q, k, v, the mask and the output once (no slice of the keys),
    # and each block's probabilities, or with `recompute` a log-sum-exp per query.
    kept = {(a.shape, str(a.dtype)) for a in jax.tree.leaves(vjp)}
    once = {
      ((b, h, l, qk), str(q.dtype)),
      ((b, h, t, qk), str(q.dtype)),
      ((b, h, t, v), str(q.dtype)),
      ((b, 1, l, t), "bool"),
      ((b, h, l, v), str(q.dtype)),
    }
    blocks = {
      ((b, h, 4, 4), str(q.dtype)),
      ((b, h, 4, 8), str(q.dtype)),
      ((b, h, 2, 10), str(q.dtype)),
    }
    self.assertEqual(kept, once | ({((b, h, l), "float32")} if recompute else blocks))


class CausalBlocksTest(parameterized.TestCase):
  """Causal query blocks (a sequence from position 0) skip only keys the mask hides."""

  @parameterized.named_parameters(
    ("no_cache", False, 2048), ("fresh_cache", True, 2048), ("recomputed", False, 8)
  )
  def test_blocks_equal_the_full_attention(self, with_cache, recompute_from):
    cfg = _model_cfg()
    module = mla_lib.MLA(dataclasses.replace(cfg, init_std=0.3), rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(module)
    b, l = 2, 10  # blocks of 4, 4 and 2 queries
    x, pos, cos, sin = _inputs(cfg, b, l, seed=3)
    cache = mla_lib.init_latent_cache(cfg, b, 16, jnp.float32) if with_cache else None

    def loss(state, x, causal):
      out, new_cache = nnx.merge(graphdef, state)(x, pos, cos, sin, cache, False, causal)
      r = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
      return jnp.sum(out * r), (out, new_cache)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    with (
      mock.patch.object(mla_lib, "QUERY_BLOCK", 4),
      mock.patch.object(mla_lib, "RECOMPUTE_FROM", recompute_from),
    ):
      (g_state, g_x), (out, new_cache) = jax.jit(grad, static_argnums=2)(state, x, True)
      jaxpr = str(jax.make_jaxpr(lambda s, x: loss(s, x, True)[0])(state, x))
      kept = {a.shape for a in jax.tree.leaves(jax.vjp(lambda x: loss(state, x, True)[0], x)[1])}
    self.assertEqual(jaxpr.count("name=causal_attend"), 1)
    # A block's probabilities are kept for the backward below `RECOMPUTE_FROM` queries.
    h = cfg.num_attention_heads
    self.assertEqual((b, h, 4, 8) in kept, l < recompute_from)
    # Three blocks of queries, reading keys up to 4, 8 and 10: their score blocks.
    for rows, keys in ((4, 4), (4, 8), (2, 10)):
      self.assertIn(f"f32[{b},{h},{rows},{keys}]", jaxpr)
    (w_state, w_x), (want, want_cache) = jax.jit(grad, static_argnums=2)(state, x, False)
    chex.assert_trees_all_close(out, want, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(new_cache, want_cache, atol=0, rtol=0)
    chex.assert_trees_all_close(g_x, w_x, atol=1e-5, rtol=1e-4)
    chex.assert_trees_all_close(g_state, w_state, atol=1e-4, rtol=1e-4)

  def test_model_walk_from_position_zero_takes_the_blocks(self):
    model = model_lib.create(_model_cfg(), seed=0)
    tokens = jax.random.randint(jax.random.key(4), (2, 10), 0, model.cfg.vocab_size)
    self.assertTrue(model.context(tokens.shape).causal)
    self.assertFalse(model.context(jnp.zeros((2, 10), jnp.int32)).causal)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=1)
    def logits(tokens, explicit):
      positions = jnp.broadcast_to(jnp.arange(10), (2, 10)) if explicit else None
      return nnx.merge(graphdef, state).forward(tokens, positions).logits_BxLxV

    def calls(explicit, name):
      return str(jax.make_jaxpr(logits, static_argnums=1)(tokens, explicit)).count(f"name={name}")

    with mock.patch.object(mla_lib, "QUERY_BLOCK", 4):
      blocked = logits(tokens, False)
      self.assertEqual(calls(False, "causal_attend"), calls(True, "attend"))  # one per layer
      self.assertEqual(calls(False, "attend"), 0)
      self.assertEqual(calls(True, "causal_attend"), 0)
    np.testing.assert_allclose(blocked, logits(tokens, True), atol=1e-4, rtol=1e-4)


class AbsorbTest(parameterized.TestCase):
  @parameterized.named_parameters(("q_lora", 32), ("no_q_lora", 0))
  def test_absorbed_equals_naive_over_cache(self, q_lora_rank):
    cfg = _model_cfg(q_lora_rank=q_lora_rank)
    attn = _make_mla(cfg, seed=3)
    b, l = 2, 7
    x, pos, cos, sin = _inputs(cfg, b, l + 1, seed=4)
    cache = mla_lib.init_latent_cache(cfg, b, l + 3, jnp.float32)
    _, cache = attn(x[:, :l], pos[:, :l], cos[:, :l], sin[:, :l], cache, False)
    new = (x[:, l:], pos[:, l:], cos[:, l:], sin[:, l:])
    out_absorbed, cache_a = attn(*new, cache, True)
    out_naive, cache_n = attn(*new, cache, False)
    out_default, _ = attn(*new, cache)  # one token with a cache: absorbed by default
    chex.assert_trees_all_close(out_absorbed, out_naive, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_equal(out_default, out_absorbed)
    chex.assert_trees_all_equal(cache_a, cache_n)
    self.assertGreater(float(jnp.abs(out_naive).max()), 1e-2)
    # The cached path equals attention over the whole sequence without a cache.
    full, _ = attn(x, pos, cos, sin)
    chex.assert_trees_all_close(out_naive, full[:, l:], atol=1e-5, rtol=1e-5)

  def test_absorbed_equals_naive_full_sequence(self):
    cfg = _model_cfg()
    attn = _make_mla(cfg, seed=5)
    x, pos, cos, sin = _inputs(cfg, 2, 9, seed=6)
    out_a, _ = attn(x, pos, cos, sin, None, True)
    out_n, _ = attn(x, pos, cos, sin, None, False)
    chex.assert_trees_all_close(out_a, out_n, atol=1e-5, rtol=1e-5)


class DecodeTest(absltest.TestCase):
  def test_cached_decode_equals_full_forward(self):
    cfg = _model_cfg(init_std=0.1)
    self.assertEqual(cfg.dtype, "float32")
    model = model_lib.create(cfg, seed=0)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, positions, cache):
      out = nnx.merge(graphdef, state).forward(tokens, positions, cache)
      return out.logits_BxLxV, out.cache

    b, l, prompt = 2, 10, 4
    tokens = jax.random.randint(jax.random.key(7), (b, l), 0, cfg.vocab_size)
    full, _ = forward(state, tokens, None, None)
    cache = model.init_cache(b, l, jnp.float32)
    pos = lambda s, e: jnp.broadcast_to(jnp.arange(s, e, dtype=jnp.int32), (b, e - s))
    # Prefill a prompt in one call, then decode the rest one token at a time.
    logits, cache = forward(state, tokens[:, :prompt], pos(0, prompt), cache)
    steps = [logits]
    for t in range(prompt, l):
      logits, cache = forward(state, tokens[:, t : t + 1], pos(t, t + 1), cache)
      steps.append(logits)
    decoded = jnp.concatenate(steps, axis=1)
    chex.assert_trees_all_close(decoded, full, atol=1e-4, rtol=1e-4)
    # The logits are not flat: a broken cache would show.
    self.assertGreater(float(jnp.std(full)), 1e-2)
    # Every layer's cache now holds every position.
    for stack in (cache.dense, cache.moe):
      self.assertGreater(float(jnp.abs(stack.c_kv_BxTxK[:, :, l - 1]).min()), 0.0)

  def test_cache_bytes_per_token(self):
    tiny = _model_cfg()
    for dtype in (jnp.bfloat16, jnp.float32):
      self.assertEqual(
        mla_lib.cache_bytes_per_token(tiny, dtype),
        (tiny.kv_lora_rank + tiny.qk_rope_head_dim) * jnp.dtype(dtype).itemsize,
      )
    big = _model_cfg("671b")
    self.assertEqual(mla_lib.cache_bytes_per_token(big, jnp.bfloat16), 1152)
    self.assertEqual(mla_lib.cache_bytes_per_token(big) * big.num_hidden_layers, 70272)
    cache = mla_lib.init_latent_cache(tiny, 1, 1, jnp.bfloat16)
    self.assertEqual(sum(a.nbytes for a in cache), mla_lib.cache_bytes_per_token(tiny))


if __name__ == "__main__":
  absltest.main()
