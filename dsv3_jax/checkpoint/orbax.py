"""Training checkpoints with orbax: train state, data-iterator state and metadata together.

A checkpoint holds three items: `state` (params, router biases, optimizer state, step),
`data` (the grain iterator, so a resumed run sees exactly the batches it would have seen)
and `meta` (the config and a few facts, as JSON). Saves are asynchronous; orbax writes into
a temporary directory and renames it when complete, so a crash mid-save never leaves a
checkpoint that looks finished. Restoring onto a target with other shardings reshards.
"""

import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator=None, meta: Optional[dict] = None):
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, step: int, target_state: Any, data_iterator=None):
    """Restores onto `target_state` (arrays or ShapeDtypeStructs with shardings)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types; name the checkpoint in one clear error
      raise ValueError(f"cannot restore checkpoint step {step} from {self.directory}: "
                       f"{type(e).__name__}: {e}") from e
    return restored["state"], restored["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def load_model(workdir: str, step: Optional[int] = None):
  """The trained model of a `train_and_evaluate` workdir, on one device.

  Returns (model, Config, step). Raises FileNotFoundError / ValueError naming what is
  missing or broken.
  """
  import json

  from flax import nnx

  from dsv3_jax import config as config_lib
  from dsv3_jax.config import ParallelConfig
  from dsv3_jax.parallel import mesh as mesh_lib
  from dsv3_jax.train.step import Trainer

  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{workdir} has no config.json: not a training workdir")
  with open(cfg_path) as f:
    cfg = config_lib.from_dict(json.load(f))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir} has no checkpoint to load")
  cfg = config_lib.replace(cfg, parallel={"data": 1, "expert": 1, "pipe": 1})
  mesh = mesh_lib.make_mesh(ParallelConfig(data=1, expert=1, pipe=1), jax.devices()[:1])
  trainer = Trainer(cfg, mesh)
  state, _ = ckpt.restore(step, trainer.abstract_state())
  ckpt.close()
  model = nnx.merge(trainer.graphdef, state.params, state.biases)
  return model, cfg, step
