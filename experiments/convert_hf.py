r"""Converts DeepSeek-V3 checkpoints between the Hugging Face layout and orbax.

  # HF directory (BF16 or FP8 safetensors) -> orbax model checkpoint
  python -m experiments.convert_hf --src=path/to/hf_dir --dst=ckpt/model --to=orbax
  # a training workdir (or an orbax model checkpoint) -> HF directory, BF16
  python -m experiments.convert_hf --src=runs/small --dst=export/small --to=hf
  # ... or FP8 with 128x128 weight_scale_inv blocks, power-of-two scales
  python -m experiments.convert_hf --src=runs/small --dst=export/small_fp8 --to=hf --fp8 --pow2

The conversion is `dsv3_jax.checkpoint.convert.convert`: the HF side is read and written one
tensor at a time (`dsv3_jax/checkpoint/hf.py`); the orbax side holds the parameters and
router biases with the model config (`dsv3_jax.pretrained.save_orbax`), and
`dsv3_jax.from_pretrained` reads either. A source's `tokenizer.json` (and its config), when
present, is copied along. Prints a JSON summary.
"""

import json
import sys

from absl import app, flags

from experiments import common

_SRC = flags.DEFINE_string("src", None, "HF directory, orbax model directory or training workdir.")
_DST = flags.DEFINE_string("dst", None, "Output directory.")
_TO = flags.DEFINE_enum("to", None, ["hf", "orbax"], "Output format.")
_DTYPE = flags.DEFINE_enum(
  "dtype", "bfloat16", ["bfloat16", "float32"], "HF output: dtype of the non-FP8 tensors."
)
_FP8 = flags.DEFINE_bool("fp8", False, "HF output: projections as FP8 + weight_scale_inv.")
_POW2 = flags.DEFINE_bool("pow2", False, "HF output with --fp8: power-of-two (UE8M0) scales.")
_SHARD_GB = flags.DEFINE_float("shard_gb", 4.0, "HF output: max bytes per safetensors shard, GiB.")
_MTP = flags.DEFINE_enum(
  "mtp",
  "auto",
  ["auto", "yes", "no"],
  "HF input: load the MTP layers if present / require them / drop them.",
)
_OUTPUT = flags.DEFINE_string("summary_json", None, "Also write the JSON summary to this file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag in (_SRC, _DST, _TO):
    if not flag.value:
      raise app.UsageError(f"--{flag.name} is required")
  if _POW2.value and not _FP8.value:
    raise app.UsageError("--pow2 needs --fp8")
  common.quiet_logs()
  import jax

  jax.config.update("jax_threefry_partitionable", True)
  from dsv3_jax.checkpoint.convert import convert

  mtp = {"auto": None, "yes": True, "no": False}[_MTP.value]
  summary = convert(
    _SRC.value,
    _DST.value,
    _TO.value,
    dtype=_DTYPE.value,
    fp8=_FP8.value,
    pow2=_POW2.value,
    shard_bytes=int(_SHARD_GB.value * (1 << 30)),
    mtp=mtp,
  )
  print(json.dumps(summary, indent=1))
  common.write_json(_OUTPUT.value, summary, announce=False)


if __name__ == "__main__":
  sys.exit(app.run(main))
