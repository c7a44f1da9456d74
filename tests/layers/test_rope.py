"""Tests for dsv3_jax.layers.rope: YaRN frequencies, softmax scale, interleaved rotation.

The references are written here from the formulas (DeepSeek-V3 report, arXiv 2412.19437,
§2.1.1 and §4.3): YaRN in float64 numpy and the rotation as complex multiplication of adjacent
pairs, as DeepSeek's own code does.
"""

import dataclasses
import math

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs.dsv3 import get_config
from dsv3_jax import config as config_lib
from dsv3_jax.layers import rope


def _model_cfg(variant: str, **overrides) -> config_lib.ModelConfig:
  cfg = config_lib.from_dict(get_config(variant)).model
  return dataclasses.replace(cfg, **overrides).validate()


# ---------------------------------------------------------------- numpy references


def _ref_correction_dim(r, dim, theta, orig):
  return dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(theta))


def _ref_yarn_freqs(dim, theta, factor, orig, beta_fast, beta_slow):
  """Plain RoPE frequencies, blended towards f/factor by a ramp over the pair index."""
  base = theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
  if factor <= 1.0:
    return base
  low = max(math.floor(_ref_correction_dim(beta_fast, dim, theta, orig)), 0)
  high = min(math.ceil(_ref_correction_dim(beta_slow, dim, theta, orig)), dim - 1)
  ramp = np.array([min(max((i - low) / (high - low), 0.0), 1.0) for i in range(dim // 2)])
  return base / factor * ramp + base * (1 - ramp)


def _ref_rotate(x, positions, freqs):
  """Interleaved pairs (x0, x1) as x0 + i x1, multiplied by exp(i * pos * f)."""
  x = np.asarray(x, np.float64)
  z = x[..., 0::2] + 1j * x[..., 1::2]
  angles = np.asarray(positions, np.float64)[:, :, None, None] * freqs  # [B, L, 1, R/2]
  z = z * np.exp(1j * angles)
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def _rotate(cfg, x_BxLxHxR, positions_BxL):
  cos, sin = rope.rope_angles(cfg, jnp.asarray(positions_BxL, jnp.int32))
  return np.asarray(rope.apply_rope(jnp.asarray(x_BxLxHxR, jnp.float32), cos, sin))


class YarnTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.cfg = _model_cfg("671b")

  def test_correction_range_671b(self):
    self.assertEqual(rope.yarn_correction_range(self.cfg), (10, 23))

  def test_frequencies_671b(self):
    cfg = self.cfg
    f = rope.inv_frequencies(cfg)
    plain = 1.0 / (1e4 ** (np.arange(0, 64, 2, dtype=np.float64) / 64))
    self.assertEqual(f.shape, (32,))
    np.testing.assert_allclose(f[:11], plain[:11], rtol=1e-12)  # i <= 10: unchanged
    np.testing.assert_allclose(f[11], 0.0390069, rtol=1e-5)
    np.testing.assert_allclose(f[23:], plain[23:] / 40, rtol=1e-12)  # i >= 23: f / factor
    # Strictly between the two ends inside the ramp.
    self.assertTrue(np.all(f[12:23] < plain[12:23]) and np.all(f[12:23] > plain[12:23] / 40))
    ref = _ref_yarn_freqs(64, 1e4, 40.0, 4096, 32.0, 1.0)
    np.testing.assert_allclose(f, ref, rtol=1e-12)

  def test_scales_671b(self):
    np.testing.assert_allclose(rope.yarn_mscale(40.0, 1.0), 1.368888, rtol=1e-6)
    np.testing.assert_allclose(rope.softmax_scale(self.cfg), 0.1352338, rtol=1e-6)
    ref_m = 0.1 * math.log(40.0) + 1.0
    np.testing.assert_allclose(rope.softmax_scale(self.cfg), 192**-0.5 * ref_m**2, rtol=1e-12)
    self.assertEqual(rope.attention_factor(self.cfg), 1.0)  # mscale == mscale_all_dim

  def test_no_yarn_is_plain_rope(self):
    cfg = _model_cfg("small")
    self.assertEqual((cfg.rope_scaling, cfg.rope_factor), ("none", 1.0))
    r = cfg.qk_rope_head_dim
    np.testing.assert_allclose(
      rope.inv_frequencies(cfg), 1e4 ** -(np.arange(0, r, 2, dtype=np.float64) / r), rtol=1e-12
    )
    np.testing.assert_allclose(rope.softmax_scale(cfg), cfg.qk_head_dim**-0.5, rtol=1e-12)
    self.assertEqual(rope.attention_factor(cfg), 1.0)

  def test_scaling_follows_config_intent(self):
    """The same network is plain RoPE under "none" and YaRN under "yarn", whatever its length."""
    yarn = self.cfg
    self.assertEqual(yarn.rope_scaling, "yarn")
    plain = dataclasses.replace(yarn, rope_scaling="none", rope_factor=1.0).validate()
    r = plain.qk_rope_head_dim
    base = 1e4 ** -(np.arange(0, r, 2, dtype=np.float64) / r)
    np.testing.assert_allclose(rope.inv_frequencies(plain), base, rtol=1e-12)
    np.testing.assert_allclose(rope.softmax_scale(plain), plain.qk_head_dim**-0.5, rtol=1e-12)
    self.assertEqual(rope.attention_factor(plain), 1.0)
    # YaRN changes the low frequencies and the softmax scale; plain RoPE leaves both alone.
    self.assertFalse(np.allclose(rope.inv_frequencies(yarn), base))
    self.assertGreater(rope.softmax_scale(yarn), rope.softmax_scale(plain) * 1.8)
    got = _rotate(plain, np.ones((1, 1, 1, r), np.float32), np.array([[1000]]))
    ref = _ref_rotate(np.ones((1, 1, 1, r)), np.array([[1000]]), base)
    np.testing.assert_allclose(got, ref, atol=2e-4)

  def test_pretrain_preset_is_plain_rope_at_4k(self):
    cfg = _model_cfg("671b_pretrain")
    self.assertEqual((cfg.rope_scaling, cfg.max_position_embeddings), ("none", 4096))
    r = cfg.qk_rope_head_dim
    np.testing.assert_allclose(
      rope.inv_frequencies(cfg), 1e4 ** -(np.arange(0, r, 2, dtype=np.float64) / r), rtol=1e-12
    )
    self.assertEqual(rope.softmax_scale(cfg), 192**-0.5)
    # ... and it is the 671b network otherwise.
    published = _model_cfg("671b")
    self.assertEqual(
      dataclasses.replace(
        cfg, rope_scaling="yarn", rope_factor=40.0, max_position_embeddings=163840
      ),
      published,
    )

  @parameterized.named_parameters(("tiny", "tiny"), ("bench", "bench"), ("671b", "671b"))
  def test_frequencies_match_reference(self, variant):
    cfg = _model_cfg(variant)
    ref = _ref_yarn_freqs(
      cfg.qk_rope_head_dim,
      cfg.rope_theta,
      cfg.rope_factor,
      cfg.rope_original_max_position_embeddings,
      cfg.rope_beta_fast,
      cfg.rope_beta_slow,
    )
    np.testing.assert_allclose(rope.inv_frequencies(cfg), ref, rtol=1e-12)


class RotationTest(parameterized.TestCase):
  @parameterized.named_parameters(("tiny", "tiny"), ("671b", "671b"), ("small", "small"))
  def test_matches_complex_reference(self, variant):
    cfg = _model_cfg(variant)
    rng = np.random.default_rng(0)
    b, l, h, r = 2, 5, 3, cfg.qk_rope_head_dim
    x = rng.standard_normal((b, l, h, r)).astype(np.float32)
    positions = rng.integers(0, 200, size=(b, l))
    freqs = _ref_yarn_freqs(
      r,
      cfg.rope_theta,
      cfg.rope_factor,
      cfg.rope_original_max_position_embeddings,
      cfg.rope_beta_fast,
      cfg.rope_beta_slow,
    )
    got = _rotate(cfg, x, positions)
    chex.assert_trees_all_close(
      got, _ref_rotate(x, positions, freqs).astype(np.float32), atol=2e-5, rtol=2e-5
    )

  def test_position_zero_is_identity(self):
    cfg = _model_cfg("tiny")
    x = np.random.default_rng(1).standard_normal((1, 4, 2, cfg.qk_rope_head_dim))
    got = _rotate(cfg, x.astype(np.float32), np.zeros((1, 4), np.int64))
    np.testing.assert_allclose(got, x, rtol=1e-6, atol=1e-6)

  @parameterized.named_parameters(("tiny", "tiny"), ("671b", "671b"))
  def test_preserves_pair_norms(self, variant):
    cfg = _model_cfg(variant)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 4, cfg.qk_rope_head_dim)).astype(np.float32)
    y = _rotate(cfg, x, rng.integers(0, 5000, size=(2, 6)))
    pair_norm = lambda t: np.hypot(t[..., 0::2], t[..., 1::2])
    np.testing.assert_allclose(pair_norm(y), pair_norm(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)

  @parameterized.named_parameters(("tiny", "tiny"), ("671b", "671b"))
  def test_score_depends_only_on_offset(self, variant):
    cfg = _model_cfg(variant)
    rng = np.random.default_rng(3)
    r = cfg.qk_rope_head_dim
    q = rng.standard_normal((1, 1, 1, r)).astype(np.float32)
    k = rng.standard_normal((1, 1, 1, r)).astype(np.float32)

    def score(m, n):
      qm = _rotate(cfg, q, np.array([[m]]))
      kn = _rotate(cfg, k, np.array([[n]]))
      return float(np.sum(qm.astype(np.float64) * kn))

    for offset in (0, 3, 17):
      base = score(offset, 0)
      for shift in (1, 40, 211):
        np.testing.assert_allclose(score(offset + shift, shift), base, rtol=1e-4, atol=1e-4)
    # ... and it does depend on the offset (the test could otherwise pass trivially).
    self.assertGreater(abs(score(3, 0) - score(17, 0)), 1e-3)


if __name__ == "__main__":
  absltest.main()
