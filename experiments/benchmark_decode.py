r"""Prefill and greedy decode of the `bench` model: this codebase vs HF transformers.

  python -m experiments.benchmark_decode --out=runs/benchmark_decode.json
  python -m experiments.benchmark_decode --prefill_len=256 --new_tokens=32   # quicker

Builds `bench` with random weights once, exports it in the HF layout (float32), and in one
process measures both implementations on the same weights and CPU (torch threads = cores):
prefill tokens/s (batch x prefill_len), greedy decode tokens/s at batch 1 and 8 (prompt
`prompt_len`, `new_tokens` new; the prefill is subtracted), KV-cache bytes per token, and this
machine's memory bandwidth (a large copy timed in the same run), to state decode as a fraction
of the bandwidth limit (weights and cache streamed once per step). Prints a table, writes JSON.
"""

import os
import sys
import tempfile
import time

from absl import app, flags

from experiments import common

_CONFIG = flags.DEFINE_string("config", "bench", "Variant of configs/dsv3.py.")
_PREFILL_BATCH = flags.DEFINE_integer("prefill_batch", 4, "Prefill batch.")
_PREFILL_LEN = flags.DEFINE_integer("prefill_len", 512, "Prefill tokens per sequence.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Decode prompt length.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Greedy tokens per sequence.")
_BATCHES = flags.DEFINE_list("decode_batches", ["1", "8"], "Decode batch sizes.")
_PEER = flags.DEFINE_bool("peer", True, "Also time HF transformers (needs the `hf` extra).")
_OUT = flags.DEFINE_string("out", "runs/benchmark_decode.json", "JSON output.")


def _best(fn, reps=3):
  fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def memory_bandwidth(nbytes=1 << 29) -> float:
  """Bytes moved per second (read + write) by a large numpy copy."""
  import numpy as np
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  return 2 * nbytes / _best(lambda: np.copyto(dst, src), reps=5)


def decode_bytes_per_step(cfg, batch: int, context: int, cache_bytes_per_token: int) -> float:
  """Weights touched by one decode step (float32) plus the cache read: the bandwidth floor."""
  from dsv3_jax.counts import param_counts
  c = param_counts(cfg)
  expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  touched = e * (1 - (1 - k / e) ** batch)  # expected distinct experts per layer
  weights = (c["activated"] - cfg.vocab_size * cfg.hidden_size
             + cfg.n_moe_layers * (touched - k) * expert) * 4
  return weights + batch * context * cache_bytes_per_token


def bench_ours(model, batches, prefill_batch, prefill_len, prompt_len, new):
  import numpy as np

  from dsv3_jax.inference.generate import Generator, SamplingConfig

  gen = Generator(model)
  rng = np.random.default_rng(0)
  v = model.cfg.vocab_size
  out = {"cache_bytes_per_token": gen.cache_bytes_per_token()}
  prompts = rng.integers(0, v, (prefill_batch, prefill_len)).tolist()
  t = _best(lambda: gen.generate(prompts, SamplingConfig(max_new_tokens=1)))
  out["prefill_tokens_per_s"] = prefill_batch * prefill_len / t
  for b in batches:
    prompts = rng.integers(0, v, (b, prompt_len)).tolist()
    res = {}

    def run():
      res["r"] = gen.generate(prompts, SamplingConfig(max_new_tokens=new))

    _best(run, reps=2)
    r = res["r"]
    out[f"decode_b{b}_tokens_per_s"] = b * (new - 1) / r.decode_seconds
  return out


def bench_hf(path, batches, prefill_batch, prefill_len, prompt_len, new, vocab):
  import numpy as np
  import torch
  import transformers

  torch.set_num_threads(os.cpu_count() or 1)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  rng = np.random.default_rng(0)
  out = {"torch": torch.__version__, "transformers": transformers.__version__,
         "threads": torch.get_num_threads(),
         "experts_implementation": getattr(model.config, "experts_implementation", None)}
  ids = torch.tensor(rng.integers(0, vocab, (prefill_batch, prefill_len)))
  with torch.no_grad():
    t = _best(lambda: model(input_ids=ids, use_cache=True))
  out["prefill_tokens_per_s"] = prefill_batch * prefill_len / t
  for b in batches:
    ids = torch.tensor(rng.integers(0, vocab, (b, prompt_len)))
    gen = lambda n: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0)
    with torch.no_grad():
      t_one = _best(lambda: gen(1), reps=2)
      t_all = _best(lambda: gen(new), reps=2)
    out[f"decode_b{b}_tokens_per_s"] = b * (new - 1) / max(t_all - t_one, 1e-9)
  # HF's cache holds per-head keys and values expanded from the latent.
  cfg = model.config
  out["cache_bytes_per_token"] = cfg.num_hidden_layers * cfg.num_attention_heads * (
      cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import dataclasses

  from configs import dsv3
  from dsv3_jax import config as config_lib
  from dsv3_jax import model as model_lib

  cfg = dataclasses.replace(config_lib.from_dict(dsv3.get_config(_CONFIG.value)).model,
                            num_nextn_predict_layers=0)
  model = model_lib.create(cfg, seed=0)
  batches = [int(b) for b in _BATCHES.value]
  args = (batches, _PREFILL_BATCH.value, _PREFILL_LEN.value, _PROMPT_LEN.value, _NEW.value)
  bandwidth = memory_bandwidth()
  ours = bench_ours(model, *args)
  result = {"config": _CONFIG.value, "cpu_count": os.cpu_count(),
            "memory_bandwidth_bytes_per_s": bandwidth, "dsv3_jax": ours,
            "settings": dict(zip(("decode_batches", "prefill_batch", "prefill_len",
                                  "prompt_len", "new_tokens"), args))}
  context = _PROMPT_LEN.value + _NEW.value // 2
  for b in batches:
    floor = decode_bytes_per_step(cfg, b, context, ours["cache_bytes_per_token"]) / bandwidth
    ours[f"decode_b{b}_fraction_of_bandwidth_limit"] = (
        ours[f"decode_b{b}_tokens_per_s"] * floor / b)
  if _PEER.value:
    try:
      from dsv3_jax.checkpoint.hf import save_hf
      with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp, dtype="float32")
        hf = bench_hf(tmp, *args, vocab=cfg.vocab_size)
    except ImportError as e:
      hf = {"skipped": f"install the `hf` extra ({e})"}
    result["hf_transformers"] = hf
    if "prefill_tokens_per_s" in hf:
      result["ratios"] = {k: ours[k] / hf[k] for k in ours
                          if k in hf and k.endswith("tokens_per_s")}
      result["ratios"]["cache_bytes_per_token"] = (hf["cache_bytes_per_token"]
                                                   / ours["cache_bytes_per_token"])

  hf = result.get("hf_transformers", {})
  print(f"{_CONFIG.value} inference, {os.cpu_count()} cores, memory copy "
        f"{bandwidth / 1e9:.1f} GB/s")
  print(f"  {'':<30}{'dsv3_jax':>14}{'HF':>14}{'ratio':>9}")
  for key in ["prefill_tokens_per_s"] + [f"decode_b{b}_tokens_per_s" for b in batches] + [
      "cache_bytes_per_token"]:
    theirs = hf.get(key)
    ratio = result.get("ratios", {}).get(key)
    print(f"  {key:<30}{ours[key]:>14.1f}{theirs if theirs is None else f'{theirs:.1f}':>14}"
          f"{'' if ratio is None else f'{ratio:.2f}x':>9}")
  for b in batches:
    print(f"  decode b{b}: {100 * ours[f'decode_b{b}_fraction_of_bandwidth_limit']:.0f}% of "
          "the memory-bandwidth limit")
  if "skipped" in hf:
    print("  HF transformers:", hf["skipped"])
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  sys.exit(app.run(main))
