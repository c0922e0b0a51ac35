"""W3 and W4: calcml's generated descent loops against hand-written whole-loop Numba functions.

W3: minibatch Nesterov fit of linear regression (mean squared error, d = 8 features + bias),
    lr 0.01, momentum 0.9, batch 64, 10 epochs over N = 100,000 rows, per-epoch shuffle.
W4: plain gradient descent on the 2-D Rosenbrock function from (-1.2, 1), lr 1e-3, 100,000 steps.

References, measured in the same run, interleaved round by round:
* a hand-written whole-fit Numba function, rows of X in a row-major (N, d) array, the
  per-epoch shuffle by numba's ``np.random.shuffle`` (what one would write first);
* the same with column arrays and calcml's SplitMix64 shuffle, so its final cost must agree
  with calcml's to rounding ("same final cost");
* W4: a hand-written Numba loop over two float locals.

calcml rows: ``prog.run`` (the generated program, validated inputs, result object) and
``cm.minimize`` (the same plus the method/schedule lookup). Both include calcml's full cost
at x0 and at the end (``res.fun``), which the references do not compute, and on W3 the
default ``tol``'s test of the full gradient at each epoch's end (one more pass over the
data per epoch; the ``tol=0`` row skips it).

JAX+optax and PyTorch rows are written only when those packages are installed (they are
optional; the lead's machine has neither at the time of writing).

Run:  .venv/bin/python benchmarks/optimizers.py [--quick] [--w3 | --w4] [--rounds N]
"""

from __future__ import annotations

import os
import sys

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import calcml as cm  # noqa: E402
from calcml import loop as _loop  # noqa: E402

# W3 and W4 time the compiled loops: a loop without data (W4's) would start in the Python tier
_loop.TIER_UP_SECONDS = 0.0
from _common import load_avg, machine_line, measure_interleaved, table  # noqa: E402

N, D = 100_000, 8
LR, MOMENTUM, BATCH, EPOCHS = 0.01, 0.9, 64, 10
W4_LR, W4_STEPS = 1e-3, 100_000

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


# -- W3 references ---------------------------------------------------------------------------
@numba.njit(cache=True, fastmath=False, error_model="numpy")
def fit_rows(X, y, theta0, lr, mom, batch, epochs, seed):
    """Hand-written minibatch Nesterov fit: X row-major (N, d), bias last in theta."""
    np.random.seed(seed)
    n, d = X.shape
    theta = theta0.copy()
    m = np.zeros(d + 1)
    g = np.zeros(d + 1)
    perm = np.arange(n)
    for epoch in range(epochs):
        np.random.shuffle(perm)
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            g[:] = 0.0
            for i in range(start, stop):
                r = perm[i]
                pred = theta[d]
                for k in range(d):
                    pred += theta[k] * X[r, k]
                res = 2.0 * (pred - y[r])
                for k in range(d):
                    g[k] += res * X[r, k]
                g[d] += res
            inv = 1.0 / (stop - start)
            for k in range(d + 1):
                gk = g[k] * inv
                m[k] = mom * m[k] + gk
                theta[k] -= lr * (gk + mom * m[k])
    return theta


@numba.njit(cache=True, fastmath=False, error_model="numpy")
def _randbelow(rng, n):
    z = rng[0] + _GOLDEN
    rng[0] = z
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return np.int64(z % np.uint64(n))


@numba.njit(cache=True, fastmath=False, error_model="numpy")
def fit_columns(cols, y, theta0, lr, mom, batch, epochs, seed):
    """Hand-written fit on column arrays with calcml's SplitMix64 shuffle (same row order)."""
    n = y.shape[0]
    d = len(cols)
    theta = theta0.copy()
    m = np.zeros(d + 1)
    g = np.zeros(d + 1)
    perm = np.arange(n)
    rng = np.array([seed], dtype=np.uint64)
    for epoch in range(epochs):
        for i in range(n - 1, 0, -1):
            k = _randbelow(rng, i + 1)
            t = perm[i]
            perm[i] = perm[k]
            perm[k] = t
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            g[:] = 0.0
            for i in range(start, stop):
                r = perm[i]
                pred = theta[d]
                for k in range(d):
                    pred += theta[k] * cols[k][r]
                res = 2.0 * (pred - y[r])
                for k in range(d):
                    g[k] += res * cols[k][r]
                g[d] += res
            inv = 1.0 / (stop - start)
            for k in range(d + 1):
                gk = g[k] * inv
                m[k] = mom * m[k] + gk
                theta[k] -= lr * (gk + mom * m[k])
    return theta


# -- W4 reference ----------------------------------------------------------------------------
@numba.njit(cache=True, fastmath=False, error_model="numpy")
def rosen_gd(a, b, lr, steps):
    """Hand-written gradient descent on Rosenbrock, two float locals."""
    for _ in range(steps):
        t = b - a * a
        ga = -2.0 * (1.0 - a) - 400.0 * a * t
        gb = 200.0 * t
        a -= lr * ga
        b -= lr * gb
    return a, b


class _LoopOnly:
    """The generated run_segment alone, on a state set up (untimed) before each call: what the
    compiled loop costs without calcml's Python around it (validation, the state's arrays,
    the report's dict and the result object). One call does the whole run here: the cost at
    x0, every step and the final cost (run_segment's first call evaluates x0, its last writes
    the report)."""

    def __init__(self, prog, x0, columns, kw):
        self.m = prog.module
        self.x0, self.kw = x0, kw
        self.cols = self.m.columns_of(columns)
        self.args = None

    def setup(self, name):
        if not name.startswith("calcml compiled loop"):
            return
        m, kw = self.m, self.kw
        n_rows = self.cols[0].shape[0] if m.COLUMN_NAMES else 0
        max_steps, max_epochs, _ = m.plan(n_rows, kw.get("batch_size"), kw.get("epochs"), kw.get("maxiter"))
        sa = [LR] if m.MINIBATCH else [W4_LR]
        hyper = {"momentum": MOMENTUM} if m.HYPER_NAMES else {}
        self.args = m.new_state(self.x0, self.cols, hyper, sa, kw.get("batch_size"), max_steps, max_epochs,
                                kw.get("tol", 1e-8), kw.get("seed", 0))
        self.args[1][m.I_STOP] = max_steps  # args[1]: the counters (m.SEGMENT_ARGS)

    def __call__(self):
        if self.args is None:
            self.setup("calcml compiled loop")
        return self.m.run_segment(*self.args)


def w3(rounds: int):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D))
    y = X @ rng.normal(size=D) + 0.5 + 0.1 * rng.normal(size=N)
    w = cm.params("w", D)
    b = cm.params("b")
    x = cm.data("x", D)
    yy = cm.data("y")
    cost = cm.Cost((cm.dot(w, x) + b - yy) ** 2, params=[*w, b], data=[*x, yy])
    data = {f"x{k}": np.ascontiguousarray(X[:, k]) for k in range(D)}
    data["y"] = y
    cols = tuple(data[f"x{k}"] for k in range(D))
    x0 = np.zeros(D + 1)
    opt = cm.optim.nesterov(lr=LR, momentum=MOMENTUM)
    prog = cm.generate(cost, method=opt, batch_size=BATCH)

    def mse(theta):
        r = X @ theta[:D] + theta[D] - y
        return float(np.mean(r * r))

    loop = _LoopOnly(prog, x0, cols + (y,), dict(epochs=EPOCHS, seed=0, batch_size=BATCH))
    fns = {
        "calcml prog.run": lambda: prog.run(x0, data, epochs=EPOCHS, seed=0),
        "calcml prog.run, tol=0 (no full-gradient pass per epoch)": lambda: prog.run(x0, data, epochs=EPOCHS, seed=0, tol=0.0),
        "calcml compiled loop alone (run_segment)": loop,
        "calcml cm.minimize": lambda: cm.minimize(cost, x0, data=data, method=opt, batch_size=BATCH, epochs=EPOCHS, seed=0),
        "hand-written Numba, rows + np.random.shuffle": lambda: fit_rows(X, y, x0, LR, MOMENTUM, BATCH, EPOCHS, 0),
        "hand-written Numba, columns + SplitMix64": lambda: fit_columns(cols, y, x0, LR, MOMENTUM, BATCH, EPOCHS, 0),
    }
    res = fns["calcml prog.run"]()
    f_cols = mse(fns["hand-written Numba, columns + SplitMix64"]())
    f_rows = mse(fns["hand-written Numba, rows + np.random.shuffle"]())
    timings = measure_interleaved(fns, rounds=rounds, budget=30.0, setup=loop.setup)
    ref = timings["hand-written Numba, rows + np.random.shuffle"]
    print(table(f"W3: minibatch Nesterov, N={N:,}, d={D}+bias, batch {BATCH}, {EPOCHS} epochs", list(timings.values()), ref))
    print(f"final cost: calcml {res.fun:.12g} | hand-written, same shuffle {f_cols:.12g} "
          f"(rel. diff {abs(res.fun - f_cols) / f_cols:.1e}) | hand-written, numba shuffle {f_rows:.12g}")
    best_ref = min(t.median for name, t in timings.items() if name.startswith("hand"))
    print(f"calcml prog.run speed relative to the faster hand-written fit: {best_ref / timings['calcml prog.run'].median:.2f}x "
          "(target >= 1.0x: ../shared/BENCHMARKS.md)")
    print()


def w4(rounds: int):
    a, b = cm.params("a b")
    cost = cm.Cost((1 - a) ** 2 + 100 * (b - a**2) ** 2, params=[a, b])
    prog = cm.generate(cost, method="gd", lr=W4_LR)
    x0 = np.array([-1.2, 1.0])
    loop = _LoopOnly(prog, x0, None, dict(maxiter=W4_STEPS, tol=0.0))
    fns = {
        "calcml prog.run": lambda: prog.run(x0, maxiter=W4_STEPS, tol=0.0),
        "calcml cm.minimize": lambda: cm.minimize(cost, x0, method="gd", lr=W4_LR, maxiter=W4_STEPS, tol=0.0),
        "calcml compiled loop alone (run_segment)": loop,
        "hand-written Numba loop": lambda: rosen_gd(-1.2, 1.0, W4_LR, W4_STEPS),
    }
    res = fns["calcml prog.run"]()
    ra, rb = fns["hand-written Numba loop"]()
    timings = measure_interleaved(fns, rounds=rounds, budget=20.0, setup=loop.setup)
    ref = timings["hand-written Numba loop"]
    print(table(f"W4: gradient descent on Rosenbrock, lr {W4_LR}, {W4_STEPS:,} steps", list(timings.values()), ref))
    print(f"final point: calcml {res.x.tolist()} | hand-written {[ra, rb]} | identical bits: "
          f"{res.x.tolist() == [ra, rb]}")
    print(f"calcml prog.run speed relative to the hand-written loop: {ref.median / timings['calcml prog.run'].median:.2f}x "
          "(target >= 1.0x: ../shared/BENCHMARKS.md)")
    print()


def optional_rows():
    missing = []
    for pkg in ("jax", "optax", "torch"):
        try:
            __import__(pkg)
        except ImportError:
            missing.append(pkg)
    if missing:
        print(f"JAX/optax and PyTorch rows skipped: not installed ({', '.join(missing)}); they are optional extras.")


def main():
    import argparse

    ap = argparse.ArgumentParser(description="W3 and W4: calcml's compiled optimizers against hand-written Numba.")
    ap.add_argument("--quick", action="store_true", help="5 rounds instead of 21")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 21)")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--w3", action="store_true", help="W3 only (minibatch Nesterov)")
    only.add_argument("--w4", action="store_true", help="W4 only (gradient descent on Rosenbrock)")
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 21)
    print(machine_line())
    print(f"load average before: {load_avg()}")
    print()
    if not args.w3:
        w4(rounds)
    if not args.w4:
        w3(rounds)
        optional_rows()
    print(f"load average after: {load_avg()}")


if __name__ == "__main__":
    main()
