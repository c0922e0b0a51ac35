"""The shared table of test costs: one row per kind of expression the kernels must handle.

Each problem gives a Cost, a sampler of parameter vectors and of data rows (inside the
cost's domain, away from kinks so that values are well conditioned), used by the kernel
tests (against SymPy/mpmath at 50 digits) and later by the optimizer tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy as sp
from hypothesis import strategies as st

import calcml as cm


@dataclass
class Problem:
    name: str
    cost: cm.Cost
    theta_range: tuple = (-2.0, 2.0)
    data_range: tuple = (-3.0, 3.0)
    binary_columns: tuple = ()  # data columns drawn from {0, 1}
    positive_columns: tuple = ()
    notes: str = ""
    extra: dict = field(default_factory=dict)
    # kinks: expressions that must be nonzero at every row for the point to be away from a
    # kink (where one-sided derivatives differ and the exact derivative does not exist)
    kinks: tuple = ()

    def away_from_kinks(self, theta, cols) -> bool:
        if not self.kinks:
            return True
        subs = dict(zip(self.cost.params, theta))
        n_rows = len(cols[0]) if cols else 1
        for r in range(n_rows):
            row = {**subs, **{d: (cols[k][r] if cols else 0.0) for k, d in enumerate(self.cost.data)}}
            for kink in self.kinks:
                if abs(float(kink.subs(row))) < 1e-6:
                    return False
        return True

    def theta_strategy(self):
        lo, hi = self.theta_range
        n = len(self.cost.params)
        return st.lists(st.floats(lo, hi, allow_nan=False, allow_infinity=False), min_size=n, max_size=n)

    def data_strategy(self, rows: int = 4):
        cols = []
        lo, hi = self.data_range
        for name in self.cost.data_names:
            if name in self.binary_columns:
                elem = st.sampled_from([0.0, 1.0])
            elif name in self.positive_columns:
                elem = st.floats(0.1, hi, allow_nan=False)
            else:
                elem = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
            cols.append(st.lists(elem, min_size=rows, max_size=rows))
        return st.tuples(*cols)


def _linreg(d=3):
    w = cm.params("w", d)
    b = cm.params("b")
    x = cm.data("x", d)
    y = cm.data("y")
    return cm.Cost((cm.dot(w, x) + b - y) ** 2, params=[*w, b], data=[*x, y])


def _logistic(d=3):
    w = cm.params("w", d)
    b = cm.params("b")
    x = cm.data("x", d)
    y = cm.data("y")
    z = cm.dot(w, x) + b
    return cm.Cost(cm.softplus(z) - y * z, params=[*w, b], data=[*x, y])


def _logistic_textbook():
    """The log-loss as tutorials write it: calcml must rewrite it into a stable form."""
    w, b = cm.params("w b")
    x, y = cm.data("x y")
    s = 1 / (1 + sp.exp(-(w * x + b)))
    return cm.Cost(-(y * sp.log(s) + (1 - y) * sp.log(1 - s)), params=[w, b], data=[x, y])


def _polynomial():
    a, c = cm.params("a c")
    x, y = cm.data("x y")
    return cm.Cost((a * x**3 + c * x**2 - y) ** 2 + a**4 / 10, params=[a, c], data=[x, y], reduce="sum")


def _trig():
    a, c = cm.params("a c")
    x = cm.data("x")
    return cm.Cost(sp.sin(a * x) * sp.cos(c) + sp.atan(c * x / 3) + sp.cos(a * c) ** 2, params=[a, c], data=[x])


def _explog():
    a, c = cm.params("a c")
    x, y = cm.data("x y")
    return cm.Cost(sp.log(1 + a**2 * x**2) + sp.exp(-c * x / 2) * y + sp.sqrt(1 + c**2 * y**2), params=[a, c], data=[x, y])


def _huber_residual():
    w, b = cm.params("w b")
    x, y = cm.data("x y")
    return w * x + b - y


def _huber():
    w, b = cm.params("w b")
    x, y = cm.data("x y")
    r = w * x + b - y
    return cm.Cost(sp.Piecewise((r**2 / 2, sp.Abs(r) <= 1), (sp.Abs(r) - sp.Rational(1, 2), True)), params=[w, b], data=[x, y])


def _tanh_net(hidden=2):
    a = cm.params("a", hidden)
    c = cm.params("c", hidden)
    v = cm.params("v", hidden)
    d = cm.params("d")
    x, y = cm.data("x y")
    out = sum(v[j] * sp.tanh(a[j] * x + c[j]) for j in range(hidden)) + d
    return cm.Cost((out - y) ** 2, params=[*a, *c, *v, d], data=[x, y])


def _nonsmooth_kinks():
    a, c = cm.params("a c")
    x, y = cm.data("x y")
    return (a * x - c, a - x, c - y, a * y - c)


def _nonsmooth():
    a, c = cm.params("a c")
    x, y = cm.data("x y")
    expr = (
        cm.relu(a * x - c) ** 2
        + sp.Max(a, x) * sp.Min(c, y)
        + sp.sign(a - x) * c
        + sp.Heaviside(c - y) * a**2
        + sp.Abs(a * y - c)
        + cm.sigmoid(a * x) * c
    )
    return cm.Cost(expr, params=[a, c], data=[x, y])


def _rosenbrock():
    a, b = cm.params("a b")
    return cm.Cost((1 - a) ** 2 + 100 * (b - a**2) ** 2, params=[a, b])


def _nodata_mixed():
    u, v = cm.params("u v")
    return cm.Cost(sp.exp(u * v / 4) + sp.log(2 + sp.sin(u)) + cm.softplus(u - v) + sp.Abs(u) ** 3, params=[u, v])


PROBLEMS = [
    Problem("linreg", _linreg()),
    Problem("logistic", _logistic(), binary_columns=("y",)),
    Problem("logistic_textbook", _logistic_textbook(), binary_columns=("y",)),
    Problem("polynomial", _polynomial()),
    Problem("trig", _trig()),
    Problem("explog", _explog()),
    Problem("huber", _huber(), kinks=(_huber_residual() ** 2 - 1,)),
    Problem("tanh_net", _tanh_net()),
    # more than 16 parameters: value and gradient by backpropagation, Hessian in its own module
    Problem("tanh_net_wide", _tanh_net(hidden=6), theta_range=(-1.0, 1.0)),
    Problem("nonsmooth", _nonsmooth(), kinks=_nonsmooth_kinks()),
    Problem("rosenbrock", _rosenbrock()),
    Problem("nodata_mixed", _nodata_mixed(), kinks=(cm.params("u"),)),
]

BY_NAME = {p.name: p for p in PROBLEMS}


def as_columns(problem: Problem, cols) -> dict:
    return {name: np.array(c, dtype=np.float64) for name, c in zip(problem.cost.data_names, cols)}


def sample_args(problem: Problem, seed: int = 5, rows: int = 37) -> tuple:
    """``(theta,)`` or ``(theta, data)``: a fixed random point and data inside every domain
    (columns in (0.1, 2), binary columns 0/1), the same in any process."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-1.0, 1.0, len(problem.cost.params))
    if not problem.cost.data:
        return (theta,)
    data = {c: rng.uniform(0.1, 2.0, rows) for c in problem.cost.data_names}
    for c in problem.binary_columns:
        data[c] = rng.integers(0, 2, rows).astype(float)
    return theta, data
