"""Small pieces every experiment binary shares."""

import json
import os


def emulate_cpu_devices(n: int) -> None:
  """Asks XLA for `n` host devices; must run before jax is first imported (0 = leave as is)."""
  if n:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n}")


def write_json(path: str, result: dict, announce: bool = True) -> None:
  """Writes a result next to the table a binary printed, creating the folder."""
  if not path:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  if announce:
    print(f"wrote {path}")
