r"""Scores a text or token file with a checkpoint: per-token log-likelihood and perplexity.

  python -m experiments.evaluate --checkpoint=path/to/hf_dir --text=notes.txt
  python -m experiments.evaluate --checkpoint=runs/small --tokens=ids.npy --seq_len=256 \
      --result_json=eval.json --dump_logprobs=lp.npy --dump_logits=logits.npy

`--checkpoint` is anything `dsv3_jax.from_pretrained` reads: a HF DeepSeek-V3 directory, a
`save_orbax` directory or a training workdir. Text is tokenized with `--tokenizer` (a HF
tokenizer.json), else the checkpoint's own `tokenizer.json` if it has one, else bytes.
`--tokens` takes a `.npy` array of ids or a text file of whitespace-separated ids.

The token stream is cut into windows of `seq_len` predictions: window w feeds
tokens[w*L : w*L + L] and scores tokens[w*L + 1 : w*L + L + 1], so every token but the first
is scored exactly once, with the context restarting at each window. The result (JSON on
stdout and in `--result_json`) holds the tokens scored, the mean negative log-likelihood in nats,
the perplexity exp(mean NLL) and, for text input, bits per UTF-8 byte.
"""

import functools
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np
from absl import app, flags

from experiments import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF directory, orbax directory or workdir.")
_TEXT = flags.DEFINE_string("text", None, "A UTF-8 text file to score.")
_TOKENS = flags.DEFINE_string("tokens", None,
                              "A .npy file of token ids, or a file of whitespace-separated ids.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A HF tokenizer.json (text input only).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Predictions per window.")
_BATCH = flags.DEFINE_integer("batch", 4, "Windows per forward pass.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "Score at most this many tokens (0 = all).")
_FP8 = flags.DEFINE_bool("fp8_dots", False, "Run the projections as FP8 dots.")
_DTYPE = flags.DEFINE_enum("activation_dtype", "float32", ["float32", "bfloat16"],
                           "Activation dtype.")
_OUTPUT = flags.DEFINE_string("result_json", None, "Also write the summary JSON here.")
_DUMP_LOGPROBS = flags.DEFINE_string("dump_logprobs", None, "Per-token log-likelihoods (.npy).")
_DUMP_LOGITS = flags.DEFINE_string("dump_logits", None,
                                   "Logits [windows, seq_len, vocab] float32 (.npy).")


def read_tokens(path: str) -> np.ndarray:
  """Token ids from a `.npy` array or a text file of whitespace-separated integers."""
  if path.endswith(".npy"):
    ids = np.load(path)
  else:
    with open(path) as f:
      ids = np.array(f.read().split(), dtype=np.int64)
  ids = np.asarray(ids).reshape(-1)
  if ids.dtype.kind not in "iu":
    raise ValueError(f"--tokens {path}: ids must be integers, got {ids.dtype}")
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


def score(model, tokens_N: np.ndarray, seq_len: int, batch: int = 4,
          logits_out: Optional[np.ndarray] = None) -> dict:
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
    raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
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
  padded[:tokens_N.size] = tokens_N
  inputs_WxL = np.stack([padded[w * seq_len:(w + 1) * seq_len] for w in range(n_win)])
  targets_WxL = np.stack([padded[w * seq_len + 1:(w + 1) * seq_len + 1] for w in range(n_win)])
  graphdef, state = nnx.split(model)
  run = _window_scorer()
  logprobs = []
  for start in range(0, n_win, batch):
    x, y = inputs_WxL[start:start + batch], targets_WxL[start:start + batch]
    real = x.shape[0]
    if real < batch:  # pad the last batch to a fixed shape: one compilation
      x = np.concatenate([x, np.zeros((batch - real, seq_len), np.int32)])
      y = np.concatenate([y, np.zeros((batch - real, seq_len), np.int32)])
    lp, logits = run(graphdef, state, jnp.asarray(x), jnp.asarray(y))
    logprobs.append(np.asarray(lp)[:real])
    if logits_out is not None:
      logits_out[start:start + real] = np.asarray(logits, np.float32)[:real]
  lp_N = np.concatenate(logprobs).reshape(-1)[:n_pred]
  nll = float(-lp_N.astype(np.float64).mean())
  return {"logprobs": lp_N, "tokens_scored": int(n_pred), "nll": nll,
          "perplexity": float(math.exp(nll)), "windows": int(n_win), "seq_len": int(seq_len)}


def _tokenizer_for(checkpoint: str, spec: Optional[str]):
  from dsv3_jax.data import load_tokenizer
  if spec:
    return load_tokenizer(spec)
  own = os.path.join(checkpoint, "tokenizer.json")
  return load_tokenizer(own if os.path.exists(own) else None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _CHECKPOINT.value:
    raise app.UsageError("--checkpoint is required")
  if bool(_TEXT.value) == bool(_TOKENS.value):
    raise app.UsageError("give exactly one of --text and --tokens")
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  from dsv3_jax.pretrained import from_pretrained

  t0 = time.time()
  model = from_pretrained(_CHECKPOINT.value, fp8=_FP8.value, dtype=_DTYPE.value)
  load_s = time.time() - t0
  n_bytes = None
  if _TEXT.value:
    with open(_TEXT.value, encoding="utf-8") as f:
      text = f.read()
    tokenizer = _tokenizer_for(_CHECKPOINT.value, _TOKENIZER.value)
    if tokenizer.vocab_size > model.cfg.vocab_size:
      raise app.UsageError(f"the tokenizer ({tokenizer!r}) has {tokenizer.vocab_size} ids, the "
                           f"model's vocab only {model.cfg.vocab_size}: pass --tokenizer")
    tokens = np.asarray(tokenizer.encode_array(text), np.int32)
    n_bytes = len(text.encode("utf-8"))
  else:
    tokens = read_tokens(_TOKENS.value)
  if _MAX_TOKENS.value:
    tokens = tokens[:_MAX_TOKENS.value]
    n_bytes = None  # the byte count no longer matches the tokens scored
  logits_out = None
  if _DUMP_LOGITS.value:
    n_win = -(-(tokens.size - 1) // _SEQ_LEN.value)
    logits_out = np.lib.format.open_memmap(
        _DUMP_LOGITS.value, mode="w+", dtype=np.float32,
        shape=(n_win, _SEQ_LEN.value, model.cfg.vocab_size))
  t0 = time.time()
  result = score(model, tokens, _SEQ_LEN.value, _BATCH.value, logits_out)
  score_s = time.time() - t0
  if logits_out is not None:
    logits_out.flush()
  if _DUMP_LOGPROBS.value:
    np.save(_DUMP_LOGPROBS.value, result["logprobs"])
  summary = {k: v for k, v in result.items() if k != "logprobs"}
  summary.update(checkpoint=_CHECKPOINT.value, source=_TEXT.value or _TOKENS.value,
                 load_seconds=load_s, score_seconds=score_s,
                 tokens_per_second=result["tokens_scored"] / max(score_s, 1e-9))
  if n_bytes:
    summary["bits_per_byte"] = result["nll"] * result["tokens_scored"] / n_bytes / math.log(2)
  print(json.dumps(summary, indent=1))
  common.write_json(_OUTPUT.value, summary, announce=False)


if __name__ == "__main__":
  sys.exit(app.run(main))
