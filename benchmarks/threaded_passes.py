"""Full-batch fits over large data: each pass on calcml's threads (the kernels, called back
from the compiled loop), and the kernels right after a fit.

Linear regression, 8 features + bias, N = 400,000 rows (28.8 MB of columns), 2 threads:

* ``fit``: 100 momentum steps, each a full-data value-and-gradient pass;
* ``lbfgs``: 15 L-BFGS iterations (a line search: one or more passes each);
* ``kernels``: 20 ``k.value_and_grad`` calls on prepared data;
* ``mixed``: a 20-step fit, 20 kernel calls and a NumPy sort: other work between calcml's
  threaded passes, where idle threads that spin would take the cores from it.

Run it with another checkout's calcml for an A/B (``PYTHONPATH=/path/to/other/checkout``);
the line "Numba threading layer started" says whether Numba's own threads (OpenMP) ran.

    python benchmarks/threaded_passes.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_avg, machine_line  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, default=400_000)
    a = ap.parse_args()
    import calcml as cm
    from numba.np.ufunc import parallel

    w = cm.params("w", 8)
    b = cm.params("b")
    x = cm.data("x", 8)
    y = cm.data("y")
    cost = cm.Cost((cm.dot(w, x) + b - y) ** 2, params=[*w, b], data=[*x, y])
    rng = np.random.default_rng(0)
    X = rng.standard_normal((a.rows, 8))
    Y = X @ np.arange(8.0) + 0.5 + 0.1 * rng.standard_normal(a.rows)
    D = {**{f"x{i}": X[:, i].copy() for i in range(8)}, "y": Y}
    k = cm.compile(cost)
    ds = k.prepare(D)
    prog = cm.generate(cost, method="momentum", lr=0.01)
    prog.run(np.zeros(9), D, maxiter=5, tol=0.0)  # compile or load
    cm.minimize(cost, np.zeros(9), data=D, method="lbfgs", maxiter=2, tol=0.0)

    def fit():
        prog.run(np.zeros(9), D, maxiter=100, tol=0.0)

    def kernels():
        for _ in range(20):
            k.value_and_grad(np.zeros(9), ds)

    def mixed():
        prog.run(np.zeros(9), D, maxiter=20, tol=0.0)
        for _ in range(20):
            k.value_and_grad(np.zeros(9), ds)
        np.sort(rng.standard_normal(200_000))

    def lbfgs():
        cm.minimize(cost, np.zeros(9), data=D, method="lbfgs", maxiter=15, tol=0.0)

    print(machine_line())
    print(f"calcml from {os.path.dirname(cm.__file__)}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')!r}")
    print("\n| what | median | min | rounds |\n|---|---:|---:|---:|")
    for name, fn in [("fit: 100 momentum steps", fit), ("kernels: 20 value_and_grad", kernels),
                     ("mixed: 20 steps, 20 kernel calls, a sort", mixed), ("lbfgs: 15 iterations", lbfgs)]:
        times = []
        for _ in range(a.rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        print(f"| {name} | {np.median(times) * 1e3:.2f} ms | {min(times) * 1e3:.2f} ms | {a.rounds} |")
    print(f"\nNumba threading layer started: {bool(getattr(parallel, '_is_initialized', False))}; "
          f"load average after: {load_avg()}")


if __name__ == "__main__":
    main()
