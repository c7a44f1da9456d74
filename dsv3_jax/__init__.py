"""dsv3_jax: the DeepSeek-V3 system in JAX — model, FP8 training, parallelism, serving.

Shape legend used in names throughout (`x_BxLxD`, `logits_BxLxV`):
  B batch            L query length       T key / cache length   D model width
  H attention heads  Q q_lora_rank        K kv_lora_rank         R rope head dim
  N nope head dim    V vocab (or value head dim inside attention)
  E routed experts   G expert groups      k experts per token    F expert FFN width
  S rows per expert block                 NB expert blocks       C token copies
"""

__version__ = "0.1.0"
