"""The Hugging Face `DeepseekV3Config` (`config.json`) <-> `ModelConfig` mapping.

Most of `ModelConfig`'s names are HF's, so the mapping is mostly a copy; the rest is the
rotary scaling (HF's `rope_scaling` / `rope_parameters` dict <-> our `rope_*` fields) and a
few fields HF spells differently or leaves null. Settings this model cannot honour raise
`ValueError` naming the HF field instead of being dropped. The weights themselves are read
and written by `dsv3_jax.checkpoint.hf`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.rope import yarn_mscale

_HF_RENAMES = {
  "rope_factor": "factor",
  "rope_original_max_position_embeddings": "original_max_position_embeddings",
  "rope_beta_fast": "beta_fast",
  "rope_beta_slow": "beta_slow",
  "rope_mscale": "mscale",
  "rope_mscale_all_dim": "mscale_all_dim",
}
_HF_PLAIN = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "moe_intermediate_size",
  "num_hidden_layers",
  "first_k_dense_replace",
  "num_attention_heads",
  "kv_lora_rank",
  "qk_nope_head_dim",
  "qk_rope_head_dim",
  "v_head_dim",
  "n_routed_experts",
  "n_shared_experts",
  "num_experts_per_tok",
  "n_group",
  "topk_group",
  "routed_scaling_factor",
  "norm_topk_prob",
  "num_nextn_predict_layers",
  "rms_norm_eps",
  "rope_theta",
  "max_position_embeddings",
)


def _hf_rope_fields(hf: Mapping[str, Any]) -> dict:
  """Our rope_* fields from HF's `rope_scaling` (published) or `rope_parameters` (newer).

  HF's YaRN becomes `rope_scaling="yarn"`; no scaling (or type "default") becomes "none", and
  so does YaRN at factor 1, which is plain RoPE (unless it sets an `attention_factor`).

  Follows transformers' YaRN semantics exactly: cos/sin carry `attention_factor` (given, or
  mscale(f, mscale) / mscale(f, mscale_all_dim) when both are set, else mscale(f, 1)); the
  softmax scale carries mscale(f, mscale_all_dim)^2 only when mscale_all_dim is set. Ours
  computes cos/sin x mscale(f, rope_mscale) / mscale(f, rope_mscale_all_dim) and softmax x
  mscale(f, rope_mscale_all_dim)^2, so rope_mscale is solved for when HF's rule differs.
  """
  scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  out = {}
  theta = hf.get("rope_theta", scaling.get("rope_theta"))
  if theta is not None:
    out["rope_theta"] = float(theta)
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind not in (None, "yarn", "default"):
    raise ValueError(f"HF config rope_scaling type {kind!r}: only 'yarn' or none is supported")
  if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError("HF config rope partial_rotary_factor != 1 is not supported")
  if kind != "yarn":
    return out
  if scaling.get("truncate", True) is False:
    raise ValueError(
      "HF config rope_scaling truncate=false is not supported (DeepSeek floors "
      "and ceils the YaRN correction range)"
    )
  orig = scaling.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
  factor = scaling.get("factor")
  if factor is None:
    factor = hf["max_position_embeddings"] / orig
  factor = float(factor)
  m, a = scaling.get("mscale"), scaling.get("mscale_all_dim")
  af = scaling.get("attention_factor")
  if factor < 1.0:
    raise ValueError(f"HF config rope_scaling factor={factor!r}: YaRN needs a factor >= 1")
  if factor == 1.0:
    if af is not None and float(af) != 1.0:
      raise ValueError(
        f"HF config rope_scaling attention_factor={af!r} with factor 1 is not "
        "supported (it scales plain RoPE)"
      )
    return out
  out.update(
    rope_scaling="yarn",
    rope_factor=factor,
    rope_original_max_position_embeddings=int(orig),
    rope_beta_fast=float(scaling.get("beta_fast") or 32.0),
    rope_beta_slow=float(scaling.get("beta_slow") or 1.0),
    rope_mscale_all_dim=float(a or 0.0),
  )
  if af is None and m and a:
    out["rope_mscale"] = float(m)
  else:
    target = float(af) if af is not None else yarn_mscale(factor, 1.0)
    denom = yarn_mscale(factor, out["rope_mscale_all_dim"])
    out["rope_mscale"] = (target * denom - 1.0) / (0.1 * math.log(factor))
  return out


_HF_REQUIRED = (
  "vocab_size",
  "hidden_size",
  "num_hidden_layers",
  "num_attention_heads",
  "kv_lora_rank",
  "qk_nope_head_dim",
  "qk_rope_head_dim",
  "v_head_dim",
)


def from_hf_config(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """ModelConfig from a HF DeepSeek-V3 `config.json` mapping.

  Reads both the published layout (`rope_scaling`, top-level `rope_theta`) and the newer
  transformers one (`rope_parameters`). Settings this model cannot honour raise ValueError
  instead of being ignored (transformers ignores `scoring_func` and `topk_method`).
  """
  missing = [k for k in _HF_REQUIRED if hf.get(k) is None]
  if missing:
    raise ValueError(f"HF config lacks required field(s) {missing}")
  kwargs = {name: hf[name] for name in _HF_PLAIN if hf.get(name) is not None}
  kwargs.pop("rope_theta", None)
  kwargs["q_lora_rank"] = hf.get("q_lora_rank") or 0
  kwargs["n_group"] = hf.get("n_group") or 1
  kwargs["topk_group"] = hf.get("topk_group") or 1
  kwargs["num_nextn_predict_layers"] = int(
    hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers")) or 0
  )
  kwargs["init_std"] = hf.get("initializer_range", 0.006)
  if kwargs.get("first_k_dense_replace", 0) > kwargs["num_hidden_layers"]:
    kwargs["first_k_dense_replace"] = kwargs["num_hidden_layers"]  # all dense, as in HF
  checks = (
    ("scoring_func", "sigmoid"),
    ("topk_method", "noaux_tc"),
    ("hidden_act", "silu"),
    ("attention_bias", False),
    ("moe_layer_freq", 1),
  )
  for key, want in checks:
    if hf.get(key) is not None and hf[key] != want:
      raise ValueError(f"HF config {key}={hf[key]!r}: only {want!r} (DeepSeek-V3) is supported")
  kwargs.update(_hf_rope_fields(hf))
  for name in ("routed_scaling_factor", "rms_norm_eps"):
    if name in kwargs:
      kwargs[name] = float(kwargs[name])
  kwargs.update(overrides)
  return ModelConfig(**kwargs).validate()


def to_hf_config(cfg: ModelConfig) -> dict:
  """A HF DeepSeek-V3 `config.json` mapping for this model (the published layout).

  `rope_scaling` is written (as YaRN) only for `cfg.rope_scaling == "yarn"`, else null.
  """
  hf = {name: getattr(cfg, name) for name in _HF_PLAIN}
  hf.update(
    architectures=["DeepseekV3ForCausalLM"],
    model_type="deepseek_v3",
    q_lora_rank=cfg.q_lora_rank or None,
    hidden_act="silu",
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    moe_layer_freq=1,
    tie_word_embeddings=False,
    attention_bias=False,
    attention_dropout=0.0,
    initializer_range=cfg.init_std,
    num_key_value_heads=cfg.num_attention_heads,
    rope_interleave=True,
    torch_dtype="bfloat16",
    bos_token_id=0,
    eos_token_id=1,
  )
  if cfg.rope_scaling == "yarn":
    hf["rope_scaling"] = {
      "type": "yarn",
      "rope_type": "yarn",
      **{theirs: getattr(cfg, ours) for ours, theirs in _HF_RENAMES.items()},
    }
    ours = yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / yarn_mscale(
      cfg.rope_factor, cfg.rope_mscale_all_dim
    )
    if not (cfg.rope_mscale and cfg.rope_mscale_all_dim):
      hf["rope_scaling"]["attention_factor"] = ours  # HF's default rule would differ
  else:
    hf["rope_scaling"] = None
  return hf


__all__ = ["from_hf_config", "to_hf_config"]
