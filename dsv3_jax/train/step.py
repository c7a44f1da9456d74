"""The train state, created already sharded, and the jitted train and eval steps.

State is plain pytrees: `params` (float32 masters, trained by the gradient), `biases` (the
MoE routers' aux-loss-free biases, moved by loads only), the optax state and the step.
The model's structure (`graphdef`) is static; `nnx.merge` rebuilds the modules inside the
jitted functions, which is much cheaper per call than `nnx.jit`.

Shardings (all decided in `parallel/mesh.py`): parameters replicated, routed experts split
over `expert`; the optimizer state is ZeRO-1 — split further over the data-parallel axes
(`mesh.zero1_spec`), so each device keeps 1/(data x expert) of the dense parameters' AdamW
moments and 1/data of its experts'. The compiler all-gathers the updated parameters. With an
`expert` axis > 1 the MoE layers run expert-parallel (`parallel/expert.py`) while tracing.
"""

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from dsv3_jax import model as model_lib
from dsv3_jax.config import Config
from dsv3_jax.layers.moe import RouterBias
from dsv3_jax.parallel import expert as expert_lib
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.train import balance
from dsv3_jax.train.loss import cross_entropy, model_losses
from dsv3_jax.train.optimizer import learning_rate_schedule, make_optimizer


class TrainState(NamedTuple):
  params: Any
  biases: Any
  opt_state: Any
  step: jax.Array


def split_model(model) -> tuple[Any, dict, dict]:
  graphdef, params, biases = nnx.split(model, nnx.Param, RouterBias)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(biases)


def update_biases(biases: dict, loads_LxE: jax.Array, gamma: float) -> dict:
  """Applies the bias update layer by layer; loads are ordered main MoE layers, then MTP."""
  new = jax.tree.map(lambda x: x, biases)
  i = 0
  if "moe" in biases:
    b = biases["moe"]["ffn"]["bias"]
    new["moe"]["ffn"]["bias"] = balance.bias_update(b, loads_LxE[i:i + b.shape[0]], gamma)
    i += b.shape[0]
  for k in sorted(biases.get("mtp", {})):
    b = biases["mtp"][k]["block"]["ffn"]["bias"]
    new["mtp"][k]["block"]["ffn"]["bias"] = balance.bias_update(b, loads_LxE[i], gamma)
    i += 1
  return new


class Trainer:
  """Owns the model structure, the optimizer, the mesh and the compiled step functions."""

  def __init__(self, cfg: Config, mesh: Mesh):
    self.cfg = cfg
    self.mesh = mesh
    self.optimizer = make_optimizer(cfg.train)
    self.lr = learning_rate_schedule(cfg.train)
    abstract = model_lib.abstract(cfg.model)
    self.graphdef, abs_params, abs_biases = nnx.split(abstract, nnx.Param, RouterBias)
    self.expert_parallel = expert_lib.from_config(mesh, cfg.parallel)
    if self.expert_parallel.size > 1:
      ep = self.expert_parallel.validate(cfg.model)
      logging.info("expert parallel: %d EP ranks in %d nodes, %d experts per rank, a token "
                   "reaches at most %d nodes, capacity factor %s", ep.size, ep.n_nodes,
                   cfg.model.n_routed_experts // ep.size,
                   expert_lib.max_nodes_per_token(cfg.model, ep.n_nodes),
                   ep.capacity_factor or "0 (dropless)")
    repl = mesh_lib.replicated(mesh)
    specs = mesh_lib.param_specs(abs_params)
    param_sh = mesh_lib.shardings(mesh, specs)
    bias_sh = jax.tree.map(lambda _: repl, nnx.to_pure_dict(abs_biases))
    abs_opt = jax.eval_shape(self.optimizer.init, nnx.to_pure_dict(abs_params))
    # ZeRO-1: each moment is split over the data-parallel axes its parameter is replicated on.
    zero1_sh = mesh_lib.shardings(
        mesh, mesh_lib.zero1_specs(nnx.to_pure_dict(abs_params), specs, mesh))
    opt_sh = optax.tree_map_params(self.optimizer, lambda _, s: s, abs_opt, zero1_sh,
                                   transform_non_params=lambda _: repl)
    self._opt_sharding_like_params = optax.tree_map_params(  # for the memory report only
        self.optimizer, lambda _, s: s, abs_opt, param_sh, transform_non_params=lambda _: repl)
    self.state_sharding = TrainState(param_sh, bias_sh, opt_sh, repl)
    self.batch_sharding = mesh_lib.batch_sharding(mesh)
    # Created already sharded: nothing is materialised on one device first.
    self._init = jax.jit(self._init_fn, out_shardings=self.state_sharding)
    # The state is donated: the step updates it in place.
    self.train_step = jax.jit(self._train_fn, donate_argnums=0,
                              in_shardings=(self.state_sharding, self.batch_sharding),
                              out_shardings=(self.state_sharding, repl))
    self.eval_step = jax.jit(self._eval_fn,
                             in_shardings=(self.state_sharding, self.batch_sharding),
                             out_shardings=repl)

  def abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(self._init_fn)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_sharding)

  def init(self) -> TrainState:
    return self._init()

  def memory_per_device(self) -> dict:
    """Bytes of the train state on the busiest device, by part (from shapes: no allocation)."""
    state = self.abstract_state()
    opt_like_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                      sharding=sh),
                                   state.opt_state, self._opt_sharding_like_params)
    parts = {"params": state.params, "biases": state.biases, "opt_state": state.opt_state}
    out = {name: mesh_lib.bytes_per_device(tree) for name, tree in parts.items()}
    out["total"] = mesh_lib.bytes_per_device(state)
    out["opt_state_without_zero1"] = mesh_lib.bytes_per_device(opt_like_params)
    return out

  def _parallel(self):
    """Expert parallelism for the MoE layers traced inside (a no-op without an expert axis)."""
    if self.expert_parallel.size > 1:
      return expert_lib.use(self.expert_parallel)
    return contextlib.nullcontext()

  def _init_fn(self) -> TrainState:
    model = model_lib.create(self.cfg.model, seed=self.cfg.train.seed)
    _, params, biases = split_model(model)
    return TrainState(params, biases, self.optimizer.init(params), jnp.zeros((), jnp.int32))

  def merge(self, params, biases):
    return nnx.merge(self.graphdef, params, biases)

  def _train_fn(self, state: TrainState, batch: dict):
    with self._parallel():
      return self._train_body(state, batch)

  def _train_body(self, state: TrainState, batch: dict):
    tcfg = self.cfg.train

    def loss_fn(params):
      loss, metrics, loads = model_losses(self.merge(params, state.biases), batch["tokens"], tcfg)
      return loss, (metrics, loads)

    (_, (metrics, loads)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return self.apply_gradients(state, grads, metrics, loads)

  def apply_gradients(self, state: TrainState, grads, metrics: dict, loads_LxE):
    """AdamW on the params, the bias update from the loads, and the step's metrics.

    Shared by every way of computing the gradients (this step, the pipelined one).
    """
    tcfg = self.cfg.train
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    biases = update_biases(state.biases, loads_LxE, tcfg.bias_update_gamma)
    # A finite loss can still leave overflowed weights behind: check the new state too.
    finite = jnp.isfinite(metrics["loss"]) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    metrics = dict(metrics, finite=finite, grad_norm=optax.global_norm(grads),
                   learning_rate=self.lr(state.step),
                   max_vio=balance.max_violation(loads_LxE), load=loads_LxE)
    return TrainState(params, biases, opt_state, state.step + 1), metrics

  def _eval_fn(self, state: TrainState, batch: dict):
    tokens = batch["tokens"]
    with self._parallel():
      out = self.merge(state.params, state.biases).forward(tokens[:, :-1])
    return cross_entropy(out.logits_BxLxV, tokens[:, 1:])
