"""Teacher-forced acceptance of MTP drafts next to baseline drafters (arXiv 2412.19437 §2.2,
§5.4.3).

The report measures how often the MTP module's prediction of the second next token is
accepted when decoding with it (85-90%, §5.4.3). Teacher-forced on held-out text, the same
question is asked at every position i: knowing t_0..t_{i+1}, a drafter guesses t_{i+2}; the
guess is compared with

  * `vs_text`: the text's actual t_{i+2};
  * `vs_main`: the main model's own greedy choice at position i+1 (argmax of its logits
    after t_0..t_{i+1}), which is exactly what greedy speculative decoding accepts.

Drafters (each returns `drafts_BxL`, column i the guess for t_{i+2}; the last two columns
have nothing to guess and are not scored):
  * `mtp`            -- the model's trained MTP depth 1: h_i and emb(t_{i+1}) -> t_{i+2};
  * `mtp_untrained`  -- a freshly initialised MTP module on the same main model (a floor
                        for what MTP training buys);
  * `copy_last`      -- t_{i+2} := t_{i+1} (repetition);
  * `bigram`         -- the most frequent successor of t_{i+1} in training text.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.layers.mtp import MTPModule


def _check_tokens(tokens_BxL) -> np.ndarray:
  tokens = np.asarray(tokens_BxL)
  if tokens.ndim != 2 or tokens.shape[1] < 3:
    raise ValueError(
      f"tokens must be [batch, length >= 3] to score drafts of t_(i+2), got shape {tokens.shape}"
    )
  return tokens.astype(np.int32)


def _shift(tokens_BxL: np.ndarray) -> np.ndarray:
  """Column i holds t_{i+1}; the last column repeats the last token (never scored)."""
  return np.concatenate([tokens_BxL[:, 1:], tokens_BxL[:, -1:]], axis=1)


def copy_last_drafts(tokens_BxL) -> np.ndarray:
  """Guess t_{i+2} = t_{i+1}."""
  return _shift(_check_tokens(tokens_BxL))


class BigramDrafter:
  """Guess t_{i+2} = the most frequent successor of t_{i+1} in the fitting text (the most
  frequent token overall for a token never seen with a successor)."""

  def __init__(self, table_V: np.ndarray):
    self.table_V = np.asarray(table_V, np.int32)

  @classmethod
  def fit(cls, tokens_N, vocab_size: int) -> "BigramDrafter":
    tokens = np.asarray(tokens_N, np.int64).reshape(-1)
    if tokens.size < 2:
      raise ValueError(f"a bigram drafter needs at least 2 training tokens, got {tokens.size}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
      raise ValueError(
        f"training tokens must lie in [0, {vocab_size}), found [{tokens.min()}, {tokens.max()}]"
      )
    counts_VxV = np.zeros((vocab_size, vocab_size), np.int64)
    np.add.at(counts_VxV, (tokens[:-1], tokens[1:]), 1)
    unigram = np.bincount(tokens, minlength=vocab_size).argmax()
    table = np.where(counts_VxV.sum(1) > 0, counts_VxV.argmax(1), unigram)
    return cls(table)

  def drafts(self, tokens_BxL) -> np.ndarray:
    return self.table_V[_shift(_check_tokens(tokens_BxL))]


def fresh_mtp(cfg, seed: int = 1) -> MTPModule:
  """An MTP module as initialised before training, to draft with an untrained head."""
  return MTPModule(cfg, rngs=nnx.Rngs(params=seed))


def _limited_argmax(logits_BxLxV, vocab_limit):
  if vocab_limit is not None and vocab_limit < logits_BxLxV.shape[-1]:
    logits_BxLxV = jnp.where(
      jnp.arange(logits_BxLxV.shape[-1]) < vocab_limit, logits_BxLxV, -jnp.inf
    )
  return jnp.argmax(logits_BxLxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 2, 5))
def _mtp_and_main(model_def, model_state, module_def, module_state, tokens_BxL, vocab_limit):
  model = nnx.merge(model_def, model_state)
  module = nnx.merge(module_def, module_state)
  b, l = tokens_BxL.shape
  out = model.forward(tokens_BxL)
  next_BxL = jnp.concatenate([tokens_BxL[:, 1:], tokens_BxL[:, -1:]], axis=1)
  ctx = model.context((b, l))
  _, h_mtp, _, _ = module(
    out.hidden_BxLxD,
    model.embed_tokens(next_BxL),
    ctx.positions_BxL,
    ctx.cos,
    ctx.sin,
    causal=ctx.causal,
  )
  return (
    _limited_argmax(model.logits(h_mtp), vocab_limit),
    _limited_argmax(out.logits_BxLxV, vocab_limit),
  )


def mtp_drafts(
  model, tokens_BxL, module: Optional[MTPModule] = None, vocab_limit: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray]:
  """(greedy MTP drafts [B, L], main model's greedy next tokens [B, L]) in one forward;
  `module` defaults to the model's own MTP depth 1."""
  tokens = _check_tokens(tokens_BxL)
  if module is None:
    if len(model.mtp) == 0:
      raise ValueError("the model has no MTP module (num_nextn_predict_layers=0); pass one")
    module = model.mtp[0]
  model_def, model_state = nnx.split(model)
  module_def, module_state = nnx.split(module)
  drafts, main = _mtp_and_main(
    model_def, model_state, module_def, module_state, jnp.asarray(tokens), vocab_limit
  )
  return np.asarray(drafts), np.asarray(main)


def teacher_forced_acceptance(
  model,
  tokens_BxL,
  *,
  bigram: Optional[BigramDrafter] = None,
  untrained_seed: Optional[int] = 1,
  vocab_limit: Optional[int] = None,
  batch_size: int = 8,
) -> dict:
  """Per drafter, the fraction of positions whose guess of t_{i+2} equals the text's token
  (`vs_text`) and the main model's greedy choice (`vs_main`); plus `main_vs_text`, the main
  model's own next-token accuracy, and `positions`, how many were scored.

  Drafters: `mtp` (when the model has one), `mtp_untrained` (unless `untrained_seed` is
  None), `copy_last`, and `bigram` when a fitted `BigramDrafter` is given.
  """
  tokens = _check_tokens(tokens_BxL)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  modules = {}
  if len(model.mtp):
    modules["mtp"] = model.mtp[0]
  if untrained_seed is not None:
    modules["mtp_untrained"] = fresh_mtp(model.cfg, untrained_seed)
  if not modules:  # the main model's choices are still needed: any module computes them
    modules["_main_only"] = fresh_mtp(model.cfg, 0)
  drafts = {name: [] for name in modules}
  main = []
  for start in range(0, tokens.shape[0], batch_size):
    chunk = tokens[start : start + batch_size]
    for name, module in modules.items():
      d, m = mtp_drafts(model, chunk, module, vocab_limit)
      drafts[name].append(d)
    main.append(m)
  drafts = {name: np.concatenate(d) for name, d in drafts.items() if name != "_main_only"}
  main = np.concatenate(main)
  drafts["copy_last"] = copy_last_drafts(tokens)
  if bigram is not None:
    drafts["bigram"] = bigram.drafts(tokens)
  target_text = tokens[:, 2:]  # t_{i+2} for i < L-2
  target_main = main[:, 1:-1]  # the main model's argmax at i+1
  result = {
    "positions": int(target_text.size),
    "main_vs_text": float(np.mean(main[:, 1:-1] == target_text)),
  }
  for name, d in drafts.items():
    d = d[:, :-2]
    result[name] = {
      "vs_text": float(np.mean(d == target_text)),
      "vs_main": float(np.mean(d == target_main)),
    }
  return result
