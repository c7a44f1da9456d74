"""The sharding plan: what runs where, decided in one place from config x mesh.

Every trainer, the checkpoint loader and the serving path take their placements from a
`ShardingPlan` (`plan(cfg, mesh)`); nothing else in the codebase names a mesh axis for a
parameter, a batch or an optimizer state. The plan holds:

  parameters       logical axis names on every nnx.Param (`axes=` metadata) -> mesh axes by
                   `RULES`: replicated, except routed experts, split over `expert`
  optimizer state  ZeRO-1 (`zero1_spec`): each moment split further over the data-parallel
                   axes its parameter is replicated on
  router biases    replicated (moved by loads, not by the optimizer)
  batch            split over data x expert
  routed experts   `routed`: on a mesh whose `expert` axis is > 1, the shard_map all-to-all
                   dispatch/combine of `parallel/expert.py` (flat, or node-then-GPU from
                   `parallel/node_dispatch.py`); otherwise None (the single-device kernel)
  pipeline stages  `STAGED`: the stacked layers cut into stages along their leading axis

Placement, in one table (DeepSeek-V3 trains with PP x EP x ZeRO-1 DP, arXiv 2412.19437 §3.2):
  parameter                       params            optimizer state (ZeRO-1)
  dense (attention, MLPs, embed)  replicated        split over data x expert
  routed experts [.., E, D, F]    E over `expert`   E over `expert`, another dim over `data`
  router bias                     replicated        (not optimised)
The batch is split over data x expert, so every device is a data-parallel replica for the
dense parameters, and the `data` ranks are the replicas of each expert shard.
"""

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3_jax import config as config_lib
from dsv3_jax.config import Config
from dsv3_jax.layers.moe import RoutedExperts
from dsv3_jax.parallel import expert as expert_lib
from dsv3_jax.parallel import node_dispatch
from dsv3_jax.parallel.mesh import BATCH, make_mesh

STAGED = "moe"  # the stacked layers a pipeline cuts into stages (leading layer axis)

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


def logical_to_mesh(axes: Sequence[str | None], ndim: int) -> P:
  """PartitionSpec for a parameter with these logical axes (stacked axes are `layers`)."""
  lead = ("layers",) * (ndim - len(axes))
  spec = []
  for name in tuple(lead) + tuple(axes):
    if name is not None and name not in RULES:
      raise ValueError(f"logical axis {name!r} has no sharding rule in parallel/sharding.py")
    spec.append(RULES.get(name) if name else None)
  return P(*spec)


def param_specs(state, staged_axis: Optional[str] = None) -> dict:
  """Pure-dict tree of PartitionSpecs for an nnx State whose Variables carry `axes`.

  `staged_axis`: the mesh axis the `STAGED` stack's layer axis is split over (pipeline
  stages own their layers' parameters), or None (replicated).
  """
  flat = {}
  for path, v in state.flat_state():
    axes = v.get_metadata().get("axes")
    spec = logical_to_mesh(axes, v.get_value().ndim) if axes else P()
    if staged_axis and path[0] == STAGED and len(spec) and spec[0] is None:
      spec = P(staged_axis, *spec[1:])
    flat[path] = spec
  return traverse_util.unflatten_dict(flat)


def shardings(mesh: Mesh, specs) -> object:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


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
  return jax.tree.map(
    lambda p, s: zero1_spec(s, p.shape, mesh),
    abstract_params,
    specs,
    is_leaf=lambda x: isinstance(x, P),
  )


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


# ----------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """Placements of one model config on one mesh (see the module docstring)."""

  cfg: Config
  mesh: Mesh
  expert_parallel: Optional[expert_lib.ExpertParallel]  # None: experts on every device

  @property
  def routed(self) -> Optional[RoutedExperts]:
    """The MoE layers' routed-expert function (None = the single-device kernel)."""
    if self.expert_parallel is None:
      return None
    return functools.partial(
      expert_lib.routed_experts, ep=self.expert_parallel, dispatch=self.dispatch
    )

  @property
  def dispatch(self):
    """The EP dispatch: flat all-to-all of copies, or node-then-GPU (`ep_two_stage`)."""
    if self.cfg.parallel.ep_two_stage:
      return node_dispatch.two_stage_dispatch
    return expert_lib.flat_dispatch

  @property
  def batch(self) -> NamedSharding:
    return batch_sharding(self.mesh)

  @property
  def replicated(self) -> NamedSharding:
    return replicated(self.mesh)

  @property
  def pipelined(self) -> bool:
    """Whether the step runs as a pipeline over `pipe` (stages then own their layers)."""
    return self.cfg.parallel.pipeline != "none" and self.mesh.shape.get("pipe", 1) > 1

  def param_specs(self, abstract_params_state) -> dict:
    """PartitionSpecs (pure dict) for an nnx State of Params carrying `axes` metadata."""
    return param_specs(abstract_params_state, "pipe" if self.pipelined else None)

  @property
  def routed_in_shard_map(self) -> Optional[RoutedExperts]:
    """The routed experts for code already inside a shard_map over the whole mesh (the
    pipeline): the per-shard all-to-all dispatch on local expert weights, statistics left
    per shard (the caller sums them), or None without expert parallelism."""
    if self.expert_parallel is None:
      return None
    return functools.partial(
      expert_lib.shard_routed_experts,
      ep=self.expert_parallel,
      reduce_stats=False,
      dispatch=self.dispatch,
    )

  def param_shardings(self, abstract_params_state) -> dict:
    return shardings(self.mesh, self.param_specs(abstract_params_state))

  def bias_shardings(self, biases: dict) -> dict:
    return jax.tree.map(lambda _: self.replicated, biases)

  def optimizer_shardings(
    self, optimizer: optax.GradientTransformation, abstract_params_state, zero1: bool = True
  ):
    """Shardings of `optimizer.init(params)`: ZeRO-1 moments (or laid out like the params)."""
    pure = _pure(abstract_params_state)
    specs = self.param_specs(abstract_params_state)
    if zero1:
      specs = zero1_specs(pure, specs, self.mesh)
    abs_opt = jax.eval_shape(optimizer.init, pure)
    return optax.tree_map_params(
      optimizer,
      lambda _, s: s,
      abs_opt,
      shardings(self.mesh, specs),
      transform_non_params=lambda _: self.replicated,
    )

  def describe(self) -> str:
    ep = self.expert_parallel
    shape = " x ".join(f"{a} {n}" for a, n in self.mesh.shape.items())
    if ep is None:
      return f"mesh {shape}; routed experts on every device"
    m = self.cfg.model
    return (
      f"mesh {shape}; expert parallel: {ep.size} EP ranks in {ep.n_nodes} nodes, "
      f"{m.n_routed_experts // ep.size} experts per rank, a token reaches at most "
      f"{expert_lib.max_nodes_per_token(m, ep.n_nodes)} nodes, capacity factor "
      f"{ep.capacity_factor or '0 (dropless)'}"
    )


def _pure(state) -> dict:
  to_pure = getattr(state, "to_pure_dict", None)
  return to_pure() if to_pure else state


def plan(cfg: Config, mesh: Mesh) -> ShardingPlan:
  """The placements of `cfg`'s model on `mesh`; raises ValueError naming a misfit."""
  ep = expert_lib.from_config(mesh, cfg.parallel)
  ep = ep.validate(cfg.model) if ep.size > 1 else None
  if ep is not None and cfg.parallel.ep_two_stage:
    node_dispatch.validate(cfg.model, ep)
  return ShardingPlan(cfg, mesh, ep)


def single_device(cfg: Config, device: Optional[jax.Device] = None) -> ShardingPlan:
  """A plan on one device (loading a model for decoding, inspection)."""
  cfg = config_lib.replace(cfg, parallel={"data": 1, "expert": 1, "pipe": 1})
  mesh = make_mesh(cfg.parallel, [device or jax.devices()[0]])
  return plan(cfg, mesh)
