r"""Prefill and greedy decode of the `bench` model: this codebase vs HF transformers.

  python -m experiments.benchmark_decode --out=runs/benchmark_decode.json
  python -m experiments.benchmark_decode --prefill_len=256 --new_tokens=32   # quicker

Builds `bench` with random weights once, exports it in the HF layout (float32), and in one
process measures both implementations on the same weights and CPU (torch threads = cores):
prefill tokens/s (batch x prefill_len), greedy decode tokens/s at batch 1 and 8 (prompt
`prompt_len`, `new_tokens` new; the prefill is subtracted), KV-cache bytes per token, and this
machine's memory bandwidth (a large copy timed in the same run), to state decode as a fraction
of the bandwidth limit (weights and cache streamed once per step); with --speculative (the
default), MTP self-speculative decoding beside plain greedy decoding: acceptance rate,
tokens/s and their ratio at each batch. `benchmarks/decode.py` is the body. Prints a table,
writes JSON.
"""

import sys

from absl import app, flags

from experiments import common

_CONFIG = flags.DEFINE_string("config", "bench", "Variant of configs/dsv3.py.")
_PREFILL_BATCH = flags.DEFINE_integer("prefill_batch", 4, "Prefill batch.")
_PREFILL_LEN = flags.DEFINE_integer("prefill_len", 512, "Prefill tokens per sequence.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Decode prompt length.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Greedy tokens per sequence.")
_BATCHES = flags.DEFINE_list("decode_batches", ["1", "8", "32"], "Decode batch sizes.")
_PEER = flags.DEFINE_bool("peer", True, "Also time HF transformers (needs the `hf` extra).")
_SPECULATIVE = flags.DEFINE_bool(
  "speculative",
  True,
  "Also time MTP self-speculative decoding (acceptance rate, tokens/s vs plain).",
)
_OUT = flags.DEFINE_string("out", "runs/benchmark_decode.json", "JSON output.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _PEER.value:  # the peer at its best: glibc keeps freed memory (benchmarks/host.py)
    from benchmarks import host

    host.relaunch_with_peer_tunables()
  common.quiet_logs()
  from benchmarks import decode

  result = decode.run(
    _CONFIG.value,
    _BATCHES.value,
    _PREFILL_BATCH.value,
    _PREFILL_LEN.value,
    _PROMPT_LEN.value,
    _NEW.value,
    _PEER.value,
    _SPECULATIVE.value,
  )
  print(decode.report(result))
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  sys.exit(app.run(main))
