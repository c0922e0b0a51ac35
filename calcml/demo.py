"""The main job on its built-in example: the seed tutorial, done right.

The classic tutorial fits ``y = w*x + b`` by gradient descent with hand-derived gradients
``dw = 2*dot(x, pred)``, ``db = 2*sum(pred)``: its cost omits the target ``y`` and ``x``
is never defined. Here the full cost is stated symbolically, the exact gradient is derived,
verified against the limit definition, compiled, the tutorial's gradient is refuted for
the full cost, and compiled GD, momentum, Nesterov and Adam loops are compared with the
closed-form least-squares solution.
"""

from __future__ import annotations

import time

import numpy as np
import sympy as sp

from .check import check_gradient
from .compile import compile as compile_cost
from .cost import Cost, data, params
from .datasets import load_linear
from .minimize import minimize
from .verify import verify


def run(out=print, plot_path="calcml-demo.png") -> dict:
    """Run the demo, writing lines with ``out``; returns the figures it printed.

    ``plot_path``: where to save the cost curves (PNG), or None for no plot.
    """
    w, b = params("w b")
    x, y = data("x y")
    cost = Cost((w * x + b - y) ** 2, params=[w, b], data=[x, y])
    D = load_linear()
    n = D["x"].shape[0]

    out("calcml demo: the seed tutorial, done right")
    out("=" * 42)
    out(f"data: {n} rows (x, y) shipped with calcml, y ~ 2.5 x + 4 + noise")
    out("")
    out("1. the cost, stated in full (the tutorial forgot the target y):")
    out(f"     J(w, b) = mean over rows of  {cost.expr}")
    out("")
    out("2. its exact gradient, derived by SymPy:")
    for p, g in zip(cost.params, cost.gradient):
        out(f"     dJ/d{p} = mean of  {sp.factor(g)}")
    out("   the tutorial's hand-written gradient is 2*x*(w*x + b) and 2*(w*x + b):")
    out("   exact only for a cost without y; for the full cost it misses the -2*x*y and -2*y terms.")
    out("")

    t0 = time.perf_counter()
    k = compile_cost(cost)
    theta0 = np.zeros(2)
    f0, g0 = k.value_and_grad(theta0, D)
    t_first = time.perf_counter() - t0
    X = np.column_stack([D["x"], np.ones(n)])
    r0 = X @ theta0 - D["y"]
    g_np = 2.0 * X.T @ r0 / n
    out("3. compiled with Numba (one fused pass over the rows), evaluated at w = b = 0:")
    out(f"     J = {f0:.10g}    grad = [{g0[0]:.10g}, {g0[1]:.10g}]")
    out(f"     NumPy reference: J = {r0 @ r0 / n:.10g}    grad = [{g_np[0]:.10g}, {g_np[1]:.10g}]")
    out(f"     (generate, compile or load from cache, and first call: {t_first:.2f} s; source in {k.path})")
    out("")

    sol, *_ = np.linalg.lstsq(X, D["y"], rcond=None)
    f_star, g_star = k.value_and_grad(sol, D)
    out("4. at the closed-form least-squares solution the exact gradient vanishes:")
    out(f"     w = {sol[0]:.6f}, b = {sol[1]:.6f}:  J = {f_star:.6f}, |grad| = {np.linalg.norm(g_star):.2e}")
    out("")

    report = verify(cost)
    out("5. each partial derivative checked against the limit definition lim (J(p+h) - J(p))/h:")
    for v in report:
        out(f"     {v.name}: {v.status} ({v.method})")
    out("")

    def tutorial_gradient(theta, d):
        pred = theta[0] * d["x"] + theta[1]  # the tutorial's pred: no target y
        return np.array([2 * np.dot(d["x"], pred), 2 * np.sum(pred)]) / len(pred)

    checked = check_gradient(cost, tutorial_gradient, data=D, points=np.array([[0.5, 1.0]]))
    out("6. the tutorial's hand-written gradient, checked against the exact one for the full cost:")
    for v in checked:
        out(f"     {v.name}: {v.status}: {v.detail}")
    out("")

    out("7. fits from w = b = 0 with the generated descent loops (machine code, or at first, for a short run,\n"
        "   the same source run as Python to the same bits):")
    runs = {}
    fits = [
        ("gd", dict(method="gd", lr="auto", maxiter=3000)),
        ("momentum", dict(method="momentum", lr=0.002, maxiter=3000)),
        ("nesterov", dict(method="nesterov", lr=0.002, maxiter=3000)),
        ("adam", dict(method="adam", lr=0.1, maxiter=3000)),
    ]
    out(f"     {'method':10s} {'w':>10s} {'b':>10s} {'J':>12s} {'|w-w*|+|b-b*|':>15s}  iterations")
    for name, kw in fits:
        res = minimize(cost, theta0, data=D, **kw)
        runs[name] = res
        err = float(np.abs(res.x - sol).sum())
        out(f"     {name:10s} {res.x[0]:10.6f} {res.x[1]:10.6f} {res.fun:12.6f} {err:15.2e}  {res.nit}")
    out(f"     {'lstsq':10s} {sol[0]:10.6f} {sol[1]:10.6f} {f_star:12.6f} {'(closed form)':>15s}")
    out("")

    plot_file = _save_plot(runs, plot_path, f_star)
    if plot_file:
        out(f"8. cost curves (J - J*, log scale) saved to {plot_file}")
    else:
        out("8. cost curves: not drawn (matplotlib is not installed: pip install 'calcml[plot]')")
    return {"value0": f0, "grad0": g0, "solution": sol, "grad_at_solution": g_star, "verify": report,
            "tutorial_check": checked, "fits": runs, "plot": plot_file}


def _save_plot(runs: dict, path, f_star: float):
    """Save J - J* (J* the least-squares minimum) per iteration on a log scale; None when
    matplotlib is missing."""
    if path is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in runs.items():
        gap = np.maximum(np.asarray(res.history, dtype=float) - f_star, 1e-16)
        ax.plot(np.arange(len(gap)) * (getattr(res, "history_every", 1) or 1), gap, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("J(w, b) - J* (closed form)")
    ax.set_title("calcml demo: fitting y = w x + b")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
