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


# The report's schedule (§4.2) as fractions of the run: the peak until 10T of 14.8T tokens,
# cosine decay to the minimum by 14.3T, the minimum for 333B tokens, then 7.3e-6 (a third of
# the 2.2e-5 minimum) for the last 167B.
REPORT_PHASES = (10.0 / 14.8, 14.3 / 14.8, 14.633 / 14.8)
REPORT_LAST_RATIO = 7.3e-6 / 2.2e-5


def learning_rate_schedule(cfg: TrainConfig, steps=None) -> optax.Schedule:
  """The learning rate at each step (a count of the updates done), times `lr_scale` (a
  restart option past a non-finite step): a linear warmup from 0 to the peak, then either a
  cosine decay to peak * min_lr_ratio over the remaining steps (`cosine`) or the report's
  shape (`report`, §4.2: the peak, a cosine decay, the minimum, a third of it; phases at
  REPORT_PHASES of the run).

  The run spans `steps` (default `cfg.steps`), which may be a traced scalar: a time budget
  sets the run's length during the run without compiling the train step again."""
  peak = cfg.learning_rate * cfg.lr_scale
  end = peak * cfg.min_lr_ratio
  warmup = cfg.warmup_steps
  total = jnp.asarray(cfg.steps if steps is None else steps, jnp.float32)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    ramp = peak * count / max(warmup, 1)
    if cfg.lr_schedule == "cosine":
      start, stop = warmup, jnp.maximum(total, warmup + 1)
    else:
      start = jnp.maximum(REPORT_PHASES[0] * total, warmup)
      stop = jnp.maximum(REPORT_PHASES[1] * total, start + 1)
    frac = jnp.clip((count - start) / (stop - start), 0.0, 1.0)
    lr = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    if cfg.lr_schedule == "report":
      lr = jnp.where(count >= REPORT_PHASES[2] * total, end * REPORT_LAST_RATIO, lr)
    return jnp.where(count < warmup, ramp, lr)

  return schedule


def length_free_steps(cfg: TrainConfig, steps: int) -> int:
  """The steps whose learning rate does not depend on the run's length, for a run of at
  least `steps` steps: the warmup, and under `report` the constant peak after it."""
  if cfg.lr_schedule == "cosine":
    return cfg.warmup_steps
  return max(cfg.warmup_steps, int(REPORT_PHASES[0] * steps))


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


def make_optimizer(cfg: TrainConfig, steps=None) -> optax.GradientTransformation:
  """AdamW as DeepSeek-V3 trains it; the schedule spans `steps` (see learning_rate_schedule).
  The state does not depend on `steps`."""
  return optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    scale_by_adam_lowp(cfg.b1, cfg.b2, moment_dtype=jnp.dtype(cfg.moment_dtype)),
    optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask),
    optax.scale_by_learning_rate(learning_rate_schedule(cfg, steps)),
  )
