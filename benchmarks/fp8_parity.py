"""FP8-vs-BF16 training parity: one model, one init, one data order; only the dots differ.

DeepSeek-V3 reports that fine-grained FP8 training stays within 0.25% relative loss error of
BF16 (arXiv 2412.19437, §3.3.1 and Appendix B.1). `compare` reproduces the measurement at
small scale: it trains the same configuration once per `model.matmul_precision` from the same
initial parameters (the init does not depend on the precision) on the same list of batches,
records every step's loss and wall time, and reports

  relative loss error = |mean(L_fp8) - mean(L_bf16)| / mean(L_bf16)

over the last `tail` fraction of steps (10% by default), plus the mean per-step relative
difference over the same window and the held-out loss of each run at the end.

At small scale, separate runs drift apart from tiny numerical differences (a one-ulp change
in one accumulation shifts the final loss by about a percent), so two more numbers help read
the gap: an fp32 run against the same bf16 reference (the noise floor of the comparison), and
the held-out loss of the *reference run's final weights* evaluated with each precision's dots
(`rel_heldout_error_same_params`: the error of the numerics alone, with no drift).

A research harness (it trains several models to measure the library), so it lives outside
`dsv3_jax`: `experiments/fp8_vs_bf16.py` and `colab/fp8.ipynb` call it; it writes no files
itself. `plot` needs matplotlib (the `plots` extra).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from benchmarks.plotting import require_matplotlib
from dsv3_jax import config as config_lib
from dsv3_jax import data as data_lib
from dsv3_jax.parallel import mesh as mesh_lib

__all__ = [
  "Curve",
  "compare",
  "evaluate_with",
  "experiment_config",
  "mean_stepwise_error",
  "plot",
  "relative_loss_error",
  "summary_line",
  "train_curve",
]


@dataclasses.dataclass
class Curve:
  """One training run."""

  precision: str
  loss: list  # total training loss per step (CE + MTP + balance terms)
  ce: list  # main-model cross-entropy per step (nats/token)
  step_times_s: list  # wall time of every step after the first (blocking on the loss)
  first_step_s: float  # the first step: tracing + compilation + one step
  heldout_loss: float  # main-model CE on held-out batches after the last step
  state: Any = dataclasses.field(default=None, repr=False)  # the final TrainState

  @property
  def step_time_s(self) -> float:
    """Median wall time of one compiled train step."""
    return float(np.median(self.step_times_s)) if self.step_times_s else float("nan")


def _tail(values: Sequence[float], tail: float) -> np.ndarray:
  if not 0 < tail <= 1:
    raise ValueError(f"tail must be in (0, 1], got {tail}")
  values = np.asarray(values, np.float64)
  if values.size == 0:
    raise ValueError("empty loss curve")
  n = max(1, int(math.ceil(tail * values.size)))
  return values[-n:]


def relative_loss_error(
  reference: Sequence[float], other: Sequence[float], tail: float = 0.1
) -> float:
  """`|mean(other) - mean(reference)| / mean(reference)` over the last `tail` of steps."""
  if len(reference) != len(other):
    raise ValueError(f"curves differ in length: {len(reference)} vs {len(other)}")
  ref, oth = _tail(reference, tail), _tail(other, tail)
  return float(abs(oth.mean() - ref.mean()) / ref.mean())


def mean_stepwise_error(
  reference: Sequence[float], other: Sequence[float], tail: float = 0.1
) -> float:
  """Mean over the last `tail` of steps of `|other_t - reference_t| / reference_t`."""
  if len(reference) != len(other):
    raise ValueError(f"curves differ in length: {len(reference)} vs {len(other)}")
  ref, oth = _tail(reference, tail), _tail(other, tail)
  return float(np.mean(np.abs(oth - ref) / ref))


def experiment_config(quick: bool = False) -> config_lib.Config:
  """The model and schedule that `experiments/fp8_vs_bf16.py` trains by default.

  A small DeepSeek-V3 (MLA, 1 dense + 2 MoE blocks with 8 routed experts, top-2, one shared
  expert, one MTP depth) on byte-level text, sized so that both runs together take a few
  minutes on a 2-core CPU while the loss falls far below its start. `quick=True` is a one-MoE-
  block, MTP-free variant for notebooks and smoke tests (well under a minute per run).
  """
  model = dict(
    vocab_size=272,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    num_nextn_predict_layers=1,
    max_position_embeddings=256,
    init_std=0.02,
    expert_block_size=32,
  )
  train = dict(
    steps=300, global_batch=8, seq_len=64, learning_rate=3e-3, warmup_steps=20, eval_batches=8
  )
  data = dict(max_bytes=4_000_000)
  if quick:
    model.update(
      hidden_size=64,
      intermediate_size=128,
      moe_intermediate_size=32,
      num_hidden_layers=1,
      first_k_dense_replace=0,
      num_attention_heads=2,
      q_lora_rank=32,
      kv_lora_rank=32,
      qk_nope_head_dim=16,
      qk_rope_head_dim=8,
      v_head_dim=16,
      num_nextn_predict_layers=0,
      expert_block_size=16,
    )
    train.update(steps=40, seq_len=32, warmup_steps=4, eval_batches=2)
    data.update(max_bytes=1_000_000)
  return config_lib.Config(
    model=config_lib.ModelConfig(**model),
    train=config_lib.TrainConfig(**train),
    data=config_lib.DataConfig(**data),
  ).validate()


def _with_precision(cfg: config_lib.Config, precision: str) -> config_lib.Config:
  return config_lib.replace(cfg, model={"matmul_precision": precision})


def train_curve(
  cfg: config_lib.Config, batches: Sequence[dict], heldout: Sequence[dict], progress: bool = False
) -> Curve:
  """Trains `cfg` on exactly `batches` (one per step) and evaluates on `heldout`."""
  from dsv3_jax.train.step import Trainer  # the train package imports the model

  mesh = mesh_lib.make_mesh(cfg.parallel)
  trainer = Trainer(cfg, mesh)
  state = trainer.init()
  losses, ces, times = [], [], []
  first = float("nan")
  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=len(batches), desc=cfg.model.matmul_precision, unit="step")
  for i, batch in enumerate(batches):
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, jax.device_put(batch, trainer.batch_sharding))
    loss = float(metrics["loss"])  # blocks: the step time includes the whole step
    dt = time.perf_counter() - t0
    if not math.isfinite(loss):
      raise FloatingPointError(f"{cfg.model.matmul_precision}: loss is {loss} at step {i + 1}")
    losses.append(loss)
    ces.append(float(metrics["ce"]))
    if i == 0:
      first = dt
    else:
      times.append(dt)
    if bar is not None:
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.3f}")
  if bar is not None:
    bar.close()
  return Curve(
    cfg.model.matmul_precision,
    losses,
    ces,
    times,
    first,
    _heldout_loss(trainer, state, heldout),
    state,
  )


def _heldout_loss(trainer, state, heldout: Sequence[dict]) -> float:
  held = [
    float(trainer.eval_step(state, jax.device_put(b, trainer.batch_sharding))) for b in heldout
  ]
  return float(np.mean(held)) if held else float("nan")


def evaluate_with(cfg: config_lib.Config, state, heldout: Sequence[dict]) -> float:
  """Held-out CE of a trained `state` when the forward runs with `cfg`'s dot precision."""
  from dsv3_jax.train.step import Trainer

  trainer = Trainer(cfg, mesh_lib.make_mesh(cfg.parallel))
  return _heldout_loss(trainer, state, heldout)


def compare(
  config,
  precisions: Sequence[str] = ("bf16", "fp8"),
  *,
  reference: str = "bf16",
  tail: float = 0.1,
  progress: bool = False,
  corpus=None,
) -> dict:
  """Trains `config` once per precision on identical data; returns a JSON-ready dict.

  `config` is a ConfigDict or `Config`; its `model.matmul_precision` is overridden per run.
  `corpus` (a `train.loop.Corpus`) may be passed to skip reading the text files again.
  """
  from dsv3_jax.train.loop import load_corpus

  cfg = config if isinstance(config, config_lib.Config) else config_lib.from_dict(config)
  if reference not in precisions:
    raise ValueError(f"reference precision {reference!r} is not among {tuple(precisions)}")
  for p in precisions:
    if p not in config_lib.PRECISIONS:
      raise ValueError(f"unknown precision {p!r}; choose from {config_lib.PRECISIONS}")
  tcfg = cfg.train
  corpus = load_corpus(cfg) if corpus is None else corpus
  it = data_lib.make_train_iterator(
    corpus.train_tokens, tcfg.seq_len, tcfg.global_batch, seed=tcfg.seed
  )
  batches = [next(it) for _ in range(tcfg.steps)]  # the very same batches for every run
  heldout = data_lib.eval_batches(
    corpus.heldout_tokens, tcfg.seq_len, tcfg.global_batch, tcfg.eval_batches
  )
  curves = {p: train_curve(_with_precision(cfg, p), batches, heldout, progress) for p in precisions}
  ref = curves[reference]
  result = {
    "config": config_lib.to_dict(cfg),
    "devices": [str(d) for d in jax.devices()],
    "steps": tcfg.steps,
    "tokens_per_step": tcfg.global_batch * tcfg.seq_len,
    "reference": reference,
    "tail_fraction": tail,
    "unigram_entropy": corpus.unigram_entropy,
    "curves": {},
  }
  # One set of weights (the reference run's), evaluated with every precision's dots: the
  # error of the numerics alone, without the drift of separate training trajectories.
  same_params = {
    p: (
      ref.heldout_loss
      if p == reference
      else evaluate_with(_with_precision(cfg, p), ref.state, heldout)
    )
    for p in precisions
  }
  for p, c in curves.items():
    entry = {
      "loss": c.loss,
      "ce": c.ce,
      "first_step_s": c.first_step_s,
      "step_time_s": c.step_time_s,
      "heldout_loss": c.heldout_loss,
      "initial_loss": c.loss[0],
      "final_loss_tail_mean": float(_tail(c.loss, tail).mean()),
    }
    if p != reference:
      entry.update(
        rel_loss_error=relative_loss_error(ref.loss, c.loss, tail),
        rel_ce_error=relative_loss_error(ref.ce, c.ce, tail),
        mean_stepwise_rel_error=mean_stepwise_error(ref.loss, c.loss, tail),
        rel_heldout_error=abs(c.heldout_loss - ref.heldout_loss) / ref.heldout_loss,
        heldout_loss_of_reference_params=same_params[p],
        rel_heldout_error_same_params=(abs(same_params[p] - ref.heldout_loss) / ref.heldout_loss),
        step_time_ratio=c.step_time_s / ref.step_time_s,
      )
    result["curves"][p] = entry
  return result


def summary_line(result: dict, precision: str = "fp8") -> str:
  """One human-readable line about `precision` against the reference."""
  c, ref = result["curves"][precision], result["curves"][result["reference"]]
  pct = 100 * result["tail_fraction"]
  return (
    f"{precision} vs {result['reference']}: relative loss error over the last {pct:g}% "
    f"of {result['steps']} steps = {100 * c['rel_loss_error']:.3f}% (loss "
    f"{ref['initial_loss']:.3f} -> {ref['final_loss_tail_mean']:.3f} vs "
    f"{c['final_loss_tail_mean']:.3f}); same weights, held-out: "
    f"{100 * c['rel_heldout_error_same_params']:.3f}%; "
    f"step time {c['step_time_s'] * 1e3:.1f} ms vs "
    f"{ref['step_time_s'] * 1e3:.1f} ms ({c['step_time_ratio']:.2f}x)"
  )


def plot(result: dict, path: Optional[str] = None, ax=None):
  """Loss curves of every precision (and fp8's per-step relative difference); saves a PNG."""
  matplotlib = require_matplotlib()
  if path is not None and ax is None:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ref_name = result["reference"]
  ref = np.asarray(result["curves"][ref_name]["loss"])
  if ax is None:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  else:
    fig, ax2 = ax.figure, None
  steps = np.arange(1, ref.size + 1)
  colors = {}
  for name, c in result["curves"].items():
    label = name if name == ref_name else f"{name} ({100 * c['rel_loss_error']:.2f}% rel. err.)"
    (line,) = ax.plot(steps, c["loss"], label=label, lw=1)
    colors[name] = line.get_color()
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (nats/token)")
  ax.set_title("same init, same data; only the dots differ")
  ax.legend()
  if ax2 is not None:
    window = max(1, ref.size // 20)
    for name, c in result["curves"].items():
      if name != ref_name:
        rel = 100 * (np.asarray(c["loss"]) - ref) / ref
        ax2.plot(steps, rel, lw=0.5, alpha=0.5, color=colors[name])
        smooth = np.convolve(rel, np.ones(window) / window, mode="valid")
        ax2.plot(
          steps[window - 1 :],
          smooth,
          lw=1.5,
          color=colors[name],
          label=f"{name} ({window}-step mean)",
        )
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"loss relative to {ref_name} (%)")
    ax2.legend()
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=120)
  return fig
