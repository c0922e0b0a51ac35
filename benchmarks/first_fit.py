"""A user's first fit: from stating the cost to the first result, fresh process, empty cache.

Issue 11's build targets, each measured in a new Python process with an empty
CALCML_CACHE_DIR (the imports are timed apart and not counted):

- logistic regression on scikit-learn's breast cancer data (30 features + bias, 569 rows,
  features standardised), with each method of ``cm.minimize``: under 5 s. Two statements:
  ``scalar`` (``w = cm.params("w", 30)``, ``cm.dot(w, x)`` expanded: one symbol per weight,
  the scalar path) and ``index`` (``cm.params("w", shape=(30,))``: the tensor path);
- the Hessian kernel of that cost (``k.hessian`` first value): under 5 s;
- softmax regression on the digits (650 parameters), ``lbfgs``: under 10 s, index form
  (``--digits adam,gd`` for other methods; scalar symbols with ``--scalar-digits``: expect minutes);
- with ``--small``: the same logistic regression on the first 4 features (5 parameters), whose
  scalar statement (under 16 parameters) runs calcml's compiled scalar loops.

- with ``--chained 300,1000``: chained Rosenbrock in that many parameters (no data), 1,000
  iterations from (-1.2, 1, -1.2, ...): the index statement with a shifted read ``x[i + 1]``,
  and scalar symbols (which calcml restates as that read: tensor/lift.py).

- with ``--w10``: W10's network (64-128-10, tanh; 9,610 parameters) on 50,000 random rows,
  Adam, batches of 64, 10 epochs: a run too long for the Python tier, so its loop compiles;
- with ``--at-once``: every loop compiled at once (``calcml.loop.TIER_UP_SECONDS = 0``), what a
  run too long for the tier pays.

Run:  .venv/bin/python benchmarks/first_fit.py [--methods gd,adam,...] [--forms scalar,index] [--chained N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _common import W10_STATEMENT, load_avg, machine_line  # noqa: E402

METHODS = ["gd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "sgd", "newton", "lbfgs", "newton-cg"]

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
import numpy as np, sympy as sp, numba
from sklearn.datasets import load_breast_cancer, load_digits
t1 = time.perf_counter()
import calcml as cm
task, form, method = {task!r}, {form!r}, {method!r}
if {at_once!r}:  # the loop's machine code at once, not the Python tier (a run too long for the tier)
    import calcml.loop
    calcml.loop.TIER_UP_SECONDS = 0
if task.startswith("chained"):
    X = labels = None
elif task == "w10":
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50_000, 64)); labels = rng.integers(0, 10, 50_000)
elif task == "digits":
    X, labels = load_digits(return_X_y=True); X = X / 16.0
else:
    X, labels = load_breast_cancer(return_X_y=True); X = (X - X.mean(0)) / X.std(0)
    if task == "small":
        X = X[:, :4]
N, d = X.shape if X is not None else (0, int(task[len("chained"):]))
t2 = time.perf_counter()
if task.startswith("chained"):
    # chained Rosenbrock in d parameters: no data; scalar symbols summed with sp.Add (Python's sum()
    # of SymPy terms re-flattens the sum at every term: 11 s at d = 1,000, before calcml sees it)
    if form == "index":
        xv = cm.params("x", shape=(d,)); i = cm.index("i", d - 1)
        cost = cm.Cost(cm.sum((1 - xv[i])**2 + 100 * (xv[i + 1] - xv[i]**2)**2, i), params=[xv])
    else:
        xs = cm.params("x", d)
        cost = cm.Cost(sp.Add(*[(1 - xs[q])**2 + 100 * (xs[q + 1] - xs[q]**2)**2 for q in range(d - 1)]),
                       params=list(xs))
    data = None
elif task == "w10":  # W10's network: 64-128-10, tanh, 9,610 parameters
    H, K = 128, 10
{w10_statement}
    data = {{"x": X, "c": labels}}
elif task == "digits":
    K = 10
    if form == "index":
        W = cm.params("W", shape=(K, d)); b = cm.params("b", shape=(K,))
        x = cm.data("x", shape=(d,)); c = cm.data("c", classes=K)
        k = cm.index("k", K); j = cm.index("j", d)
        z = cm.sum(W[k, j] * x[j], j) + b[k]
        cost = cm.Cost(cm.logsumexp(z, k) - cm.sum(cm.onehot(c, k) * z, k), params=[W, b], data=[x, c],
                       penalty=cm.sum(W[k, j]**2, k, j) / (2 * N))
        data = {{"x": X, "c": labels}}
    else:
        Ws = [cm.params(f"W{{a}}_", d) for a in range(K)]; bs = cm.params("b", K)
        xs = cm.data("x", d); ys = cm.data("y", K)
        zs = [cm.dot(Ws[a], xs) + bs[a] for a in range(K)]
        cost = cm.Cost(sp.log(sum(sp.exp(z) for z in zs)) - sum(ys[a] * zs[a] for a in range(K)),
                       params=[*[w for row in Ws for w in row], *bs], data=[*xs, *ys],
                       penalty=sum(w**2 for row in Ws for w in row) / (2 * N))
        Y = np.eye(K)[labels]
        data = {{**{{f"x{{q}}": X[:, q] for q in range(d)}}, **{{f"y{{a}}": Y[:, a] for a in range(K)}}}}
else:
    if form == "index":
        w = cm.params("w", shape=(d,)); b = cm.params("b")
        x = cm.data("x", shape=(d,)); y = cm.data("y")
        z = cm.dot(w, x) + b
        cost = cm.Cost(cm.softplus(z) - y * z, params=[w, b], data=[x, y])
        data = {{"x": X, "y": labels.astype(float)}}
    else:
        w = cm.params("w", d); b = cm.params("b")
        x = cm.data("x", d); y = cm.data("y")
        z = cm.dot(w, x) + b
        cost = cm.Cost(cm.softplus(z) - y * z, params=[*w, b], data=[*x, y])
        data = {{**{{f"x{{q}}": X[:, q] for q in range(d)}}, "y": labels.astype(float)}}
t3 = time.perf_counter()
theta0 = np.zeros(cost.n_params)
if task == "w10":  # W10's start and fit: Adam, lr 1e-3, batches of 64, 10 epochs
    rng = np.random.default_rng(1)
    theta0 = cost.pack({{"W1": rng.standard_normal((128, 64)) / 8, "b1": np.zeros(128),
                        "W2": rng.standard_normal((10, 128)) / 11.3, "b2": np.zeros(10)}})
    res = cm.minimize(cost, theta0, data=data, method="adam", lr=1e-3, batch_size=64, epochs=10)
    result = float(res.fun)
elif task.startswith("chained"):
    theta0 = np.where(np.arange(d) % 2 == 0, -1.2, 1.0)
    res = cm.minimize(cost, theta0, method=method, maxiter=1000)
    result = float(res.fun)
elif method == "hessian":
    H = cm.compile(cost).hessian(theta0, data)
    result = float(np.trace(H))
else:
    kw = dict(lr=0.01) if method in ("momentum", "nesterov", "rmsprop", "adagrad", "sgd") else {{}}
    if method == "gd":
        kw = dict(lr="auto")
    if method == "adam":
        kw = dict(lr=0.01, batch_size=32)
    res = cm.minimize(cost, theta0, data=data, method=method, maxiter=200, epochs=5 if method in ("adam", "sgd") else None, **kw)
    result = float(res.fun)
t4 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "import_calcml": t2 - t1, "cost": t3 - t2, "first": t4 - t3,
                  "beyond_imports": t4 - t1, "result": result}}))
"""


def run(task, form, method, timeout, warm=False, at_once=False):
    """The child's timings in a fresh process with an empty cache; with ``warm``, also those of
    a second fresh process on the cache the first one filled (key ``warm``)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CALCML_CACHE_DIR=cache)
        src = CHILD.format(root=ROOT, task=task, form=form, method=method, at_once=at_once,
                           w10_statement=textwrap.indent(W10_STATEMENT, "    ").rstrip("\n"))
        found = None
        for _ in range(2 if warm else 1):
            try:
                out = subprocess.run([sys.executable, "-c", textwrap.dedent(src)], env=env, capture_output=True,
                                     text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return {"error": f"over {timeout:.0f} s"}
            if out.returncode != 0:
                return {"error": out.stderr.strip().splitlines()[-1][:120]}
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if found is None:
                found = r
            else:
                found["warm"] = r
        return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS + ["hessian"]))
    ap.add_argument("--forms", default="index,scalar")
    ap.add_argument("--digits", nargs="?", const="lbfgs", default="", metavar="METHODS",
                    help="also the digits softmax, with these methods (comma-separated; default lbfgs)")
    ap.add_argument("--scalar-digits", action="store_true", help="the digits softmax in scalar symbols too")
    ap.add_argument("--small", action="store_true",
                    help="breast cancer's first 4 features only (5 parameters: a scalar statement stays on the "
                         "scalar path, its compiled loops)")
    ap.add_argument("--chained", metavar="N", default="",
                    help="only chained Rosenbrock in N parameters (comma-separated sizes; no data), 1,000 iterations "
                         "of each method, the index statement x[i + 1] and scalar symbols (restated by lift)")
    ap.add_argument("--warm", action="store_true",
                    help="also a second fresh process on the cache the first filled (a warm cache)")
    ap.add_argument("--w10", action="store_true",
                    help="also W10's network (9,610 parameters, 50,000 random rows), Adam, batches of 64, 10 epochs")
    ap.add_argument("--at-once", action="store_true",
                    help="compile every loop at once (calcml.loop.TIER_UP_SECONDS = 0), not the Python tier first: "
                         "what a run too long for the tier pays")
    ap.add_argument("--timeout", type=float, default=600.0)
    a = ap.parse_args(argv)
    print(f"Command: .venv/bin/python benchmarks/first_fit.py {' '.join(argv or sys.argv[1:])}\n")
    print(machine_line())
    print(f"\n### First fit, fresh process, empty cache (load avg at start {load_avg()})\n")
    warm_head = (" warm cache |", "---:|") if a.warm else ("", "")
    print(f"| task | statement | method | Cost → first result |{warm_head[0]} import calcml | result |")
    print(f"|---|---|---|---:|{warm_head[1]}---:|---:|")
    task = "small" if a.small else "cancer"
    label = "breast cancer, 4 features" if a.small else "breast cancer"
    rows = [(label, f, m) for f in a.forms.split(",") for m in a.methods.split(",")]
    if a.chained:
        rows = [(f"chained Rosenbrock, {n} parameters", f, m) for n in a.chained.split(",")
                for f in a.forms.split(",") for m in a.methods.split(",")]
    if a.digits:
        rows += [("digits", "index", m) for m in a.digits.split(",")]
    if a.scalar_digits:
        rows.append(("digits", "scalar", "lbfgs"))
    if a.w10:
        rows.append(("W10 network", "index", "adam"))
    for name, form, method in rows:
        child = "digits" if name == "digits" else "w10" if name == "W10 network" else \
            f"chained{name.split(', ')[1].split()[0]}" if name.startswith("chained") else task
        r = run(child, form, method, a.timeout, a.warm, a.at_once)
        if "error" in r:
            print(f"| {name} | {form} | {method} | {r['error']} |{' |' if a.warm else ''} | |")
        else:
            w = f" {r['warm']['cost'] + r['warm']['first']:.2f} s |" if a.warm else ""
            print(f"| {name} | {form} | {method} | {r['cost'] + r['first']:.2f} s |{w} {r['import_calcml']:.2f} s | "
                  f"{r['result']:.6g} |", flush=True)


if __name__ == "__main__":
    main()
