"""L-BFGS against scipy's L-BFGS-B on problems of the Moré–Garbow–Hillstrom set (ACM TOMS 7,
1981): each a sum of squares f = sum f_i(x)**2 from the standard start, with its known
minimum. calcml must reach scipy's value (or better) and the published minimum."""

import numpy as np
import pytest
import scipy.optimize as so
import sympy as sp

import calcml as cm

R = sp.Rational


def _rosenbrock(x):
    return [10 * (x[1] - x[0] ** 2), 1 - x[0]]


def _beale(x):
    return [R(3, 2) - x[0] * (1 - x[1]), R(9, 4) - x[0] * (1 - x[1] ** 2), R(21, 8) - x[0] * (1 - x[1] ** 3)]


def _powell_singular(x):
    return [x[0] + 10 * x[1], sp.sqrt(5) * (x[2] - x[3]), (x[1] - 2 * x[2]) ** 2, sp.sqrt(10) * (x[0] - x[3]) ** 2]


def _wood(x):
    return [10 * (x[1] - x[0] ** 2), 1 - x[0], sp.sqrt(90) * (x[3] - x[2] ** 2), 1 - x[2],
            sp.sqrt(10) * (x[1] + x[3] - 2), (x[1] - x[3]) / sp.sqrt(10)]


def _penalty1(x):
    n, a = len(x), R(1, 100000)
    return [sp.sqrt(a) * (xi - 1) for xi in x] + [sum(xi ** 2 for xi in x) - R(1, 4)]


def _penalty2(x):
    n, a = len(x), R(1, 100000)
    fs = [x[0] - R(1, 5)]
    for i in range(2, n + 1):
        fs.append(sp.sqrt(a) * (sp.exp(x[i - 1] / 10) + sp.exp(x[i - 2] / 10) - sp.exp(R(i, 10)) - sp.exp(R(i - 1, 10))))
    for i in range(n + 1, 2 * n):
        fs.append(sp.sqrt(a) * (sp.exp(x[i - n] / 10) - sp.exp(-R(1, 10))))
    fs.append(sum((n - j) * x[j] ** 2 for j in range(n)) - 1)
    return fs


def _trigonometric(x):
    n = len(x)
    c = sum(sp.cos(xj) for xj in x)
    return [n - c + (i + 1) * (1 - sp.cos(x[i])) - sp.sin(x[i]) for i in range(n)]


def _variably_dimensioned(x):
    s = sum((j + 1) * (x[j] - 1) for j in range(len(x)))
    return [xj - 1 for xj in x] + [s, s ** 2]


def _extended_rosenbrock(x):
    out = []
    for k in range(0, len(x), 2):
        out += [10 * (x[k + 1] - x[k] ** 2), 1 - x[k]]
    return out


_KO_Y = [R(x) for x in ("0.1957", "0.1947", "0.1735", "0.1600", "0.0844", "0.0627", "0.0456", "0.0342",
                        "0.0323", "0.0235", "0.0246")]
_KO_U = [R(x) for x in ("4", "2", "1", "0.5", "0.25", "0.167", "0.125", "0.1", "0.0833", "0.0714", "0.0625")]


def _kowalik_osborne(x):
    return [y - x[0] * (u ** 2 + u * x[1]) / (u ** 2 + u * x[2] + x[3]) for y, u in zip(_KO_Y, _KO_U)]


# name, residuals, start, published minimum (MGH 1981, Table)
PROBLEMS = [
    ("rosenbrock", _rosenbrock, [-1.2, 1.0], 0.0),
    ("beale", _beale, [1.0, 1.0], 0.0),
    ("powell singular", _powell_singular, [3.0, -1.0, 0.0, 1.0], 0.0),
    ("wood", _wood, [-3.0, -1.0, -3.0, -1.0], 0.0),
    ("penalty I, n=4", _penalty1, [1.0, 2.0, 3.0, 4.0], 2.24997e-5),
    ("penalty II, n=4", _penalty2, [0.5] * 4, 9.37629e-6),
    ("trigonometric, n=4", _trigonometric, [0.25] * 4, None),  # a local minimum (3.03e-4) from this start
    ("variably dimensioned, n=4", _variably_dimensioned, [0.75, 0.5, 0.25, 0.0], 0.0),
    ("extended rosenbrock, n=4", _extended_rosenbrock, [-1.2, 1.0, -1.2, 1.0], 0.0),
    ("kowalik-osborne", _kowalik_osborne, [0.25, 0.39, 0.415, 0.39], 3.07505e-4),
]


@pytest.mark.parametrize("name, residuals, x0, fstar", PROBLEMS, ids=[p[0] for p in PROBLEMS])
def test_lbfgs_reaches_scipy_and_the_published_minimum(name, residuals, x0, fstar):
    xs = cm.params("x", len(x0))
    cost = cm.Cost(sum(f ** 2 for f in residuals(list(xs))), params=list(xs))
    x0 = np.array(x0)
    res = cm.minimize(cost, x0, method="lbfgs", tol=1e-10, maxiter=5000)
    # scipy on SymPy's own lambdified value and gradient: an independent evaluation
    f = sp.lambdify([list(xs)], cost.expr, "math")
    g = sp.lambdify([list(xs)], list(cost.gradient), "math")
    ref = so.minimize(f, x0, jac=lambda t: np.array(g(t)), method="L-BFGS-B",
                      options=dict(gtol=1e-10, ftol=1e-15, maxiter=5000, maxfun=20000))
    assert res.fun <= ref.fun + 1e-9 * max(1.0, abs(ref.fun)) + 1e-14, (name, res.fun, ref.fun, res.message)
    if fstar is not None:  # the published minimum, to its printed digits (6), or 1e-10 where it is 0
        assert res.fun == pytest.approx(fstar, rel=1e-5, abs=1e-10), (name, res.fun, res.message)
