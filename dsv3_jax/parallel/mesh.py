"""The device mesh: axes `data` (data parallel), `expert` (expert parallel; the batch is
split over data x expert) and `pipe` (pipeline stages).

Where each piece of the model and its state lives on this mesh is decided in one place,
`parallel/sharding.py` (the sharding plan); this file only builds meshes.
"""

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from dsv3_jax.config import ParallelConfig

AXES = ("data", "expert", "pipe")
BATCH = ("data", "expert")  # the batch is split over both


def mesh_shape(cfg: ParallelConfig, n_devices: int) -> tuple[int, int, int]:
  sizes = [cfg.data, cfg.expert, cfg.pipe]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(
        f"parallel mesh: {n_devices} devices are not divisible by the fixed axes "
        f"(data, expert, pipe) = {tuple(sizes)}"
      )
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(
      f"parallel mesh: data x expert x pipe = {sizes[0]} x {sizes[1]} x "
      f"{sizes[2]} = {math.prod(sizes)} does not match {n_devices} devices"
    )
  return tuple(sizes)


def make_mesh(
  cfg: ParallelConfig, devices: Sequence[jax.Device] | None = None, *, explicit: bool = False
) -> Mesh:
  """A (data, expert, pipe) mesh over `devices` (default: all of them, every process's).

  Axis types are Auto (the compiler propagates shardings from the ones we declare) unless
  `explicit=True` asks for JAX's explicit-sharding mode deliberately.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(kind,) * 3)


def batch_size_per_step(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["expert"]
