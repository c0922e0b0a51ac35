"""W6: symbolic scale. Gradient + code generation for tanh networks of ~50, ~200, ~1,000 parameters.

calcml: ``kernel_module_source(cost)`` (stable rewrite, reverse-mode sweeps for value and
gradient, printing of every kernel) in a fresh process per size, so nothing is cached.
Reference: plain SymPy, one ``sympy.diff`` per parameter, then ``sympy.cse`` over value and
gradient. Also shown: ``Cost.gradient`` (the closed-form per-parameter derivatives calcml
offers for inspection; computed only when asked for, never by the code generator).

Run:  python benchmarks/symbolic.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
import json, sys, time
import sympy as sp
import calcml as cm
from calcml.codegen import kernel_module_source

hidden, what = int(sys.argv[1]), sys.argv[2]
d = 8
x = cm.data("x", d); y = cm.data("y")
W = [cm.params(f"W{j}_", d) for j in range(hidden)]
c = cm.params("c", hidden); v = cm.params("v", hidden); b = cm.params("b")
out = sum(v[j] * sp.tanh(cm.dot(W[j], x) + c[j]) for j in range(hidden)) + b
params = [p for Wj in W for p in Wj] + list(c) + list(v) + [b]
cost = cm.Cost((out - y) ** 2, params=params, data=[*x, y])
t = time.perf_counter()
if what == "calcml":
    src = kernel_module_source(cost)
    size = src.count("\n")
elif what == "gradient":
    size = len(cost.gradient)
else:  # plain SymPy: diff per parameter, then one cse
    grads = [sp.diff(cost.expr, p) for p in params]
    temps, reduced = sp.cse([cost.expr, *grads], order="none")
    size = len(temps)
print(json.dumps({"params": len(params), "seconds": time.perf_counter() - t, "size": size}))
"""


def run(hidden: int, what: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(hidden), what], env=env, capture_output=True,
                         text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the 1,000-parameter network")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    sizes = [5, 20] if args.quick else [5, 20, 100]  # 51, 201, 1001 parameters (d = 8)
    print(f"W6: tanh network (d = 8), load average {os.getloadavg()}")
    print()
    print("| parameters | implementation | median | min–max | runs | ratio to plain SymPy |")
    print("|---:|---|---:|---:|---:|---:|")
    for h in sizes:
        rows = {}
        for what in ("calcml", "gradient", "sympy"):
            times = [run(h, what)["seconds"] for _ in range(args.repeat)]
            rows[what] = times
        ref = statistics.median(rows["sympy"])
        n = 10 * h + 1
        labels = {"calcml": "calcml codegen (backprop + print)", "gradient": "calcml Cost.gradient (sympy.diff each)",
                  "sympy": "plain sympy.diff + sympy.cse (ref)"}
        for what, times in rows.items():
            med = statistics.median(times)
            print(f"| {n} | {labels[what]} | {med:.2f} s | {min(times):.2f}–{max(times):.2f} s | {len(times)} | {med / ref:.3f}× |")


if __name__ == "__main__":
    main()
