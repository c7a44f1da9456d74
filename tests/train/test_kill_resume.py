"""`kill -9` of the training binary while an asynchronous checkpoint is being written, then a
restart: the run continues with the losses of an uninterrupted one."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 12


def _command(workdir):
  return [
    sys.executable,
    "-m",
    "experiments.train",
    "--config=configs/dsv3.py:tiny",
    f"--workdir={workdir}",
    f"--config.train.steps={STEPS}",
    "--config.train.checkpoint_every=1",
    "--config.train.log_every=1",
    "--config.train.eval_every=100",
    "--config.train.keep_checkpoints=2",
  ]


def _env(cache_dir):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  return env


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == sorted(set(steps)), f"metric steps repeat or go back: {steps}"
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _in_flight(directory, min_step):
  """The names of temporary (unfinished) checkpoint directories of steps >= min_step."""
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return []
  out = []
  for name in names:
    m = re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", name)
    if m and int(m.group(1)) >= min_step:
      out.append(name)
  return out


@pytest.mark.slow
def test_sigkill_during_async_save_then_restart_matches_uninterrupted(tmp_path):
  env = _env(str(tmp_path / "jax_cache"))
  full = str(tmp_path / "full")
  done = subprocess.run(
    _command(full), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )
  assert done.returncode == 0, done.stderr[-3000:]
  want = _losses(full)
  assert sorted(want) == list(range(1, STEPS + 1))

  workdir = str(tmp_path / "killed")
  checkpoints = os.path.join(workdir, "checkpoints")
  proc = subprocess.Popen(
    _command(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  killed_during = None
  try:
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline:
      names = _in_flight(checkpoints, min_step=3)
      if names:
        os.kill(proc.pid, signal.SIGKILL)  # a save of step >= 3 is being written
        killed_during = names
        break
      time.sleep(0.001)
  finally:
    if proc.poll() is None and killed_during is None:
      proc.kill()
    proc.wait()
  assert killed_during, "the run ended before a checkpoint save was seen in flight"
  assert proc.returncode == -signal.SIGKILL
  orphans = _in_flight(checkpoints, min_step=0)
  print(f"killed while {killed_during} was being written; left behind: {orphans}")

  again = subprocess.run(
    _command(workdir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'"steps": {STEPS}' in again.stdout
  if orphans:  # the save was still unfinished when the process died
    assert "orphaned temporary checkpoint directory" in again.stderr
  assert not _in_flight(checkpoints, min_step=0)
  got = _losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5
  )
