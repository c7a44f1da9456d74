"""Scores token streams with a model: per-token log-likelihood, perplexity, bits per byte.

`score` cuts a token stream into windows of `seq_len` predictions: window w feeds
tokens[w*L : w*L + L] and scores tokens[w*L + 1 : w*L + L + 1], so every token but the first
is scored exactly once, with the context restarting at each window. It reports the tokens
scored, the mean negative log-likelihood in nats and the perplexity exp(mean NLL) -- the
language-modeling measurements of DeepSeek-V3's evaluations (arXiv 2412.19437, §4.3; bits
per byte as for the Pile test set). `evaluate` does the same for a checkpoint and a
text or token file: what `experiments/evaluate.py` runs.
"""

import functools
import math
import os
import time
from typing import Optional

import numpy as np

__all__ = ["evaluate", "read_tokens", "score"]


def read_tokens(path: str) -> np.ndarray:
  """Token ids from a `.npy` array or a text file of whitespace-separated integers."""
  if path.endswith(".npy"):
    ids = np.load(path)
  else:
    with open(path) as f:
      ids = np.array(f.read().split(), dtype=np.int64)
  ids = np.asarray(ids).reshape(-1)
  if ids.dtype.kind not in "iu":
    raise ValueError(f"{path}: token ids must be integers, got {ids.dtype}")
  return ids.astype(np.int32)


@functools.lru_cache(maxsize=None)
def _window_scorer():
  """(graphdef static, state, inputs, targets) -> (log p(target), logits), jitted once."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  @functools.partial(jax.jit, static_argnums=0)
  def run(graphdef, state, inputs_BxL, targets_BxL):
    logits = nnx.merge(graphdef, state)(inputs_BxL)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0], logits

  return run


def score(
  model, tokens_N: np.ndarray, seq_len: int, batch: int = 4, logits_out: Optional[np.ndarray] = None
) -> dict:
  """Log-likelihood of every token but the first, in windows of `seq_len` predictions.

  Returns {"logprobs": [N-1] float32 (log p(t_i | window context)), "tokens_scored",
  "nll": mean negative log-likelihood in nats, "perplexity"}. When `logits_out` (an array or
  memmap of shape [windows, seq_len, vocab]) is given, each window's logits are written to it.
  """
  import jax.numpy as jnp
  from flax import nnx

  cfg = model.cfg
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len}: must be >= 1")
  if seq_len > cfg.max_position_embeddings:
    raise ValueError(
      f"seq_len={seq_len} exceeds the model's max_position_embeddings={cfg.max_position_embeddings}"
    )
  if batch < 1:
    raise ValueError(f"batch={batch}: must be >= 1")
  tokens_N = np.asarray(tokens_N, np.int32).reshape(-1)
  if tokens_N.size < 2:
    raise ValueError("need at least 2 tokens to score")
  bad = tokens_N[(tokens_N < 0) | (tokens_N >= cfg.vocab_size)]
  if bad.size:
    raise ValueError(f"token id {int(bad[0])} is outside the model's vocab [0, {cfg.vocab_size})")
  n_pred = tokens_N.size - 1
  n_win = -(-n_pred // seq_len)
  padded = np.zeros(n_win * seq_len + 1, np.int32)
  padded[: tokens_N.size] = tokens_N
  inputs_WxL = np.stack([padded[w * seq_len : (w + 1) * seq_len] for w in range(n_win)])
  targets_WxL = np.stack([padded[w * seq_len + 1 : (w + 1) * seq_len + 1] for w in range(n_win)])
  graphdef, state = nnx.split(model)
  run = _window_scorer()
  logprobs = []
  for start in range(0, n_win, batch):
    x, y = inputs_WxL[start : start + batch], targets_WxL[start : start + batch]
    real = x.shape[0]
    if real < batch:  # pad the last batch to a fixed shape: one compilation
      x = np.concatenate([x, np.zeros((batch - real, seq_len), np.int32)])
      y = np.concatenate([y, np.zeros((batch - real, seq_len), np.int32)])
    lp, logits = run(graphdef, state, jnp.asarray(x), jnp.asarray(y))
    logprobs.append(np.asarray(lp)[:real])
    if logits_out is not None:
      logits_out[start : start + real] = np.asarray(logits, np.float32)[:real]
  lp_N = np.concatenate(logprobs).reshape(-1)[:n_pred]
  nll = float(-lp_N.astype(np.float64).mean())
  return {
    "logprobs": lp_N,
    "tokens_scored": int(n_pred),
    "nll": nll,
    "perplexity": float(math.exp(nll)),
    "windows": int(n_win),
    "seq_len": int(seq_len),
  }


def _tokenizer_for(checkpoint: str, spec: Optional[str]):
  from dsv3_jax.data import load_tokenizer

  if spec:
    return load_tokenizer(spec)
  own = os.path.join(checkpoint, "tokenizer.json")
  return load_tokenizer(own if os.path.exists(own) else None)


def evaluate(
  checkpoint: str,
  *,
  text: Optional[str] = None,
  tokens: Optional[str] = None,
  tokenizer: Optional[str] = None,
  seq_len: int = 256,
  batch: int = 4,
  max_tokens: int = 0,
  fp8: bool = False,
  dtype: str = "float32",
  dump_logprobs: Optional[str] = None,
  dump_logits: Optional[str] = None,
) -> dict:
  """Scores the UTF-8 file `text` or the token file `tokens` (`read_tokens`) with the
  checkpoint `checkpoint` (anything `dsv3_jax.from_pretrained` reads); returns the summary.

  Text is tokenized with `tokenizer` (a HF tokenizer.json), else the checkpoint's own
  `tokenizer.json` if it has one, else bytes, and also gets `bits_per_byte`. `max_tokens`
  (> 0) scores only the first tokens. `dump_logprobs` / `dump_logits` name .npy files for
  the per-token log-likelihoods and the logits [windows, seq_len, vocab] (float32).
  """
  from dsv3_jax.pretrained import from_pretrained

  if (text is None) == (tokens is None):
    raise ValueError("give exactly one of `text` and `tokens`")
  t0 = time.time()
  model = from_pretrained(checkpoint, fp8=fp8, dtype=dtype)
  load_s = time.time() - t0
  n_bytes = None
  if text is not None:
    with open(text, encoding="utf-8") as f:
      content = f.read()
    tok = _tokenizer_for(checkpoint, tokenizer)
    if tok.vocab_size > model.cfg.vocab_size:
      raise ValueError(
        f"the tokenizer ({tok!r}) has {tok.vocab_size} ids, the model's vocab "
        f"only {model.cfg.vocab_size}: pass the checkpoint's tokenizer"
      )
    ids = np.asarray(tok.encode_array(content), np.int32)
    n_bytes = len(content.encode("utf-8"))
  else:
    ids = read_tokens(tokens)
  if max_tokens:
    ids = ids[:max_tokens]
    n_bytes = None  # the byte count no longer matches the tokens scored
  logits_out = None
  if dump_logits:
    n_win = -(-(ids.size - 1) // seq_len)
    logits_out = np.lib.format.open_memmap(
      dump_logits, mode="w+", dtype=np.float32, shape=(n_win, seq_len, model.cfg.vocab_size)
    )
  t0 = time.time()
  result = score(model, ids, seq_len, batch, logits_out)
  score_s = time.time() - t0
  if logits_out is not None:
    logits_out.flush()
  if dump_logprobs:
    np.save(dump_logprobs, result["logprobs"])
  summary = {k: v for k, v in result.items() if k != "logprobs"}
  summary.update(
    checkpoint=checkpoint,
    source=text or tokens,
    load_seconds=load_s,
    score_seconds=score_s,
    tokens_per_second=result["tokens_scored"] / max(score_s, 1e-9),
  )
  if n_bytes:
    summary["bits_per_byte"] = result["nll"] * result["tokens_scored"] / n_bytes / math.log(2)
  return summary
