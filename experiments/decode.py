r"""Generates text from a trained checkpoint.

  python -m experiments.decode --workdir=runs/small --prompt="def main(" --max_new_tokens=64
  python -m experiments.decode --workdir=runs/small --prompt="import os" --prompt="class A" \
      --temperature=0.8 --top_p=0.95

Prints the latent cache's bytes per token beside the samples.
"""

import json
import sys

from absl import app, flags

from experiments import common

_WORKDIR = flags.DEFINE_string("workdir", "runs/small", "A train_and_evaluate workdir.")
_PROMPT = flags.DEFINE_multi_string("prompt", ["def "], "Prompt text (repeat for a batch).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from dsv3_jax.checkpoint.orbax import load_model
  from dsv3_jax.data import load_tokenizer
  from dsv3_jax.inference.generate import Generator, SamplingConfig

  try:
    model, cfg, step = load_model(_WORKDIR.value, _STEP.value)
  except FileNotFoundError as e:  # nothing trained there yet
    raise app.UsageError(
      f"--workdir: {e}; train first, e.g. python -m experiments.train --workdir={_WORKDIR.value}"
    ) from e
  tokenizer = load_tokenizer(cfg.data.tokenizer or None)
  gen = Generator(model, vocab_limit=tokenizer.vocab_size)
  sampling = SamplingConfig(
    max_new_tokens=_MAX_NEW.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    eos_id=tokenizer.eos_id,
    seed=_SEED.value,
  )
  result = gen.generate([tokenizer.encode(p) for p in _PROMPT.value], sampling)
  for prompt, tokens in zip(_PROMPT.value, result.tokens):
    print("=" * 72)
    print(prompt + tokenizer.decode(tokens))
  print("=" * 72)
  print(
    json.dumps(
      {
        "checkpoint_step": step,
        "cache_bytes_per_token": gen.cache_bytes_per_token(),
        "cache_formula": f"{cfg.model.num_hidden_layers} layers x ({cfg.model.kv_lora_rank} + "
        f"{cfg.model.qk_rope_head_dim}) x {gen.cache_dtype.itemsize} bytes",
        "prefill_s": round(result.prefill_seconds, 3),
        "decode_tokens_per_s": round(result.new_tokens / max(result.decode_seconds, 1e-9), 1),
      },
      indent=1,
    )
  )


if __name__ == "__main__":
  sys.exit(app.run(main))
