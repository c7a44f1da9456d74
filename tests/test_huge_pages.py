"""Huge pages for XLA:CPU's buffers: the glibc tunable the Makefile exports, and its record."""

import os
import subprocess
import sys

import pytest

from benchmarks import host

# A jitted step whose 64 MiB output is above glibc's 32 MiB mmap ceiling, so every call maps
# it afresh; prints the fewest minor page faults of three warm calls.
_SCRIPT = """
import resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x @ x.T) * 2 + 1)
x = jnp.ones((4096, 2048), jnp.float32) * 1e-3
for _ in range(2):
  f(x).block_until_ready()
faults = []
for _ in range(3):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(min(faults))
"""


def _faults(tunables: str) -> int:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", GLIBC_TUNABLES=tunables)
  out = subprocess.run(
    [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True
  )
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(
  host._thp_mode() != "madvise", reason="the tunable acts where THP is in madvise mode"
)
def test_tunable_cuts_page_faults_of_large_buffers():
  # The output alone is 4096 x 4096 floats: 16k 4 KiB pages, or 32 huge pages.
  without = _faults("")
  assert without > 8000, without
  with_huge = _faults(host.TUNABLE)
  assert with_huge < without / 4, (with_huge, without)


def test_recorded_setting(monkeypatch):
  monkeypatch.setattr(host, "_thp_mode", lambda: "madvise")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0:" + host.TUNABLE)
  info = host.huge_pages()
  assert info["malloc_huge_pages"] and info["transparent_huge_pages"] == "madvise"
  assert host.describe(info).startswith("huge pages on")
  monkeypatch.setenv("GLIBC_TUNABLES", "")
  info = host.huge_pages()
  assert not info["malloc_huge_pages"]
  assert host.TUNABLE in host.describe(info)  # says how to turn it on
  monkeypatch.setattr(host, "_thp_mode", lambda: "always")
  assert host.huge_pages()["malloc_huge_pages"]  # the kernel gives them to every mapping
  monkeypatch.setattr(host, "_thp_mode", lambda: "never")
  assert not host.huge_pages()["malloc_huge_pages"]


def test_makefile_exports_the_tunable():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    ["make", "-pn", "run"],
    cwd=root,
    capture_output=True,
    text=True,
    env=dict(os.environ, GLIBC_TUNABLES=""),
  ).stdout
  assert f"GLIBC_TUNABLES := {host.TUNABLE}" in out.splitlines()


def test_peer_tunables_add_what_is_missing_once():
  kept = host.KEEP_FREED.split(":")
  assert host.peer_tunables("") == ":".join([host.TUNABLE, *kept])
  mine = "glibc.malloc.tcache_count=0:" + host.TUNABLE
  assert host.peer_tunables(mine) == ":".join([mine, *kept])
  full = host.peer_tunables(mine)
  assert host.peer_tunables(full) == full  # nothing to add: no relaunch


def test_relaunch_runs_the_same_command_with_the_tunables(tmp_path):
  """A script that relaunches itself comes back once, with the tunables, and says so."""
  script = tmp_path / "relaunch.py"
  script.write_text(
    "import os, sys\n"
    "from benchmarks import host\n"
    "print('start', flush=True)\n"
    "host.relaunch_with_peer_tunables()\n"
    "info = host.huge_pages()\n"
    "print(os.environ['GLIBC_TUNABLES'], info['malloc_keeps_freed_memory'], sys.argv[1:])\n"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, GLIBC_TUNABLES="", PYTHONPATH=root)
  env.pop("DSV3_JAX_BENCH_RELAUNCHED", None)
  out = subprocess.run(
    [sys.executable, str(script), "--flag"], capture_output=True, text=True, env=env, check=True
  ).stdout.splitlines()
  assert out[0] == out[1] == "start"  # the relaunched process ran the script again
  assert out[2] == f"{host.peer_tunables('')} True ['--flag']"
  assert len(out) == 3
