"""The house rules of the import graph, checked from the source (no imports executed).

* No import cycles between `dsv3_jax` modules (function-local imports count too).
* `dsv3_jax.layers` sits below everything that decides where or how it runs: it never
  imports `parallel`, `train`, `inference` or `serving`.
* Tests never import an `experiments` binary; binaries stay thin.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
ABOVE_LAYERS = ("parallel", "train", "inference", "serving")


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _imports(path: pathlib.Path, name: str) -> set[str]:
  deps = set()
  package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      deps |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
      deps.add(base)
      deps |= {f"{base}.{a.name}" for a in node.names}
  return deps


def _graph() -> dict[str, set[str]]:
  files = {_module_name(p): p for p in (ROOT / "dsv3_jax").rglob("*.py")}
  graph = {}
  for name, path in files.items():
    deps = _imports(path, name)
    graph[name] = {d for d in deps if d in files and d != name and not name.startswith(d + ".")}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  graph = _graph()
  assert len(graph) > 40  # the walk found the package
  assert _cycles(graph) == []


def test_layers_never_import_what_runs_them():
  bad = [
    (m, d)
    for m, deps in _graph().items()
    if m.startswith("dsv3_jax.layers")
    for d in deps
    if any(d.startswith(f"dsv3_jax.{p}") for p in ABOVE_LAYERS)
  ]
  assert bad == []


def test_a_cycle_would_be_found():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_tests_import_no_binary_and_binaries_stay_thin():
  for path in (ROOT / "tests").rglob("*.py"):
    deps = _imports(path, _module_name(path))
    assert not any(d == "experiments" or d.startswith("experiments.") for d in deps), path
  long = {
    p.name: n
    for p in (ROOT / "experiments").glob("*.py")
    if (n := len(p.read_text().splitlines())) > 120
  }
  assert long == {}
