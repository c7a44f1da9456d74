"""`train_and_evaluate(config, workdir)`: the whole training job, callable from a notebook.

Data -> sharded state -> jitted steps with periodic metrics, held-out evaluation and
asynchronous checkpoints. A workdir that already holds a checkpoint is resumed: the state,
the router biases and the data iterator continue exactly where they stopped, from the newest
step that restores (a truncated or corrupted one is set aside with a warning), after
temporary directories of saves that never finished are removed; metric records past the
resumed step (written by a run that died before its next checkpoint) are dropped, so
`metrics.jsonl` reads as one run.

A non-finite loss stops the run with `FloatingPointError` naming the step, before anything
is saved, so the last good checkpoint is never overwritten. Rerunning with the config field
`train.skip_batches` (that step's batch is dropped) or `train.lr_scale` (a lower learning
rate), with `train.resume_step` to roll back further, gets past it. (DeepSeek-V3's own run
had no irrecoverable loss spike and no rollback, arXiv 2412.19437 §1; smaller runs may.)
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
from dsv3_jax.train.optimizer import length_free_steps
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
    raise ValueError(
      f"invalid config field `model.vocab_size` = {cfg.model.vocab_size}: the "
      f"tokenizer has {tokenizer.vocab_size} ids"
    )
  files = data_lib.resolve_files(cfg.data.path or None)
  train_files, heldout_files = data_lib.split_files(
    files, cfg.data.heldout_fraction, seed=cfg.data.split_seed
  )
  cap = cfg.data.max_bytes or None
  train = data_lib.load_tokens(train_files, tokenizer, max_bytes=cap)
  heldout = data_lib.load_tokens(
    heldout_files, tokenizer, max_bytes=None if cap is None else max(cap // 10, 1 << 16)
  )
  entropy = data_lib.unigram_entropy(heldout, tokenizer.vocab_size)
  return Corpus(tokenizer, train, heldout, entropy)


def _to_global(batch: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


@jax.jit
def _record_non_finite(first_bad, finite, step):
  return jnp.where((first_bad == 0) & ~finite, step, first_bad)


def _raise_if_non_finite(first_bad, last_saved: Optional[int], ckpt: Checkpointer):
  bad = int(first_bad)
  if not bad:
    return
  if last_saved is None:
    raise FloatingPointError(
      f"loss is non-finite or the weights overflowed at step {bad}, before any checkpoint "
      f"was saved in {ckpt.directory}; stopping. A rerun starts from step 0: lower the "
      "learning rate (train.lr_scale=0.5, --config.train.lr_scale=0.5) or skip the batch "
      f'(train.skip_batches="{bad}", --config.train.skip_batches={bad})'
    )
  raise FloatingPointError(
    f"loss is non-finite or the weights overflowed at step {bad}; stopping without saving "
    f"(the last good checkpoint, step {last_saved} in {ckpt.directory}, is kept and a rerun "
    f"in the same workdir resumes from it). To get past step {bad}, rerun with "
    f'train.skip_batches="{bad}" (--config.train.skip_batches={bad}: steps from {bad} on '
    f'train on later batches; a window "{bad}-{bad + 9}" drops more) or with a lower '
    "learning rate, train.lr_scale=0.5 (--config.train.lr_scale=0.5); if the weights of "
    f"step {last_saved} are already off, also roll back with train.resume_step=<step> "
    f"(--config.train.resume_step=<step>; checkpoints: {ckpt.all_steps()})"
  )


def _resume(ckpt: Checkpointer, trainer, data_iter, tcfg: config_lib.TrainConfig):
  """(state, start step, meta) of the run to continue: the newest checkpoint step that
  restores, or `train.resume_step` when set and not applied before (later steps are moved to
  `checkpoints.rolled_back/`); a fresh state at step 0 and None without a checkpoint."""
  ckpt.remove_orphaned_tmp()  # saves a killed run left unfinished
  target = trainer.abstract_state()
  resumed = ckpt.restore_latest(target, data_iter)
  want = tcfg.resume_step
  if resumed is None:
    if want:
      raise ValueError(
        f"invalid config field `train.resume_step` = {want}: {ckpt.directory} holds no checkpoint"
      )
    return trainer.init(), 0, None
  step, state, meta = resumed
  rolled = list(meta.get("rolled_back_to", []))
  if want and want not in rolled:
    if want != step:
      steps = ckpt.all_steps()
      if want not in steps:
        raise ValueError(
          f"invalid config field `train.resume_step` = {want}: no such "
          f"checkpoint in {ckpt.directory} (steps {steps})"
        )
      del state
      state, meta = ckpt.restore(want, target, data_iter)
      ckpt.set_aside([s for s in steps if s > want], "rolled_back", "rolled-back")
      logging.warning(
        "train.resume_step: rolled back from step %d to checkpoint step %d", step, want
      )
      step, rolled = want, list(meta.get("rolled_back_to", []))
    meta = dict(meta, rolled_back_to=rolled + [want])
  return state, step, meta


def _skip_batches(windows, applied: list, start_step: int) -> dict:
  """{first step: batches to drop before it} of the `train.skip_batches` windows still to
  apply. A window applied before (recorded in the checkpoint's meta) is not applied again;
  one that starts at or before the resumed step and was never applied cannot be."""
  todo = {}
  for first, last in windows:
    if [first, last] in applied:
      continue
    if first <= start_step:
      raise ValueError(
        f"invalid config field `train.skip_batches` window {first}-{last}: the "
        f"run resumes after step {start_step}, so the batches of steps from "
        f"{first} on were consumed already; choose steps after {start_step}"
      )
    todo[first] = (last, last - first + 1)
  return todo


def _drop_metrics_after(workdir: str, step: int) -> int:
  """Removes `metrics.jsonl` records past `step` (and a partly written last line): they come
  from a run that stopped before checkpointing them; the resumed run writes them again."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record.get("step", 0) <= step:
      keep.append(json.dumps(record) + "\n")
  if len(keep) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)
    logging.info(
      "dropped %d metric records past step %d from %s", len(lines) - len(keep), step, path
    )
  return len(lines) - len(keep)


# A time budget (`train.time_budget_s`) times a fresh run's steps: WARM+1 .. FIRST (the first
# steps compile and allocate) sets the run's length inside the warmup, filling MARGIN of the
# time left (evaluations and checkpoints are not among these steps). Then every EVERY steps the
# pace since step FIRST (evaluations and checkpoints included, so MARGIN_LATE of the time left)
# sets it again, for as long as the learning rate does not depend on the length: through the
# warmup, and under the `report` schedule through its constant part (two thirds of the run).
# The compiled step takes the schedule's length as an argument: none of this compiles anything.
_BUDGET_WARM, _BUDGET_FIRST, _BUDGET_EVERY = 2, 10, 50
_BUDGET_MARGIN, _BUDGET_MARGIN_LATE = 0.9, 0.97


def _steps_in_budget(
  tcfg: config_lib.TrainConfig, done: int, step_s: float, elapsed_s: float, margin: float
) -> int:
  """The run's step count under `train.time_budget_s`: the `done` steps, then as many as fit
  in `margin` of the time left at `step_s` each; at most `train.steps`."""
  left = margin * (tcfg.time_budget_s - elapsed_s)
  return int(min(tcfg.steps, done + max(0, left // step_s)))


class _BudgetTimer:
  """Times a fresh run's steps for `train.time_budget_s`, waiting for the device only at the
  steps it times; `length` gives the run's step count after each timed window."""

  def __init__(self, start_step: int, t_start: float, tcfg: config_lib.TrainConfig):
    self.tcfg = tcfg  # as configured: `steps` is the most the budget may set
    self.start, self.t_start, self.marks = start_step, t_start, {}

  def _timed(self, step: int) -> bool:
    n = step - self.start
    return n in (1, _BUDGET_WARM, _BUDGET_FIRST) or (n > 0 and n % _BUDGET_EVERY == 0)

  def mark(self, step: int, state) -> bool:
    """Records `step`'s end if it is timed; True when it ends a timed window."""
    if not self._timed(step):
      return False
    jax.block_until_ready(state)
    self.marks[step] = time.time()
    return step - self.start not in (1, _BUDGET_WARM)

  def length(self, step: int) -> tuple[int, str]:
    first = step - self.start == _BUDGET_FIRST
    lo = self.start + (_BUDGET_WARM if first else _BUDGET_FIRST)
    step_s = (self.marks[step] - self.marks[lo]) / (step - lo)
    margin = _BUDGET_MARGIN if first else _BUDGET_MARGIN_LATE
    steps = _steps_in_budget(self.tcfg, step, step_s, self.marks[step] - self.t_start, margin)
    if jax.process_count() > 1:  # every process runs process 0's count
      from jax.experimental import multihost_utils

      steps = int(multihost_utils.broadcast_one_to_all(np.int32(steps)))
    line = (
      f"time budget {self.tcfg.time_budget_s:g} s: {steps} steps "
      f"({step_s:.3f} s/step over steps {lo + 1}-{step}, "
      f"{self.marks[self.start + 1] - self.t_start:.1f} s to the first step)"
    )
    return steps, line


def _write_config(workdir: str, cfg: config_lib.Config) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_lib.to_dict(cfg), f, indent=1)


def _make_trainer(cfg: config_lib.Config, mesh):
  if cfg.parallel.pipeline == "none":
    return Trainer(cfg, mesh)
  # The model cut into stages over the `pipe` mesh axis (1F1B or DualPipe).
  from dsv3_jax.train.pipeline_step import PipelineTrainer

  return PipelineTrainer(cfg, mesh)


def evaluate(trainer: Trainer, state, batches, sharding) -> float:
  losses = [float(trainer.eval_step(state, _to_global(b, sharding))) for b in batches]
  return float(np.mean(losses))


def train_and_evaluate(
  config, workdir: str, *, max_steps: Optional[int] = None, progress: bool = True
) -> dict:
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
    raise ValueError(
      f"invalid config field `train.global_batch` = {tcfg.global_batch}: must "
      f"be divisible by the data x expert mesh size {n_batch_shards}"
    )
  is_main = jax.process_index() == 0
  logging.info(
    "process %d/%d, mesh %s, %s",
    jax.process_index(),
    jax.process_count(),
    dict(mesh.shape),
    counts.describe(cfg.model),
  )

  corpus = load_corpus(cfg)
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  data_iter = data_lib.make_train_iterator(
    corpus.train_tokens, tcfg.seq_len, tcfg.global_batch, seed=tcfg.seed, **shard
  )
  heldout = data_lib.eval_batches(
    corpus.heldout_tokens, tcfg.seq_len, tcfg.global_batch, tcfg.eval_batches, **shard
  )

  trainer = _make_trainer(cfg, mesh)
  memory = trainer.memory_per_device()
  if is_main:
    mb = {k: v / 2**20 for k, v in memory.items()}
    line = (
      f"train state per device: {mb['total']:.2f} MiB (params {mb['params']:.2f}, "
      f"optimizer {mb['opt_state']:.2f} with ZeRO-1 vs {mb['opt_state_without_zero1']:.2f}"
      f" without) on mesh {dict(mesh.shape)}"
    )
    logging.info(line)
    print(line, flush=True)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints)
  try:
    state, start_step, meta = _resume(ckpt, trainer, data_iter, tcfg)
    applied = list((meta or {}).get("skipped_batches", []))
    to_skip = _skip_batches(tcfg.skip_windows(), applied, start_step)
  except BaseException:
    ckpt.close()
    raise
  last_saved = None if meta is None else start_step
  if meta is not None:
    logging.info("resumed from step %d", start_step)
  budget_steps = (meta or {}).get("budget_steps")
  if tcfg.time_budget_s and budget_steps:  # resumed after the budget set the run's length
    cfg = config_lib.replace(cfg, train={"steps": budget_steps})
    tcfg = cfg.train
  if is_main:
    _drop_metrics_after(workdir, start_step)
  writer = MetricWriter(workdir, enabled=is_main)
  if is_main:
    _write_config(workdir, cfg)
    writer.write_hparams(config_lib.to_dict(cfg))

  end_step = tcfg.steps if max_steps is None else min(tcfg.steps, start_step + max_steps)
  last_step = end_step  # where this call stops unless a time budget stops it sooner
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
  timer = None  # times a fresh budgeted run's first steps, until it has set the run's length
  if tcfg.time_budget_s and not budget_steps:
    timer = _BudgetTimer(start_step, t_start, tcfg)
    timer = timer if start_step + _BUDGET_FIRST < end_step else None  # too short to time
  first_bad = jnp.zeros((), jnp.int32)  # 0 = every step so far finite
  try:
    while step < end_step:
      if step + 1 in to_skip:
        last, n = to_skip.pop(step + 1)
        logging.warning(
          "train.skip_batches: dropping the %d batch(es) of steps %d-%d; they "
          "train on the batches after",
          n,
          step + 1,
          last,
        )
        for _ in range(n):
          next(data_iter)
        applied.append([step + 1, last])
      batch = _to_global(next(data_iter), trainer.batch_sharding)
      state, metrics = trainer.train_step(state, batch, tcfg.steps)
      step += 1
      window_steps += 1
      # No host sync per step: the first non-finite step is recorded on device and checked
      # wherever the host waits anyway (metrics, eval, checkpoint), always before a save.
      first_bad = _record_non_finite(first_bad, metrics["finite"], step)
      distributed.kick()
      if timer is not None and timer.mark(step, state):
        steps, line = timer.length(step)
        if budget_steps and step >= length_free_steps(tcfg, min(steps, tcfg.steps)):
          timer = None  # the learning rate now depends on the length: it stays
        else:
          # The schedule spans the new length from the next step on (the same compiled step).
          budget_steps = steps
          cfg = config_lib.replace(cfg, train={"steps": budget_steps})
          tcfg = cfg.train
          end_step = min(budget_steps, last_step)
          if is_main:
            logging.info(line)
            (bar.write if bar is not None else print)(line)
            _write_config(workdir, cfg)
            if bar is not None:
              bar.total = end_step
              bar.refresh()
      if bar is not None:
        bar.update(1)
      syncs = [tcfg.log_every, tcfg.eval_every, tcfg.checkpoint_every]
      if step == end_step or any(step % n == 0 for n in syncs):
        _raise_if_non_finite(first_bad, last_saved, ckpt)
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
        ckpt.save(
          step,
          state,
          data_iter,
          {
            "step": step,
            "config": config_lib.to_dict(cfg),
            "skipped_batches": [list(w) for w in applied],
            "rolled_back_to": list((meta or {}).get("rolled_back_to", [])),
            "budget_steps": budget_steps,  # the length a time budget set, if it did
          },
        )
        last_saved = step
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.close()

  summary = {
    "steps": step,
    "start_step": start_step,
    "final_loss": history[-1]["loss"] if history else None,
    "heldout_loss": eval_history[-1]["heldout_loss"] if eval_history else None,
    "unigram_entropy": corpus.unigram_entropy,
    "wall_time_s": time.time() - t_start,
    "memory_per_device": memory,
    "history": history,
    "eval_history": eval_history,
  }
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({k: v for k, v in summary.items() if k != "history"}, f, indent=1)
  summary["state"] = state
  summary["trainer"] = trainer
  summary["tokenizer"] = corpus.tokenizer
  return summary
