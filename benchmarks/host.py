"""The host's memory settings that change CPU timings, recorded beside every CPU benchmark.

XLA:CPU allocates each execution's buffers afresh and glibc maps every block over 32 MiB with
its own `mmap`, so each step faults its working set in again, 4 KiB at a time (~0.9M page
faults per `bench` train step). With transparent huge pages in `madvise` mode, glibc's
`glibc.malloc.hugetlb=1` tunable asks for 2 MiB pages on those blocks: ~20x fewer faults.
The tunable is read when the process starts, so it is set by the launcher (the Makefile
exports it), not by the process; a benchmark records whether its run had it.
"""

import os

TUNABLE = "glibc.malloc.hugetlb=1"


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
  }


def describe(info: dict) -> str:
  """One line for a benchmark's table header."""
  if info["malloc_huge_pages"]:
    return f"huge pages on (THP {info['transparent_huge_pages']})"
  if info["transparent_huge_pages"] == "madvise":
    return f"huge pages off: run with GLIBC_TUNABLES={TUNABLE} (as `make` does)"
  return f"huge pages off (THP {info['transparent_huge_pages']})"
