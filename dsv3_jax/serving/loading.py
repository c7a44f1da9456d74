"""The model and tokenizer a server runs, from a training workdir, an orbax export or a HF
directory.

  * a training workdir (`experiments/train.py`) or a `save_orbax` export: the latest step
    (or `step`), and the tokenizer the run trained with (`config.data.tokenizer`; the byte
    tokenizer by default), as `experiments/decode.py` loads them;
  * a HF DeepSeek-V3 directory (`config.json` + safetensors): `from_pretrained`, with its
    `tokenizer.json` when there is one, else the byte tokenizer.
"""

import os
from typing import NamedTuple, Optional


class Served(NamedTuple):
  model: object  # a Transformer
  tokenizer: object  # dsv3_jax.data.tokenizer: ByteTokenizer | HFTokenizer
  name: str  # what /v1/models lists
  step: Optional[int]  # the checkpoint step (None for a HF directory)


def load(
  workdir: Optional[str] = None,
  hf_dir: Optional[str] = None,
  step: Optional[int] = None,
  tokenizer: Optional[str] = None,
) -> Served:
  """Exactly one of `workdir` / `hf_dir`; `tokenizer` overrides the one found there."""
  from dsv3_jax.data import load_tokenizer

  if (workdir is None) == (hf_dir is None):
    raise ValueError(
      "give exactly one of workdir (a training workdir or orbax export) and "
      "hf_dir (a HF DeepSeek-V3 directory)"
    )
  if workdir is not None:
    from dsv3_jax.checkpoint.orbax import load_model

    model, cfg, step = load_model(workdir, step)
    tok = load_tokenizer(tokenizer if tokenizer is not None else (cfg.data.tokenizer or None))
    return Served(model, tok, os.path.basename(os.path.normpath(workdir)), step)
  from dsv3_jax.pretrained import from_pretrained

  if step is not None:
    raise ValueError("step applies to orbax checkpoints, not to a HF directory")
  model = from_pretrained(hf_dir)
  if tokenizer is None and os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
    tokenizer = hf_dir
  return Served(model, load_tokenizer(tokenizer), os.path.basename(os.path.normpath(hf_dir)), None)
