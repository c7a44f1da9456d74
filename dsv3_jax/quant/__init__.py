"""Low-precision numerics: DeepSeek-V3 fine-grained FP8 (E4M3) quantization and GEMM.

  fp8          1x128 / 128x128 block quantization, the blockwise-scaled FP8 dot and the FP8
               linear-layer GEMM (fprop, dgrad, wgrad) with a custom VJP; HF checkpoint layout
  fp8_grouped  the same recipe for the routed experts' GEMMs (capacity buckets, overflow blocks)

The FP8-vs-BF16 training comparison is a research harness: `benchmarks/fp8_parity.py`.
"""
