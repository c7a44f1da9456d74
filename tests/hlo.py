"""Reading the dependency structure of compiled HLO text (`compiled.as_text()`), for the tests
that assert what may overlap: two micro-batches, DualPipe's forward and backward chunks."""

import re

from benchmarks.profile import parse_instruction


def computations(text: str) -> dict:
  """Computation name -> its instruction lines."""
  comps, cur = {}, None
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if m:
      cur = comps.setdefault(m.group(1), [])
    elif line.startswith("}"):
      cur = None
    elif cur is not None and " = " in line:
      cur.append(line.strip())
  return comps


class Graph:
  """One computation's instructions: op kind, operands and `op_name` scope of each."""

  def __init__(self, lines):
    self.ops, self.deps, self.scope = {}, {}, {}
    for line in lines:
      parsed = parse_instruction(line)
      if parsed:
        name, op, self.deps[name], self.scope[name] = parsed
        self.ops[name] = op
    self._memo: dict = {}

  def ancestors(self, n) -> set:
    if n not in self._memo:
      seen, stack = set(), list(self.deps.get(n, ()))
      while stack:
        x = stack.pop()
        if x not in seen:
          seen.add(x)
          stack.extend(self.deps.get(x, ()))
      self._memo[n] = seen
    return self._memo[n]

  def independent(self, a, b) -> bool:
    """No path from one to the other: a scheduler may run them at the same time."""
    return a not in self.ancestors(b) and b not in self.ancestors(a)

  def all_to_alls(self) -> list:
    return [n for n, op in self.ops.items() if op.startswith("all-to-all")]

  def gemms(self, scope: str) -> list:
    """The fusions and dots under a named scope (e.g. "/attention/")."""
    return [n for n, op in self.ops.items() if scope in self.scope[n] and op in ("fusion", "dot")]
