"""Data: tokenizers, text corpora and deterministic, resumable grain pipelines."""

from dsv3_jax.data.corpus import (
  default_corpus_files,
  load_tokens,
  resolve_files,
  split_files,
  unigram_entropy,
)
from dsv3_jax.data.pipeline import (
  eval_batches,
  make_train_dataset,
  make_train_iterator,
  token_windows,
)
from dsv3_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
  "ByteTokenizer",
  "HFTokenizer",
  "default_corpus_files",
  "eval_batches",
  "load_tokenizer",
  "load_tokens",
  "make_train_dataset",
  "make_train_iterator",
  "resolve_files",
  "split_files",
  "token_windows",
  "unigram_entropy",
]
