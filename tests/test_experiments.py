"""The experiment binaries run with no device flags on a plain CPU machine."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_emulates_the_devices_its_mesh_needs(tmp_path):
  """No --devices and no XLA_FLAGS: a data=2 mesh gets its 2 emulated CPU devices."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [
    sys.executable,
    "-m",
    "experiments.train",
    "--config=configs/dsv3.py:tiny",
    f"--workdir={tmp_path / 'run'}",
    "--config.parallel.data=2",
    "--config.train.steps=1",
    "--config.train.eval_batches=1",
  ]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout[out.stdout.rindex("{\n") :])  # the closing summary
  assert summary["steps"] == 1, summary
