"""Host memory reuse: a repeated XLA:CPU step stops faulting its working set in."""

import os
import platform
import subprocess
import sys

import pytest

# A jitted step whose 64 MiB output is well above glibc's 32 MiB
# mmap ceiling; prints the fewest minor page faults of calls 4-6 (freeing is asynchronous, so
# one call may still find the previous output alive and grow the heap once more).
_SCRIPT = """
import resource, sys
from dsv3_jax import host_memory
on = host_memory.reuse_freed_memory() if sys.argv[1] == "on" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x @ x.T) * 2 + 1)
x = jnp.ones((4096, 2048), jnp.float32) * 1e-3
for _ in range(3):
  f(x).block_until_ready()
faults = []
for _ in range(3):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(on, min(faults))
"""


def _faults(mode):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", _SCRIPT, mode], env=env, capture_output=True, text=True, check=True
  ).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(
  platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)
def test_reused_memory_stops_per_step_page_faults():
  on, faults = _faults("on")
  assert on
  # The step's output alone is 4096 x 4096 floats = 16k pages: none of them fault again.
  assert faults < 2000, faults
  _, faults_off = _faults("off")
  assert faults_off > 8000, faults_off  # what the setting removes


def test_not_applied_with_several_emulated_devices(monkeypatch):
  from dsv3_jax import host_memory

  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert host_memory.emulated_devices() == 8
  assert not host_memory.reuse_freed_memory()  # one arena would serialize 8 devices' threads
  monkeypatch.setenv("XLA_FLAGS", "")
  assert host_memory.emulated_devices() == 1
