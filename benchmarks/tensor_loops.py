"""Warm first-order fits of tensor costs: the loop's speed, not its build.

Since 2026-12-04 a tensor cost's full-batch first-order loop is calcml.loop's ``run_segment``
around the cost's kernels (calcml/tensor/loops.py); before, it was ``_full_steps`` behind
``loop_c`` (calcml/tensor/optimize.py). Since 2026-12-04 21:38 its minibatch loops are too (before:
``_epoch`` behind ``loop_c``, with a Python driver between epochs). This times whole fits with a warm cache (an untimed
fit first; ``calcml.loop.TIER_UP_SECONDS = 0``: the loop's machine code, not its Python tier),
interleaved, median of ``--rounds``:

- digits softmax (650 parameters, 1,797 rows), ``gd`` lr 0.5, 200 steps;
- breast cancer logistic regression in index form (31 parameters, 569 rows), ``momentum``
  lr 0.01, 2,000 steps;
- chained Rosenbrock in index form (1,000 parameters, no data), ``gd`` lr 1e-4, 2,000 steps;
- minibatches (the default tol, 1e-8: a full pass at each epoch's end): the digits softmax,
  ``adam`` lr 0.01, batches of 32, 10 epochs; breast cancer, ``sgd`` lr 0.05, batches of 16,
  20 epochs.

Run it from a worktree of an older commit too (``PYTHONPATH=<tree>``) to compare.

Run:  .venv/bin/python benchmarks/tensor_loops.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import load_avg, machine_line  # noqa: E402


def fits():
    import calcml as cm
    from sklearn.datasets import load_breast_cancer, load_digits

    X, labels = load_digits(return_X_y=True)
    X = X / 16.0
    N, d = X.shape
    K = 10
    W = cm.params("W", shape=(K, d)); b = cm.params("b", shape=(K,))
    x = cm.data("x", shape=(d,)); c = cm.data("c", classes=K)
    k = cm.index("k", K); j = cm.index("j", d)
    z = cm.sum(W[k, j] * x[j], j) + b[k]
    digits = cm.Cost(cm.logsumexp(z, k) - cm.sum(cm.onehot(c, k) * z, k), params=[W, b], data=[x, c],
                     penalty=cm.sum(W[k, j] ** 2, k, j) / (2 * N))
    Xb, yb = load_breast_cancer(return_X_y=True)
    Xb = (Xb - Xb.mean(0)) / Xb.std(0)
    w = cm.params("w", shape=(Xb.shape[1],)); b0 = cm.params("b")
    xb = cm.data("x", shape=(Xb.shape[1],)); y = cm.data("y")
    zb = cm.dot(w, xb) + b0
    logistic = cm.Cost(cm.softplus(zb) - y * zb, params=[w, b0], data=[xb, y])
    n = 1000
    xs = cm.params("x", shape=(n,)); i = cm.index("i", n - 1)
    chained = cm.Cost(cm.sum((1 - xs[i]) ** 2 + 100 * (xs[i + 1] - xs[i] ** 2) ** 2, i), params=[xs])
    x0 = np.where(np.arange(n) % 2 == 0, -1.2, 1.0)
    return {
        "digits softmax, gd, 200 steps": lambda: cm.minimize(
            digits, np.zeros(digits.n_params), data={"x": X, "c": labels}, method="gd", lr=0.5, maxiter=200, tol=0.0),
        "breast cancer (index), momentum, 2,000 steps": lambda: cm.minimize(
            logistic, np.zeros(logistic.n_params), data={"x": Xb, "y": yb.astype(float)}, method="momentum", lr=0.01,
            maxiter=2000, tol=0.0),
        "chained Rosenbrock 1,000 (index), gd, 2,000 steps": lambda: cm.minimize(
            chained, x0, method="gd", lr=1e-4, maxiter=2000, tol=0.0),
        "digits softmax, adam, batches of 32, 10 epochs": lambda: cm.minimize(
            digits, np.zeros(digits.n_params), data={"x": X, "c": labels}, method="adam", lr=0.01, batch_size=32,
            epochs=10),
        "breast cancer (index), sgd, batches of 16, 20 epochs": lambda: cm.minimize(
            logistic, np.zeros(logistic.n_params), data={"x": Xb, "y": yb.astype(float)}, method="sgd", lr=0.05,
            batch_size=16, epochs=20),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args(argv)
    os.environ.setdefault("CALCML_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".bench-cache"))
    from calcml import loop

    loop.TIER_UP_SECONDS = 0.0
    runs = fits()
    results = {name: fn() for name, fn in runs.items()}  # warm-up: build or load
    times = {name: [] for name in runs}
    for _ in range(a.rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    import calcml

    print(machine_line())
    print(f"\n### Warm tensor fits ({os.path.dirname(calcml.__file__)}; load avg {load_avg()})\n")
    print("| fit | median | min–max | cost reached |")
    print("|---|---:|---:|---:|")
    for name in runs:
        t = np.array(times[name]) * 1e3
        print(f"| {name} | {np.median(t):.1f} ms | {t.min():.1f}–{t.max():.1f} | {results[name].fun:.10g} |")


if __name__ == "__main__":
    main()
