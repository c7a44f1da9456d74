"""Train-step throughput of one model on one device, against HF transformers.

The body of `experiments/benchmark_train.py` (see it for the flags). In one process: this
machine's f32 matmul peak (a large jitted matmul), this codebase's train step (forward +
backward + AdamW with BF16 moments, arXiv 2412.19437 §3.3.3) with a forward-only and a
forward+backward timing, the training forward and the backward timed apart (their ratio is the
backward's cost in forwards), and one profiled step split by part of the model
(`benchmarks/profile.py`) to show where the time goes, the same step without the MTP module
(the peer's work: HF's model has none), and -- when torch and transformers are installed (the
`hf` extra) -- HF's DeepseekV3ForCausalLM on the same config doing forward + backward +
torch.optim.AdamW with torch threads = cores.

Each side's step time is the median of its timed steps (after a warm-up step), so a single
stalled step on this shared machine does not move it; every step's time is recorded
(`step_times_s`, with their spread in the table). The sides run one after the other, each
built, timed and released before the next: interleaved, each slows the one after it. Our
step with MTP took 3.0 s alone and 3.75 s interleaved with the step without MTP; once torch
is imported and has run in the process, a JAX step is much slower still (2.98 s before
importing torch, 3.99 s after the import, 9.85 s after one HF train step, with seconds of
sleep between them), so the peer runs last; the HF step is not slowed by JAX having run.
"""

import os
import statistics
import time

from benchmarks import host, profile


def step_times(fn, steps: int) -> list:
  """Seconds of each of `steps` calls of `fn`, after one warm-up / compile call."""
  fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def _time(fn, steps):
  """Median seconds of `fn` over `steps` calls, after one warm-up / compile call."""
  return statistics.median(step_times(fn, steps))


def _set_step_time(row: dict, times: list, tokens: int) -> dict:
  row["step_s"] = statistics.median(times)
  row["step_times_s"] = times
  row["tokens_per_s"] = tokens / row["step_s"]
  return row


def matmul_peak(n=2048, reps=10) -> float:
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  sec = _time(lambda: f(a).block_until_ready(), reps)
  return 2 * n**3 / sec


def prepare_ours(
  model_cfg, train_overrides, batch, seq_len, steps, model_overrides=None, parts=True
):
  """This codebase's train step, ready to time: (step function, row). `parts`: the row gets
  the forward and forward+backward timings (medians of `steps` calls) and a `profile`
  function that says where one more step's time goes.

  `forward_s` is the loss alone, which runs the inference forward (e.g. the routed experts'
  exact block path, `layers/experts.py`), so `forward_backward_s - forward_s` is not the
  backward. The backward is timed apart: `training_forward_s` is the differentiated forward
  (`jax.vjp`: the training kernels, returning the residuals the backward reads) and
  `backward_s` applies the returned vjp function to the loss's cotangent;
  `backward_over_forward` is their ratio (about 2 when the backward is the two GEMMs per
  forward GEMM and nothing else)."""
  import jax
  import numpy as np
  from flax import nnx

  from configs import dsv3
  from dsv3_jax import config as config_lib
  from dsv3_jax.config import ParallelConfig
  from dsv3_jax.parallel import mesh as mesh_lib
  from dsv3_jax.train.loss import model_losses
  from dsv3_jax.counts import flops_per_token
  from dsv3_jax.train.step import Trainer

  cd = dsv3.get_config(model_cfg)
  cd.train.global_batch, cd.train.seq_len = batch, seq_len
  cd.parallel.data = cd.parallel.expert = cd.parallel.pipe = 1
  cd.train.update(train_overrides)
  cd.model.update(model_overrides or {})
  cfg = config_lib.from_dict(cd)
  mesh = mesh_lib.make_mesh(ParallelConfig(data=1, expert=1, pipe=1), jax.devices()[:1])
  trainer = Trainer(cfg, mesh)
  state = trainer.init()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (batch, seq_len + 1)).astype(np.int32)
  batch_arr = {"tokens": jax.device_put(tokens, trainer.batch_sharding)}

  def loss(params):
    return model_losses(trainer.merge(params, state.biases), batch_arr["tokens"], cfg.train)[0]

  timings = {}
  if parts:
    fwd = jax.jit(loss)
    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    timings["forward_s"] = _time(lambda: jax.block_until_ready(fwd(state.params)), steps)
    timings["forward_backward_s"] = _time(
      lambda: jax.block_until_ready(fwd_bwd(state.params)), steps
    )
    train_fwd = jax.jit(lambda params: jax.vjp(loss, params))
    bwd = jax.jit(lambda vjp_fn, out: vjp_fn(jax.numpy.ones_like(out)))
    timings["training_forward_s"] = _time(
      lambda: jax.block_until_ready(train_fwd(state.params)), steps
    )
    out, vjp_fn = train_fwd(state.params)
    timings["backward_s"] = _time(lambda: jax.block_until_ready(bwd(vjp_fn, out)), steps)
    timings["backward_over_forward"] = timings["backward_s"] / timings["training_forward_s"]
    del out, vjp_fn  # the residuals: released before the step is timed

  holder = {"state": state}
  # The step the trainer runs (`Trainer.train_step`), compiled here so that its program's
  # text can say where a profiled step's time went.
  schedule = np.int32(cfg.train.steps)
  compiled = trainer.step_fn.lower(state, batch_arr, schedule).compile()

  def step():
    holder["state"], metrics = compiled(holder["state"], batch_arr, schedule)
    jax.block_until_ready(metrics["loss"])

  del nnx
  return step, {
    **timings,
    "flops_per_token": flops_per_token(cfg.model, seq_len),
    "model_cfg": cfg.model,
    **({"profile": lambda: profile.time_by_part(compiled.as_text(), step)} if parts else {}),
  }


# The peer at its best on CPU: grouped GEMMs over exact group sizes (no padding), set
# explicitly and recorded as the model resolved it.
HF_EXPERTS = "grouped_mm"


def prepare_hf(model_cfg, batch, seq_len):
  """HF's train step on the same config, ready to time: (step function, row)."""
  import numpy as np
  import torch
  import transformers

  from dsv3_jax.checkpoint.hf_config import to_hf_config

  torch.set_num_threads(os.cpu_count() or 1)
  hf_cfg = transformers.DeepseekV3Config(
    **{
      k: v
      for k, v in to_hf_config(model_cfg).items()
      if k not in ("architectures", "model_type", "torch_dtype")
    },
    experts_implementation=HF_EXPERTS,
  )
  torch.manual_seed(0)
  model = transformers.DeepseekV3ForCausalLM(hf_cfg).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  rng = np.random.default_rng(0)
  ids = torch.tensor(rng.integers(0, model_cfg.vocab_size, (batch, seq_len + 1)))

  def step():
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=ids[:, :-1], labels=ids[:, 1:].clone())
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  return step, {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "threads": torch.get_num_threads(),
    # What the model resolved and runs (transformers falls back to eager if it cannot).
    "experts_implementation": model.config._experts_implementation,
  }


def _add_rates(timed: dict, peak: float) -> dict:
  """Adds model FLOPs/s and its fraction of the measured matmul peak to a `bench_ours` row."""
  timed["model_flops_per_s"] = timed["tokens_per_s"] * timed["flops_per_token"]
  timed["fraction_of_peak"] = timed["model_flops_per_s"] / peak
  return timed


def run(
  config: str = "bench",
  batch: int = 4,
  seq_len: int = 512,
  steps: int = 5,
  peer: bool = True,
  precisions: tuple = (),
) -> dict:
  """Times both implementations (`steps` timed steps each, medians; ours first, see the
  module docstring); returns the JSON-ready result `report` prints. `precisions` (of "bf16",
  "fp8"): our step again with those matmul precisions (rows `dsv3_jax_<precision>`), and with
  both, `fp8_over_bf16_step`, the FP8 emulation's cost on this CPU (it has no FP8 units)."""
  import jax

  tokens = batch * seq_len

  def timed(prepared):  # one side: built, timed, released (see the module docstring)
    step, row = prepared
    row = _set_step_time(row, step_times(step, steps), tokens)
    if "profile" in row:  # one more step, profiled: where its time went
      row["time_by_part_s"] = row.pop("profile")()
    return row

  peak = matmul_peak()
  rows = {"dsv3_jax": timed(prepare_ours(config, {}, batch, seq_len, steps))}
  model_cfg = rows["dsv3_jax"].pop("model_cfg")
  rows["dsv3_jax"]["mtp_depth"] = model_cfg.num_nextn_predict_layers
  if model_cfg.num_nextn_predict_layers:
    # HF's DeepseekV3ForCausalLM has no MTP module: the same work as the peer is the step
    # without it (the report's objective, with MTP, is the row above).
    no_mtp = {"num_nextn_predict_layers": 0}
    rows["dsv3_jax_without_mtp"] = timed(
      prepare_ours(config, {}, batch, seq_len, steps, no_mtp, False)
    )
    rows["dsv3_jax_without_mtp"].pop("model_cfg")
  for precision in precisions:
    row = timed(
      prepare_ours(config, {}, batch, seq_len, steps, {"matmul_precision": precision}, False)
    )
    row.pop("model_cfg")
    rows[f"dsv3_jax_{precision}"] = row
  for row in rows.values():
    _add_rates(row, peak)
  ours = rows["dsv3_jax"]
  if peer:  # last: torch in the process slows JAX (see the module docstring)
    try:
      rows["hf_transformers"] = timed(prepare_hf(model_cfg, batch, seq_len))
    except ImportError as e:
      rows["hf_transformers"] = {"skipped": f"install the `hf` extra ({e})"}
  result = {
    "config": config,
    "batch": batch,
    "seq_len": seq_len,
    "steps": steps,
    "timing": "median step after a warm-up; the sides one after the other, the peer last",
    "cpu_count": os.cpu_count(),
    "host_memory": host.huge_pages(),
    "matmul_peak_flops_per_s": peak,
    **rows,
    "device": jax.devices()[0].device_kind,
  }
  if {"dsv3_jax_bf16", "dsv3_jax_fp8"} <= rows.keys():
    result["fp8_over_bf16_step"] = rows["dsv3_jax_fp8"]["step_s"] / rows["dsv3_jax_bf16"]["step_s"]
  if peer:
    hf = rows["hf_transformers"]
    if "tokens_per_s" in hf:
      result["speedup_vs_hf"] = ours["tokens_per_s"] / hf["tokens_per_s"]
      same = result.get("dsv3_jax_without_mtp", ours)
      result["speedup_vs_hf_same_work"] = same["tokens_per_s"] / hf["tokens_per_s"]
  return result


def report(result: dict) -> str:
  """The printed table of a `run` result."""
  ours, peak = result["dsv3_jax"], result["matmul_peak_flops_per_s"]
  rows = [
    ("matmul peak (f32)", f"{peak / 1e9:.1f} GFLOP/s"),
    (
      "dsv3_jax train step",
      f"{ours['tokens_per_s']:.0f} tok/s ({ours['step_s']:.3f} s, "
      f"steps {min(ours['step_times_s']):.3f}-{max(ours['step_times_s']):.3f} s)",
    ),
    ("  forward only (inference path)", f"{ours['forward_s']:.3f} s"),
    ("  forward + backward", f"{ours['forward_backward_s']:.3f} s"),
    (
      "  training forward / backward",
      f"{ours['training_forward_s']:.3f} s / {ours['backward_s']:.3f} s "
      f"(backward / forward {ours['backward_over_forward']:.2f})",
    ),
    (
      "  model FLOPs/s",
      f"{ours['model_flops_per_s'] / 1e9:.1f} GFLOP/s "
      f"({100 * ours['fraction_of_peak']:.0f}% of peak)",
    ),
  ]
  same = result.get("dsv3_jax_without_mtp")
  if same:
    rows.append(
      (
        "  without MTP (HF's work)",
        f"{same['tokens_per_s']:.0f} tok/s ({same['step_s']:.3f} s, "
        f"{100 * same['fraction_of_peak']:.0f}% of peak)",
      )
    )
  for precision in ("bf16", "fp8"):
    row = result.get(f"dsv3_jax_{precision}")
    if row:
      rows.append(
        (f"  {precision} matmuls", f"{row['tokens_per_s']:.0f} tok/s ({row['step_s']:.3f} s)")
      )
  if "fp8_over_bf16_step" in result:
    rows.append(("  fp8 / bf16 step time", f"{result['fp8_over_bf16_step']:.2f}"))
  hf = result.get("hf_transformers", {})
  if "tokens_per_s" in hf:
    rows += [
      (
        "HF transformers train step",
        f"{hf['tokens_per_s']:.0f} tok/s ({hf['step_s']:.3f} s, "
        f"steps {min(hf['step_times_s']):.3f}-{max(hf['step_times_s']):.3f} s)",
      ),
      ("speed-up vs HF", f"{result['speedup_vs_hf']:.2f}x"),
      ("  same work (no MTP)", f"{result['speedup_vs_hf_same_work']:.2f}x"),
    ]
  elif hf:
    rows.append(("HF transformers", hf["skipped"]))
  if ours.get("time_by_part_s"):
    rows.append(("where our step's time goes", "one profiled step, work summed over threads"))
    rows += [(f"  {name}", share) for name, share in profile.report(ours["time_by_part_s"])]
  width = max(len(r[0]) for r in rows)
  lines = [
    f"bench train step, batch {result['batch']} x {result['seq_len']}, one "
    f"{result['device']} device, {result['cpu_count']} CPU cores, "
    f"{host.describe(result['host_memory'])}"
  ]
  lines += [f"  {name:<{width}}  {value}" for name, value in rows]
  return "\n".join(lines)
