"""The device mesh and the ONE table mapping logical axes to mesh axes.

Mesh axes: `data` (data parallel), `expert` (expert parallel; the batch is split over
data x expert), `pipe` (pipeline stages). Every parameter carries logical axis names
(`axes=` metadata on its nnx.Param); `logical_to_mesh` below is the only place that decides
where each of them lives.
"""

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dsv3_jax.config import ParallelConfig

AXES = ("data", "expert", "pipe")
BATCH = ("data", "expert")  # the batch is split over both

# logical axis -> mesh axis (None = replicated). Parameters are replicated over `data`
# (ZeRO-1 shards only the optimizer state); `layers` is the stacked-layer axis.
RULES = {
    "batch": BATCH,
    "layers": None,
    "vocab": None,
    "embed": None,
    "heads": None,
    "q_lora": None,
    "kv_lora": None,
    "mlp": None,
    "norm": None,
    "mtp_in": None,
    "experts_gate": None,
    "expert": None,
    "expert_mlp": None,
}


def mesh_shape(cfg: ParallelConfig, n_devices: int) -> tuple[int, int, int]:
  sizes = [cfg.data, cfg.expert, cfg.pipe]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(f"parallel mesh: {n_devices} devices are not divisible by the fixed axes "
                       f"(data, expert, pipe) = {tuple(sizes)}")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(f"parallel mesh: data x expert x pipe = {sizes[0]} x {sizes[1]} x "
                     f"{sizes[2]} = {math.prod(sizes)} does not match {n_devices} devices")
  return tuple(sizes)


def make_mesh(cfg: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def batch_size_per_step(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["expert"]


def logical_to_mesh(axes: Sequence[str | None], ndim: int) -> P:
  """PartitionSpec for a parameter with these logical axes (stacked axes are `layers`)."""
  lead = ("layers",) * (ndim - len(axes))
  spec = []
  for name in tuple(lead) + tuple(axes):
    if name is not None and name not in RULES:
      raise ValueError(f"logical axis {name!r} has no sharding rule in parallel/mesh.py")
    spec.append(RULES.get(name) if name else None)
  return P(*spec)


def param_specs(state) -> dict:
  """Pure-dict tree of PartitionSpecs for an nnx State whose Variables carry `axes`."""
  from flax import nnx, traverse_util

  flat = {}
  for path, v in state.flat_state():
    axes = v.get_metadata().get("axes")
    flat[path] = logical_to_mesh(axes, v.get_value().ndim) if axes else P()
  return traverse_util.unflatten_dict(flat)


def shardings(mesh: Mesh, specs) -> object:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
