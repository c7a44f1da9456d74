"""Training faults on the tiny config: a corrupted latest checkpoint, orphaned temporary
saves, and non-finite steps got past with the restart options `skip_batches` / `lr_scale`."""

import glob
import json
import logging as py_logging
import math
import os
import re

import numpy as np
import pytest

from configs import dsv3
from dsv3_jax import config as config_lib
from dsv3_jax import data as data_lib
from dsv3_jax.checkpoint.orbax import Checkpointer
from dsv3_jax.train import loop
from dsv3_jax.train.loop import train_and_evaluate


def _tiny(**train):
  cfg = dsv3.get_config("tiny")
  cfg.train.update(train)
  return cfg


def _metric_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r["step"] for r in records if "loss" in r], records


def test_resume_skips_a_corrupted_latest_step_and_removes_orphans(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  first = train_and_evaluate(_tiny(steps=3, checkpoint_every=1), workdir, progress=False)
  directory = os.path.join(workdir, "checkpoints")
  assert Checkpointer(directory).all_steps() == [1, 2, 3]
  for f in glob.glob(os.path.join(directory, "3", "**"), recursive=True):
    if os.path.isfile(f):
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  orphan = os.path.join(directory, "4.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(orphan, "state"))

  with caplog.at_level(py_logging.WARNING):
    second = train_and_evaluate(_tiny(steps=4, checkpoint_every=1), workdir, progress=False)
  log = "\n".join(r.getMessage() for r in caplog.records)
  assert f"checkpoint step 3 in {directory} does not restore" in log
  assert "orphaned temporary checkpoint directory 4.orbax-checkpoint-tmp" in log
  assert not os.path.exists(orphan)
  assert second["start_step"] == 2 and second["steps"] == 4
  # Step 3 was trained again from step 2, as the first run trained it.
  losses = {h["step"]: h["loss"] for h in second["history"]}
  np.testing.assert_allclose(losses[3], first["history"][2]["loss"], rtol=1e-5)
  assert math.isfinite(losses[4])
  assert Checkpointer(directory).all_steps() == [2, 3, 4]
  assert os.path.isdir(directory + ".corrupt/3")
  # metrics.jsonl reads as one run: the first run's step 3 was dropped and written again.
  steps, _ = _metric_steps(workdir)
  assert steps == [1, 2, 3, 4]


def test_skip_batches_gets_past_a_poisoned_batch(tmp_path, monkeypatch):
  cfg = config_lib.from_dict(_tiny())
  corpus = loop.load_corpus(cfg)
  it = data_lib.make_train_iterator(
    corpus.train_tokens, cfg.train.seq_len, cfg.train.global_batch, seed=cfg.train.seed
  )
  batches = [next(it)["tokens"] for _ in range(4)]
  seen = []
  to_global = loop._to_global

  def poisoned(batch, sharding):  # the third batch holds ids outside the vocabulary: NaN
    seen.append(batch["tokens"])
    if np.array_equal(batch["tokens"], batches[2]):
      batch = dict(batch, tokens=np.full_like(batch["tokens"], cfg.model.vocab_size + 7))
    return to_global(batch, sharding)

  monkeypatch.setattr(loop, "_to_global", poisoned)
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError) as err:
    train_and_evaluate(_tiny(checkpoint_every=1), workdir, progress=False)
  msg = str(err.value)
  assert re.search(r"at step 3\b", msg)
  assert "last good checkpoint, step 2" in msg
  assert "--config.train.skip_batches=3" in msg and "lr_scale" in msg

  seen.clear()
  summary = train_and_evaluate(_tiny(checkpoint_every=1, skip_batches="3"), workdir, progress=False)
  assert summary["start_step"] == 2 and summary["steps"] == 4
  assert all(math.isfinite(h["loss"]) for h in summary["history"])
  assert not any(np.array_equal(s, batches[2]) for s in seen)
  assert np.array_equal(seen[0], batches[3])  # step 3 trained on the next batch
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ckpt.restore_meta(4)["skipped_batches"] == [[3, 3]]
  ckpt.close()


def test_skip_windows_apply_once_and_only_ahead():
  windows = config_lib.TrainConfig(skip_batches="5-6,9").validate().skip_windows()
  assert windows == ((5, 6), (9, 9))
  assert loop._skip_batches(windows, [], 4) == {5: (6, 2), 9: (9, 1)}
  assert loop._skip_batches(windows, [[5, 6]], 7) == {9: (9, 1)}  # applied before
  with pytest.raises(ValueError, match=r"window 5-6: the run resumes after step 5"):
    loop._skip_batches(windows, [], 5)
  with pytest.raises(ValueError, match=r"train\.skip_batches"):
    config_lib.TrainConfig(skip_batches="6-5").validate()


def test_lr_scale_and_resume_step_get_past_a_diverging_run(tmp_path):
  workdir = str(tmp_path / "run")
  # Warmup starts at lr 0, so step 1 is sound; the steps after blow the weights up until, a
  # step or two later, they overflow: the last checkpoint's weights are already off, so the
  # restart rolls back to step 1 as well as lowering the learning rate.
  blowup = dict(learning_rate=1e38, warmup_steps=2, checkpoint_every=1)
  with pytest.raises(FloatingPointError) as err:
    train_and_evaluate(_tiny(**blowup), workdir, progress=False)
  msg = str(err.value)
  bad = int(re.search(r"at step (\d+)", msg).group(1))
  assert bad in (2, 3) and f"last good checkpoint, step {bad - 1}" in msg
  assert "--config.train.lr_scale=" in msg and "--config.train.resume_step=" in msg
  restart = _tiny(**blowup, lr_scale=1e-41, resume_step=1)  # peak 1e-3
  summary = train_and_evaluate(restart, workdir, progress=False)
  assert summary["start_step"] == 1 and summary["steps"] == 4
  assert all(math.isfinite(h["loss"]) for h in summary["history"])
  assert 0 < summary["history"][0]["learning_rate"] <= 1e-3
  directory = os.path.join(workdir, "checkpoints")
  ckpt = Checkpointer(directory, read_only=True)
  assert ckpt.restore_meta(4)["rolled_back_to"] == [1]
  ckpt.close()
  assert sorted(os.listdir(directory + ".rolled_back")) == [str(s) for s in range(2, bad)]
  # The same flags again: the rollback is not repeated.
  restart.train.steps = 5
  again = train_and_evaluate(restart, workdir, progress=False)
  assert again["start_step"] == 4 and again["steps"] == 5


def test_resume_step_must_name_a_checkpoint(tmp_path):
  with pytest.raises(ValueError, match=r"train\.resume_step` = 3: .* holds no checkpoint"):
    train_and_evaluate(_tiny(resume_step=3), str(tmp_path / "run"), progress=False)


@pytest.mark.parametrize("bad", [None, np.inf, -np.inf, np.nan])
def test_all_finite(bad):
  """The train step's check of the new parameters: any inf or NaN in any leaf, and only that
  (the largest finite float32 values do not overflow it), makes the step non-finite."""
  import jax.numpy as jnp

  from dsv3_jax.train.step import all_finite

  big = np.finfo(np.float32).max
  tree = {"a": np.full((3, 4), big, np.float32), "b": [np.ones(5, np.float32), np.zeros(2)]}
  if bad is not None:
    tree["b"][0][3] = bad
  tree = {"a": jnp.asarray(tree["a"]), "b": [jnp.asarray(x) for x in tree["b"]]}
  assert bool(all_finite(tree)) is (bad is None)
