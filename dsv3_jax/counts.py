"""Analytic parameter counts and training FLOPs of a `ModelConfig`.

The counts follow the architecture of the DeepSeek-V3 report (arXiv 2412.19437): MLA
(§2.1.1), DeepSeekMoE with shared and routed experts (§2.1.2) and the MTP modules (§2.2),
which share the main model's embedding and output head. For the published hyperparameters
(§4.2) they give the report's 671B total and ~37B activated parameters per token.
`experiments/count_params.py` cross-checks them against the real tensors.
"""

from dsv3_jax.config import ModelConfig


def part_counts(cfg: ModelConfig) -> dict:
  """Parameters of each kind of part, one of each (for placement: which rank holds what).

  attention   one MLA block with its two block norms
  dense_mlp   one dense layer's SwiGLU MLP
  moe_shared  one MoE layer's shared experts and its router (replicated under EP)
  moe_routed  one MoE layer's routed experts (sharded over EP)
  mtp_extra   one MTP module's own projection and norms (its block counted as a MoE layer's)
  embedding, head (with the final norm)
  """
  d = cfg.hidden_size
  h = cfg.num_attention_heads
  if cfg.q_lora_rank:
    q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
  else:
    q = d * h * cfg.qk_head_dim
  kv = (
    d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    + cfg.kv_lora_rank
    + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
  )
  expert = 3 * d * cfg.moe_intermediate_size
  return {
    "attention": q + kv + h * cfg.v_head_dim * d + 2 * d,
    "dense_mlp": 3 * d * cfg.intermediate_size,
    "moe_shared": cfg.n_shared_experts * expert + d * cfg.n_routed_experts,
    "moe_routed": cfg.n_routed_experts * expert,
    "expert": expert,
    "mtp_extra": 2 * d * d + 3 * d,
    "embedding": cfg.vocab_size * d,
    "head": cfg.vocab_size * d + d,
  }


def param_counts(cfg: ModelConfig) -> dict:
  """Analytic parameter counts (total, activated per token, MTP), for cross-checks."""
  p = part_counts(cfg)
  attn, expert, embed, head = p["attention"], p["expert"], p["embedding"], p["head"]
  d = cfg.hidden_size
  moe_total = p["moe_shared"] + p["moe_routed"]
  moe_active = p["moe_shared"] + cfg.num_experts_per_tok * expert
  body_total = cfg.n_dense_layers * (attn + p["dense_mlp"]) + cfg.n_moe_layers * (attn + moe_total)
  body_active = cfg.n_dense_layers * (attn + p["dense_mlp"]) + cfg.n_moe_layers * (
    attn + moe_active
  )
  mtp_unique = cfg.num_nextn_predict_layers * (p["mtp_extra"] + attn + moe_total)
  return {
    "total": embed + body_total + head,
    "activated": embed + body_active + head,
    "mtp_unique": mtp_unique,
    "mtp_with_shared": mtp_unique + cfg.num_nextn_predict_layers * (embed + head - d),
  }


def describe(cfg: ModelConfig) -> str:
  c = param_counts(cfg)
  return (
    f"{c['total'] / 1e9:.2f}B params, {c['activated'] / 1e9:.2f}B activated, "
    f"MTP {c['mtp_unique'] / 1e9:.2f}B unique"
  )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul params touched + causal attention scores."""
  counts = param_counts(cfg)
  matmul_params = counts["activated"] - cfg.vocab_size * cfg.hidden_size  # no lookup
  depth = cfg.num_nextn_predict_layers
  if depth:
    mtp_active = (
      counts["mtp_unique"]
      - cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
      + cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    )
    matmul_params += depth * (mtp_active + cfg.vocab_size * cfg.hidden_size)
  attn_layers = cfg.num_hidden_layers + depth
  attn = (
    6 * attn_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len / 2)
  )
  return 6.0 * matmul_params + attn


__all__ = ["part_counts", "param_counts", "describe", "flops_per_token"]
