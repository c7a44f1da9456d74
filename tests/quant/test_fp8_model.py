"""FP8 in the model: the grouped expert GEMM, the precision switch, whole-model gradients.

The grouped-GEMM references below are NumPy + ml_dtypes, written independently of
`dsv3_jax.quant`. Slow tests (real training runs) are marked `slow`.
"""

import collections
import functools

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from flax import nnx, traverse_util

from configs import dsv3
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax.layers import experts as experts_lib, routing as routing_lib
from benchmarks import fp8_parity as parity
from dsv3_jax.quant import fp8, fp8_grouped
from dsv3_jax.train.loss import model_losses
from dsv3_jax.train.step import split_model

F8 = ml_dtypes.float8_e4m3fn


# ---------------------------------------------------------------- numpy references


def _np_tiles(a, axis=-1, bf16=True):
  """1x128 FP8 tiles of a 2-D array along `axis`, dequantized in float32 and rounded to bf16
  (the GEMM operand; float64) or not (`bf16=False`: the cached activation re-tiled)."""
  a = np.asarray(a, np.float32)
  t = a.T if axis == 0 else a
  r, c = t.shape
  cp = -(-c // 128) * 128
  tp = np.zeros((r, cp), np.float32)
  tp[:, :c] = t
  tl = tp.reshape(r, cp // 128, 128)
  s = np.maximum(np.abs(tl).max(-1), np.float32(1e-4)) * np.float32(1 / 448)
  q = np.clip(tl / s[..., None], np.float32(-448), np.float32(448)).astype(F8)
  d = (q.astype(np.float32) * s[..., None]).reshape(r, cp)[:, :c]
  d = d.astype(ml_dtypes.bfloat16 if bf16 else np.float32).astype(np.float64)
  return d.T if axis == 0 else d


def _np_blocks(w):
  """128x128 FP8 blocks of a 2-D weight, dequantized and rounded to bf16 (float64)."""
  w = np.asarray(w, np.float32)
  k, f = w.shape
  kp, fp = -(-k // 128) * 128, -(-f // 128) * 128
  wp = np.zeros((kp, fp), np.float32)
  wp[:k, :f] = w
  b = wp.reshape(kp // 128, 128, fp // 128, 128)
  s = np.maximum(np.abs(b).max((1, 3), keepdims=True), np.float32(1e-4)) * np.float32(1 / 448)
  q = np.clip(b / s, np.float32(-448), np.float32(448)).astype(F8)
  d = (q.astype(np.float32) * s).reshape(kp, fp)[:k, :f]
  return d.astype(ml_dtypes.bfloat16).astype(np.float64)


def _np_bucket_fp8(x, ids, w1, w3, w2, g, c):
  """The FP8 recipe on capacity buckets, written out: each expert's rows (stable order) in C
  slots; y, and the weight gradients with 128x1 tiles along each expert's slots."""
  e_n = w1.shape[0]
  y = np.zeros(x.shape, np.float64)
  dws = [np.zeros(w.shape, np.float64) for w in (w1, w3, w2)]
  for e in range(e_n):
    rows = np.flatnonzero(ids == e)
    assert len(rows) <= c, "the reference covers no overflow"
    xe, ge = np.zeros((c, x.shape[1]), np.float32), np.zeros((c, x.shape[1]), np.float32)
    xe[: len(rows)], ge[: len(rows)] = x[rows], g[rows]
    o1, o3, o2 = (_np_blocks(w[e]) for w in (w1, w3, w2))
    xq = _np_tiles(xe)
    a1, a3 = ((xq @ o).astype(np.float32) for o in (o1, o3))
    sig = (1 / (1 + np.exp(-a1.astype(np.float64)))).astype(np.float32)
    h = a1 * sig * a3
    y[rows] = (_np_tiles(h) @ o2)[: len(rows)]
    dh = (_np_tiles(ge) @ o2.T).astype(np.float32)
    da1 = dh * a3 * sig * (1 + a1 * (1 - sig))  # float32, as the layer computes it
    da3 = dh * (a1 * sig)
    xt = _np_tiles(_np_tiles(xe, bf16=False).astype(np.float32), axis=0)  # cached, re-tiled
    dws[0][e] = xt.T @ _np_tiles(da1, axis=0)
    dws[1][e] = xt.T @ _np_tiles(da3, axis=0)
    dws[2][e] = _np_tiles(h, axis=0).T @ _np_tiles(ge, axis=0)
  return y, dws


# Two formulations of one FP8 recipe agree to FP32 rounding before every re-quantization, and
# the e4m3 rounding of the hidden layer turns a reduction-order difference of ~1e-7 into a few
# one-step flips (x scaled by 1 + 3e-7 noise moves the bucket kernel's y by ~1e-3 here).
# XLA:CPU reduces the bucket and block GEMMs' rows in one order (they agree exactly there);
# a GPU's GEMM library picks an algorithm per shape, so there the bound admits the flips,
# still 10x under FP8's own error vs FP32 (~6%).
_SAME_RECIPE = 1e-4 if jax.default_backend() == "cpu" else 5e-3


def _rel_fro(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------- capacity buckets


class Fp8BucketTest(parameterized.TestCase):
  """The routed experts' default FP8 formulation: batched GEMMs over [E, C, D] buckets.

  Its fprop and dgrad tile every row along the contraction, as the block path (the overflow
  pass) does, so the two agree to FP32 rounding; the wgrad tiles 128 slots along each
  expert's bucket, the block path each block's rows, so weight gradients agree within FP8
  error. The numpy reference spells the recipe out.
  """

  e, d, f = 4, 256, 192

  def _problem(self, seed, kind):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.standard_normal((800, self.d)), jnp.float32)
    w1, w3 = (jnp.asarray(r.standard_normal((self.e, self.d, self.f)) * 0.1) for _ in range(2))
    w2 = jnp.asarray(r.standard_normal((self.e, self.f, self.d)) * 0.1)
    ids = r.integers(0, self.e, 800)  # ~200 rows per expert: buckets of 256 slots, 2 tiles
    if kind == "skewed":  # 500 rows on expert 0: the exact overflow pass runs
      ids[:500] = 0
    g = jnp.asarray(r.standard_normal((800, self.d)), jnp.float32)
    return x, jnp.asarray(ids, jnp.int32), (w1, w3, w2), g

  def _vjp(self, x, ids, ws, g, precision, path):
    def f(x, ws):
      run = lambda x, ws: experts_lib.expert_rows(
        x, ids, *ws, block=32, precision=precision, path=path
      )
      y, vjp = jax.vjp(run, x, ws)
      return y, *vjp(g)

    return jax.jit(f)(x, ws)

  @parameterized.parameters("balanced", "skewed")
  def test_agrees_with_block_path_and_fp32(self, kind):
    x, ids, ws, g = self._problem(11, kind)
    counts = np.bincount(np.asarray(ids), minlength=self.e)
    self.assertEqual(bool(counts.max() > experts_lib.capacity(800, self.e)), kind == "skewed")
    y, dx, dws = self._vjp(x, ids, ws, g, "fp8", None)  # the default path under fp8
    yb, dxb, dwsb = self._vjp(x, ids, ws, g, "fp8", "block")
    y32, dx32, dws32 = self._vjp(x, ids, ws, g, "fp32", "bucket")
    self.assertLess(_rel_fro(y, yb), _SAME_RECIPE)
    self.assertLess(_rel_fro(dx, dxb), _SAME_RECIPE)
    # FP8 error vs FP32 (e4m3 keeps 3 mantissa bits; ~6-7% here on every output); the two
    # paths' weight gradients differ by their tiling along the tokens.
    self.assertLess(_rel_fro(y, y32), 0.1)
    self.assertLess(_rel_fro(dx, dx32), 0.1)
    for dw, dwb, dw32 in zip(dws, dwsb, dws32):
      self.assertEqual(dw.dtype, jnp.float32)
      self.assertLess(_rel_fro(dw, dw32), 0.1)
      self.assertLess(_rel_fro(dwb, dw32), 0.1)
      self.assertLess(_rel_fro(dw, dwb), 0.06)
      self.assertGreater(_rel_fro(dw, dw32), 0.01)  # it did run in FP8

  def test_matches_numpy_reference(self):
    x, ids, ws, g = self._problem(13, "balanced")
    y, _, dws = self._vjp(x, ids, ws, g, "fp8", "bucket")
    c = experts_lib.capacity(800, self.e)
    y_ref, dws_ref = _np_bucket_fp8(*map(np.asarray, (x, ids, *ws, g)), c)
    self.assertLess(_rel_fro(y, y_ref), _SAME_RECIPE)
    for dw, ref in zip(dws, dws_ref):
      self.assertLess(_rel_fro(dw, ref), _SAME_RECIPE)

  def test_bucket_buffer_is_kept_as_fp8_bytes(self):
    x, ids, ws, _ = self._problem(12, "balanced")
    run = lambda x, ws: experts_lib.expert_rows(x, ids, *ws, block=32, precision="fp8")
    _, vjp = jax.vjp(run, x, ws)
    kept = [l for l in jax.tree_util.tree_leaves(vjp) if l.dtype == jnp.uint8]
    c = experts_lib.capacity(800, self.e)
    self.assertEqual([l.shape for l in kept], [(self.e, c, self.d)])


# ---------------------------------------------------------------- the model-wide switch


def _tiny(precision, **model):
  c = dsv3.get_config("tiny")
  c.model.matmul_precision = precision
  c.model.update(model)
  return config_lib.from_dict(c)


def _sub_jaxprs(v):
  if isinstance(v, jax.extend.core.ClosedJaxpr):
    yield v.jaxpr
  elif isinstance(v, jax.extend.core.Jaxpr):
    yield v
  elif isinstance(v, (tuple, list)):
    for item in v:
      yield from _sub_jaxprs(item)


def _eqns(jaxpr):
  """Every equation, recursing into scan/cond/custom_vjp/jit bodies."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in _sub_jaxprs(v):
        yield from _eqns(sub)


def _trace_model(cfg, record=None):
  """Jaxpr of the main forward + every MTP depth; fp8 GEMM calls go into `record`."""
  model = model_lib.create(cfg.model)
  graphdef, state = nnx.split(model)

  def f(state, tokens):
    m = nnx.merge(graphdef, state)
    out = m.forward(tokens)
    padded = jnp.concatenate([tokens, tokens[:, : cfg.model.num_nextn_predict_layers]], axis=1)
    return out.logits_BxLxV, m.mtp_forward(out.hidden_BxLxD, padded)[0]

  tokens = jnp.zeros((2, 16), jnp.int32)
  if record is None:
    return jax.make_jaxpr(f)(state, tokens).jaxpr, model
  lin, grp = fp8.fp8_matmul, fp8_grouped.expert_weights

  def lin_spy(x, w, *a, **k):
    record.append(("linear", tuple(w.shape)))
    return lin(x, w, *a, **k)

  def grp_spy(w, *a, **k):
    record.append(("grouped", tuple(w.shape)))
    return grp(w, *a, **k)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(fp8, "fp8_matmul", lin_spy)
    mp.setattr(fp8_grouped, "expert_weights", grp_spy)
    return jax.make_jaxpr(f)(state, tokens).jaxpr, model


def _expected_fp8_calls(model):
  """One call per projection kernel of each traced block (a stack's body is traced once)."""
  _, params, _ = split_model(model)
  expected = collections.Counter()
  for path, leaf in traverse_util.flatten_dict(params).items():
    stacked = path[0] in ("dense", "moe")
    shape = leaf.shape[1:] if stacked else leaf.shape
    if path[-1] == "kernel" and path[0] != "head":
      expected[("linear", tuple(shape))] += 1
    elif path[-2:] in (("ffn", "w1"), ("ffn", "w2"), ("ffn", "w3")) and len(shape) == 3:
      expected[("grouped", tuple(shape))] += 1
  return expected


def _f8_casts(eqns):
  return sum(
    e.primitive.name == "convert_element_type" and e.params["new_dtype"] == jnp.float8_e4m3fn
    for e in eqns
  )


def _f8_dequants(eqns):
  return sum(
    e.primitive.name == "convert_element_type" and e.invars[0].aval.dtype == jnp.float8_e4m3fn
    for e in eqns
  )


def _dots(eqns):
  return collections.Counter(
    tuple(str(v.aval.dtype) for v in e.invars) for e in eqns if e.primitive.name == "dot_general"
  )


class PrecisionSwitchTest(absltest.TestCase):
  def test_every_projection_and_nothing_else_runs_in_fp8(self):
    record = []
    jaxpr8, model = _trace_model(_tiny("fp8"), record)
    jaxpr32, _ = _trace_model(_tiny("fp32"))
    expected = _expected_fp8_calls(model)
    # 5 MLA projections x 3 traced blocks, dense MLP, 2 shared experts, eh_proj; 2 x 3 routed.
    self.assertEqual(sum(expected.values()), 15 + 3 + 6 + 1 + 6)
    # The routed experts run in capacity buckets, with the exact overflow pass beside them
    # (`layers/experts.py`): each dequantizes every routed weight once, so a routed weight is
    # recorded twice per traced MoE layer.
    routed = collections.Counter({key: n for key, n in expected.items() if key[0] == "grouped"})
    self.assertEqual(collections.Counter(record), expected + routed)
    eqns8, eqns32 = list(_eqns(jaxpr8)), list(_eqns(jaxpr32))
    n_lin = sum(kind == "linear" for kind, _ in record)
    n_moe = sum(n for (kind, _), n in expected.items() if kind == "grouped") // 3
    # Each FP8 linear GEMM casts exactly its two operands (activation, weight) to e4m3 in
    # forward; a traced MoE layer casts five in its buckets (W1, W3, W2, the bucket buffer once
    # for W1 and W3, the SwiGLU output) and five in its overflow pass. Nothing else (embedding,
    # head, router, norms, attention core) is ever cast.
    self.assertEqual(_f8_casts(eqns8), 2 * n_lin + 10 * n_moe)
    self.assertEqual(_f8_casts(eqns32), 0)
    # ... and dequantizes exactly those operands for its GEMMs (fp8.fp8_dot: bf16 operands,
    # FP32 accumulation); no FP8 value reaches a dot directly.
    self.assertEqual(_f8_dequants(eqns8), 2 * n_lin + 10 * n_moe)
    dots8, dots32 = _dots(eqns8), _dots(eqns32)
    self.assertEqual(dots8[("bfloat16", "bfloat16")], n_lin + 6 * n_moe)
    self.assertEqual(dots32[("bfloat16", "bfloat16")], 0)
    self.assertEqual(dots8[("float8_e4m3fn", "float8_e4m3fn")], 0)
    # The high-precision dots of the fp8 model are exactly the fp32 model's non-projection
    # dots: output head (main + MTP), router gates, the two attention-core einsums per MLA.
    self.assertEqual(
      dots8[("float32", "float32")], dots32[("float32", "float32")] - n_lin - 6 * n_moe
    )
    self.assertEqual(dots8[("float32", "float32")], 2 + 2 + 3 * 2)

  def test_head_and_router_kernels_are_not_projections(self):
    _, model = _trace_model(_tiny("fp8"))
    cfg = model.cfg
    shapes = {s for _, s in _expected_fp8_calls(model)}
    self.assertNotIn((cfg.hidden_size, cfg.vocab_size), shapes)
    self.assertNotIn((cfg.hidden_size, cfg.n_routed_experts), shapes)
    self.assertEqual(model.head.precision, "fp32")


@pytest.mark.slow  # two whole-model gradient compilations (~40 s of CPU)
class WholeModelGradTest(absltest.TestCase):
  def test_fp8_grads_within_bound_of_fp32(self):
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 259, (2, 17)), jnp.int32)
    results = {}
    for precision in ("fp32", "fp8"):
      cfg = _tiny(precision)
      graphdef, params, biases = split_model(model_lib.create(cfg.model))

      def loss_fn(p, cfg=cfg, graphdef=graphdef, biases=biases):
        return model_losses(nnx.merge(graphdef, p, biases), tokens, cfg.train)[0]

      results[precision] = jax.jit(jax.value_and_grad(loss_fn))(params)
    (l32, g32), (l8, g8) = results["fp32"], results["fp8"]
    chex.assert_trees_all_equal_shapes_and_dtypes(g8, g32)
    chex.assert_tree_all_finite(g8)
    self.assertLess(abs(float(l8) - float(l32)) / float(l32), 2e-3)
    flat8, flat32 = traverse_util.flatten_dict(g8), traverse_util.flatten_dict(g32)
    num = sum(float(np.sum((np.asarray(flat8[k], np.float64) - flat32[k]) ** 2)) for k in flat32)
    den = sum(float(np.sum(np.asarray(flat32[k], np.float64) ** 2)) for k in flat32)
    # ~4% per GEMM compounds through the layers (measured ~0.08 globally); a wrong scale or
    # transposed block would give O(1).
    self.assertLess(np.sqrt(num / den), 0.15)
    for k in flat32:
      err = _rel_fro(flat8[k], flat32[k])
      # Router gates and routed experts also see top-k flips caused by FP8 rounding upstream.
      bound = 0.75 if k[-1] in ("gate", "w1", "w2", "w3") and "shared" not in k else 0.25
      self.assertLess(err, bound, msg="/".join(map(str, k)))


# ---------------------------------------------------------------- parity helpers


class ParityMathTest(absltest.TestCase):
  def test_relative_loss_error_uses_the_tail(self):
    ref = [10.0] * 90 + [2.0] * 10
    other = [1.0] * 90 + [2.01] * 10
    self.assertAlmostEqual(parity.relative_loss_error(ref, other), 0.005, places=12)
    self.assertAlmostEqual(parity.mean_stepwise_error(ref, other), 0.005, places=12)
    self.assertAlmostEqual(
      parity.relative_loss_error(ref, other, tail=1.0),
      abs(np.mean(other) - np.mean(ref)) / np.mean(ref),
      places=12,
    )
    with self.assertRaises(ValueError):
      parity.relative_loss_error(ref, other[:-1])
    with self.assertRaises(ValueError):
      parity.relative_loss_error(ref, other, tail=0.0)


# ---------------------------------------------------------------- end to end (slow)


def test_tiny_model_trains_in_fp8_exports_and_decodes(tmp_path):
  from dsv3_jax.train.loop import train_and_evaluate

  c = dsv3.get_config("tiny")
  c.model.matmul_precision = "fp8"
  c.train.update(steps=8, eval_every=8, checkpoint_every=8, warmup_steps=2)
  summary = train_and_evaluate(c, str(tmp_path), progress=False)
  losses = [h["loss"] for h in summary["history"]]
  assert len(losses) == 8 and all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < losses[0] - 0.3, losses
  state, trainer = summary["state"], summary["trainer"]

  # Export every FP8 projection in the HF checkpoint convention ([out, in] e4m3 +
  # weight_scale_inv) and load it back: the model still predicts the same.
  flat = traverse_util.flatten_dict(jax.device_get(state.params))
  exported = {}
  for path, w in flat.items():
    w = np.asarray(w)
    if path[-1] == "kernel" and path[0] != "head":
      mats = w.reshape(-1, *w.shape[-2:])
      back = []
      for m in mats:
        q, s_inv = fp8.quantize_hf(np.ascontiguousarray(m.T))
        assert q.dtype == F8 and s_inv.shape == (-(-m.shape[1] // 128), -(-m.shape[0] // 128))
        back.append(fp8.dequantize_hf(q, s_inv).T)
      w = np.stack(back).reshape(w.shape)
    exported[path] = w
  params_x = traverse_util.unflatten_dict(exported)
  biases = state.biases

  @jax.jit
  def logits_fn(params, tokens):
    return trainer.merge(params, biases)(tokens)

  @functools.partial(jax.jit, static_argnums=4)
  def cached_fn(params, tokens, positions, cache, absorb):
    out = trainer.merge(params, biases).forward(tokens, positions, cache=cache, absorb=absorb)
    return out.logits_BxLxV[:, -1], out.cache

  def greedy(params, prompt, n_new, absorb, forced=None):
    """Prefill, then one token at a time with the latent cache: logits of every step.

    Feeds back the argmax, or the tokens in `forced` (teacher forcing) when given."""
    n_prompt = prompt.shape[1]
    cache = trainer.merge(params, biases).init_cache(1, n_prompt + n_new, jnp.float32)
    positions = jnp.arange(n_prompt, dtype=jnp.int32)[None]
    last, cache = cached_fn(params, prompt, positions, cache, False)
    steps = [last[0]]
    for i in range(n_new - 1):
      pos = jnp.full((1, 1), n_prompt + i, jnp.int32)
      token = jnp.argmax(steps[-1]) if forced is None else forced[i]
      token = jnp.asarray(token, jnp.int32)[None, None]
      last, cache = cached_fn(params, token, pos, cache, absorb)
      steps.append(last[0])
    return np.stack(steps)

  prompt = jnp.asarray(summary["tokenizer"].encode("def main():\n    ")[:12], jnp.int32)[None]
  n_prompt, n_new = prompt.shape[1], 6
  steps = greedy(params_x, prompt, n_new, absorb=False)
  tokens = np.argmax(steps, -1)
  seq = jnp.concatenate([prompt, jnp.asarray(tokens[None], jnp.int32)], axis=1)
  # Causal: the full-sequence logits at position p see only tokens <= p, so one run over the
  # decoded sequence must reproduce every cached step (1x128 tiles are per token, so FP8
  # quantizes each token the same way in both).
  full_x = logits_fn(params_x, seq)
  np.testing.assert_allclose(steps, np.asarray(full_x[0, n_prompt - 1 : -1]), rtol=1e-3, atol=1e-3)
  # Absorbed MLA (the default at decode) folds W_UK / W_UV into high-precision einsums instead
  # of FP8 GEMMs: equal up to FP8 rounding of the latent-side projection.
  absorbed = greedy(params_x, prompt, n_new, absorb=True, forced=tokens)
  assert _rel_fro(absorbed, steps) < 0.05
  # The exported model predicts what the trained model predicts, up to weight rounding.
  full = logits_fn(state.params, seq)
  assert _rel_fro(full_x, full) < 0.05


@pytest.mark.slow
def test_compare_reports_both_curves():
  c = dsv3.get_config("tiny")
  c.model.update(num_hidden_layers=1, num_nextn_predict_layers=0)
  c.train.update(steps=4, eval_batches=1)
  result = parity.compare(c, ("bf16", "fp8"))
  fp8_curve = result["curves"]["fp8"]
  assert len(fp8_curve["loss"]) == len(result["curves"]["bf16"]["loss"]) == 4
  # Same init and data: the first losses agree to FP8 rounding.
  assert abs(fp8_curve["loss"][0] - result["curves"]["bf16"]["loss"][0]) < 0.02
  assert 0 <= fp8_curve["rel_loss_error"] < 0.05
  # The bf16 run's weights evaluated with fp8 dots: FP8 rounding only, no trajectory drift.
  assert 0 < fp8_curve["rel_heldout_error_same_params"] < 0.01
  assert fp8_curve["step_time_s"] > 0
  assert "same weights" in parity.summary_line(result, "fp8")
