"""Gantt charts of pipeline-parallel timelines, in the style of DeepSeek's DualPipe figure.

A *timeline* is one sequence of boxes per rank; a box is a tuple
``(start, end, kind, mb[, direction, ...])``:

* ``start``/``end``: times in any unit (simulated cost units or measured seconds);
* ``kind``: ``"F"``, ``"B"``, ``"W"``, ``"BW"`` (full backward) or ``"FB"`` (an
  overlapped forward & backward pair; ``"F&B"`` is accepted too); any other
  string is drawn in gray with the string as its label;
* ``mb``: the micro-batch number printed in the box (an ``(f_mb, b_mb)`` pair for
  ``FB``; ``None`` prints nothing);
* ``direction`` (optional): 0, 1 or an ``(f_dir, b_dir)`` pair; direction-1
  (reverse) work is drawn in a lighter shade.

:class:`dsv3_jax.parallel.schedules.Span` (from ``simulate``) has exactly this
shape, and a measured timeline only needs the first four fields.  Rendering uses
matplotlib's Agg canvas directly, so no global backend is touched; matplotlib is the
optional ``plots`` extra and is imported only by :func:`plot_timeline`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

COLORS = {
  "F": "#f4a04f",  # forward: orange
  "B": "#a6d96a",  # input-gradient backward: light green
  "W": "#5b9bd5",  # weight-gradient backward: blue
  "BW": "#1a9850",  # full backward: green
}
IDLE = "#e6e6e6"
OTHER = "#9e9e9e"
LEGEND = (
  ("F", "forward"),
  ("B", "backward (input)"),
  ("W", "backward (weights)"),
  ("BW", "backward (full)"),
)


def _matplotlib():
  """The matplotlib pieces :func:`plot_timeline` draws with (imported on first use)."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle
  except ImportError as e:
    raise ImportError(
      "plot_timeline needs matplotlib: pip install 'dsv3_jax[plots]' (or `pip install matplotlib`)"
    ) from e
  return FigureCanvasAgg, to_rgb, Figure, Patch, Rectangle


def _shade(color: str, direction: int) -> tuple[float, float, float]:
  """Direction-1 work is blended halfway towards white."""
  rgb = _matplotlib()[1](color)
  return tuple(c + (1.0 - c) * 0.45 for c in rgb) if direction == 1 else rgb


def _pair(x: Any) -> tuple[Any, Any]:
  return (x[0], x[1]) if isinstance(x, (tuple, list)) else (x, x)


def _label(x: Any) -> str:
  return "" if x is None or (isinstance(x, int) and x < 0) else str(x)


def plot_timeline(
  timelines: Sequence[Sequence[Sequence[Any]]],
  path: str | os.PathLike,
  title: str = "",
  *,
  time_unit: str = "",
  max_width: float = 26.0,
  dpi: int = 120,
) -> str:
  """Draw one row per rank and save a PNG to ``path``; returns ``path`` as a string.

  Gaps between boxes (idle time inside ``[0, makespan]``) show as the gray row
  background.  For ``FB`` boxes the upper half is the forward (with its
  micro-batch number) and the lower half the backward.
  """
  FigureCanvasAgg, _, Figure, Patch, Rectangle = _matplotlib()
  pp = len(timelines)
  spans = [[tuple(s) for s in row] for row in timelines]
  t0 = min((s[0] for row in spans for s in row), default=0.0)
  t1 = max((s[1] for row in spans for s in row), default=1.0)
  t0 = min(t0, 0.0)
  length = max(t1 - t0, 1e-12)

  width = min(max_width, max(8.0, 0.3 * max((len(r) for r in spans), default=0) + 2.0))
  row_pts = 0.55 * 72.0  # height of one rank row, in points
  fig = Figure(figsize=(width, 0.55 * max(pp, 1) + 1.0), dpi=dpi)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  points_per_unit = (width - 1.2) * 72.0 / length  # axes width in points per time unit

  def text(x, y, s, w, h):
    size = min(9.0, 0.6 * w * points_per_unit / max(len(s), 1), 0.6 * h * row_pts)
    if s and size >= 3.0:
      ax.text(x, y, s, ha="center", va="center", fontsize=size, color="black")

  seen, reverse = set(), False
  for r, row in enumerate(spans):
    ax.add_patch(Rectangle((t0, r - 0.4), length, 0.8, facecolor=IDLE, edgecolor="none"))
    for span in row:
      start, end, kind, mb = span[:4]
      direction = span[4] if len(span) > 4 else 0
      kind = "FB" if kind == "F&B" else str(kind)
      w = end - start
      if kind == "FB":
        (mf, mbk), (df, db) = _pair(mb), _pair(direction)
        reverse |= 1 in (df, db)
        seen.update(("F", "BW"))
        for y0, col, d, m in ((r - 0.4, COLORS["F"], df, mf), (r, COLORS["BW"], db, mbk)):
          ax.add_patch(Rectangle((start, y0), w, 0.4, facecolor=_shade(col, d), edgecolor="none"))
          text(start + w / 2, y0 + 0.2, _label(m), w, 0.4)
        ax.add_patch(
          Rectangle((start, r - 0.4), w, 0.8, facecolor="none", edgecolor="black", linewidth=1.2)
        )
        continue
      d = _pair(direction)[0]
      reverse |= d == 1
      color = COLORS.get(kind, OTHER)
      seen.add(kind if kind in COLORS else "other")
      ax.add_patch(
        Rectangle(
          (start, r - 0.4), w, 0.8, facecolor=_shade(color, d), edgecolor="black", linewidth=0.4
        )
      )
      label = _label(mb) if kind in COLORS else f"{kind}{_label(mb)}"
      text(start + w / 2, r, label, w, 0.8)

  ax.set_xlim(t0, t0 + length)
  ax.set_ylim(pp - 0.5, -0.5)
  ax.set_yticks(range(pp))
  ax.set_yticklabels([f"rank {r}" for r in range(pp)])
  ax.set_xlabel(f"time ({time_unit})" if time_unit else "time")
  for side in ("top", "right"):
    ax.spines[side].set_visible(False)
  if title:
    ax.set_title(title)

  handles = [
    Patch(facecolor=COLORS[k], edgecolor="black", label=lab) for k, lab in LEGEND if k in seen
  ]
  if "F" in seen and any(len(s) > 2 and s[2] in ("FB", "F&B") for row in spans for s in row):
    handles.append(
      Patch(
        facecolor="white",
        edgecolor="black",
        linewidth=1.2,
        label="overlapped F&B (top F, bottom B)",
      )
    )
  if "other" in seen:
    handles.append(Patch(facecolor=OTHER, edgecolor="black", label="other"))
  handles.append(Patch(facecolor=IDLE, edgecolor="none", label="idle"))
  if reverse:
    handles.append(
      Patch(facecolor=_shade("#808080", 1), edgecolor="black", label="lighter: reverse direction")
    )
  fig.legend(
    handles=handles,
    loc="lower center",
    ncol=min(len(handles), 4),
    fontsize=8,
    frameon=False,
    bbox_to_anchor=(0.5, 0.0),
  )
  fig.tight_layout(rect=(0.0, 0.08 + 0.3 / max(pp, 1), 1.0, 1.0))
  path = os.fspath(path)
  fig.savefig(path, format="png", bbox_inches="tight")
  return path


def timeline_from_tables(tables) -> list[list[tuple]]:
  """Timeline of an :class:`~dsv3_jax.parallel.schedules.OpTables` grid, one tick per box.

  Useful to look at exactly what an SPMD executor will run; NOOP ticks are
  left out (they show as idle).
  """
  from dsv3_jax.parallel.schedules import CODE_KINDS

  rows = []
  for r in range(tables.pp):
    row = []
    for t in range(tables.T):
      kind = CODE_KINDS[int(tables.kind[r, t])]
      if kind == "NOOP":
        continue
      if kind == "FB":
        mb = (int(tables.mb[r, t]), int(tables.mb2[r, t]))
        direction = (int(tables.direction[r, t]), int(tables.direction2[r, t]))
      else:
        mb, direction = int(tables.mb[r, t]), int(tables.direction[r, t])
      row.append((float(t), float(t + 1), kind, mb, direction))
    rows.append(row)
  return rows


def timeline_stats(timelines: Sequence[Sequence[Sequence[Any]]]) -> dict[str, Any]:
  """Makespan, per-rank busy time and bubble of any timeline (simulated or measured).

  ``makespan`` runs from the earliest start over all ranks to the latest end;
  ``bubble[r] = makespan - busy[r]``, the same definition as ``simulate`` uses,
  so measured runs can be compared with the simulator and the paper's formulas.
  """
  starts = [s[0] for row in timelines for s in row]
  ends = [s[1] for row in timelines for s in row]
  makespan = (max(ends) - min(starts)) if starts else 0.0
  busy = [float(sum(s[1] - s[0] for s in row)) for row in timelines]
  return {"makespan": float(makespan), "busy": busy, "bubble": [float(makespan) - b for b in busy]}
