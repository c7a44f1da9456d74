"""The host's memory settings that change CPU timings, recorded beside every CPU benchmark.

XLA:CPU allocates each execution's buffers afresh and glibc maps every block over 32 MiB with
its own `mmap`, so each step faults its working set in again, 4 KiB at a time (~0.9M page
faults per `bench` train step). With transparent huge pages in `madvise` mode, glibc's
`glibc.malloc.hugetlb=1` tunable asks for 2 MiB pages on those blocks: ~20x fewer faults.
The tunable is read when the process starts, so it is set by the launcher (the Makefile
exports it), not by the process; a benchmark records whether its run had it.

The peer (torch) needs a different setting to run at its best: glibc maps its large blocks
with `mmap` and trims freed memory back to the kernel, so every HF step faults its buffers
in again. With the blocks kept in the heap and nothing trimmed (`KEEP_FREED`), HF's bench
train step takes 3.15 s instead of 5.77 s (alone, medians of 6 steps; either setting alone:
7.74 s and 5.43 s), while ours is unchanged (3.14 vs 3.10 s). Glibc reads the tunables at
start-up, so a benchmark that times the peer re-executes itself with them
(`relaunch_with_peer_tunables`) and records them.
"""

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
KEEP_FREED = "glibc.malloc.mmap_threshold=2147483648:glibc.malloc.trim_threshold=17179869184"
_RELAUNCHED = "DSV3_JAX_BENCH_RELAUNCHED"


def _thp_mode() -> str:
  """The kernel's transparent huge page mode (`always`, `madvise`, `never`), or `unknown`."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      text = f.read()
  except OSError:
    return "unknown"
  chosen = [w[1:-1] for w in text.split() if w.startswith("[")]
  return chosen[0] if chosen else "unknown"


def huge_pages() -> dict:
  """Whether large host buffers get huge pages in this process, and why."""
  mode = _thp_mode()
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  asked = TUNABLE in tunables.split(":")
  return {
    "transparent_huge_pages": mode,
    "glibc_tunables": tunables,
    "malloc_huge_pages": mode == "always" or (mode == "madvise" and asked),
    "malloc_keeps_freed_memory": _has(tunables, KEEP_FREED),
  }


def _has(tunables: str, wanted: str) -> bool:
  return set(wanted.split(":")) <= set(tunables.split(":"))


def peer_tunables(tunables: str) -> str:
  """`tunables` plus the huge pages and the kept freed memory the peer runs best with."""
  missing = [t for t in (TUNABLE, *KEEP_FREED.split(":")) if not _has(tunables, t)]
  return ":".join([t for t in tunables.split(":") if t] + missing)


def relaunch_with_peer_tunables() -> None:
  """Re-executes this process (same interpreter and command line) with `peer_tunables` in
  GLIBC_TUNABLES, unless they are set already or this is the relaunched process."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  wanted = peer_tunables(tunables)
  if wanted == tunables or os.environ.get(_RELAUNCHED):
    return
  env = dict(os.environ, GLIBC_TUNABLES=wanted, **{_RELAUNCHED: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def describe(info: dict) -> str:
  """One line for a benchmark's table header."""
  thp = info["transparent_huge_pages"]
  if info["malloc_huge_pages"]:
    pages = f"huge pages on (THP {thp})"
  elif thp == "madvise":
    pages = f"huge pages off: run with GLIBC_TUNABLES={TUNABLE} (as `make` does)"
  else:
    pages = f"huge pages off (THP {thp})"
  return pages + (", freed memory kept" if info.get("malloc_keeps_freed_memory") else "")
