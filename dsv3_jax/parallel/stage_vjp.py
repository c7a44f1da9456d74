"""One pipeline stage cut into its F, B, W and BW programs, from one traced VJP.

A pipeline schedule needs four things from a stage ``outs, aux = f(params, x, consts)``:

* ``F``  the forward, keeping the residuals R1 the backward needs;
* ``BW`` the full backward: ``(R1, d outs) -> (d params, dx)``;
* ``B``  the input-gradient half: ``(R1, d outs) -> (dx, R2)``, where R2 is what the
  weight gradient still needs (typically the output cotangent of every matmul);
  weight gradients that need nothing deferred (norm scales, an embedding's
  scatter-add) come out of ``B`` too, rather than being carried to ``W``;
* ``W``  the weight-gradient half, run later: ``(R1, R2) -> d params``.

``F`` and ``BW`` are ``jax.vjp``'s own split: the forward returns the VJP closure,
whose leaves are the residuals.  Of those, the ones that are parameters or
constants are passed again at backward time and the ones computed from
parameters and constants alone (weight transposes, say) are recomputed there;
only what depends on the micro-batch (activations, routing) is stored.

``B``/``W`` cut the backward's jaxpr with JAX's partial evaluator (the machinery
behind ``jax.linearize`` and remat): the residuals that the input gradient never
reads -- the matmul inputs that only a weight gradient ``dW = x^T dy`` uses -- are
marked unknown, so the known part computes dx and every intermediate cotangent
and the unknown part is just the weight-gradient work.  Scans (stacked layers),
conds and custom VJPs are split by JAX's own rules, without touching the model:
``B`` repeats no forward work (only values made from parameters alone, which the
full backward computes too) and ``W`` only weight-gradient work.  Values of
``B`` that ``W`` needs and that come from parameters alone are recomputed by
``W``; what ``W`` never reads is dropped.  ``B`` then ``W`` equals ``BW`` equals
``jax.vjp`` (tests check it).

``FB`` (DualPipe's overlapped pair) runs ``F`` of one micro-batch and ``BW`` of another.
Both programs are cut around their one top-level scan (the stage's layers) and the two
scans run as one loop: step ``i`` holds forward layer ``i`` and backward layer ``n-1-i``,
each with its attention, dispatch, MLP and combine, and no data path between them -- the
report's chunk pairing (§3.2.1, Figure 4) left to the compiler's scheduler.

One cost: where a backward ``cond`` (the routed experts' overflow pass) mixes
known and unknown values, JAX's partial evaluation passes the known branch
values to ``W`` as per-layer residuals, so for the MoE layers ``W`` reads extra
buffers and ``B + W`` can cost more than ``BW``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax._src.interpreters import partial_eval as pe  # partial_eval_jaxpr_nounits_fwd
from jax.extend import core as jcore


def _as_fun(closed):
  return jcore.jaxpr_as_fun(closed)


class _ScanCut:
  """A jaxpr cut around its one top-level ``scan`` (a stage's stacked layers): the
  equations before it, the scan, the equations after.  ``ok`` is False when the jaxpr
  has no top-level scan or more than one."""

  def __init__(self, closed):
    jaxpr = closed.jaxpr
    at = [i for i, e in enumerate(jaxpr.eqns) if e.primitive.name == "scan"]
    self.ok = len(at) == 1 and not closed.consts
    if not self.ok:
      return
    j = at[0]
    self.scan = scan = jaxpr.eqns[j]
    self.length, self.reverse = scan.params["length"], scan.params["reverse"]
    defined = set(jaxpr.invars) | {v for e in jaxpr.eqns[:j] for v in e.outvars}
    live = {}  # vars made before the scan that the scan or later equations read, in order
    for v in [v for e in jaxpr.eqns[j:] for v in e.invars] + list(jaxpr.outvars):
      if isinstance(v, jcore.Var) and v in defined:
        live.setdefault(v, None)
    self.live = list(live)
    fx = jaxpr.effects
    self.pre = jcore.ClosedJaxpr(jcore.Jaxpr([], jaxpr.invars, self.live, jaxpr.eqns[:j], fx), ())
    self.post = jcore.ClosedJaxpr(
      jcore.Jaxpr([], self.live + list(scan.outvars), jaxpr.outvars, jaxpr.eqns[j + 1 :], fx),
      (),
    )

  def scan_inputs(self, live_vals) -> tuple[list, list, list]:
    """``(consts, initial carry, xs)`` of the scan from the values of ``live``."""
    env = dict(zip(self.live, live_vals))
    ins = [env[v] if isinstance(v, jcore.Var) else v.val for v in self.scan.invars]
    n_c, n_k = self.scan.params["num_consts"], self.scan.params["num_carry"]
    return ins[:n_c], ins[n_c : n_c + n_k], ins[n_c + n_k :]


def _interleaved(
  a: _ScanCut, a_in: list, b: _ScanCut, b_in: list, scopes=("chunk_a", "chunk_b")
) -> tuple[list, list]:
  """Runs two cut jaxprs with their scans fused into one loop: iteration ``i`` runs step
  ``i`` of each (counted from the end for a reverse scan).  Nothing in one program reads the
  other, so inside the loop body a scheduler may overlap either's compute with the other's
  communication.  Returns both programs' outputs, as running each alone would."""
  n = a.length
  sides, init = [], []
  for cut, args in ((a, a_in), (b, b_in)):
    live = _as_fun(cut.pre)(*args)
    consts, carry, xs = cut.scan_inputs(live)
    body = cut.scan.params["jaxpr"]
    # Stacked outputs, filled at each step's index as the scan's own stacking does.
    ys = [jnp.zeros((n, *v.aval.shape), v.aval.dtype) for v in body.jaxpr.outvars[len(carry) :]]
    sides.append(dict(cut=cut, live=live, consts=consts, xs=xs, body=_as_fun(body), n_k=len(carry)))
    init.append((carry, ys))

  def step(state, i):
    out = []
    for side, (carry, ys), scope in zip(sides, state, scopes):
      k = n - 1 - i if side["cut"].reverse else i
      x_k = [jax.lax.dynamic_index_in_dim(x, k, 0, keepdims=False) for x in side["xs"]]
      with jax.named_scope(scope):  # profiles (and tests) tell the two chunks apart
        res = side["body"](*side["consts"], *carry, *x_k)
      n_k = side["n_k"]
      ys = [jax.lax.dynamic_update_index_in_dim(y, r, k, 0) for y, r in zip(ys, res[n_k:])]
      out.append((list(res[:n_k]), ys))
    return out, None

  final, _ = jax.lax.scan(step, init, jnp.arange(n, dtype=jnp.int32))
  return tuple(
    _as_fun(side["cut"].post)(*side["live"], *carry, *ys) for side, (carry, ys) in zip(sides, final)
  )


def _dce(closed, used_outputs=True):
  jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, used_outputs, instantiate=True)
  return jcore.ClosedJaxpr(jaxpr, closed.consts)


def _take(seq: Sequence, mask: Sequence[bool]) -> list:
  return [x for x, m in zip(seq, mask) if m]


def _tainted(jaxpr, sources: Sequence[bool]) -> set:
  """Vars of ``jaxpr`` that depend (conservatively) on the inputs flagged in ``sources``."""
  bad = {v for v, s in zip(jaxpr.invars, sources) if s}
  for eqn in jaxpr.eqns:
    if any(isinstance(v, jcore.Var) and v in bad for v in eqn.invars):
      bad.update(eqn.outvars)
  return bad


def _depends(jaxpr, i: int, n_out: int, sources: Sequence[bool]) -> bool:
  """Whether output ``i`` really depends on a source input (DCE sees into scans and conds)."""
  _, used = pe.dce_jaxpr(jaxpr, [j == i for j in range(n_out)])
  return any(u and s for u, s in zip(used, sources))


class StageVJP:
  """The F / B / W / BW programs of ``fn(params, x, consts) -> (outs, aux)``.

  ``params`` and ``x`` are differentiated, ``consts`` (token ids, router biases,
  the stage index) are not; ``outs`` is the differentiable output (the backward
  takes its cotangent), ``aux`` anything else (loads, metrics).  The example
  arguments fix shapes and dtypes.  ``varying`` flags the const leaves that
  change per micro-batch (default: all); residuals computed from params and the
  other consts alone are recomputed in the backward instead of stored.
  Residuals are flat lists of arrays (``r1_avals`` / ``r2_avals``), so a pipeline
  can keep them in fixed-size buffers indexed by micro-batch.  The backward
  programs must get the same ``params`` and ``consts`` as the forward did.
  """

  def __init__(
    self, fn: Callable, params: Any, x: Any, consts: Any, varying: Sequence[bool] | None = None
  ):
    self.fn = fn
    p_leaves, self.p_tree = jax.tree.flatten(params)
    x_leaves, self.x_tree = jax.tree.flatten(x)
    c_leaves, self.c_tree = jax.tree.flatten(consts)
    n_p, n_x, n_c = len(p_leaves), len(x_leaves), len(c_leaves)
    varying = [True] * n_c if varying is None else list(varying)
    if len(varying) != n_c:
      raise ValueError(f"StageVJP: varying has {len(varying)} flags for {n_c} const leaves")
    cell = {}

    def fwd(*flat):
      p, x_, c = (
        jax.tree.unflatten(t, v)
        for t, v in (
          (self.p_tree, flat[:n_p]),
          (self.x_tree, flat[n_p : n_p + n_x]),
          (self.c_tree, flat[n_p + n_x :]),
        )
      )
      outs, vjp, aux = jax.vjp(lambda pp, xx: fn(pp, xx, c), p, x_, has_aux=True)
      res, cell["vjp"] = jax.tree.flatten(vjp)
      o, cell["o"] = jax.tree.flatten(outs)
      a, cell["a"] = jax.tree.flatten(aux)
      cell["n"] = (len(o), len(a))
      return o + a + res

    spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    closed = jax.make_jaxpr(fwd)(*map(spec, p_leaves + x_leaves + c_leaves))
    self.o_tree, self.a_tree = cell["o"], cell["a"]
    n_o, n_a = cell["n"]
    self._n = (n_p, n_x, n_c, n_o, n_a)
    # Constants captured by the trace become leading inputs, handled like params.
    self._k = list(closed.consts)
    n_k = len(self._k)
    jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
    closed = jcore.ClosedJaxpr(jaxpr, ())
    invars = list(jaxpr.invars)  # [K, P, X, C]
    sources = [False] * (n_k + n_p) + [True] * n_x + varying
    bad = _tainted(jaxpr, sources)
    # Each residual is re-supplied (an input other than x), recomputed or stored.
    self._res = []
    n_out = len(jaxpr.outvars)
    for i, v in enumerate(jaxpr.outvars[n_o + n_a :], start=n_o + n_a):
      if (
        isinstance(v, jcore.Var)
        and v in invars
        and not (n_k + n_p <= invars.index(v) < n_k + n_p + n_x)
      ):
        self._res.append(("input", invars.index(v)))
      elif isinstance(v, jcore.Var) and v in bad and _depends(jaxpr, i, n_out, sources):
        self._res.append(("store", None))
      else:
        self._res.append(("recompute", None))
    kinds = [k for k, _ in self._res]
    keep = [True] * (n_o + n_a) + [k == "store" for k in kinds]
    self._f = _dce(closed, keep)
    self.r1_avals = [v.aval for v, k in zip(jaxpr.outvars[n_o + n_a :], kinds) if k == "store"]
    rec = [False] * (n_o + n_a) + [k == "recompute" for k in kinds]
    rec_jaxpr, self._rec_in = pe.dce_jaxpr(jaxpr, rec)
    self._rec = jcore.ClosedJaxpr(rec_jaxpr, ())

    # The full backward, traced from the VJP closure over all residuals.
    res_avals = [v.aval for v in jaxpr.outvars[n_o + n_a :]]
    n_r = len(res_avals)
    o_avals = [v.aval for v in jaxpr.outvars[:n_o]]

    def bwd(*flat):
      vjp = jax.tree.unflatten(cell["vjp"], flat[:n_r])
      dp, dx = vjp(jax.tree.unflatten(self.o_tree, flat[n_r:]))
      return jax.tree.leaves(dp) + jax.tree.leaves(dx)

    to_spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    bw = jax.make_jaxpr(bwd)(*map(to_spec, res_avals + o_avals))
    self._bw_k = list(bw.consts)
    bw = jcore.ClosedJaxpr(pe.convert_constvars_jaxpr(bw.jaxpr), ())
    self._bw = bw

    # Cut: inside the backward, residuals that dx never reads -> unknown.
    n_bk = len(self._bw_k)
    _, used = pe.dce_jaxpr(bw.jaxpr, [False] * n_p + [True] * n_x)
    used_r = list(used[n_bk : n_bk + n_r])
    self._w_r = [not u for u in used_r]
    self.deferred = any(self._w_r)
    if self.deferred:
      unknowns = [False] * n_bk + self._w_r + [False] * n_o
      fwd_ok = [True] * (n_bk + n_r) + [False] * n_o  # a cotangent W needs is stored
      b_jaxpr, w_jaxpr, out_uk, r2_avals, fwds2 = pe.partial_eval_jaxpr_nounits_fwd(
        bw, unknowns, False, fwd=fwd_ok
      )
      if any(out_uk[n_p:]):
        raise ValueError("StageVJP: the input gradient depends on a weight-only residual")
      # Weight gradients that need no weight-only residual (norm scales, the embedding's
      # scatter) come out of B directly; W computes the rest.
      self._dp_in_w = list(out_uk[:n_p])
      # W reads only what its live equations need (partial evaluation also hands it the
      # inputs of dead primal ops, such as the per-block weight gathers of a custom VJP).
      w_live, self._w_in = pe.dce_jaxpr(w_jaxpr.jaxpr, True)
      self._w = jcore.ClosedJaxpr(w_live, ())
      self._fwds2 = list(fwds2)
      # B's outputs for W that come from params alone (a transposed head kernel, say)
      # are recomputed by W; only what depends on the micro-batch is stored.
      bj = pe.convert_constvars_jaxpr(b_jaxpr.jaxpr)
      self._b_k = list(b_jaxpr.consts)
      n_bbk, n_lead = len(self._b_k), out_uk.count(False)
      known_kinds = _take([k for k, _ in self._res], [not w for w in self._w_r])
      sources = [False] * (n_bbk + n_bk) + [k == "store" for k in known_kinds] + [True] * n_o
      n_bout = len(bj.outvars)
      w_reads = iter([u for u, f in zip(self._w_in, self._fwds2) if f is None])
      self._r2 = [
        "drop"
        if not next(w_reads)
        else "store"
        if _depends(bj, i, n_bout, sources)
        else "recompute"
        for i in range(n_lead, n_bout)
      ]
      keep = [True] * n_lead + [k == "store" for k in self._r2]
      self._b = _dce(jcore.ClosedJaxpr(bj, ()), keep)
      self.r2_avals = _take(list(r2_avals), [k == "store" for k in self._r2])
      rec_jaxpr, self._rec2_in = pe.dce_jaxpr(
        bj, [False] * n_lead + [k == "recompute" for k in self._r2]
      )
      if any(self._rec2_in[n_bbk + n_bk + len(known_kinds) :]):
        raise AssertionError("StageVJP: a recomputed W residual reads a cotangent")
      self._rec2 = jcore.ClosedJaxpr(rec_jaxpr, ())
    else:  # nothing to defer: B is the full backward and W adds nothing
      self._dp_in_w = [False] * n_p
      self._b = self._w = None
      self._fwds2, self.r2_avals, self._r2 = [], [], []
    self._p_avals = [spec(a) for a in p_leaves]
    # FB's interleaving: the forward's layer scan and the backward's, fused into one loop.
    self._f_cut, self._bw_cut = _ScanCut(self._f), _ScanCut(self._bw)
    self.interleaves = (
      self._f_cut.ok and self._bw_cut.ok and self._f_cut.length == self._bw_cut.length
    )

  # ---------------------------------------------------------------- helpers
  def _inputs(self, params, consts, x=None) -> list:
    xs = jax.tree.leaves(x) if x is not None else [None] * self._n[1]
    return self._k + jax.tree.leaves(params) + xs + jax.tree.leaves(consts)

  def _residuals(self, r1, params, consts) -> list:
    """Every residual of the VJP closure: re-supplied, recomputed or stored."""
    inputs = self._inputs(params, consts)
    rec = iter(_as_fun(self._rec)(*_take(inputs, self._rec_in)))
    stored = iter(r1)
    out = []
    for kind, i in self._res:
      out.append(
        inputs[i] if kind == "input" else next(rec) if kind == "recompute" else next(stored)
      )
    return out

  # ---------------------------------------------------------------- programs
  def _f_outputs(self, flat) -> tuple:
    n_o, n_a = self._n[3], self._n[4]
    outs = jax.tree.unflatten(self.o_tree, flat[:n_o])
    aux = jax.tree.unflatten(self.a_tree, flat[n_o : n_o + n_a])
    return outs, aux, list(flat[n_o + n_a :])

  def _bw_inputs(self, r1, params, consts, ct) -> list:
    return [*self._bw_k, *self._residuals(r1, params, consts), *jax.tree.leaves(ct)]

  def _bw_outputs(self, flat) -> tuple:
    n_p = self._n[0]
    return (
      jax.tree.unflatten(self.p_tree, flat[:n_p]),
      jax.tree.unflatten(self.x_tree, flat[n_p:]),
    )

  def forward(self, params, x, consts):
    """``F``: returns ``(outs, aux, r1)``; ``r1`` is the list of residuals to keep."""
    return self._f_outputs(_as_fun(self._f)(*self._inputs(params, consts, x)))

  def backward(self, r1, params, consts, ct):
    """``BW``: the full backward, ``(dparams, dx)``."""
    return self._bw_outputs(_as_fun(self._bw)(*self._bw_inputs(r1, params, consts, ct)))

  def forward_backward(self, f_params, x, f_consts, r1, b_params, b_consts, ct):
    """``FB``: ``F`` of one micro-batch and ``BW`` of another, ``(outs, aux, r1_f, dparams,
    dx)`` -- each as `forward` and `backward` return it.

    When the stage's layers are one scan (``interleaves``), the two run as one loop over
    the layers: step ``i`` runs the forward of layer ``i`` and the backward of layer
    ``n-1-i``.  Each step then holds both chunks' attention, dispatch, MLP and combine
    (arXiv 2412.19437 §3.2.1, Figure 4) with no data path between the chunks, so the
    scheduler may run one chunk's all-to-alls under the other's compute; run one after
    the other, only the first layers of the backward could overlap the forward's last."""
    f_in = self._inputs(f_params, f_consts, x)
    b_in = self._bw_inputs(r1, b_params, b_consts, ct)
    if self.interleaves:
      f_flat, b_flat = _interleaved(
        self._f_cut, f_in, self._bw_cut, b_in, scopes=("forward_chunk", "backward_chunk")
      )
    else:
      f_flat, b_flat = _as_fun(self._f)(*f_in), _as_fun(self._bw)(*b_in)
    return self._f_outputs(f_flat) + self._bw_outputs(b_flat)

  def _params_tree(self, values, in_w: bool):
    """A params tree from the gradient leaves one half computed; zeros elsewhere."""
    it = iter(values)
    leaves = [
      next(it) if w == in_w else jnp.zeros(a.shape, a.dtype)
      for w, a in zip(self._dp_in_w, self._p_avals)
    ]
    return jax.tree.unflatten(self.p_tree, leaves)

  def backward_input(self, r1, params, consts, ct):
    """``B``: ``(dx, dparams_b, r2)``: the input gradient, the weight gradients that need
    nothing deferred (zeros for the others) and the residuals ``W`` needs."""
    if not self.deferred:
      dp, dx = self.backward(r1, params, consts, ct)
      return dx, dp, []
    n_x, n_pb = self._n[1], self._dp_in_w.count(False)
    known = _take(self._residuals(r1, params, consts), [not w for w in self._w_r])
    flat = _as_fun(self._b)(*self._b_k, *self._bw_k, *known, *jax.tree.leaves(ct))
    dp = self._params_tree(flat[:n_pb], in_w=False)
    return jax.tree.unflatten(self.x_tree, flat[n_pb : n_pb + n_x]), dp, list(flat[n_pb + n_x :])

  def backward_weight(self, r1, r2, params, consts):
    """``W``: the rest of the parameter gradient (zeros where ``B`` computed it), from
    ``r1`` (kept since ``F``) and ``r2``."""
    if not self.deferred:
      return self._params_tree([], in_w=True)
    res = self._residuals(r1, params, consts)
    b_known = self._bw_k + _take(res, [not w for w in self._w_r])
    b_in = self._b_k + b_known + [None] * self._n[3]
    rec = iter(_as_fun(self._rec2)(*_take(b_in, self._rec2_in)))
    stored = iter(r2)
    r2_out = iter(
      [next(stored) if k == "store" else next(rec) if k == "recompute" else None for k in self._r2]
    )
    r2_all = [next(r2_out) if f is None else b_known[f] for f in self._fwds2]
    flat = _as_fun(self._w)(*_take(r2_all + _take(res, self._w_r), self._w_in))
    return self._params_tree(flat, in_w=True)

  def residual_bytes(self) -> dict:
    """Bytes of one micro-batch's stored residuals: ``r1`` (F..W) and ``r2`` (B..W)."""
    size = lambda avals: int(sum(a.size * a.dtype.itemsize for a in avals))
    return {"r1": size(self.r1_avals), "r2": size(self.r2_avals)}
