"""Host memory: keep freed buffers in the process instead of handing them back to the OS.

XLA:CPU allocates every execution's outputs and temporaries afresh. glibc's malloc serves each
block above 32 MiB with its own `mmap` and returns it with `munmap` when freed, so every train
step re-faults its whole working set page by page: ~0.9M minor page faults (~3.5 GB) per
`bench` forward+backward, a quarter of its wall time on this machine's CPUs. With one malloc
arena that never maps, never trims and so reuses the freed heap, a step takes no page faults
once the heap has grown to the step's peak (two steps), and the process keeps that peak.

One arena is also its cost: threads that allocate at the same time queue for its lock. With
many emulated CPU devices (XLA_FLAGS' `--xla_force_host_platform_device_count` > 1) each
device's thread allocates its own small buffers concurrently, and that loses more than the
page faults cost: the `small` config's first 40 steps on 8 emulated devices took 159 s with
it and 102 s without. So it is skipped there unless forced.

Call `reuse_freed_memory()` first thing in a process, after XLA_FLAGS is final and before jax
starts its backend (its thread pools pick their arenas when they first allocate). Every
experiment binary does; a notebook or script that wants the same speed calls it in its first
cell. It applies to everything in the process alike (a benchmark's peer included) and is a
no-op where malloc is not glibc's.
"""

import ctypes
import ctypes.util
import os
import re

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def emulated_devices() -> int:
  """The host device count XLA_FLAGS asks for (1 when it sets none)."""
  flags = os.environ.get("XLA_FLAGS", "")
  found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", flags)
  return int(found[-1]) if found else 1


def reuse_freed_memory(force: bool = False) -> bool:
  """Sets glibc malloc to one arena with no per-block mmap and no trimming (see the module
  docstring), unless the process emulates several CPU devices and `force` is False. Returns
  whether the settings are in force (False off glibc)."""
  global _applied
  if _applied:
    return True
  if not force and emulated_devices() > 1:
    return False
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # -1 converts to SIZE_MAX inside mallopt: never trim the heap top.
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  _applied = all(mallopt(param, value) == 1 for param, value in settings)
  return _applied


def active() -> bool:
  """Whether `reuse_freed_memory` is in force in this process (benchmarks record it)."""
  return _applied
