"""The main job on its built-in example: the seed tutorial, done right.

The classic tutorial fits ``y = w*x + b`` by gradient descent with hand-derived gradients
``dw = 2*dot(x, pred)``, ``db = 2*sum(pred)``: its cost omits the target ``y`` and ``x``
is never defined. Here the full cost is stated symbolically, the exact gradient is derived,
compiled, and checked against NumPy and the closed-form least-squares solution.
"""

from __future__ import annotations

import time

import numpy as np
import sympy as sp

from .compile import compile as compile_cost
from .cost import Cost, data, params
from .datasets import load_linear


def _line(out, text=""):
    out(text)


def run(out=print) -> dict:
    """Run the demo, writing lines with ``out``; returns the figures it printed."""
    w, b = params("w b")
    x, y = data("x y")
    cost = Cost((w * x + b - y) ** 2, params=[w, b], data=[x, y])
    D = load_linear()
    n = D["x"].shape[0]

    _line(out, "calcml demo: the seed tutorial, done right")
    _line(out, "=" * 42)
    _line(out, f"data: {n} rows (x, y) shipped with calcml, y ~ 2.5 x + 4 + noise")
    _line(out)
    _line(out, "1. the cost, stated in full (the tutorial forgot the target y):")
    _line(out, f"     J(w, b) = mean over rows of  {cost.expr}")
    _line(out)
    _line(out, "2. its exact gradient, derived by SymPy:")
    for p, g in zip(cost.params, cost.gradient):
        _line(out, f"     dJ/d{p} = mean of  {sp.factor(g)}")
    _line(out, "   the tutorial's hand-written gradient is 2*x*(w*x + b) and 2*(w*x + b):")
    _line(out, "   exact only for a cost without y; for the full cost it misses the -2*x*y and -2*y terms.")
    _line(out)

    t0 = time.perf_counter()
    k = compile_cost(cost)
    theta0 = np.zeros(2)
    f0, g0 = k.value_and_grad(theta0, D)
    t_first = time.perf_counter() - t0
    X = np.column_stack([D["x"], np.ones(n)])
    r0 = X @ theta0 - D["y"]
    g_np = 2.0 * X.T @ r0 / n
    _line(out, "3. compiled with Numba (one fused pass over the rows), evaluated at w = b = 0:")
    _line(out, f"     J = {f0:.10g}    grad = [{g0[0]:.10g}, {g0[1]:.10g}]")
    _line(out, f"     NumPy reference: J = {r0 @ r0 / n:.10g}    grad = [{g_np[0]:.10g}, {g_np[1]:.10g}]")
    _line(out, f"     (generate, compile or load from cache, and first call: {t_first:.2f} s; source in {k.path})")
    _line(out)

    sol, *_ = np.linalg.lstsq(X, D["y"], rcond=None)
    f_star, g_star = k.value_and_grad(sol, D)
    _line(out, "4. at the closed-form least-squares solution the exact gradient vanishes:")
    _line(out, f"     w = {sol[0]:.6f}, b = {sol[1]:.6f}:  J = {f_star:.6f}, |grad| = {np.linalg.norm(g_star):.2e}")
    return {"value0": f0, "grad0": g0, "solution": sol, "grad_at_solution": g_star}
