"""The generators alone: their time, and every source they make (no compile).

Two uses:

- ``python benchmarks/generators.py [--rounds 7]``: the median time of generating a few
  modules (W1's kernels, W3's and W4's loops, an L-BFGS loop, a tensor softmax's Adam
  module), fresh costs each round. A/B against another checkout: run it again with
  ``PYTHONPATH=<that checkout>``.
- ``python benchmarks/generators.py --dump DIR``: writes each source calcml generates for a
  table of costs (scalar: linear, logistic, Rosenbrock, 20 and 70 parameters, Max/Abs; tensor:
  softmax, a tanh network, least squares, ``cm.rowwise``) x methods x schedules x batching,
  one file each (about 600). A change that must not alter the generated code (a refactor of
  a generator) is checked by ``diff -r`` of two checkouts' dumps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import sympy as sp

import calcml as cm
from calcml import codegen, loop, optim
from calcml import schedules as S
from calcml.tensor.optimize import program_for_tensor


def _scalar_costs() -> dict:
    w0, w1, w2, x0, x1, y = sp.symbols("w0 w1 w2 x0 x1 y")
    z = w0 + w1 * x0 + w2 * x1
    a, b = sp.symbols("a b")
    ws, xs, t = sp.symbols("v0:20"), sp.symbols("u0:20"), sp.Symbol("t")
    qs = sp.symbols("q0:70")
    return {
        "lin": cm.Cost((z - y) ** 2, params=[w0, w1, w2], data=[x0, x1, y]),
        "logit": cm.Cost(sp.log(1 + sp.exp(z)) - y * z, params=[w0, w1, w2], data=[x0, x1, y]),
        "rosen": cm.Cost((1 - a) ** 2 + 100 * (b - a ** 2) ** 2, params=[a, b]),
        "wide": cm.Cost((sum(wi * xi for wi, xi in zip(ws, xs)) - t) ** 2 + sp.tanh(ws[0]), params=list(ws),
                        data=list(xs) + [t]),
        "big": cm.Cost(sum((q - k / 70) ** 2 * (1 + q ** 2) for k, q in enumerate(qs)), params=list(qs)),
        "relu": cm.Cost(sp.Max(0, w0 * x0 + w1) ** 2 + sp.Abs(w1 - y), params=[w0, w1], data=[x0, y]),
    }


def _tensor_costs() -> tuple:
    K, d, H = 3, 5, 4
    W, b = cm.params("W", shape=(K, d)), cm.params("b", shape=(K,))
    x, c = cm.data("x", shape=(d,)), cm.data("c", classes=K)
    k, j, h = cm.index("k", K), cm.index("j", d), cm.index("h", H)
    z = cm.sum(W[k, j] * x[j], j) + b[k]
    soft = cm.Cost(cm.logsumexp(z, k) - cm.sum(cm.onehot(c, k) * z, k), params=[W, b], data=[x, c],
                   penalty=cm.sum(W[k, j] ** 2, k, j) / 200)
    W1, b1 = cm.params("W1", shape=(H, d)), cm.params("b1", shape=(H,))
    W2, b2 = cm.params("W2", shape=(K, H)), cm.params("b2", shape=(K,))
    z2 = cm.sum(W2[k, h] * sp.tanh(cm.sum(W1[h, j] * x[j], j) + b1[h]), h) + b2[k]
    net = cm.Cost(cm.logsumexp(z2, k) - cm.sum(cm.onehot(c, k) * z2, k), params=[W1, b1, W2, b2], data=[x, c])
    w, y = cm.params("w", shape=(d,)), cm.data("y")
    lsq = cm.Cost((cm.dot(w, x) - y) ** 2, params=[w], data=[x, y])
    return {"soft": soft, "net": net, "lsq": lsq}, cm.rowwise(z, params=[W, b], data=[x])


METHODS = ["gd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "sgd", "lbfgs", "newton"]
SEARCHED = ("lbfgs", "newton", "newton-cg")


def dump(out: Path):
    out.mkdir(parents=True, exist_ok=True)

    def write(name, fn):
        try:
            text = fn()
        except Exception as e:  # noqa: BLE001 - recorded: it must be the same on both sides
            text = f"ERROR {type(e).__name__}: {e}"
        (out / (name + ".py")).write_text(text)

    scheds = {"none": None, "const": S.constant(0.1), "step": S.step(0.1, 10), "cos": S.cosine(0.1, 100),
              "warm": S.warmup(S.exponential(0.1, 0.9), 5), "inv": S.inverse_time(0.1, 0.5)}
    for cname, cost in _scalar_costs().items():
        write(f"k_{cname}", lambda: codegen.kernel_module_source(cost))
        write(f"k_{cname}_h", lambda: codegen.kernel_module_source(cost, hessian_only=True))
        write(f"k_{cname}_noh", lambda: codegen.kernel_module_source(cost, with_hessian=False))
        for m in METHODS:
            opt = optim.get(m, None if m in SEARCHED else 0.1)
            for sname, sch in scheds.items():
                if opt.kind != "first_order" and sname != "none":
                    continue
                if opt.kind == "first_order" and sname == "none":
                    sch = S.constant(0.1)
                for mb in ((False, True) if opt.kind == "first_order" and cost.data else (False,)):
                    write(f"l_{cname}_{m}_{sname}_{int(mb)}", lambda: loop.generate_source(cost, opt, sch, mb))
    tensor, rowwise = _tensor_costs()
    for cname, cost in tensor.items():
        write(f"tk_{cname}", lambda: cost.module_source(("value", "vg", "hvp"), entry_points=True)[0])
        write(f"tk_{cname}_base", lambda: cost.module_source(("value", "vg"))[0])
        for m in METHODS + ["newton-cg"]:
            opt = optim.get(m, None if m in SEARCHED else 0.1)
            for sname in (["const", "cos", "warm"] if opt.kind == "first_order" else ["none"]):
                for bs in ((None, 16) if opt.kind == "first_order" else (None,)):
                    write(f"tl_{cname}_{m}_{sname}_{bs}",
                          lambda: program_for_tensor(cost, opt, scheds[sname], bs)._build())
    write("rowwise", lambda: rowwise._build())
    print(len(list(out.iterdir())), "files in", out)


def _timing_costs():
    w = sp.symbols("w0:9"); x = sp.symbols("x0:8"); y = sp.Symbol("y")
    z = w[0] + sum(wi * xi for wi, xi in zip(w[1:], x))
    lin = cm.Cost((z - y) ** 2, params=list(w), data=list(x) + [y])
    a, b = sp.symbols("a b")
    rosen = cm.Cost((1 - a) ** 2 + 100 * (b - a ** 2) ** 2, params=[a, b])
    K, d = 10, 64
    W = cm.params("W", shape=(K, d)); bb = cm.params("b", shape=(K,))
    xx = cm.data("x", shape=(d,)); c = cm.data("c", classes=K)
    k = cm.index("k", K); j = cm.index("j", d)
    zz = cm.sum(W[k, j] * xx[j], j) + bb[k]
    soft = cm.Cost(cm.logsumexp(zz, k) - cm.sum(cm.onehot(c, k) * zz, k), params=[W, bb], data=[xx, c])
    return lin, rosen, soft

JOBS = {
    "kernels W1 (9 params)": lambda lin, rosen, soft: codegen.kernel_module_source(lin),
    "loop W3 nesterov minibatch": lambda lin, rosen, soft: loop.generate_source(lin, optim.get("nesterov", 0.01), S.constant(0.01), True),
    "loop W4 gd rosenbrock": lambda lin, rosen, soft: loop.generate_source(rosen, optim.get("gd", 0.001), S.constant(0.001), False),
    "loop lbfgs lin": lambda lin, rosen, soft: loop.generate_source(lin, optim.get("lbfgs"), None, False),
    "tensor softmax adam minibatch": lambda lin, rosen, soft: program_for_tensor(soft, optim.get("adam", 0.01), S.constant(0.01), 64)._build(),
}


def timing(rounds: int):
    res = {name: [] for name in JOBS}
    for _ in range(rounds):
        for name, fn in JOBS.items():
            cs = _timing_costs()
            t = time.perf_counter()
            fn(*cs)
            res[name].append(time.perf_counter() - t)
    print(f"calcml from {Path(cm.__file__).parent}; medians of {rounds} rounds")
    for name, v in res.items():
        print(f"{name:34s} {statistics.median(v) * 1e3:8.1f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dump", metavar="DIR", help="write every generated source into DIR instead of timing")
    args = ap.parse_args()
    if args.dump:
        dump(Path(args.dump))
    else:
        timing(args.rounds)


if __name__ == "__main__":
    sys.exit(main())
