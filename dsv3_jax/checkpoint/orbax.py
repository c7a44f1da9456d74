"""Orbax checkpoints: one layout for training runs and model exports, and one model loader.

A checkpoint directory holds numbered steps (`<dir>/<step>/`), each with up to three items:
  * `state`: the train state (params, router biases, optimizer state, step) of a training
    run, or only {"params", "biases"} for a model export (`save_model`);
  * `data`: the grain iterator, so a resumed run sees exactly the batches it would have seen
    (training only);
  * `meta`: JSON, `{"step", "config"}` with the config as `config.to_dict` writes it (a model
    export's holds the `model` section only) and any facts the writer adds.
The float32 master weights and the router biases are what the DeepSeek-V3 report
(arXiv 2412.19437, §3.3) keeps in full precision; they are saved as they are.

Saves are asynchronous; orbax writes `<step>.orbax-checkpoint-tmp` and renames it when
complete, so a crash mid-save never leaves a checkpoint that looks finished, only an orphaned
temporary directory (`remove_orphaned_tmp` deletes those at the start of a run). A finished
step that no longer restores (truncated or corrupted files) is skipped by `restore_latest`,
which falls back to the newest step that does. Restoring onto a target with other shardings
reshards; `load_model` restores only the params and biases, onto one device or the given
shardings, whatever else the step holds.
"""

import contextlib
import functools
import logging as py_logging
import os
import shutil
import time
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ("state", "data", "meta")
CHECKPOINTS = "checkpoints"  # a training workdir's checkpoint directory


def _sync(name: str):
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name)


@contextlib.contextmanager
def _absl_without(prefix: str):
  """Drops absl log records starting with `prefix` (orbax's routine notices) meanwhile."""
  drop = lambda record: not record.getMessage().startswith(prefix)
  absl_logger = py_logging.getLogger("absl")
  absl_logger.addFilter(drop)
  try:
    yield
  finally:
    absl_logger.removeFilter(drop)


@functools.cache
def _write_whole_arrays() -> None:
  """Saves each array from one replica, whole, in a one-process job (once per process).

  Orbax's default (replica-parallel saving) has every replica of a replicated array write a
  slice of it, so that several hosts share the writing. In one process that shares nothing
  and costs one small XLA program per distinct slice, compiled on the first save: 10.4 s for
  the small config's train state on 8 CPU devices, against 0.2 s written whole. A multi-process
  job keeps orbax's default. The handler is orbax's process-wide one for `jax.Array`.
  """
  if jax.process_count() == 1:
    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    with _absl_without("Type handler registry"):  # orbax warns about any override
      ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class Checkpointer:
  """Saves and restores numbered steps of `directory` (module docstring for the layout).

  `read_only=True` never writes, creates or deletes anything (for loading a model).
  """

  def __init__(
    self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False
  ):
    self.directory = os.path.abspath(directory)
    if read_only:
      if not os.path.isdir(self.directory):
        raise FileNotFoundError(f"{self.directory}: no such checkpoint directory")
      options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, enable_async_checkpointing=False, save_interval_steps=0
      )
    else:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
      )
      _write_whole_arrays()
    with _absl_without("Given directory is read only"):  # on every read-only open
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def remove_orphaned_tmp(self) -> list[str]:
    """Deletes the temporary directories of saves that never finished (a killed run).

    Call it at the start of a run, before any save of this process is in flight: an
    asynchronous save of a live run writes into such a directory too. Returns the names.
    """
    names = sorted(ocp.path.step.tmp_checkpoints(self.directory))
    if jax.process_index() == 0:
      for name in names:
        logging.warning(
          "removing orphaned temporary checkpoint directory %s in %s (a save that never finished)",
          name,
          self.directory,
        )
        shutil.rmtree(os.path.join(self.directory, name))
    _sync("dsv3_remove_orphaned_tmp")
    self.manager.reload()
    return names

  def save(self, step: int, state: Any, data_iterator=None, meta: Optional[dict] = None):
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if not self.manager.save(step, args=ocp.args.Composite(**items)):
      raise ValueError(
        f"checkpoint step {step} was not saved in {self.directory}: orbax "
        f"refuses steps at or before its latest ({self.latest_step()})"
      )

  def restore(self, step: int, target_state: Any, data_iterator=None):
    """Restores onto `target_state` (arrays or ShapeDtypeStructs with shardings)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._restore(step, items)
    return restored["state"], restored["meta"]

  def restore_latest(self, target_state: Any, data_iterator=None):
    """(step, state, meta) of the newest step that restores; None when there is no step.

    A step that fails to restore (truncated or corrupted files) is logged as a warning naming
    it and moved out of the way, into `<directory>.corrupt/<step>`, and the step before is
    tried: the run resumes from there and its next saves reuse those step numbers. Raises
    ValueError, naming every step and its error, when no step restores.
    """
    steps = self.all_steps()
    failures = []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, target_state, data_iterator)
      except ValueError as e:
        cause = e.__cause__ or e
        logging.warning(
          "checkpoint step %d in %s does not restore (%s: %s); trying the step before",
          step,
          self.directory,
          type(cause).__name__,
          cause,
        )
        failures.append((step, e))
        continue
      if failures:
        self.set_aside([s for s, _ in failures], "corrupt", "unrestorable")
      return step, state, meta
    if failures:
      detail = "; ".join(f"step {s}: {e}" for s, e in failures)
      raise ValueError(f"no checkpoint in {self.directory} restores (steps {steps}): {detail}")
    return None

  def set_aside(self, steps: list[int], suffix: str, why: str):
    """Moves steps out of the checkpoint directory into `<directory>.<suffix>/`, so their
    numbers can be saved again (orbax skips a save at or before the latest step it lists) and
    they stay there to inspect. `why` is for the log line."""
    aside = f"{self.directory}.{suffix}"
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        dest = os.path.join(aside, str(step))
        if os.path.exists(dest):
          dest += f"-{int(time.time())}"
        shutil.move(os.path.join(self.directory, str(step)), dest)
        logging.warning("moved %s checkpoint step %d of %s to %s", why, step, self.directory, dest)
    _sync("dsv3_set_aside_checkpoints")
    self.manager.reload()

  def restore_meta(self, step: int) -> dict:
    return self._restore(step, {"meta": ocp.args.JsonRestore()})["meta"]

  def restore_model_state(self, step: int, target: dict) -> dict:
    """Only `target`'s part ({"params", "biases"} ShapeDtypeStructs with shardings) of the
    step's `state`: the optimizer state of a training step is never read."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
    return self._restore(step, {"state": args})["state"]

  def _restore(self, step: int, items: dict):
    if step not in self.manager.all_steps():
      raise FileNotFoundError(
        f"checkpoint step {step} not in {self.directory} (steps {self.all_steps()})"
      )
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types; name the checkpoint in one clear error
      raise ValueError(
        f"cannot restore checkpoint step {step} from {self.directory}: {type(e).__name__}: {e}"
      ) from e

  def delete(self, step: int):
    self.manager.delete(step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------- models
def checkpoint_dir(path: str) -> Optional[str]:
  """The checkpoint directory of `path`: `path` itself when it holds orbax steps (a model
  export or a workdir's `checkpoints/`), `path/checkpoints` of a training workdir; else None."""
  for d in (path, os.path.join(path, CHECKPOINTS)):
    if os.path.isdir(d) and ocp.path.step.checkpoint_steps(d):
      return d
  return None


def _model_target(cfg, shardings):
  """(graphdef, abstract params State, abstract biases State, restore target), from shapes:
  nothing is allocated. `shardings` as in `load_model_state`."""
  from flax import nnx

  from dsv3_jax import model as model_lib

  # Params, then the rest: the router biases (a `Transformer` holds nothing else).
  graphdef, params, biases = nnx.split(model_lib.abstract(cfg), nnx.Param, ...)
  shapes = {"params": nnx.to_pure_dict(params), "biases": nnx.to_pure_dict(biases)}
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if isinstance(shardings, jax.sharding.Mesh):  # the training placements on that mesh
    from dsv3_jax.parallel import sharding as sharding_lib

    mesh = shardings
    shardings = {
      "params": sharding_lib.shardings(mesh, sharding_lib.param_specs(params)),
      "biases": sharding_lib.replicated(mesh),
    }
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  place = lambda sh, sub: jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), sub
  )
  try:
    target = jax.tree.map(place, shardings, shapes, is_leaf=is_sharding)
  except ValueError as e:
    raise ValueError(
      "load_model shardings: must be None, a Sharding, a Mesh or a "
      "{'params', 'biases'} tree of Shardings (or a prefix of it) matching the "
      f"model's parameters: {e}"
    ) from e
  bad = [x for x in jax.tree.leaves(target) if not isinstance(x, jax.ShapeDtypeStruct)]
  if bad:
    raise ValueError(f"load_model shardings: expected Shardings as leaves, got {bad[:3]}")
  return graphdef, params, biases, target


def _load(path: str, step: Optional[int], shardings):
  import json

  from dsv3_jax import config as config_lib

  directory = checkpoint_dir(path)
  if directory is None:
    raise FileNotFoundError(
      f"{path} holds no orbax checkpoint step (neither a checkpoint "
      f"directory nor a training workdir with {CHECKPOINTS}/)"
    )
  ckpt = Checkpointer(directory, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    meta = ckpt.restore_meta(step)
    config = meta.get("config")
    workdir_cfg = os.path.join(os.path.dirname(directory), "config.json")
    if config is None and os.path.exists(workdir_cfg):  # a training step without config meta
      with open(workdir_cfg) as f:
        config = json.load(f)
    if config is None:
      raise ValueError(
        f"checkpoint step {step} in {directory} has no config in its `meta` "
        "item and no config.json beside it"
      )
    cfg = config_lib.from_dict(config)
    graphdef, params, biases, target = _model_target(cfg.model, shardings)
    state = ckpt.restore_model_state(step, target)
  finally:
    ckpt.close()
  return cfg, state, step, (graphdef, params, biases)


def load_model_state(path: str, step: Optional[int] = None, *, shardings=None):
  """(Config, {"params", "biases"}, step) of a checkpoint directory, a model export or a
  training workdir (its latest step by default). Only the params and router biases are read:
  the target is built from the config's abstract model, nothing else is allocated.

  `shardings` places the arrays: None (the first device), one `Sharding` for every array, a
  `Mesh` (the training placements there: routed experts split over its `expert` axis, the
  rest replicated), or a {"params", "biases"} tree of Shardings or any prefix of it. Raises
  FileNotFoundError / ValueError naming what is missing or broken.
  """
  cfg, state, step, _ = _load(path, step, shardings)
  return cfg, state, step


def load_model(path: str, step: Optional[int] = None, *, shardings=None):
  """The model of a checkpoint (`load_model_state` for the arguments) as a `Transformer`.

  Returns (model, Config, step); the config's mesh is set to one device.
  """
  from flax import nnx

  from dsv3_jax import config as config_lib

  cfg, state, step, (graphdef, params, biases) = _load(path, step, shardings)
  nnx.replace_by_pure_dict(params, state["params"])
  nnx.replace_by_pure_dict(biases, state["biases"])
  cfg = config_lib.replace(cfg, parallel={"data": 1, "expert": 1, "pipe": 1})
  return nnx.merge(graphdef, params, biases), cfg, step


def save_model(model, path: str, step: int = 0, meta: Optional[dict] = None) -> dict:
  """Exports a `Transformer`'s params and router biases as step `step` of the checkpoint
  directory `path` (the training layout, without optimizer state or data), its config in
  `meta`. An existing step of that number is replaced."""
  import dataclasses

  from flax import nnx

  _, params, biases = nnx.split(model, nnx.Param, ...)  # params, router biases
  state = {"params": nnx.to_pure_dict(params), "biases": nnx.to_pure_dict(biases)}
  ckpt = Checkpointer(path, keep=None, async_save=False)
  try:
    if step in ckpt.all_steps():
      ckpt.delete(step)
    meta = dict(
      meta or {},
      format="dsv3_jax.model",
      step=step,
      config={"model": dataclasses.asdict(model.cfg)},
    )
    ckpt.save(step, state, meta=meta)
  finally:
    ckpt.close()
  n = sum(x.size for x in jax.tree.leaves(state))
  return {"parameters": int(n), "path": path, "step": step}
