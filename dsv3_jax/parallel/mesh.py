"""The device mesh and the ONE table mapping logical axes to mesh axes.

Mesh axes: `data` (data parallel), `expert` (expert parallel; the batch is split over
data x expert), `pipe` (pipeline stages). Every parameter carries logical axis names
(`axes=` metadata on its nnx.Param); `logical_to_mesh` below is the only place that decides
where each of them lives, and `zero1_spec` the only place that decides how optimizer state
is split further (ZeRO-1).

Placement, in one table:
  parameter                       params            optimizer state (ZeRO-1)
  dense (attention, MLPs, embed)  replicated        split over data x expert
  routed experts [.., E, D, F]    E over `expert`   E over `expert`, another dim over `data`
  router bias                     replicated        (not optimised)
The batch is split over data x expert, so every device is a data-parallel replica for the
dense parameters, and the `data` ranks are the replicas of each expert shard.
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
# (ZeRO-1 shards only the optimizer state); `layers` is the stacked-layer axis; routed
# experts live on the `expert` axis (E / expert experts per rank).
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
    "expert": "expert",
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


def make_mesh(cfg: ParallelConfig, devices: Sequence[jax.Device] | None = None, *,
              explicit: bool = False) -> Mesh:
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
  from flax import traverse_util

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


# ----------------------------------------------------------------------------- ZeRO-1
def _spec_axes(spec: P) -> set:
  used = set()
  for entry in spec:
    if entry is None:
      continue
    used.update(entry if isinstance(entry, tuple) else (entry,))
  return used


def zero1_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """The optimizer-state spec of a parameter with `spec`: split over the data-parallel axes.

  The data-parallel replicas of a parameter are the batch axes (data x expert) it is not
  already split over. The state takes the largest dimension not yet split that those axes'
  size divides (trying all of them, then `data` alone, then `expert` alone); a parameter no
  dimension of which divides stays replicated (norm scales of odd width, scalars).
  """
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  free_axes = [a for a in BATCH if a not in _spec_axes(P(*spec)) and mesh.shape[a] > 1]
  candidates = [tuple(free_axes)] if free_axes else []
  if len(free_axes) > 1:
    candidates += [(a,) for a in free_axes]
  for axes in candidates:
    size = math.prod(mesh.shape[a] for a in axes)
    dims = [i for i, n in enumerate(shape) if spec[i] is None and n % size == 0]
    if dims:
      dim = max(dims, key=lambda i: (shape[i], -i))
      new = list(spec)
      new[dim] = axes[0] if len(axes) == 1 else axes
      return P(*new)
  return P(*spec)


def zero1_specs(abstract_params, specs, mesh: Mesh):
  """`zero1_spec` over a params tree (ShapeDtypeStructs or arrays) and its PartitionSpecs."""
  return jax.tree.map(lambda p, s: zero1_spec(s, p.shape, mesh), abstract_params, specs,
                      is_leaf=lambda x: isinstance(x, P))


def bytes_per_device(tree) -> int:
  """Bytes of `tree` held by the busiest device (ShapeDtypeStructs with shardings, or arrays)."""
  per_device: dict = {}
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    itemsize = np.dtype(leaf.dtype).itemsize
    if sharding is None:
      per_device[None] = per_device.get(None, 0) + math.prod(leaf.shape) * itemsize
      continue
    shard = math.prod(sharding.shard_shape(leaf.shape)) * itemsize
    for device in sharding.device_set:
      per_device[device] = per_device.get(device, 0) + shard
  return max(per_device.values(), default=0)
