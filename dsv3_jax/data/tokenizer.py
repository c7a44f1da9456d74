"""Tokenizers: a dependency-free byte tokenizer and a `tokenizers` wrapper.

Both expose the same small interface used by the corpus and training code:

  * ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``
  * ``encode(text, add_bos=False) -> list[int]``
  * ``encode_array(text) -> np.ndarray[int32]``  (fast path for corpora)
  * ``encode_batch(texts, add_bos=False) -> list[list[int]]``
  * ``decode(ids) -> str``  (special tokens skipped; ids are range-checked)

``load_tokenizer(spec)`` picks one from a command-line style spec.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# Special-token names tried, in order, when a tokenizer.json does not say
# which tokens mark the beginning and end of a document.
DEFAULT_BOS_NAMES = (
  "<｜begin▁of▁sentence｜>",
  "<|begin_of_text|>",
  "<s>",
  "<bos>",
  "<|bos|>",
  "<|endoftext|>",
)
DEFAULT_EOS_NAMES = (
  "<｜end▁of▁sentence｜>",
  "<|end_of_text|>",
  "</s>",
  "<eos>",
  "<|eos|>",
  "<|endoftext|>",
)
DEFAULT_PAD_NAMES = ("<｜▁pad▁｜>", "<pad>", "<|pad|>", "[PAD]")


def _check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
  """Returns ``ids`` as a list of Python ints; raises on any out-of-range id."""
  ids_N = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
  ids_N = ids_N.reshape(-1)
  bad_N = ids_N[(ids_N < 0) | (ids_N >= vocab_size)]
  if bad_N.size:
    raise ValueError(f"token id {int(bad_N[0])} is outside [0, {vocab_size})")
  return ids_N.tolist()


class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0..255 are bytes, then BOS, EOS and PAD."""

  bos_id = 256
  eos_id = 257
  pad_id = 258
  vocab_size = 259

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [self.bos_id] + ids if add_bos else ids

  def encode_array(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
    return [self.encode(t, add_bos=add_bos) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    ids = _check_ids(ids, self.vocab_size)
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=259)"


def _find_token(vocab: dict[str, int], names: Sequence[str]) -> int | None:
  for name in names:
    if name in vocab:
      return vocab[name]
  return None


class HFTokenizer:
  """Wraps a ``tokenizers.Tokenizer`` loaded from a tokenizer.json file.

  Args:
    path: a tokenizer.json file, or a directory holding one.
    bos_token / eos_token / pad_token: exact special-token strings to use;
      when None the common names in ``DEFAULT_*_NAMES`` are tried in order.
      BOS and EOS must exist; PAD falls back to EOS.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
  ):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError("HFTokenizer needs the `tokenizers` package") from e
    path = Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(str(path))
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    vocab = self._tok.get_vocab(with_added_tokens=True)

    def pick(kind: str, given: str | None, names: Sequence[str]) -> int | None:
      if given is not None:
        if given not in vocab:
          raise ValueError(f"{kind} token {given!r} is not in the vocabulary of {path}")
        return vocab[given]
      return _find_token(vocab, names)

    bos = pick("bos", bos_token, DEFAULT_BOS_NAMES)
    eos = pick("eos", eos_token, DEFAULT_EOS_NAMES)
    if bos is None or eos is None:
      missing = "bos" if bos is None else "eos"
      names = DEFAULT_BOS_NAMES if bos is None else DEFAULT_EOS_NAMES
      raise ValueError(
        f"{path}: no {missing} token found (tried {list(names)}); "
        f"pass {missing}_token= with the right special-token string"
      )
    pad = pick("pad", pad_token, DEFAULT_PAD_NAMES)
    self.bos_id, self.eos_id = int(bos), int(eos)
    self.pad_id = int(eos if pad is None else pad)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return [self.bos_id] + ids if add_bos else list(ids)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [([self.bos_id] if add_bos else []) + list(e.ids) for e in encs]

  def decode(self, ids: Iterable[int]) -> str:
    ids = _check_ids(ids, self.vocab_size)
    return self._tok.decode(ids, skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str | os.PathLike | None = None, **kwargs) -> Tokenizer:
  """Returns a tokenizer from a spec.

  ``None``, ``""`` or ``"byte"`` give a ``ByteTokenizer``; anything else must be
  a tokenizer.json file (or a directory holding one) and gives an
  ``HFTokenizer`` (``kwargs`` are passed to it).
  """
  if spec is None or str(spec).strip() in ("", "byte", "bytes"):
    return ByteTokenizer()
  path = Path(spec)
  if path.is_dir():
    if not (path / "tokenizer.json").is_file():
      raise FileNotFoundError(f"directory {path} has no tokenizer.json")
    return HFTokenizer(path, **kwargs)
  if not path.exists():
    raise FileNotFoundError(
      f"tokenizer spec {str(spec)!r} is neither 'byte' nor an existing tokenizer.json"
    )
  if path.suffix != ".json":
    raise ValueError(f"tokenizer file must be a tokenizer.json, got {path}")
  return HFTokenizer(path, **kwargs)
