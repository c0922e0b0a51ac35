"""W5: latency from a Cost to the first gradient value, in a fresh process.

Each measurement is a new Python process (the same interpreter as this script):

- imports alone: ``import numpy, numba, sympy`` (the floor every calcml process pays);
- hand-written Numba: a W1 value+grad kernel ``njit(cache=True)`` compiled and called
  once, cold (empty NUMBA_CACHE_DIR) and warm (second process, same cache): the floor
  for what loading a cached Numba kernel costs;
- calcml: ``import numpy, numba, sympy`` (the same imports, timed), then ``import calcml``,
  the Cost, ``k = cm.compile(cost); k.value_and_grad(theta, data)`` for W1 (and W2), cold
  (empty CALCML_CACHE_DIR) and warm (a second process on the same cache directory).
  "Cost to gradient" starts once the Cost exists and ends when the first (value,
  gradient) is back; "beyond the imports" starts after the three imports (so it also
  counts ``import calcml`` and stating the Cost); the whole process's wall time is beside.

Targets (../shared/BENCHMARKS.md): warm under 0.3 s beyond the imports; cold under 2 s
for W1's cost. JAX's first call is reported when JAX is installed.

Run:  python benchmarks/latency.py [--quick] [--repeat 3] [--workloads W1,W2] [--first-fits]

``--first-fits`` adds issue 11's build targets (``first_fit.py``, run here with its defaults
and ``--digits --warm``): breast cancer's logistic regression (31 parameters), in scalar symbols
and in index form, from stating the cost to the first result of ``cm.minimize`` with each
method, and its Hessian kernel, in a fresh process with an empty cache (target: under 5 s
each); the digits softmax (650 parameters), ``lbfgs`` (target: under 10 s).

The trivial-function row's "Cost → first gradient" column is the first call of a
one-line njit function: Numba's one-time start-up (typing and target contexts) plus a
tiny compile, which every process pays before its first kernel runs, cached or not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _common import fmt_time, load_avg, machine_line  # noqa: E402

# --------------------------------------------------------------------------------------
# child programs: each prints one JSON line with its timings (seconds)
# --------------------------------------------------------------------------------------
PRELUDE = """
import time
_t_start = time.perf_counter()
import json, os, sys
sys.path.insert(0, {root!r})
"""

CHILD_IMPORTS = PRELUDE + """
t0 = time.perf_counter()
import numpy, numba, sympy
t1 = time.perf_counter()
@numba.njit
def one():
    return 1
one()
t2 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "to_gradient": t2 - t1, "process": t2 - _t_start}}))
"""

CHILD_NUMBA = PRELUDE + """
t0 = time.perf_counter()
import numpy as np, numba, sympy
t1 = time.perf_counter()
from numba import njit, prange

@njit(cache=True, parallel={parallel}, error_model="numpy")
def vg(theta, X):
    n = X.shape[1]
    w0 = theta[0]; w1 = theta[1]; w2 = theta[2]; w3 = theta[3]
    w4 = theta[4]; w5 = theta[5]; w6 = theta[6]; w7 = theta[7]; b = theta[8]
    nch = (n + 16383) // 16384
    part = np.empty((nch, 10))
    for c in prange(nch):
        lo = c * 16384
        hi = min(lo + 16384, n)
        f = g0 = g1 = g2 = g3 = g4 = g5 = g6 = g7 = gb = 0.0
        for k in range(lo, hi):
            i = np.uintp(k)
            x0 = X[0, i]; x1 = X[1, i]; x2 = X[2, i]; x3 = X[3, i]
            x4 = X[4, i]; x5 = X[5, i]; x6 = X[6, i]; x7 = X[7, i]; y = X[8, i]
            r = w0*x0 + w1*x1 + w2*x2 + w3*x3 + w4*x4 + w5*x5 + w6*x6 + w7*x7 + b - y
            f += r*r
            g0 += r*x0; g1 += r*x1; g2 += r*x2; g3 += r*x3
            g4 += r*x4; g5 += r*x5; g6 += r*x6; g7 += r*x7; gb += r
        part[c, 0] = f; part[c, 1] = g0; part[c, 2] = g1; part[c, 3] = g2; part[c, 4] = g3
        part[c, 5] = g4; part[c, 6] = g5; part[c, 7] = g6; part[c, 8] = g7; part[c, 9] = gb
    out = np.zeros(10)
    for c in range(nch):
        for k in range(10):
            out[k] += part[c, k]
    return out[0] / n, 2.0 * out[1:] / n

rng = np.random.default_rng(0)
X = rng.standard_normal((9, 1000))
theta = rng.standard_normal(9)
t2 = time.perf_counter()
f, g = vg(theta, X)
t3 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "to_gradient": t3 - t2, "process": t3 - _t_start}}))
"""

CHILD_CALCML = PRELUDE + """
t0 = time.perf_counter()
import numpy as np, numba, sympy  # the reference's imports
t1 = time.perf_counter()
import calcml as cm
t1c = time.perf_counter()
D = 8
w = cm.params("w", D); b = cm.params("b"); x = cm.data("x", D); y = cm.data("y")
z = cm.dot(w, x) + b
expr = (z - y)**2 if {workload!r} == "W1" else cm.softplus(z) - y*z
cost = cm.Cost(expr, params=[*w, b], data=[*x, y])
rng = np.random.default_rng(0)
data = {{s.name: rng.standard_normal(1000) for s in cost.data}}
theta = rng.standard_normal(D + 1)
t2 = time.perf_counter()
k = cm.compile(cost, **{kw!r})
t3 = time.perf_counter()
f, g = k.value_and_grad(theta, data)
t4 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "import_calcml": t1c - t1, "cost": t2 - t1c, "compile": t3 - t2,
                  "first_call": t4 - t3, "to_gradient": t4 - t2, "beyond_imports": t4 - t1,
                  "process": t4 - _t_start}}))
"""

CHILD_JAX = PRELUDE + """
t0 = time.perf_counter()
import jax, jax.numpy as jnp
t1 = time.perf_counter()
jax.config.update("jax_enable_x64", True)
def loss(theta, X, y):
    r = X @ theta[:8] + theta[8] - y
    return jnp.mean(r * r)
vg = jax.jit(jax.value_and_grad(loss))
import numpy as np
rng = np.random.default_rng(0)
X = rng.standard_normal((1000, 8)); yy = rng.standard_normal(1000); theta = rng.standard_normal(9)
t2 = time.perf_counter()
f, g = vg(theta, X, yy); g.block_until_ready()
t3 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "to_gradient": t3 - t2, "process": t3 - _t_start}}))
"""


def run_child(src: str, env_extra: dict, timeout: float = 300.0) -> dict:
    env = dict(os.environ)
    env.update(env_extra)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(src)], env=env, capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"child failed ({p.returncode}):\n{p.stderr[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall"] = wall
    return out


def summarize(vals: list) -> str:
    if not vals:
        return ""
    med = statistics.median(vals)
    return f"{fmt_time(med)} ({fmt_time(min(vals))}–{fmt_time(max(vals))})"


def calcml_available() -> tuple[bool, str, bool]:
    """(compile importable, note, compile takes parallel=)."""
    code = ("import sys, inspect; sys.path.insert(0, %r); import calcml as cm; c = cm.compile; "
            "print('parallel' in inspect.signature(c).parameters)" % ROOT)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"calcml rows skipped: calcml.compile is not importable yet ({last})", False
    return True, "", p.stdout.strip() == "True"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repeats, W1 only")
    ap.add_argument("--repeat", type=int, default=3, help="processes per row (default 3)")
    ap.add_argument("--workloads", default="W1,W2")
    ap.add_argument("--first-fits", action="store_true",
                    help="also issue 11's first fits (first_fit.py --digits --warm): each method, fresh process")
    a = ap.parse_args(argv)
    repeat = 2 if a.quick else a.repeat
    workloads = ["W1"] if a.quick else [w.strip().upper() for w in a.workloads.split(",")]

    print("# W5: latency from a Cost to the first gradient, fresh processes\n")
    print("Command: " + " ".join([os.path.relpath(sys.executable), *sys.argv]) + "\n")
    print(f"{machine_line()} | load avg at start {load_avg()}\n")
    rows = []  # (label, {metric: [values]})
    notes = []
    fmt = {"root": ROOT}

    def collect(label, src, env_for_run, n=repeat):
        vals: dict = {}
        for i in range(n):
            try:
                out = run_child(src, env_for_run(i))
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{label}: {exc}")
                return
            for k, v in out.items():
                vals.setdefault(k, []).append(v)
        rows.append((label, vals))

    collect("import numpy + numba + sympy alone (then a trivial njit function's first call)",
            CHILD_IMPORTS.format(**fmt), lambda i: {})

    for parallel in (False, True):
        tmp = tempfile.mkdtemp(prefix="calcml-w5-numba-")
        try:
            colds = [tempfile.mkdtemp(dir=tmp) for _ in range(repeat)]
            src = CHILD_NUMBA.format(parallel=parallel, **fmt)
            # Numba caches only functions defined in a file: write the kernel to one
            path = os.path.join(tmp, "w1_kernel.py")
            with open(path, "w") as fh:
                fh.write(textwrap.dedent(src))
            label = f"hand-written Numba W1 kernel, njit(cache=True, parallel={parallel})"
            collect(f"{label}, cold", _file_runner(path), lambda i: {"NUMBA_CACHE_DIR": colds[i]})
            collect(f"{label}, warm", _file_runner(path), lambda i: {"NUMBA_CACHE_DIR": colds[0]})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    ok, note, has_parallel = calcml_available()
    if not ok:
        notes.append(note)
    else:
        kws = [{}] + ([{"parallel": True}] if has_parallel else [])
        for workload in workloads:
            for kw in kws:
                tmp = tempfile.mkdtemp(prefix="calcml-w5-")
                try:
                    colds = [tempfile.mkdtemp(dir=tmp) for _ in range(repeat)]
                    src = CHILD_CALCML.format(workload=workload, kw=kw, **fmt)
                    label = f"calcml {workload}" + (f", compile(cost, {', '.join(f'{k}={v}' for k, v in kw.items())})" if kw else "")
                    collect(f"{label}, cold", src, lambda i: {"CALCML_CACHE_DIR": colds[i]})
                    collect(f"{label}, warm", src, lambda i: {"CALCML_CACHE_DIR": colds[0]})
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)

    try:
        import importlib.util

        has_jax = importlib.util.find_spec("jax") is not None
    except Exception:  # noqa: BLE001
        has_jax = False
    if has_jax:
        collect("JAX jit(value_and_grad) W1, first call", CHILD_JAX.format(**fmt), lambda i: {})
    else:
        notes.append("JAX is not installed: no JAX row")

    base = statistics.median(rows[0][1]["imports"]) if rows and "imports" in rows[0][1] else None
    print(f"### W5 latency, {repeat} fresh processes per row: median (min–max); load avg {load_avg()}\n")
    print("| what | imports (numpy, numba, sympy) | Cost → first gradient | of which compile | "
          "of which first call | beyond the imports (import calcml + Cost + gradient) | "
          "whole process (in-process) | process wall incl. interpreter start |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, v in rows:
        print(f"| {label} | {summarize(v.get('imports', []))} | {summarize(v.get('to_gradient', []))} | "
              f"{summarize(v.get('compile', []))} | {summarize(v.get('first_call', []))} | "
              f"{summarize(v.get('beyond_imports', []))} | "
              f"{summarize(v.get('process', []))} | {summarize(v.get('wall', []))} |")
    print()
    if base is not None:
        print(f"Imports alone (numpy + numba + sympy): {fmt_time(base)} median. Every calcml child "
              "imports the same three first, then calcml; 'beyond the imports' runs from there to the "
              "first gradient (import calcml, stating the Cost, compile, first call).\n")
    for n in notes:
        print(f"- {n}")
    if a.first_fits:
        import first_fit

        print()
        first_fit.main(["--digits", "--warm"])


def _file_runner(path: str) -> str:
    """A child program that runs the kernel file as __main__ so Numba can cache it."""
    return f"import runpy; runpy.run_path({path!r}, run_name='__main__')"


if __name__ == "__main__":
    main()
