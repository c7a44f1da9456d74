"""Small pieces every experiment binary shares: devices, logging, config flags, JSON."""

import json
import logging
import math
import os
import sys

# Libraries whose INFO chatter (checkpoint bookkeeping, backend probing) is hidden by default.
NOISY_LOGGERS = ("absl", "orbax", "jax", "jax._src", "grain", "tensorstore")


def emulate_cpu_devices(n: int, parallel=None) -> None:
  """Asks XLA for `n` host devices; must run before jax is first imported. 0 leaves XLA_FLAGS
  as is; -1 asks for `parallel`'s fixed data x expert x pipe mesh unless XLA_FLAGS sets one."""
  flags = os.environ.get("XLA_FLAGS", "")
  if n < 0:
    sizes = (parallel.data, parallel.expert, parallel.pipe)
    n = 0 if -1 in sizes or "host_platform_device_count" in flags else math.prod(sizes)
  if n:
    os.environ["XLA_FLAGS"] = flags + f" --xla_force_host_platform_device_count={n}"


def quiet_logs() -> None:
  """Keeps library INFO logs (orbax, absl, jax) below WARNING unless `--verbosity` asks.

  Every binary calls this first in `main`, so a run shows its progress bar, metrics and results
  only. `--verbosity=0` restores INFO; `--logger_levels=orbax:INFO` raises single loggers.
  """
  from absl import flags
  from absl import logging as absl_logging

  if flags.FLAGS["verbosity"].present:
    return  # the user chose a level; absl has applied it
  absl_logging.set_verbosity(absl_logging.WARNING)
  chosen = flags.FLAGS["logger_levels"].value or {}
  for name in NOISY_LOGGERS:
    if name not in chosen:
      logging.getLogger(name).setLevel(logging.WARNING)


def check_mesh_fits(parallel, n_devices: int) -> None:
  """A usage error, not a traceback, when the config's data x expert x pipe mesh does not fit
  the devices (e.g. `small`'s 2 x 4 mesh on a plain 1-device CPU)."""
  from absl import app

  from dsv3_jax.parallel import mesh as mesh_lib

  try:
    mesh_lib.mesh_shape(parallel, n_devices)
  except ValueError as e:
    raise app.UsageError(
      f"{e}: pass --devices=N to emulate N CPU devices, or change "
      "--config.parallel.data / expert / pipe"
    ) from e


def _check_overrides(name: str, load_config) -> None:
  """Exits with a usage message when a `--name.<field>` override names no field of the config
  (ml_collections would fail with a bare AttributeError), listing close field names."""
  from dsv3_jax import overrides

  argv = sys.argv[1:]
  if not overrides.override_paths(argv, name):
    return
  try:
    config = load_config(argv)
  except Exception:  # noqa: BLE001 -- a config that does not load is ml_collections' to report
    return
  try:
    overrides.check_argv(config, argv, name)
  except ValueError as e:
    sys.exit(
      f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags."
    )


def define_config_file(name: str, default: str, help_string: str):
  """`config_flags.DEFINE_config_file`, with overrides of missing fields reported clearly.

  The check runs here: ml_collections applies overrides to the default config at definition.
  """
  import importlib.util

  from ml_collections import config_flags

  from dsv3_jax import overrides

  def load(argv):  # what ml_collections does: `path[:arg]` -> module.get_config(arg)
    path, *arg = (overrides.flag_value(name, argv) or default).split(":", 1)
    spec = importlib.util.spec_from_file_location(f"_{name}_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*arg)

  _check_overrides(name, load)
  return config_flags.DEFINE_config_file(name, default, help_string)


def define_config_dict(name: str, config, help_string: str):
  """`config_flags.DEFINE_config_dict`, with overrides of missing fields reported clearly."""
  from ml_collections import config_flags

  _check_overrides(name, lambda argv: config)
  return config_flags.DEFINE_config_dict(name, config, help_string)


def write_json(path: str, result: dict, announce: bool = True) -> None:
  """Writes a result next to the table a binary printed, creating the folder."""
  if not path:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  if announce:
    print(f"wrote {path}")
