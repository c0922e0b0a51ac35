"""Reverse-mode sweeps give SymPy's exact derivatives (checked at 50 digits)."""

import mpmath
import pytest
import sympy as sp

import calcml as cm
from calcml.backprop import backprop

a, b, c = cm.params("a b c")
x, y = cm.data("x y")

EXPRESSIONS = [
    (a * x + b - y) ** 2,
    cm.softplus(a * x + b) - y * (a * x + b),
    sp.tanh(a * x + c) * b + sp.exp(-a**2) * sp.log(1 + b**2),
    a**b + b**x + sp.sqrt(c**2 + 1) / (a**2 + 2),
    sp.Piecewise((a**2 * x, a * x > 0.5), (b * sp.sin(c), True)) + sp.Max(a, b * x) * sp.Min(c, y),
    cm.sigmoid(a * b * c) * cm.relu(a - x) + sp.Abs(b * y - c) + sp.atan(a / (1 + b**2)),
    (a * b + a * b * c) ** 3 + sp.cos(a * b) * sp.cos(a * b),  # shared subexpressions
    a,  # the trivial one
]

POINT = {a: sp.Rational(7, 10), b: sp.Rational(-13, 10), c: sp.Rational(3, 2), x: sp.Rational(9, 10), y: sp.Rational(1, 4)}


def _evaluate(assignments, out_exprs):
    vals = dict(POINT)
    for s, e in assignments:
        vals[s] = sp.sympify(e.xreplace(vals)).evalf(60)
    return [sp.sympify(e.xreplace(vals)).evalf(60) for e in out_exprs]


@pytest.mark.parametrize("expr", EXPRESSIONS, ids=range(len(EXPRESSIONS)))
def test_backprop_equals_diff(expr):
    params = [a, b, c]
    assignments, value, grads = backprop(expr, params)
    got = _evaluate(assignments, [value, *grads])
    want = [expr.xreplace(POINT).evalf(60)] + [sp.diff(expr, p).xreplace(POINT).evalf(60) for p in params]
    with mpmath.workdps(50):
        for g, w in zip(got, want):
            assert abs(g - w) <= 1e-45 * max(1, abs(w)), (expr, g, w)


def test_backprop_is_linear_in_the_expression_size():
    """One sweep each way: the tape grows with the DAG, not with (parameters x size)."""
    n = 300
    ws = cm.params("w", n)
    xs = cm.data("x", n)
    expr = sp.tanh(cm.dot(ws, xs)) ** 2
    assignments, _, grads = backprop(expr, ws)
    assert len(assignments) < 3 * n + 20
    assert all(len(g.free_symbols) <= 3 for g in grads)  # adjoint * x_k, never the whole sum
