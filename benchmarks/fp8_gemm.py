"""FP8 fine-grained GEMM vs BF16 and FP32: time, error and compiled memory.

The body of `experiments/benchmark_fp8_gemm.py` (see it for the flags). The FP8 GEMM is
`dsv3_jax.quant.fp8.fp8_matmul` (DeepSeek-V3 report, arXiv 2412.19437 §3.3: 1x128
activation tiles, 128x128 weight blocks, FP32 accumulation), quantization included.

`time_row` runs one M x K x N: the FP8 forward and forward + backward, a plain BF16 and FP32
`jnp.dot` (and the BF16 forward + backward), and the relative error of each against a float64
reference on the host. `memory_row` compiles only (nothing runs, so full DeepSeek-V3 shapes
are cheap) and reads `compiled.memory_analysis()`: temp + output bytes of the FP8 forward and
forward + backward against the model's BF16 projection of the same inputs (bf16 activations,
FP32 master weight, `dsv3_jax/layers/linear.py`). On CPU FP8 is emulated (no speed-up is
expected); on a GPU the dots run on bf16 tensor cores with exact dequantized operands.
"""

import time

__all__ = ["memory_row", "report", "run", "time_row"]

_MIB = 2**20


def _time(fn, reps):
  import jax

  jax.block_until_ready(fn())
  t = time.perf_counter()
  for _ in range(reps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / reps


def _bf16_linear(x, w):
  import jax.numpy as jnp

  y = jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
  return y.astype(x.dtype)


def _fwd_bwd(mm):
  """`(x, w, ct) -> (dx, dw)`: the forward and both backward GEMMs, cotangent as an input
  (a constant cotangent would let XLA constant-fold the gradient's quantization)."""
  import jax

  def f(x, w, ct):
    _, vjp = jax.vjp(mm, x, w)
    return vjp(ct)

  return f


def _peak_bytes(f, *specs):
  """temp + output bytes of the compiled program, or None if the backend reports none."""
  import jax

  stats = jax.jit(f).lower(*specs).compile().memory_analysis()
  return None if stats is None else int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


def memory_row(m: int, k: int, n: int) -> dict:
  """Compiled peak memory (temp + output) of FP8 vs the BF16 projection; compile only."""
  import jax
  import jax.numpy as jnp

  from dsv3_jax.quant import fp8

  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((k, n), jnp.float32)
  ct = jax.ShapeDtypeStruct((m, n), jnp.bfloat16)
  row = {
    "m": m,
    "k": k,
    "n": n,
    "fp8_fwd_peak_bytes": _peak_bytes(fp8.fp8_matmul, x, w),
    "bf16_fwd_peak_bytes": _peak_bytes(_bf16_linear, x, w),
    "fp8_fwd_bwd_peak_bytes": _peak_bytes(_fwd_bwd(fp8.fp8_matmul), x, w, ct),
    "bf16_fwd_bwd_peak_bytes": _peak_bytes(_fwd_bwd(_bf16_linear), x, w, ct),
  }
  for kind in ("fwd", "fwd_bwd"):
    f8, b16 = row[f"fp8_{kind}_peak_bytes"], row[f"bf16_{kind}_peak_bytes"]
    row[f"{kind}_peak_ratio"] = f8 / b16 if f8 and b16 else None
  return row


def time_row(m: int, k: int, n: int, reps: int) -> dict:
  """Seconds, TFLOP/s and relative error of FP8, BF16 and FP32 GEMMs at one shape."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dsv3_jax.quant import fp8

  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
  ct = jax.random.normal(kc, (m, n), jnp.float32)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  f8 = jax.jit(fp8.fp8_matmul)
  f8_grad = jax.jit(_fwd_bwd(fp8.fp8_matmul))
  bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  bf16_grad = jax.jit(_fwd_bwd(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)))
  f32 = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  rel = lambda y: float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))
  flops = 2 * m * k * n
  t8, t8g = _time(lambda: f8(x, w), reps), _time(lambda: f8_grad(x, w, ct), reps)
  tb, tbg = _time(lambda: bf16(xb, wb), reps), _time(lambda: bf16_grad(xb, wb, ct), reps)
  t32 = _time(lambda: f32(x, w), reps)
  return {
    "m": m,
    "k": k,
    "n": n,
    "fp8_fwd_s": t8,
    "fp8_fwd_tflops": flops / t8 / 1e12,
    "fp8_fwd_bwd_s": t8g,
    "fp8_fwd_bwd_tflops": 3 * flops / t8g / 1e12,
    "bf16_s": tb,
    "bf16_tflops": flops / tb / 1e12,
    "bf16_fwd_bwd_s": tbg,
    "bf16_fwd_bwd_tflops": 3 * flops / tbg / 1e12,
    "fp32_s": t32,
    "fp32_tflops": flops / t32 / 1e12,
    "fp8_rel_err": rel(f8(x, w)),
    "bf16_rel_err": rel(bf16(xb, wb)),
    "fp32_rel_err": rel(f32(x, w)),
  }


def _shapes(spec: str):
  return [tuple(int(v) for v in s.lower().split("x")) for s in spec.split(",") if s]


def run(shapes: str, memory_shapes: str, reps: int) -> dict:
  """Timed rows for `shapes` (memory too), compile-only memory rows for `memory_shapes`."""
  import jax

  rows = [{**time_row(m, k, n, reps), **memory_row(m, k, n)} for m, k, n in _shapes(shapes)]
  memory = [memory_row(m, k, n) for m, k, n in _shapes(memory_shapes)]
  return {
    "device": jax.devices()[0].device_kind,
    "backend": jax.default_backend(),
    "rows": rows,
    "memory": memory,
  }


def _mib(b):
  return f"{b / _MIB:>9.1f}" if b else f"{'n/a':>9}"


def _ratio(r):
  return f"{r:>6.2f}x" if r else f"{'n/a':>7}"


def report(result: dict) -> str:
  """The TFLOP/s and memory tables."""
  lines = [
    f"FP8 fine-grained GEMM on {result['device']} (quantization included in the FP8 timings)",
    (
      f"{'MxKxN':>18} {'fp8 fwd':>10} {'fp8 f+b':>10} {'bf16':>10} {'bf16 f+b':>10} "
      f"{'fp32':>10} {'err fp8':>9} {'err bf16':>9}   (TFLOP/s)"
    ),
  ]
  for r in result["rows"]:
    lines.append(
      f"{r['m']:>6}x{r['k']}x{r['n']:<6} {r['fp8_fwd_tflops']:>10.2f} "
      f"{r['fp8_fwd_bwd_tflops']:>10.2f} {r['bf16_tflops']:>10.2f} "
      f"{r['bf16_fwd_bwd_tflops']:>10.2f} {r['fp32_tflops']:>10.2f} "
      f"{r['fp8_rel_err']:>9.4f} {r['bf16_rel_err']:>9.4f}"
    )
  lines.append(
    "Compiled peak memory, temp + output (MiB): FP8 vs the BF16 projection, bf16 x "
    "and FP32 master w"
  )
  lines.append(
    f"{'MxKxN':>18} {'fp8 fwd':>9} {'bf16 fwd':>9} {'ratio':>7} {'fp8 f+b':>9} "
    f"{'bf16 f+b':>9} {'ratio':>7}"
  )
  for r in result["rows"] + result["memory"]:
    lines.append(
      f"{r['m']:>6}x{r['k']}x{r['n']:<6} {_mib(r['fp8_fwd_peak_bytes'])} "
      f"{_mib(r['bf16_fwd_peak_bytes'])} {_ratio(r['fwd_peak_ratio'])} "
      f"{_mib(r['fp8_fwd_bwd_peak_bytes'])} {_mib(r['bf16_fwd_bwd_peak_bytes'])} "
      f"{_ratio(r['fwd_bwd_peak_ratio'])}"
    )
  return "\n".join(lines)
