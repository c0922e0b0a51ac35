"""The entry points, ``verify_derivative`` and ``verify``: their inputs read as exact checks
(expressions with exact floats, real symbols, an exact point), which the worker pool runs."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import sympy as sp

from ..cost import Cost
from ..errors import CostError
from .checks import _Spec
from .report import Report, _fmt_coord, _short
from .workers import _run_specs


#: Seconds allowed to each check before it is stopped and called inconclusive.
DEFAULT_TIMEOUT = 4.0


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
            name += " at " + ", ".join(f"{s.name} = {_fmt_coord(v)}" for s, v in point.items())
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
    from ..tensor.statement import is_tensor_cost

    if is_tensor_cost(cost):
        if gradient is not None:
            raise TypeError("verify(cost, gradient=...) takes scalar costs; for a tensor cost, check a flat "
                            "gradient function with cm.check_gradient")
        from ..tensor.verify import verify_tensor

        return verify_tensor(cost, timeout)
    grads = _cost_gradient(cost, gradient)
    expr = _exact_floats(cost.expr)
    specs = [_Spec(name=f"d/d{p.name}", f=expr, x=p, point=None, claimed=g) for p, g in zip(cost.params, grads)]
    return Report(_run_specs(specs, timeout), title=f"verify: {_short(cost.expr, 60)}")
