r"""FP8 fine-grained GEMM vs BF16 and FP32 on whatever backend JAX runs on.

  python -m experiments.benchmark_fp8_gemm --out=runs/benchmark_fp8_gemm.json
  python -m experiments.benchmark_fp8_gemm --shapes=4096x7168x2048,4096x2048x7168

For each M x K x N: the forward of `fp8_matmul` (1x128 activation tiles, 128x128 weight
blocks, per-block FP32 promotion; quantization included), the forward + backward, a plain
BF16 and FP32 `jnp.dot`, and the relative error of each against a float64 reference on the
host. On CPU FP8 is emulated (no speed-up is expected); on an H100 the FP8 dots are real.
Prints a table, writes JSON.
"""

import sys
import time

from absl import app, flags

from experiments import common

_SHAPES = flags.DEFINE_string("shapes", "1024x1024x1024,2048x7168x2048",
                              "Comma-separated MxKxN.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed repetitions.")
_OUT = flags.DEFINE_string("out", "runs/benchmark_fp8_gemm.json", "JSON output.")


def _time(fn, reps):
  import jax
  jax.block_until_ready(fn())
  t = time.perf_counter()
  for _ in range(reps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / reps


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dsv3_jax.quant import fp8

  rows = []
  for shape in _SHAPES.value.split(","):
    m, k, n = (int(v) for v in shape.lower().split("x"))
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (m, k), jnp.float32)
    w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    f8 = jax.jit(fp8.fp8_matmul)
    f8_grad = jax.jit(jax.grad(lambda x, w: fp8.fp8_matmul(x, w).sum(), argnums=(0, 1)))
    bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f32 = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    rel = lambda y: float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))
    flops = 2 * m * k * n
    t8, t8g = _time(lambda: f8(x, w), _REPS.value), _time(lambda: f8_grad(x, w), _REPS.value)
    tb, t32 = _time(lambda: bf16(xb, wb), _REPS.value), _time(lambda: f32(x, w), _REPS.value)
    rows.append({"m": m, "k": k, "n": n,
                 "fp8_fwd_s": t8, "fp8_fwd_tflops": flops / t8 / 1e12,
                 "fp8_fwd_bwd_s": t8g, "fp8_fwd_bwd_tflops": 3 * flops / t8g / 1e12,
                 "bf16_s": tb, "bf16_tflops": flops / tb / 1e12,
                 "fp32_s": t32, "fp32_tflops": flops / t32 / 1e12,
                 "fp8_rel_err": rel(f8(x, w)), "bf16_rel_err": rel(bf16(xb, wb)),
                 "fp32_rel_err": rel(f32(x, w))})
  device = jax.devices()[0].device_kind
  print(f"FP8 fine-grained GEMM on {device} (quantization included in the FP8 timings)")
  head = f"{'MxKxN':>18} {'fp8 fwd':>10} {'fp8 f+b':>10} {'bf16':>10} {'fp32':>10} " \
         f"{'err fp8':>9} {'err bf16':>9}"
  print(head + "   (TFLOP/s)")
  for r in rows:
    print(f"{r['m']:>6}x{r['k']}x{r['n']:<6} {r['fp8_fwd_tflops']:>10.2f} "
          f"{r['fp8_fwd_bwd_tflops']:>10.2f} {r['bf16_tflops']:>10.2f} {r['fp32_tflops']:>10.2f} "
          f"{r['fp8_rel_err']:>9.4f} {r['bf16_rel_err']:>9.4f}")
  common.write_json(_OUT.value, {"device": device, "backend": jax.default_backend(),
                                 "rows": rows})


if __name__ == "__main__":
  sys.exit(app.run(main))
