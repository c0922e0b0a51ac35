"""Which loop structure is fastest for a value+gradient kernel? (W1 and W2 shapes)

A study for the code generator: the same W1 (linear regression, MSE) or W2 (logistic
regression, stable log-loss) value+gradient, d = 8 + bias, N = 1,000,000, written in
many structures by a small source generator, each timed on 1 and 2 threads:

- data layout: one 2-D (ncols, N) array ``X[j, i]``; a tuple of 1-D column arrays
  ``cols[j][i]``; one argument per column ``x0[i]``; row-major (N, ncols) ``R[i, j]``;
- prange form: over fixed-size row chunks, each writing its partial sums to a row of a
  (nchunks, nout) array combined at the end ("chunks"); over rows with Numba's scalar
  reductions ("reduce"); over one chunk per thread ("per-thread");
- chunk size; unroll factor U (U independent accumulator sets, summed at the chunk end);
- accumulators as scalar locals or as a small local array;
- fastmath off (the policy) or on.

Run:  python benchmarks/kernel_variants.py [--quick] [--workload W1|W2] [--only S1,S2] [--exclude S]

``--list`` names the variants; ``--show NAME`` prints the generated source of one.
Compiling all variants takes a minute or two; the timing itself is a few seconds a row.
Set NUMBA_THREADING_LAYER=workqueue|omp to compare threading layers.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np

# libgomp's default (active) wait policy spins idle OpenMP threads; when another process
# holds a core of this 2-core machine, that makes 2-thread kernels (and everything else in
# the process, NumPy included) several times slower. Passive unless the caller says so.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numba  # noqa: E402
from numba import njit  # noqa: E402

from _common import load_avg, machine_line, measure_interleaved, table  # noqa: E402

D = 8
NCOLS = D + 1  # x0..x7, y
NOUT = D + 2  # value, g_w0..g_w7, g_b


# --------------------------------------------------------------------------------------
# source generator
# --------------------------------------------------------------------------------------
def _signature(layout: str) -> str:
    if layout == "2d":
        return "theta, X, chunk", "X.shape[1]"
    if layout == "rows":
        return "theta, R, chunk", "R.shape[0]"
    if layout == "tuple":
        return "theta, cols, chunk", "cols[0].shape[0]"
    if layout == "args":
        xs = ", ".join(f"x{j}" for j in range(D))
        return f"theta, {xs}, y, chunk", "y.shape[0]"
    raise ValueError(layout)


def _load(layout: str, j: int, idx: str) -> str:
    if layout == "2d":
        return f"X[{j}, {idx}]"
    if layout == "rows":
        return f"R[{idx}, {j}]"
    if layout == "tuple":
        return f"c{j}[{idx}]"
    if layout == "args":
        return f"x{j}[{idx}]" if j < D else f"y[{idx}]"
    raise ValueError(layout)


def _tree(terms: list) -> str:
    """Pairwise sum ((t0 + t1) + (t2 + t3)) + ...: a shorter dependency chain."""
    while len(terms) > 1:
        terms = [f"({terms[k]} + {terms[k + 1]})" if k + 1 < len(terms) else terms[k]
                 for k in range(0, len(terms), 2)]
    return terms[0]


@dataclass
class Spec:
    """One kernel structure.

    layout: "2d" | "tuple" | "args" | "rows"
    form:   "chunks" (prange over fixed-size row chunks, partial sums per chunk),
            "per-thread" (prange over one chunk per thread), "reduce" (prange over rows,
            Numba's scalar reductions), "serial" (one plain loop), "serial-chunks"
            (the chunk loop with range instead of prange)
    U:      unroll factor, U independent sets of scalar accumulators
    acc:    "scalars" | "array" (a local array of NOUT) | "lanes" (a local (NOUT, L)
            array, row i of a block of L rows accumulating into column i % L: the inner
            loop over the L lanes carries no dependence, so LLVM vectorises it without
            fastmath; the summation order is fixed and independent of the vector width)
    index:  "uintp" (index with np.uintp(i): Numba then emits no negative-index
            wraparound, which otherwise blocks clean vector loads) | "signed"
    """

    layout: str = "2d"
    form: str = "chunks"
    U: int = 1
    acc: str = "scalars"
    L: int = 16
    chunk: int = 16384
    fastmath: object = False
    ztree: bool = False
    index: str = "uintp"
    name: str = ""

    def __post_init__(self):
        if not self.name:
            parts = [self.layout, self.form]
            if self.form in ("chunks", "serial-chunks"):
                parts.append(f"{self.chunk // 1024}k" if self.chunk >= 1024 else str(self.chunk))
            if self.acc == "lanes":
                parts.append(f"lanes{self.L}")
            else:
                parts.append(f"U{self.U}")
                if self.acc == "array":
                    parts.append("arrayacc")
            if self.index != "uintp":
                parts.append("signed-idx")
            if self.ztree:
                parts.append("ztree")
            if self.fastmath is True:
                parts.append("fastmath")
            elif self.fastmath:
                parts.append("fm=" + ",".join(sorted(self.fastmath)))
            self.name = " ".join(parts)

    @property
    def parallel(self) -> bool:
        return self.form not in ("serial", "serial-chunks")


def _row_body(workload: str, sp: Spec, idx: str, lane, ind: str, accref=None) -> list:
    """Statements for one row into accumulator set ``lane`` (or ``accref(k)``)."""
    s = f"_{lane}"
    if sp.index == "uintp":
        out = [f"{ind}u{s} = np.uintp({idx})"]
        idx = f"u{s}"
    else:
        out = []
    out += [f"{ind}a{j}{s} = {_load(sp.layout, j, idx)}" for j in range(NCOLS)]
    terms = [f"w{j}*a{j}{s}" for j in range(D)]
    z = _tree(terms) if sp.ztree else " + ".join(terms)
    yv = f"a{D}{s}"

    def add(k, e):
        if accref is not None:
            return f"{ind}{accref(k)} += {e}"
        if sp.acc == "scalars":
            return f"{ind}s{k}{s} += {e}"
        return f"{ind}acc{s}[{k}] += {e}"

    if workload == "W1":
        out.append(f"{ind}r{s} = {z} + b - {yv}")
        out.append(add(0, f"r{s}*r{s}"))
    else:  # W2: loss = softplus(z) - y*z ; dloss/dz = sigmoid(z) - y
        out.append(f"{ind}z{s} = {z} + b")
        out.append(f"{ind}e{s} = np.exp(-abs(z{s}))")
        out.append(f"{ind}q{s} = 1.0/(1.0 + e{s})")
        out.append(f"{ind}r{s} = (q{s} if z{s} >= 0.0 else e{s}*q{s}) - {yv}")
        out.append(add(0, f"max(z{s}, 0.0) + np.log1p(e{s}) - {yv}*z{s}"))
    for j in range(D):
        out.append(add(j + 1, f"r{s}*a{j}{s}"))
    out.append(add(D + 1, f"r{s}"))
    return out


def _acc_init(sp: Spec, ind: str) -> list:
    if sp.acc == "scalars":
        return [f"{ind}" + " = ".join(f"s{k}_{u}" for k in range(NOUT) for u in range(sp.U)) + " = 0.0"]
    if sp.acc == "lanes":
        return [f"{ind}acc = np.zeros(({NOUT}, {sp.L}))"]
    return [f"{ind}acc_{u} = np.zeros({NOUT})" for u in range(sp.U)]


def _acc_total(sp: Spec, k: int) -> str:
    if sp.acc == "scalars":
        return " + ".join(f"s{k}_{u}" for u in range(sp.U))
    return " + ".join(f"acc_{u}[{k}]" for u in range(sp.U))


def _chunk_body(workload: str, sp: Spec, ind: str) -> list:
    """Loop rows lo..hi of one chunk, accumulators already initialised."""
    L = []
    U = sp.U
    if sp.acc == "lanes":
        n = sp.L
        L.append(f"{ind}nblk = (hi - lo) // {n}")
        L.append(f"{ind}for blk in range(nblk):")
        L.append(f"{ind}    base = lo + blk * {n}")
        L.append(f"{ind}    for l in range({n}):")
        L += _row_body(workload, sp, "base + l", 0, ind + "        ", lambda k: f"acc[{k}, l]")
        L.append(f"{ind}for i in range(lo + nblk * {n}, hi):")
        L += _row_body(workload, sp, "i", 0, ind + "    ", lambda k: f"acc[{k}, 0]")
    elif U == 1:
        L.append(f"{ind}for i in range(lo, hi):")
        L += _row_body(workload, sp, "i", 0, ind + "    ")
    else:
        L.append(f"{ind}stop = lo + ((hi - lo) // {U}) * {U}")
        L.append(f"{ind}for i in range(lo, stop, {U}):")
        for u in range(U):
            L += _row_body(workload, sp, f"i + {u}" if u else "i", u, ind + "    ")
        L.append(f"{ind}for i in range(stop, hi):")
        L += _row_body(workload, sp, "i", 0, ind + "    ")
    return L


def generate(workload: str, sp: Spec) -> str:
    """Source of ``kern(theta, <data>, chunk) -> sums[NOUT]`` (unscaled sums over rows)."""
    args, nexpr = _signature(sp.layout)
    L = [f"def kern({args}):", f"    n = {nexpr}"]
    L += [f"    w{j} = theta[{j}]" for j in range(D)] + [f"    b = theta[{D}]"]
    if sp.layout == "tuple":
        L += [f"    c{j} = cols[{j}]" for j in range(NCOLS)]
    if sp.form in ("chunks", "serial-chunks", "per-thread"):
        loop = "range" if sp.form == "serial-chunks" else "prange"
        if sp.form == "per-thread":
            L.append("    nch = numba.get_num_threads()")
            L.append("    chunk = (n + nch - 1) // nch")
        else:
            L.append("    nch = (n + chunk - 1) // chunk")
        L.append(f"    part = np.empty((nch, {NOUT}))")
        L.append(f"    for c in {loop}(nch):")
        L.append("        lo = c * chunk")
        L.append("        hi = min(lo + chunk, n)")
        L += _acc_init(sp, "        ")
        L += _chunk_body(workload, sp, "        ")
        if sp.acc == "lanes":
            L.append(f"        for k in range({NOUT}):")
            L.append("            t = 0.0")
            L.append(f"            for l in range({sp.L}):")
            L.append("                t += acc[k, l]")
            L.append("            part[c, k] = t")
        else:
            for k in range(NOUT):
                L.append(f"        part[c, {k}] = {_acc_total(sp, k)}")
        L.append(f"    out = np.zeros({NOUT})")
        L.append("    for c in range(nch):")
        L.append(f"        for k in range({NOUT}):")
        L.append("            out[k] += part[c, k]")
        L.append("    return out")
    elif sp.form in ("serial", "reduce"):
        if sp.acc != "scalars":
            raise ValueError("reduce/serial forms use scalar accumulators")
        L += _acc_init(sp, "    ")
        L.append("    lo = 0")
        L.append("    hi = n")
        if sp.form == "reduce":
            if sp.U != 1:
                raise ValueError("reduce form: U = 1 only")
            L.append("    for i in prange(n):")
            L += _row_body(workload, sp, "i", 0, "        ")
        else:
            L += _chunk_body(workload, sp, "    ")
        L.append(f"    out = np.empty({NOUT})")
        for k in range(NOUT):
            L.append(f"    out[{k}] = {_acc_total(sp, k)}")
        L.append("    return out")
    else:
        raise ValueError(sp.form)
    return "\n".join(L) + "\n"


def build(src: str, parallel: bool, fastmath: bool):
    ns = {"np": np, "numba": numba, "prange": numba.prange}
    exec(compile(src, "<kernel_variants>", "exec"), ns)
    return njit(parallel=parallel, fastmath=fastmath, error_model="numpy")(ns["kern"])


# --------------------------------------------------------------------------------------
# data and reference answer
# --------------------------------------------------------------------------------------
def make_data(workload: str, n: int, seed: int = 12345):
    rng = np.random.default_rng(seed)
    cols = np.empty((NCOLS, n))
    cols[:D] = rng.standard_normal((D, n))
    w_true = rng.standard_normal(D)
    z = w_true @ cols[:D] + 0.5
    if workload == "W1":
        cols[D] = z + 0.1 * rng.standard_normal(n)
    else:
        cols[D] = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.float64)
    theta = rng.standard_normal(D + 1) * 0.3
    return theta, cols


def numpy_sums(workload, theta, cols):
    X = cols[:D]
    y = cols[D]
    z = theta[:D] @ X + theta[D]
    if workload == "W1":
        r = z - y
        f = r @ r
    else:
        e = np.exp(-np.abs(z))
        f = np.sum(np.maximum(z, 0) + np.log1p(e) - y * z)
        r = np.where(z >= 0, 1 / (1 + e), e / (1 + e)) - y
    return np.concatenate([[f], X @ r, [r.sum()]])


RC = {"reassoc", "contract"}  # fastmath flags that only reorder sums and allow FMA; NaN/Inf semantics kept

VARIANTS = [
    # --- fastmath=False (the policy) -----------------------------------------------
    Spec(form="serial"),
    Spec(form="serial", U=4),
    Spec(form="serial-chunks"),
    Spec(form="reduce"),
    Spec(form="reduce", index="signed"),
    Spec(form="per-thread"),
    Spec(),                                   # 2d chunks 16k U1
    Spec(index="signed"),
    Spec(U=2), Spec(U=4), Spec(U=8),
    Spec(U=2, index="signed"), Spec(U=4, index="signed"),
    Spec(ztree=True), Spec(U=4, ztree=True),
    Spec(acc="array"),
    Spec(acc="lanes", L=4), Spec(acc="lanes", L=8), Spec(acc="lanes", L=16), Spec(acc="lanes", L=32),
    Spec(acc="lanes", chunk=1024), Spec(acc="lanes", chunk=4096),
    Spec(acc="lanes", chunk=65536), Spec(acc="lanes", chunk=262144),
    Spec(acc="lanes", index="signed"),
    Spec(acc="lanes", ztree=True),
    # without prange, LLVM fully unrolls an 8-lane loop and then does not vectorise it
    # (Numba leaves the SLP vectoriser off); 16 lanes vectorise in both contexts
    Spec(acc="lanes", form="serial-chunks"), Spec(acc="lanes", L=8, form="serial-chunks"),
    Spec(layout="tuple"), Spec(layout="tuple", acc="lanes"),
    Spec(layout="args"), Spec(layout="args", acc="lanes"), Spec(layout="args", U=4),
    Spec(layout="rows"), Spec(layout="rows", acc="lanes"), Spec(layout="rows", U=4),
    Spec(acc="lanes", fastmath={"contract"}),
    # --- fastmath flags: 'reassoc' lets LLVM vectorise the sums itself (it only reorders
    # additions, as chunking already does; the order then depends on the vector width
    # LLVM picks); 'contract' allows FMA. Neither changes NaN/Inf semantics, unlike the
    # 'nnan'/'ninf' flags that fastmath=True includes.
    Spec(fastmath={"reassoc"}),
    Spec(fastmath=RC),
    Spec(fastmath=RC, index="signed"),
    Spec(fastmath=RC, chunk=4096), Spec(fastmath=RC, chunk=65536),
    Spec(fastmath=RC, form="reduce"),
    Spec(fastmath=RC, form="serial"),
    Spec(fastmath=RC, layout="tuple"), Spec(fastmath=RC, layout="args"), Spec(fastmath=RC, layout="rows"),
    Spec(fastmath=RC, acc="lanes"),
    Spec(fastmath=True), Spec(fastmath=True, U=4),
]


def data_args(layout, cols, rows, chunk):
    """The arguments after theta for a layout (all views of the same column data)."""
    if layout == "2d":
        return (cols, chunk)
    if layout == "rows":
        return (rows, chunk)
    if layout == "tuple":
        return (tuple(cols[j] for j in range(NCOLS)), chunk)
    return (*[cols[j] for j in range(NCOLS)], chunk)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 200,000 and few repeats (smoke run)")
    ap.add_argument("--workload", default="W1", choices=["W1", "W2"])
    ap.add_argument("--only", default="", help="run the variants whose name contains one of these comma-separated strings")
    ap.add_argument("--exclude", default="", help="skip the variants whose name contains one of these")
    ap.add_argument("--show", default="", help="print the generated source of this variant and exit")
    ap.add_argument("--list", action="store_true", help="list the variant names and exit")
    ap.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per row")
    a = ap.parse_args(argv)

    if a.show:
        for sp in VARIANTS:
            if sp.name == a.show:
                print(generate(a.workload, sp))
                return
        sys.exit(f"no variant named {a.show!r}; names:\n" + "\n".join(sp.name for sp in VARIANTS))

    if a.list:
        print("\n".join(sp.name for sp in VARIANTS))
        return

    n = 200_000 if a.quick else 1_000_000
    rounds = 5 if a.quick else 25
    budget = 0.3 if a.quick else a.budget
    theta, cols = make_data(a.workload, n)
    rows = np.ascontiguousarray(cols.T)
    nbytes = cols.nbytes
    ref = numpy_sums(a.workload, theta, cols)
    threads = [int(t) for t in a.threads.split(",")]

    print(f"# {a.workload} kernel structure study, N = {n:,}, d = {D} + bias, "
          f"{nbytes / 1e6:.0f} MB of data per pass")
    print(f"{machine_line()} | load avg {load_avg()}\n")
    fns = {}
    for sp in VARIANTS:
        if a.only and not any(o in sp.name for o in a.only.split(",")):
            continue
        if a.exclude and any(o in sp.name for o in a.exclude.split(",")):
            continue
        fn = build(generate(a.workload, sp), parallel=sp.parallel, fastmath=sp.fastmath)
        args = data_args(sp.layout, cols, rows, sp.chunk)
        got = fn(theta, *args)
        err = np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref)))
        if err > 1e-9:
            print(f"!! {sp.name}: wrong answer, max rel err {err:.2e}")
        for t in threads:
            if sp.parallel or t == 1:
                fns[(sp.name, t)] = (lambda fn=fn, args=args: fn(theta, *args))
    print(f"compiled {len(fns)} variants; load avg {load_avg()}; timing "
          f"(threads interleaved, round-robin)", flush=True)
    res = measure_interleaved(fns, rounds=rounds, budget=budget * len(fns), nbytes=nbytes,
                              setup=lambda key: numba.set_num_threads(key[1]))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for t in threads:
        rs = []
        for (name, tt), r in res.items():
            if tt == t:
                r.name = name
                rs.append(r)
        best = min(rs, key=lambda r: r.median)
        print(table(f"{a.workload} structures, {t} thread(s), N = {n:,}, threading layer "
                    f"{numba.threading_layer()} (ratio to the fastest; load avg {load_avg()})",
                    rs, best, ratio_label="ratio to fastest"), flush=True)


if __name__ == "__main__":
    main()
