"""Shifted reads in index notation: an AR(P) model over series, and chained Rosenbrock.

- AR(P): per row a series of T values, the residuals ``s[t + P] - sum_l a[l] s[t + l]`` (a read
  at a sum of indices: a convolution), value + gradient over N rows, against NumPy's
  ``sliding_window_view`` with a matrix-vector product and an einsum (the same sums), in the
  same run; the cold build beside.
- chained Rosenbrock in n parameters (``x[i + 1]``), value + gradient, against NumPy's slices.

Run:  .venv/bin/python benchmarks/windows.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import numpy as np  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402

from _common import load_avg, machine_line, measure_interleaved, table  # noqa: E402


def ar(rounds: int, T=128, P=16, N=20_000):
    import calcml as cm

    t0 = time.perf_counter()
    s = cm.data("s", shape=(T,))
    a = cm.params("a", shape=(P,))
    t, l = cm.index("t", T - P), cm.index("l", P)
    cost = cm.Cost(cm.sum((s[t + P] - cm.sum(a[l] * s[t + l], l)) ** 2, t), params=[a], data=[s])
    S = np.random.default_rng(0).standard_normal((N, T))
    th = 0.1 * np.random.default_rng(1).standard_normal(P)
    k = cm.compile(cost)
    data = k.prepare({"s": S})
    f, g = k.value_and_grad(th, data)
    cold = time.perf_counter() - t0

    def numpy_vg(a):
        W = sliding_window_view(S, P, axis=1)[:, :T - P, :]  # (N, T-P, P): s[t + l]
        r = S[:, P:] - W @ a
        return np.sum(r * r) / N, -2 * np.einsum("ntl,nt->l", W, r) / N

    fr, gr = numpy_vg(th)
    timings = measure_interleaved({"calcml value_and_grad (prepared)": lambda: k.value_and_grad(th, data),
                                   "NumPy sliding_window_view": lambda: numpy_vg(th)}, rounds=rounds,
                                  nbytes=S.nbytes)
    print(table(f"AR({P}) over {N:,} series of {T}: value + gradient", list(timings.values()),
                timings["NumPy sliding_window_view"]))
    print(f"cold (Cost to first gradient, this process's cache): {cold:.2f} s; relative difference of the value "
          f"{abs(f - fr) / fr:.1e}, of the gradient {np.abs(g - gr).max() / np.abs(gr).max():.1e}\n")


def chained(rounds: int, n=100_000):
    import calcml as cm

    x = cm.params("x", shape=(n,))
    i = cm.index("i", n - 1)
    k = cm.compile(cm.Cost(cm.sum((1 - x[i]) ** 2 + 100 * (x[i + 1] - x[i] ** 2) ** 2, i), params=[x]))
    th = np.linspace(-1.5, 1.5, n)

    def numpy_vg(t):
        d = t[1:] - t[:-1] ** 2
        f = np.sum((1 - t[:-1]) ** 2 + 100 * d * d)
        g = np.zeros(n)
        g[:-1] = -2 * (1 - t[:-1]) - 400 * t[:-1] * d
        g[1:] += 200 * d
        return f, g

    timings = measure_interleaved({"calcml value_and_grad": lambda: k.value_and_grad(th),
                                   "NumPy slices": lambda: numpy_vg(th)}, rounds=rounds, nbytes=th.nbytes)
    print(table(f"chained Rosenbrock, {n:,} parameters: value + gradient", list(timings.values()),
                timings["NumPy slices"]))
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    print(machine_line())
    print(f"load average at start {load_avg()}\n")
    ar(a.rounds)
    chained(a.rounds)


if __name__ == "__main__":
    main()
