"""The training objective: CE + lambda/D * sum_k MTP CE_k + alpha * sequence balance loss."""

import jax
import jax.numpy as jnp

from dsv3_jax.config import TrainConfig


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  mask_BxL: jax.Array | None = None) -> jax.Array:
  """Mean token cross-entropy in nats (float32), over the positions where mask is true."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
  if mask_BxL is None:
    return jnp.mean(nll)
  mask = mask_BxL.astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def model_losses(model, tokens_BxL1: jax.Array, cfg: TrainConfig):
  """Runs the model and its MTP modules on one batch; returns (loss, metrics, loads)."""
  inputs, targets = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
  b, l = inputs.shape
  out = model.forward(inputs)
  ce = cross_entropy(out.logits_BxLxV, targets)
  depth = len(model.mtp)
  balance = out.balance_loss
  loads = [out.load_LxE]
  metrics = {"ce": ce, **(out.stats or {})}
  loss = ce
  if depth:
    padded = jnp.concatenate([tokens_BxL1, jnp.zeros((b, depth), tokens_BxL1.dtype)], axis=1)
    mtp_logits, mtp_load, mtp_balance = model.mtp_forward(out.hidden_BxLxD, padded)
    mtp_ce = []
    for k, logits in enumerate(mtp_logits, start=1):
      # Depth k at position i predicts t_{i+k+1}; the last k positions have no target.
      mask = jnp.broadcast_to(jnp.arange(l) < l - k, (b, l))
      mtp_ce.append(cross_entropy(logits, padded[:, k + 1:k + 1 + l], mask))
    mtp_ce = jnp.stack(mtp_ce)
    loss = loss + cfg.mtp_lambda / depth * jnp.sum(mtp_ce)
    balance = balance + mtp_balance
    loads.append(mtp_load)
    metrics["mtp_ce"] = jnp.mean(mtp_ce)
  loss = loss + cfg.balance_alpha * balance
  metrics.update(loss=loss, balance_loss=balance)
  return loss, metrics, jnp.concatenate(loads, axis=0)
