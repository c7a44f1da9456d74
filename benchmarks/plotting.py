"""matplotlib, imported only when something is drawn (it is the optional `plots` extra)."""

import importlib


def require_matplotlib():
  """Returns the `matplotlib` module, or raises ImportError naming the extra that installs it."""
  try:
    return importlib.import_module("matplotlib")
  except ImportError as e:
    raise ImportError(
      "plotting needs matplotlib: pip install 'dsv3_jax[plots]' (or `pip install matplotlib`)"
    ) from e
