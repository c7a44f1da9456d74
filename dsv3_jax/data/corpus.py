"""Text corpora: which files, how they are split, and how they become tokens.

The default corpus is the Python standard library's own ``.py`` sources on the
running machine: always present, a few tens of MB, real structured text, and
needing no download. Any other corpus is given as a comma-separated spec of
files, directories and globs.

The train/held-out split is by file, decided by a stable hash of each file's
path relative to the files' common root, so it does not depend on where the
corpus lives, on the file order, or on the Python hash seed.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import sys
import sysconfig
from pathlib import Path
from typing import Sequence

import numpy as np

TEXT_SUFFIXES = (".txt", ".py", ".md")
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def _venv_roots() -> list[Path]:
  """Prefixes of the active virtual environment, if any, to keep out of corpora."""
  if sys.prefix != sys.base_prefix:
    return [Path(sys.prefix).resolve()]
  return []


def _walk_files(root: Path, suffixes: Sequence[str]) -> list[Path]:
  """Files under ``root`` with one of ``suffixes``, sorted, symlinked dirs not followed.

  Skips site-/dist-packages, ``__pycache__`` and any directory that is a
  virtual environment (holds a ``pyvenv.cfg``).
  """
  venvs = _venv_roots()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    here = Path(dirpath)
    dirnames[:] = sorted(
      d
      for d in dirnames
      if d not in _EXCLUDED_DIRS
      and not (here / d / "pyvenv.cfg").exists()
      and (here / d).resolve() not in venvs
    )
    out.extend(here / f for f in filenames if f.endswith(tuple(suffixes)))
  return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def default_corpus_files() -> list[Path]:
  """The standard library's ``.py`` files on this machine, sorted by relative path."""
  root = Path(sysconfig.get_paths()["stdlib"])
  files = [p for p in _walk_files(root, (".py",)) if p.is_file()]
  if not files:
    raise RuntimeError(f"no standard-library .py files found under {root}")
  return files


def resolve_files(spec: str | None) -> list[Path]:
  """Expands a corpus spec into a list of files.

  ``None`` or ``""`` give ``default_corpus_files()``. Otherwise ``spec`` is a
  comma-separated list whose items are files, directories (searched
  recursively for ``*.txt``, ``*.py``, ``*.md``) or glob patterns (``**``
  allowed). Items are expanded in order, each expansion sorted, duplicates
  dropped. An item that matches nothing raises ``FileNotFoundError``.
  """
  if spec is None or not str(spec).strip():
    return default_corpus_files()
  files: list[Path] = []
  seen: set[Path] = set()
  for item in (s.strip() for s in str(spec).split(",")):
    if not item:
      continue
    path = Path(item).expanduser()
    if path.is_dir():
      matches = _walk_files(path, TEXT_SUFFIXES)
    elif path.is_file():
      matches = [path]
    elif glob.has_magic(item):
      matches = []
      for m in sorted(glob.glob(str(path), recursive=True)):
        m = Path(m)
        matches.extend(_walk_files(m, TEXT_SUFFIXES) if m.is_dir() else [m])
    else:
      raise FileNotFoundError(f"corpus item {item!r}: no such file or directory")
    if not matches:
      raise FileNotFoundError(f"corpus item {item!r} matched no text files")
    for m in matches:
      key = m.resolve()
      if key not in seen:
        seen.add(key)
        files.append(m)
  if not files:
    raise FileNotFoundError(f"corpus spec {spec!r} matched no files")
  return files


def _hash_unit(key: str) -> float:
  """A stable hash of ``key`` mapped to [0, 1)."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(
  files: Sequence[str | os.PathLike],
  heldout_fraction: float = 0.05,
  seed: int = 0,
) -> tuple[list[Path], list[Path]]:
  """Splits ``files`` into ``(train, heldout)`` by a stable hash of each file.

  A file is held out when the hash of ``"{seed}:{relative path}"`` (relative
  to the files' common root, POSIX form) falls below ``heldout_fraction``.
  With two or more files neither side is left empty: the file with the lowest
  (highest) hash is moved over if needed. Both lists keep the input order.
  """
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
  paths = [Path(f) for f in files]
  if not paths:
    raise ValueError("files is empty")
  if len(paths) == 1:
    return paths, []
  absolute = [os.path.abspath(p) for p in paths]
  root = os.path.commonpath(absolute)
  if os.path.isfile(root):
    root = os.path.dirname(root)
  keys = [Path(os.path.relpath(a, root)).as_posix() for a in absolute]
  scores = [_hash_unit(f"{seed}:{k}") for k in keys]
  held = [s < heldout_fraction for s in scores]
  if not any(held):
    held[min(range(len(paths)), key=lambda i: (scores[i], keys[i]))] = True
  if all(held):
    held[max(range(len(paths)), key=lambda i: (scores[i], keys[i]))] = False
  train = [p for p, h in zip(paths, held) if not h]
  heldout = [p for p, h in zip(paths, held) if h]
  return train, heldout


def load_tokens(
  files: Sequence[str | os.PathLike],
  tokenizer,
  max_bytes: int | None = None,
) -> np.ndarray:
  """Tokenizes ``files`` in order into one int32 array, each document + EOS.

  Files are read as bytes and decoded as UTF-8 (invalid bytes replaced). With
  ``max_bytes`` at most that many bytes are read in total: the file that
  crosses the limit is truncated and later files are skipped.
  """
  if max_bytes is not None and max_bytes <= 0:
    raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
  eos_1 = np.asarray([tokenizer.eos_id], dtype=np.int32)
  pieces = []
  budget = math.inf if max_bytes is None else int(max_bytes)
  for f in files:
    if budget <= 0:
      break
    with open(f, "rb") as fh:
      data = fh.read() if budget == math.inf else fh.read(int(budget))
    budget -= len(data)
    pieces.append(tokenizer.encode_array(data.decode("utf-8", errors="replace")))
    pieces.append(eos_1)
  if not pieces:
    raise ValueError("no files to load")
  return np.concatenate(pieces).astype(np.int32, copy=False)


def unigram_entropy(tokens, vocab_size: int) -> float:
  """Entropy in nats/token of the token frequency distribution of ``tokens``.

  This is the loss of the best context-free (unigram) predictor fitted to the
  same tokens: a baseline that a language model's held-out loss should beat.
  """
  tokens_N = np.asarray(tokens).reshape(-1)
  if tokens_N.size == 0:
    raise ValueError("tokens is empty")
  if tokens_N.min() < 0 or tokens_N.max() >= vocab_size:
    raise ValueError(f"tokens must lie in [0, {vocab_size})")
  counts_V = np.bincount(tokens_N, minlength=vocab_size).astype(np.float64)
  p_V = counts_V[counts_V > 0] / tokens_N.size
  return float(-(p_V * np.log(p_V)).sum())
