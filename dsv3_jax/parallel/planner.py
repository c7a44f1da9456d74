"""A training plan of one config on one mesh: memory, communication and time per device.

DeepSeek-V3 (arXiv 2412.19437) trains the 671B model on 2048 H800 GPUs (§3.1) with 16-way
pipeline parallelism (DualPipe), 64-way expert parallelism over 8 nodes and ZeRO-1 data
parallelism (§3.2), with cross-node all-to-all kernels that send each token over IB at most
once per node (§3.2.2) and memory saved by recomputation and FP8 caching (§3.2.3, §3.3). This
module answers, without allocating or compiling anything (the mesh may be a
`jax.sharding.AbstractMesh` of 2048 devices), what that layout costs here:

  memory          parameters, gradients and ZeRO-1 optimizer state from the sharding plan's
                  PartitionSpecs (`parallel/sharding.py`) applied to the abstract parameter
                  shapes, so the plan follows whatever placement the sharding plan makes;
                  DualPipe's second chunk; and activations per micro-batch times the
                  micro-batches in flight on the busiest pipeline rank (`parallel/schedules`:
                  1F1B holds PP on rank 0, DualPipe PP + 1), in two estimates:
                    traced    what this code's autodiff keeps for the backward, read from the
                              traced forward (the residuals the backward really reads), at the
                              planned shapes: this implementation, checked against XLA
                              (under `ModelConfig.remat` the blocks' inputs, plus the
                              largest piece the backward reruns, live once);
                    recipe    the report's recipe (§3.2.3, §3.3.3): RMSNorm and MLA
                              up-projections recomputed, flash attention (no score matrix),
                              GEMM inputs cached in FP8, SwiGLU outputs recomputed, dispatch
                              buffers holding the real copies only (an analytic estimate);
                  and, beside this code's placement, the report's own (`report_layout_memory`):
                  each rank holding only its stages, the ends on the end ranks, bf16 working
                  weights, fp32 gradients, ZeRO-1 masters and moments, the recipe's
                  activations walked through the schedule rank by rank;
  communication   per step and device, on NVLink and IB: expert all-to-all (dispatch and
                  combine, forward and backward, and once more where blocks are rerun)
                  under node-limited routing, pipeline sends,
                  and the ZeRO-1 gradient reduce-scatter / parameter all-gather (plus the
                  all-reduce of parameters replicated over `pipe`), all from the specs;
  time            compute at the hardware's peak, the pipeline bubble from the schedule
                  simulator, exposed communication, step time, MFU and the expert all-to-all
                  : computation ratio (the report's is about 1:1, §3.2.1).

Devices are laid out node by node with the `expert` axis innermost (DeepSeek-V3's EP64 =
8 nodes of 8 GPUs), then `data`, then `pipe`: a node holds `node_size` devices.

Legend: N tokens per micro-batch per device, D model, H heads, E experts, k experts per token,
F expert width, M nodes a token may reach (topk_group), S pipeline stages.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from dsv3_jax import config as config_lib
from dsv3_jax import counts
from dsv3_jax import model as model_lib
from dsv3_jax.config import Config
from dsv3_jax.layers.routing import RouterBias
from dsv3_jax.parallel import expert as expert_lib
from dsv3_jax.parallel import schedules
from dsv3_jax.parallel import sharding
from dsv3_jax.parallel.mesh import AXES

GB = 1e9
FP8_CACHE_BYTES = 1 + 4 / 128  # an FP8 value plus its share of a 1x128 tile's f32 scale


# ----------------------------------------------------------------------------- hardware
@dataclasses.dataclass(frozen=True)
class Hardware:
  """Per-device peaks: dense FLOP/s by matmul precision, link bandwidths (bytes/s, one
  direction, effective), memory (bytes)."""

  name: str
  flops: dict  # matmul_precision -> dense FLOP/s
  nvlink: float
  ib: float
  memory: float
  source: str


# H800 SXM: NVIDIA's dense peaks (as H100 SXM: BF16 989 TFLOPS, FP8 1979, TF32 495); the
# report's effective link speeds: "NVLink offers a bandwidth of 160 GB/s, roughly 3.2 times
# that of IB (50 GB/s)" (§3.2.2). H100 SXM: NVLink 4 at 900 GB/s both ways = 450 one way,
# 400 Gb/s NDR InfiniBand = 50 GB/s per GPU.
HARDWARE = {
  "h800": Hardware(
    "h800",
    {"fp8": 1979e12, "bf16": 989e12, "fp32": 495e12},
    160e9,
    50e9,
    80e9,
    "H800 SXM dense peaks; NVLink 160 GB/s, IB 50 GB/s (report §3.2.2)",
  ),
  "h100": Hardware(
    "h100",
    {"fp8": 1979e12, "bf16": 989e12, "fp32": 495e12},
    450e9,
    50e9,
    80e9,
    "H100 SXM dense peaks; NVLink 450 GB/s, IB 50 GB/s (nominal)",
  ),
}


@functools.lru_cache(maxsize=1)
def measure_cpu(n: int = 1024, repeats: int = 5) -> Hardware:
  """This machine's CPU as a 'device': f32 matmul FLOP/s measured with jax (every precision
  runs at it), links at a nominal 10 GB/s (emulated devices share host memory)."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  rate = 2 * n**3 / best
  return Hardware(
    "cpu",
    {"fp8": rate, "bf16": rate, "fp32": rate},
    10e9,
    10e9,
    0.0,
    f"this CPU: {rate / 1e9:.0f} GFLOP/s measured (f32 {n}x{n} matmul)",
  )


def hardware(name: str) -> Hardware:
  if name == "cpu":
    return measure_cpu()
  if name not in HARDWARE:
    raise ValueError(f"unknown hardware {name!r}: choose one of {sorted(HARDWARE) + ['cpu']}")
  return HARDWARE[name]


# ----------------------------------------------------------------------------- the mesh
def parse_mesh(text: str) -> dict:
  """'data:2,expert:64,pipe:16' -> {'data': 2, 'expert': 64, 'pipe': 16} (missing axes 1)."""
  sizes = {a: 1 for a in AXES}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition(":")
    if name not in sizes or not value.isdigit() or int(value) < 1:
      raise ValueError(
        f"--mesh entry {part!r}: expected <axis>:<size> with axis in {AXES} "
        "and a positive size, e.g. data:2,expert:64,pipe:16"
      )
    sizes[name] = int(value)
  return sizes


def abstract_mesh(sizes: dict) -> AbstractMesh:
  """A device-free mesh of the (data, expert, pipe) sizes: enough for specs and tracing."""
  return AbstractMesh(tuple(sizes[a] for a in AXES), AXES)


def node_extents(sizes: dict, node_size: int) -> dict:
  """Devices of each axis inside one node: `expert` first, then `data`, then `pipe`."""
  rem, ext = node_size, {}
  for a in ("expert", "data", "pipe"):
    ext[a] = math.gcd(sizes[a], rem)
    rem //= ext[a]
  return ext


# ----------------------------------------------------------------------------- the layout
def configure(
  cfg: Config,
  sizes: dict,
  *,
  node_size: int = 8,
  schedule: Optional[str] = None,
  microbatches: Optional[int] = None,
  seq_len: Optional[int] = None,
  global_batch: Optional[int] = None,
) -> Config:
  """`cfg` with the mesh, the node size (EP ranks per node), the pipeline schedule and the
  batch of the plan; micro-batches default to one sequence each."""
  if node_size < 1:
    raise ValueError(f"node_size = {node_size}: must be positive")
  ep = sizes["expert"]
  if ep % node_size and node_size % ep:
    raise ValueError(
      f"node size {node_size} and the `expert` axis size {ep} must divide one "
      "another (EP ranks are packed into nodes)"
    )
  name = schedule or cfg.parallel.pipeline
  if sizes["pipe"] > 1 and name == "none":
    raise ValueError(
      f"a `pipe` axis of {sizes['pipe']} needs a pipeline schedule "
      f"(--schedule={'|'.join(s for s in config_lib.PIPELINES if s != 'none')})"
    )
  if sizes["pipe"] == 1:
    name = "none"
  train = {k: v for k, v in (("seq_len", seq_len), ("global_batch", global_batch)) if v}
  shards = sizes["data"] * sizes["expert"]
  gb = global_batch or cfg.train.global_batch
  n_mb = microbatches or (
    gb // shards if name != "none" and gb % shards == 0 else cfg.parallel.microbatches
  )
  return config_lib.replace(
    cfg,
    train=train,
    parallel={
      "data": sizes["data"],
      "expert": ep,
      "pipe": sizes["pipe"],
      "ep_ranks_per_node": min(ep, node_size),
      "pipeline": name,
      "microbatches": n_mb,
    },
  )


@dataclasses.dataclass(frozen=True)
class Layout:
  """The pipeline and batch geometry of a plan (after `check`)."""

  schedule: Optional[schedules.Schedule]  # None: no pipeline
  n_stages: int  # 1 without a pipeline
  layers_per_stage: int  # MoE layers on the busiest stage
  even: bool  # the MoE layers split evenly into the stages
  shards: int  # batch shards (data x expert)
  local_batch: int  # sequences per shard per step
  n_mb: int  # micro-batches per shard per step (1 without a pipeline)
  mb_seqs: int  # sequences per micro-batch
  seq_len: int
  in_flight: int  # micro-batch-stage activations held at once by the busiest rank
  n_slots: int  # stage chunks per rank (DualPipe and DualPipeV 2)
  n_dirs: int  # directions micro-batches run in (DualPipe 2)
  param_copies: int  # stack parameters per rank, in 1/pp of the stack (DualPipe 2)
  n_nodes: int  # nodes of one EP group
  extents: dict  # devices of each axis inside one node

  @property
  def tokens_per_mb(self) -> int:
    return self.mb_seqs * self.seq_len


def check(cfg: Config, node_size: int = 8, uneven_stages: bool = False) -> Layout:
  """Checks that the mesh divides the config before anything is traced or compiled; raises
  ValueError naming both numbers of a misfit."""
  m, p, t = cfg.model, cfg.parallel, cfg.train
  sizes = {"data": p.data, "expert": p.expert, "pipe": p.pipe}
  if m.n_routed_experts % p.expert:
    raise ValueError(
      f"{m.n_routed_experts} routed experts (model.n_routed_experts) do not "
      f"split over the `expert` mesh axis of {p.expert}"
    )
  ext = node_extents(sizes, node_size)
  n_nodes = p.expert // ext["expert"]
  if m.n_group % n_nodes and n_nodes % m.n_group:
    raise ValueError(
      f"{m.n_group} expert groups (model.n_group) do not nest in the "
      f"{n_nodes} nodes of the `expert` axis ({p.expert} EP ranks, "
      f"{ext['expert']} per node): node-limited routing needs one to divide "
      "the other"
    )
  shards = p.data * p.expert
  if t.global_batch % shards:
    raise ValueError(
      f"global batch {t.global_batch} (train.global_batch) does not split "
      f"into data x expert = {shards} batch shards"
    )
  local = t.global_batch // shards
  if p.pipeline == "none":
    return Layout(
      None, 1, m.n_moe_layers, True, shards, local, 1, local, t.seq_len, 1, 1, 1, 1, n_nodes, ext
    )
  try:
    sched = schedules.SCHEDULES[p.pipeline](p.pipe, p.microbatches)
  except ValueError as e:
    raise ValueError(
      f"pipeline {p.pipeline!r} on pipe {p.pipe} with {p.microbatches} micro-batches: {e}"
    ) from e
  n_st = sched.n_stages
  even = m.n_moe_layers % n_st == 0
  if not even and not uneven_stages:
    raise ValueError(
      f"{m.n_moe_layers} MoE layers do not split evenly into {n_st} pipeline "
      f"stages ({p.pipeline} on pipe {p.pipe}); "
      "plan the busiest stage with ceil(layers / stages) layers, as "
      "DeepSeek-V3 lays out 61 layers over 16 ranks, with uneven_stages"
    )
  if local % p.microbatches:
    raise ValueError(
      f"{local} sequences per batch shard (global batch {t.global_batch} / "
      f"{shards} shards) do not split into {p.microbatches} micro-batches"
    )
  in_flight = int(schedules.peak_activations(sched).max())
  n_slots = sched.n_dirs * n_st // p.pipe
  copies = int(round(sched.params_per_rank().max()))
  return Layout(
    sched,
    n_st,
    -(-m.n_moe_layers // n_st),
    even,
    shards,
    local,
    p.microbatches,
    local // p.microbatches,
    t.seq_len,
    in_flight,
    n_slots,
    sched.n_dirs,
    copies,
    n_nodes,
    ext,
  )


# ----------------------------------------------------------------------------- state
def shard_shape(shape, spec: P, sizes: dict) -> tuple:
  """The busiest device's shard of `shape` under `spec` (uneven splits round up, as XLA pads)."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  out = []
  for n, entry in zip(shape, spec):
    axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    out.append(-(-n // math.prod(sizes[a] for a in axes)))
  return tuple(out)


def _nbytes(shape, dtype) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize


def _axes(spec: P) -> set:
  return sharding._spec_axes(P(*spec))


@dataclasses.dataclass
class _State:
  graphdef: Any
  params: Any  # nnx.State of abstract Params
  pure: dict
  specs: dict
  zero1: dict
  biases: dict


def abstract_state(cfg: Config, mesh) -> _State:
  plan = sharding.plan(cfg, mesh)
  gd, params, biases = nnx.split(model_lib.abstract(cfg.model), nnx.Param, RouterBias)
  specs = plan.param_specs(params)
  pure = nnx.to_pure_dict(params)
  return _State(
    gd, params, pure, specs, sharding.zero1_specs(pure, specs, mesh), nnx.to_pure_dict(biases)
  )


def state_memory(cfg: Config, mesh, state: _State, layout: Layout) -> dict:
  """Bytes per device of the train state, from the sharding plan's specs."""
  from dsv3_jax.train.optimizer import make_optimizer  # train depends on parallel, not back

  sizes = dict(mesh.shape)
  is_spec = lambda x: isinstance(x, P)
  leaf_bytes = lambda a, s: _nbytes(shard_shape(a.shape, s, sizes), a.dtype)
  params = sum(jax.tree.leaves(jax.tree.map(leaf_bytes, state.pure, state.specs, is_leaf=is_spec)))
  staged = (
    sum(
      jax.tree.leaves(
        jax.tree.map(
          leaf_bytes, state.pure[sharding.STAGED], state.specs[sharding.STAGED], is_leaf=is_spec
        )
      )
    )
    if sharding.STAGED in state.pure
    else 0
  )
  # The optimizer state laid out as the plan lays it out (ZeRO-1), leaf by leaf.
  plan = sharding.plan(cfg, mesh)
  optimizer = make_optimizer(cfg.train)
  abs_opt = jax.eval_shape(optimizer.init, state.pure)
  opt_sh = plan.optimizer_shardings(optimizer, state.params)
  opt = sum(
    _nbytes(shard_shape(a.shape, s.spec, sizes), a.dtype)
    for a, s in zip(jax.tree.leaves(abs_opt), jax.tree.leaves(opt_sh))
  )
  biases = sum(_nbytes(b.shape, b.dtype) for b in jax.tree.leaves(state.biases))
  tokens = layout.local_batch * (layout.seq_len + 1) * 4
  # DualPipe: each rank also holds the mirrored chunk (parameters and their gradients).
  slot_copies = (layout.param_copies - 1) * staged * 2
  # This code's executor (`parallel/pipeline.py`) accumulates f32 gradients of its slots and
  # of the shared parameters in its scan carry, leaf by leaf; each tick's op (a `switch`)
  # returns the new sums in buffers of its own, next to the carried ones (so XLA:CPU does,
  # measured): two copies. An op's own gradient of a leaf, live while it is added, is not
  # counted.
  # DualPipe's slots are a stacked copy of the rank's chunks.
  accumulators = 0
  if layout.schedule is not None:
    accumulators = 2 * (layout.param_copies * staged + params - staged)
    accumulators += layout.param_copies * staged if layout.n_slots > 1 else 0
  # The donated step writes the new parameters and moments next to the old ones (XLA
  # releases the old state only once the update is done): one more copy of each.
  return {
    "params": params,
    "grads": params,
    "optimizer": opt,
    "router_biases": biases,
    "step": 8,  # the step counter and the schedule length the step takes (int32 each)
    "batch": tokens,
    "dualpipe_second_chunk": slot_copies,
    "pipeline_accumulators": accumulators,
    "update_copy": params + opt,
    "staged_params": staged,
  }


# ----------------------------------------------------------------------------- activations
def _stored_residual_bytes(fn, params, x, consts, varying) -> tuple[int, list]:
  """Bytes of the residuals that the backward of `fn(params, x, consts) -> (outs, aux)`
  reads and that depend on the micro-batch (x or a `varying` const): what autodiff keeps
  between the forward and the backward (parameters and what is computed from them alone are
  not counted; residuals the backward never reads are dropped, as XLA drops them), and the
  stored residuals' avals."""
  from jax._src.interpreters import partial_eval as pe
  from jax.extend import core as jcore

  from dsv3_jax.parallel import stage_vjp

  p_l, p_t = jax.tree.flatten(params)
  x_l, x_t = jax.tree.flatten(x)
  c_l, c_t = jax.tree.flatten(consts)
  n_p, n_x = len(p_l), len(x_l)
  cell = {}

  def fwd(*flat):
    pp = jax.tree.unflatten(p_t, flat[:n_p])
    xx = jax.tree.unflatten(x_t, flat[n_p : n_p + n_x])
    cc = jax.tree.unflatten(c_t, flat[n_p + n_x :])
    outs, vjp, aux = jax.vjp(lambda a, b: fn(a, b, cc), pp, xx, has_aux=True)
    res, cell["vjp"] = jax.tree.flatten(vjp)
    o, cell["outs"] = jax.tree.flatten(outs)
    cell["n"] = len(o) + len(jax.tree.leaves(aux))
    cell["n_o"] = len(o)
    return o + jax.tree.leaves(aux) + res

  spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
  closed = jax.make_jaxpr(fwd)(*map(spec, p_l + x_l + c_l))
  jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
  n_k, n0 = len(closed.consts), cell["n"]
  res_vars = jaxpr.outvars[n0:]
  n_r = len(res_vars)

  def bwd(*flat):
    vjp = jax.tree.unflatten(cell["vjp"], flat[:n_r])
    dp, dx = vjp(jax.tree.unflatten(cell["outs"], flat[n_r:]))
    return jax.tree.leaves(dp) + jax.tree.leaves(dx)

  avals = [v.aval for v in res_vars] + [v.aval for v in jaxpr.outvars[: cell["n_o"]]]
  bw = jax.make_jaxpr(bwd)(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals))
  bj = pe.convert_constvars_jaxpr(bw.jaxpr)
  _, used = pe.dce_jaxpr(bj, [True] * len(bj.outvars))
  used_res = used[len(bw.consts) : len(bw.consts) + n_r]
  sources = [False] * (n_k + n_p) + [True] * n_x + list(varying)
  tainted = stage_vjp._tainted(jaxpr, sources)
  n_out, stored = len(jaxpr.outvars), {}
  for i, (v, u) in enumerate(zip(res_vars, used_res), start=n0):
    if not u or not isinstance(v, jcore.Var) or v in stored or v in jaxpr.invars:
      continue
    if v in tainted and stage_vjp._depends(jaxpr, i, n_out, sources):
      stored[v] = v.aval
  return int(sum(a.size * a.dtype.itemsize for a in stored.values())), list(stored.values())


def _largest(avals, n: int = 3) -> list:
  """The `n` largest avals as [bytes, 'dtype[shape]'] (what dominates an estimate)."""
  rows = sorted(
    ((int(a.size * a.dtype.itemsize), f"{a.dtype}{list(a.shape)}") for a in avals), reverse=True
  )
  return [list(r) for r in rows[:n]]


def _local_tree(tree, specs, sizes: dict, drop_lead: int = 0, lead=None):
  """ShapeDtypeStructs of each leaf's shard (optionally replacing the leading axis)."""

  def one(a, s):
    shape = shard_shape(a.shape, s, sizes)
    if lead is not None:
      shape = (lead,) + shape[1:]
    return jax.ShapeDtypeStruct(shape, a.dtype)

  return jax.tree.map(one, tree, specs, is_leaf=lambda x: isinstance(x, P))


def _recompute_working_set(cfg: Config, params: dict, biases: dict, tokens, routed) -> dict:
  """Under `ModelConfig.remat` = "blocks": bytes live while the backward reruns one piece.

  The backward reruns one block (or the readout: final norm's output -> head, CE, MTP) at a
  time and holds, until that piece's gradient is done, what the piece would have kept
  without recomputation. Traced per piece at the planned shapes, with recomputation off;
  the largest of them is live at the peak, once per device. `params`/`biases`: the local
  pure dicts the step merges (a pipeline stage's chunk under the stacked key)."""
  from dsv3_jax.train.loss import head_losses

  m = dataclasses.replace(cfg.model, remat="none")
  gd = nnx.split(model_lib.abstract(m), nnx.Param, RouterBias)[0]
  b, l = tokens.shape[0], tokens.shape[1] - 1
  h = jax.ShapeDtypeStruct((b, l, m.hidden_size), jnp.dtype(m.dtype))
  out = {}

  def block_fn(name):
    def fn(p, x, consts):
      model = nnx.merge(gd, p, consts)
      g, st = nnx.split(getattr(model, name))
      block = nnx.merge(g, jax.tree.map(lambda a: a[0], st))
      ctx = model.context((b, l), routed=routed)
      y = block(x, ctx.positions_BxL, ctx.cos, ctx.sin, None, None, ctx.routed, ctx.causal)[0]
      return (y,), {}

    return fn

  n_b = len(jax.tree.leaves(biases))
  for name in ("dense", "moe"):
    if name in params:
      out[name], _ = _stored_residual_bytes(block_fn(name), params, h, biases, [False] * n_b)

  def readout_fn(p, x, consts):
    bb, tok = consts
    return (head_losses(nnx.merge(gd, p, bb), x, tok, cfg.train, routed).loss,), {}

  out["readout"], _ = _stored_residual_bytes(
    readout_fn, params, h, (biases, tokens), [False] * n_b + [True]
  )
  return out


def traced_activations(cfg: Config, mesh, state: _State, layout: Layout) -> dict:
  """Activation bytes this code keeps per device, traced at the planned shapes (no compile).

  Without a pipeline: the residuals the whole model's backward reads, for the local batch
  (`_stored_residual_bytes`). With one: the executor's buffers (`parallel/pipeline.py`):
  entries of what `StageVJP` stores per micro-batch-stage (r1 from F to B/W, r2 from B to W)
  for `train/pipeline_step.make_stage_fn` -- whose conds over the stage index keep the
  embedding, dense-layer and readout residuals in every stage's entry -- times the entries
  its free-list allocates over the schedule, plus the read and the new entry of each tick.
  Under `ModelConfig.remat` the stored residuals are the blocks' inputs, and the largest
  piece the backward reruns is live once (`_recompute_working_set`).
  """
  from dsv3_jax.train.loss import model_losses

  sizes = dict(mesh.shape)
  plan = sharding.plan(cfg, mesh)
  routed = plan.routed_in_shard_map
  n_mb_tok = layout.mb_seqs
  tokens = jax.ShapeDtypeStruct((n_mb_tok, layout.seq_len + 1), jnp.int32)
  biases = jax.tree.map(lambda b: jax.ShapeDtypeStruct(b.shape, b.dtype), state.biases)
  cell = {}
  remat = cfg.model.recomputes

  if layout.schedule is None:
    params = _local_tree(state.pure, state.specs, sizes)

    def body():
      def fn(p, x, consts):
        b, tok = consts
        loss, _, loads = model_losses(
          nnx.merge(state.graphdef, p, b), tok, cfg.train, routed=routed
        )
        return (loss + 0 * x,), loads

      n_b = len(jax.tree.leaves(biases))
      cell["bytes"], avals = _stored_residual_bytes(
        fn, params, jnp.zeros((), jnp.float32), (biases, tokens), [False] * n_b + [True]
      )
      cell["largest"] = _largest(avals)
      if remat:
        cell["recompute"] = _recompute_working_set(cfg, params, biases, tokens, routed)
      return jnp.zeros(())
  else:
    from dsv3_jax.train import pipeline_step

    n_st = layout.n_stages
    chunk_p = _local_tree(
      state.pure[sharding.STAGED], state.specs[sharding.STAGED], sizes, lead=layout.layers_per_stage
    )
    shared_p = _local_tree(
      {k: v for k, v in state.pure.items() if k != sharding.STAGED},
      {k: v for k, v in state.specs.items() if k != sharding.STAGED},
      sizes,
    )
    chunk_b = jax.tree.map(
      lambda b: jax.ShapeDtypeStruct((layout.layers_per_stage,) + b.shape[1:], b.dtype),
      biases[sharding.STAGED],
    )
    shared_b = {k: v for k, v in biases.items() if k != sharding.STAGED}
    stage_cfg = cfg
    if not layout.even:  # trace a model whose stack splits evenly: the busiest stage's size
      stage_cfg = config_lib.replace(
        cfg, model={"num_hidden_layers": cfg.model.n_dense_layers + layout.layers_per_stage * n_st}
      )
    gd = nnx.split(model_lib.abstract(stage_cfg.model), nnx.Param, RouterBias)[0]
    stage_fn = pipeline_step.make_stage_fn(gd, stage_cfg, n_st, 1.0 / layout.n_mb, routed=routed)
    act = jax.ShapeDtypeStruct(
      (n_mb_tok, layout.seq_len, cfg.model.hidden_size), jnp.dtype(cfg.model.dtype)
    )

    def body():
      from dsv3_jax.parallel.stage_vjp import StageVJP

      def fn(params, x, consts):
        (sp, shp), (sc, shc, mb, stage) = params, consts
        return stage_fn(sp, shp, x, sc, shc, mb, stage)

      consts = (chunk_b, shared_b, tokens, jax.ShapeDtypeStruct((), jnp.int32))
      n_c = len(jax.tree.leaves(consts[:2]))
      # The executor's own split (as `Pipeline` builds it): what F stores for B/W (r1) and
      # what B stores for W (r2), per micro-batch-stage.
      sv = StageVJP(fn, (chunk_p, shared_p), act, consts, [False] * n_c + [True, False])
      cell.update(sv.residual_bytes())
      cell["largest"] = _largest(sv.r1_avals)
      if remat:
        cell["recompute"] = _recompute_working_set(
          stage_cfg,
          dict(shared_p, **{sharding.STAGED: chunk_p}),
          dict(shared_b, **{sharding.STAGED: chunk_b}),
          tokens,
          routed,
        )
      return jnp.zeros(())

  jax.eval_shape(jax.shard_map(body, mesh=mesh, in_specs=(), out_specs=P(), check_vma=False))
  working = dispatch_working_set(cfg, plan, layout.tokens_per_mb)
  pieces = cell.get("recompute", {})
  rerun = max(pieces.values()) if pieces else 0  # the largest rerun piece, live once
  extra = {"recompute_working_set": rerun, "recompute_pieces": pieces} if pieces else {}
  if layout.schedule is None:
    per_mb = cell["bytes"]
    return {
      "per_microbatch_stage": per_mb,
      "in_flight": 1,
      "dispatch_working_set": working,
      **extra,
      "activations": per_mb + working + rerun,
      "largest_residuals": cell["largest"],
    }
  # The executor's buffers: entries sized by its free-list over the schedule, plus an
  # always-zero and a scratch entry each (`parallel/pipeline.make_plan`).
  from dsv3_jax.parallel import pipeline as pipeline_lib

  sizes_ = pipeline_lib.make_plan(layout.schedule).sizes
  a = math.prod(act.shape) * act.dtype.itemsize
  # Every tick also reads one entry of each residual buffer and makes a new one: two more.
  buffers = {
    "r1": (sizes_["r1"] + 4) * cell["r1"],
    "r2": (sizes_["r2"] + 4) * cell["r2"],
    "act_grad": (sizes_["act"] + sizes_["grad"] + 4) * a,
  }
  return {
    "per_microbatch_stage": cell["r1"],
    "r2_per_microbatch_stage": cell["r2"],
    "buffer_entries": dict(sizes_),
    "buffers": buffers,
    "in_flight": sizes_["r1"],
    "dispatch_working_set": working,
    **extra,
    "activations": sum(buffers.values()) + working + rerun,
    "largest_residuals": cell["largest"],
  }


def dispatch_working_set(cfg: Config, plan, n_local_tokens: int) -> int:
  """Bytes of one MoE layer's expert-parallel working set, live while that layer runs.

  The bounded dropless dispatch (`parallel/expert.flat_dispatch`) keeps no per-layer buffers
  between the forward and the backward (its rounds are recomputed), but while a layer runs it
  holds one round's buffers -- the sent copies, the received copies, the expert outputs and the
  returned outputs, `R x fast_slots x D` each -- and the expert kernel's capacity buckets for
  the received rows (`layers/experts.py`: inputs [E_local, C, D], the fused w1|w3 output
  [E_local, C, 2F] and the SwiGLU [E_local, C, F]). One layer at a time: counted once.
  Zero without expert parallelism (the single-device kernel's buckets are residuals there).
  """
  from dsv3_jax.layers import experts as experts_lib
  from dsv3_jax.parallel import expert as expert_lib

  ep = plan.expert_parallel
  m = cfg.model
  if ep is None or m.n_moe_layers == 0:
    return 0
  itemsize = jnp.dtype(m.dtype).itemsize
  sizes = expert_lib.buffer_bytes(n_local_tokens, m, ep, itemsize)
  rows = ep.size * sizes["fast_slots_per_rank"]
  local_experts = m.n_routed_experts // ep.size
  c = experts_lib.capacity(rows, local_experts)
  buckets = local_experts * c * (m.hidden_size + 3 * m.moe_intermediate_size) * itemsize
  return 4 * sizes["fast_send_buffer_bytes"] + buckets


def recipe_layer_bytes(cfg: Config, n: int) -> dict:
  """DeepSeek-V3's recipe: activation bytes one layer keeps for N tokens, by part.

  Per token (a: activation bytes, c: cached GEMM input, FP8 with its tile scale under
  matmul_precision=fp8, else a):
    residual stream  the layer input and the post-attention residual (RMSNorms recomputed)
    MLA              the q and kv latents and the rotary key (up-projections recomputed,
                     §3.2.3), the attention output -- the input of the Linear after attention,
                     kept in the report's E5M6 (1.5 bytes) under FP8 (§3.3.3) -- and flash
                     attention's log-sum-exp
    MoE              router scores and weights; per routed copy the dispatched input and the
                     SwiGLU inputs (cached, output recomputed, §3.3.3); the shared expert's
                     input and SwiGLU inputs. No expert output is kept for the combine: with
                     the gate weight applied to the SwiGLU output (the down projection is
                     linear, so the layer is the same function), the gate's gradient is the
                     recomputed SwiGLU output against the down projection's input gradient,
                     which the backward computes anyway. (The report does not list expert
                     outputs among its cached activations either.)
    dense MLP        (dense layers) input and SwiGLU inputs
  """
  m = cfg.model
  a = jnp.dtype(m.dtype).itemsize
  fp8 = m.matmul_precision == "fp8"
  c = FP8_CACHE_BYTES if fp8 else a
  attn_out = 1.5 if fp8 else a  # E5M6: 12 bits
  d, h, k = m.hidden_size, m.num_attention_heads, m.num_experts_per_tok
  resid = 2 * d * a
  mla = (
    (m.q_lora_rank + m.kv_lora_rank + m.qk_rope_head_dim) * a + h * m.v_head_dim * attn_out + h * 4
  )
  f, fs = m.moe_intermediate_size, m.moe_intermediate_size * m.n_shared_experts
  moe = m.n_routed_experts * 4 + k * 4 + k * (d * c + 2 * f * c) + (d * c + 2 * fs * c if fs else 0)
  dense = d * c + 2 * m.intermediate_size * c
  return {"residual_stream": resid * n, "mla": mla * n, "moe": moe * n, "dense_mlp": dense * n}


def _recipe_parts(cfg: Config, n: int) -> dict:
  """Recipe bytes for N tokens of each kind of layer and of each end's extras."""
  m = cfg.model
  per = recipe_layer_bytes(cfg, n)
  a = jnp.dtype(m.dtype).itemsize
  moe = per["residual_stream"] + per["mla"] + per["moe"]
  return {
    "moe": moe,
    "dense": per["residual_stream"] + per["mla"] + per["dense_mlp"],
    # An MTP module: its block (a MoE layer), the concatenation and projection, the head input.
    "mtp": moe + n * 4 * m.hidden_size * a,
    "head": n * m.hidden_size * a,  # the head's input; the cross-entropy is fused
    "per_layer": per,
  }


def recipe_activations(cfg: Config, layout: Layout) -> dict:
  """The recipe's activations on the busiest rank: in-flight micro-batch-stages, each with
  its stage's MoE layers, plus the ends' extras (embedding stage: dense layers; last stage:
  the head's input with a fused cross-entropy, and the MTP modules) counted on every
  in-flight entry of a rank holding that end -- this code's placement, where every stage
  holds the same number of MoE layers and the ends ride on top."""
  m = cfg.model
  parts = _recipe_parts(cfg, layout.tokens_per_mb)
  first = m.n_dense_layers * parts["dense"]
  last = parts["head"] + m.num_nextn_predict_layers * parts["mtp"]
  stage = layout.layers_per_stage * parts["moe"]
  if layout.schedule is None:
    per_entry = stage + first + last
  elif layout.n_slots > 1:  # DualPipe: rank 0 holds both ends, entries of both directions
    per_entry = stage + (first + last) / 2
  else:  # 1F1B: rank 0 holds the embedding stage and the most entries
    per_entry = stage + first
  return {
    "per_layer": {k: int(v) for k, v in parts["per_layer"].items()},
    "moe_layer": int(parts["moe"]),
    "per_microbatch_stage": int(per_entry),
    "in_flight": layout.in_flight,
    "activations": int(per_entry * layout.in_flight),
  }


# ----------------------------------------------------------------------------- report's layout
def report_stages(m: config_lib.ModelConfig, n_stages: int) -> list[dict]:
  """The layers of each pipeline stage under the report's placement, as this plan balances it.

  The dense layers, MoE layers and MTP modules, in model order, split into `n_stages`
  contiguous stages as evenly as possible, the end stages taking the smaller share: the first
  also runs the embedding, the last the output head (for the main model and every MTP module,
  which share it, §2.2 and §3.2.3). A dense layer and an MTP module count one layer each:
  DeepSeek-V3's dense MLP (18432 = 9 x 2048 wide) costs a MoE layer's 8 routed + 1 shared
  experts. The report does not publish its split; for 671B on 16 stages this gives stage 0 the
  3 dense layers, the 14 middle stages 4 MoE layers each and the last 2 MoE layers and the MTP
  module (3 + 58 + 1 = 62 layers).
  """
  kinds = (
    ["dense"] * m.n_dense_layers + ["moe"] * m.n_moe_layers + ["mtp"] * m.num_nextn_predict_layers
  )
  base, extra = divmod(len(kinds), n_stages)
  if base == 0:
    raise ValueError(f"{len(kinds)} layers (with the MTP modules) do not fill {n_stages} stages")
  sizes = [base] * n_stages
  order = list(range(1, n_stages - 1)) + [0, n_stages - 1] if n_stages > 2 else [0, 1][:n_stages]
  for s in order[:extra]:
    sizes[s] += 1
  stages, at = [], 0
  for s, size in enumerate(sizes):
    part = kinds[at : at + size]
    at += size
    stages.append(
      {
        "dense": part.count("dense"),
        "moe": part.count("moe"),
        "mtp": part.count("mtp"),
        "embedding": s == 0,
        "head": s == n_stages - 1,
      }
    )
  return stages


def report_layout_memory(cfg: Config, layout: Layout) -> dict:
  """Per-device memory under the report's layout (§3.2.3, §3.3.3), analytic, for every rank.

  Placement: each rank holds only its stages' layers (`report_stages`; DualPipe's rank r the
  stages r and S-1-r), the embedding and the head on the end stages' ranks only; routed
  experts sharded over `expert`, everything else replicated over data x expert.
  Precision: working weights in the activation dtype (what the GEMMs quantize from), weight
  gradients in FP32, and ZeRO-1 shards the FP32 master weights and the AdamW moments
  (`train.moment_dtype`) over each parameter's data-parallel replicas (data for the routed
  experts, data x expert for the rest). Activations: the recipe's bytes (`recipe_layer_bytes`)
  of each in-flight micro-batch-stage, its stage's own layers, walked through the schedule.
  Returns the busiest rank's breakdown and every rank's total.
  """
  m, p, t = cfg.model, cfg.parallel, cfg.train
  parts = counts.part_counts(m)
  a = jnp.dtype(m.dtype).itemsize
  state_bytes = 4 + 2 * jnp.dtype(t.moment_dtype).itemsize  # master + two moments
  dp_shared, dp_routed = p.data * p.expert, p.data
  n_stages = layout.n_stages
  stages = report_stages(m, n_stages)
  act = _recipe_parts(cfg, layout.tokens_per_mb)

  def stage_params(st):  # (replicated, routed) parameters one device holds of a stage
    layers = st["dense"] + st["moe"] + st["mtp"]
    shared = layers * parts["attention"] + st["dense"] * parts["dense_mlp"]
    shared += (st["moe"] + st["mtp"]) * parts["moe_shared"] + st["mtp"] * parts["mtp_extra"]
    shared += st["embedding"] * parts["embedding"] + st["head"] * parts["head"]
    return np.array([shared, (st["moe"] + st["mtp"]) * parts["moe_routed"] // p.expert])

  def stage_activations(s):
    st = stages[s]
    kinds = ("dense", "moe", "mtp", "head")
    return sum(st[k] * act[k] for k in kinds)

  sched = layout.schedule
  if sched is None:
    held, peaks = [[0]], [stage_activations(0)]
  else:
    held = [[] for _ in range(sched.pp)]
    for row in sched.stage_rank:
      for s, r in enumerate(row):
        held[r].append(s)
    peaks = schedules.peak_activations(sched, stage_activations)
  ranks = []
  for r, ss in enumerate(held):
    shared, routed = sum(stage_params(stages[s]) for s in ss)
    row = {
      "rank_stages": ss,
      "weights": (shared + routed) * a,
      "grads": (shared + routed) * 4,
      "optimizer": shared * state_bytes / dp_shared + routed * state_bytes / dp_routed,
      "activations": peaks[r],
    }
    row["total"] = sum(row[k] for k in ("weights", "grads", "optimizer", "activations"))
    ranks.append(row)
  busiest = max(range(len(ranks)), key=lambda r: ranks[r]["total"])
  return {
    "stages": stages,
    "busiest_rank": busiest,
    **{k: v if k == "rank_stages" else int(v) for k, v in ranks[busiest].items()},
    "rank_totals": [int(r["total"]) for r in ranks],
    "rank_weights": [int(r["weights"]) for r in ranks],
  }


# ----------------------------------------------------------------------------- communication
def _hier(nbytes: float, group: int, inside: int) -> tuple[float, float]:
  """(NVLink, IB) bytes one device sends in a hierarchical ring reduce-scatter (or
  all-gather) of `nbytes` over `group` devices, `inside` of them per node."""
  nodes = group // max(inside, 1)
  nv = nbytes * (inside - 1) / inside if inside > 1 else 0.0
  ib = nbytes / inside * (nodes - 1) / nodes if nodes > 1 else 0.0
  return nv, ib


def communication(cfg: Config, mesh, state: _State, layout: Layout) -> dict:
  """Per-step bytes one (the busiest) device sends, by collective and link."""
  m, sizes, ext = cfg.model, dict(mesh.shape), layout.extents
  a = jnp.dtype(m.dtype).itemsize
  fp8 = m.matmul_precision == "fp8"
  out = {}

  # Expert all-to-all: dispatch and combine, forward and backward (§3.2.2, §3.3.3: dispatch
  # and the gradient sent back to the experts in FP8, combine and its backward in BF16).
  if sizes["expert"] > 1:
    g = layout.n_nodes
    rpn = ext["expert"]
    reach = expert_lib.max_nodes_per_token(m, g)
    remote = reach * (g - 1) / g  # nodes other than the token's own, uniform routing
    local_fwd = m.num_experts_per_tok * (rpn - 1) / rpn  # copies forwarded inside a node
    disp = FP8_CACHE_BYTES if fp8 else a
    comb = 2 if fp8 else a
    # fwd + bwd; recomputation (`ModelConfig.remat`) dispatches and combines once more.
    trips = 3 if m.recomputes else 2
    per_token_ib = remote * m.hidden_size * trips * (disp + comb)
    per_token_nv = local_fwd * m.hidden_size * trips * (disp + comb)
    # MoE layers a token passes through on this rank: its chunks' layers (DualPipe runs each
    # micro-batch through one of its two chunks) and the MTP modules on the last stage's rank.
    passes = (
      (layout.n_slots * layout.layers_per_stage + m.num_nextn_predict_layers) / layout.n_dirs
      if layout.schedule is not None
      else m.n_moe_layers + m.num_nextn_predict_layers
    )
    tokens = layout.local_batch * layout.seq_len * passes
    out["expert_all_to_all"] = {
      "nvlink": per_token_nv * tokens,
      "ib": per_token_ib * tokens,
      "nodes_per_token": reach,
      "remote_nodes_per_token": remote,
      "moe_layer_passes": passes,
    }

  # Pipeline sends: each micro-batch's activation forward and gradient backward per stage
  # boundary; a rank sends both for every micro-batch it runs.
  if layout.schedule is not None:
    nbytes = (
      2 * layout.local_batch * layout.seq_len * m.hidden_size * a * layout.n_slots / layout.n_dirs
    )
    link = "ib" if ext["pipe"] < sizes["pipe"] else "nvlink"
    out["pipeline_sends"] = {"nvlink": 0.0, "ib": 0.0, link: nbytes}

  # Gradients: reduce-scatter over the axes ZeRO-1 splits the moments over, all-reduce over
  # the other axes a parameter is replicated on (`pipe` for the shared parameters of a
  # pipeline); then the updated parameters are all-gathered over the ZeRO-1 axes.
  rs = {"nvlink": 0.0, "ib": 0.0}
  ag = {"nvlink": 0.0, "ib": 0.0}
  ar = {"nvlink": 0.0, "ib": 0.0}
  is_spec = lambda x: isinstance(x, P)
  leaves = zip(
    jax.tree.leaves(state.pure),
    jax.tree.leaves(state.specs, is_leaf=is_spec),
    jax.tree.leaves(state.zero1, is_leaf=is_spec),
  )
  for p, spec, zspec in leaves:
    used = _axes(spec)
    zero = [x for x in AXES if x in _axes(zspec) - used and sizes[x] > 1]
    rest = [x for x in AXES if x not in used and x not in zero and sizes[x] > 1]
    nbytes = _nbytes(shard_shape(p.shape, spec, sizes), p.dtype)
    if zero:
      grp, ins = math.prod(sizes[x] for x in zero), math.prod(ext[x] for x in zero)
      for link, v in zip(("nvlink", "ib"), _hier(nbytes, grp, ins)):
        rs[link] += v
        ag[link] += v
    if rest:
      grp, ins = math.prod(sizes[x] for x in rest), math.prod(ext[x] for x in rest)
      for link, v in zip(("nvlink", "ib"), _hier(nbytes, grp, ins)):
        ar[link] += 2 * v
  out["zero1_grad_reduce_scatter"] = rs
  out["zero1_param_all_gather"] = ag
  if ar["nvlink"] or ar["ib"]:
    out["replicated_grad_all_reduce"] = ar
  out["total"] = {
    link: sum(v[link] for k, v in out.items() if isinstance(v, dict)) for link in ("nvlink", "ib")
  }
  return out


# ----------------------------------------------------------------------------- time
def timing(
  cfg: Config, mesh, layout: Layout, comm: dict, hw: Hardware, efficiency: float = 1.0
) -> dict:
  """Step time from the compute at `efficiency` x peak, the schedule and the links."""
  m, n_dev = cfg.model, mesh.size
  tokens_step = cfg.train.global_batch * cfg.train.seq_len
  model_flops = counts.flops_per_token(m, cfg.train.seq_len) * tokens_step
  peak = hw.flops[m.matmul_precision]
  # The busiest stage's share: its MoE layers over the mean (uneven stages hold more).
  imbalance = (
    layout.layers_per_stage * layout.n_stages / m.n_moe_layers
    if layout.schedule is not None
    else 1.0
  )
  device_flops = model_flops / n_dev * imbalance
  # Recomputation (`ModelConfig.remat` = "blocks") reruns the forward inside the backward:
  # the device does 8 FLOPs per matmul parameter and token where the model needs 6.
  rerun = 1 / 3 if m.recomputes else 0.0
  t_model = device_flops / (peak * efficiency)
  # `TrainConfig.logits_chunk` reruns the head's GEMM (main and every MTP depth) in the
  # backward, piece by piece: one more head forward per token. Spread evenly over the
  # devices, as this model spreads the ends' compute (only the end stages run it).
  from dsv3_jax.train.loss import head_pieces  # train depends on parallel, not back

  chunked = head_pieces(cfg.train.logits_chunk, cfg.train.seq_len) > 1
  head_flops = 2 * m.hidden_size * m.vocab_size * (1 + m.num_nextn_predict_layers)
  t_head = head_flops * tokens_step / n_dev / (peak * efficiency) if chunked else 0.0
  t_compute = t_model * (1 + rerun) + t_head
  a2a = comm.get("expert_all_to_all", {"nvlink": 0.0, "ib": 0.0})
  t_a2a = max(a2a["nvlink"] / hw.nvlink, a2a["ib"] / hw.ib)  # NVLink and IB run concurrently
  dp_keys = ("zero1_grad_reduce_scatter", "zero1_param_all_gather", "replicated_grad_all_reduce")
  t_dp = sum(comm[k]["nvlink"] / hw.nvlink + comm[k]["ib"] / hw.ib for k in dp_keys if k in comm)
  out = {
    "peak_flops": peak,
    "efficiency": efficiency,
    "model_flops_per_step": model_flops,
    "device_flops_per_step": device_flops,
    "compute_s": t_compute,
    "recompute_s": t_compute - t_model,
    "expert_all_to_all_s": t_a2a,
    "dp_sync_s": t_dp,
    "comm_to_compute": t_a2a / t_compute if t_compute else 0.0,
  }
  if layout.schedule is None:
    step = t_compute + t_a2a  # no second micro-batch to hide the all-to-all behind
    out.update(bubble_s=0.0, exposed_all_to_all_s=t_a2a)
  else:
    passes = layout.n_mb * layout.n_slots // layout.n_dirs  # chunk passes per rank per step
    f = w = b = t_model / passes / 3  # forward, input gradient, weight gradient
    if rerun:
      # The input-gradient pass reruns the block first; and since a rerun block stores
      # nothing that only its weight gradient reads, its weight gradients come out of that
      # pass too (`StageVJP` defers only the non-rerun parts): W has nothing left to fill
      # the schedule's bubbles with.
      b, w = b + f + w, 0.0
    b += t_head / passes
    # The all-to-all of one pass's forward / backward (the backward's holds the rerun's).
    af = t_a2a / passes / (3 if rerun else 2)
    ab = t_a2a / passes - af
    p2p = comm["pipeline_sends"]
    hop = (p2p["ib"] / hw.ib + p2p["nvlink"] / hw.nvlink) / (2 * passes)
    costs = schedules.Costs(
      F=f + af,
      B=b + ab,
      W=w,
      BW=b + w + ab,
      # DualPipe overlaps one micro-batch's all-to-all with the other's
      # compute (§3.2.1): a pair costs the larger of the two.
      FB=max(f + b + w, af + ab),
      comm=hop,
    )
    sim = schedules.simulate(layout.schedule, costs)
    busy_compute = t_compute
    step = sim.makespan
    out.update(
      bubble_s=float(sim.max_bubble),
      exposed_all_to_all_s=max(0.0, step - busy_compute - float(sim.max_bubble)),
    )
  step += t_dp
  out["step_s"] = step
  out["mfu"] = model_flops / (n_dev * peak * step) if step else 0.0
  out["tokens_per_s"] = tokens_step / step if step else 0.0
  return out


# ----------------------------------------------------------------------------- the plan
def plan_training(
  cfg: Config,
  mesh_sizes: dict | str,
  *,
  node_size: int = 8,
  hardware_name: str = "h800",
  schedule: Optional[str] = None,
  microbatches: Optional[int] = None,
  seq_len: Optional[int] = None,
  global_batch: Optional[int] = None,
  uneven_stages: bool = False,
  trace: bool = True,
  efficiency: float = 1.0,
) -> dict:
  """Memory, communication and time per device of training `cfg` on a mesh of `mesh_sizes`
  ({'data': .., 'expert': .., 'pipe': ..} or 'data:2,expert:64,pipe:16'); JSON-able.

  `trace=False` skips the traced activations (this code's), which traces the model (seconds).
  Raises ValueError, before tracing anything, when the mesh does not divide the config.
  """
  sizes = parse_mesh(mesh_sizes) if isinstance(mesh_sizes, str) else dict(mesh_sizes)
  cfg = configure(
    cfg,
    sizes,
    node_size=node_size,
    schedule=schedule,
    microbatches=microbatches,
    seq_len=seq_len,
    global_batch=global_batch,
  )
  layout = check(cfg, node_size, uneven_stages)
  hw = hardware(hardware_name)
  mesh = abstract_mesh(sizes)
  state = abstract_state(cfg, mesh)
  mem = state_memory(cfg, mesh, state, layout)
  recipe = recipe_activations(cfg, layout)
  static = (
    mem["params"]
    + mem["grads"]
    + mem["optimizer"]
    + mem["router_biases"]
    + mem["step"]
    + mem["batch"]
  )
  memory = dict(
    mem,
    activations_recipe=recipe["activations"],
    total_recipe=static + mem["dualpipe_second_chunk"] + recipe["activations"],
  )
  report_layout = report_layout_memory(cfg, layout)
  traced = None
  if trace:
    traced = traced_activations(cfg, mesh, state, layout)
    memory["activations_traced"] = traced["activations"]
    # Two phases never overlap: the forward/backward (activations, and the pipeline's
    # accumulators) and the update (the new state written next to the old). By the time the
    # update runs every residual is dead, so the peak is the larger of the two, not their sum.
    memory["total_traced"] = static + max(
      mem["pipeline_accumulators"] + traced["activations"], mem["update_copy"]
    )
  comm = communication(cfg, mesh, state, layout)
  m = cfg.model
  return {
    "config": {
      "layers": m.num_hidden_layers,
      "moe_layers": m.n_moe_layers,
      "experts": m.n_routed_experts,
      "params_total": counts.param_counts(m)["total"],
      "seq_len": cfg.train.seq_len,
      "global_batch": cfg.train.global_batch,
      "dtype": m.dtype,
      "matmul_precision": m.matmul_precision,
      "remat": m.remat,
    },
    "mesh": sizes,
    "devices": mesh.size,
    "node_size": node_size,
    "nodes_per_ep_group": layout.n_nodes,
    "schedule": cfg.parallel.pipeline,
    "microbatches": layout.n_mb,
    "microbatch_sequences": layout.mb_seqs,
    "stages": layout.n_stages,
    "moe_layers_per_stage": layout.layers_per_stage,
    "even_stages": layout.even,
    "in_flight": layout.in_flight,
    "chunks_per_rank": layout.n_slots,
    "parameter_copies": layout.param_copies,
    "hardware": {
      "name": hw.name,
      "source": hw.source,
      "memory_bytes": hw.memory,
      "nvlink_bytes_s": hw.nvlink,
      "ib_bytes_s": hw.ib,
    },
    "memory": memory,
    "activations_recipe_detail": recipe,
    "report_layout": report_layout,
    "activations_traced_detail": traced,
    "communication": comm,
    "time": timing(cfg, mesh, layout, comm, hw, efficiency),
  }


def format_table(r: dict) -> str:
  """The plan as a printed table (GB = 1e9 bytes)."""
  g = lambda b: f"{b / GB:10.2f} GB"
  mem, comm, t = r["memory"], r["communication"], r["time"]
  mesh = " x ".join(f"{a} {n}" for a, n in r["mesh"].items())
  c = r["config"]
  n = c["params_total"]
  size = f"{n / 1e9:.0f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
  if r["schedule"] == "none":
    pipe = f"no pipeline, {r['microbatch_sequences']} sequence(s) per device"
  else:
    pipe = (
      f"{r['schedule']}: {r['stages']} stages, {r['moe_layers_per_stage']} MoE layers "
      f"on the busiest{'' if r['even_stages'] else ' (uneven)'}, {r['microbatches']} "
      f"micro-batches of {r['microbatch_sequences']} sequence(s), {r['in_flight']} in "
      "flight"
    )
  lines = [
    f"{size} params ({c['moe_layers']} MoE layers, {c['experts']} experts), "
    f"{c['matmul_precision']} matmuls, {c['dtype']} activations; seq {c['seq_len']}, "
    f"batch {c['global_batch']}",
    f"mesh {mesh} = {r['devices']} devices, {r['node_size']} per node "
    f"({r['nodes_per_ep_group']} nodes per EP group); {pipe}",
    "",
    "memory per device",
    f"  parameters (fp32 masters)        {g(mem['params'])}",
    f"  gradients (fp32)                 {g(mem['grads'])}",
    f"  optimizer (bf16 moments, ZeRO-1) {g(mem['optimizer'])}",
  ]
  if mem["dualpipe_second_chunk"]:
    lines.append(f"  DualPipe second chunk (p + g)    {g(mem['dualpipe_second_chunk'])}")
  lines.append(
    f"  batch, router biases, step       {g(mem['batch'] + mem['router_biases'] + mem['step'])}"
  )
  lines.append(f"  activations, report's recipe     {g(mem['activations_recipe'])}")
  if "activations_traced" in mem:
    lines.append(f"  activations, this code (traced)  {g(mem['activations_traced'])}")
    size, name = r["activations_traced_detail"]["largest_residuals"][0]
    lines.append(f"    (largest residual {name}: {size / GB:.2f} GB per micro-batch-stage)")
    rerun = r["activations_traced_detail"].get("recompute_working_set")
    if rerun:
      lines.append(f"    (of which the largest recomputed piece, live once: {rerun / GB:.2f} GB)")
  if "activations_traced" in mem:
    lines.append(
      f"  pipeline accumulators            {g(mem['pipeline_accumulators'])}"
      "  (live with the activations)"
    )
    lines.append(
      f"  updated state                    {g(mem['update_copy'])}"
      "  (after the backward: the peak takes the larger phase)"
    )
  lines.append(f"  total, report's recipe           {g(mem['total_recipe'])}")
  if "total_traced" in mem:
    lines.append(f"  total, this code                 {g(mem['total_traced'])}")
  if r["hardware"]["memory_bytes"]:
    lines.append(f"  ({r['hardware']['name']} memory {g(r['hardware']['memory_bytes']).strip()})")
  lay = r["report_layout"]
  held = [lay["stages"][s] for s in lay["rank_stages"]]
  what = ", ".join(
    f"{sum(st[k] for st in held)} {name}"
    for k, name in (("dense", "dense"), ("moe", "MoE"), ("mtp", "MTP"))
    if sum(st[k] for st in held)
  )
  ends = [e for e in ("embedding", "head") if any(st[e] for st in held)]
  lines += [
    "",
    "memory per device, the report's layout (analytic: ends on the end ranks, bf16 working",
    "weights, fp32 gradients, ZeRO-1 masters and moments, the recipe's activations)",
    f"  busiest: rank {lay['busiest_rank']} of {len(lay['rank_totals'])}, stage(s) "
    f"{' + '.join(map(str, lay['rank_stages']))}: {what}"
    + (f", {' and '.join(ends)}" if ends else ""),
    f"  {'working weights (' + c['dtype'] + ')':<33}{g(lay['weights'])}",
    f"  gradients (fp32)                 {g(lay['grads'])}",
    f"  ZeRO-1 masters + moments         {g(lay['optimizer'])}",
    f"  activations, report's recipe     {g(lay['activations'])}",
    f"  total                            {g(lay['total'])}"
    f"  (ranks {min(lay['rank_totals']) / GB:.1f}-{max(lay['rank_totals']) / GB:.1f} GB)",
  ]
  rerun = c["remat"] != "none"
  lines += ["", "communication per device per step        NVLink           IB"]
  for key, label in (
    (
      "expert_all_to_all",
      "expert all-to-all (fwd+bwd+rerun)" if rerun else "expert all-to-all (fwd + bwd)",
    ),
    ("pipeline_sends", "pipeline sends (act + grad)"),
    ("zero1_grad_reduce_scatter", "ZeRO-1 grad reduce-scatter"),
    ("zero1_param_all_gather", "ZeRO-1 param all-gather"),
    ("replicated_grad_all_reduce", "all-reduce, replicated over pipe"),
    ("total", "total"),
  ):
    if key in comm:
      lines.append(f"  {label:<34}{g(comm[key]['nvlink'])}{g(comm[key]['ib'])}")
  if "expert_all_to_all" in comm:
    e = comm["expert_all_to_all"]
    lines.append(
      f"  (a token reaches <= {e['nodes_per_token']} nodes, "
      f"{e['remote_nodes_per_token']:.2f} remote on average; "
      f"{e['moe_layer_passes']:g} MoE layer passes per token)"
    )
  peak = (
    f"{t['peak_flops'] / 1e12:.0f} TFLOPS"
    if t["peak_flops"] >= 1e12
    else f"{t['peak_flops'] / 1e9:.0f} GFLOPS"
  )
  lines += [
    "",
    f"time per step on {r['hardware']['name']} ({r['hardware']['source']})",
    f"  {'compute at ' + format(t['efficiency'], '.0%') + ' of ' + peak:<33}"
    f"{t['compute_s']:10.3f} s"
    + (f"  (recomputation {t['recompute_s']:.3f} s of it)" if t["recompute_s"] else ""),
    f"  expert all-to-all                {t['expert_all_to_all_s']:10.3f} s  "
    f"(comm : compute = {t['comm_to_compute']:.2f} : 1)",
    f"  pipeline bubble                  {t['bubble_s']:10.3f} s",
    f"  exposed all-to-all               {t['exposed_all_to_all_s']:10.3f} s",
    f"  data-parallel sync               {t['dp_sync_s']:10.3f} s",
    f"  step                             {t['step_s']:10.3f} s   MFU {t['mfu']:.1%}, "
    f"{t['tokens_per_s']:,.0f} tokens/s",
  ]
  return "\n".join(lines)


__all__ = [
  "HARDWARE",
  "Hardware",
  "Layout",
  "abstract_mesh",
  "check",
  "communication",
  "configure",
  "format_table",
  "hardware",
  "measure_cpu",
  "node_extents",
  "parse_mesh",
  "plan_training",
  "recipe_activations",
  "recipe_layer_bytes",
  "report_layout_memory",
  "report_stages",
  "shard_shape",
  "state_memory",
  "timing",
  "traced_activations",
]
