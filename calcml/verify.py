"""Derivative verification against the limit definition (hand-written gradients are checked
at points by :mod:`calcml.check`).

A derivative is called ``"verified"`` only when it was proven exactly: the limit

    lim_{h -> 0} (f(x + h) - f(x)) / h

was computed symbolically (for general ``x``, or one-sidedly at an exact point) and the
difference between that limit and the derivative under test simplified exactly to zero.
SymPy's ``limit`` is treated as a claim, never as a fact: an answer is accepted only when it
is free of the forms SymPy uses when it gives up (``oo*sign(...)`` around a zero in disguise,
``AccumBounds`` where a number was expected, unevaluated ``Limit``), and when it agrees with
high-precision difference quotients computed independently with mpmath.

mpmath difference quotients with shrinking ``h`` (down to 1e-20 at general points and 1e-50
at a given point, in 60 to 90 digit arithmetic) can refute a derivative or support an
``"inconclusive"`` verdict; they never verify.

Every check runs in a worker process (forked from a single-threaded fork server, never from
the caller's process, whose threads may hold locks) with a time budget that holds even when SymPy
never returns: a worker that overruns is killed, and its check is reported
``"inconclusive"`` together with whatever numeric evidence it sent before. Workers are kept
between checks (SymPy's caches stay warm) and independent checks run concurrently.

How a check is decided
----------------------
At general ``x``:

1. numeric evidence at a few rational sample points: a claimed derivative that disagrees
   with converged difference quotients (and with SymPy's own derivative there) is refuted;
2. non-smooth atoms (``Abs``, ``sign``, ``Heaviside``, ``relu``, ``Max``, ``Min``,
   ``Piecewise``) are split into sign cases, each a smooth expression;
3. in each case the limit is computed term by term (the limit of a sum is the sum of the
   limits when these exist), with a term's constant factor taken out and a linear inner
   argument ``u = a*x + c`` substituted (``lim (G(u + a h) - G(u))/h = a * G'(u)``, with
   ``k = a h``), so that one univariate limit serves every parameter of a linear model.
   Logarithms are first split exactly (``log(sigmoid(z)) = z - log(1 + exp(z))``). A
   rational quotient is decided by exact cancellation; otherwise the limit is the
   h-coefficient of the Taylor expansion of ``f(x + h)`` (when SymPy gives a clean
   ``a0 + a1 h + O(h**2)`` with ``a0 = f(x)`` proven), else SymPy's ``limit``, with
   ``b**e`` rewritten as ``exp(e*log(b))`` (which removes the ``x**x`` disguise);
4. the difference between the limit and the derivative under test must simplify to zero
   (after the same exact rewrites on both sides; an identity proven with a compound
   argument replaced by a free symbol holds for the argument too).

At a point ``a``:

1. ``f(a)`` is evaluated exactly; undefined or non-real means not differentiable there;
2. for each side, ``f(a + s t)`` with ``t > 0`` is resolved branch by branch (every
   ``Piecewise`` condition, ``Abs``, ``sign`` ... is decided for small ``t`` from the exact
   value, or the leading term, of its argument), and the one-sided limit is computed
   (Taylor coefficient when ``f(a + s t)`` has one, else SymPy's ``limit``) and compared
   with one-sided difference quotients;
3. infinite, oscillating (``AccumBounds``, confirmed by non-converging quotients), non-real,
   or unequal one-sided limits mean ``"not differentiable"``; equal finite limits are
   compared exactly with the derivative's value at ``a``.
"""

from __future__ import annotations

import atexit
import itertools
import math
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import wait as _wait_for

import mpmath
import numpy as np
import sympy as sp
from sympy.calculus.accumulationbounds import AccumBounds

from .cost import Cost
from .errors import CostError
from .functions import ACTIVATIONS

__all__ = ["Verdict", "Report", "verify_derivative", "verify", "check_gradient", "DEFAULT_TIMEOUT"]

#: Seconds allowed to each check before it is stopped and called inconclusive.
DEFAULT_TIMEOUT = 4.0

STATUSES = ("verified", "refuted", "inconclusive", "not differentiable")


# ======================================================================================
# Verdicts and reports
# ======================================================================================


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check.

    Attributes
    ----------
    name : str
        What was checked, e.g. ``"d/dw0"`` or ``"d/dx |x| at x = 0"``.
    status : str
        ``"verified"``, ``"refuted"``, ``"inconclusive"`` or ``"not differentiable"``.
    method : str
        How it was decided.
    detail : str
        A readable reason; for a refutation, the point and the two values that disagree.
    point : dict or None
        ``{name: value}`` where a refutation or a point check was decided.
    expected, actual : optional
        For a refutation: the limit of the difference quotient (or the exact gradient) and
        the value of the derivative under test.
    """

    name: str
    status: str
    method: str
    detail: str
    point: dict | None = None
    expected: object = None
    actual: object = None

    @property
    def ok(self) -> bool:
        return self.status == "verified"

    def __str__(self):
        return f"{self.name}: {self.status} [{self.method}] {self.detail}"


class Report:
    """A list of verdicts; ``ok`` only if every one is ``"verified"``.

    Iterate over it, index it by position or by verdict name, print it for a table. Its
    truth value is ``ok`` (a report with a refutation is false, however long).
    """

    def __init__(self, verdicts, title: str = ""):
        self._verdicts = tuple(verdicts)
        self.title = title

    @property
    def verdicts(self) -> tuple:
        return self._verdicts

    @property
    def ok(self) -> bool:
        return bool(self._verdicts) and all(v.ok for v in self._verdicts)

    def counts(self) -> dict:
        """``{status: number of verdicts}`` over all four statuses."""
        out = {s: 0 for s in STATUSES}
        for v in self._verdicts:
            out[v.status] += 1
        return out

    def __iter__(self):
        return iter(self._verdicts)

    def __len__(self):
        return len(self._verdicts)

    def __getitem__(self, key):
        if isinstance(key, str):
            for v in self._verdicts:
                if v.name == key:
                    return v
            raise KeyError(key)
        return self._verdicts[key]

    def __bool__(self):
        return self.ok

    def __str__(self):
        head = ("check", "status", "method", "detail")
        rows = [(_cut(v.name, 48), v.status, _cut(v.method, 48), v.detail) for v in self._verdicts]
        widths = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(3)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines = [self.title] if self.title else []
        lines.append(fmt.format(*head).rstrip())
        lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
        lines += [fmt.format(*r).rstrip() for r in rows]
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        lines.append(f"{len(rows)} check{'s' if len(rows) != 1 else ''}: {counts or 'none'}"
                     + ("  -> OK" if self.ok else ""))
        return "\n".join(lines)

    def __repr__(self):
        counts = ", ".join(f"{s}={n}" for s, n in self.counts().items() if n)
        return f"<Report ok={self.ok} {counts}>"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _short(e, n: int = 70) -> str:
    s = sp.sstr(e) if isinstance(e, sp.Basic) else str(e)
    return s if len(s) <= n else s[: n - 3] + "..."


def _fmt_num(v) -> str:
    """A number for a message: exact SymPy numbers as they print, floats to 12 digits."""
    if isinstance(v, sp.Basic):
        return _short(v, 60)
    if isinstance(v, (mpmath.mpf, mpmath.mpc)):
        return mpmath.nstr(v, 12)
    if isinstance(v, float):
        return f"{v:.12g}"
    return str(v)


# ======================================================================================
# Public entry points
# ======================================================================================


@dataclass
class _Spec:
    """One check, as sent to a worker."""

    name: str
    f: sp.Expr
    x: sp.Symbol
    point: dict | None  # {Symbol: exact SymPy number}, or None for general x
    claimed: sp.Expr | None  # derivative under test; None means sympy.diff(f, x)


def _as_expr(e, what: str) -> sp.Expr:
    if isinstance(e, str):
        raise TypeError(
            f"{what} is a string; build it from SymPy objects (calcml never evaluates strings "
            "here; the command line has its own safe parser)"
        )
    try:
        out = sp.sympify(e, strict=True)
    except (sp.SympifyError, TypeError):
        raise TypeError(f"{what} must be a SymPy expression, got {type(e).__name__}") from None
    if not isinstance(out, sp.Expr):
        raise TypeError(f"{what} must be a scalar SymPy expression, got {type(out).__name__}")
    return out


def _real_twins(*exprs) -> dict:
    """Free symbols without a real assumption are replaced by real symbols of the same name."""
    mapping = {}
    for e in exprs:
        for s in e.free_symbols:
            if isinstance(s, sp.Symbol) and not s.is_extended_real and s not in mapping:
                if s.is_extended_real is False:
                    raise CostError(f"symbol {s.name!r} is declared non-real; calcml checks real functions")
                mapping[s] = sp.Symbol(s.name, real=True)
    return mapping


def _exact_number(v, where: str):
    """A point coordinate as an exact SymPy number; a float is read as the decimal it prints as."""
    if isinstance(v, str):
        raise TypeError(f"{where}: a point must be a number, not the string {v!r}")
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{where}: a point must be a number, got {v!r}")
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(float(v)):
            raise ValueError(f"{where}: a point must be finite, got {v!r}")
        fr = Fraction(repr(float(v)))
        return sp.Rational(fr.numerator, fr.denominator)
    if isinstance(v, (int, np.integer)):
        return sp.Integer(int(v))
    if isinstance(v, Fraction):
        return sp.Rational(v.numerator, v.denominator)
    e = _as_expr(v, where)
    if e.free_symbols:
        raise ValueError(f"{where}: a point must be a number, got {e} with free symbols")
    if isinstance(e, sp.Float):
        if e._prec <= 53:
            fr = Fraction(repr(float(e)))
            return sp.Rational(fr.numerator, fr.denominator)
        return sp.Rational(e)  # a high-precision Float: its exact binary value
    if e.has(sp.nan, sp.zoo, sp.oo, -sp.oo) or e.is_extended_real is False:
        raise ValueError(f"{where}: a point must be a finite real number, got {e}")
    return e


def _resolve_point(at, x, free) -> dict:
    by_name = {s.name: s for s in free | {x}}
    if isinstance(at, dict):
        point = {}
        for k, v in at.items():
            if isinstance(k, str):
                name = k
            elif isinstance(k, sp.Symbol):
                name = k.name
            else:
                raise TypeError(f"at: keys must be symbols or their names, got {k!r}")
            if name not in by_name:
                raise ValueError(f"at: {name!r} is not a symbol of the expression")
            point[by_name[name]] = _exact_number(v, f"at[{name!r}]")
        if x not in point:
            raise ValueError(f"at: the point must give a value for {x.name!r}")
        return point
    return {x: _exact_number(at, "at")}


def _check_assumptions(point: dict):
    for s, v in point.items():
        if s.is_positive and v.is_positive is False or s.is_nonnegative and v.is_negative:
            raise ValueError(f"at: {s.name!r} is declared {'positive' if s.is_positive else 'nonnegative'} but the point gives {v}")


def verify_derivative(f, x, at=None, *, derivative=None, timeout: float = DEFAULT_TIMEOUT) -> Report:
    """Check ``d f / d x`` against the limit definition ``lim_{h->0} (f(x+h) - f(x)) / h``.

    Parameters
    ----------
    f : sympy.Expr
        The function. Other free symbols are treated as free real variables.
    x : sympy.Symbol
        The variable.
    at : number, exact SymPy number, or dict, optional
        ``None`` checks the derivative for general ``x``; ``at=2``, ``at=sp.pi/6`` or
        ``at={x: 2, y: 1}`` check it at that point (a float is read as the decimal it
        prints as: ``0.1`` means ``1/10``).
    derivative : sympy.Expr, optional
        The derivative under test (a hand derivation, a table entry). By default SymPy's
        ``diff(f, x)``.
    timeout : float
        Seconds for the check; past it the verdict is ``"inconclusive"``.

    Returns
    -------
    Report
        One :class:`Verdict`; ``report.ok`` is true only if it is ``"verified"``.

    Examples
    --------
    >>> import sympy as sp, calcml as cm
    >>> x = sp.Symbol("x", real=True)
    >>> cm.verify_derivative(sp.sin(x), x, derivative=sp.cos(x))[0].status
    'verified'
    >>> cm.verify_derivative(sp.Abs(x), x, at=0)[0].status
    'not differentiable'
    """
    spec = _make_spec(f, x, at, derivative)
    verdict = _run_specs([spec], timeout)[0]
    return Report([verdict], title=f"verify_derivative: d/d{spec.x.name} {_short(spec.f)}")


def _exact_floats(e):
    """Floats in an expression as exact rationals (``0.1`` as ``1/10``, the decimal it prints
    as), so that a zero test is exact; a float is never trusted to cancel."""
    floats = e.atoms(sp.Float)
    if not floats:
        return e
    return e.xreplace({v: _exact_number(v, "a float in the expression") for v in floats})


def _make_spec(f, x, at=None, derivative=None, name=None) -> _Spec:
    f = _exact_floats(_as_expr(f, "f"))
    if not isinstance(x, sp.Symbol):
        raise TypeError(f"x must be a SymPy Symbol, got {type(x).__name__}")
    d = None if derivative is None else _exact_floats(_as_expr(derivative, "derivative"))
    mapping = _real_twins(f, x, *([d] if d is not None else []))
    if mapping:
        f = f.xreplace(mapping)
        x = mapping.get(x, x)
        d = None if d is None else d.xreplace(mapping)
    for e, what in ((f, "f"), (d, "derivative")):
        if e is not None and e.atoms(sp.Derivative, sp.Integral):
            raise CostError(f"{what} holds an unevaluated Derivative or Integral; call .doit() first")
    point = None
    if at is not None:
        point = _resolve_point(at, x, f.free_symbols | (d.free_symbols if d is not None else set()))
        _check_assumptions(point)
    if name is None:
        name = f"d/d{x.name} {_short(f, 40)}"
        if point is not None:
            name += " at " + ", ".join(f"{s.name} = {sp.sstr(v)}" for s, v in point.items())
    return _Spec(name=name, f=f, x=x, point=point, claimed=d)


def _cost_gradient(cost: Cost, gradient) -> list:
    """The derivative under test for each parameter, in ``cost.params`` order."""
    if gradient is None:
        return list(cost.gradient)
    known = {s.name: s for s in (*cost.params, *cost.data)}
    if isinstance(gradient, dict):
        by_name = {}
        for k, v in gradient.items():
            key = k if isinstance(k, str) else getattr(k, "name", None)
            if key not in cost.param_names:
                raise CostError(f"gradient: {k!r} is not a parameter of the cost")
            by_name[key] = v
        missing = [p for p in cost.param_names if p not in by_name]
        if missing:
            raise CostError(f"gradient: no component given for {', '.join(missing)}")
        items = [by_name[p] for p in cost.param_names]
    else:
        items = list(gradient)
        if len(items) != len(cost.params):
            raise CostError(f"gradient: {len(items)} components given, the cost has {len(cost.params)} parameters")
    out = []
    for i, g in enumerate(items):
        g = _as_expr(g, f"gradient[{cost.param_names[i]!r}]")
        # A symbol spelled like a cost symbol but built without cm.params/cm.data means it.
        mapping = {s: known[s.name] for s in g.free_symbols if s.name in known and s != known[s.name]}
        g = g.xreplace(mapping) if mapping else g
        extra = sorted(s.name for s in g.free_symbols if s.name not in known)
        if extra:
            raise CostError(f"gradient[{cost.param_names[i]!r}] uses {', '.join(extra)}, which the cost does not have")
        out.append(_exact_floats(g))
    return out


def verify(cost: Cost, *, gradient=None, timeout: float = DEFAULT_TIMEOUT) -> Report:
    """Check every partial derivative of a cost against its limit definition.

    Data symbols are free real variables, so a verified partial derivative holds for every
    row, and so for the mean or sum over rows.

    Parameters
    ----------
    cost : Cost
    gradient : sequence or dict, optional
        Derivatives under test, one per parameter (a sequence in ``cost.params`` order, or
        ``{param or name: expr}``); by default the cost's exact ``cost.gradient``.
    timeout : float
        Seconds for each partial derivative.

    Examples
    --------
    >>> import calcml as cm
    >>> w, b = cm.params("w b"); x, y = cm.data("x y")
    >>> cost = cm.Cost((w*x + b - y)**2, params=[w, b], data=[x, y])
    >>> cm.verify(cost).ok
    True
    >>> pred = w*x + b
    >>> r = cm.verify(cost, gradient=[2*x*pred, 2*pred])
    >>> [v.status for v in r]
    ['refuted', 'refuted']
    """
    if not isinstance(cost, Cost):
        raise TypeError(f"verify expects a cm.Cost, got {type(cost).__name__}; use verify_derivative for an expression")
    from .tensor.statement import is_tensor_cost

    if is_tensor_cost(cost):
        if gradient is not None:
            raise TypeError("verify(cost, gradient=...) takes scalar costs; for a tensor cost, check a flat "
                            "gradient function with cm.check_gradient")
        from .tensor.verify import verify_tensor

        return verify_tensor(cost, timeout)
    grads = _cost_gradient(cost, gradient)
    expr = _exact_floats(cost.expr)
    specs = [_Spec(name=f"d/d{p.name}", f=expr, x=p, point=None, claimed=g) for p, g in zip(cost.params, grads)]
    return Report(_run_specs(specs, timeout), title=f"verify: {_short(cost.expr, 60)}")


# ======================================================================================
# Worker pool: forked processes that can be killed, reused between checks
# ======================================================================================

_POOL_LOCK = threading.Lock()
_IDLE: list = []


_CONTEXT = None


def _context():
    """Workers start from a fork server where there is one (Linux, macOS): a single-threaded
    process that imported calcml.verify (so SymPy) once and forks each worker. A fork of this
    process itself would copy it mid-flight: the kernels' thread pool, Numba's and the BLAS's
    threads may hold locks that no thread of the child would ever release (a hang). Elsewhere:
    spawn."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["calcml.verify"])
        else:
            ctx = multiprocessing.get_context("spawn")
        _CONTEXT = ctx
    return _CONTEXT


def _default_jobs() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


class _Worker:
    def __init__(self):
        ctx = _context()
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, None), daemon=True)
        self.proc.start()
        child.close()

    def alive(self) -> bool:
        return self.proc.is_alive() and not self.conn.closed

    def stop(self):
        try:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=2)
        finally:
            self.conn.close()


def _worker_main(conn, job):
    """The loop of a worker process: run a check, send its messages, wait for the next."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    except ValueError:
        pass
    while True:
        if job is None:
            try:
                job = conn.recv()
            except EOFError:
                os._exit(0)
            except Exception as exc:  # cannot unpickle: the parent forks a fresh worker
                conn.send(("reject", None, repr(exc)))
                os._exit(0)
        tid, spec = job
        job = None

        def emit(kind, payload, _tid=tid):
            try:
                try:
                    conn.send((kind, _tid, payload))
                except (pickle.PicklingError, TypeError, AttributeError):
                    conn.send((kind, _tid, _plain(payload)))
            except OSError:  # the parent is gone
                os._exit(0)

        try:
            emit("final", _check(spec, emit))
        except BaseException as exc:  # any failure is an inconclusive verdict, never a crash
            emit("error", f"{type(exc).__name__}: {exc}")


def _plain(payload):
    """A payload that pickles for certain (exact values become strings)."""
    if isinstance(payload, Verdict):
        return Verdict(payload.name, payload.status, payload.method, payload.detail,
                       None if payload.point is None else {k: str(v) for k, v in payload.point.items()},
                       None if payload.expected is None else str(payload.expected),
                       None if payload.actual is None else str(payload.actual))
    if isinstance(payload, dict):
        return {k: _plain(v) for k, v in payload.items()}
    return payload if isinstance(payload, (str, float, int, type(None))) else str(payload)


def _shutdown_pool():
    while _IDLE:
        _IDLE.pop().stop()


atexit.register(_shutdown_pool)


def _run_specs(specs, timeout: float, jobs: int | None = None) -> list:
    """Run checks concurrently in worker processes; each gets ``timeout`` seconds."""
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    jobs = jobs or _default_jobs()
    results: list = [None] * len(specs)
    evidence: list = [None] * len(specs)
    with _POOL_LOCK:
        queue = deque(range(len(specs)))
        active: dict = {}  # conn -> [worker, tid, deadline]
        try:
            _schedule(specs, timeout, jobs, queue, active, results, evidence)
        finally:  # Ctrl-C or an error here: no worker is left computing
            for w, _, _ in active.values():
                w.stop()
    return results


def _schedule(specs, timeout, jobs, queue, active, results, evidence):
    """Hand checks to workers, collect their messages, stop the ones past their deadline."""
    while queue or active:
        while queue and len(active) < jobs:
            tid = queue.popleft()
            try:
                w = _dispatch(tid, specs[tid])
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                results[tid] = Verdict(specs[tid].name, "inconclusive", "error",
                                       f"the check could not be handed to a worker process: it does not pickle ({exc})")
                continue
            active[w.conn] = [w, tid, time.monotonic() + timeout]
        if not active:
            continue
        next_deadline = min(entry[2] for entry in active.values())
        ready = _wait_for(list(active), timeout=max(0.0, next_deadline - time.monotonic()))
        for conn in ready:
            w, tid, _ = active[conn]
            done, retry = _drain(w, tid, specs[tid], results, evidence)
            if retry:  # the worker could not read the check (it arrives pickled): say so
                del active[conn]
                w.stop()
                results[tid] = Verdict(specs[tid].name, "inconclusive", "error",
                                       "the check could not be handed to a worker process (it did not unpickle)")
            elif done:
                del active[conn]
                if w.alive() and len(_IDLE) < jobs:
                    _IDLE.append(w)
                else:
                    w.stop()
        now = time.monotonic()
        for conn, (w, tid, deadline) in list(active.items()):
            if now >= deadline:
                del active[conn]
                w.stop()
                results[tid] = _timeout_verdict(specs[tid], timeout, evidence[tid])


def _dispatch(tid, spec) -> _Worker:
    while _IDLE:
        w = _IDLE.pop()
        if not w.alive():
            w.stop()
            continue
        try:
            w.conn.send((tid, spec))
            return w
        except OSError:  # the worker is gone: a fresh one
            w.stop()
            break
        except (pickle.PicklingError, TypeError, AttributeError):
            _IDLE.append(w)  # the worker is fine; the check cannot travel (the caller says so)
            raise
    w = _Worker()
    try:
        w.conn.send((tid, spec))
    except BaseException:
        w.stop()
        raise
    return w


def _drain(w: _Worker, tid, spec, results, evidence):
    """Read what a worker sent. Returns (finished, needs_a_fresh_worker)."""
    try:
        while w.conn.poll():
            kind, mtid, payload = w.conn.recv()
            if kind == "reject":
                return False, True
            if mtid != tid:
                continue
            if kind == "evidence":
                evidence[tid] = payload
            elif kind == "final":
                results[tid] = payload
                return True, False
            elif kind == "error":
                results[tid] = Verdict(spec.name, "inconclusive", "error", f"the check failed: {payload}")
                return True, False
    except (EOFError, OSError, pickle.UnpicklingError) as exc:
        w.stop()
        results[tid] = Verdict(spec.name, "inconclusive", "error", f"the worker process ended unexpectedly ({exc!r})")
        return True, False
    return False, False


def _timeout_verdict(spec, timeout, evidence) -> Verdict:
    detail = f"no exact proof within the time budget of {timeout:g} s"
    if evidence:
        refutation = evidence.get("refutation")
        if refutation is not None:
            return refutation
        if evidence.get("summary"):
            detail += f"; numeric evidence: {evidence['summary']}"
    return Verdict(spec.name, "inconclusive", "time budget", detail)


# ======================================================================================
# High-precision evaluation (mpmath), for evidence only
# ======================================================================================

mp = mpmath.mp


class _Undefined(Exception):
    """The expression has no finite value at this point."""


def _acot(z):
    return mp.pi / 2 if z == 0 else mp.atan(1 / z)


def _heaviside(z, h0=None):
    if z > 0:
        return mp.mpf(1)
    if z < 0:
        return mp.mpf(0)
    return mp.mpf(0.5) if h0 is None else h0


#: One-to-one functions: SymPy class -> mpmath function, following SymPy's conventions.
_MP_FUNCS = {
    sp.exp: mp.exp, sp.log: mp.log,
    sp.sin: mp.sin, sp.cos: mp.cos, sp.tan: mp.tan, sp.cot: mp.cot, sp.sec: mp.sec, sp.csc: mp.csc,
    sp.asin: mp.asin, sp.acos: mp.acos, sp.atan: mp.atan, sp.acot: _acot,
    sp.asec: lambda z: mp.acos(1 / z), sp.acsc: lambda z: mp.asin(1 / z),
    sp.sinh: mp.sinh, sp.cosh: mp.cosh, sp.tanh: mp.tanh, sp.coth: mp.coth, sp.sech: mp.sech, sp.csch: mp.csch,
    sp.asinh: mp.asinh, sp.acosh: mp.acosh, sp.atanh: mp.atanh,
    sp.acoth: lambda z: mp.atanh(1 / z), sp.asech: lambda z: mp.acosh(1 / z), sp.acsch: lambda z: mp.asinh(1 / z),
    sp.erf: mp.erf, sp.erfc: mp.erfc, sp.gamma: mp.gamma, sp.loggamma: mp.loggamma,
    sp.Abs: abs, sp.sign: lambda z: mp.mpf(0) if z == 0 else z / abs(z),
    sp.sinc: lambda z: mp.mpf(1) if z == 0 else mp.sin(z) / z,
    sp.Heaviside: _heaviside,
    sp.DiracDelta: lambda z, *k: mp.mpf(0) if z != 0 else mp.inf,
    sp.floor: lambda z: mp.floor(_real(z)), sp.ceiling: lambda z: mp.ceil(_real(z)),
}

# calcml's activations: each class's own high-precision form (calcml/functions.py)
_MP_FUNCS.update({cls: cls._mpmath for cls in ACTIVATIONS})

_MP_CONSTANTS = {sp.pi: lambda: mp.pi, sp.E: lambda: mp.e, sp.EulerGamma: lambda: mp.euler,
                 sp.GoldenRatio: lambda: mp.phi, sp.Catalan: lambda: mp.catalan}


def _real(v):
    if isinstance(v, mpmath.mpc):
        if v.imag != 0:
            raise _Undefined("a comparison of a non-real value")
        return v.real
    return v


def _mp_eval(expr, env: dict):
    """Evaluate a SymPy expression with mpmath at the current precision."""
    memo: dict = {}

    def ev(e):
        v = memo.get(e)
        if v is None:
            v = _mp_node(e, ev, env)
            memo[e] = v
        return v

    v = ev(expr)
    if not mp.isfinite(v):
        raise _Undefined(f"{expr} is not finite here")
    return v


def _mp_node(e, ev, env):
    if e.is_Symbol:
        try:
            return env[e]
        except KeyError:
            raise _Undefined(f"no value for {e}") from None
    if e.is_Integer:
        return mp.mpf(int(e))
    if e.is_Rational:
        return mp.mpf(int(e.p)) / int(e.q)
    if e.is_Float:
        return mp.mpf(e._mpf_)
    if e is sp.I:
        return mp.mpc(0, 1)
    if e in _MP_CONSTANTS:
        return _MP_CONSTANTS[e]()
    if e.has(sp.nan, sp.zoo, sp.oo, -sp.oo) and e.is_Atom:
        raise _Undefined(f"{e}")
    try:
        if e.is_Add:
            return mp.fsum(ev(a) for a in e.args)
        if e.is_Mul:
            return mp.fprod(ev(a) for a in e.args)
        if e.is_Pow:
            b = ev(e.base)
            if e.exp.is_Integer:
                n = int(e.exp)
                if n < 0 and b == 0:
                    raise _Undefined("division by zero")
                return b ** n
            if e.exp == sp.S.Half:
                return mp.sqrt(b)
            x = ev(e.exp)
            if b == 0:
                if _real(x) > 0:
                    return mp.mpf(0)
                raise _Undefined("0 to a non-positive power")
            return mp.power(b, x)
        if isinstance(e, sp.Piecewise):
            for expr_i, cond in e.args:
                if _mp_truth(cond, ev):
                    return ev(expr_i)
            raise _Undefined("no Piecewise branch applies")
        if isinstance(e, (sp.Max, sp.Min)):
            vals = [_real(ev(a)) for a in e.args]
            return max(vals) if isinstance(e, sp.Max) else min(vals)
        fn = _MP_FUNCS.get(type(e))
        if fn is not None:
            v = fn(*[ev(a) for a in e.args])
        else:
            v = _evalf_fallback(e, ev)
    except (ZeroDivisionError, ValueError, OverflowError) as exc:
        raise _Undefined(str(exc)) from None
    if not mp.isfinite(v):
        raise _Undefined(f"{type(e).__name__} is not finite here")
    return v


def _evalf_fallback(e, ev):
    """A function without a table entry: let SymPy's evalf evaluate it at numeric arguments."""
    if not isinstance(e, sp.Function):
        raise _Undefined(f"cannot evaluate {type(e).__name__}")
    args = []
    for a in e.args:
        v = ev(a)
        if isinstance(v, mpmath.mpc):
            args.append(sp.Float(v.real, mp.dps) + sp.I * sp.Float(v.imag, mp.dps))
        else:
            args.append(sp.Float(v, mp.dps))
    r = e.func(*args).evalf(mp.dps)
    re, im = r.as_real_imag()
    if not (re.is_Number and im.is_Number) or re.has(sp.nan, sp.zoo) or im.has(sp.nan, sp.zoo):
        raise _Undefined(f"{type(e).__name__} does not evaluate here")
    return mp.mpf(re) if im == 0 else mp.mpc(re, im)


def _mp_truth(cond, ev) -> bool:
    if cond is sp.true:
        return True
    if cond is sp.false:
        return False
    if isinstance(cond, sp.And):
        return all(_mp_truth(c, ev) for c in cond.args)
    if isinstance(cond, sp.Or):
        return any(_mp_truth(c, ev) for c in cond.args)
    if isinstance(cond, sp.Not):
        return not _mp_truth(cond.args[0], ev)
    if isinstance(cond, sp.core.relational.Relational):
        a, b = _real(ev(cond.lhs)), _real(ev(cond.rhs))
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[cond.rel_op]
    raise _Undefined(f"cannot decide the condition {cond}")


def _mp_real(expr, env):
    """A real value, or ``_Undefined`` (also for a value with a non-negligible imaginary part)."""
    v = _mp_eval(expr, env)
    if isinstance(v, mpmath.mpc):
        if abs(v.imag) > mpmath.mpf(10) ** (10 - mp.dps) * (1 + abs(v.real)):
            raise _NotReal(f"{v}")
        v = v.real
    return v


class _NotReal(_Undefined):
    """The expression is complex here."""


# -- difference quotients --------------------------------------------------------------

_GENERAL_KS = (6, 8, 10, 12, 14, 16, 18, 20)
_POINT_KS = (3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 25, 30, 40, 50)


@dataclass
class _Side:
    """One-sided difference quotients q(h) for h = 10**-k, k increasing."""

    qs: list
    kind: str = "real"  # "real", "complex" (f non-real on this side), "undefined"

    def scale(self):
        return max(mpmath.mpf(1), abs(self.qs[-1]))

    def stable(self) -> bool:
        """Converged: the last three quotients agree closely."""
        if self.kind != "real" or len(self.qs) < 3:
            return False
        s = self.scale()
        return abs(self.qs[-1] - self.qs[-2]) <= 1e-12 * s and abs(self.qs[-2] - self.qs[-3]) <= 1e-9 * s

    def value(self):
        return self.qs[-1]

    def supports_finite(self, L) -> bool:
        if self.kind != "real" or len(self.qs) < 4:
            return False
        s = max(mpmath.mpf(1), abs(L))
        errs = [abs(q - L) for q in self.qs[-4:]]
        if errs[-1] <= 1e-6 * s:
            return True
        return all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:])) and errs[-1] <= 1e-3 * s

    def supports_infinite(self, sign: int) -> bool:
        if self.kind != "real" or len(self.qs) < 6:
            return False
        tail = self.qs[-5:]
        if any(q * sign <= 0 for q in tail):
            return False
        mags = [abs(q) for q in tail]
        return all(b > a for a, b in zip(mags, mags[1:])) and mags[-1] > 20 and mags[-1] > 10 * abs(self.qs[0])

    def oscillates(self) -> bool:
        if self.kind != "real" or len(self.qs) < 6:
            return False
        tail = self.qs[-6:]
        spread = max(tail) - min(tail)
        rising = all(b >= a for a, b in zip(tail, tail[1:]))
        falling = all(b <= a for a, b in zip(tail, tail[1:]))
        return spread > 1e-3 * max(mpmath.mpf(1), max(abs(q) for q in tail)) and not (rising or falling)


def _side_quotients(f, x, a, env, sign, ks) -> _Side:
    """q(h) = (f(a + s h) - f(a)) / (s h) for h = 10**-k, at an exact point.

    Each ladder is computed at two working precisions (with room for the cancellation of
    squares of h); where the two disagree the digits are not trustworthy and the side is
    marked ``"unreliable"``, which neither refutes nor supports anything.
    """
    base = 30 + 2 * max(ks)
    runs = []
    for dps in (base, base + 40):
        with mp.workdps(dps):
            menv = {s: _mp_eval(v, {}) for s, v in env.items()}
            runs.append(_ladder(f, x, _mp_eval(a, {}), menv, sign, ks))
    lo, hi = runs
    if lo.kind != hi.kind or len(lo.qs) != len(hi.qs):
        return _Side(hi.qs, "unreliable")
    for ql, qh in zip(lo.qs, hi.qs):
        if abs(ql - qh) > 1e-15 * max(mpmath.mpf(1), abs(qh)):
            return _Side(hi.qs, "unreliable")
    return hi


def _ladder(f, x, a, env, sign, ks) -> _Side:
    fa = _mp_real(f, {**env, x: a})
    qs = []
    for k in ks:
        h = mpmath.mpf(10) ** (-k)
        try:
            v = _mp_real(f, {**env, x: a + sign * h})
        except _NotReal:
            return _Side(qs, "complex")
        except _Undefined:
            return _Side(qs, "undefined")
        qs.append((v - fa) / (sign * h))
    return _Side(qs)


#: Sample coordinates: rationals away from the usual special points (0, +-1, +-pi/2 ...).
_SAMPLES = (
    sp.Rational(7, 10), sp.Rational(23, 10), sp.Rational(-3, 5), sp.Rational(13, 10), sp.Rational(1, 3),
    sp.Rational(-17, 10), sp.Rational(31, 10), sp.Rational(11, 20), sp.Rational(-7, 3), sp.Rational(9, 4),
    sp.Rational(3, 8), sp.Rational(-1, 7), sp.Rational(5, 3), sp.Rational(43, 10), sp.Rational(-29, 10),
    sp.Rational(17, 20),
)


def _sample_points(symbols, trials: int = 16):
    syms = sorted(symbols, key=lambda s: s.name)
    n = len(_SAMPLES)
    for i in range(trials):
        yield {s: _SAMPLES[(i + 5 * j) % n] for j, s in enumerate(syms)}


def _close(a, b, rel) -> bool:
    return abs(a - b) <= rel * max(mpmath.mpf(1), abs(a), abs(b))


@dataclass
class _Numeric:
    """Numeric evidence: agreeing points, a refutation, or a conflict to report."""

    agree: int = 0
    digits: float = 0.0
    refutation: Verdict | None = None
    conflict: str = ""
    tried: int = 0

    def summary(self) -> str:
        if self.conflict:
            return self.conflict
        if self.agree:
            return (f"difference quotients agree with the derivative at {self.agree} sample point"
                    f"{'s' if self.agree > 1 else ''} (to {self.digits:.0f} digits)")
        return "no sample point where the function is real and smooth was found"


def _point_repr(env: dict) -> dict:
    return {s.name: v for s, v in sorted(env.items(), key=lambda kv: kv[0].name)}


def _point_text(env: dict) -> str:
    return ", ".join(f"{s.name} = {sp.sstr(v)}" for s, v in sorted(env.items(), key=lambda kv: kv[0].name))


def _refutation(name, method, env, v, dv, extra="") -> Verdict:
    rel = abs(v - dv) / max(abs(v), abs(dv), mpmath.mpf(10) ** -30)
    detail = (f"at {_point_text(env)}: the limit of the difference quotient is {_fmt_num(v)}, "
              f"the derivative under test gives {_fmt_num(dv)} (relative error {mpmath.nstr(rel, 3)}){extra}")
    return Verdict(name, "refuted", method, detail, _point_repr(env), float(v) if isinstance(v, mpmath.mpf) else v,
                   float(dv) if isinstance(dv, mpmath.mpf) else dv)


def _numeric_general(spec, f, x, d, exact, want: int = 3) -> _Numeric:
    """Difference quotients at sample points; refute when they clearly disagree with ``d``."""
    out = _Numeric()
    symbols = f.free_symbols | d.free_symbols | {x}
    digits = []
    for env in _sample_points(symbols):
        if out.agree >= want or out.tried >= len(_SAMPLES):
            break
        out.tried += 1
        others = {s: v for s, v in env.items() if s != x}
        try:
            right = _side_quotients(f, x, env[x], others, +1, _GENERAL_KS)
            left = _side_quotients(f, x, env[x], others, -1, _GENERAL_KS)
        except _Undefined:
            continue
        with mp.workdps(60):
            menv = {s: _mp_eval(v, {}) for s, v in others.items()}
            a = _mp_eval(env[x], {})
            if not (right.stable() and left.stable()) or not _close(right.value(), left.value(), 1e-9):
                continue
            v = right.value()
            try:
                dv = _mp_real(d, {**menv, x: a})
            except _NotReal:
                dv = _mp_eval(d, {**menv, x: a})
            except _Undefined:
                continue
            ev = None
            if exact is not d:
                try:
                    ev = _mp_real(exact, {**menv, x: a})
                except _Undefined:
                    ev = None
            noise = abs(right.qs[-1] - right.qs[-3]) + abs(left.qs[-1] - left.qs[-3])
            if abs(v - dv) > 1e-6 * max(mpmath.mpf(1), abs(v), abs(dv)) + 100 * noise:
                if ev is not None and not _close(ev, v, 1e-8):
                    out.conflict = (f"at {_point_text(env)} difference quotients give {_fmt_num(v)} but SymPy's "
                                    f"derivative gives {_fmt_num(ev)}")
                    continue
                out.refutation = _refutation(spec.name, "mpmath difference quotients", env, v, dv,
                                             "" if ev is None else "; SymPy's exact derivative agrees with the limit")
                return out
            out.agree += 1
            err = abs(v - dv) / max(mpmath.mpf(1), abs(v))
            digits.append(float(-mpmath.log10(err)) if err > 0 else 30.0)
    out.digits = min(digits) if digits else 0.0
    return out


# ======================================================================================
# Symbolic machinery (runs in the worker)
# ======================================================================================

_H = sp.Dummy("h", real=True)
_T = sp.Dummy("t", positive=True)
_U = sp.Dummy("u", real=True)
_K = sp.Dummy("k", real=True)


class _Undecided(Exception):
    """A symbolic step could not decide; the check becomes inconclusive with this reason."""


_KINKED = tuple(cls for cls in ACTIVATIONS if not cls.smooth)  # relu
_SMOOTH_ACTIVATIONS = tuple(cls for cls in ACTIVATIONS if cls.smooth)  # sigmoid, softplus
_SIGNED = (sp.Abs, sp.sign, sp.Heaviside, *_KINKED)
_NONSMOOTH = (sp.Abs, sp.sign, sp.Heaviside, *_KINKED, sp.Max, sp.Min, sp.Piecewise, sp.DiracDelta)
_UNSUPPORTED = (sp.floor, sp.ceiling, sp.frac, sp.Mod)
_GIVE_UP = (sp.Limit, sp.Order, AccumBounds, sp.Derivative, sp.Integral, sp.Subs)


def _up_to_sign(g):
    """(canonical, +-1) with ``g == flip * canonical``: ``x - 1`` and ``1 - x`` share one form."""
    if g.could_extract_minus_sign():
        return -g, -1
    return g, 1


def _canon(g):
    """A sign key: ``g`` up to a positive numeric factor: (canonical, +-1) with ``sign(g) == flip * sign(canonical)``.

    ``99*x/100`` and ``x`` are one key, so are ``1 - x`` and ``x - 1`` (with opposite flips).
    """
    if g.is_Add or g.is_Mul:
        content, prim = g.as_content_primitive()
        if content.is_positive and prim != g:
            g = prim
    if g.is_Mul:
        coeff, rest = g.as_coeff_Mul()
        if coeff.is_Rational and coeff != 0 and rest != 1:
            g = rest if coeff > 0 else -rest
    if g.could_extract_minus_sign():
        return -g, -1
    return g, 1


def _elementary(e):
    """The smooth activations (sigmoid, softplus) in elementary form (SymPy's limit and
    simplify know exp and log)."""
    if not e.has(*_SMOOTH_ACTIVATIONS):
        return e
    return e.replace(lambda n: isinstance(n, _SMOOTH_ACTIVATIONS), lambda n: type(n)._elementary(n.args[0]))


def _prepare(e, var):
    """Forms SymPy's limit handles soundly: activations to exp/log, ``b**e`` with ``var`` in
    the exponent to ``exp(e*log(b))`` (SymPy's definition of the principal power)."""
    e = _elementary(e)
    return e.replace(lambda n: n.is_Pow and n.exp.has(var), lambda n: sp.exp(n.exp * sp.log(n.base)))


def _clean(L, source) -> bool:
    """Is a limit SymPy returned usable as a finite answer?"""
    if not isinstance(L, sp.Expr) or L.has(sp.oo, -sp.oo, sp.zoo, sp.nan, _H, _T, _K) or L.has(*_GIVE_UP):
        return False
    for cls in (sp.sign, sp.Abs, sp.Piecewise, sp.Heaviside, sp.re, sp.im, sp.arg):
        if len(L.atoms(cls)) > len(source.atoms(cls)):
            return False  # a new sign(...) or Abs(...) is how SymPy disguises an undecided case
    return L.is_finite is not False


# -- sign cases (general x) ------------------------------------------------------------


def _sign_keys(*exprs) -> list:
    """Arguments whose sign selects a branch, innermost first (no non-smooth atom inside)."""
    keys = []
    for e in exprs:
        for node in sp.preorder_traversal(e):
            if isinstance(node, _UNSUPPORTED):
                raise _Undecided(f"{type(node).__name__} is not handled by the symbolic check")
            if isinstance(node, _SIGNED):
                gs = [node.args[0]]
            elif isinstance(node, (sp.Max, sp.Min)):
                gs = [a - b for a, b in itertools.combinations(node.args, 2)]
            elif isinstance(node, sp.core.relational.Relational) and node.rel_op in ("<", "<=", ">", ">="):
                gs = [node.lhs - node.rhs]
            else:
                continue
            for g in gs:
                c, _ = _canon(g)
                if c.is_number or c.has(*_NONSMOOTH) or c in keys:
                    continue  # a nested argument becomes a key once its inner atoms are resolved
                keys.append(c)
    return keys


class _Inconsistent(Exception):
    """A sign combination that no point realises (Max with no largest argument)."""


def _sign_of(g, signs: dict):
    """+-1 or 0 from the case's signs (or from g itself when constant); None if not decided."""
    c, flip = _canon(g)
    if c in signs:
        return signs[c] * flip
    if c.is_positive:
        return flip
    if c.is_negative:
        return -flip
    if c.is_zero:
        return 0
    return None


def _truth(cond, sign_of):
    """True, False, or None where a sign is not decided yet."""
    if cond is sp.true or cond is True:
        return True
    if cond is sp.false or cond is False:
        return False
    if isinstance(cond, (sp.And, sp.Or)):
        vals = [_truth(c, sign_of) for c in cond.args]
        if isinstance(cond, sp.And):
            return False if False in vals else (None if None in vals else True)
        return True if True in vals else (None if None in vals else False)
    if isinstance(cond, sp.Not):
        v = _truth(cond.args[0], sign_of)
        return None if v is None else not v
    if isinstance(cond, sp.core.relational.Relational):
        s = sign_of(cond.lhs - cond.rhs)
        if s is None:
            return None
        return {"<": s < 0, "<=": s <= 0, ">": s > 0, ">=": s >= 0, "==": s == 0, "!=": s != 0}[cond.rel_op]
    raise _Undecided(f"cannot decide the condition {cond}")


def _resolve_cond(cond, sign_of):
    if isinstance(cond, sp.core.relational.Relational):
        return cond.func(_resolve(cond.lhs, sign_of), _resolve(cond.rhs, sign_of))
    if isinstance(cond, (sp.And, sp.Or, sp.Not)):
        return cond.func(*[_resolve_cond(c, sign_of) for c in cond.args])
    return cond


def _resolve(e, sign_of):
    """Replace each non-smooth atom whose sign ``sign_of`` decides by its branch, bottom up.

    Atoms whose sign is not decided (``None``) are kept, with their arguments resolved.
    """
    if e.is_Atom or not e.has(*_NONSMOOTH):
        return e
    if isinstance(e, sp.Piecewise):
        for i, (expr_i, cond) in enumerate(e.args):
            t = _truth(cond, sign_of)
            if t is True:
                return _resolve(expr_i, sign_of)
            if t is None:
                rest = [(_resolve(ex, sign_of), _resolve_cond(c, sign_of)) for ex, c in e.args[i:]]
                return sp.Piecewise(*rest)
        raise _Undecided(f"no branch of {e} applies")
    args = [_resolve(a, sign_of) for a in e.args]
    if isinstance(e, _SIGNED) or isinstance(e, sp.DiracDelta):
        s = sign_of(e.args[0])
        if s is None:
            return e.func(*args)
        if isinstance(e, sp.Abs):
            return s * args[0]
        if isinstance(e, sp.sign):
            return sp.Integer(s)
        if isinstance(e, sp.Heaviside):
            if s == 0:
                return args[1] if len(args) > 1 else sp.S.Half
            return sp.S.One if s > 0 else sp.S.Zero
        if isinstance(e, _KINKED):  # a kinked activation: its elementary form's branch (relu: Max(0, z))
            return _resolve(type(e)._elementary(args[0]), sign_of)
        if s == 0:  # DiracDelta at its singular point
            raise _Undecided(f"{e} at its singular point")
        return sp.S.Zero
    if isinstance(e, (sp.Max, sp.Min)):
        want = 1 if isinstance(e, sp.Max) else -1
        n = len(e.args)
        signs = [[None if i == j else sign_of(e.args[i] - e.args[j]) for j in range(n)] for i in range(n)]
        if any(s is None for i in range(n) for j, s in enumerate(signs[i]) if i != j):
            return e.func(*args)
        for i in range(n):
            if all(signs[i][j] * want >= 0 for j in range(n) if j != i):
                return args[i]
        raise _Inconsistent()
    return e.func(*args)


_MAX_CASES = 32


def _smooth_cases(f, d):
    """(f_c, d_c, region, signs) for every sign case of the non-smooth atoms of f and d.

    Cases are split one key at a time, innermost arguments first, so that a condition such
    as ``Abs(x) <= 1`` becomes a key once ``Abs(x)`` is resolved.
    """
    cases, seen = [], set()

    def split(fc, dc, signs):
        keys = _sign_keys(fc, dc)
        if not keys:
            if fc.has(*_NONSMOOTH) or dc.has(*_NONSMOOTH):
                raise _Undecided(f"could not resolve the non-smooth parts of {_short(fc, 50)}")
            region = {k: s * sp.Dummy(k.name, positive=True) for k, s in signs.items() if k.is_Symbol}
            if (fc, dc) not in seen:
                seen.add((fc, dc))
                cases.append((fc, dc, region, signs))
            return
        key = keys[0]
        for s in (1, -1):
            if len(cases) > _MAX_CASES:
                raise _Undecided(f"more than {_MAX_CASES} sign cases")
            new = {**signs, key: s}
            if not _realizable(new):
                continue
            try:
                fn = _resolve(fc, lambda g: _sign_of(g, new))
                dn = _resolve(dc, lambda g: _sign_of(g, new))
            except _Inconsistent:
                continue
            split(fn, dn, new)

    split(f, d, {})
    return [k for k in _all_keys(cases)], cases


def _realizable(signs: dict) -> bool:
    """False only when no real x gives these signs to the keys that are polynomials in one
    symbol x (decided exactly: between consecutive real roots every sign is constant)."""
    by_symbol: dict = {}
    for k, s in signs.items():
        syms = k.free_symbols
        if len(syms) == 1:
            (v,) = syms
            if k.is_polynomial(v):
                by_symbol.setdefault(v, []).append((k, s))
    for v, items in by_symbol.items():
        if len(items) < 2:
            continue
        try:
            if not _realizable_1d(v, items):
                return False
        except Exception:
            continue  # undecided: keep the case
    return True


def _realizable_1d(v, items) -> bool:
    roots = set()
    for k, _ in items:
        roots.update(sp.Poly(k, v).real_roots())
    ordered = sorted(roots, key=lambda r: sp.N(r, 50))
    for a, b in zip(ordered, ordered[1:]):
        if not bool(a < b):  # numeric order confirmed exactly, else give up
            raise _Undecided("root order")
    points = []
    if not ordered:
        points = [sp.Integer(0)]
    else:
        points.append(sp.floor(ordered[0]) - 1)
        points.append(sp.ceiling(ordered[-1]) + 1)
        for a, b in zip(ordered, ordered[1:]):
            p = sp.Rational(sp.N((a + b) / 2, 60))
            if not (bool(a < p) and bool(p < b)):
                raise _Undecided("test point")
            points.append(p)
    for p in points:
        if all(sp.sign(k.subs(v, p)) == s for k, s in items):
            return True
    return False


def _all_keys(cases):
    keys = []
    for *_, signs in cases:
        for k in signs:
            if k not in keys:
                keys.append(k)
    return keys


# -- limits at general x -----------------------------------------------------------------

_LEMMAS: dict = {}


class _NoLimit(Exception):
    pass


def _linear_inner(g, x):
    """The inner argument through which ``g`` depends on ``x``, if it is one linear form.

    Returns (u, a) with u = a*x + c (a, c free of x) and g depending on x only via u (up to
    sign), or (x, 1).
    """
    found = []

    def visit(n):
        if not n.has(x):
            return
        if n == x:
            found.append(n)
            return
        if n.is_Add or n.is_Mul:
            a = n.coeff(x) if n.is_Add else n.as_independent(x, as_Add=False)[0]
            rest = sp.expand(n - a * x) if n.is_Mul else n - a * x
            if a != 0 and not a.has(x) and not rest.has(x):
                found.append(n)
                return
        for arg in n.args:
            visit(arg)

    visit(g)
    canon = {_up_to_sign(u)[0] for u in found}
    if len(canon) != 1:
        return x, sp.S.One
    u = canon.pop()
    a = u.coeff(x) if u.is_Add else u.as_independent(x, as_Add=False)[0] if u.is_Mul else sp.S.One
    return u, a


def _lemma(G, depth=0):
    """lim_{k->0} (G(u + k) - G(u)) / k for an expression G in the dummy ``_U``; cached."""
    hit = _LEMMAS.get(G)
    if hit is not None:
        return hit
    result = None
    normal = _normalize_logs(_elementary(G))
    if normal != G and normal.is_Add and depth < 2:
        L, methods = _limit_general(normal, _U, depth + 1)
        result = (L, " and ".join(sorted(methods)))
    if result is None and G.is_rational_function(_U):
        q = sp.cancel(sp.together((G.xreplace({_U: _U + _K}) - G) / _K))
        num, den = sp.fraction(q)
        den0 = den.subs(_K, 0)
        if den0 != 0 and not den0.is_zero:
            result = (sp.cancel(num.subs(_K, 0) / den0), "exact cancellation")
    if result is None:
        # The Taylor coefficient is the cheaper route for SymPy at a generic point; its
        # limit (Gruntz) is the second opinion when the expansion is not a clean series.
        Gp = _prepare(G, _U)
        result = _taylor_coefficient(Gp)
        if result is None:
            q = (Gp.xreplace({_U: _U + _K}) - Gp) / _K
            try:
                L = sp.limit(q, _K, 0, "+")
                if _clean(L, Gp):
                    result = (L, "symbolic limit")
            except (NotImplementedError, ValueError, TypeError, AttributeError, sp.PoleError, RecursionError):
                pass
    if result is None:
        raise _NoLimit(f"SymPy found no usable limit for the quotient of {_short(G.xreplace({_U: sp.Symbol('u')}))}")
    _LEMMAS[G] = result
    return result


def _linear_taylor(g, var, value, ref=None):
    """a1 when ``g`` (a function of ``var``) expands as a0 + a1*var + O(var**2) with clean
    coefficients and a0 proven equal to ``value``; None otherwise. The one Taylor routine of
    the two limits below (at a general point, and one-sided at a given point)."""
    try:
        ser = g.series(var, 0, 2)
    except Exception:
        return None
    order = ser.getO()
    if order is None or order.expr != var**2:
        return None
    try:
        poly = sp.Poly(ser.removeO(), var)
    except sp.PolynomialError:
        return None
    if poly.degree() > 1 or any(c.has(var) for c in poly.coeffs()):
        return None
    a0, a1 = poly.coeff_monomial(1), poly.coeff_monomial(var)
    if not _clean(a1, g if ref is None else ref) or not _proven_zero(a0 - value):
        return None
    return a1


def _taylor_coefficient(Gp):
    """The h-coefficient of the Taylor expansion of G(u + h): the limit at a regular point."""
    a1 = _linear_taylor(Gp.xreplace({_U: _U + _K}), _K, Gp, ref=Gp)
    return None if a1 is None else (a1, "Taylor expansion")


def _normalize_logs(e):
    """Exact rewrites that split logarithms into simpler terms: ``log(a/b)`` becomes
    ``log(a) - log(b)`` where SymPy knows both positive (``expand_log`` without force), after
    bringing each argument over a common denominator. ``log(sigmoid(z))`` becomes
    ``z - log(exp(z) + 1)``, which shares its limit with ``softplus``."""
    if not e.has(sp.log):
        return e
    e = e.replace(lambda n: isinstance(n, sp.log), lambda n: sp.log(sp.together(n.args[0])))
    return sp.expand_log(e)


def _limit_general(f, x, depth=0):
    """lim_{h->0} (f(x+h) - f(x))/h for a smooth expression at general x, with the methods used."""
    if not f.has(x):
        return sp.S.Zero, {"exact cancellation"}
    total, methods = [], set()
    for term in sp.Add.make_args(f):
        c, g = term.as_independent(x, as_Add=False)
        if not g.has(x):
            continue
        u, a = _linear_inner(g, x)
        G = g.xreplace({u: _U, -u: -_U}) if u != x else g.xreplace({x: _U})
        if G.has(x):
            u, a, G = x, sp.S.One, g.xreplace({x: _U})
        L, m = _lemma(G, depth)
        methods.update(m.split(" and "))
        total.append(c * a * L.xreplace({_U: u}))
    return sp.Add(*total), methods


# -- zero tests ------------------------------------------------------------------------


def _abstract_arguments(e):
    """Replace each compound function argument (up to sign) by a fresh symbol.

    An identity that holds for an independent symbol holds for any value put in its place,
    so a zero proven here is a zero of ``e``. It makes ``exp(z)`` and ``exp(-z)`` with a long
    linear form ``z`` cheap to cancel.
    """
    table = {}
    for node in sp.preorder_traversal(e):
        if isinstance(node, sp.Function):
            for arg in node.args:
                if arg.is_Add and arg.free_symbols:
                    c, _ = _up_to_sign(arg)
                    if c not in table:
                        table[c] = sp.Dummy("z", real=True) if c.is_extended_real else sp.Dummy("z")
    if not table:
        return e
    mapping = {}
    for c, z in table.items():
        mapping[c] = z
        mapping[-c] = -z
    return e.xreplace(mapping)


def _exp_symbols(e):
    """exp(c) and exp(-c) as z and 1/z with one symbol per canonical argument (sound, see above)."""
    exps = e.atoms(sp.exp)
    if not exps:
        return e
    table, mapping = {}, {}
    for node in exps:
        c, flip = _up_to_sign(sp.expand(node.args[0]))
        if c not in table:  # exp of a real number is positive; otherwise no assumption
            table[c] = sp.Dummy("E", positive=True) if c.is_extended_real else sp.Dummy("E")
        z = table[c]
        mapping[node] = z if flip > 0 else 1 / z
    return e.xreplace(mapping)


_ZERO_STEPS = (
    sp.expand,
    lambda e: sp.cancel(sp.together(e)),
    lambda e: sp.cancel(sp.together(_exp_symbols(e))),
    sp.simplify,
    lambda e: sp.simplify(sp.expand_trig(e)),
    lambda e: sp.simplify(_exp_symbols(sp.powsimp(sp.expand(e, power_exp=True)))),
)


def _powers_as_exp(e):
    """``b**e`` with a non-numeric exponent as ``exp(e*log(b))``: SymPy's own definition."""
    return e.replace(lambda n: n.is_Pow and not n.exp.is_Number and n.base is not sp.E,
                     lambda n: sp.exp(n.exp * sp.log(n.base)))


def _proven_zero(e, region=None) -> bool:
    """True only if ``e`` is shown to be exactly zero (within ``region``)."""
    e = sp.sympify(e)
    if region:
        e = e.xreplace(region)
    if e == 0 or e.is_zero:
        return True
    e = _elementary(e)
    if any(not p.exp.is_Number for p in e.atoms(sp.Pow)):
        e = _powers_as_exp(e)
    forms = [e]
    abstracted = _abstract_arguments(e)
    if abstracted is not e:
        forms.insert(0, abstracted)
    for form in forms:
        for step in _ZERO_STEPS:
            try:
                r = step(form)
            except Exception:
                continue
            if r == 0 or r.is_zero:
                return True
    if e.is_number and e.is_algebraic:
        try:
            return sp.minimal_polynomial(e, _U).is_Symbol
        except Exception:
            return False
    return False


def _numeric_difference(e, symbols, dps=40):
    """|e| at the first sample point where it is real: evidence that e is not zero."""
    with mp.workdps(dps):
        for env in _sample_points(symbols, trials=8):
            menv = {s: _mp_eval(v, {}) for s, v in env.items()}
            try:
                return env, _mp_eval(e, menv)
            except _Undefined:
                continue
    return None, None


# ======================================================================================
# The checks (run in the worker)
# ======================================================================================


def _check(spec: _Spec, emit) -> Verdict:
    f, x = spec.f, spec.x
    exact = sp.diff(f, x)
    d = exact if spec.claimed is None else spec.claimed
    if spec.point is None:
        return _check_general(spec, f, x, d, exact, emit)
    return _check_point(spec, f, x, d, exact, emit)


def _check_general(spec, f, x, d, exact, emit) -> Verdict:
    num = _numeric_general(spec, f, x, d, exact)
    if num.refutation is not None:
        return num.refutation
    emit("evidence", {"summary": num.summary()})
    name = spec.name

    def undecided(reason):
        # No proof: before saying so, look for a refutation at every sample point.
        wide = _numeric_general(spec, f, x, d, exact, want=len(_SAMPLES))
        if wide.refutation is not None:
            return wide.refutation
        return Verdict(name, "inconclusive", "symbolic limit", f"{reason}; {(wide if wide.agree else num).summary()}")

    try:
        keys, cases = _smooth_cases(f, d)
    except _Undecided as exc:
        return undecided(str(exc))
    methods = set()
    for fc, dc, region, signs in cases:
        try:
            L, m = _limit_general(fc, x)
        except _NoLimit as exc:
            return undecided(str(exc))
        methods |= m
        if not _proven_zero(L - dc, region):
            if not keys and m == {"exact cancellation"}:
                exact = _exact_refutation(name, x, L, dc)
                if exact is not None:
                    return exact
            where = "" if not keys else " in the case " + ", ".join(
                f"{_short(k, 30)} {'>' if s > 0 else '<'} 0" for k, s in signs.items())
            return undecided(f"the limit{where} is {_short(L)}, which could not be proven equal to {_short(dc)}")
    if num.conflict:
        return Verdict(name, "inconclusive", "symbolic limit", f"exact proof found but {num.conflict}")
    how = "symbolic limit (" + ", ".join(sorted(methods)) + ")"
    cases_text = f" in each of {len(cases)} sign cases" if keys else ""
    method = f"{how} at general {x.name}"
    detail = (f"lim_(h->0) (f({x.name}+h) - f({x.name}))/h equals {_short(d)} exactly{cases_text}; "
              f"{num.summary()}")
    if keys:  # the proof holds inside the cases, not on their borders: say where it does not
        borders = " or ".join(f"{_short(k, 30)} = 0" for k in keys)
        method += f", except where {borders}"
        detail += (f". Not proven where {borders}: there the cases meet, and the function may have no "
                   f"derivative (a kink)")
    return Verdict(name, "verified", method, detail)


def _exact_refutation(name, x, L, d):
    """L is exact algebra (a cancelled rational quotient): an exactly nonzero ``L - d`` at a
    rational point refutes ``d`` however small the difference."""
    symbols = sorted((L - d).free_symbols | {x}, key=lambda s: s.name)
    for env in _sample_points(symbols, trials=8):
        lv, dv = L.subs(env), d.subs(env)
        if not (lv.is_Rational and dv.is_number) or _value_status(dv) != "real":
            continue
        diff = lv - dv
        if diff.is_zero is False and diff.is_real:
            rel = sp.Abs(diff) / sp.Max(sp.Abs(lv), sp.Abs(dv))
            return Verdict(name, "refuted", "symbolic limit (exact cancellation)",
                           f"at {_point_text(env)}: the limit of the difference quotient is exactly {_short(lv)}, "
                           f"the derivative under test gives {_short(dv)} (relative error {sp.N(rel, 3)})",
                           _point_repr(env), lv, dv)
    return None


# -- at a point ---------------------------------------------------------------------------


def _value_status(v) -> str:
    """'real', 'undefined', 'complex' or 'unknown' for an exact value."""
    if v.has(sp.nan, sp.zoo, sp.oo, -sp.oo) or v.has(AccumBounds):
        return "undefined"
    if v.is_extended_real:
        return "real"
    if v.is_extended_real is False:
        return "complex"
    if v.is_number:
        try:
            with mp.workdps(50):
                val = _mp_eval(v, {})
        except _Undefined:
            return "unknown"
        if isinstance(val, mpmath.mpc) and abs(val.imag) > mpmath.mpf(10) ** -40 * (1 + abs(val.real)):
            return "complex"
        return "real" if not isinstance(val, mpmath.mpc) or val.imag == 0 else "unknown"
    return "unknown"


def _sign_near(g, t=_T) -> int:
    """The sign of g(t) for all small t > 0."""
    if g.has(*_NONSMOOTH):
        g = _resolve(g, _sign_near)
        if g.has(*_NONSMOOTH):
            raise _Undecided(f"the sign of {g.subs(t, sp.Symbol('t'))} near the point is not decided")
    if not g.has(t):
        if g.is_positive:
            return 1
        if g.is_negative:
            return -1
        if g.is_zero:
            return 0
        raise _Undecided(f"the sign of {g} is not decided")
    if g.is_positive:
        return 1
    if g.is_negative:
        return -1
    g0 = g.subs(t, 0)
    if g0.is_number and not g0.has(sp.nan, sp.zoo):
        if g0.is_positive:
            return 1
        if g0.is_negative:
            return -1
    if g0.is_zero or g0 == 0:
        try:
            c, _ = g.leadterm(t)
        except Exception:
            raise _Undecided(f"the sign of {g} near the point is not decided") from None
        if c.is_positive:
            return 1
        if c.is_negative:
            return -1
    raise _Undecided(f"the sign of {g.subs(t, sp.Symbol('t'))} near the point is not decided")


def _side_taylor(g, fa):
    """The t-coefficient of g(t) = f(a + s t) when g has a Taylor expansion a0 + a1 t + O(t**2)
    with a0 = f(a) proven: then the one-sided quotient tends to a1 / s. None otherwise."""
    return _linear_taylor(_prepare(g, _T), _T, fa)


def _one_sided_limit(q):
    """lim_{t->0+} q(t): ('finite', L), ('inf', +-1), ('osc', L), ('complex', L) or None."""
    try:
        if q.is_rational_function(_T):
            L = sp.limit(sp.cancel(sp.together(q)), _T, 0, "+")
        else:
            L = sp.limit(_prepare(q, _T), _T, 0, "+")
    except (NotImplementedError, ValueError, TypeError, AttributeError, sp.PoleError, RecursionError):
        return None
    if L is sp.oo:
        return "inf", 1
    if L is sp.S.NegativeInfinity:
        return "inf", -1
    if isinstance(L, AccumBounds):
        return "osc", L
    if L in (sp.I * sp.oo, -sp.I * sp.oo) or L is sp.zoo:
        return "complex", L
    if _clean(L, q):
        if L.is_extended_real is False:
            return "complex", L
        return "finite", L
    return None


def _check_point(spec, f, x, d, exact, emit) -> Verdict:
    name = spec.name
    a = spec.point[x]
    others = {s: v for s, v in spec.point.items() if s != x}
    if others:
        f, d, exact = f.subs(others), d.subs(others), exact.subs(others)
    where = f"{x.name} = {sp.sstr(a)}"
    fa = f.subs(x, a)
    status = _value_status(fa)
    if status == "undefined":
        return Verdict(name, "not differentiable", "exact evaluation",
                       f"f is undefined at {where} (it evaluates to {_short(fa)})", _point_repr(spec.point))
    if status == "complex":
        return Verdict(name, "not differentiable", "exact evaluation",
                       f"f is not real at {where} (it evaluates to {_short(fa)})", _point_repr(spec.point))

    free = (f.free_symbols | d.free_symbols) - {x}
    sides, env = _numeric_point(f, x, a, free)
    num_ref = _numeric_point_refutation(name, spec.point, env, sides, d, exact, x, a)
    evidence = {"summary": _sides_summary(sides)}
    if num_ref is not None:
        evidence["refutation"] = num_ref
    emit("evidence", evidence)

    verdict = _point_symbolic(name, spec.point, f, x, a, fa, d, sides, env)
    if verdict.status == "inconclusive" and num_ref is not None:
        return num_ref
    if verdict.status == "verified" and num_ref is not None:
        return Verdict(name, "inconclusive", verdict.method,
                       f"exact limit found but numbers disagree: {num_ref.detail}", _point_repr(spec.point))
    return verdict


def _numeric_point(f, x, a, free):
    """Both one-sided quotient ladders at the point (other symbols at sample values)."""
    for env in _sample_points(free, trials=8):
        try:
            right = _side_quotients(f, x, a, env, +1, _POINT_KS)
            left = _side_quotients(f, x, a, env, -1, _POINT_KS)
        except _Undefined:
            continue
        return {1: right, -1: left}, env
    return None, {}


def _sides_summary(sides) -> str:
    if sides is None:
        return "f could not be evaluated numerically near the point"
    parts = []
    for s, label in ((1, "right"), (-1, "left")):
        side = sides[s]
        if side.kind != "real":
            parts.append(f"{label}: f is {'not real' if side.kind == 'complex' else 'undefined'}")
        elif side.stable():
            parts.append(f"{label} quotients converge to {_fmt_num(side.value())}")
        elif side.oscillates():
            parts.append(f"{label} quotients oscillate")
        else:
            parts.append(f"{label} quotients at h = 1e-{_POINT_KS[-1]}: {_fmt_num(side.value())}")
    return "; ".join(parts)


def _numeric_point_refutation(name, point, env, sides, d, exact, x, a):
    if sides is None or not (sides[1].stable() and sides[-1].stable()):
        return None
    vr, vl = sides[1].value(), sides[-1].value()
    if not _close(vr, vl, 1e-9):
        return None
    with mp.workdps(60):
        menv = {s: _mp_eval(v, {}) for s, v in env.items()}
        menv[x] = _mp_eval(a, {})
        try:
            dv = _mp_eval(d, menv)
        except _Undefined:
            dv = None
        if dv is None:  # numerically undefined (0*DiracDelta(0)...): SymPy's exact value decides
            da = d.subs({x: a, **env})
            if _value_status(da) == "real":
                try:
                    dv = _mp_eval(da, {})
                except _Undefined:
                    return None
        try:
            ev = _mp_real(exact, menv) if exact is not d else None
        except _Undefined:
            ev = None
    if ev is not None and not _close(ev, vr, 1e-8):
        return None  # the numbers and SymPy's derivative disagree: no refutation on numbers
    full = {**point, **env}
    if dv is None:
        return Verdict(name, "refuted", "mpmath difference quotients",
                       f"at {_point_text(full)}: the difference quotient tends to {_fmt_num(vr)} from both sides "
                       f"but the derivative under test is undefined there", _point_repr(full), float(vr), None)
    if abs(dv - vr) > 1e-6 * max(mpmath.mpf(1), abs(vr), abs(dv)):
        return _refutation(name, "mpmath difference quotients", full, vr, dv)
    return None


def _point_symbolic(name, point, f, x, a, fa, d, sides, env) -> Verdict:
    where = f"{x.name} = {sp.sstr(a)}"
    pt = _point_repr(point)
    method = "one-sided limits"
    limits = {}
    for s in (1, -1):
        try:
            g = _resolve(f.subs(x, a + s * _T), lambda e: _sign_near(e))
            if g.has(*_NONSMOOTH):
                raise _Undecided(f"could not resolve the branches of f near {where}")
        except (_Undecided, _Inconsistent) as exc:
            return Verdict(name, "inconclusive", method, f"{exc}; {_sides_summary(sides)}", pt)
        if g.is_extended_real is False:
            limits[s] = ("complex", None)
            continue
        a1 = _side_taylor(g, fa)
        res = ("finite", a1 / s) if a1 is not None else _one_sided_limit((g - fa) / (s * _T))
        if res is None:
            return Verdict(name, "inconclusive", method,
                           f"SymPy gave no usable {'right' if s > 0 else 'left'} limit at {where}; {_sides_summary(sides)}", pt)
        limits[s] = res
    checked = _cross_check(limits, sides)
    if checked:
        return Verdict(name, "inconclusive", method, f"{checked} at {where}", pt)

    side_name = {1: "right", -1: "left"}
    for s in (1, -1):
        kind, L = limits[s]
        if kind == "complex":
            other = limits[-s]
            tail = f"; the {side_name[-s]} limit is {_short(other[1])}" if other[0] == "finite" else ""
            return Verdict(name, "not differentiable", method,
                           f"f is not real-valued {'right' if s > 0 else 'left'} of {where}, so it has no two-sided "
                           f"derivative there{tail}", pt)
    for s in (1, -1):
        kind, L = limits[s]
        if kind == "inf":
            return Verdict(name, "not differentiable", method,
                           f"the {side_name[s]} difference quotient tends to {'+' if L > 0 else '-'}oo at {where}", pt)
        if kind == "osc":
            return Verdict(name, "not differentiable", method,
                           f"the {side_name[s]} difference quotient oscillates in {L} as h -> 0 at {where}", pt)
    Lr, Ll = limits[1][1], limits[-1][1]
    if not _proven_zero(Lr - Ll):
        diff_env, diff = _numeric_difference(Lr - Ll, (Lr - Ll).free_symbols)
        if diff is not None and abs(diff) > 1e-20:
            return Verdict(name, "not differentiable", method,
                           f"the one-sided derivatives differ at {where}: left {_short(Ll)}, right {_short(Lr)}", pt)
        return Verdict(name, "inconclusive", method,
                       f"could not decide whether the one-sided limits {_short(Ll)} and {_short(Lr)} are equal", pt)
    da = d.subs(x, a)
    if _value_status(da) in ("undefined", "complex"):
        return Verdict(name, "refuted", method,
                       f"the derivative at {where} is {_short(Lr)} (both one-sided limits), but the derivative under "
                       f"test is {_short(da)} there", pt, Lr, da)
    if _proven_zero(Lr - da):
        return Verdict(name, "verified", method,
                       f"both one-sided limits at {where} equal {_short(Lr)}, the value of {_short(d, 50)}", pt)
    diff_env, diff = _numeric_difference(Lr - da, (Lr - da).free_symbols)
    if diff is not None and abs(diff) > 1e-20:
        full = {**point, **(diff_env or {})}
        return Verdict(name, "refuted", method,
                       f"at {_point_text(full)}: both one-sided limits equal {_short(Lr)}, the derivative under test "
                       f"gives {_short(da)}", _point_repr(full), Lr, da)
    return Verdict(name, "inconclusive", method,
                   f"the limit {_short(Lr)} could not be proven equal to {_short(da)}", pt)


def _cross_check(limits, sides) -> str:
    """SymPy's one-sided limits against the quotients: an empty string when nothing contradicts."""
    if sides is None:
        return ""
    with mp.workdps(60):
        for s, (kind, L) in limits.items():
            side = sides[s]
            label = "right" if s > 0 else "left"
            if kind == "complex":
                if side.kind == "real" and len(side.qs) == len(_POINT_KS):
                    return f"SymPy calls the {label} side non-real but f is real there"
                continue
            if side.kind != "real":
                return f"SymPy gave a {label} limit {L} but f is not real-valued there numerically"
            if kind == "finite":
                if L.free_symbols:
                    continue  # symbolic in other variables: compared after substitution below
                try:
                    Lv = _mp_real(L, {})
                except _Undefined:
                    return f"the {label} limit {L} does not evaluate"
                if not side.supports_finite(Lv):
                    return f"SymPy's {label} limit {_short(L)} is not supported by difference quotients ({_fmt_num(side.value())})"
            elif kind == "inf" and not side.supports_infinite(L):
                return f"SymPy's {label} limit {'+' if L > 0 else '-'}oo is not supported by difference quotients"
            elif kind == "osc" and not side.oscillates():
                return f"SymPy's {label} limit {L} (oscillation) is not supported by difference quotients"
    return ""


def __getattr__(name):
    # check_gradient moved to calcml.check (issue 12, item 1); the old import keeps working
    # (imported on use: calcml.check imports this module)
    if name == "check_gradient":
        from .check import check_gradient

        return check_gradient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
