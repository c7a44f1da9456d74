r"""Serves a checkpoint over an OpenAI-style HTTP API (continuous batching).

  python -m experiments.serve --workdir=runs/small --port=8000 --slots=8
  python -m experiments.serve --hf_dir=path/to/DeepSeek-V3-like --port=8000

  curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"prompt": "def main(", "max_tokens": 32, "temperature": 0}'

Routes, fields and replies: `dsv3_jax/serving/http.py`; the engine: `dsv3_jax/serving/engine.py`.
Prints `serving <model> on http://HOST:PORT` once the programs are compiled and the socket
listens; Ctrl-C (SIGINT) or SIGTERM stops it. `kill -USR1 <pid>` prints every thread's stack
to stderr (a server that seems stuck says where it is) and keeps serving.
"""

import faulthandler
import signal
import sys

from absl import app, flags

from experiments import common

_WORKDIR = flags.DEFINE_string(
  "workdir",
  "runs/small",
  "A training workdir or orbax model export (`make run` writes runs/small).",
)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "A HF DeepSeek-V3 directory (replaces --workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: latest).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Override: 'byte' or a tokenizer.json.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port (0 = any free port).")
_SLOTS = flags.DEFINE_integer("slots", 8, "Requests decoded together (cache slots).")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Context per slot (default: the model's).")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "MTP self-speculative decoding.")
_EPLB = flags.DEFINE_bool("eplb", False, "Collect expert loads and re-place experts (EPLB).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _HF_DIR.value is not None and flags.FLAGS["workdir"].present:
    raise app.UsageError("give either --workdir or --hf_dir, not both")
  workdir = None if _HF_DIR.value is not None else _WORKDIR.value
  common.quiet_logs()
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  # Python keeps SIGINT ignored when its parent left it so (a shell's background job, a
  # process pool's worker): then Ctrl-C or `kill -INT` would not stop the server. Both SIGINT
  # and SIGTERM stop it the same way, whatever it was started from.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  signal.signal(signal.SIGTERM, signal.default_int_handler)
  from dsv3_jax.serving import http

  def ready(server):
    print(f"serving {server.model_name} on {server.url}", flush=True)

  try:
    http.serve_checkpoint(
      workdir,
      _HF_DIR.value,
      host=_HOST.value,
      port=_PORT.value,
      slots=_SLOTS.value,
      max_len=_MAX_LEN.value,
      step=_STEP.value,
      tokenizer=_TOKENIZER.value,
      speculative=_SPECULATIVE.value,
      eplb=_EPLB.value,
      ready=ready,
    )
  except FileNotFoundError as e:  # nothing trained there yet
    raise app.UsageError(
      f"{e}; train first, e.g. python -m experiments.train --workdir={workdir}"
    ) from e


if __name__ == "__main__":
  sys.exit(app.run(main))
