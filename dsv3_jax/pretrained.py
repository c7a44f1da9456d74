"""`from_pretrained(path)`: a ready DeepSeek-V3 model from a HF directory or an orbax checkpoint.

    model = dsv3_jax.from_pretrained("path/to/DeepSeek-V3-like")   # config.json + safetensors
    logits_BxLxV = model(tokens_BxL)                                # int ids -> float32 logits

Three kinds of `path` are recognised:
  * a Hugging Face DeepSeek-V3 directory (`config.json` with `model_type`, `*.safetensors`),
    BF16 / float32 or FP8 with `weight_scale_inv` (dequantized by 128x128 blocks);
  * an orbax checkpoint directory: a model export written by `save_orbax` or a training
    run's `checkpoints/` (one layout, `dsv3_jax.checkpoint.orbax`), its latest step;
  * a training workdir of `experiments/train.py` (`config.json` + `checkpoints/`), its latest
    step.
Parameters are float32 masters whatever the checkpoint's precision. `fp8=True` runs every
projection as DeepSeek-V3's fine-grained FP8 dot (`matmul_precision="fp8"`); for an FP8
checkpoint the 128x128 blocks re-derived from the dequantized weights hold the very FP8
values the checkpoint stored (scales equal up to float32 rounding). `dtype` is the
activation dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax import config as config_lib
from dsv3_jax.checkpoint import hf as hf_lib
from dsv3_jax.config import ModelConfig


def checkpoint_kind(path: str) -> str:
  """'hf', 'orbax' (a checkpoint directory: a `save_orbax` export or a run's `checkpoints/`)
  or 'workdir' (a training run); else raises."""
  from dsv3_jax.checkpoint import orbax as orbax_lib

  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such checkpoint directory")
  if orbax_lib.checkpoint_dir(path) == path:
    return "orbax"
  cfg_path = os.path.join(path, "config.json")
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      cfg = json.load(f)
    if "model_type" in cfg or "hidden_size" in cfg:
      return "hf"
    if "model" in cfg and os.path.isdir(os.path.join(path, "checkpoints")):
      return "workdir"
  raise ValueError(
    f"{path}: neither a HF directory (config.json + *.safetensors), an "
    "orbax checkpoint directory (numbered steps, e.g. from `save_orbax`) nor a "
    "training workdir (config.json + checkpoints/)"
  )


def _settings(fp8: bool, dtype) -> dict:
  dtype = str(jnp.dtype(dtype))
  if dtype not in config_lib.DTYPES:
    raise ValueError(f"from_pretrained dtype={dtype!r}: must be one of {config_lib.DTYPES}")
  return {"dtype": dtype, "matmul_precision": "fp8" if fp8 else "fp32"}


def from_pretrained(
  path: str, *, fp8: bool = False, dtype="float32", mtp: Optional[bool] = None, **overrides
):
  """Loads a DeepSeek-V3 `Transformer`: `model(tokens [B, L] int) -> logits [B, L, V]` float32.

  Args:
    path: a HF directory, a `save_orbax` directory or a training workdir (module docstring).
    fp8: run the projections as FP8 dots with 128x128 weight blocks (else float32 dots).
    dtype: activation dtype, "float32" or "bfloat16".
    mtp: HF only. None loads the MTP layers when present; True requires them; False drops them.
    **overrides: further ModelConfig fields (e.g. `expert_block_size=16`).
  """
  settings = dict(_settings(fp8, dtype), **overrides)
  kind = checkpoint_kind(path)
  if kind == "hf":
    return hf_lib.load_hf(path, mtp=mtp, **settings)
  cfg, state = load_orbax_state(path)  # an orbax export or a training workdir
  cfg = dataclasses.replace(cfg, **settings).validate()
  return hf_lib.model_from_state(cfg, state)


def save_pretrained(model, path: str, *, format: str = "hf", **kwargs) -> dict:
  """Writes `model` as a HF directory (`format="hf"`, see `hf.save_hf_state` for kwargs:
  dtype, fp8, pow2, max_shard_bytes) or a `save_orbax` directory (`format="orbax"`)."""
  if format == "hf":
    return hf_lib.save_hf(model, path, **kwargs)
  if format == "orbax":
    return save_orbax(model, path, **kwargs)
  raise ValueError(f"save_pretrained format={format!r}: must be 'hf' or 'orbax'")


# ----------------------------------------------------------------------------- orbax
def save_orbax(model, path: str, step: int = 0) -> dict:
  """Exports the model's parameters and router biases as step `step` of the orbax checkpoint
  directory `path`, in the training checkpoints' layout (`dsv3_jax.checkpoint.orbax`): a
  `state` item {"params", "biases"} and a `meta` item with the model config."""
  from dsv3_jax.checkpoint import orbax as orbax_lib

  return orbax_lib.save_model(model, path, step)


def load_orbax_state(
  path: str, step: Optional[int] = None, *, shardings=None
) -> tuple[ModelConfig, dict]:
  """(cfg, {"params", "biases"}) of an orbax checkpoint directory or a training workdir (its
  latest step by default), placed by `shardings` (`orbax.load_model_state`; one device by
  default)."""
  from dsv3_jax.checkpoint import orbax as orbax_lib

  cfg, state, _ = orbax_lib.load_model_state(path, step, shardings=shardings)
  return cfg.model, state


# ----------------------------------------------------------------------------- inspection
def hidden_states(model, tokens_BxL: jax.Array) -> list[jax.Array]:
  """[embedding output, output of block 0, ..., output of the last block (before the final
  norm)]: the main model layer by layer, to localise a numerical difference. The model's own
  walk (`forward(hidden_states=True)`), one jitted program per model structure."""
  graphdef, state = nnx.split(model)
  return _hidden_states(graphdef, state, tokens_BxL)


@functools.partial(jax.jit, static_argnums=0)
def _hidden_states(graphdef, state, tokens_BxL):
  return nnx.merge(graphdef, state).forward(tokens_BxL, hidden_states=True).hidden_states


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens_BxL):
  return nnx.merge(graphdef, state)(tokens_BxL)


def logits(model, tokens_BxL: jax.Array) -> jax.Array:
  """`model(tokens)` as one jitted program, compiled once per model structure and shape."""
  graphdef, state = nnx.split(model)
  return _logits(graphdef, state, tokens_BxL)


__all__ = [
  "from_pretrained",
  "save_pretrained",
  "save_orbax",
  "load_orbax_state",
  "checkpoint_kind",
  "hidden_states",
  "logits",
]
