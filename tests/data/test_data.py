"""Tests for dsv3_jax.data: tokenizers, corpus handling and grain pipelines."""

import json

import numpy as np
import pytest

from dsv3_jax.data import (
  ByteTokenizer,
  HFTokenizer,
  default_corpus_files,
  eval_batches,
  load_tokenizer,
  load_tokens,
  make_train_iterator,
  resolve_files,
  split_files,
  unigram_entropy,
)


def _toy_tokens(n=5000, vocab=97, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.int32)


def _take(it, k):
  return [next(it)["tokens"] for _ in range(k)]


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_roundtrip_unicode():
  tok = ByteTokenizer()
  text = "héllo wörld — 你好, мир 🚀\n\ttabs"
  ids = tok.encode(text)
  assert all(0 <= i < 256 for i in ids)
  assert len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  with_bos = tok.encode(text, add_bos=True)
  assert with_bos[0] == tok.bos_id == 256
  assert tok.decode(with_bos + [tok.eos_id, tok.pad_id]) == text
  assert tok.encode_batch(["a", "é"]) == [[97], [0xC3, 0xA9]]
  assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (259, 257, 258)
  np.testing.assert_array_equal(tok.encode_array(text), np.asarray(ids, np.int32))


def test_byte_tokenizer_decode_rejects_bad_ids():
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="259"):
    tok.decode([1, 2, 259])
  with pytest.raises(ValueError, match="-1"):
    tok.decode(np.array([-1, 3]))
  assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 is replaced, not raised


def test_load_tokenizer_specs(tmp_path):
  for spec in (None, "", "byte"):
    assert isinstance(load_tokenizer(spec), ByteTokenizer)
  with pytest.raises(FileNotFoundError):
    load_tokenizer(str(tmp_path / "missing.json"))
  with pytest.raises(FileNotFoundError):
    load_tokenizer(str(tmp_path))  # a directory without tokenizer.json
  not_json = tmp_path / "vocab.txt"
  not_json.write_text("x")
  with pytest.raises(ValueError):
    load_tokenizer(str(not_json))


def test_hf_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  model = tokenizers.models.WordLevel(unk_token="<unk>")
  hf = tokenizers.Tokenizer(model)
  hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  hf.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
  trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
  hf.train_from_iterator(["the cat sat", "the dog sat on the mat"], trainer=trainer)
  path = tmp_path / "tokenizer.json"
  hf.save(str(path))

  tok = load_tokenizer(str(path))
  assert isinstance(tok, HFTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True)
  ids = tok.encode("the cat sat on the mat", add_bos=True)
  assert ids[0] == tok.bos_id and len(ids) == 7
  assert tok.decode(ids + [tok.eos_id]) == "the cat sat on the mat"
  assert tok.encode_batch(["the cat", "dog"]) == [tok.encode("the cat"), tok.encode("dog")]
  with pytest.raises(ValueError, match=str(tok.vocab_size)):
    tok.decode([tok.vocab_size])
  assert isinstance(load_tokenizer(str(tmp_path)), HFTokenizer)  # directory form
  with pytest.raises(ValueError, match="eos"):
    HFTokenizer(path, eos_token="<missing>")

  # A tokenizer with no recognisable BOS/EOS names is a clear error.
  bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
  bare_path = tmp_path / "bare.json"
  bare.save(str(bare_path))
  with pytest.raises(ValueError, match="bos"):
    HFTokenizer(bare_path)


# -------------------------------------------------------------------- corpus


def test_default_corpus_nonempty_and_deterministic():
  files = default_corpus_files()
  assert len(files) > 50
  assert files == default_corpus_files()
  assert all(f.suffix == ".py" and f.is_file() for f in files)
  assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)
  assert resolve_files("") == files and resolve_files(None) == files


def test_resolve_files(tmp_path):
  (tmp_path / "sub").mkdir()
  for name in ("a.txt", "b.md", "sub/c.py", "sub/d.bin"):
    (tmp_path / name).write_text(name)
  found = resolve_files(str(tmp_path))
  assert [f.relative_to(tmp_path).as_posix() for f in found] == ["a.txt", "b.md", "sub/c.py"]
  assert resolve_files(f"{tmp_path / 'sub' / 'c.py'},{tmp_path}/*.txt") == [
    tmp_path / "sub" / "c.py",
    tmp_path / "a.txt",
  ]
  with pytest.raises(FileNotFoundError):
    resolve_files(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError):
    resolve_files(str(tmp_path / "*.json"))


def test_split_deterministic_and_disjoint(tmp_path):
  files = [tmp_path / f"doc{i:03d}.txt" for i in range(200)]
  train, held = split_files(files, heldout_fraction=0.1, seed=0)
  rev_train, rev_held = split_files(list(reversed(files)), 0.1, 0)
  assert set(rev_held) == set(held) and set(rev_train) == set(train)  # order-independent
  assert (train, held) == split_files(files, heldout_fraction=0.1, seed=0)
  assert set(train).isdisjoint(held) and set(train) | set(held) == set(files)
  assert 5 <= len(held) <= 40
  assert split_files(files, 0.1, seed=1) != (train, held)
  # The split depends on paths relative to the common root, not on the root.
  moved = [tmp_path / "elsewhere" / f.name for f in files]
  assert [f.name for f in split_files(moved, 0.1, 0)[1]] == [f.name for f in held]
  # Never empty on either side with >= 2 files.
  for fraction in (1e-9, 1 - 1e-9):
    tr, he = split_files(files[:2], fraction)
    assert len(tr) == 1 and len(he) == 1
  with pytest.raises(ValueError, match="heldout_fraction"):
    split_files(files, 0.0)


def test_heldout_files_do_not_follow_the_training_seed(tmp_path):
  """A noise floor (another train.seed) is scored on the same held-out files; split_seed moves them."""
  from dsv3_jax import config as config_lib
  from dsv3_jax.train.loop import load_corpus

  for i in range(60):
    (tmp_path / f"mod{i:02d}.py").write_text(f"def f{i}():\n  return {i}\n" * (i + 1))

  def heldout(train_seed, split_seed):
    cfg = config_lib.from_dict(
      {"train": {"seed": train_seed}, "data": {"path": str(tmp_path), "split_seed": split_seed}}
    )
    return load_corpus(cfg).heldout_tokens

  base = heldout(0, 0)
  np.testing.assert_array_equal(heldout(1, 0), base)
  assert not np.array_equal(heldout(0, 1), base)


def test_load_tokens_and_cap(tmp_path):
  tok = ByteTokenizer()
  (tmp_path / "a.txt").write_text("héllo")
  (tmp_path / "b.txt").write_text("abc")
  files = resolve_files(str(tmp_path))
  tokens = load_tokens(files, tok)
  assert tokens.dtype == np.int32
  assert tokens.tolist() == tok.encode("héllo") + [257] + tok.encode("abc") + [257]
  capped = load_tokens(files, tok, max_bytes=3)
  assert capped.tolist() == [ord("h"), 0xC3, 0xA9, 257]
  np.testing.assert_array_equal(load_tokens(files, tok, max_bytes=3), capped)


def test_unigram_entropy_matches_numpy():
  tokens = np.array([0, 1, 1, 2, 2, 2, 2, 5], dtype=np.int32)
  p = np.array([1, 2, 4, 1]) / 8
  assert unigram_entropy(tokens, 6) == pytest.approx(-(p * np.log(p)).sum(), abs=1e-12)
  assert unigram_entropy(np.zeros(10, np.int32), 3) == 0.0
  uniform = np.arange(256).repeat(3)
  assert unigram_entropy(uniform, 256) == pytest.approx(np.log(256))
  with pytest.raises(ValueError):
    unigram_entropy(tokens, 5)


def test_default_corpus_tokens_small_slice():
  tok = ByteTokenizer()
  tokens = load_tokens(default_corpus_files(), tok, max_bytes=200_000)
  assert 200_000 <= tokens.size < 210_000
  # Source code is far from uniform over bytes but not trivial either.
  assert 2.0 < unigram_entropy(tokens, tok.vocab_size) < np.log(256)


# ------------------------------------------------------------------ pipeline


def test_train_iterator_shapes_and_determinism():
  tokens = _toy_tokens()
  a = make_train_iterator(tokens, seq_len=15, global_batch=8, seed=3)
  b = make_train_iterator(tokens, seq_len=15, global_batch=8, seed=3)
  batches_a, batches_b = _take(a, 5), _take(b, 5)
  for x, y in zip(batches_a, batches_b):
    assert x.shape == (8, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x, y)
  other = _take(make_train_iterator(tokens, 15, 8, seed=4), 1)[0]
  assert not np.array_equal(other, batches_a[0])


def test_train_iterator_epochs_cover_all_windows_reshuffled():
  num_windows, seq_len = 24, 3
  tokens = np.arange(num_windows * (seq_len + 1) + 2, dtype=np.int32)  # +2: dropped tail
  it = make_train_iterator(tokens, seq_len, global_batch=6, seed=0)
  rows = np.concatenate(_take(it, 8))  # two epochs of 24 windows
  starts = rows[:, 0] // (seq_len + 1)
  np.testing.assert_array_equal(
    rows, tokens[starts[:, None] * (seq_len + 1) + np.arange(seq_len + 1)]
  )
  epoch0, epoch1 = starts[:num_windows], starts[num_windows:]
  assert sorted(epoch0) == list(range(num_windows)) == sorted(epoch1)
  assert not np.array_equal(epoch0, epoch1)
  assert not np.array_equal(epoch0, np.arange(num_windows))


def test_train_iterator_resume_via_state():
  tokens = _toy_tokens()
  reference = _take(make_train_iterator(tokens, 15, 8, seed=7), 10)
  it = make_train_iterator(tokens, 15, 8, seed=7)
  _take(it, 4)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON, as in a checkpoint
  restored = make_train_iterator(tokens, 15, 8, seed=7)
  restored.set_state(state)
  for want, got in zip(reference[4:], _take(restored, 6)):
    np.testing.assert_array_equal(want, got)


def test_train_iterator_orbax_checkpoint(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain

  tokens = _toy_tokens()
  it = make_train_iterator(tokens, 15, 8, seed=2)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path, item_names=("data",)) as mgr:
    mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
  restored = make_train_iterator(tokens, 15, 8, seed=2)
  with ocp.CheckpointManager(tmp_path, item_names=("data",)) as mgr:
    mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for want, got in zip(_take(it, 3), _take(restored, 3)):
    np.testing.assert_array_equal(want, got)


@pytest.mark.parametrize("shard_count", [2, 4])
def test_sharded_batches_concatenate_to_unsharded(shard_count):
  tokens = _toy_tokens()
  full = _take(make_train_iterator(tokens, 15, 8, seed=5), 7)
  shards = [
    _take(make_train_iterator(tokens, 15, 8, seed=5, shard_index=s, shard_count=shard_count), 7)
    for s in range(shard_count)
  ]
  for step in range(7):
    parts = [shards[s][step] for s in range(shard_count)]
    assert parts[0].shape == (8 // shard_count, 16)
    np.testing.assert_array_equal(np.concatenate(parts), full[step])


def test_eval_batches_deterministic():
  tokens = np.arange(100, dtype=np.int32)
  batches = eval_batches(tokens, seq_len=4, batch=3)  # 20 windows -> 6 full batches
  assert len(batches) == 6
  assert batches[0]["tokens"].tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
  again = eval_batches(tokens, 4, 3)
  for x, y in zip(batches, again):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  capped = eval_batches(tokens, 4, 3, max_batches=2)
  assert len(capped) == 2
  # A capped evaluation samples windows from the whole held-out set, the last ones included.
  starts = np.concatenate([b["tokens"][:, 0] for b in capped]).tolist()
  assert starts == [0, 15, 30, 50, 65, 80]
  halves = [eval_batches(tokens, 4, 4, shard_index=s, shard_count=2) for s in range(2)]
  np.testing.assert_array_equal(
    np.concatenate([halves[0][1]["tokens"], halves[1][1]["tokens"]]),
    eval_batches(tokens, 4, 4)[1]["tokens"],
  )
  with pytest.raises(ValueError, match="too short"):
    eval_batches(np.arange(4), seq_len=4, batch=1)
  with pytest.raises(ValueError, match="fewer than one batch"):
    eval_batches(np.arange(10), seq_len=4, batch=3)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(seq_len=0), "seq_len"),
    (dict(global_batch=0), "global_batch"),
    (dict(global_batch=6, shard_count=4), "global_batch"),
    (dict(shard_count=0), "shard_count"),
    (dict(shard_count=2, shard_index=2), "shard_index"),
    (dict(seq_len=100, global_batch=64), "tokens"),
    (dict(seed=-1), "seed"),
  ],
)
def test_train_iterator_bad_arguments(kwargs, name):
  args = dict(tokens=_toy_tokens(1000), seq_len=15, global_batch=8, seed=0) | kwargs
  with pytest.raises(ValueError, match=name):
    make_train_iterator(**args)
