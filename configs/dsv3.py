"""DeepSeek-V3 model family, from test-sized to the published 671B.

Usage:
  python -m experiments.train --config=configs/dsv3.py:small --devices=8 --workdir=runs/small
  python -m experiments.train --config=configs/dsv3.py:tiny --config.train.steps=20
  python -m experiments.count_params --config=configs/dsv3.py:671b

Every field starts from its default in `dsv3_jax/config.py` (`ModelConfig`, `TrainConfig`,
`DataConfig`, `ParallelConfig`), where each field's meaning and unit are documented; a variant
below lists only what it changes, and why. Any field overrides from the command line:
--config.model.n_routed_experts=16.

Variants (the part after the colon):
  tiny          -- a few-second model for tests and notebooks
  small         -- the main job (`make run`): trains in minutes on an emulated 8-device CPU
                   mesh (data 2 x expert 4)
  bench         -- the ~196M-parameter model shared by every benchmark against peers
  671b          -- the published DeepSeek-V3 (its HF config.json), YaRN-extended to 160K
                   positions: the inference / long-context preset (planning only here)
  671b_pretrain -- the same network as pretrained: plain RoPE over a 4K context
"""

import dataclasses

import ml_collections

from dsv3_jax import config as config_lib

# The report's init std (0.006) is for a 7168-wide model; the narrow variants train with 0.02.
_NARROW = dict(init_std=0.02)

# DeepSeek-V3's network (arXiv 2412.19437 §4.2). What the defaults already hold is the
# report's too: routed_scaling_factor 2.5, one shared expert, MTP depth 1, rope_theta 1e4,
# init_std 0.006 and YaRN's beta 32 / alpha 1 / mscale 1 over a 4096-token original context.
_DSV3 = dict(
  vocab_size=129280,
  hidden_size=7168,
  intermediate_size=18432,
  moe_intermediate_size=2048,
  num_hidden_layers=61,
  first_k_dense_replace=3,
  num_attention_heads=128,
  q_lora_rank=1536,
  kv_lora_rank=512,
  qk_nope_head_dim=128,
  qk_rope_head_dim=64,
  v_head_dim=128,
  n_routed_experts=256,
  num_experts_per_tok=8,
  n_group=8,
  topk_group=4,
  dtype="bfloat16",
  matmul_precision="fp8",  # the report's FP8 mixed precision (§3.3)
  expert_block_size=128,
)
# Pretraining at 4K: 15360 sequences per step (the batch size the report ramps up to) and a
# 2K-step warmup to the 2.2e-4 peak (the default rate).
# `logits_chunk`: the head and its cross-entropy 1024 positions at a time (rerun in the
# backward): a 4096-token sequence's float32 logits over 129,280 tokens are 2.1 GB per head,
# kept in every pipeline stage's entry otherwise (the 671B plan: 914.7 -> 772.4 GB without
# recomputation, 154.6 -> 150.3 GB with it).
_DSV3_TRAIN = dict(
  global_batch=15360, seq_len=4096, warmup_steps=2000, lr_schedule="report", logits_chunk=1024
)

_VARIANTS = {
  "tiny": dict(
    model=dict(
      _NARROW,
      vocab_size=272,
      hidden_size=64,
      intermediate_size=128,
      moe_intermediate_size=32,
      num_hidden_layers=3,
      num_attention_heads=2,
      q_lora_rank=32,
      kv_lora_rank=32,
      qk_nope_head_dim=16,
      qk_rope_head_dim=8,
      v_head_dim=16,
      n_routed_experts=8,
      num_experts_per_tok=2,
      max_position_embeddings=256,
      expert_block_size=16,
      # YaRN on from step 0 (factor 2 over 64 positions) so that the tests and
      # notebooks run the YaRN path; not a pretraining recipe.
      rope_scaling="yarn",
      rope_factor=2.0,
      rope_original_max_position_embeddings=64,
    ),
    train=dict(
      steps=4,
      seq_len=32,
      warmup_steps=2,
      learning_rate=3e-3,
      log_every=1,
      eval_every=2,
      eval_batches=1,
      checkpoint_every=2,
    ),
    data=dict(max_bytes=2_000_000),  # a 2 MB corpus loads in a blink
  ),
  "small": dict(
    model=dict(
      _NARROW,
      vocab_size=272,
      q_lora_rank=128,
      max_position_embeddings=1024,
      expert_block_size=32,
      unroll_layers=True,  # a few layers: the unrolled step is ~6% faster, compiles as fast
    ),
    # `make run`'s budget: 4.5 minutes of training, 16 x 128 tokens a step, as many steps as
    # fit (at most 600; 200 steps took 2 to 4.6 minutes on 2-core machines), the learning-rate
    # schedule spanning them: the report's shape, so that the budget can keep correcting the
    # count from the measured pace through the constant first two thirds of the run.
    train=dict(
      steps=600,
      time_budget_s=270.0,
      lr_schedule="report",
      global_batch=16,
      warmup_steps=20,
      # Swept on a 2-core machine, 270 s each, held-out on 128 spread windows, seeds 0 / 1:
      # 3e-3 1.592 / 1.621, 2e-3 1.568 / 1.545, 1.5e-3 1.524 / 1.542, 1e-3 1.513 / 1.533,
      # 7e-4 1.531 / -.
      learning_rate=1e-3,
      # The report's gamma (1e-3) suits a run of many thousand steps; over a few hundred a
      # bias moves at most a few tenths and the router stays skewed (MaxVio ~2.9 at step 180
      # in one MoE layer; 18 of 19 logged steps overflowed the EP dispatch's fast buffer). 1e-2 balances the
      # experts by step ~100 (MaxVio ~0.3), which also makes the steps faster.
      bias_update_gamma=1e-2,
      eval_every=100,
      eval_batches=8,
      checkpoint_every=50,
    ),
    # 8 devices as data 2 x expert 4: 4 experts per EP rank, each rank its own "node"
    # (ep_ranks_per_node=1), so the 4 expert groups are 4 nodes and topk_group=2 caps
    # every token at 2 of them. The two-stage dispatch sends a token once to each chosen
    # node (§3.2.2), here once per rank instead of once per copy: at most 2 rows where the
    # flat dispatch sends 4. On 2 cores the step was 3-12% faster in each of 4 alternated
    # rounds (0.953 vs 1.019 s median).
    parallel=dict(data=2, expert=4, ep_two_stage=True),
  ),
  "bench": dict(
    model=dict(
      _NARROW,
      vocab_size=8192,
      hidden_size=512,
      intermediate_size=1536,
      moe_intermediate_size=256,
      num_hidden_layers=8,
      num_attention_heads=8,
      q_lora_rank=256,
      kv_lora_rank=128,
      qk_nope_head_dim=64,
      qk_rope_head_dim=32,
      v_head_dim=64,
      n_routed_experts=64,
      num_experts_per_tok=6,
      n_group=8,
      topk_group=4,
      # YaRN (factor 4 over 512 positions) like the published model, kept so that
      # every benchmark result stays comparable with the earlier ones.
      rope_scaling="yarn",
      rope_factor=4.0,
      rope_original_max_position_embeddings=512,
      # 8 layers unrolled: each GEMM reads its layer's weights in place; the train step is
      # ~16% faster on 2 CPU cores, the compile time unchanged, its temporaries +10%.
      unroll_layers=True,
    ),
    train=dict(global_batch=4, seq_len=512, learning_rate=1e-3),
  ),
  # The published checkpoint is the model after the context extension (§4.3): YaRN with
  # s = 40 over the 4K pretraining context, 163840 positions. This is what HF import and
  # export round-trip, the inference / long-context preset; not trainable on this machine.
  "671b": dict(
    model=dict(_DSV3, rope_scaling="yarn", rope_factor=40.0, max_position_embeddings=163840),
    train=_DSV3_TRAIN,
  ),
  # The same network as pretrained (§4.2): plain RoPE over a 4K context, no YaRN. The report
  # then extends it with YaRN to 32K and to 128K (§4.3), which gives `671b`.
  "671b_pretrain": dict(
    model=dict(_DSV3, max_position_embeddings=4096),
    train=_DSV3_TRAIN,
  ),
}

VARIANTS = tuple(_VARIANTS)


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
  """The `arg` variant: the dataclass defaults with that variant's overrides applied."""
  if arg not in _VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; choose one of {sorted(_VARIANTS)}")
  cfg = ml_collections.ConfigDict(dataclasses.asdict(config_lib.Config()))
  for section, overrides in _VARIANTS[arg].items():
    unknown = sorted(set(overrides) - set(cfg[section]))
    if unknown:
      raise ValueError(
        f"variant {arg!r} sets unknown field(s) {', '.join(f'{section}.{k}' for k in unknown)}"
      )
    cfg[section].update(overrides)
  return cfg
