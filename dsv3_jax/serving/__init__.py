"""Serving: continuous batching over latent-cache slots, an OpenAI-style HTTP endpoint, and
redundant experts with their load balancing (EPLB); DeepSeek-V3 report arXiv 2412.19437 §3.4.

  engine        Engine: submit requests, stream tokens (continuous batching)
  speculative   MTP self-speculative decoding (§2.2, §5.4.3): SpeculativeGenerator, the
                acceptance rule, `measure` (acceptance, tokens per forward, tokens/s vs plain)
  drafters      teacher-forced acceptance of MTP drafts vs copy-last / bigram / untrained MTP
  decode_step   the compiled prefill / insert / decode-step programs (the pluggable part)
  sampling      per-slot temperature / top-k / top-p sampling
  requests      Request validation and the per-request TokenStream
  expert_loads  expert-load statistics while serving and the EPLB placement they call for
  http          /v1/completions and /v1/models over http.server
  loading       the model and tokenizer of a workdir, orbax export or HF directory
  eplb          redundant-expert placement (EPLB)
"""
