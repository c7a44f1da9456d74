"""Tests for the MTP modules (dsv3_jax.layers.mtp via `Transformer.mtp_forward`) and the
model's parameter count.

MTP depth k at position i predicts token i+k+1 from the main hidden state at i and the
embeddings of tokens up to i+k: its logits must have exactly zero gradient with respect to
the embedding of any later token, and a non-zero one for token i+k. The gradient is taken
with respect to the embedding table, with all tokens distinct, so that each table row is
the input embedding of exactly one position.
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
from dsv3_jax import counts as counts_lib
from dsv3_jax import model as model_lib
from dsv3_jax.train import loss as loss_lib


def _config(variant: str = "tiny", **overrides) -> config_lib.Config:
  cfg = config_lib.from_dict(get_config(variant))
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **overrides).validate())


def _n_params(module) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _ref_cross_entropy(logits, targets, mask):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  return float((nll * mask).sum() / mask.sum())


class MTPCausalityTest(absltest.TestCase):
  def test_depth_k_sees_tokens_up_to_i_plus_k(self):
    depth, l = 2, 6
    cfg = _config(num_nextn_predict_layers=depth, init_std=0.1).model
    model = model_lib.create(cfg, seed=0)
    is_embed = lambda path, _: tuple(path) == ("embed",)
    graphdef, embed_state, rest = nnx.split(model, is_embed, ...)
    tokens_1xLpD = jax.random.permutation(jax.random.key(1), cfg.vocab_size)[: l + depth][None]
    r_V = jax.random.normal(jax.random.key(2), (cfg.vocab_size,))

    def per_position(embed_VxD):
      m = nnx.merge(graphdef, jax.tree.map(lambda _: embed_VxD, embed_state), rest)
      out = m.forward(tokens_1xLpD[:, :l])
      mtp_logits, _, _ = m.mtp_forward(out.hidden_BxLxD, tokens_1xLpD)
      logits = [out.logits_BxLxV] + list(mtp_logits)  # depth 0 = the main model
      return jnp.stack([jnp.einsum("lv,v->l", lg[0], r_V) for lg in logits])

    jac = jax.jit(jax.jacrev(per_position))(model.embed[...])  # [depth+1, L, vocab, D]
    norms = np.asarray(jnp.linalg.norm(jac, axis=-1))[:, :, np.asarray(tokens_1xLpD[0])]
    i = np.arange(l)[:, None]
    j = np.arange(l + depth)[None, :]
    for k in range(depth + 1):
      g_LxLpD = norms[k]
      self.assertEqual(g_LxLpD[j > i + k].max(), 0.0, f"depth {k} sees the future")
      self.assertGreater(g_LxLpD[j <= i + k].min(), 1e-7, f"depth {k} misses a token")
      # Token i+k, the newest one depth k may use, matters at every position.
      self.assertTrue(np.all(g_LxLpD[np.arange(l), np.arange(l) + k] > 1e-7))


class MTPLossTest(absltest.TestCase):
  def test_model_losses_masks_last_k_positions(self):
    depth, b, l = 2, 2, 7
    cfg = _config(num_nextn_predict_layers=depth, init_std=0.1)
    model = model_lib.create(cfg.model, seed=3)
    tokens = jax.random.randint(jax.random.key(4), (b, l + 1), 0, cfg.model.vocab_size)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, pad_value):
      m = nnx.merge(graphdef, state)
      loss, metrics, loads = loss_lib.model_losses(m, tokens, cfg.train)
      out = m.forward(tokens[:, :-1])
      padded = jnp.concatenate([tokens, jnp.full((b, depth), pad_value, tokens.dtype)], 1)
      mtp_logits, _, mtp_balance = m.mtp_forward(out.hidden_BxLxD, padded)
      return loss, metrics, loads, out, mtp_logits, mtp_balance

    loss, metrics, loads, out, mtp_logits, mtp_balance = run(state, tokens, 0)
    _, _, _, _, mtp_logits_pad9, _ = run(state, tokens, 9)
    tok = np.asarray(tokens)
    ce = _ref_cross_entropy(out.logits_BxLxV, tok[:, 1:], np.ones((b, l)))
    mtp_ce, unmasked = [], []
    for k in range(1, depth + 1):
      # Depth k at position i predicts t_{i+k+1}: only i < l - k have a target.
      valid = np.broadcast_to(np.arange(l) < l - k, (b, l)).astype(np.float64)
      targets = np.zeros((b, l), np.int64)
      targets[:, : l - k] = tok[:, k + 1 :]
      mtp_ce.append(_ref_cross_entropy(mtp_logits[k - 1], targets, valid))
      # Whatever fills the positions past the end, the kept positions are the same.
      np.testing.assert_allclose(
        _ref_cross_entropy(mtp_logits_pad9[k - 1], targets, valid), mtp_ce[-1], rtol=1e-6
      )
      unmasked.append(_ref_cross_entropy(mtp_logits[k - 1], targets, np.ones((b, l))))
    np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["mtp_ce"], np.mean(mtp_ce), rtol=1e-5)
    self.assertGreater(abs(np.mean(unmasked) - np.mean(mtp_ce)), 1e-3)  # the mask matters
    balance = float(out.balance_loss + mtp_balance)
    np.testing.assert_allclose(metrics["balance_loss"], balance, rtol=1e-5)
    want = ce + cfg.train.mtp_lambda / depth * sum(mtp_ce) + cfg.train.balance_alpha * balance
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    # Loads: the main model's MoE layers, then one row per MTP depth; every copy counted.
    chex.assert_shape(loads, (cfg.model.n_moe_layers + depth, cfg.model.n_routed_experts))
    np.testing.assert_allclose(np.asarray(loads).sum(-1), b * l * cfg.model.num_experts_per_tok)


class ParamCountTest(parameterized.TestCase):
  def test_671b_analytic(self):
    counts = counts_lib.param_counts(_config("671b").model)
    self.assertLess(abs(counts["total"] - 671e9) / 671e9, 1e-3)
    np.testing.assert_allclose(counts["total"] / 1e9, 671.03, atol=0.005)
    np.testing.assert_allclose(counts["mtp_unique"] / 1e9, 11.6, atol=0.05)
    self.assertLess(counts["activated"], counts["total"] / 15)

  @parameterized.named_parameters(
    ("tiny", "tiny", {}),
    ("tiny_no_q_lora_depth2", "tiny", {"q_lora_rank": 0, "num_nextn_predict_layers": 2}),
    ("bench", "bench", {}),
    ("671b", "671b", {}),
  )
  def test_analytic_equals_real(self, variant, overrides):
    cfg = _config(variant, **overrides).model
    model = model_lib.abstract(cfg)  # ShapeDtypeStructs: nothing is allocated
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    self.assertIsInstance(leaves[0], jax.ShapeDtypeStruct)
    total, mtp = _n_params(model), _n_params(model.mtp)
    counts = counts_lib.param_counts(cfg)
    self.assertEqual(total - mtp, counts["total"])
    self.assertEqual(mtp, counts["mtp_unique"])
    self.assertGreater(mtp, 0)
    # The router bias is a balancing statistic, not a parameter.
    self.assertNotIn("bias", nnx.to_pure_dict(nnx.state(model, nnx.Param))["moe"]["ffn"])


if __name__ == "__main__":
  absltest.main()
