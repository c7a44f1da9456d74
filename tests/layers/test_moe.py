"""Tests for DeepSeekMoE's pieces (layers/routing.py, layers/experts.py): the router, the
dropless expert kernel (every formulation), the balance loss.

Each piece is checked against a float64 NumPy reference written here from the formulas of
arXiv 2412.19437 §2.1.2, eqs. 12-20 (DeepSeek's routing with -inf group masking, a per-token loop over the chosen
experts, the report's sequence-wise balance loss), and against properties that must hold for
any input: exactly k distinct experts within at most topk_group groups, weights summing to
the routed scaling factor, a block layout that never overflows.
"""

import dataclasses
import functools

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import strategies as st

from configs.dsv3 import get_config
from dsv3_jax import config as config_lib
from dsv3_jax.layers import experts as experts_lib, routing as routing_lib

_FEW = hypothesis.settings(
  max_examples=12,
  deadline=None,
  derandomize=True,
  database=None,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)

# Routing set-ups: (n_routed_experts, n_group, topk_group, num_experts_per_tok).
_ROUTERS = {
  "tiny": (8, 4, 2, 2),
  "v3_shape": (256, 8, 4, 8),  # the 671B router's shape
  "ungrouped": (16, 1, 1, 4),
  "all_groups": (12, 3, 3, 3),
}


def _cfg(e, g, m, k, **overrides) -> config_lib.ModelConfig:
  base = config_lib.from_dict(get_config("tiny")).model
  return dataclasses.replace(
    base, n_routed_experts=e, n_group=g, topk_group=m, num_experts_per_tok=k, **overrides
  ).validate()


@functools.partial(jax.jit, static_argnums=(3,))
def _route(x, gate, bias, cfg):
  return routing_lib.route(x, gate, bias, cfg)


# ---------------------------------------------------------------- numpy references


def _ref_route(x, gate, bias, cfg):
  """DeepSeek's routing in float64: returns (experts [N, k] sorted, weights aligned)."""
  e, g, m, k = (cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok)
  s = 1.0 / (1.0 + np.exp(-(np.asarray(x, np.float64) @ np.asarray(gate, np.float64))))
  choice = s + np.asarray(bias, np.float64)[None, :]
  n = x.shape[0]
  if g > 1 and m < g:
    group_score = np.sort(choice.reshape(n, g, e // g), axis=-1)[..., -2:].sum(-1)
    keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :m]
    mask = np.ones((n, g), bool)
    mask[np.arange(n)[:, None], keep] = False
    choice = np.where(np.repeat(mask, e // g, axis=1), -np.inf, choice)
  experts = np.sort(np.argsort(-choice, axis=-1, kind="stable")[:, :k], axis=-1)
  w = np.take_along_axis(s, experts, axis=-1)
  if cfg.norm_topk_prob:
    w = w / w.sum(-1, keepdims=True)
  return experts, w * cfg.routed_scaling_factor, s


def _sorted_by_expert(experts, weights):
  order = np.argsort(np.asarray(experts), axis=-1)
  return (
    np.take_along_axis(np.asarray(experts), order, -1),
    np.take_along_axis(np.asarray(weights), order, -1),
  )


def _silu(v):
  return v / (1.0 + np.exp(-v))


def _ref_experts(x, experts, weights, w1, w3, w2):
  """A loop over tokens and their chosen experts, float64."""
  x, w1, w3, w2 = (np.asarray(a, np.float64) for a in (x, w1, w3, w2))
  y = np.zeros_like(x)
  for n in range(x.shape[0]):
    for j, e in enumerate(np.asarray(experts)[n]):
      h = _silu(x[n] @ w1[e]) * (x[n] @ w3[e])
      y[n] += float(weights[n, j]) * (h @ w2[e])
  return y


def _ref_balance_loss(experts_BxTxk, scores_BxTxE):
  b, t, k = experts_BxTxk.shape
  e = scores_BxTxE.shape[-1]
  losses = []
  for i in range(b):
    count = np.bincount(experts_BxTxk[i].reshape(-1), minlength=e)
    f = e / (k * t) * count
    p = (scores_BxTxE[i] / scores_BxTxE[i].sum(-1, keepdims=True)).mean(0)
    losses.append(np.sum(f * p))
  return np.mean(losses)


def _random_router(cfg, n, seed, bias_scale=0.0):
  rng = np.random.default_rng(seed)
  d = 16
  x = rng.standard_normal((n, d)).astype(np.float32)
  gate = rng.standard_normal((d, cfg.n_routed_experts)).astype(np.float32) * 0.5
  bias = (rng.standard_normal(cfg.n_routed_experts) * bias_scale).astype(np.float32)
  return x, gate, bias


def _check_invariants(test, routing, cfg):
  e, g, m, k = (cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok)
  experts = np.asarray(routing.experts_Nxk)
  test.assertEqual(experts.dtype, np.int32)
  test.assertTrue(np.all((experts >= 0) & (experts < e)))
  for row in experts:
    test.assertLen(set(row.tolist()), k)  # k distinct experts
    test.assertLessEqual(len(set((row // (e // g)).tolist())), m)  # within <= M groups
  np.testing.assert_allclose(
    np.asarray(routing.weights_Nxk).sum(-1), cfg.routed_scaling_factor, rtol=1e-5
  )
  test.assertTrue(np.all(np.asarray(routing.weights_Nxk) > 0))


class RouterTest(parameterized.TestCase):
  @parameterized.product(setup=list(_ROUTERS), bias_scale=[0.0, 0.3])
  def test_matches_numpy_reference(self, setup, bias_scale):
    cfg = _cfg(*_ROUTERS[setup])
    x, gate, bias = _random_router(cfg, 48, seed=len(setup), bias_scale=bias_scale)
    routing = _route(x, gate, bias, cfg)
    ref_experts, ref_w, ref_s = _ref_route(x, gate, bias, cfg)
    got_experts, got_w = _sorted_by_expert(routing.experts_Nxk, routing.weights_Nxk)
    np.testing.assert_array_equal(got_experts, ref_experts)
    np.testing.assert_allclose(got_w, ref_w, rtol=1e-5)
    np.testing.assert_allclose(routing.scores_NxE, ref_s, rtol=1e-5, atol=1e-6)
    _check_invariants(self, routing, cfg)

  def test_negative_choices_stay_in_kept_groups(self):
    # With every s + b negative, masking dropped groups to 0 (HF) would pick from them;
    # DeepSeek's -inf masking keeps the choice inside the kept groups.
    cfg = _cfg(*_ROUTERS["v3_shape"])
    x, gate, _ = _random_router(cfg, 32, seed=7)
    bias = np.full((cfg.n_routed_experts,), -10.0, np.float32)
    routing = _route(x, gate, bias, cfg)
    _check_invariants(self, routing, cfg)
    ref_experts, ref_w, _ = _ref_route(x, gate, bias, cfg)
    got_experts, got_w = _sorted_by_expert(routing.experts_Nxk, routing.weights_Nxk)
    np.testing.assert_array_equal(got_experts, ref_experts)
    np.testing.assert_allclose(got_w, ref_w, rtol=1e-5)

  def test_bias_changes_selection_not_weights(self):
    cfg = _cfg(*_ROUTERS["v3_shape"])
    x, gate, bias0 = _random_router(cfg, 32, seed=11)
    favoured = 37
    plain = _route(x, gate, bias0, cfg)
    self.assertLess(int(np.sum(np.asarray(plain.experts_Nxk) == favoured)), 32)
    outputs = []
    for push in (5.0, 50.0):
      bias = bias0.copy()
      bias[favoured] = push
      routing = _route(x, gate, bias, cfg)
      experts = np.asarray(routing.experts_Nxk)
      self.assertTrue(np.all(np.any(experts == favoured, axis=-1)))  # every token takes it
      s = np.asarray(routing.scores_NxE)
      chosen = np.take_along_axis(s, experts, axis=-1)
      expected = chosen / chosen.sum(-1, keepdims=True) * cfg.routed_scaling_factor
      np.testing.assert_allclose(routing.weights_Nxk, expected, rtol=1e-6)
      # The favoured expert's weight is its unbiased score's share, far below what the
      # biased score would give.
      w_fav = np.asarray(routing.weights_Nxk)[experts == favoured]
      self.assertTrue(np.all(w_fav < cfg.routed_scaling_factor * 0.5))
      chex.assert_trees_all_close(routing.scores_NxE, plain.scores_NxE)
      outputs.append(_sorted_by_expert(experts, routing.weights_Nxk))
    # A larger push changes nothing more: same experts, identical weights.
    chex.assert_trees_all_equal(outputs[0], outputs[1])

  def test_no_normalisation(self):
    cfg = _cfg(*_ROUTERS["tiny"], norm_topk_prob=False)
    x, gate, bias = _random_router(cfg, 16, seed=3, bias_scale=0.2)
    routing = _route(x, gate, bias, cfg)
    s = np.asarray(routing.scores_NxE)
    np.testing.assert_allclose(
      routing.weights_Nxk,
      np.take_along_axis(s, np.asarray(routing.experts_Nxk), -1) * cfg.routed_scaling_factor,
      rtol=1e-6,
    )

  @hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    bias_scale=st.sampled_from([0.0, 0.05, 1.0, 20.0]),
    setup=st.sampled_from(sorted(_ROUTERS)),
  )
  @_FEW
  def test_invariants_hold_for_any_input(self, seed, bias_scale, setup):
    cfg = _cfg(*_ROUTERS[setup])
    x, gate, bias = _random_router(cfg, 32, seed=seed, bias_scale=bias_scale)
    _check_invariants(self, _route(x, gate, bias, cfg), cfg)


class BlockLayoutTest(parameterized.TestCase):
  def _check_layout(self, experts_C, n_experts, block):
    lay = jax.jit(experts_lib.block_layout, static_argnums=(1, 2))(
      jnp.asarray(experts_C, jnp.int32), n_experts, block
    )
    c = len(experts_C)
    order, dest = np.asarray(lay.order_R), np.asarray(lay.dest_R)
    block_expert, n_used = np.asarray(lay.block_expert_NB), int(lay.n_used)
    counts = np.bincount(experts_C, minlength=n_experts)
    needed = int(np.sum(-(-counts // block)))
    self.assertEqual(n_used, needed)
    self.assertLessEqual(n_used, lay.n_blocks)  # never overflows
    self.assertEqual(block_expert.shape, (lay.n_blocks,))
    np.testing.assert_array_equal(np.sort(order), np.arange(c))  # a permutation
    sorted_e = np.asarray(experts_C)[order]
    self.assertTrue(np.all(np.diff(sorted_e) >= 0))
    self.assertLen(set(dest.tolist()), c)  # distinct rows
    self.assertTrue(np.all((dest >= 0) & (dest < n_used * block)))
    # Every row lands in a block that belongs to its own expert ...
    np.testing.assert_array_equal(block_expert[dest // block], sorted_e)
    # ... and each expert's rows start at a block boundary and are contiguous.
    for e in np.unique(sorted_e):
      rows = np.sort(dest[sorted_e == e])
      self.assertEqual(rows[0] % block, 0)
      np.testing.assert_array_equal(rows, rows[0] + np.arange(len(rows)))

  @parameterized.named_parameters(
    ("one_expert", [3] * 20, 8, 4),
    ("one_expert_ragged", [3] * 21, 8, 4),
    ("every_expert_once", list(range(8)), 8, 4),
    ("block_1", [0, 5, 5, 2, 7], 8, 1),
    ("block_larger_than_all", [1, 1, 6, 2], 8, 64),
  )
  def test_extremes(self, experts, n_experts, block):
    self._check_layout(np.asarray(experts), n_experts, block)

  @hypothesis.given(
    data=st.data(), block=st.sampled_from([1, 3, 4, 16]), n_experts=st.sampled_from([4, 16])
  )
  @_FEW
  def test_never_overflows(self, data, block, n_experts):
    hot = data.draw(st.integers(0, n_experts - 1))
    skew = data.draw(st.floats(0.0, 1.0))
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    experts = np.where(rng.random(24) < skew, hot, rng.integers(0, n_experts, 24))
    self._check_layout(experts, n_experts, block)


class GroupedFfnTest(parameterized.TestCase):
  n, d, f, e, k = 16, 8, 6, 8, 2

  def _weights(self, seed=0):
    rng = np.random.default_rng(seed)
    n, d, f, e = self.n, self.d, self.f, self.e
    x = rng.standard_normal((n, d)).astype(np.float32)
    w1 = (rng.standard_normal((e, d, f)) * 0.5).astype(np.float32)
    w3 = (rng.standard_normal((e, d, f)) * 0.5).astype(np.float32)
    w2 = (rng.standard_normal((e, f, d)) * 0.5).astype(np.float32)
    return x, w1, w3, w2

  def _routing(self, kind, seed=0):
    rng = np.random.default_rng(seed + 100)
    n, e, k = self.n, self.e, self.k
    if kind == "random":
      experts = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    elif kind == "all_same":  # every token goes to the same two experts
      experts = np.tile(np.array([5, 2]), (n, 1))
    else:  # "mostly_one": all to expert 0 plus one random other
      experts = np.stack([np.array([0, rng.integers(1, e)]) for _ in range(n)])
    weights = rng.uniform(0.1, 1.5, size=(n, k)).astype(np.float32)
    return routing_lib.Routing(
      jnp.asarray(experts, jnp.int32), jnp.asarray(weights), jnp.zeros((n, e), jnp.float32)
    )

  @parameterized.product(
    kind=["random", "all_same", "mostly_one"], block=[1, 4, 5, 16, 64], path=["block", "bucket"]
  )
  def test_matches_references(self, kind, block, path):
    x, w1, w3, w2 = self._weights()
    routing = self._routing(kind)
    fn = functools.partial(experts_lib.routed_ffn, block=block, precision="fp32", path=path)
    got = jax.jit(fn)(x, routing, w1, w3, w2)
    dense = experts_lib.dense_reference(x, routing, w1, w3, w2)
    loop = _ref_experts(x, routing.experts_Nxk, np.asarray(routing.weights_Nxk), w1, w3, w2)
    chex.assert_trees_all_close(got, dense, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got, loop, atol=1e-5, rtol=1e-5)
    # Differentiated, the bucket path runs its own forward (inference on these few rows per
    # expert takes the blocks): the buckets, plus the overflow pass where they overflow.
    trained, _ = jax.jit(lambda x: jax.vjp(lambda x: fn(x, routing, w1, w3, w2), x))(x)
    np.testing.assert_allclose(trained, loop, atol=1e-5, rtol=1e-5)
    self.assertGreater(np.abs(loop).min(), 0.0)  # every token got a non-trivial output

  @parameterized.product(kind=["random", "all_same"], block=[4, 5], path=["block", "bucket"])
  def test_gradients_match_dense_reference(self, kind, block, path):
    x, w1, w3, w2 = self._weights(seed=1)
    routing = self._routing(kind, seed=1)
    r = np.random.default_rng(2).standard_normal((self.n, self.d)).astype(np.float32)

    def loss(fn, x, w1, w3, w2, weights):
      rt = routing._replace(weights_Nxk=weights)
      return jnp.sum(fn(x, rt, w1, w3, w2) * r)

    args = (x, w1, w3, w2, routing.weights_Nxk)
    grouped = functools.partial(experts_lib.routed_ffn, block=block, precision="fp32", path=path)
    g_grouped = jax.jit(jax.grad(functools.partial(loss, grouped), argnums=(0, 1, 2, 3, 4)))(*args)
    g_dense = jax.grad(
      functools.partial(loss, experts_lib.dense_reference), argnums=(0, 1, 2, 3, 4)
    )(*args)
    for got, want in zip(g_grouped, g_dense):
      chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    # Experts nobody routes to get exactly zero weight gradients.
    unused = sorted(set(range(self.e)) - set(np.asarray(routing.experts_Nxk).ravel().tolist()))
    for dw in g_grouped[1:4]:
      self.assertEqual(float(jnp.abs(dw[np.asarray(unused, int)]).max(initial=0.0)), 0.0)

  @parameterized.product(factor=[1.25, 8.0], kind=["random", "all_same", "mostly_one"])
  def test_bucket_overflow_is_exact(self, factor, kind):
    """Copies past an expert's bucket go through the exact overflow pass: nothing dropped.

    64 tokens x 2 copies over 8 experts (16 per expert on average, buckets of 32 at 1.25):
    "all_same" puts 64 copies on each of two experts and overflows, "mostly_one" 64 on
    expert 0; at factor 8 (buckets of 128) nothing overflows. All equal the dense reference,
    with gradients.
    """
    x, w1, w3, w2 = self._weights(seed=3)
    x = np.tile(x, (4, 1))
    routing = self._routing(kind, seed=3)
    routing = routing_lib.Routing(*(jnp.tile(a, (4, 1)) for a in routing))
    cap = experts_lib.capacity(x.shape[0] * self.k, self.e, factor)
    counts = np.bincount(np.asarray(routing.experts_Nxk).ravel(), minlength=self.e)
    overflows = bool((counts > cap).any())
    self.assertEqual(overflows, kind != "random" and factor < 8.0)
    fn = functools.partial(
      experts_lib.routed_ffn, block=4, precision="fp32", capacity_factor=factor, path="bucket"
    )
    got = jax.jit(fn)(x, routing, w1, w3, w2)  # inference: every row through the blocks
    want = experts_lib.dense_reference(x, routing, w1, w3, w2)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    got_vjp, _ = jax.vjp(lambda x: fn(x, routing, w1, w3, w2), x)  # buckets + overflow pass
    chex.assert_trees_all_close(got_vjp, want, atol=1e-5, rtol=1e-5)
    g_got = jax.grad(lambda *a: jnp.sum(fn(a[0], routing, *a[1:]) ** 2), argnums=(0, 1, 2, 3))(
      x, w1, w3, w2
    )
    g_want = jax.grad(
      lambda *a: jnp.sum(experts_lib.dense_reference(a[0], routing, *a[1:]) ** 2),
      argnums=(0, 1, 2, 3),
    )(x, w1, w3, w2)
    for a, b in zip(g_got, g_want):  # float32 sums of 64 copies: relative to the largest
      chex.assert_trees_all_close(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=1e-4)

  def test_inference_with_a_block_or_a_few_rows_per_expert_runs_the_blocks(self):
    """Not differentiated, with at least a block of rows per expert (prefill) or at most
    `FEW_ROWS_PER_EXPERT` (decode), the bucket path runs every row through the padded blocks:
    no [E, C, D] bucket in the compiled program. Differentiated (training), or between the
    two, it keeps the buckets."""
    x1, w1, w3, w2 = map(jnp.asarray, self._weights(seed=3))
    routing1 = self._routing("random", seed=3)

    def has_buckets(tile, block, grad):
      x = jnp.tile(x1, (tile, 1))  # 16 x tile tokens x 2 copies over 8 experts: 4 x tile each
      routing = routing_lib.Routing(*(jnp.tile(a, (tile, 1)) for a in routing1))
      fn = functools.partial(experts_lib.routed_ffn, block=block, precision="fp32", path="bucket")
      c = experts_lib.capacity(x.shape[0] * self.k, self.e)
      if grad:
        text = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, routing, w1, w3, w2)))).lower(x).as_text()
      else:
        text = jax.jit(lambda x: fn(x, routing, w1, w3, w2)).lower(x).as_text()
      return f"tensor<{self.e}x{c}x{self.d}xf32>" in text

    self.assertEqual(experts_lib.FEW_ROWS_PER_EXPERT, 4)
    self.assertFalse(has_buckets(4, block=4, grad=False))  # 16 rows per expert >= a block of 4
    self.assertTrue(has_buckets(4, block=4, grad=True))
    self.assertTrue(has_buckets(4, block=32, grad=False))  # 16: over a few, under a block
    self.assertFalse(has_buckets(1, block=32, grad=False))  # 4 per expert: a few
    self.assertTrue(has_buckets(1, block=32, grad=True))

  def test_scanned_layers_keep_no_weight_copies_for_the_backward(self):
    """Under a scan over stacked layers (the model's walk), the forward's residuals are
    activations only: the expert weights are the kernel's inputs and the scan forwards them,
    not a stacked copy per layer -- also when the overflow pass runs ("all_same")."""
    x, w1, w3, w2 = map(jnp.asarray, self._weights(seed=3))
    x = jnp.tile(x, (4, 1))
    routing = self._routing("all_same", seed=3)
    routing = routing_lib.Routing(*(jnp.tile(a, (4, 1)) for a in routing))
    stack = lambda w: jnp.stack([w, 2 * w])
    ws = tuple(map(stack, (w1, w3, w2)))
    fn = functools.partial(experts_lib.routed_ffn, block=4, precision="fp32", path="bucket")

    def loss(ws, x):
      def body(x, w):
        return x + fn(x, routing, *w), None

      return jnp.sum(jax.lax.scan(body, x, ws)[0] ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(ws, x).jaxpr
    forward = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
    stacked = {tuple(v.aval.shape) for v in forward.outvars}
    for w in ws:
      self.assertNotIn(tuple(w.shape), stacked)

  def test_capacity_covers_the_spread_of_few_rows(self):
    """Decode-sized buckets: a few rows per expert get ~3 standard deviations of room."""
    self.assertEqual(experts_lib.capacity(2048 * 6, 64), 240)  # training: 1.25 x 192
    self.assertEqual(experts_lib.capacity(8 * 6, 64), 5)  # batch 8 decode: mean 0.75
    self.assertEqual(experts_lib.capacity(32 * 6, 64), 16)  # batch 32: mean 3

  def test_block_size_follows_the_rows_per_expert(self):
    """Few rows per expert: a block covers an expert's rows; over a block each: blocks of at
    most a third of the mean (a power of two), so the last block's padding stays small;
    under fp8 the configured block (its weight-gradient tiles run along a block's rows)."""
    block = experts_lib.effective_block
    self.assertEqual(block(128, 8 * 6, 64), 1)  # batch 8 decode
    self.assertEqual(block(128, 32 * 6, 64), 4)  # batch 32 decode: 3 per expert
    self.assertEqual(block(128, 2048 * 6, 64), 64)  # prefill 4 x 512: 192 per expert
    self.assertEqual(block(128, 4096 * 6, 64), 128)  # 384 per expert
    self.assertEqual(block(128, 2048 * 6, 64, fp8=True), 128)
    self.assertEqual(block(128, 32 * 6, 64, fp8=True), 4)

  def test_empty_rows_are_zero(self):
    """Rows with expert id E (empty slots of the expert-parallel buffer) come back as zeros."""
    x, w1, w3, w2 = map(jnp.asarray, self._weights())
    ids = jnp.asarray(np.r_[np.arange(8) % self.e, [self.e] * 8], jnp.int32)
    for path in experts_lib.PATHS:
      y = experts_lib.expert_rows(
        jnp.asarray(x), ids, w1, w3, w2, block=4, precision="fp32", path=path
      )
      np.testing.assert_array_equal(np.asarray(y[8:]), 0.0)
      self.assertGreater(float(jnp.abs(y[:8]).min()), 0.0)

  def test_copies_read_each_source_row_k_times(self):
    """`copies=k` equals the k-fold repeated rows on every path, values and gradients, and a
    row count that does not match the expert ids is refused."""
    x, w1, w3, w2 = map(jnp.asarray, self._weights())
    k = 2
    ids = jnp.asarray((np.arange(2 * x.shape[0]) * 5) % (self.e + 1), jnp.int32)  # some empty
    for path in experts_lib.PATHS:
      run = functools.partial(experts_lib.expert_rows, block=4, precision="fp32", path=path)
      loss_k = lambda x: jnp.sum(jnp.sin(run(x, ids, w1, w3, w2, copies=k)))
      loss_r = lambda x: jnp.sum(jnp.sin(run(jnp.repeat(x, k, axis=0), ids, w1, w3, w2)))
      np.testing.assert_allclose(loss_k(x), loss_r(x), rtol=1e-5)
      np.testing.assert_allclose(jax.grad(loss_k)(x), jax.grad(loss_r)(x), rtol=1e-4, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "copies"):
      experts_lib.expert_rows(x, ids, w1, w3, w2, block=4, precision="fp32", copies=3)


class BalanceLossTest(parameterized.TestCase):
  @parameterized.named_parameters(("tiny", "tiny", 3, 10), ("v3_shape", "v3_shape", 2, 16))
  def test_matches_report_formula(self, setup, batch, t):
    cfg = _cfg(*_ROUTERS[setup])
    x, gate, bias = _random_router(cfg, batch * t, seed=5, bias_scale=0.2)
    routing = _route(x, gate, bias, cfg)
    got = routing_lib.sequence_balance_loss(routing, batch, cfg)
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    ref = _ref_balance_loss(
      np.asarray(routing.experts_Nxk).reshape(batch, t, k),
      np.asarray(routing.scores_NxE, np.float64).reshape(batch, t, e),
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5)

  def test_perfectly_balanced_is_one(self):
    # Uniform scores and a uniform load: f_i = 1, P_i = 1/E, so the loss is exactly 1.
    cfg = _cfg(*_ROUTERS["tiny"])
    e, k, t = cfg.n_routed_experts, cfg.num_experts_per_tok, 8
    experts = np.arange(t * k).reshape(t, k) % e
    routing = routing_lib.Routing(
      jnp.asarray(experts, jnp.int32), jnp.ones((t, k)), jnp.full((t, e), 0.3, jnp.float32)
    )
    np.testing.assert_allclose(routing_lib.sequence_balance_loss(routing, 1, cfg), 1.0, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()


def test_gathered_path_equals_block_path():
  """Few copies take the gather path; it must equal the block loop on the same routing."""
  e, d, f, n, k = 16, 8, 6, 3, 2
  keys = jax.random.split(jax.random.key(11), 5)
  x = jax.random.normal(keys[0], (n, d), jnp.float32)
  w1, w3 = (jax.random.normal(kk, (e, d, f), jnp.float32) for kk in keys[1:3])
  w2 = jax.random.normal(keys[3], (e, f, d), jnp.float32)
  experts = jnp.array([[1, 5], [5, 9], [0, 15]], jnp.int32)
  routing = routing_lib.Routing(experts, jax.random.uniform(keys[4], (n, k)), jnp.zeros((n, e)))
  assert n * k <= e  # routed_ffn chooses the gather path by itself
  gathered = experts_lib.routed_ffn(x, routing, w1, w3, w2, 4, "fp32")
  lay_path = experts_lib.routed_ffn(
    jnp.tile(x, (8, 1)),
    routing._replace(
      experts_Nxk=jnp.tile(experts, (8, 1)), weights_Nxk=jnp.tile(routing.weights_Nxk, (8, 1))
    ),
    w1,
    w3,
    w2,
    4,
    "fp32",
    path="block",
  )[:n]
  np.testing.assert_allclose(np.asarray(gathered), np.asarray(lay_path), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(gathered),
    np.asarray(experts_lib.dense_reference(x, routing, w1, w3, w2)),
    rtol=1e-5,
    atol=1e-5,
  )
