"""Grain input pipelines over an in-memory token array.

The token array is cut into non-overlapping windows of ``seq_len + 1`` tokens
(the trailing remainder shorter than one window is dropped). Batches are dicts
``{"tokens": int32[local_batch, seq_len + 1]}``; the caller takes inputs
``[:, :-1]`` and targets ``[:, 1:]``.

Training order: window ids are shuffled globally with ``seed`` and repeated
forever, each epoch with its own shuffle (grain reseeds per epoch); consecutive
runs of ``global_batch`` ids form the global batch of a step. Shard ``s`` of
``S`` takes rows ``[s * local_batch, (s + 1) * local_batch)`` of every global
batch, so concatenating the shards' step-i batches in shard order gives exactly
the single-shard step-i batch. This matches how
``jax.make_array_from_process_local_data`` assembles a batch-sharded array.

Everything is index-based (``MapDataset``), so an iterator's state is just the
next step number: ``get_state()`` / ``set_state()`` resume exactly, and the
iterator can be saved by orbax with ``grain.checkpoint.CheckpointSave`` /
``CheckpointRestore``. Reading is single-threaded by default.
"""

from __future__ import annotations

import grain
import numpy as np


def _check_positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def _as_tokens_N(tokens) -> np.ndarray:
  tokens_N = np.asarray(tokens)
  if tokens_N.ndim != 1:
    raise ValueError(f"tokens must be 1-D, got shape {tokens_N.shape}")
  if not np.issubdtype(tokens_N.dtype, np.integer):
    raise ValueError(f"tokens must be integers, got dtype {tokens_N.dtype}")
  return tokens_N.astype(np.int32, copy=False)


def token_windows(tokens, seq_len: int) -> np.ndarray:
  """Non-overlapping windows ``int32[num_windows, seq_len + 1]`` (a view when possible)."""
  seq_len = _check_positive("seq_len", seq_len)
  tokens_N = _as_tokens_N(tokens)
  num_windows = tokens_N.size // (seq_len + 1)
  return tokens_N[: num_windows * (seq_len + 1)].reshape(num_windows, seq_len + 1)


def _check_shard(global_batch: int, shard_index: int, shard_count: int) -> int:
  shard_count = _check_positive("shard_count", shard_count)
  if not isinstance(shard_index, (int, np.integer)) or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index!r}")
  if global_batch % shard_count:
    raise ValueError(f"global_batch {global_batch} must be divisible by shard_count {shard_count}")
  return global_batch // shard_count


class _GatherRows(grain.transforms.Map):
  """Maps a global batch of window ids to this shard's ``{"tokens": ...}`` rows."""

  def __init__(self, windows_WxL1: np.ndarray, row_start: int, row_stop: int):
    self._windows_WxL1 = windows_WxL1
    self._rows = slice(row_start, row_stop)

  def map(self, ids_G):
    ids_B = np.asarray(ids_G)[self._rows]
    return {"tokens": self._windows_WxL1[ids_B]}


def make_train_dataset(
  tokens,
  seq_len: int,
  global_batch: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.MapDataset:
  """The infinite training ``MapDataset``: element ``i`` is this shard's step-``i`` batch."""
  global_batch = _check_positive("global_batch", global_batch)
  local_batch = _check_shard(global_batch, shard_index, shard_count)
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  windows_WxL1 = token_windows(tokens, seq_len)
  num_windows = windows_WxL1.shape[0]
  if num_windows < global_batch:
    raise ValueError(
      f"tokens too short: {np.asarray(tokens).size} tokens give {num_windows} "
      f"windows of seq_len+1={seq_len + 1}, fewer than global_batch={global_batch}"
    )
  start = shard_index * local_batch
  return (
    grain.MapDataset.range(num_windows)
    .shuffle(seed=int(seed))
    .repeat()
    .batch(global_batch, drop_remainder=True)
    .map(_GatherRows(windows_WxL1, start, start + local_batch))
  )


def make_train_iterator(
  tokens,
  seq_len: int,
  global_batch: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
  num_threads: int = 0,
) -> grain.DatasetIterator:
  """An endless, resumable iterator of ``{"tokens": int32[local_batch, seq_len+1]}``.

  ``local_batch = global_batch // shard_count``. ``num_threads=0`` reads in
  the calling thread with no prefetch, which keeps runs predictable; raise it
  to overlap batch assembly with training.
  """
  ds = make_train_dataset(tokens, seq_len, global_batch, seed, shard_index, shard_count)
  if num_threads < 0:
    raise ValueError(f"num_threads must be >= 0, got {num_threads}")
  read_options = grain.ReadOptions(
    num_threads=num_threads, prefetch_buffer_size=0 if num_threads == 0 else 2 * num_threads
  )
  return iter(ds.to_iter_dataset(read_options))


def eval_batches(
  tokens,
  seq_len: int,
  batch: int,
  max_batches: int | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
) -> list[dict[str, np.ndarray]]:
  """Held-out batches of windows spread evenly over ``tokens``, in corpus order (no shuffle).

  Of the W non-overlapping windows, the n = batches x ``batch`` scored are windows i*W//n: a
  capped evaluation (``max_batches``) samples the whole held-out set, not its first files
  (text differs between files, so the first few are a biased sample). Uncapped, at most
  ``batch - 1`` windows are left out. ``batch`` is the global eval batch; with
  ``shard_count > 1`` each shard gets its contiguous block of rows, as in training.
  """
  batch = _check_positive("batch", batch)
  local_batch = _check_shard(batch, shard_index, shard_count)
  if max_batches is not None:
    max_batches = _check_positive("max_batches", max_batches)
  windows_WxL1 = token_windows(tokens, seq_len)
  num_windows = windows_WxL1.shape[0]
  if num_windows == 0:
    raise ValueError(
      f"held-out tokens too short: {np.asarray(tokens).size} tokens, "
      f"one window needs seq_len+1={seq_len + 1}"
    )
  num_batches = num_windows // batch
  if num_batches == 0:
    raise ValueError(
      f"held-out tokens give {num_windows} windows of seq_len+1={seq_len + 1}, "
      f"fewer than one batch of {batch}"
    )
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  n = num_batches * batch
  picked_NxB = (np.arange(n) * num_windows // n).reshape(num_batches, batch)
  start = shard_index * local_batch
  # One gather (a copy) of this shard's rows of every batch.
  rows_NxBxL1 = windows_WxL1[picked_NxB[:, start : start + local_batch]]
  return [{"tokens": rows_BxL1} for rows_BxL1 in rows_NxBxL1]
