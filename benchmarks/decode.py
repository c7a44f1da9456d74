"""Prefill and greedy decode of one model: this codebase vs HF transformers.

The body of `experiments/benchmark_decode.py` (see it for the flags). Builds the model with
random weights once, exports it in the HF layout (float32), and in one process measures both
implementations on the same weights and CPU (torch threads = cores): prefill tokens/s
(prompt through the model into the cache, logits of the last position only, as both
`generate`s do), greedy decode tokens/s per batch size (the prefill subtracted), KV-cache
bytes per token (MLA caches the compressed latent, arXiv 2412.19437 §2.1.1) and the memory
bandwidth of the device, to state decode as a fraction of the bandwidth limit (weights and
cache streamed once per step), and where the prefill's time goes (`prefill_parts`:
attention, MLP, MoE and the ends, each timed alone on the prefill's shapes). With
`speculative`, MTP self-speculative decoding (arXiv 2412.19437 §2.2, §5.4.3;
`dsv3_jax/serving/speculative.py`) beside plain greedy decoding of the same model (the same
main weights plus a random MTP layer) per batch: acceptance rate, tokens/s of both and their
ratio, and the cost of one speculative step in plain steps with the speedup it would give at
the report's 85% acceptance (random weights accept little: the measured ratio is a floor).
"""

import os
import tempfile
import time

from benchmarks import host


def _best(fn, reps=3):
  fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def memory_bandwidth(nbytes=1 << 29) -> float:
  """Bytes moved per second (read + write) by a large copy in the memory the model runs from:
  a numpy copy on the CPU, a jitted elementwise pass over a device array on an accelerator
  (whose HBM, not the host's memory, is what decoding streams)."""
  import jax
  import numpy as np

  if jax.default_backend() == "cpu":
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    return 2 * nbytes / _best(lambda: np.copyto(dst, src), reps=5)
  x = jax.numpy.ones(nbytes // 4, jax.numpy.float32)
  touch = jax.jit(lambda a: a + 1)
  return 2 * nbytes / _best(lambda: touch(x).block_until_ready(), reps=5)


def decode_bytes_per_step(cfg, batch: int, context: int, cache_bytes_per_token: int) -> float:
  """Weights touched by one decode step (float32) plus the cache read: the bandwidth floor."""
  from dsv3_jax.counts import param_counts

  c = param_counts(cfg)
  expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  touched = e * (1 - (1 - k / e) ** batch)  # expected distinct experts per layer
  weights = (
    c["activated"] - cfg.vocab_size * cfg.hidden_size + cfg.n_moe_layers * (touched - k) * expert
  ) * 4
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


def prefill_parts(model, batch: int, length: int) -> dict:
  """Where a prefill's time goes: one layer's attention (MLA, causal from position 0), dense
  MLP and MoE, each jitted and timed alone on the prefill's shapes (random activations), times
  its layer count, and the embedding + final norm + last-position head. Seconds per prefill;
  `sum` beside the measured whole shows what the parts leave out (scan, cache writes)."""
  import jax
  import numpy as np
  from flax import nnx

  from dsv3_jax.model import unstack_layers

  m, cfg = unstack_layers(model), model.cfg
  ctx = m.context((batch, length))
  x = jax.random.normal(jax.random.key(0), (batch, length, cfg.hidden_size), cfg.dtype)
  tokens = np.zeros((batch, length), np.int32)

  def attention(block, x):
    a, _ = block.attn(block.attn_norm(x), ctx.positions_BxL, ctx.cos, ctx.sin, causal=True)
    return a

  def ffn(block, x):
    h = block.ffn_norm(x)
    return block.ffn(h, None)[0] if block.is_moe else block.ffn(h)

  def ends(model, tokens):
    h = model.norm(model.embed_tokens(tokens))
    return model.logits(h[:, -1:])

  def timed(fn, module, x):  # the module's state passed as arrays: no graph walk per call
    graphdef, state = nnx.split(module)
    jitted = jax.jit(lambda state, x: fn(nnx.merge(graphdef, state), x))
    return _best(lambda: jax.block_until_ready(jitted(state, x)), reps=3)

  parts = {}
  for name, stack in (("dense", m.dense), ("moe", m.moe)):
    if stack is None:
      continue
    n = len(stack)
    parts[f"attention ({name} layers)"] = n * timed(attention, stack[0], x)
    parts["mlp" if name == "dense" else "moe"] = n * timed(ffn, stack[0], x)
  parts["embedding + head"] = timed(ends, m, tokens)
  parts["sum"] = sum(parts.values())
  return parts


HF_EXPERTS = "grouped_mm"  # the peer at its best on CPU, set explicitly and recorded


def bench_hf(path, batches, prefill_batch, prefill_len, prompt_len, new, vocab):
  import numpy as np
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()  # quiet: no "Loading weights" bar
  torch.set_num_threads(os.cpu_count() or 1)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    path, dtype=torch.float32, experts_implementation=HF_EXPERTS
  ).eval()
  rng = np.random.default_rng(0)
  out = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "threads": torch.get_num_threads(),
    "experts_implementation": model.config._experts_implementation,
  }
  ids = torch.tensor(rng.integers(0, vocab, (prefill_batch, prefill_len)))
  with torch.no_grad():
    # As its generate() prefills: the cache filled, the head run on the last position only.
    t = _best(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
  out["prefill_tokens_per_s"] = prefill_batch * prefill_len / t
  for b in batches:
    ids = torch.tensor(rng.integers(0, vocab, (b, prompt_len)))
    gen = lambda n: model.generate(
      input_ids=ids,
      attention_mask=torch.ones_like(ids),
      max_new_tokens=n,
      min_new_tokens=n,
      do_sample=False,
      pad_token_id=0,
    )
    with torch.no_grad():
      t_one = _best(lambda: gen(1), reps=2)
      t_all = _best(lambda: gen(new), reps=2)
    out[f"decode_b{b}_tokens_per_s"] = b * (new - 1) / max(t_all - t_one, 1e-9)
  # HF's cache holds per-head keys and values expanded from the latent.
  cfg = model.config
  out["cache_bytes_per_token"] = (
    cfg.num_hidden_layers
    * cfg.num_attention_heads
    * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    * 4
  )
  return out


def bench_speculative(cfg, batches, prompt_len, new) -> dict:
  """MTP speculative vs plain greedy decoding (`speculative.measure`) per batch size."""
  import dataclasses

  import numpy as np

  from dsv3_jax import model as model_lib
  from dsv3_jax.serving import speculative

  # Seed 0 gives the main weights of the plain model (the MTP layer is created last).
  model = model_lib.create(dataclasses.replace(cfg, num_nextn_predict_layers=1), seed=0)
  rng = np.random.default_rng(0)
  out = {}
  for b in batches:
    prompts = rng.integers(0, cfg.vocab_size, (b, prompt_len)).tolist()
    m = speculative.measure(model, prompts, max_new_tokens=new, reps=2)
    m["speedup_at_acceptance_0.85"] = 1.85 / m["step_cost"]
    out[f"b{b}"] = m
  return out


def run(
  config: str = "bench",
  batches=(1, 8),
  prefill_batch: int = 4,
  prefill_len: int = 512,
  prompt_len: int = 128,
  new_tokens: int = 64,
  peer: bool = True,
  speculative: bool = True,
) -> dict:
  """Times both implementations; returns the JSON-ready result `report` prints."""
  import dataclasses

  import jax

  from configs import dsv3
  from dsv3_jax import config as config_lib
  from dsv3_jax import model as model_lib

  cfg = dataclasses.replace(
    config_lib.from_dict(dsv3.get_config(config)).model, num_nextn_predict_layers=0
  )
  model = model_lib.create(cfg, seed=0)
  batches = [int(b) for b in batches]
  args = (batches, prefill_batch, prefill_len, prompt_len, new_tokens)
  bandwidth = memory_bandwidth()
  ours = bench_ours(model, *args)
  ours["prefill_parts_s"] = prefill_parts(model, prefill_batch, prefill_len)
  result = {
    "config": config,
    "cpu_count": os.cpu_count(),
    "device": jax.devices()[0].device_kind,
    "host_memory": host.huge_pages(),
    "memory_bandwidth_bytes_per_s": bandwidth,
    "dsv3_jax": ours,
    "settings": dict(
      zip(("decode_batches", "prefill_batch", "prefill_len", "prompt_len", "new_tokens"), args)
    ),
  }
  context = prompt_len + new_tokens // 2
  for b in batches:
    floor = decode_bytes_per_step(cfg, b, context, ours["cache_bytes_per_token"]) / bandwidth
    ours[f"decode_b{b}_fraction_of_bandwidth_limit"] = ours[f"decode_b{b}_tokens_per_s"] * floor / b
  if speculative:
    result["speculative"] = bench_speculative(cfg, batches, prompt_len, new_tokens)
  if peer:
    try:
      from dsv3_jax.checkpoint.hf import save_hf

      with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp, dtype="float32")
        hf = bench_hf(tmp, *args, vocab=cfg.vocab_size)
    except ImportError as e:
      hf = {"skipped": f"install the `hf` extra ({e})"}
    result["hf_transformers"] = hf
    if "prefill_tokens_per_s" in hf:
      result["ratios"] = {
        k: ours[k] / hf[k] for k in ours if k in hf and k.endswith("tokens_per_s")
      }
      result["ratios"]["cache_bytes_per_token"] = (
        hf["cache_bytes_per_token"] / ours["cache_bytes_per_token"]
      )
  return result


def report(result: dict) -> str:
  """The printed table of a `run` result."""
  ours, hf = result["dsv3_jax"], result.get("hf_transformers", {})
  batches = result["settings"]["decode_batches"]
  lines = [
    f"{result['config']} inference on {result.get('device', 'cpu')}, {result['cpu_count']} "
    f"CPU cores, memory copy "
    f"{result['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
    f"{host.describe(result['host_memory'])}",
    f"  {'':<30}{'dsv3_jax':>14}{'HF':>14}{'ratio':>9}",
  ]
  for key in (
    ["prefill_tokens_per_s"]
    + [f"decode_b{b}_tokens_per_s" for b in batches]
    + ["cache_bytes_per_token"]
  ):
    theirs = hf.get(key)
    ratio = result.get("ratios", {}).get(key)
    lines.append(
      f"  {key:<30}{ours[key]:>14.1f}"
      f"{'-' if theirs is None else f'{theirs:.1f}':>14}"
      f"{'' if ratio is None else f'{ratio:.2f}x':>9}"
    )
  for b in batches:
    lines.append(
      f"  decode b{b}: {100 * ours[f'decode_b{b}_fraction_of_bandwidth_limit']:.0f}% "
      "of the memory-bandwidth limit"
    )
  parts = ours.get("prefill_parts_s")
  if parts:
    s = result["settings"]
    whole = s["prefill_batch"] * s["prefill_len"] / ours["prefill_tokens_per_s"]
    lines.append(f"  prefill, where the time goes (parts timed alone; whole {1e3 * whole:.1f} ms):")
    for name, t in parts.items():
      lines.append(f"    {name:<28}{1e3 * t:>9.1f} ms{100 * t / whole:>6.0f}%")
  if "speculative" in result:
    lines.append(
      f"  {'MTP speculative (greedy)':<26}{'acceptance':>11}{'spec tok/s':>12}"
      f"{'plain tok/s':>12}{'ratio':>8}{'step cost':>10}{'@85%':>8}"
    )
    for b in batches:
      m = result["speculative"][f"b{b}"]
      lines.append(
        f"  {f'decode_b{b}':<26}{m['acceptance_rate']:>11.2f}"
        f"{m['speculative_tokens_per_s']:>12.1f}{m['plain_tokens_per_s']:>12.1f}"
        f"{m['speedup']:>7.2f}x{m['step_cost']:>10.2f}"
        f"{m['speedup_at_acceptance_0.85']:>7.2f}x"
      )
  if "skipped" in hf:
    lines.append(f"  HF transformers: {hf['skipped']}")
  return "\n".join(lines)
