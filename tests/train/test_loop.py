"""End-to-end training on the tiny config: one run, resume, NaN handling."""

import math
import os
import re

import jax
import numpy as np
import pytest

from configs import dsv3
from dsv3_jax.checkpoint.orbax import Checkpointer, load_model
from dsv3_jax.train.loop import train_and_evaluate


def _tiny(**train):
  cfg = dsv3.get_config("tiny")
  cfg.train.update(train)
  return cfg


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  return workdir, train_and_evaluate(_tiny(), workdir, progress=False)


def test_one_run_trains_and_checkpoints(full_run):
  workdir, summary = full_run
  losses = [h["loss"] for h in summary["history"]]
  assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
  assert losses[-1] < losses[0]
  assert math.isfinite(summary["heldout_loss"])
  assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 4
  for name in ("metrics.jsonl", "summary.json", "config.json"):
    assert os.path.exists(os.path.join(workdir, name))
  # Router biases moved (aux-loss-free balancing ran) and max_vio was reported per layer.
  bias = summary["state"].biases["moe"]["ffn"]["bias"]
  assert float(np.abs(np.asarray(bias)).max()) > 0
  assert "max_vio/0" in summary["history"][0]


def test_resume_matches_uninterrupted(full_run, tmp_path):
  _, full = full_run
  workdir = str(tmp_path / "resumed")
  first = train_and_evaluate(_tiny(), workdir, max_steps=2, progress=False)
  assert first["steps"] == 2
  second = train_and_evaluate(_tiny(), workdir, progress=False)
  assert second["start_step"] == 2
  want = {h["step"]: h["loss"] for h in full["history"]}
  got = {h["step"]: h["loss"] for h in second["history"]}
  for step in (3, 4):
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5)


def test_load_model_matches_trained_params(full_run):
  workdir, summary = full_run
  model, cfg, step = load_model(workdir)
  assert step == 4
  tokens = np.arange(16, dtype=np.int32)[None] % cfg.model.vocab_size
  from flax import nnx

  trained = nnx.merge(summary["trainer"].graphdef, summary["state"].params, summary["state"].biases)
  np.testing.assert_allclose(
    np.asarray(model(tokens)), np.asarray(trained(tokens)), rtol=1e-5, atol=1e-5
  )


def test_nan_stops_without_overwriting_checkpoint(tmp_path):
  workdir = str(tmp_path / "nan")
  # Warmup starts at lr 0, so step 1 is sound; a few steps later the weights overflow.
  with pytest.raises(FloatingPointError, match="loss is") as err:
    train_and_evaluate(
      _tiny(learning_rate=1e38, warmup_steps=2, checkpoint_every=1, steps=6),
      workdir,
      progress=False,
    )
  bad_step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
  assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == bad_step - 1
  model, _, _ = load_model(workdir)
  from flax import nnx

  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(bool(jax.numpy.isfinite(p).all()) for p in params)


def test_bad_vocab_for_tokenizer(tmp_path):
  cfg = _tiny()
  cfg.model.vocab_size = 128
  with pytest.raises(ValueError, match=r"model\.vocab_size"):
    train_and_evaluate(cfg, str(tmp_path / "v"), progress=False)
