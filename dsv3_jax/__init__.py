"""dsv3_jax: the DeepSeek-V3 system in JAX — model, FP8 training, parallelism, serving.

Shape legend used in names throughout (`x_BxLxD`, `logits_BxLxV`):
  B batch            L query length       T key / cache length   D model width
  H attention heads  Q q_lora_rank        K kv_lora_rank         R rope head dim
  N nope head dim    V vocab (or value head dim inside attention)
  E routed experts   G expert groups      k experts per token    F expert FFN width
  S rows per expert block                 NB expert blocks       C token copies
"""

__version__ = "0.1.0"


def from_pretrained(path, **kwargs):
  """A ready model from a HF DeepSeek-V3 directory, an orbax export or a training workdir.

  `model(tokens)` maps int token ids [batch, length] to float32 logits [batch, length, vocab].
  See `dsv3_jax.pretrained.from_pretrained` for the options (fp8, dtype, mtp, overrides).
  """
  from dsv3_jax import pretrained  # imported lazily: keeps `import dsv3_jax` light

  return pretrained.from_pretrained(path, **kwargs)
