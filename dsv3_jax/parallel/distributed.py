"""Multi-process runs: `jax.distributed.initialize` from flags or environment, with timeouts.

One process per host (or, on one machine, several processes on 127.0.0.1 whose CPU devices
talk through gloo). Every process must call `initialize` before anything touches a JAX
device; afterwards `jax.devices()` lists every process's devices and `jax.process_index()`
says which slice of the data this process loads.

Settings come from flags first, then the environment:
  coordinator    DSV3_COORDINATOR      host:port of process 0's coordination service
  num_processes  DSV3_NUM_PROCESSES
  process_id     DSV3_PROCESS_ID
A run with no coordinator and at most one process stays single-process.

Failure in bounded time, not a hang:
  * start-up: a peer that never arrives fails `initialize` after `init_timeout_s`;
  * a peer that dies: the coordination service misses its heartbeats for
    `heartbeat_timeout_s` and terminates every other process with an error naming the
    unhealthy task ("...stopped sending heartbeats... another task died");
  * a peer that hangs while still alive: the `Watchdog` (kicked once per training step)
    exits the process with a clear message when no step finishes for `step_timeout_s`.
"""

import dataclasses
import os
import sys
import threading
import time
from typing import Mapping, Optional

from absl import logging

ENV_COORDINATOR = "DSV3_COORDINATOR"
ENV_NUM_PROCESSES = "DSV3_NUM_PROCESSES"
ENV_PROCESS_ID = "DSV3_PROCESS_ID"
WATCHDOG_EXIT_CODE = 75


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  coordinator: str  # host:port of process 0
  num_processes: int
  process_id: int
  init_timeout_s: int = 120  # how long to wait for every process to join
  heartbeat_timeout_s: int = 30  # a process silent this long is declared dead

  def validate(self) -> "DistributedSpec":
    host, sep, port = self.coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise ValueError(f"invalid coordinator address {self.coordinator!r}: expected host:port")
    if self.num_processes < 1:
      raise ValueError(f"invalid num_processes = {self.num_processes}: must be >= 1")
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(
        f"invalid process_id = {self.process_id}: must be in "
        f"[0, num_processes={self.num_processes})"
      )
    for name in ("init_timeout_s", "heartbeat_timeout_s"):
      if getattr(self, name) <= 0:
        raise ValueError(f"invalid {name} = {getattr(self, name)}: must be positive")
    return self


def _int(value, name: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"invalid {name} = {value!r}: must be an integer") from None


def resolve(
  coordinator: str = "",
  num_processes: int = 0,
  process_id: int = -1,
  *,
  env: Optional[Mapping[str, str]] = None,
  init_timeout_s: int = 120,
  heartbeat_timeout_s: int = 30,
) -> Optional[DistributedSpec]:
  """The multi-process setting from flags (non-default values win) and the environment.

  Returns None for a single-process run. Raises ValueError naming the missing or bad value
  when only part of the setting is given.
  """
  env = os.environ if env is None else env
  coordinator = coordinator or env.get(ENV_COORDINATOR, "")
  n = num_processes or _int(env.get(ENV_NUM_PROCESSES, 0), ENV_NUM_PROCESSES)
  pid = process_id if process_id >= 0 else _int(env.get(ENV_PROCESS_ID, -1), ENV_PROCESS_ID)
  if not coordinator and n <= 1:
    return None
  if not coordinator:
    raise ValueError(
      f"num_processes = {n} needs a coordinator address (--coordinator or ${ENV_COORDINATOR})"
    )
  if n < 1:
    raise ValueError(
      f"coordinator {coordinator!r} given without num_processes "
      f"(--num_processes or ${ENV_NUM_PROCESSES})"
    )
  if pid < 0:
    raise ValueError(f"multi-process run without a process_id (--process_id or ${ENV_PROCESS_ID})")
  return DistributedSpec(coordinator, n, pid, init_timeout_s, heartbeat_timeout_s).validate()


def initialize(spec: Optional[DistributedSpec]) -> None:
  """Joins the job described by `spec` (no-op for None). Call before any JAX device use."""
  if spec is None:
    return
  import jax

  logging.info(
    "process %d/%d joining coordinator %s", spec.process_id, spec.num_processes, spec.coordinator
  )
  t0 = time.time()
  try:
    jax.distributed.initialize(
      spec.coordinator,
      num_processes=spec.num_processes,
      process_id=spec.process_id,
      initialization_timeout=spec.init_timeout_s,
      heartbeat_timeout_seconds=spec.heartbeat_timeout_s,
    )
  except Exception as e:  # the runtime raises several types; name the job in one error
    raise RuntimeError(
      f"process {spec.process_id}/{spec.num_processes} could not join coordinator "
      f"{spec.coordinator} within {spec.init_timeout_s}s ({time.time() - t0:.0f}s elapsed):"
      f" {type(e).__name__}: {e}"
    ) from e
  logging.info(
    "process %d/%d joined in %.1fs: %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    time.time() - t0,
    jax.local_device_count(),
    jax.device_count(),
  )


# ----------------------------------------------------------------------------- watchdog
class Watchdog:
  """Exits the process when `kick()` is not called for `timeout_s` seconds.

  A collective whose peer hangs (alive, so its heartbeats continue) blocks forever; this
  turns that into an exit with a message and `WATCHDOG_EXIT_CODE`.
  """

  def __init__(self, timeout_s: float, what: str = "training step"):
    if timeout_s <= 0:
      raise ValueError(f"invalid watchdog timeout_s = {timeout_s}: must be positive")
    self.timeout_s = float(timeout_s)
    self.what = what
    self._last = time.monotonic()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="dsv3-watchdog", daemon=True)
    self._thread.start()

  def kick(self) -> None:
    self._last = time.monotonic()

  def stop(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)

  def _run(self):
    while not self._stop.wait(min(1.0, self.timeout_s / 4)):
      idle = time.monotonic() - self._last
      if idle > self.timeout_s:
        msg = (
          f"watchdog: no {self.what} finished for {idle:.0f}s (limit {self.timeout_s:.0f}s)"
          f"; a peer process has probably died or hung. Exiting."
        )
        logging.error(msg)
        print(msg, file=sys.stderr, flush=True)
        os._exit(WATCHDOG_EXIT_CODE)


_WATCHDOG: Optional[Watchdog] = None


def start_watchdog(timeout_s: float) -> Watchdog:
  """Starts (or restarts) the process-wide watchdog that `kick()` feeds."""
  global _WATCHDOG
  if _WATCHDOG is not None:
    _WATCHDOG.stop()
  _WATCHDOG = Watchdog(timeout_s)
  return _WATCHDOG


def stop_watchdog() -> None:
  global _WATCHDOG
  if _WATCHDOG is not None:
    _WATCHDOG.stop()
    _WATCHDOG = None


def kick() -> None:
  """Marks progress (the training loop calls it once per step); no-op without a watchdog."""
  if _WATCHDOG is not None:
    _WATCHDOG.kick()
