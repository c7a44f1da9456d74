"""Low-precision numerics: DeepSeek-V3 fine-grained FP8 (E4M3) quantization and GEMM."""
