r"""Converts DeepSeek-V3 checkpoints between the Hugging Face layout and orbax.

  # HF directory (BF16 or FP8 safetensors) -> orbax model checkpoint
  python -m experiments.convert_hf --src=path/to/hf_dir --dst=ckpt/model --to=orbax
  # a training workdir (or an orbax model checkpoint) -> HF directory, BF16
  python -m experiments.convert_hf --src=runs/small --dst=export/small --to=hf
  # ... or FP8 with 128x128 weight_scale_inv blocks, power-of-two scales
  python -m experiments.convert_hf --src=runs/small --dst=export/small_fp8 --to=hf --fp8 --pow2

The HF side is read and written one tensor at a time (`dsv3_jax/checkpoint/hf.py`); the
orbax side holds the parameters and router biases with the model config
(`dsv3_jax.pretrained.save_orbax`), and `dsv3_jax.from_pretrained` reads either. A source's
`tokenizer.json` (and its config), when present, is copied along. Prints a JSON summary.
"""

import json
import os
import shutil
import sys
import time

from absl import app, flags

from experiments import common

_SRC = flags.DEFINE_string("src", None, "HF directory, orbax model directory or training workdir.")
_DST = flags.DEFINE_string("dst", None, "Output directory.")
_TO = flags.DEFINE_enum("to", None, ["hf", "orbax"], "Output format.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "HF output: dtype of the non-FP8 tensors.")
_FP8 = flags.DEFINE_bool("fp8", False, "HF output: projections as FP8 + weight_scale_inv.")
_POW2 = flags.DEFINE_bool("pow2", False, "HF output with --fp8: power-of-two (UE8M0) scales.")
_SHARD_GB = flags.DEFINE_float("shard_gb", 4.0, "HF output: max bytes per safetensors shard, GiB.")
_MTP = flags.DEFINE_enum("mtp", "auto", ["auto", "yes", "no"],
                         "HF input: load the MTP layers if present / require them / drop them.")
_OUTPUT = flags.DEFINE_string("summary_json", None, "Also write the JSON summary to this file.")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json")


def convert(src: str, dst: str, to: str, *, dtype: str = "bfloat16", fp8: bool = False,
            pow2: bool = False, shard_bytes: int = 4 << 30, mtp=None) -> dict:
  """Converts `src` into `dst` in format `to` ("hf" or "orbax"); returns a summary."""
  from dsv3_jax import pretrained

  if os.path.abspath(src) == os.path.abspath(dst):
    raise ValueError("--src and --dst must differ")
  t0 = time.time()
  kind = pretrained.checkpoint_kind(src)
  model = pretrained.from_pretrained(src, mtp=mtp)  # `mtp` matters for HF sources only
  load_s = time.time() - t0
  t0 = time.time()
  if to == "hf":
    summary = pretrained.save_pretrained(model, dst, format="hf", dtype=dtype, fp8=fp8,
                                         pow2=pow2, max_shard_bytes=shard_bytes)
  elif to == "orbax":
    summary = pretrained.save_pretrained(model, dst, format="orbax")
  else:
    raise ValueError(f"to={to!r}: must be 'hf' or 'orbax'")
  for name in _TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
  summary.update(src=src, src_kind=kind, dst=dst, to=to,
                 mtp_depth=model.cfg.num_nextn_predict_layers, load_seconds=load_s,
                 save_seconds=time.time() - t0)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag in (_SRC, _DST, _TO):
    if not flag.value:
      raise app.UsageError(f"--{flag.name} is required")
  if _POW2.value and not _FP8.value:
    raise app.UsageError("--pow2 needs --fp8")
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  mtp = {"auto": None, "yes": True, "no": False}[_MTP.value]
  summary = convert(_SRC.value, _DST.value, _TO.value, dtype=_DTYPE.value, fp8=_FP8.value,
                    pow2=_POW2.value, shard_bytes=int(_SHARD_GB.value * (1 << 30)), mtp=mtp)
  print(json.dumps(summary, indent=1))
  common.write_json(_OUTPUT.value, summary, announce=False)


if __name__ == "__main__":
  sys.exit(app.run(main))
