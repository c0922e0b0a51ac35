"""Issue 11's table re-measured: logistic regression with d features, 20,000 rows.

For each d and each statement (``index``: ``cm.params("w", shape=(d,))``; ``scalar``:
``cm.params("w", d)`` with ``cm.dot``, which calcml restates in index notation from 16
parameters on), one fresh process with an empty cache measures the first gradient (from
stating the Cost), then times the warm ``value_and_grad`` (on the data as given, and on
``k.prepare(data)``: validated and laid out once, as a fit does) against a NumPy vectorised
value and gradient of the same cost, interleaved, medians.

Run:  .venv/bin/python benchmarks/logreg_sizes.py [--sizes 16,64,128,256] [--forms index,scalar]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _common import load_avg, machine_line  # noqa: E402

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
import numpy as np, sympy as sp, numba
from _common import measure_interleaved
d, form, N = {d}, {form!r}, 20_000
rng = np.random.default_rng(0)
X = rng.standard_normal((N, d)); y = (rng.random(N) < 0.5).astype(float)
t0 = time.perf_counter()
import calcml as cm
if form == "index":
    w = cm.params("w", shape=(d,)); b = cm.params("b"); x = cm.data("x", shape=(d,)); yy = cm.data("y")
    cost = cm.Cost(cm.softplus(cm.dot(w, x) + b) - yy * (cm.dot(w, x) + b), params=[w, b], data=[x, yy])
    data = {{"x": X, "y": y}}
else:
    w = cm.params("w", d); b = cm.params("b"); x = cm.data("x", d); yy = cm.data("y")
    z = cm.dot(w, x) + b
    cost = cm.Cost(cm.softplus(z) - yy * z, params=[*w, b], data=[*x, yy])
    data = {{**{{f"x{{q}}": X[:, q] for q in range(d)}}, "y": y}}
theta = 0.1 * rng.standard_normal(d + 1)
t1 = time.perf_counter()
k = cm.compile(cost)
f, g = k.value_and_grad(theta, data)
t2 = time.perf_counter()

def numpy_vg():
    z = X @ theta[:d] + theta[d]
    p = 1 / (1 + np.exp(-z))
    return np.mean(np.logaddexp(0, z) - y * z), np.concatenate([X.T @ (p - y) / N, [np.mean(p - y)]])

fr, gr = numpy_vg()
assert abs(f - fr) <= 1e-12 * abs(fr) and np.max(np.abs(g - gr)) <= 1e-10
prepared = k.prepare(data)
t = measure_interleaved({{"calcml": lambda: k.value_and_grad(theta, data), "numpy": numpy_vg,
                         "prepared": lambda: k.value_and_grad(theta, prepared)}}, rounds=21, warm=True)
print(json.dumps({{"first": t2 - t1, "calcml": t["calcml"].median, "numpy": t["numpy"].median,
                  "prepared": t["prepared"].median}}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16,64,128,256")
    ap.add_argument("--forms", default="index,scalar")
    a = ap.parse_args(argv)
    print(f"Command: .venv/bin/python benchmarks/logreg_sizes.py {' '.join(argv or sys.argv[1:])}\n")
    print(machine_line())
    print(f"\n### Logistic regression, 20,000 rows (load avg at start {load_avg()})\n")
    print("| d | statement | first gradient (cold) | warm value_and_grad | prepared data | NumPy | "
          "speed vs NumPy (raw / prepared) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for d in map(int, a.sizes.split(",")):
        for form in a.forms.split(","):
            with tempfile.TemporaryDirectory() as cache:
                src = CHILD.format(root=ROOT, here=HERE, d=d, form=form)
                out = subprocess.run([sys.executable, "-c", src], env=dict(os.environ, CALCML_CACHE_DIR=cache),
                                     capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                print(f"| {d} | {form} | failed: {out.stderr.strip().splitlines()[-1][:100]} | | | |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {d} | {form} | {r['first']:.2f} s | {1e3 * r['calcml']:.2f} ms | {1e3 * r['prepared']:.2f} ms | "
                  f"{1e3 * r['numpy']:.2f} ms | {r['numpy'] / r['calcml']:.2f}× / {r['numpy'] / r['prepared']:.2f}× |",
                  flush=True)


if __name__ == "__main__":
    main()
