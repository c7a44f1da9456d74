"""DeepSeek-V3 model family, from test-sized to the published 671B.

Usage:
  python -m experiments.train --config=configs/dsv3.py:small --devices=8 --workdir=runs/small
  python -m experiments.train --config=configs/dsv3.py:tiny --config.train.steps=20
  python -m experiments.count_params --config=configs/dsv3.py:671b

Variants (the part after the colon):
  tiny  -- a few-second model for tests and notebooks
  small -- the main job (`make run`): trains in minutes on an emulated 8-device CPU mesh
           (data 2 x expert 4)
  bench -- the ~196M-parameter model shared by every benchmark against peers
  671b  -- the published DeepSeek-V3 hyperparameters, exactly (for planning; not trainable here)
Any field overrides from the command line: --config.model.n_routed_experts=16.
"""

import ml_collections


def _model(**overrides) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.vocab_size = 512  # >= the tokenizer's (byte-level: 259)
  m.hidden_size = 256  # D
  m.intermediate_size = 768  # dense layers' SwiGLU width
  m.moe_intermediate_size = 128  # each routed and shared expert's width
  m.num_hidden_layers = 4  # dense + MoE blocks (MTP not counted)
  m.first_k_dense_replace = 1  # the first k blocks are dense
  m.num_attention_heads = 4
  m.q_lora_rank = 0  # 0 = full-rank query projection
  m.kv_lora_rank = 64  # the cached latent's width
  m.qk_nope_head_dim = 32
  m.qk_rope_head_dim = 16  # the decoupled rotary key/query dims (even)
  m.v_head_dim = 32
  m.n_routed_experts = 16
  m.n_shared_experts = 1
  m.num_experts_per_tok = 4  # routed experts per token (k)
  m.n_group = 4  # expert groups for group-limited routing
  m.topk_group = 2  # groups a token may use (M)
  m.routed_scaling_factor = 2.5
  m.norm_topk_prob = True
  m.num_nextn_predict_layers = 1  # MTP depth D (0 = off)
  m.rms_norm_eps = 1e-6
  m.rope_theta = 10000.0
  m.max_position_embeddings = 2048
  m.rope_scaling = "none"  # none = plain RoPE | yarn = YaRN context extension
  m.rope_factor = 1.0  # YaRN factor; 1.0 under rope_scaling none
  m.rope_original_max_position_embeddings = 4096
  m.rope_beta_fast = 32.0
  m.rope_beta_slow = 1.0
  m.rope_mscale = 1.0
  m.rope_mscale_all_dim = 1.0
  m.init_std = 0.02  # normal init std (the report uses 0.006 at 7168 wide)
  m.dtype = "float32"  # activations; bf16 dots are slower than f32 on CPU
  m.matmul_precision = "fp32"  # fp32 | bf16 | fp8 for every linear projection
  m.expert_block_size = 64  # rows per block of the dropless grouped expert GEMM
  m.update(overrides)
  return m


_MODELS = {
    "tiny": dict(vocab_size=272, hidden_size=64, intermediate_size=128,
                 moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1,
                 num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                 n_group=4, topk_group=2, max_position_embeddings=256, expert_block_size=16,
                 rope_scaling="yarn", rope_factor=2.0, rope_original_max_position_embeddings=64),
    "small": dict(vocab_size=272, hidden_size=256, intermediate_size=768,
                  moe_intermediate_size=128, num_hidden_layers=4, first_k_dense_replace=1,
                  num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                  max_position_embeddings=1024, expert_block_size=32),
    "bench": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536,
                  moe_intermediate_size=256, num_hidden_layers=8, first_k_dense_replace=1,
                  num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
                  qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                  n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4,
                  n_shared_experts=1, num_nextn_predict_layers=1, max_position_embeddings=2048,
                  rope_scaling="yarn", rope_factor=4.0, rope_original_max_position_embeddings=512,
                  expert_block_size=64),
    "671b": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                 moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3,
                 num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                 qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                 n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
                 topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
                 num_nextn_predict_layers=1, rms_norm_eps=1e-6, rope_theta=10000.0,
                 max_position_embeddings=163840, rope_scaling="yarn", rope_factor=40.0,
                 rope_original_max_position_embeddings=4096, rope_beta_fast=32.0,
                 rope_beta_slow=1.0, rope_mscale=1.0, rope_mscale_all_dim=1.0, init_std=0.006,
                 dtype="bfloat16", matmul_precision="fp8", expert_block_size=128),
}

# The same network as pretrained (report §4.2): plain RoPE over a 4K context. The report then
# extends the context with YaRN (§4.3), which gives `671b`.
_MODELS["671b_pretrain"] = dict(_MODELS["671b"], rope_scaling="none", rope_factor=1.0,
                                max_position_embeddings=4096)

_TRAIN = {
    "tiny": dict(steps=4, global_batch=8, seq_len=32, warmup_steps=2, learning_rate=3e-3,
                 log_every=1, eval_every=2, eval_batches=1, checkpoint_every=2),
    "small": dict(steps=160, global_batch=16, seq_len=128, warmup_steps=20,
                  learning_rate=3e-3, log_every=10, eval_every=80, eval_batches=8,
                  checkpoint_every=40),
    "bench": dict(steps=100, global_batch=4, seq_len=512, warmup_steps=10,
                  learning_rate=1e-3),
    "671b": dict(steps=100, global_batch=15360, seq_len=4096, warmup_steps=2000,
                 learning_rate=2.2e-4, mtp_lambda=0.3),
}


_TRAIN["671b_pretrain"] = _TRAIN["671b"]
VARIANTS = tuple(_MODELS)

# `small` (the main job) runs on 8 devices as data 2 x expert 4: 4 experts per EP rank, each
# rank its own "node", so the 4 expert groups are 4 nodes and topk_group=2 caps every token at
# 2 of them.
_PARALLEL = {
    "small": dict(data=2, expert=4, ep_ranks_per_node=1),
}


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
  if arg not in _MODELS:
    raise ValueError(f"unknown variant {arg!r}; choose one of {sorted(_MODELS)}")
  cfg = ml_collections.ConfigDict()
  cfg.model = _model(**_MODELS[arg])

  t = ml_collections.ConfigDict()
  t.steps = 100  # optimizer steps
  t.global_batch = 8  # sequences per step, divisible by data x expert mesh size
  t.seq_len = 128  # tokens per sequence
  t.learning_rate = 2.2e-4  # peak, after linear warmup; cosine decay afterwards
  t.warmup_steps = 10
  t.min_lr_ratio = 0.1  # the cosine ends at learning_rate * min_lr_ratio
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.grad_clip = 1.0  # global-norm clip
  t.moment_dtype = "bfloat16"  # AdamW moments; master weights float32
  t.mtp_lambda = 0.3  # MTP loss weight (divided by depth D)
  t.balance_alpha = 1e-4  # sequence-wise balance loss weight
  t.bias_update_gamma = 1e-3  # aux-loss-free bias step per update
  t.seed = 0  # init and data order
  t.log_every = 10  # steps between metric writes
  t.eval_every = 50  # steps between held-out evaluations
  t.eval_batches = 4  # held-out batches per evaluation
  t.checkpoint_every = 50  # steps between checkpoints
  t.keep_checkpoints = 3
  t.update(_TRAIN[arg])
  cfg.train = t

  d = ml_collections.ConfigDict()
  d.path = ""  # "" = the Python standard library sources; else files/dirs/globs, comma-separated
  d.tokenizer = ""  # "" = byte-level; else a HF tokenizer.json
  d.heldout_fraction = 0.05  # share of files held out, split by file
  d.max_bytes = 2_000_000 if arg == "tiny" else 0  # 0 = the whole corpus
  cfg.data = d

  p = ml_collections.ConfigDict()
  p.data = -1  # data-parallel mesh axis size (-1 = the devices left over)
  p.expert = 1  # expert-parallel mesh axis size (divides n_routed_experts)
  p.pipe = 1  # pipeline mesh axis size
  p.ep_ranks_per_node = 1  # EP ranks forming a "node" for node-limited routing
  p.capacity_factor = 0.0  # EP dispatch slots per rank pair, x the mean; 0 = dropless
  p.update(_PARALLEL.get(arg, {}))
  p.pipeline = "none"  # none | 1f1b | dualpipe
  p.microbatches = 4  # pipeline micro-batches per step
  cfg.parallel = p
  return cfg
