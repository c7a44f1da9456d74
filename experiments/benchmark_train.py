r"""Train-step throughput of the `bench` model on one CPU device, against HF transformers.

  python -m experiments.benchmark_train --out=runs/benchmark_train.json
  python -m experiments.benchmark_train --batch=2 --seq_len=256 --steps=3   # quicker

In one process: this machine's f32 matmul peak (a large jitted matmul), this codebase's train
step (forward + backward + AdamW with BF16 moments) with a forward-only and a
forward+backward timing, the training forward and backward apart (`backward_over_forward`),
and a profiled step to show where the time goes, and — when torch and transformers are
installed — HF's DeepseekV3ForCausalLM on the same config doing forward + backward +
torch.optim.AdamW with torch threads = cores. Our step again with bf16 and with fp8 matmuls
gives the FP8 emulation's step-time cost (`fp8_over_bf16_step`; `--precisions=` skips it).
`benchmarks/train_step.py` is the body.
Prints a table, writes JSON.
"""

import sys

from absl import app, flags

from experiments import common

_CONFIG = flags.DEFINE_string("config", "bench", "Variant of configs/dsv3.py.")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up).")
_PEER = flags.DEFINE_bool("peer", True, "Also time HF transformers (needs the `hf` extra).")
_PRECISIONS = flags.DEFINE_list(
  "precisions",
  ["bf16", "fp8"],
  "Also time our step with these matmul precisions (the fp8 / bf16 step-time ratio); empty: skip.",
)
_OUT = flags.DEFINE_string("out", "runs/benchmark_train.json", "JSON output.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _PEER.value:  # the peer at its best: glibc keeps freed memory (benchmarks/host.py)
    from benchmarks import host

    host.relaunch_with_peer_tunables()
  common.quiet_logs()
  from benchmarks import train_step

  result = train_step.run(
    _CONFIG.value, _BATCH.value, _SEQ.value, _STEPS.value, _PEER.value, tuple(_PRECISIONS.value)
  )
  print(train_step.report(result))
  common.write_json(_OUT.value, result)


if __name__ == "__main__":
  sys.exit(app.run(main))
