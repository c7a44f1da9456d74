"""Checks `--config.<section>.<field>=value` command-line overrides before they are applied.

ml_collections applies an override to a field that does not exist with a bare
``AttributeError: "'batch_size'"``.  `check_argv` finds such an override first and raises a
`ValueError` that names the flag, the section and the closest field names, e.g.

  --config.train.batch_size: config section `train` has no field `batch_size`; did you mean
  `global_batch`? (fields of `train`: ...)

It works on anything with ``keys()`` and ``[]`` (a ConfigDict or a plain dict), so the same
check serves every binary's config flag.  The fields themselves are the DeepSeek-V3
hyperparameters of `dsv3_jax.config` (arXiv 2412.19437, §4.2).
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Sequence

__all__ = ["check_argv", "check_path", "close_matches", "override_paths"]


def override_paths(argv: Sequence[str], name: str = "config") -> list[str]:
  """The field paths (``"train.batch_size"``) of the ``--<name>.<path>[=value]`` arguments."""
  pattern = re.compile(r"^--?(?:no)?" + re.escape(name) + r"\.([^=]+)")
  paths = []
  for arg in argv:
    if arg == "--":
      break
    m = pattern.match(arg)
    if m:
      paths.append(m.group(1))
  return paths


def close_matches(word: str, candidates: Sequence[str], n: int = 3) -> list[str]:
  """Up to ``n`` candidates that look like ``word``: similar spelling, or a shared part
  between underscores (``batch_size`` -> ``global_batch``)."""
  candidates = sorted(candidates)
  found = difflib.get_close_matches(word, candidates, n=n, cutoff=0.6)
  parts = {p for p in word.lower().split("_") if len(p) > 2}
  for c in candidates:
    if len(found) >= n:
      break
    if c not in found and parts & set(c.lower().split("_")):
      found.append(c)
  for c in difflib.get_close_matches(word, candidates, n=n, cutoff=0.4):
    if len(found) >= n:
      break
    if c not in found:
      found.append(c)
  return found


def _is_section(value: Any) -> bool:
  return hasattr(value, "keys") and hasattr(value, "__getitem__")


def check_path(config: Any, path: str, name: str = "config") -> None:
  """Raises ValueError unless ``path`` (dot-separated) names an existing field of ``config``."""
  node, walked = config, []
  for key in path.split("."):
    key = key.split("[", 1)[0]  # `field[0]` indexes a list field
    where = ".".join(walked)
    section = f"config section `{where}`" if where else "the config"
    if not _is_section(node):
      raise ValueError(
        f"--{name}.{path}: `{where}` is a field, not a section, so it has no field `{key}`"
      )
    fields = [str(k) for k in node.keys()]
    if key not in fields:
      hint = close_matches(key, fields)
      did_you_mean = f"; did you mean {' or '.join(f'`{h}`' for h in hint)}?" if hint else ""
      raise ValueError(
        f"--{name}.{path}: {section} has no field `{key}`{did_you_mean} "
        f"(fields of {f'`{where}`' if where else 'the config'}: "
        f"{', '.join(sorted(fields))})"
      )
    node = node[key]
    walked.append(key)


def check_argv(config: Any, argv: Sequence[str], name: str = "config") -> None:
  """`check_path` for every ``--<name>.<path>`` override in ``argv``."""
  for path in override_paths(argv, name):
    check_path(config, path, name)


def flag_value(name: str, argv) -> str | None:
  """The last `--name=value` / `--name value` in argv, or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg == "--":
      break
    m = re.match(r"^--?" + re.escape(name) + r"(=(.*))?$", arg)
    if m:
      value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value
