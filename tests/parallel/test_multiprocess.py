"""Multi-process training: 2 processes x 4 CPU devices on 127.0.0.1 equal 1 process x 8.

Each test launches the real binary (`python -m experiments.train`) as separate processes
joined by `jax.distributed.initialize`; each process loads only its own rows of every batch.
The first test checks that 3 steps give the same losses as one process with 8 devices; the
second kills one process mid-run and checks that the other fails with a clear error within
a bounded time instead of hanging.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dsv3_jax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
  "--config=configs/dsv3.py:tiny",
  "--config.parallel.data=2",
  "--config.parallel.expert=4",
  "--config.data.max_bytes=300000",
  "--config.train.eval_batches=1",
  "--config.train.eval_every=1000",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env() -> dict:
  env = {
    k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",) and not k.startswith("DSV3_")
  }
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return env


def _launch(workdir: str, devices: int, extra: list, log: str) -> subprocess.Popen:
  cmd = [
    sys.executable,
    "-m",
    "experiments.train",
    f"--workdir={workdir}",
    f"--devices={devices}",
    *TINY,
    *extra,
  ]
  out = open(log, "w")
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)


def _wait(procs, timeout: float, logs) -> None:
  deadline = time.time() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError("timed out; logs:\n" + "\n".join(_tail(l) for l in logs))


def _tail(path: str, n: int = 4000) -> str:
  with open(path) as f:
    return f"--- {path}\n" + f.read()[-n:]


def _losses(workdir: str) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["loss"] for r in rows if "loss" in r]


def _multi(tmp_path, name: str, steps: int, heartbeat: int = 30, step_timeout: int = 900):
  port = _free_port()
  workdir = str(tmp_path / name)
  procs, logs = [], []
  for pid in range(2):
    log = str(tmp_path / f"{name}_{pid}.log")
    logs.append(log)
    procs.append(
      _launch(
        workdir,
        4,
        [
          f"--config.train.steps={steps}",
          f"--coordinator=127.0.0.1:{port}",
          "--num_processes=2",
          f"--process_id={pid}",
          f"--heartbeat_timeout={heartbeat}",
          f"--step_timeout={step_timeout}",
        ],
        log,
      )
    )
  return workdir, procs, logs


@pytest.mark.slow  # two processes each compile the train step (2-3 minutes on 2 cores)
def test_two_processes_equal_one_process(tmp_path):
  single_dir = str(tmp_path / "single")
  single_log = str(tmp_path / "single.log")
  multi_dir, procs, logs = _multi(tmp_path, "multi", steps=3)
  single = _launch(single_dir, 8, ["--config.train.steps=3"], single_log)
  _wait(procs + [single], 900, logs + [single_log])
  for p, log in zip(procs + [single], logs + [single_log]):
    assert p.returncode == 0, _tail(log)
  with open(logs[0]) as f:
    text = f.read()
  assert "process 0 of 2" in text and "train state per device" in text
  with open(logs[1]) as f:
    assert "process 1 of 2" in f.read()
  multi, one = _losses(multi_dir), _losses(single_dir)
  assert len(multi) == len(one) == 3
  np.testing.assert_allclose(multi, one, rtol=1e-5)


@pytest.mark.slow
def test_dead_peer_fails_the_other_in_bounded_time(tmp_path):
  heartbeat = 10
  workdir, procs, logs = _multi(tmp_path, "dead", steps=100000, heartbeat=heartbeat)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      raise AssertionError("training never started:\n" + "\n".join(_tail(l) for l in logs))
    time.sleep(1)
  procs[1].send_signal(signal.SIGKILL)  # a peer dies mid-run
  t_kill = time.time()
  try:
    procs[0].wait(timeout=heartbeat * 6)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    raise AssertionError("the surviving process hung after its peer died:\n" + _tail(logs[0]))
  elapsed = time.time() - t_kill
  print(f"survivor exited with {procs[0].returncode} {elapsed:.1f}s after its peer was killed")
  assert procs[0].returncode != 0
  text = _tail(logs[0], 20000)
  assert (
    "another task died" in text or "stopped sending heartbeats" in text or "watchdog" in text
  ), text
  assert elapsed < heartbeat * 6


def test_resolve_reads_flags_then_environment():
  assert distributed.resolve(env={}) is None
  spec = distributed.resolve(
    env={"DSV3_COORDINATOR": "127.0.0.1:1234", "DSV3_NUM_PROCESSES": "2", "DSV3_PROCESS_ID": "1"}
  )
  assert (spec.coordinator, spec.num_processes, spec.process_id) == ("127.0.0.1:1234", 2, 1)
  spec = distributed.resolve("10.0.0.1:99", 4, 3, env={"DSV3_PROCESS_ID": "0"})
  assert (spec.coordinator, spec.num_processes, spec.process_id) == ("10.0.0.1:99", 4, 3)
  with pytest.raises(ValueError, match="coordinator"):
    distributed.resolve(num_processes=2, process_id=0, env={})
  with pytest.raises(ValueError, match="process_id"):
    distributed.resolve("127.0.0.1:1", 2, env={})
  with pytest.raises(ValueError, match="must be in"):
    distributed.resolve("127.0.0.1:1", 2, 2, env={})
  with pytest.raises(ValueError, match="host:port"):
    distributed.resolve("localhost", 2, 0, env={})
  with pytest.raises(ValueError, match="DSV3_NUM_PROCESSES"):
    distributed.resolve(env={"DSV3_COORDINATOR": "h:1", "DSV3_NUM_PROCESSES": "two"})


def test_watchdog_exits_a_stalled_process(tmp_path):
  code = (
    "import time\nfrom dsv3_jax.parallel import distributed\n"
    "distributed.start_watchdog(1.0)\n"
    "for _ in range(3):\n  time.sleep(0.3)\n  distributed.kick()\n"
    "time.sleep(30)\n"
  )
  t0 = time.time()
  p = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60
  )
  assert p.returncode == distributed.WATCHDOG_EXIT_CODE
  assert "watchdog: no training step finished" in p.stderr
  assert time.time() - t0 < 20
