"""Metric writing: TensorBoard events and a JSONL file side by side, plus absl logging."""

import json
import os
from typing import Any, Mapping

import numpy as np
from absl import logging


def _scalarize(metrics: Mapping[str, Any]) -> dict:
  """Flattens arrays: a vector metric `max_vio` becomes `max_vio/0`, `max_vio/1`, ..."""
  out = {}
  for name, value in metrics.items():
    arr = np.asarray(value)
    if arr.ndim == 0:
      out[name] = float(arr)
    elif arr.ndim == 1:
      out.update({f"{name}/{i}": float(v) for i, v in enumerate(arr)})
  return out


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write_hparams(self, hparams: Mapping[str, Any]):
    if self.enabled:
      self._tb.add_text("config", "```\n" + json.dumps(hparams, indent=1) + "\n```", 0)

  def write(self, step: int, metrics: Mapping[str, Any], vectors: Mapping[str, Any] = ()):
    """Scalars go everywhere; `vectors` (e.g. per-expert loads) go to JSONL and histograms."""
    scalars = _scalarize(metrics)
    if not self.enabled:
      return scalars
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    record = {"step": step, **scalars}
    for name, value in dict(vectors).items():
      arr = np.asarray(value)
      record[name] = arr.tolist()
      self._tb.add_histogram(name, arr.reshape(-1), step)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    logging.info(
      "step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items() if "/" not in k)
    )
    return scalars

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
