"""One orbax layout for training checkpoints and model exports; corrupted steps, orphans."""

import glob
import logging as py_logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dsv3
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax import pretrained
from dsv3_jax.checkpoint import orbax as orbax_lib
from dsv3_jax.checkpoint.orbax import Checkpointer


class _State(NamedTuple):  # the train state's structure
  params: Any
  biases: Any
  opt_state: Any
  step: Any


@pytest.fixture(scope="module")
def tiny():
  cfg = config_lib.from_dict(dsv3.get_config("tiny"))
  return cfg, model_lib.create(cfg.model, seed=3)


def _tokens(cfg):
  return (np.arange(24, dtype=np.int32).reshape(2, 12) * 7) % cfg.model.vocab_size


def _split(model):
  _, params, biases = nnx.split(model, nnx.Param, ...)
  return nnx.to_pure_dict(params), nnx.to_pure_dict(biases)


def _corrupt(step_dir: str):
  """Truncates every file of a finished step to half its length."""
  files = [f for f in glob.glob(os.path.join(step_dir, "**"), recursive=True) if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def test_export_is_the_training_layout(tiny, tmp_path):
  cfg, model = tiny
  out = str(tmp_path / "export")
  pretrained.save_pretrained(model, out, format="orbax")
  # The Checkpointer's layout: numbered steps holding the `state` and `meta` items.
  assert sorted(os.listdir(out)) == ["0"]
  assert {"state", "meta"} <= set(os.listdir(os.path.join(out, "0")))
  ckpt = Checkpointer(out, read_only=True)
  assert ckpt.all_steps() == [0]
  meta = ckpt.restore_meta(0)
  ckpt.close()
  assert config_lib.from_dict(meta["config"]).model == cfg.model
  assert pretrained.checkpoint_kind(out) == "orbax"
  back = pretrained.from_pretrained(out)
  tok = _tokens(cfg)
  np.testing.assert_array_equal(
    np.asarray(pretrained.logits(back, tok)), np.asarray(pretrained.logits(model, tok))
  )


def test_load_model_reads_a_train_state_without_building_a_trainer(tiny, tmp_path, monkeypatch):
  cfg, model = tiny
  params, biases = _split(model)
  opt = jax.tree.map(lambda p: jnp.full(p.shape, 7.0, jnp.bfloat16), params)
  state = _State(params, biases, (opt, opt), jnp.asarray(5, jnp.int32))
  directory = str(tmp_path / "run" / "checkpoints")
  ckpt = Checkpointer(directory, async_save=False)
  ckpt.save(5, state, meta={"step": 5, "config": config_lib.to_dict(cfg)})
  ckpt.close()

  from dsv3_jax.train import step as step_lib

  def no_trainer(*args, **kwargs):
    raise AssertionError("load_model built a Trainer")

  monkeypatch.setattr(step_lib.Trainer, "__init__", no_trainer)
  # Both the workdir and its checkpoint directory load, from one loader.
  for path in (str(tmp_path / "run"), directory):
    loaded, loaded_cfg, step = orbax_lib.load_model(path)
    assert step == 5 and loaded_cfg.model == cfg.model
    got, want = _split(loaded), _split(model)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  assert pretrained.checkpoint_kind(directory) == "orbax"
  with pytest.raises(FileNotFoundError, match="step 4 not in"):
    orbax_lib.load_model(directory, step=4)
  with pytest.raises(FileNotFoundError, match="no orbax checkpoint step"):
    orbax_lib.load_model(str(tmp_path))


def test_load_model_onto_given_shardings(tiny, tmp_path):
  cfg, model = tiny
  out = str(tmp_path / "export")
  pretrained.save_orbax(model, out)
  device = jax.devices()[1]
  loaded, _, _ = orbax_lib.load_model(out, shardings=jax.sharding.SingleDeviceSharding(device))
  assert all(x.devices() == {device} for x in jax.tree.leaves(_split(loaded)))

  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "expert"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  experts = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "expert"))
  # A prefix tree: routed experts of the stacked MoE layers split over `expert`.
  params = _split(model)[0]
  place = jax.tree.map(lambda _: repl, params)
  for name in ("w1", "w2", "w3"):
    place["moe"]["ffn"][name] = experts
  _, state, _ = orbax_lib.load_model_state(out, shardings={"params": place, "biases": repl})
  assert state["params"]["moe"]["ffn"]["w1"].sharding == experts
  assert state["params"]["embed"].sharding == repl
  assert state["biases"]["moe"]["ffn"]["bias"].sharding == repl
  jax.tree.map(np.testing.assert_array_equal, state["params"], params)
  with pytest.raises(ValueError, match="load_model shardings"):
    orbax_lib.load_model(out, shardings={"params": repl})
  # A mesh: the training placements on it.
  _, state, _ = orbax_lib.load_model_state(out, shardings=mesh)
  w1 = state["params"]["moe"]["ffn"]["w1"]
  assert w1.sharding.shard_shape(w1.shape)[1] == cfg.model.n_routed_experts // 4
  assert state["params"]["embed"].sharding.is_fully_replicated
  jax.tree.map(np.testing.assert_array_equal, state["params"], params)


def _small_state(value: float):
  return {"w": jnp.full((4, 3), value), "b": {0: jnp.full((3,), value)}}


def test_restore_latest_falls_back_past_a_corrupted_step(tmp_path, caplog):
  directory = str(tmp_path / "ckpt")
  ckpt = Checkpointer(directory, keep=5)
  for step in (1, 2, 3):
    ckpt.save(step, _small_state(step), meta={"step": step})
  ckpt.close()
  _corrupt(os.path.join(directory, "3"))

  ckpt = Checkpointer(directory, keep=5)
  with caplog.at_level(py_logging.WARNING):
    step, state, meta = ckpt.restore_latest(_small_state(0.0))
  assert step == 2 and meta == {"step": 2}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 2.0))
  warning = " ".join(r.getMessage() for r in caplog.records)
  assert f"checkpoint step 3 in {directory} does not restore" in warning
  # The broken step is set aside, so step 3 can be saved again.
  assert ckpt.all_steps() == [1, 2]
  assert os.path.isdir(os.path.join(directory + ".corrupt", "3"))
  ckpt.save(3, _small_state(30.0), meta={"step": 3})
  ckpt.wait()
  assert ckpt.restore_latest(_small_state(0.0))[0] == 3
  ckpt.close()


def test_restore_latest_raises_when_no_step_restores(tmp_path):
  directory = str(tmp_path / "ckpt")
  ckpt = Checkpointer(directory)
  for step in (1, 2):
    ckpt.save(step, _small_state(step))
  ckpt.close()
  for step in (1, 2):
    _corrupt(os.path.join(directory, str(step)))
  ckpt = Checkpointer(directory)
  with pytest.raises(ValueError, match=r"no checkpoint in .* restores \(steps \[1, 2\]\)"):
    ckpt.restore_latest(_small_state(0.0))
  ckpt.close()
  assert Checkpointer(str(tmp_path / "empty")).restore_latest(_small_state(0.0)) is None


def test_orphaned_tmp_directories_are_removed(tmp_path, caplog):
  directory = str(tmp_path / "ckpt")
  ckpt = Checkpointer(directory)
  ckpt.save(1, _small_state(1.0))
  ckpt.close()
  orphan = os.path.join(directory, "2.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(orphan, "state"))
  with open(os.path.join(orphan, "state", "junk"), "w") as f:
    f.write("half a save")
  ckpt = Checkpointer(directory)
  with caplog.at_level(py_logging.WARNING):
    assert ckpt.remove_orphaned_tmp() == ["2.orbax-checkpoint-tmp"]
  assert not os.path.exists(orphan)
  assert any(
    "orphaned temporary checkpoint directory 2.orbax-checkpoint-tmp" in r.getMessage()
    for r in caplog.records
  )
  ckpt.save(2, _small_state(2.0))
  ckpt.close()
  assert Checkpointer(directory).all_steps() == [1, 2]
