"""End-to-end training on the tiny config: one run, resume, NaN handling."""

import dataclasses
import json
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


def _budget_run(workdir, budget, **kw):
  cfg = _tiny(steps=40, warmup_steps=4, time_budget_s=budget, checkpoint_every=5, eval_every=40)
  return train_and_evaluate(cfg, workdir, progress=False, **kw)


def test_steps_in_budget():
  from dsv3_jax import config as config_lib
  from dsv3_jax.train import loop

  tcfg = config_lib.from_dict(_tiny(steps=100, time_budget_s=100.0)).train
  # 10 steps done in 20 s, 1 s per step: 90% of the 80 s left.
  assert loop._steps_in_budget(tcfg, 10, 1.0, 20.0, 0.9) == 82
  assert loop._steps_in_budget(dataclasses.replace(tcfg, steps=50), 10, 1.0, 20.0, 0.9) == 50
  assert loop._steps_in_budget(tcfg, 10, 1.0, 150.0, 0.9) == 10  # spent: stop here


def test_time_budget_sets_the_run_length_and_its_schedule(tmp_path, monkeypatch):
  """The budget's count (20 of at most 40 steps; fixed here, so the test does not hang on
  this machine's speed) ends the run, and the steps after it follow a schedule spanning
  20 steps: the same warmup, then the shorter decay — with no second compile."""
  from dsv3_jax import config as config_lib
  from dsv3_jax.train import loop
  from dsv3_jax.train.optimizer import learning_rate_schedule

  seen, trainers = [], []
  monkeypatch.setattr(loop, "_steps_in_budget", lambda *a: seen.append(a) or 20)
  make = loop._make_trainer
  monkeypatch.setattr(loop, "_make_trainer", lambda *a: trainers.append(make(*a)) or trainers[-1])
  workdir = str(tmp_path / "budget")
  summary = _budget_run(workdir, 60.0)
  ((tcfg, done, step_s, elapsed_s, margin),) = seen  # the run ends before the second window
  assert done == 10 and step_s > 0 and elapsed_s > 0 and margin == loop._BUDGET_MARGIN
  assert summary["steps"] == 20
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["steps"] == 20
  lr = {h["step"]: h["learning_rate"] for h in summary["history"]}
  long = learning_rate_schedule(tcfg)
  short = learning_rate_schedule(dataclasses.replace(tcfg, steps=20))
  np.testing.assert_allclose(lr[4], short(3), rtol=1e-6)  # warmup: the same either way
  for step in (15, 20):  # logged with the step's own learning rate, schedule(step - 1)
    np.testing.assert_allclose(lr[step], short(step - 1), rtol=1e-6)
    assert abs(float(short(step - 1)) - float(long(step - 1))) > 1e-4
  (trainer,) = trainers
  assert trainer.step_fn._cache_size() == 1  # one compiled step for both schedules


@pytest.mark.parametrize("schedule", ["report", "cosine"])
def test_time_budget_refines_the_length_while_it_is_free(tmp_path, monkeypatch, schedule):
  """Every 50 steps the budget sets the length again while the learning rate does not depend
  on it: under `report` (constant until 67.6% of the run) the count set at step 10 (100) is
  replaced at step 50 (by 80), and the steps follow each schedule in turn; under `cosine` past
  its warmup the first count stays."""
  from dsv3_jax.train import loop
  from dsv3_jax.train.optimizer import learning_rate_schedule

  seen = []
  monkeypatch.setattr(
    loop, "_steps_in_budget", lambda *a: seen.append(a) or (100, 80)[len(seen) > 1]
  )
  cfg = _tiny(steps=120, warmup_steps=4, time_budget_s=60.0, checkpoint_every=200, eval_every=200)
  cfg.train.lr_schedule = schedule
  summary = train_and_evaluate(cfg, str(tmp_path / schedule), progress=False)
  assert [a[1] for a in seen] == [10, 50]
  assert [a[4] for a in seen] == [loop._BUDGET_MARGIN, loop._BUDGET_MARGIN_LATE]
  lr = {h["step"]: h["learning_rate"] for h in summary["history"]}
  tcfg = seen[0][0]
  first = learning_rate_schedule(dataclasses.replace(tcfg, steps=100))
  final = 80 if schedule == "report" else 100
  assert summary["steps"] == final
  last = learning_rate_schedule(dataclasses.replace(tcfg, steps=final))
  np.testing.assert_allclose(lr[50], first(49), rtol=1e-6)
  np.testing.assert_allclose(lr[final], last(final - 1), rtol=1e-6)
  if schedule == "report":  # the change moved nothing: the peak until 67.6% of 80 steps
    assert lr[47] == lr[51] == pytest.approx(tcfg.learning_rate)


def test_time_budget_length_survives_a_resume(tmp_path):
  """A budget that fits all 40 steps sets 40; a run stopped at step 12 and resumed with a
  budget that would fit none keeps the 40 its checkpoint recorded."""
  workdir = str(tmp_path / "resumed")
  first = _budget_run(workdir, 1e6, max_steps=12)
  assert first["steps"] == 12
  second = _budget_run(workdir, 1e-3)
  assert second["start_step"] == 12 and second["steps"] == 40
