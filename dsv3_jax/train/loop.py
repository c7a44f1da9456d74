"""`train_and_evaluate(config, workdir)`: the whole training job, callable from a notebook.

Data -> sharded state -> jitted steps with periodic metrics, held-out evaluation and
asynchronous checkpoints. A workdir that already holds a checkpoint is resumed: the state,
the router biases and the data iterator continue exactly where they stopped. A non-finite
loss stops the run with `FloatingPointError` before anything is saved, so the last good
checkpoint is never overwritten.
"""

import dataclasses
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dsv3_jax import config as config_lib
from dsv3_jax import counts
from dsv3_jax import data as data_lib
from dsv3_jax.checkpoint.orbax import Checkpointer
from dsv3_jax.parallel import distributed
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.train.metrics import MetricWriter
from dsv3_jax.train.step import Trainer


@dataclasses.dataclass
class Corpus:
  tokenizer: Any
  train_tokens: np.ndarray
  heldout_tokens: np.ndarray
  unigram_entropy: float  # nats per token of the held-out tokens' unigram distribution


def load_corpus(cfg: config_lib.Config) -> Corpus:
  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer or None)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"invalid config field `model.vocab_size` = {cfg.model.vocab_size}: the "
                     f"tokenizer has {tokenizer.vocab_size} ids")
  files = data_lib.resolve_files(cfg.data.path or None)
  train_files, heldout_files = data_lib.split_files(files, cfg.data.heldout_fraction,
                                                    seed=cfg.train.seed)
  cap = cfg.data.max_bytes or None
  train = data_lib.load_tokens(train_files, tokenizer, max_bytes=cap)
  heldout = data_lib.load_tokens(heldout_files, tokenizer,
                                 max_bytes=None if cap is None else max(cap // 10, 1 << 16))
  entropy = data_lib.unigram_entropy(heldout, tokenizer.vocab_size)
  return Corpus(tokenizer, train, heldout, entropy)


def _to_global(batch: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


@jax.jit
def _record_non_finite(first_bad, finite, step):
  return jnp.where((first_bad == 0) & ~finite, step, first_bad)


def _raise_if_non_finite(first_bad):
  bad = int(first_bad)
  if bad:
    raise FloatingPointError(f"loss is non-finite or the weights overflowed at step {bad}; "
                             "stopping without saving (the last good checkpoint is kept)")


def evaluate(trainer: Trainer, state, batches, sharding) -> float:
  losses = [float(trainer.eval_step(state, _to_global(b, sharding))) for b in batches]
  return float(np.mean(losses))


def train_and_evaluate(config, workdir: str, *, max_steps: Optional[int] = None,
                       progress: bool = True) -> dict:
  """Trains `config` (a ConfigDict or `Config`) in `workdir`; returns a summary dict.

  `max_steps` stops early after that many steps of this call (the schedule still spans
  `train.steps`), which tests use to simulate an interrupted run.
  """
  cfg = config if isinstance(config, config_lib.Config) else config_lib.from_dict(config)
  tcfg = cfg.train
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(cfg.parallel)
  n_batch_shards = mesh_lib.batch_size_per_step(mesh)
  if tcfg.global_batch % n_batch_shards:
    raise ValueError(f"invalid config field `train.global_batch` = {tcfg.global_batch}: must "
                     f"be divisible by the data x expert mesh size {n_batch_shards}")
  is_main = jax.process_index() == 0
  logging.info("process %d/%d, mesh %s, %s", jax.process_index(), jax.process_count(),
               dict(mesh.shape), counts.describe(cfg.model))

  corpus = load_corpus(cfg)
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  data_iter = data_lib.make_train_iterator(corpus.train_tokens, tcfg.seq_len, tcfg.global_batch,
                                           seed=tcfg.seed, **shard)
  heldout = data_lib.eval_batches(corpus.heldout_tokens, tcfg.seq_len, tcfg.global_batch,
                                  tcfg.eval_batches, **shard)

  if cfg.parallel.pipeline == "none":
    trainer = Trainer(cfg, mesh)
  else:  # the model cut into stages over the `pipe` mesh axis (1F1B or DualPipe)
    from dsv3_jax.train.pipeline_step import PipelineTrainer
    trainer = PipelineTrainer(cfg, mesh)
  memory = trainer.memory_per_device()
  if is_main:
    mb = {k: v / 2**20 for k, v in memory.items()}
    line = (f"train state per device: {mb['total']:.2f} MiB (params {mb['params']:.2f}, "
            f"optimizer {mb['opt_state']:.2f} with ZeRO-1 vs {mb['opt_state_without_zero1']:.2f}"
            f" without) on mesh {dict(mesh.shape)}")
    logging.info(line)
    print(line, flush=True)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints)
  writer = MetricWriter(workdir, enabled=is_main)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_lib.to_dict(cfg), f, indent=1)
    writer.write_hparams(config_lib.to_dict(cfg))

  start_step = ckpt.latest_step()
  if start_step is not None:
    state, _ = ckpt.restore(start_step, trainer.abstract_state(), data_iter)
    logging.info("resumed from step %d", start_step)
  else:
    state, start_step = trainer.init(), 0

  end_step = tcfg.steps if max_steps is None else min(tcfg.steps, start_step + max_steps)
  tokens_per_step = tcfg.global_batch * tcfg.seq_len
  flops_tok = counts.flops_per_token(cfg.model, tcfg.seq_len)
  history, eval_history = [], []
  bar = None
  if progress and is_main:
    from tqdm import tqdm
    bar = tqdm(total=end_step, initial=start_step, desc="train", unit="step")
  t_start = time.time()
  t_window, window_steps = time.time(), 0
  step = start_step
  first_bad = jnp.zeros((), jnp.int32)  # 0 = every step so far finite
  try:
    while step < end_step:
      batch = _to_global(next(data_iter), trainer.batch_sharding)
      state, metrics = trainer.train_step(state, batch)
      step += 1
      window_steps += 1
      # No host sync per step: the first non-finite step is recorded on device and checked
      # wherever the host waits anyway (metrics, eval, checkpoint), always before a save.
      first_bad = _record_non_finite(first_bad, metrics["finite"], step)
      distributed.kick()
      if bar is not None:
        bar.update(1)
      syncs = [tcfg.log_every, tcfg.eval_every, tcfg.checkpoint_every]
      if step == end_step or any(step % n == 0 for n in syncs):
        _raise_if_non_finite(first_bad)
      if step % tcfg.log_every == 0 or step == end_step:
        if bar is not None:
          bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
        elapsed = time.time() - t_window
        tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
        scalars = {k: v for k, v in metrics.items() if k not in ("load", "finite")}
        scalars.update(tokens_per_sec=tok_s, model_flops_per_sec=tok_s * flops_tok)
        record = writer.write(step, scalars, {"load": metrics["load"]})
        history.append({"step": step, **record})
        t_window, window_steps = time.time(), 0
      if step % tcfg.eval_every == 0 or step == end_step:
        eval_loss = evaluate(trainer, state, heldout, trainer.batch_sharding)
        writer.write(step, {"heldout_loss": eval_loss})
        eval_history.append({"step": step, "heldout_loss": eval_loss})
      if step % tcfg.checkpoint_every == 0 or step == end_step:
        ckpt.save(step, state, data_iter, {"step": step, "config": config_lib.to_dict(cfg)})
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.close()

  summary = {
      "steps": step, "start_step": start_step,
      "final_loss": history[-1]["loss"] if history else None,
      "heldout_loss": eval_history[-1]["heldout_loss"] if eval_history else None,
      "unigram_entropy": corpus.unigram_entropy,
      "wall_time_s": time.time() - t_start,
      "memory_per_device": memory,
      "history": history, "eval_history": eval_history,
  }
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=1)
  summary["state"] = state
  summary["trainer"] = trainer
  summary["tokenizer"] = corpus.tokenizer
  return summary
