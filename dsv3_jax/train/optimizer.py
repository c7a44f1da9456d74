"""AdamW with low-precision moments over float32 master weights (arXiv 2412.19437, §3.3, §4.2).

DeepSeek-V3 keeps both AdamW moments in BF16 and the master weights in FP32. optax's
`scale_by_adam` only lowers the first moment's dtype, so the Adam scaling here stores both
moments in `moment_dtype` and does its arithmetic in float32.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dsv3_jax.config import TrainConfig


class LowPrecisionAdamState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_lowp(
  b1: float, b2: float, eps: float = 1e-8, moment_dtype=jnp.bfloat16
) -> optax.GradientTransformation:
  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, moment_dtype)
    return LowPrecisionAdamState(
      jnp.zeros((), jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
    )

  def update(grads, state, params=None):
    del params
    count = state.count + 1
    f32 = lambda t: t.astype(jnp.float32)
    mu = jax.tree.map(lambda m, g: b1 * f32(m) + (1 - b1) * f32(g), state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), state.nu, grads)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    updates = jax.tree.map(
      lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), mu, nu, grads
    )
    cast = lambda t: t.astype(moment_dtype)
    return updates, LowPrecisionAdamState(count, jax.tree.map(cast, mu), jax.tree.map(cast, nu))

  return optax.GradientTransformation(init, update)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to peak * min_lr_ratio (§4.2), all
  times `lr_scale` (a restart option past a non-finite step)."""
  peak = cfg.learning_rate * cfg.lr_scale
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=cfg.warmup_steps,
    decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
    end_value=peak * cfg.min_lr_ratio,
  )


# Parameter leaves that are not weight matrices, whatever their rank: RMSNorm scales (one
# vector per layer, [n_layers, D] in the stacked layers) and biases.
NO_DECAY_NAMES = ("scale", "bias")


def _leaf_name(path) -> str:
  key = path[-1]
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def decays(path, p) -> bool:
  """Whether weight decay applies to the parameter at `path` (a pytree key path): weight
  matrices only (embedding, head, kernels, router gates, expert weights), never norm scales
  or biases, stacked or not."""
  return _leaf_name(path) not in NO_DECAY_NAMES and p.ndim >= 2


def _decay_mask(params):
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    scale_by_adam_lowp(cfg.b1, cfg.b2, moment_dtype=jnp.dtype(cfg.moment_dtype)),
    optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask),
    optax.scale_by_learning_rate(learning_rate_schedule(cfg)),
  )
