"""The training objective (arXiv 2412.19437 §2.2 eq. 25, §2.1.2 eq. 17):

  L = CE + lambda / D * sum_k CE_MTP_k + alpha * (sequence-wise balance loss of every MoE layer)

`readout_losses` is the part after the main model's final norm (the head and its CE, a
piece of positions at a time under `TrainConfig.logits_chunk`; the MTP depths and their
balance loss); `head_losses` runs it (and recomputes it in the backward under
`ModelConfig.remat`);
`model_losses` runs the whole model and adds the main MoE layers' balance loss. The plain
step uses `model_losses`; the pipelined step runs the stacks stage by stage and calls
`head_losses` in the last stage — one objective for both.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from dsv3_jax.config import TrainConfig


@jax.custom_vjp
def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] per position, float32: log-sum-exp minus the target's logit
  (targets in [0, V): the callers' token ids, checked where they enter).

  Its VJP keeps the logits and the log-sum-exp and forms softmax - one-hot in the backward,
  where autodiff of `log_softmax` keeps a second [B, L, V] float32 array (the log-probs)."""
  return _token_nll_fwd(logits_BxLxV, targets_BxL)[0]


def _token_nll_fwd(logits, targets):
  lf = logits.astype(jnp.float32)
  top = jnp.max(lf, axis=-1, keepdims=True)  # shift first: no cancellation at large logits
  shifted = lf - top
  lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
  nll = lse - jnp.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
  return nll, (logits, targets, lse + top[..., 0])


def _token_nll_bwd(res, g):
  logits, targets, lse = res
  v = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  p = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  d = (p - (v == targets[..., None]).astype(jnp.float32)) * g[..., None]
  return d.astype(logits.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def cross_entropy(
  logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array | None = None
) -> jax.Array:
  """Mean token cross-entropy in nats (float32), over the positions where mask is true."""
  return _mean(token_nll(logits_BxLxV, targets_BxL), mask_BxL)


def _mean(nll_BxL: jax.Array, mask_BxL: jax.Array | None) -> jax.Array:
  if mask_BxL is None:
    return jnp.mean(nll_BxL)
  mask = mask_BxL.astype(jnp.float32)
  return jnp.sum(nll_BxL * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def head_pieces(chunk: int, length: int) -> int:
  """How many pieces `head_nll` cuts `length` positions into for `TrainConfig.logits_chunk`
  = `chunk` (1: the whole sequence at once, for 0 or a chunk of at least `length`)."""
  return -(-length // chunk) if 0 < chunk < length else 1


def head_nll(model, h_BxLxD: jax.Array, targets_BxL: jax.Array, chunk: int = 0) -> jax.Array:
  """`token_nll` of the head's logits of the final-normed hidden state `h` [B, L] (float32).

  `chunk` > 0: `chunk` positions of every sequence at a time (a `lax.map` over pieces, the
  last padded), each piece under `jax.checkpoint`: the backward reruns a piece's head GEMM
  rather than keeping its logits, so one piece's [B, chunk, V] float32 logits are live at a
  time and none are kept between the forward and the backward. It costs one more head GEMM
  (forward); the values are the unchunked ones up to float rounding."""
  b, l, d = h_BxLxD.shape
  n = head_pieces(chunk, l)
  if n == 1:
    return token_nll(model.logits(h_BxLxD), targets_BxL)
  pad = n * chunk - l
  h = jnp.pad(h_BxLxD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d)
  t = jnp.pad(targets_BxL, ((0, 0), (0, pad))).reshape(b, n, chunk)
  piece = jax.checkpoint(lambda hh, tt: token_nll(model.logits(hh), tt))
  nll = jax.lax.map(lambda a: piece(*a), (jnp.swapaxes(h, 0, 1), jnp.swapaxes(t, 0, 1)))
  return jnp.swapaxes(nll, 0, 1).reshape(b, n * chunk)[:, :l]


def head_cross_entropy(
  model, h_BxLxD: jax.Array, targets_BxL: jax.Array, chunk: int = 0, mask_BxL=None
) -> jax.Array:
  """`cross_entropy` of the head's logits of `h`, taken `chunk` positions at a time
  (`head_nll`)."""
  return _mean(head_nll(model, h_BxLxD, targets_BxL, chunk), mask_BxL)


class Readout(NamedTuple):
  loss: jax.Array  # CE + lambda/D sum MTP CE + alpha * MTP balance (main balance excluded)
  ce: jax.Array
  mtp_ce: Optional[jax.Array]  # mean over depths; None without MTP
  mtp_load_DxE: jax.Array
  mtp_balance: jax.Array


def readout_losses(
  model,
  h_BxLxD: jax.Array,
  tokens_BxL1: jax.Array,
  cfg: TrainConfig,
  routed=None,
  mtp_emb=None,
) -> Readout:
  """Everything after the main model's final norm `h`: the head and its cross-entropy
  (`cfg.logits_chunk` positions at a time, `head_nll`), then the MTP depths, each with the
  head the same way. `mtp_emb`: the MTP depths' input embeddings [D, B, L, hidden], when the
  caller looked them up (`shifted_inputs(...)[1:]`)."""
  targets = tokens_BxL1[:, 1:]
  b, l = targets.shape
  ce = head_cross_entropy(model, h_BxLxD, targets, cfg.logits_chunk)
  depth = len(model.mtp)
  n_exp = max(model.cfg.n_routed_experts, 1)
  if not depth:
    zero = jnp.zeros((), jnp.float32)
    return Readout(ce, ce, None, jnp.zeros((0, n_exp), jnp.float32), zero)
  padded = _pad_for_mtp(tokens_BxL1, depth)
  mtp_h, mtp_load, mtp_balance = model.mtp_forward(
    h_BxLxD, padded, routed=routed, emb_DxBxLxD=mtp_emb, head=False
  )
  mtp_ce = []
  for k, hk in enumerate(mtp_h, start=1):
    # Depth k at position i predicts t_{i+k+1}; the last k positions have no target.
    mask = jnp.broadcast_to(jnp.arange(l) < l - k, (b, l))
    mtp_ce.append(
      head_cross_entropy(model, hk, padded[:, k + 1 : k + 1 + l], cfg.logits_chunk, mask)
    )
  mtp_ce = jnp.stack(mtp_ce)
  loss = ce + cfg.mtp_lambda / depth * jnp.sum(mtp_ce) + cfg.balance_alpha * mtp_balance
  return Readout(loss, ce, jnp.mean(mtp_ce), mtp_load.astype(jnp.float32), mtp_balance)


def _pad_for_mtp(tokens_BxL1: jax.Array, depth: int) -> jax.Array:
  """The tokens followed by `depth` zeros: MTP depth k reads positions k .. k + L - 1."""
  b = tokens_BxL1.shape[0]
  return jnp.concatenate([tokens_BxL1, jnp.zeros((b, depth), tokens_BxL1.dtype)], axis=1)


def shifted_inputs(tokens_BxL1: jax.Array, depth: int) -> jax.Array:
  """The inputs shifted by 0 .. depth [1 + D, B, L]: entry 0 is the main model's, entry k
  MTP depth k's (zeros past the end, where no target is scored)."""
  l = tokens_BxL1.shape[1] - 1
  padded = _pad_for_mtp(tokens_BxL1, depth)
  return jnp.stack([padded[:, k : k + l] for k in range(depth + 1)])


def head_losses(
  model, h_BxLxD: jax.Array, tokens_BxL1: jax.Array, cfg: TrainConfig, routed=None, mtp_emb=None
) -> Readout:
  """`readout_losses` of the final-normed hidden state `h`. Under `ModelConfig.remat` =
  "blocks" it keeps only `h` (and `mtp_emb`, when given) for the backward, which reruns the
  head, the cross-entropy and the MTP depths: no fp32 logits [B, L, V] stay alive between
  the forward and the backward."""

  def run(h, emb):
    return readout_losses(model, h, tokens_BxL1, cfg, routed, emb)

  if model.cfg.recomputes:
    run = jax.checkpoint(run)
  return run(h_BxLxD, mtp_emb)


def model_losses(model, tokens_BxL1: jax.Array, cfg: TrainConfig, routed=None):
  """Runs the model and its MTP modules on one batch; returns (loss, metrics, loads)."""
  out = model.forward(tokens_BxL1[:, :-1], routed=routed, head=False)
  r = head_losses(model, out.hidden_BxLxD, tokens_BxL1, cfg, routed)
  loss = r.loss + cfg.balance_alpha * out.balance_loss
  metrics = {
    "ce": r.ce,
    **(out.stats or {}),
    "loss": loss,
    "balance_loss": out.balance_loss + r.mtp_balance,
  }
  if r.mtp_ce is not None:
    metrics["mtp_ce"] = r.mtp_ce
  return loss, metrics, jnp.concatenate([out.load_LxE, r.mtp_load_DxE], axis=0)
