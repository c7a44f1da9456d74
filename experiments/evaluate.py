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
is scored exactly once, with the context restarting at each window
(`dsv3_jax.inference.score`). The result (JSON on stdout and in `--result_json`) holds the
tokens scored, the mean negative log-likelihood in nats, the perplexity exp(mean NLL) and, for
text input, bits per UTF-8 byte.
"""

import json
import sys

from absl import app, flags

from experiments import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF directory, orbax directory or workdir.")
_TEXT = flags.DEFINE_string("text", None, "A UTF-8 text file to score.")
_TOKENS = flags.DEFINE_string(
  "tokens", None, "A .npy file of token ids, or a file of whitespace-separated ids."
)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A HF tokenizer.json (text input only).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Predictions per window.")
_BATCH = flags.DEFINE_integer("batch", 4, "Windows per forward pass.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "Score at most this many tokens (0 = all).")
_FP8 = flags.DEFINE_bool("fp8_dots", False, "Run the projections as FP8 dots.")
_DTYPE = flags.DEFINE_enum(
  "activation_dtype", "float32", ["float32", "bfloat16"], "Activation dtype."
)
_OUTPUT = flags.DEFINE_string("result_json", None, "Also write the summary JSON here.")
_DUMP_LOGPROBS = flags.DEFINE_string("dump_logprobs", None, "Per-token log-likelihoods (.npy).")
_DUMP_LOGITS = flags.DEFINE_string(
  "dump_logits", None, "Logits [windows, seq_len, vocab] float32 (.npy)."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _CHECKPOINT.value:
    raise app.UsageError("--checkpoint is required")
  if bool(_TEXT.value) == bool(_TOKENS.value):
    raise app.UsageError("give exactly one of --text and --tokens")
  common.quiet_logs()
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  from dsv3_jax.inference.score import evaluate

  try:
    summary = evaluate(
      _CHECKPOINT.value,
      text=_TEXT.value or None,
      tokens=_TOKENS.value or None,
      tokenizer=_TOKENIZER.value,
      seq_len=_SEQ_LEN.value,
      batch=_BATCH.value,
      max_tokens=_MAX_TOKENS.value,
      fp8=_FP8.value,
      dtype=_DTYPE.value,
      dump_logprobs=_DUMP_LOGPROBS.value,
      dump_logits=_DUMP_LOGITS.value,
    )
  except ValueError as e:  # inputs that do not fit the model (vocab, lengths, ids)
    raise app.UsageError(str(e)) from e
  print(json.dumps(summary, indent=1))
  common.write_json(_OUTPUT.value, summary, announce=False)


if __name__ == "__main__":
  sys.exit(app.run(main))
