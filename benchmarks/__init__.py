"""Research harnesses and benchmark bodies: measurements *of* the library, not part of it.

Sections cited are those of the DeepSeek-V3 report (arXiv 2412.19437).

The `experiments/` binaries parse flags and call one function here; notebooks and tests may
import these modules too. Nothing in `dsv3_jax/` imports this package.

  fp8_parity         FP8-vs-BF16 training from one init on one data order (§3.3, Appendix B.1)
  fp8_gemm           the FP8 GEMM vs BF16 / FP32: time, error, compiled memory (§3.3)
  pipeline_timeline  pipeline bubbles, simulated and measured with per-tick timestamps (§3.2.1)
  moe_ep             expert-parallel MoE: node-limited routing's traffic, buffers, time (§2.1.2)
  train_step         the train step's throughput against HF transformers
  decode             prefill and decode throughput against HF transformers, vs memory bandwidth
  eplb               redundant-expert placement: max / mean load per GPU (§3.4.1)
  serving            a request trace through the serving engine vs HF transformers (§3.4)
  plotting           the lazy matplotlib import shared by the plotting code
"""
