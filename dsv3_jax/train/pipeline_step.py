"""The pipelined train step: `Trainer`'s step with the model cut into pipeline stages.

Stages are equal slices of the stacked MoE layers (`params['moe']`, leading layer
axis): stage ``s`` of ``S`` runs MoE layers ``[s*n/S, (s+1)*n/S)``.  The embedding
and the dense layers run in stage 0; the final norm, the output head, the MTP
modules and every loss in stage ``S-1``.  Under DualPipe rank ``r`` holds stages
``r`` and ``S-1-r``, so rank 0 (and rank ``S-1``) holds both ends: the shared
embedding and the output head sit on the same rank, and MTP -- which needs both --
runs there with no extra transfer, as DeepSeek-V3 does.  Under 1F1B they are on
ranks 0 and ``S-1``; rather than sending MTP's embeddings down the pipe, those
"shared" parameters are replicated on every pipe rank and their gradients summed
(`Pipeline`'s ``shared_params``); each rank runs only what its stage needs, except the
embedding lookups: every stage gathers the inputs' and the MTP depths' embeddings (one
gather, outside the stage conds; its backward scatter-adds zeros off the ends), so that the
B/W split defers no table-sized gradient (`make_stage_fn`).

Everything else is `Trainer`'s: the state, its sharding, the optimizer, the bias
update and the metrics.  Loss, gradients and loads equal the unpipelined step's up
to float rounding (tests check it): micro-batches have equal sizes, so the mean
of their mean losses is the batch mean, and loads are sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from dsv3_jax.config import Config
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.parallel import schedules
from dsv3_jax.parallel.pipeline import Pipeline
from dsv3_jax.parallel.expert import STATS
from dsv3_jax.parallel.sharding import STAGED
from dsv3_jax.train.loss import head_losses, shifted_inputs
from dsv3_jax.train.step import Trainer, TrainState


def make_schedule(name: str, pp: int, n_mb: int) -> schedules.Schedule:
  """The schedule ``name`` (`schedules.SCHEDULES`) with errors naming the config fields."""
  if name not in schedules.SCHEDULES:
    raise ValueError(
      f"invalid config field `parallel.pipeline` = {name!r}: must be one of "
      f"{sorted(schedules.SCHEDULES)} (or 'none')"
    )
  try:
    return schedules.SCHEDULES[name](pp, n_mb)
  except ValueError as e:
    raise ValueError(
      f"invalid config fields `parallel.pipe` = {pp} / "
      f"`parallel.microbatches` = {n_mb} for pipeline {name!r}: {e}"
    ) from e


def split_params(tree: dict, n_stages: int, specs: bool = False) -> tuple[dict, dict]:
  """``(stage tree with leaves [n_stages, n/S, ...], the rest)``; with ``specs``, the same
  split of a tree of PartitionSpecs (a stage leaf's stage axis is over ``pipe``)."""
  if specs:
    is_spec = lambda x: isinstance(x, P)
    stage = jax.tree.map(lambda s: P("pipe", None, *s[1:]), tree[STAGED], is_leaf=is_spec)
    return stage, {k: v for k, v in tree.items() if k != STAGED}
  per = None
  for a in jax.tree.leaves(tree[STAGED]):
    per = a.shape[0] // n_stages
  stage = jax.tree.map(lambda a: a.reshape(n_stages, per, *a.shape[1:]), tree[STAGED])
  return stage, {k: v for k, v in tree.items() if k != STAGED}


def join_params(stage: dict, shared: dict) -> dict:
  flat = jax.tree.map(lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), stage)
  return dict(shared, **{STAGED: flat})


def make_stage_fn(graphdef, cfg: Config, n_stages: int, scale: float, routed=None):
  """DeepSeek-V3 stage ``stage`` for one micro-batch (see `Pipeline` for the contract).

  ``loss`` is this stage's share of the objective times ``scale`` (1 / micro-batches
  summed): the balance loss of its MoE layers and, in the last stage, CE + MTP.
  ``aux`` holds loads ``[n_moe + D, E]`` (zero outside this stage's rows) and the
  un-scaled CE, MTP CE and balance loss for the metrics.
  """
  mcfg, tcfg = cfg.model, cfg.train
  n_moe, depth = mcfg.n_moe_layers, mcfg.num_nextn_predict_layers
  per, n_exp = n_moe // n_stages, max(mcfg.n_routed_experts, 1)

  def stage_fn(chunk_p, shared_p, x_BxLxD, chunk_b, shared_b, tokens_BxL1, stage):
    model = nnx.merge(
      graphdef, dict(shared_p, **{STAGED: chunk_p}), dict(shared_b, **{STAGED: chunk_b})
    )
    inputs = tokens_BxL1[:, :-1]
    b, l = inputs.shape
    ctx = model.context((b, l), routed=routed)  # sequences from position 0

    # Every embedding lookup of the step -- the inputs' and each MTP depth's -- is one
    # gather on every stage, outside the stage conds. Under the B/W split the first stage's
    # whole backward (the dense blocks, the table's share from the inputs) is weight work
    # and goes to W, while the last stage's MTP share is computed in B; the table's two
    # shares then meet in W. Looked up in the readout's `cond`, the MTP share crossed from B
    # to W as a [vocab, hidden] float32 table gradient in every micro-batch's r2 entry (3.7
    # of the 671B plan's 3.9 GB under recomputation); from one lookup it crosses as the
    # MTP embeddings' cotangent, [depth, batch, length, hidden].
    emb = model.embed_tokens(shifted_inputs(tokens_BxL1, depth))  # [1 + depth, B, L, hidden]

    def embed(e):  # the walk's first pieces: embedding, then the dense blocks
      if model.dense is not None:
        e = model.run_dense(e, ctx).x_BxLxD
      return e.astype(x_BxLxD.dtype)

    h = jax.lax.cond(stage == 0, embed, lambda e: x_BxLxD, emb[0])
    res = model.run_moe(h, ctx)  # this stage's slice of the MoE stack
    h = res.x_BxLxD
    load = jax.lax.dynamic_update_slice(
      jnp.zeros((n_moe + depth, n_exp), jnp.float32),
      res.load_LxE.astype(jnp.float32),
      (stage * per, 0),
    )

    def readout():  # the walk's last piece and the objective's readout part
      r = head_losses(model, model.norm(h), tokens_BxL1, tcfg, routed, emb[1:] if depth else None)
      mtp_ce = r.mtp_ce if r.mtp_ce is not None else jnp.zeros((), jnp.float32)
      return r.loss, r.ce, mtp_ce, r.mtp_balance, r.mtp_load_DxE

    def no_readout():
      z = jnp.zeros((), jnp.float32)
      return z, z, z, z, jnp.zeros((depth, n_exp), jnp.float32)

    head_loss, ce, mtp_ce, mtp_balance, mtp_load = jax.lax.cond(
      stage == n_stages - 1, readout, no_readout
    )
    load = load.at[n_moe:].add(mtp_load)
    loss = (head_loss + tcfg.balance_alpha * res.balance_loss) * scale
    aux = {
      "load": load,
      "ce": ce,
      "balance_loss": res.balance_loss + mtp_balance,
      **res.stats,
    }  # expert-parallel dispatch statistics, per shard: summed by Pipeline
    if depth:
      aux["mtp_ce"] = mtp_ce
    return (h, loss), aux

  return stage_fn


class PipelineTrainer(Trainer):
  """`Trainer` whose step runs the model as a pipeline over the mesh's ``pipe`` axis.

  ``cfg.parallel.pipeline`` names the schedule (``1f1b``, ``dualpipe``; the
  executor also takes ``gpipe``, ``zb1p`` and ``dualpipev``), ``microbatches`` the
  micro-batches per batch shard.  The batch is split over ``data x expert`` as in
  `Trainer`; each shard runs its own pipeline over ``pipe``.
  """

  def __init__(
    self, cfg: Config, mesh: Mesh, *, schedule_name: str | None = None, granularity: str = "unit"
  ):
    pcfg, mcfg, tcfg = cfg.parallel, cfg.model, cfg.train
    name = schedule_name or pcfg.pipeline
    pp = mesh.shape["pipe"]
    if pp < 2:
      raise ValueError(
        f"invalid config field `parallel.pipe` = {pp}: pipeline {name!r} "
        "needs at least 2 pipe ranks"
      )
    self.schedule = make_schedule(name, pp, pcfg.microbatches)
    n_stages = self.schedule.n_stages
    if mcfg.n_moe_layers == 0 or mcfg.n_moe_layers % n_stages:
      raise ValueError(
        f"invalid config field `model.num_hidden_layers` = "
        f"{mcfg.num_hidden_layers}: its {mcfg.n_moe_layers} MoE layers must "
        f"split evenly into {n_stages} pipeline stages ({name})"
      )
    shards = mesh_lib.batch_size_per_step(mesh)
    if tcfg.global_batch % (shards * pcfg.microbatches):
      raise ValueError(
        f"invalid config field `train.global_batch` = {tcfg.global_batch}: "
        f"must be divisible by data x expert ({shards}) x "
        f"parallel.microbatches ({pcfg.microbatches})"
      )
    super().__init__(cfg, mesh)
    self.n_stages, self.n_shards = n_stages, shards
    self.mb_size = tcfg.global_batch // (shards * pcfg.microbatches)
    scale = 1.0 / (shards * pcfg.microbatches)
    # Stages own their layers (params, gradients, moments split over `pipe`) and the MoE
    # layers stay expert-parallel inside: both placements come from the sharding plan.
    self.stage_fn = make_stage_fn(
      self.graphdef, cfg, n_stages, scale, routed=self.plan.routed_in_shard_map
    )
    stage_specs, shared_specs = split_params(self.param_specs, n_stages, specs=True)
    self.pipeline = Pipeline(
      self.stage_fn,
      self.schedule,
      mesh,
      pipe_axis="pipe",
      batch_axes=mesh_lib.BATCH,
      granularity=granularity,
      stage_specs=stage_specs,
      shared_specs=shared_specs,
    )

  def act_spec(self) -> jax.ShapeDtypeStruct:
    m = self.cfg.model
    return jax.ShapeDtypeStruct(
      (self.mb_size, self.cfg.train.seq_len, m.hidden_size), jnp.dtype(m.dtype)
    )

  def loss_and_grads(self, params: dict, biases: dict, tokens_BxL1: jax.Array, *, probe=None):
    """``(loss, metrics, loads, grads)`` of one batch, computed by the pipeline.

    ``probe`` is passed to `Pipeline.__call__` (per-op instrumentation, e.g. timestamps)."""
    sp, shp = split_params(params, self.n_stages)
    sb, shb = split_params(biases, self.n_stages)
    loss, aux, g_stage, g_shared = self.pipeline(
      sp, shp, sb, shb, tokens_BxL1, self.act_spec(), probe=probe
    )
    grads = join_params(g_stage, g_shared)
    n = self.n_shards * self.cfg.parallel.microbatches
    metrics = {
      "ce": aux["ce"] / n,
      "loss": loss,
      "balance_loss": aux["balance_loss"] / n,
      **{k: aux[k] for k in STATS if k in aux},
    }
    if "mtp_ce" in aux:
      metrics["mtp_ce"] = aux["mtp_ce"] / n
    return loss, metrics, aux["load"], grads

  def _train_fn(self, state: TrainState, batch: dict, steps: jax.Array):
    _, metrics, loads, grads = self.loss_and_grads(state.params, state.biases, batch["tokens"])
    return self.apply_gradients(state, grads, metrics, loads, steps)
