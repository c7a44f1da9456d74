"""Where a compiled step's time goes, by part of the model, from one profiled call.

`time_by_part(hlo_text, call)` runs `call` once under `jax.profiler.trace`, sums the duration
of every event named after an instruction of the compiled program (`compiled.as_text()`),
and files each instruction under a part of the model by the op name JAX recorded for it:
the block's named scopes (`attention`, `moe`, `mlp`: `layers/block.py`; a path component
of the op name in a scanned stack, `jvp(moe)` in unrolled layers), the routed experts'
exact overflow pass (its `overflow` scope inside `moe`), and forward or backward (`jvp(` / `transpose(`
in the op name); instructions outside the differentiated function are the optimizer update
and the step's metrics, and those without an op name were added by XLA (copies).
Control-flow instructions (while, conditional, call) are skipped: their events contain their
bodies' events. The durations are summed over every thread that ran an instruction, so the
shares are of the work done, not of the wall clock.
"""

import collections
import glob
import os
import re
import tempfile

_CONTROL = ("while", "conditional", "call")
# One instruction of `compiled.as_text()`: `[ROOT] %name = shape opcode(operands), ...`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?\b([a-z][\w\-]*)\((.*?)\)(?:, |$)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# The block's named scopes as they appear in an op name: a path component inside a scanned
# stack (`.../closed_call/moe/dot_general`), or wrapped by the transformation that traced it
# when the layers are unrolled (`jvp(moe)/dot_general`, `transpose(jvp(moe))/cond/...`).
_SCOPE = re.compile(r"(?:^|[/(])(attention|moe|mlp|overflow)(?=[/)])")


def parse_instruction(line: str):
  """(name, opcode, operand names, op name) of one HLO instruction line, or None."""
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  name, opcode, operands = m.groups()
  op_name = _OP_NAME.search(line)
  return name, opcode, re.findall(r"%([\w.\-]+)", operands), op_name.group(1) if op_name else ""


def instructions(hlo_text: str) -> dict:
  """{instruction name: (opcode, op name)} of every instruction in an HLO module's text."""
  parsed = (parse_instruction(line) for line in hlo_text.splitlines())
  return {p[0]: (p[1], p[3]) for p in parsed if p is not None}


def part(op_name: str) -> str:
  """The part of a train step an instruction belongs to, from its op name."""
  if not op_name:
    return "unattributed (instructions XLA added, e.g. copies)"
  if "transpose(" in op_name:
    phase = "backward"
  elif "jvp(" in op_name:
    phase = "forward"
  else:
    return "optimizer and metrics"
  scopes = {m.group(1): m.end() for m in _SCOPE.finditer(op_name)}
  if "attention" in scopes:
    scope = "attention"
  elif "moe" in scopes:
    # The expert kernel's overflow pass runs under its own scope; the expert-parallel
    # dispatch's fast/fallback `cond` is not an overflow pass of the kernel.
    scope = "routed experts, overflow pass" if "overflow" in scopes else "MoE"
  elif "mlp" in scopes:
    scope = "dense MLP"
  else:
    scope = "embedding, norms, head, loss"
  return f"{scope} {phase}"


def event_seconds(call) -> dict:
  """{event name: seconds summed over its occurrences and threads} of one profiled `call()`."""
  import jax
  from jax.profiler import ProfileData

  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      call()
    (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    data = ProfileData.from_file(path)
    seconds = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        for event in line.events:
          seconds[event.name] += event.duration_ns * 1e-9
  return dict(seconds)


def time_by_part(hlo_text: str, call) -> dict:
  """{part: seconds} of one profiled `call()` of the program `hlo_text` describes."""
  ops = instructions(hlo_text)
  parts = collections.Counter()
  for name, seconds in event_seconds(call).items():
    if name in ops and ops[name][0] not in _CONTROL:
      parts[part(ops[name][1])] += seconds
  return dict(parts.most_common())


def report(parts: dict) -> list:
  """Table rows (part, share of the profiled work) for a `time_by_part` result."""
  total = sum(parts.values()) or 1.0
  return [(name, f"{100 * s / total:4.1f}%  ({s:.3f} s)") for name, s in parts.items()]
