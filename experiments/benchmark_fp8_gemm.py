r"""FP8 fine-grained GEMM vs BF16 and FP32 on whatever backend JAX runs on.

  python -m experiments.benchmark_fp8_gemm --out=runs/benchmark_fp8_gemm.json
  python -m experiments.benchmark_fp8_gemm --shapes=4096x7168x2048,4096x2048x7168
  python -m experiments.benchmark_fp8_gemm --shapes= --memory_shapes=4096x7168x7168  # no runs

For each M x K x N in `--shapes`: the forward of `fp8_matmul` (1x128 activation tiles, 128x128
weight blocks, dequantized into bf16 for one GEMM with FP32 accumulation; quantization
included), its forward + backward, a plain BF16 and FP32 `jnp.dot`, the relative error of each
against a float64 reference on the host, and the compiled peak memory (temp + output, from
`memory_analysis()`) of FP8 vs the BF16 projection. `--memory_shapes` adds compile-only memory
rows (nothing runs, so full DeepSeek-V3 shapes are cheap). On CPU FP8 is emulated (no speed-up
is expected). `benchmarks/fp8_gemm.py` is the body. Prints tables, writes JSON.
"""

import sys

from absl import app, flags

from experiments import common

_SHAPES = flags.DEFINE_string(
  "shapes", "1024x1024x1024,2048x7168x2048", "Comma-separated MxKxN, timed (and their memory)."
)
_MEMORY_SHAPES = flags.DEFINE_string(
  "memory_shapes", "4096x7168x7168", "Comma-separated MxKxN, compiled for memory only."
)
_REPS = flags.DEFINE_integer("reps", 10, "Timed repetitions.")
_OUT = flags.DEFINE_string("out", "runs/benchmark_fp8_gemm.json", "JSON output.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from benchmarks import fp8_gemm

  result = fp8_gemm.run(_SHAPES.value, _MEMORY_SHAPES.value, _REPS.value)
  print(fp8_gemm.report(result))
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  sys.exit(app.run(main))
