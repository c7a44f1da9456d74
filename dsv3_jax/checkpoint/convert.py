"""Converts DeepSeek-V3 checkpoints between the Hugging Face layout and orbax.

The HF side is read and written one tensor at a time (`checkpoint/hf.py`: BF16 or FP8
safetensors, FP8 with the 128x128 `weight_scale_inv` blocks of arXiv 2412.19437 §3.3.2); the
orbax side holds the parameters and router biases with the model config
(`dsv3_jax.pretrained.save_orbax`), and `dsv3_jax.from_pretrained` reads either. A source's
`tokenizer.json` (and its config), when present, is copied along. `experiments/convert_hf.py`
is the command line.
"""

import os
import shutil
import time

__all__ = ["convert"]

_TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "generation_config.json",
)


def convert(
  src: str,
  dst: str,
  to: str,
  *,
  dtype: str = "bfloat16",
  fp8: bool = False,
  pow2: bool = False,
  shard_bytes: int = 4 << 30,
  mtp=None,
) -> dict:
  """Converts `src` into `dst` in format `to` ("hf" or "orbax"); returns a summary."""
  from dsv3_jax import pretrained

  if os.path.abspath(src) == os.path.abspath(dst):
    raise ValueError(f"src and dst must differ: both are {src!r}")
  t0 = time.time()
  kind = pretrained.checkpoint_kind(src)
  model = pretrained.from_pretrained(src, mtp=mtp)  # `mtp` matters for HF sources only
  load_s = time.time() - t0
  t0 = time.time()
  if to == "hf":
    summary = pretrained.save_pretrained(
      model, dst, format="hf", dtype=dtype, fp8=fp8, pow2=pow2, max_shard_bytes=shard_bytes
    )
  elif to == "orbax":
    summary = pretrained.save_pretrained(model, dst, format="orbax")
  else:
    raise ValueError(f"to={to!r}: must be 'hf' or 'orbax'")
  for name in _TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
  summary.update(
    src=src,
    src_kind=kind,
    dst=dst,
    to=to,
    mtp_depth=model.cfg.num_nextn_predict_layers,
    load_seconds=load_s,
    save_seconds=time.time() - t0,
  )
  return summary
