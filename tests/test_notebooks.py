"""Executes every notebook under colab/ in its quick setting (QUICK = True is the default)."""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))


# Minutes each even in their quick setting; what they show is also covered by the default
# suite's unit tests (tests/train/test_ablations.py, tests/parallel/).
SLOW = {"ablations.ipynb", "parallelism.ipynb"}


@pytest.mark.parametrize(
  "path",
  [
    pytest.param(p, marks=pytest.mark.slow) if os.path.basename(p) in SLOW else p for p in NOTEBOOKS
  ],
  ids=[os.path.basename(p) for p in NOTEBOOKS],
)
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}
  )
  client.execute()
  errors = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if o.get("output_type") == "error"
  ]
  assert not errors, errors
