"""Rotary position embedding, plain or with YaRN context extension.

MLA applies RoPE only to the decoupled query/key dims q^R, k^R (DeepSeek-V3 report, arXiv
2412.19437, §2.1.1, Eqs. 3 and 8). Rotation acts on *interleaved* pairs (x0, x1), (x2, x3),
... as DeepSeek's code does (HF permutes to a half split and rotates; the result is the same).

`cfg.rope_scaling` picks the variant by intent. "none" is plain RoPE, how DeepSeek-V3 is
pretrained (4K context, §4.2). "yarn" is the context extension of §4.3 (YaRN, s = 40,
alpha = 1, beta = 32, sqrt(t) = 0.1 ln s + 1 for the published model): it rescales the low
frequencies by 1/factor with a linear ramp between the `beta_fast` and `beta_slow` correction
dims, and multiplies the softmax scale by mscale(factor, mscale_all_dim)^2.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1.0 else 1.0


def _correction_dim(num_rotations: float, dim: int, theta: float, orig: int) -> float:
  return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_correction_range(cfg: ModelConfig) -> tuple[int, int]:
  dim = cfg.qk_rope_head_dim
  low = math.floor(
    _correction_dim(
      cfg.rope_beta_fast, dim, cfg.rope_theta, cfg.rope_original_max_position_embeddings
    )
  )
  high = math.ceil(
    _correction_dim(
      cfg.rope_beta_slow, dim, cfg.rope_theta, cfg.rope_original_max_position_embeddings
    )
  )
  return max(low, 0), min(high, dim - 1)


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Per-pair angular frequencies [R/2] (float64 numpy; YaRN-corrected under "yarn")."""
  dim = cfg.qk_rope_head_dim
  freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if cfg.rope_scaling != "yarn":
    return freqs
  low, high = yarn_correction_range(cfg)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  return freqs / cfg.rope_factor * ramp + freqs * (1.0 - ramp)


def softmax_scale(cfg: ModelConfig) -> float:
  scale = cfg.qk_head_dim**-0.5
  if cfg.rope_scaling == "yarn":
    scale *= yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
  return scale


def attention_factor(cfg: ModelConfig) -> float:
  """HF's extra cos/sin factor mscale(f, mscale) / mscale(f, mscale_all_dim) (1 for V3)."""
  if cfg.rope_scaling != "yarn":
    return 1.0
  return yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / yarn_mscale(
    cfg.rope_factor, cfg.rope_mscale_all_dim
  )


def rope_angles(cfg: ModelConfig, positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [B, L, R/2] for integer positions."""
  freqs = jnp.asarray(inv_frequencies(cfg), jnp.float32)
  angles = positions_BxL.astype(jnp.float32)[..., None] * freqs[None, None, :]
  factor = attention_factor(cfg)
  return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x_BxLxHxR: jax.Array, cos_BxLxP: jax.Array, sin_BxLxP: jax.Array) -> jax.Array:
  """Rotates interleaved pairs of the last axis; any head axis sits between L and R."""
  x = x_BxLxHxR.astype(jnp.float32)
  x = x.reshape(*x.shape[:-1], -1, 2)
  x0, x1 = x[..., 0], x[..., 1]
  cos = cos_BxLxP[:, :, None, :]
  sin = sin_BxLxP[:, :, None, :]
  y = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return y.reshape(x_BxLxHxR.shape).astype(x_BxLxHxR.dtype)
