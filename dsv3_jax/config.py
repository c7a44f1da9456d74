"""Typed, validated configuration.

Experiment files under `configs/` are ml_collections ConfigDicts (easy to override from the
command line); the library turns them once into the frozen dataclasses below and validates
them, so that every module downstream reads typed fields and every bad value fails early with
a `ValueError` naming the field and the rule it breaks.

Model field names follow the Hugging Face `DeepseekV3Config` where one exists, so that the
mapping to and from a HF `config.json` (`dsv3_jax.checkpoint.hf_config`) is mostly a copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

PRECISIONS = ("fp32", "bf16", "fp8")
DTYPES = ("float32", "bfloat16")
PIPELINES = ("none", "1f1b", "dualpipe")
LR_SCHEDULES = ("cosine", "report")
ROPE_SCALINGS = ("none", "yarn")
REMATS = ("none", "blocks")


def _require(ok: bool, field: str, rule: str, value: Any) -> None:
  if not ok:
    raise ValueError(f"invalid config field `{field}` = {value!r}: {rule}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The network's hyperparameters, named as HF's `DeepseekV3Config`.

  Sections cite the DeepSeek-V3 report (arXiv 2412.19437): MLA §2.1.1, DeepSeekMoE §2.1.2,
  MTP §2.2; the published sizes are in §4.2 (the `671b` variant of `configs/dsv3.py`). The
  defaults are a small CPU-sized model; every variant starts from them.
  """

  vocab_size: int = 512  # token ids; >= the tokenizer's (byte-level: 259)
  hidden_size: int = 256  # model width d
  intermediate_size: int = 768  # SwiGLU width of the dense layers
  moe_intermediate_size: int = 128  # SwiGLU width of each routed and shared expert
  num_hidden_layers: int = 4  # dense + MoE blocks (MTP modules not counted)
  first_k_dense_replace: int = 1  # the first k blocks are dense, the rest MoE
  num_attention_heads: int = 4  # n_h
  q_lora_rank: int = 0  # query compression width d_c'; 0 = a full-rank query projection
  kv_lora_rank: int = 64  # KV compression width d_c: the cached latent's width
  qk_nope_head_dim: int = 32  # per-head query/key dims without RoPE (d_h)
  qk_rope_head_dim: int = 16  # per-head decoupled rotary dims d_h^R (even: rotated in pairs)
  v_head_dim: int = 32  # per-head value dims
  n_routed_experts: int = 16  # N_r
  n_shared_experts: int = 1  # N_s
  num_experts_per_tok: int = 4  # routed experts per token K_r
  n_group: int = 4  # expert groups for group-limited routing (the report's nodes)
  topk_group: int = 2  # groups one token may route to (the report's M)
  routed_scaling_factor: float = 2.5  # multiplies the routed experts' gated sum
  norm_topk_prob: bool = True  # normalise the chosen experts' gates to sum to 1
  num_nextn_predict_layers: int = 1  # MTP depth D (0 = no MTP)
  rms_norm_eps: float = 1e-6  # RMSNorm epsilon
  rope_theta: float = 10000.0  # RoPE base
  max_position_embeddings: int = 2048  # longest context (in tokens) the model is built for
  # Rotary scaling, chosen by intent (report §4.3): "none" = plain RoPE, as DeepSeek-V3 is
  # pretrained at 4K; "yarn" = YaRN context extension, as in the extension phases and the
  # published checkpoint. The rope_* fields below are YaRN's and are read only under "yarn".
  rope_scaling: str = "none"
  rope_factor: float = 1.0  # YaRN scale s (the report's 40); must stay 1.0 under "none"
  rope_original_max_position_embeddings: int = 4096  # the context YaRN extends (pretraining's)
  rope_beta_fast: float = 32.0  # dims turning > this often in that context keep RoPE (beta)
  rope_beta_slow: float = 1.0  # dims turning < this often get frequency / s (alpha)
  rope_mscale: float = 1.0  # cos/sin x mscale(s, rope_mscale) / mscale(s, rope_mscale_all_dim)
  rope_mscale_all_dim: float = 1.0  # softmax x mscale(s, this)^2, the report's sqrt(t) squared
  init_std: float = 0.006  # std of the normal init of every projection (report §4.2)
  dtype: str = "float32"  # activations: float32 | bfloat16; parameters stay float32 masters
  matmul_precision: str = "fp32"  # fp32 | bf16 | fp8 for every linear projection
  expert_block_size: int = 64  # rows per block of the dropless grouped expert GEMM
  # Run each stack of blocks as unrolled code instead of a `lax.scan` over the stacked layers:
  # every GEMM then reads its layer's weights in place, where the scan copies each layer's
  # slice of the stacked arrays (and writes its gradients back into the stack) every step.
  # Compile time and the compiled program grow with depth, so deep models keep the scan.
  unroll_layers: bool = False
  # Activation recomputation. "none": the backward reads what the forward kept. "blocks": each
  # block keeps only its input and reruns its forward inside the backward; the readout (final
  # norm, head, cross-entropy, MTP) keeps only the final norm's output. Training memory then
  # holds one hidden state per layer instead of every matmul input and the fp32 logits, for
  # about one more forward pass of compute (what deep pipelines at the 671B shape need; the
  # report itself recomputes only RMSNorm and the MLA up-projections, §3.3.2). It runs the
  # stacks as rolled scans whatever `unroll_layers` says: unrolled, XLA schedules the reruns
  # early and keeps their results, and memory hardly falls.
  remat: str = "none"

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def recomputes(self) -> bool:
    """Whether the backward reruns the blocks and the readout (`remat` = "blocks")."""
    return self.remat == "blocks"

  @property
  def n_dense_layers(self) -> int:
    return min(self.first_k_dense_replace, self.num_hidden_layers)

  @property
  def n_moe_layers(self) -> int:
    return self.num_hidden_layers - self.n_dense_layers

  def validate(self) -> "ModelConfig":
    positive = (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "moe_intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "kv_lora_rank",
      "qk_nope_head_dim",
      "qk_rope_head_dim",
      "v_head_dim",
      "max_position_embeddings",
      "expert_block_size",
      "rope_original_max_position_embeddings",
    )
    for name in positive:
      v = getattr(self, name)
      _require(isinstance(v, int) and v > 0, f"model.{name}", "must be a positive integer", v)
    for name in (
      "q_lora_rank",
      "first_k_dense_replace",
      "n_shared_experts",
      "num_nextn_predict_layers",
    ):
      v = getattr(self, name)
      _require(isinstance(v, int) and v >= 0, f"model.{name}", "must be an integer >= 0", v)
    _require(
      self.qk_rope_head_dim % 2 == 0,
      "model.qk_rope_head_dim",
      "rotary dims come in pairs, so it must be even",
      self.qk_rope_head_dim,
    )
    _require(
      self.first_k_dense_replace <= self.num_hidden_layers,
      "model.first_k_dense_replace",
      f"cannot exceed num_hidden_layers={self.num_hidden_layers}",
      self.first_k_dense_replace,
    )
    if self.n_moe_layers > 0 or self.num_nextn_predict_layers > 0:
      _require(
        self.n_routed_experts > 0,
        "model.n_routed_experts",
        "must be positive",
        self.n_routed_experts,
      )
      _require(
        0 < self.num_experts_per_tok <= self.n_routed_experts,
        "model.num_experts_per_tok",
        f"must be in [1, n_routed_experts={self.n_routed_experts}]",
        self.num_experts_per_tok,
      )
      _require(self.n_group > 0, "model.n_group", "must be positive", self.n_group)
      _require(
        self.n_routed_experts % self.n_group == 0,
        "model.n_routed_experts",
        f"must be divisible by n_group={self.n_group}",
        self.n_routed_experts,
      )
      _require(
        0 < self.topk_group <= self.n_group,
        "model.topk_group",
        f"must be in [1, n_group={self.n_group}]",
        self.topk_group,
      )
      per_group = self.n_routed_experts // self.n_group
      _require(
        self.topk_group * per_group >= self.num_experts_per_tok,
        "model.topk_group",
        f"the kept groups hold topk_group*experts_per_group = {self.topk_group}*"
        f"{per_group} experts, fewer than num_experts_per_tok="
        f"{self.num_experts_per_tok}",
        self.topk_group,
      )
      _require(
        self.n_group == 1 or per_group >= 2,
        "model.n_group",
        "a group's score is the sum of its top-2 experts, so groups need >= 2 experts",
        self.n_group,
      )
    _require(
      self.routed_scaling_factor > 0,
      "model.routed_scaling_factor",
      "must be positive",
      self.routed_scaling_factor,
    )
    _require(self.rms_norm_eps > 0, "model.rms_norm_eps", "must be positive", self.rms_norm_eps)
    _require(self.rope_theta > 1, "model.rope_theta", "must be > 1", self.rope_theta)
    _require(
      self.rope_scaling in ROPE_SCALINGS,
      "model.rope_scaling",
      f"must be one of {ROPE_SCALINGS}",
      self.rope_scaling,
    )
    if self.rope_scaling == "yarn":
      _require(
        self.rope_factor > 1.0,
        "model.rope_factor",
        "must be > 1 with model.rope_scaling='yarn' (YaRN at factor 1 is plain RoPE: "
        "set rope_scaling='none')",
        self.rope_factor,
      )
      _require(
        self.rope_beta_fast > self.rope_beta_slow > 0,
        "model.rope_beta_fast",
        f"need beta_fast > beta_slow={self.rope_beta_slow} > 0",
        self.rope_beta_fast,
      )
    else:
      _require(
        self.rope_factor == 1.0,
        "model.rope_factor",
        "is read only with model.rope_scaling='yarn'; set rope_scaling='yarn' to extend "
        "the context with YaRN, or leave rope_factor at 1.0 for plain RoPE",
        self.rope_factor,
      )
    _require(self.init_std > 0, "model.init_std", "must be positive", self.init_std)
    _require(self.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}", self.dtype)
    _require(
      self.matmul_precision in PRECISIONS,
      "model.matmul_precision",
      f"must be one of {PRECISIONS}",
      self.matmul_precision,
    )
    _require(self.remat in REMATS, "model.remat", f"must be one of {REMATS}", self.remat)
    return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and loop settings (the DeepSeek-V3 recipe, report §4.2, where it applies)."""

  steps: int = 100  # optimizer steps (the most, with a time budget)
  # > 0: train for about this many seconds. The first steps (within the warmup) are timed and
  # `steps` becomes the count that fits, at most `steps`; the learning-rate schedule then
  # spans it, so a faster machine trains on more tokens with the same recipe.
  time_budget_s: float = 0.0
  global_batch: int = 8  # sequences per step, divisible by the batch (data x expert) axes
  seq_len: int = 128  # tokens per sequence
  learning_rate: float = 2.2e-4  # peak, after the linear warmup; cosine decay afterwards
  warmup_steps: int = 10  # linear warmup from 0
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
  # cosine: warmup, then cosine decay over all the remaining steps. report: the shape of §4.2
  # (warmup; the peak until 67.6% of the steps, 10T of 14.8T tokens; cosine decay to the
  # minimum by 96.6%; the minimum to 98.9%; a third of it for the rest), whose length can
  # change during its constant part without moving the learning rate (see time_budget_s).
  lr_schedule: str = "cosine"
  weight_decay: float = 0.1  # AdamW, decoupled
  b1: float = 0.9  # AdamW beta_1
  b2: float = 0.95  # AdamW beta_2
  grad_clip: float = 1.0  # global-norm gradient clip
  moment_dtype: str = "bfloat16"  # AdamW moments; master weights stay float32
  mtp_lambda: float = 0.3  # MTP loss weight lambda (divided by the depth D)
  balance_alpha: float = 1e-4  # complementary sequence-wise balance loss weight alpha
  # > 0: the training and held-out losses apply the output head and its cross-entropy this
  # many positions at a time, rerunning each piece in the backward, so no [B, L, vocab]
  # float32 logits are kept or live at once (`train/loss.head_nll`); 0 (or >= seq_len): all
  # positions at once.
  logits_chunk: int = 0
  bias_update_gamma: float = 1e-3  # aux-loss-free bias update speed gamma, per step
  seed: int = 0  # parameter init and data order
  log_every: int = 10  # steps between metric writes
  eval_every: int = 50  # steps between held-out evaluations
  eval_batches: int = 4  # held-out batches per evaluation
  checkpoint_every: int = 50  # steps between checkpoints
  keep_checkpoints: int = 3  # newest checkpoints kept on disk
  # Restart options past a non-finite step (the loop's error names the step and them), each
  # applied once (the checkpoints after record it), so a later restart may keep the flags:
  # skip_batches "a-b,c" drops the batches steps a..b and c would train on (they train on the
  # following ones; the steps must come after the resumed one); resume_step N rolls back to
  # checkpoint step N (0 = the newest one that restores; later steps are set aside).
  skip_batches: str = ""
  lr_scale: float = 1.0  # multiplies the whole learning-rate schedule (e.g. 0.5)
  resume_step: int = 0

  def skip_windows(self) -> tuple[tuple[int, int], ...]:
    """`skip_batches` as sorted inclusive (first, last) step windows; raises if malformed."""
    windows = []
    for part in filter(None, (p.strip() for p in self.skip_batches.split(","))):
      first, dash, last = (x.strip() for x in part.partition("-"))
      last = last if dash else first
      ok = first.isdigit() and last.isdigit() and 0 < int(first) <= int(last)
      _require(
        ok,
        "train.skip_batches",
        "must be comma-separated steps or inclusive step "
        "windows 'a-b' with 0 < a <= b, e.g. '120' or '120-140,300'",
        self.skip_batches,
      )
      windows.append((int(first), int(last)))
    windows.sort()
    for (_, b), (c, _) in zip(windows, windows[1:]):
      _require(c > b, "train.skip_batches", "windows must not overlap", self.skip_batches)
    return tuple(windows)

  def validate(self) -> "TrainConfig":
    for name in (
      "steps",
      "global_batch",
      "seq_len",
      "log_every",
      "eval_every",
      "eval_batches",
      "checkpoint_every",
      "keep_checkpoints",
    ):
      v = getattr(self, name)
      _require(isinstance(v, int) and v > 0, f"train.{name}", "must be a positive integer", v)
    _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", self.warmup_steps)
    _require(
      isinstance(self.logits_chunk, int) and self.logits_chunk >= 0,
      "train.logits_chunk",
      "must be an integer >= 0 (0 = the whole sequence at once)",
      self.logits_chunk,
    )
    _require(self.learning_rate > 0, "train.learning_rate", "must be positive", self.learning_rate)
    _require(
      0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio
    )
    for name in ("b1", "b2"):
      v = getattr(self, name)
      _require(0 <= v < 1, f"train.{name}", "must be in [0, 1)", v)
    for name in ("weight_decay", "mtp_lambda", "balance_alpha", "bias_update_gamma"):
      v = getattr(self, name)
      _require(v >= 0, f"train.{name}", "must be >= 0", v)
    _require(self.grad_clip > 0, "train.grad_clip", "must be positive", self.grad_clip)
    _require(
      self.moment_dtype in DTYPES,
      "train.moment_dtype",
      f"must be one of {DTYPES}",
      self.moment_dtype,
    )
    _require(self.lr_scale > 0, "train.lr_scale", "must be positive", self.lr_scale)
    _require(
      self.lr_schedule in LR_SCHEDULES,
      "train.lr_schedule",
      f"must be one of {LR_SCHEDULES}",
      self.lr_schedule,
    )
    _require(
      self.time_budget_s >= 0, "train.time_budget_s", "must be >= 0 (0 = off)", self.time_budget_s
    )
    _require(
      isinstance(self.resume_step, int) and self.resume_step >= 0,
      "train.resume_step",
      "must be a step number >= 0 (0 = the newest checkpoint)",
      self.resume_step,
    )
    _require(
      isinstance(self.skip_batches, str),
      "train.skip_batches",
      "must be a string such as '120-140'",
      self.skip_batches,
    )
    self.skip_windows()
    return self


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from."""

  # "" = the Python standard library's sources; else files, dirs or globs, comma-separated
  path: str = ""
  tokenizer: str = ""  # "" = byte-level; else a HF tokenizer.json
  heldout_fraction: float = 0.05  # share of files held out (split by file)
  # Which files are held out. Apart from train.seed, so that runs with different seeds (a
  # noise floor) are scored on the same held-out files.
  split_seed: int = 0
  max_bytes: int = 0  # 0 = read everything; else cap the corpus (quick runs)

  def validate(self) -> "DataConfig":
    _require(
      0 < self.heldout_fraction < 1,
      "data.heldout_fraction",
      "must be in (0, 1)",
      self.heldout_fraction,
    )
    _require(self.max_bytes >= 0, "data.max_bytes", "must be >= 0", self.max_bytes)
    _require(self.split_seed >= 0, "data.split_seed", "must be >= 0", self.split_seed)
    return self


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """The device mesh: sizes of the `data`, `expert` and `pipe` axes (-1 = the rest)."""

  data: int = -1  # data-parallel axis size
  expert: int = 1  # expert-parallel axis size (divides n_routed_experts)
  pipe: int = 1  # pipeline axis size
  ep_ranks_per_node: int = 1  # EP ranks forming one "node" for node-limited routing
  capacity_factor: float = 0.0  # EP dispatch slots per (src, dst) rank pair; 0 = dropless
  # Dropless EP dispatch: the all-to-all buffers hold this many times the mean copies per
  # (src, dst) pair; when any rank overflows, every rank takes the exact worst-case buffer
  # together for that layer (0 = always the worst-case buffer).
  dispatch_factor: float = 2.0
  # Node-limited two-stage dispatch (arXiv 2412.19437 §3.2.2): a token crosses to each chosen
  # node once (to the same local rank there), then fans out to that node's ranks.
  ep_two_stage: bool = False
  pipeline: str = "none"  # none | 1f1b | dualpipe
  microbatches: int = 4  # pipeline micro-batches per step

  def validate(self) -> "ParallelConfig":
    sizes = (self.data, self.expert, self.pipe)
    _require(
      sum(s == -1 for s in sizes) <= 1,
      "parallel.data",
      "at most one of data/expert/pipe may be -1",
      sizes,
    )
    for name in ("data", "expert", "pipe"):
      v = getattr(self, name)
      _require(v == -1 or v > 0, f"parallel.{name}", "must be positive or -1", v)
    _require(
      self.ep_ranks_per_node > 0,
      "parallel.ep_ranks_per_node",
      "must be positive",
      self.ep_ranks_per_node,
    )
    _require(
      self.capacity_factor >= 0,
      "parallel.capacity_factor",
      "must be >= 0 (0 = dropless expert dispatch)",
      self.capacity_factor,
    )
    _require(
      self.dispatch_factor == 0 or self.dispatch_factor >= 1,
      "parallel.dispatch_factor",
      "must be 0 (worst-case buffers) or >= 1",
      self.dispatch_factor,
    )
    _require(
      self.pipeline in PIPELINES, "parallel.pipeline", f"must be one of {PIPELINES}", self.pipeline
    )
    _require(self.microbatches > 0, "parallel.microbatches", "must be positive", self.microbatches)
    return self


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)

  def validate(self) -> "Config":
    self.model.validate()
    self.train.validate()
    self.data.validate()
    self.parallel.validate()
    _require(
      self.train.seq_len <= self.model.max_position_embeddings,
      "train.seq_len",
      f"exceeds model.max_position_embeddings={self.model.max_position_embeddings}",
      self.train.seq_len,
    )
    return self


_SECTIONS = {
  "model": ModelConfig,
  "train": TrainConfig,
  "data": DataConfig,
  "parallel": ParallelConfig,
}


def _build(cls, values: Mapping[str, Any], prefix: str):
  known = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ValueError(
      f"unknown config field(s) {', '.join(prefix + u for u in unknown)}; "
      f"known: {', '.join(sorted(known))}"
    )
  kwargs = {}
  for name, value in values.items():
    default = known[name].default
    if isinstance(default, bool) and not isinstance(value, bool):
      raise ValueError(f"invalid config field `{prefix}{name}` = {value!r}: must be a bool")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
      if not value.is_integer():
        raise ValueError(f"invalid config field `{prefix}{name}` = {value!r}: must be an integer")
      value = int(value)
    kwargs[name] = value
  return cls(**kwargs)


def from_dict(values: Mapping[str, Any]) -> Config:
  """Builds and validates a `Config` from a nested mapping or an ml_collections ConfigDict."""
  if hasattr(values, "to_dict"):
    values = values.to_dict()
  unknown = sorted(set(values) - set(_SECTIONS))
  if unknown:
    raise ValueError(f"unknown config section(s) {unknown}; known: {sorted(_SECTIONS)}")
  parts = {name: _build(cls, values.get(name, {}), f"{name}.") for name, cls in _SECTIONS.items()}
  return Config(**parts).validate()


def to_dict(config: Config) -> dict:
  return dataclasses.asdict(config)


def replace(config: Config, **sections: Mapping[str, Any]) -> Config:
  """`replace(cfg, model={"n_routed_experts": 8})` -> a new validated Config."""
  values = to_dict(config)
  for name, updates in sections.items():
    values[name].update(updates)
  return from_dict(values)


__all__ = [
  "Config",
  "ModelConfig",
  "TrainConfig",
  "DataConfig",
  "ParallelConfig",
  "from_dict",
  "to_dict",
  "replace",
]
