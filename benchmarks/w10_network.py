"""W10: a 64-128-10 tanh network trained by Adam (batch 64, 10 epochs over 50,000 rows).

See ../shared/BENCHMARKS.md (W10). Everything is float64; data and x0 come from fixed seeds.

What is measured
----------------
The network ``z = W2 tanh(W1 x + b1) + b2`` (W1 (128, 64), b1 (128,), W2 (10, 128), b2 (10,):
9,610 parameters), the per-row cost ``logsumexp_k z_k - z_c`` (softmax cross-entropy, integer
labels ``c``), the minibatch cost its mean over the batch. Adam (Kingma & Ba 2015, Algorithm
1: lr 1e-3, b1 0.9, b2 0.999, eps 1e-8, bias correction with t + 1 for the step t counted
from 0), batch 64, 10 epochs over N = 50,000 rows (782 updates an epoch, the last batch of
16 rows). Each epoch takes its rows in the order ``rng.permutation(N)`` of one
``numpy.random.default_rng(seed)`` drawn anew per epoch (calcml's order), so every
implementation sees the same batches and starts from the same x0.

Data: ``X`` standard normal (N, 64); labels from a random teacher network (64-32-10 tanh,
``argmax`` of its logits standardised per class), so the task is learnable and the classes
about balanced; x0: weights normal with standard deviation 1/sqrt(fan-in), biases zero.

Implementations, each a row:

- ``numpy``: the reference, a hand-written forward/backward over each batch (``X[idx]``, two
  BLAS products forward, a stable softmax, three BLAS products backward) and a vectorised
  Adam over the flat parameter array, in calcml's formula and operation order
  (``theta -= lr * (m / bc1) / (sqrt(v / bc2) + eps)``). Threads: NumPy's OpenBLAS, set to 1
  or 2 with threadpoolctl.
- ``calcml``: the cost in index notation, ``cm.generate(cost, method="adam", lr=1e-3,
  batch_size=64)``, ``prog.run(x0, data, epochs=10, seed=0)``. Numba threads 1 or 2
  (``numba.set_num_threads``), though nothing in the minibatch loop is threaded: the epoch
  is one compiled single-threaded loop, ``prog.run`` sets SciPy's BLAS (Numba's ``np.dot``)
  to one thread, and its full-data evaluations run stripe after stripe on one thread. The
  per-epoch row calls the module's compiled ``_epoch`` directly (one epoch of minibatches:
  gather, value and gradient, Adam, the steps of the module's ``run_segment`` without its
  bookkeeping; checked to give ``prog.run(epochs=1, tol=0)``'s bits in its row order).
  ``prog.run`` with its default ``tol=1e-8`` also makes one full-data value-and-gradient
  pass after every epoch (its convergence test) and one before the first and after the last:
  the fit table shows it with ``tol=0`` as well (the per-epoch passes skipped).
- ``torch``: PyTorch on the CPU (when it imports), float64, ``nn.Linear`` layers,
  ``F.cross_entropy`` (mean), ``torch.optim.Adam`` with the same hyperparameters, the same
  batches (``Xt[idx]``); ``torch.set_num_threads(1 or 2)``.

Tables:

1. Per epoch: one epoch of 782 updates, each implementation's own epoch function (no
   full-data passes), interleaved rounds in an order shuffled each round
   (``_common.measure_interleaved``); medians, min-max, ratio to the faster ``numpy`` row.
   A row whose untimed first call took over 1 s and over 5x the fastest row's is timed in 3
   rounds of its own instead (NumPy on 2 BLAS threads while another process holds a core:
   see below). Also a what-if row (``--no-whatif`` skips it), not calcml: calcml's generated
   module with its ``vg_rows`` replaced by ``fixed_vg_rows`` (below), to show what calcml's
   own loop, gather and Adam cost around a kernel that computes the hidden layer once.
2. The fit, as a user runs it: from x0 to the trained parameters and the final full
   training cost (NumPy and PyTorch: the epochs plus one full-data forward pass for that
   cost, on ``--fit-threads``, default 1; calcml: ``prog.run``, warm: its compiled module
   loaded by an untimed run in this process). Medians of ``--fit-rounds`` interleaved fits;
   the first round's results are the 10-epoch correctness check.
3. Parts (``--no-parts`` skips it): one 64-row minibatch's value and gradient alone, one
   thread: calcml's generated ``vg_rows`` + ``vg_finish``, NumPy's, and ``numba fixed``:
   the same 32-row-block kernel written by hand (``fixed_vg_rows``) with one ``tanh`` per
   hidden unit and row and every product an ``np.dot`` (what calcml's generated code could
   be); plus the ``math.tanh`` calls alone, as many as calcml's kernel makes (counted in its
   source) and one per unit and row, and NumPy's ``np.tanh`` on the same 8,192 values.
4. calcml's cold build (``--no-build`` skips it): a fresh process, empty CALCML_CACHE_DIR and
   NUMBA_CACHE_DIR: import calcml, state the Cost, ``cm.generate``, the first
   ``prog.run(epochs=1)`` on ``--build-rows`` rows (its kernels compiled; the loop runs in the
   Python tier, or is compiled where the run is too long for it), then a second run in the
   same process (the run alone); and a warm process on the same cache.

Correctness (printed first, and before the fit table): after one epoch from the same x0, calcml's and
PyTorch's parameters against NumPy's (max |a - b| / max |b| over each array); after 10
epochs, the final full training cost of each, their per-epoch mean minibatch costs and
parameters.

Run
---
    .venv/bin/python benchmarks/w10_network.py              # N = 50,000, 10 epochs
    .venv/bin/python benchmarks/w10_network.py --quick      # N = 5,000, 2 epochs (smoke)

Options: ``--rows N``, ``--epochs E``, ``--rounds R`` (per-epoch table), ``--fit-rounds R``,
``--threads T`` (comma-separated, default 1,2), ``--fit-threads T`` (NumPy's and PyTorch's
fits, default 1), ``--no-torch``, ``--no-parts``, ``--no-whatif``, ``--no-build``,
``--build-rows``, ``--build-repeat``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, ROOT)  # the repository root, for an uninstalled calcml
# Passive OpenMP waiting (PyTorch's OpenMP, Numba's workqueue/omp layers): spinning idle
# threads on a shared 2-core machine slow everything else in the process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("CALCML_CACHE_DIR", os.path.join(ROOT, ".bench-cache"))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg.cython_blas  # noqa: E402,F401  (SciPy's BLAS, which Numba's np.dot calls)
from numba import njit  # noqa: E402

from _common import (W10_STATEMENT, Timing, build_table_rows, fmt_time, load_avg, machine_line,  # noqa: E402
                     measure_interleaved, table)

D, H, K = 64, 128, 10
N_PARAMS = H * D + H + K * H + K  # 9,610
BATCH = 64
LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8
SEED_DATA = 10
SEED_ORDER = 0  # prog.run(seed=0): the permutations


# ======================================================================================
# data, x0, layout
# ======================================================================================


def make_data(n: int, seed: int = SEED_DATA):
    """X (n, 64) standard normal, C-contiguous; labels (n,) int64 from a random 64-32-10 tanh
    teacher (its own seed, the same for any n): the argmax of its logits, each class's logit
    standardised over the rows first (so the classes come out about equally often)."""
    X = np.random.default_rng(seed).standard_normal((n, D))
    rng = np.random.default_rng(seed + 2)
    T1 = rng.standard_normal((32, D)) / math.sqrt(D)
    t1 = 0.5 * rng.standard_normal(32)
    T2 = rng.standard_normal((K, 32)) * 2.0 / math.sqrt(32)
    z = np.tanh(X @ T1.T + t1) @ T2.T
    labels = np.argmax((z - z.mean(axis=0)) / z.std(axis=0), axis=1).astype(np.int64)
    return X, labels


def make_x0(seed: int = SEED_DATA + 1) -> dict:
    rng = np.random.default_rng(seed)
    return {"W1": rng.standard_normal((H, D)) / math.sqrt(D), "b1": np.zeros(H),
            "W2": rng.standard_normal((K, H)) / math.sqrt(H), "b2": np.zeros(K)}


SLICES = {"W1": (slice(0, H * D), (H, D)), "b1": (slice(H * D, H * D + H), (H,)),
          "W2": (slice(H * D + H, H * D + H + K * H), (K, H)), "b2": (slice(H * D + H + K * H, N_PARAMS), (K,))}


def pack(p: dict) -> np.ndarray:
    """Flat theta in calcml's order: W1 (C order), b1, W2, b2."""
    return np.concatenate([np.ravel(p[k]) for k in SLICES])


def unpack(theta: np.ndarray) -> dict:
    return {k: theta[s].reshape(shape) for k, (s, shape) in SLICES.items()}


def rel_diffs(a: dict, b: dict) -> dict:
    """name -> max |a - b| / max |b| (b the reference)."""
    return {k: float(np.max(np.abs(np.asarray(a[k]) - b[k])) / np.max(np.abs(b[k]))) for k in SLICES}


# ======================================================================================
# reference: NumPy forward/backward + Adam
# ======================================================================================


class NumpyNet:
    """Parameters, gradient and Adam state as flat arrays with (H, D) ... views on them."""

    def __init__(self, x0: dict):
        self.theta = pack(x0)
        self.g = np.zeros(N_PARAMS)
        self.m = np.zeros(N_PARAMS)
        self.v = np.zeros(N_PARAMS)
        self.tmp = np.empty(N_PARAMS)
        self.den = np.empty(N_PARAMS)
        self.step = 0
        self.p = unpack(self.theta)
        self.gp = unpack(self.g)

    def batch_vg(self, xb, cb) -> float:
        """The mean cost of the batch; its gradient into self.g."""
        p, gp = self.p, self.gp
        nb = xb.shape[0]
        hid = xb @ p["W1"].T
        hid += p["b1"]
        np.tanh(hid, out=hid)
        z = hid @ p["W2"].T
        z += p["b2"]
        mx = z.max(axis=1, keepdims=True)
        e = np.exp(z - mx)
        s = e.sum(axis=1, keepdims=True)
        rows = np.arange(nb)
        value = float(np.mean(mx[:, 0] + np.log(s[:, 0]) - z[rows, cb]))
        e /= s  # softmax P
        e[rows, cb] -= 1.0  # P - Y
        e *= 1.0 / nb  # the mean over the batch
        np.matmul(e.T, hid, out=gp["W2"])
        e.sum(axis=0, out=gp["b2"])
        dh = e @ p["W2"]
        hid *= hid
        np.subtract(1.0, hid, out=hid)  # 1 - tanh^2
        dh *= hid
        np.matmul(dh.T, xb, out=gp["W1"])
        dh.sum(axis=0, out=gp["b1"])
        return value

    def adam(self):
        """One Adam update of theta (calcml's formula and operation order)."""
        t = self.step
        bc1 = 1.0 - B1 ** (t + 1)
        bc2 = 1.0 - B2 ** (t + 1)
        m, v, g, tmp, den = self.m, self.v, self.g, self.tmp, self.den
        m *= B1
        np.multiply(g, 1.0 - B1, out=tmp)
        m += tmp
        v *= B2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - B2
        v += tmp
        np.divide(v, bc2, out=den)
        np.sqrt(den, out=den)
        den += EPS
        np.divide(m, bc1, out=tmp)
        tmp *= LR
        tmp /= den
        self.theta -= tmp
        self.step += 1

    def epoch(self, X, c, perm, batch=BATCH) -> float:
        """One epoch in the order perm; returns the mean of its minibatch costs."""
        total, count = 0.0, 0
        for lo in range(0, perm.shape[0], batch):
            idx = perm[lo:lo + batch]
            total += self.batch_vg(X[idx], c[idx])
            self.adam()
            count += 1
        return total / count

    def full_cost(self, X, c) -> float:
        p = self.p
        z = np.tanh(X @ p["W1"].T + p["b1"]) @ p["W2"].T + p["b2"]
        mx = z.max(axis=1)
        return float(np.mean(mx + np.log(np.exp(z - mx[:, None]).sum(axis=1)) - z[np.arange(X.shape[0]), c]))


def numpy_fit(x0, X, c, epochs, seed=SEED_ORDER):
    """(params, final full cost, per-epoch mean minibatch costs)."""
    net = NumpyNet(x0)
    rng = np.random.default_rng(seed)
    hist = [net.epoch(X, c, rng.permutation(X.shape[0]).astype(np.int64)) for _ in range(epochs)]
    return {k: a.copy() for k, a in net.p.items()}, net.full_cost(X, c), hist


# ======================================================================================
# PyTorch
# ======================================================================================


class TorchNet:
    def __init__(self, torch, x0: dict, X, c):
        self.torch = torch
        nn = torch.nn
        self.F = torch.nn.functional
        self.model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, K)).to(torch.float64)
        with torch.no_grad():
            self.model[0].weight.copy_(torch.from_numpy(x0["W1"]))
            self.model[0].bias.copy_(torch.from_numpy(x0["b1"]))
            self.model[2].weight.copy_(torch.from_numpy(x0["W2"]))
            self.model[2].bias.copy_(torch.from_numpy(x0["b2"]))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR, betas=(B1, B2), eps=EPS)
        self.X = torch.from_numpy(X)
        self.c = torch.from_numpy(c)

    def epoch(self, perm, batch=BATCH) -> float:
        torch, F, model, opt = self.torch, self.F, self.model, self.opt
        idx_all = torch.from_numpy(perm)
        total, count = 0.0, 0
        for lo in range(0, perm.shape[0], batch):
            idx = idx_all[lo:lo + batch]
            loss = F.cross_entropy(model(self.X[idx]), self.c[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            count += 1
        return total / count

    def params(self) -> dict:
        m = self.model
        return {"W1": m[0].weight.detach().numpy().copy(), "b1": m[0].bias.detach().numpy().copy(),
                "W2": m[2].weight.detach().numpy().copy(), "b2": m[2].bias.detach().numpy().copy()}

    def full_cost(self) -> float:
        with self.torch.no_grad():
            return float(self.F.cross_entropy(self.model(self.X), self.c))


def torch_fit(torch, x0, X, c, epochs, seed=SEED_ORDER):
    net = TorchNet(torch, x0, X, c)
    rng = np.random.default_rng(seed)
    hist = [net.epoch(rng.permutation(X.shape[0]).astype(np.int64)) for _ in range(epochs)]
    return net.params(), net.full_cost(), hist


# ======================================================================================
# calcml
# ======================================================================================


def calcml_program(cm):
    import sympy as sp

    W1 = cm.params("W1", shape=(H, D)); b1 = cm.params("b1", shape=(H,))  # noqa: E702
    W2 = cm.params("W2", shape=(K, H)); b2 = cm.params("b2", shape=(K,))  # noqa: E702
    x = cm.data("x", shape=(D,)); c = cm.data("c", classes=K)  # noqa: E702
    j, h, k = cm.index("j", D), cm.index("h", H), cm.index("k", K)
    hidden = sp.tanh(cm.sum(W1[h, j] * x[j], j) + b1[h])
    logits = cm.sum(W2[k, h] * hidden, h) + b2[k]
    cost = cm.Cost(cm.logsumexp(logits, k) - cm.sum(cm.onehot(c, k) * logits, k),
                   params=[W1, b1, W2, b2], data=[x, c])
    return cost, cm.generate(cost, method="adam", lr=LR, batch_size=BATCH)


class CalcmlEpoch:
    """One epoch of calcml's compiled minibatch steps, called directly (the generated module's
    ``_epoch``: the steps of its ``run_segment`` without the bookkeeping, what calcml runs on
    each chunk of Dask data), the state carried between calls."""

    def __init__(self, prog, x0: dict, X, c, module=None):
        self.mod = mod = module if module is not None else prog.module
        self.X, self.c = np.ascontiguousarray(X, dtype=np.float64), np.ascontiguousarray(c, dtype=np.int64)
        n = X.shape[0]
        self.theta = prog.cost.pack(x0).astype(np.float64)
        self.g = np.empty(N_PARAMS)
        self.hyper = np.array([B1, B2, EPS])
        assert tuple(mod.HYPER_NAMES) == ("b1", "b2", "eps"), mod.HYPER_NAMES
        self.sa = np.array([LR])
        self.cols = mod.columns((self.X, self.c), n, True)
        self.state = mod.new_optimizer_state(N_PARAMS)
        self.step = 0

    def epoch(self, perm) -> float:
        code, done, total = self.mod._epoch(self.theta, self.g, perm, BATCH, self.step, 1 << 60, self.hyper, self.sa,
                                            self.cols, self.X.shape[0], 1e300, self.state)
        self.step += done
        return total / min(done * BATCH, self.X.shape[0])  # (minibatch costs weighted by their rows)


def calcml_order(mod, n: int, seed: int) -> np.ndarray:
    """The row order of the first epoch of ``prog.run(seed=seed)``: the module's Fisher-Yates
    shuffle of 0 ... n-1 by its SplitMix64 generator (``_randbelow``)."""
    perm = np.arange(n, dtype=np.int64)
    rng = np.array([seed], dtype=np.uint64)
    for i in range(n - 1, 0, -1):
        k = mod._randbelow(rng, i + 1)
        perm[i], perm[k] = perm[k], perm[i]
    return perm


# ======================================================================================
# parts: one minibatch's value and gradient
# ======================================================================================


@njit(cache=False, fastmath=False, error_model="numpy", nogil=True)
def fixed_vg_rows(theta, v, data_x, data_c, r0, r1, scale, acc):
    """What calcml's generated ``vg_rows`` computes (the same blocks of 32 rows, the same
    accumulator layout), written by hand: tanh once per (row, hidden unit), the second layer
    and both backward products as np.dot."""
    p_W1 = theta[0:8192].reshape((128, 64))
    p_b1 = theta[8192:8320]
    p_W2 = theta[8320:9600].reshape((10, 128))
    p_b2 = theta[9600:9610]
    c20 = acc[1:8193].reshape((128, 64))
    c19 = acc[8193:8321]
    c17 = acc[8321:9601].reshape((10, 128))
    c13 = acc[9601:9611]
    W2T = np.ascontiguousarray(p_W2.T)
    for q0 in range(r0, r1, 32):
        q1 = min(q0 + 32, r1)
        nb = q1 - q0
        xb = data_x[q0:q1]
        hid = np.empty((nb, 128))
        np.dot(xb, p_W1.T, hid)
        for r in range(nb):
            for i in range(128):
                hid[r, i] = math.tanh(hid[r, i] + p_b1[i])
        z = np.empty((nb, 10))
        np.dot(hid, W2T, z)
        s_tot = 0.0
        for r in range(nb):
            m = -math.inf
            for k in range(10):
                z[r, k] += p_b2[k]
                if z[r, k] > m:
                    m = z[r, k]
            s = 0.0
            for k in range(10):
                s += math.exp(z[r, k] - m)
            lse = m + math.log(s)
            cr = data_c[q0 + r]
            s_tot += scale * (lse - z[r, cr])
            for k in range(10):
                z[r, k] = scale * math.exp(z[r, k] - lse)
            z[r, cr] -= scale
            for k in range(10):
                c13[k] += z[r, k]
        acc[0] += s_tot
        c17 += np.dot(z.T, hid)
        dh = np.dot(z, p_W2)
        for r in range(nb):
            for i in range(128):
                dh[r, i] *= 1.0 - hid[r, i] * hid[r, i]
                c19[i] += dh[r, i]
        c20 += np.dot(dh.T, xb)


def whatif_module(prog):
    """calcml's generated module with its ``vg_rows`` replaced by ``fixed_vg_rows`` (the same
    signature and accumulator layout): calcml's own epoch loop, gather and Adam around a kernel
    that computes the hidden layer once. Not calcml: a measure of what its kernel costs."""
    import types

    text = prog.source.replace("cache=True", "cache=False")
    mod = types.ModuleType("calcml_w10_whatif")
    exec(compile(text, "<calcml module, vg_rows replaced>", "exec"), mod.__dict__)
    mod.vg_rows = fixed_vg_rows  # _epoch resolves the global when it compiles (its first call)
    return mod


@njit(cache=False, fastmath=False, error_model="numpy", nogil=True)
def tanh_calls(x, reps):
    """``reps`` tanh calls on the entries of x (a row's worth of hidden units), summed."""
    s = 0.0
    n = x.shape[0]
    for rep in range(reps // n):
        shift = 1e-3 * rep
        for i in range(n):
            s += math.tanh(x[i] + shift)
    return s


def count_tanh(src: str, func: str = "vg_rows") -> tuple:
    """(tanh calls per row, loops) in the generated ``func`` of calcml's module: each
    ``math.tanh(...)`` times the trip counts of the loops around it (within the row loop)."""
    m = re.search(rf"^def {func}\(.*?(?=^@|^def |\Z)", src, re.S | re.M)
    if not m:
        return None, []
    total, where = 0, []
    stack = []  # (indent, trip count)
    for line in m.group(0).splitlines():
        stripped = line.lstrip()
        ind = len(line) - len(stripped)
        while stack and stack[-1][0] >= ind:
            stack.pop()
        loop = re.match(r"for (\w+) in range\((\d+)\):", stripped)
        rloop = re.match(r"for r in range\(nb\):", stripped)
        if loop:
            stack.append((ind, int(loop.group(2))))
        elif rloop:
            stack.append((ind, 1))
        n = stripped.count("math.tanh(")
        if n:
            trips = 1
            for _, t in stack:
                trips *= t
            total += n * trips
            where.append(n * trips)
    return total, where


# ======================================================================================
# cold build in a fresh process
# ======================================================================================

CHILD_BUILD = """
import time
_t_start = time.perf_counter()
import json, sys
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
import numpy as np, numba, sympy as sp
t1 = time.perf_counter()
import calcml as cm
t2 = time.perf_counter()
d, H, K, n = 64, 128, 10, {n}
rng = np.random.default_rng(0)
X = rng.standard_normal((n, d)); labels = rng.integers(0, K, n)
x0 = {{"W1": rng.standard_normal((H, d)) / 8, "b1": np.zeros(H), "W2": rng.standard_normal((K, H)) / 11.3,
      "b2": np.zeros(K)}}
t3 = time.perf_counter()
{w10_statement}t4 = time.perf_counter()
prog = cm.generate(cost, method="adam", lr=1e-3, batch_size=64)
t5 = time.perf_counter()
res = prog.run(x0, {{"x": X, "c": labels}}, epochs=1, seed=0)
t6 = time.perf_counter()
res2 = prog.run(x0, {{"x": X, "c": labels}}, epochs=1, seed=0)
t7 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "import_calcml": t2 - t1, "cost": t4 - t3, "generate": t5 - t4,
                  "first_run": t6 - t5, "second_run": t7 - t6, "to_first_result": t6 - t3,
                  "beyond_imports": (t2 - t1) + (t6 - t3), "process": t6 - _t_start}}))
"""


def run_build(a) -> str:

    lines = [f"### calcml build, fresh processes: Cost → generate → first prog.run(epochs=1) on "
             f"{a.build_rows:,} rows; median (min–max) of {a.build_repeat} (load avg {load_avg()})", "",
             "| cache | Cost → first result | of which generate | first run (compile + run) | second run (same "
             "process) | beyond the imports | imports (numpy, numba, sympy) | import calcml | whole process |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    src = CHILD_BUILD.format(root=ROOT, n=a.build_rows, w10_statement=W10_STATEMENT)
    rows, notes = build_table_rows(src, a.build_repeat, a.build_timeout, ROOT, "calcml-w10-", [],
                                   ["to_first_result", "generate", "first_run", "second_run", "beyond_imports",
                                    "imports", "import_calcml", "process"])
    lines += rows
    lines.append("")
    lines.append("\"First run\" minus \"second run\" is about the compile (or load) time; \"beyond the imports\" = "
                 "import calcml + Cost → first result (not the data's generation).")
    return "\n".join(lines + notes) + "\n"


# ======================================================================================
# threads
# ======================================================================================


class BlasThreads:
    """NumPy's and SciPy's OpenBLAS, each set with threadpoolctl."""

    def __init__(self):
        self.numpy = self.scipy = None
        self.default = {}
        self.note = ""
        try:
            from threadpoolctl import ThreadpoolController

            libs = [lc for lc in ThreadpoolController().lib_controllers if lc.user_api == "blas"]
        except Exception as exc:  # noqa: BLE001
            self.note = f"threadpoolctl unavailable ({exc!r})"
            return
        for lc in libs:
            if os.sep + "numpy" in lc.filepath:
                self.numpy = lc
            elif os.sep + "scipy" in lc.filepath:
                self.scipy = lc
        self.default = {id(lc): lc.num_threads for lc in (self.numpy, self.scipy) if lc is not None}

    def set(self, numpy_threads=None, scipy_threads=None):
        for lc, t in ((self.numpy, numpy_threads), (self.scipy, scipy_threads)):
            if lc is not None:
                lc.set_num_threads(t if t is not None else self.default[id(lc)])

    def describe(self) -> str:
        out = []
        for name, lc in (("NumPy", self.numpy), ("SciPy (Numba's np.dot)", self.scipy)):
            if lc is not None:
                out.append(f"{name}: {os.path.basename(lc.filepath)} {lc.version}, kernel "
                           f"{getattr(lc, 'architecture', '?')}, {self.default[id(lc)]} threads by default")
        return "; ".join(out) or self.note


# ======================================================================================
# running
# ======================================================================================


def calcml_revision(cm) -> str:
    """calcml's version, and the repository's commit (+ "dirty" when calcml/ has edits)."""
    out = f"calcml {getattr(cm, '__version__', '?')}"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "calcml"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        if head:
            out += f" at {head}{' + uncommitted edits in calcml/' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def label(key) -> str:
    """A table row's name: (implementation, threads)."""
    name, t = key
    if name.startswith("calcml prog.run"):  # nothing in prog.run is threaded
        return f"{name} (one thread; numba.set_num_threads({t}))"
    return f"{name}, {t} thr"


def timed_rounds(fns: dict, rounds: int, setup) -> tuple:
    """Time each callable ``rounds`` times, in rounds in an order shuffled each round (a fixed
    seed), no untimed warm-up call, the garbage collector off while timing. Returns
    (key -> Timing, key -> the first call's result)."""
    times = {key: Timing(str(key)) for key in fns}
    first = {}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    gc_was = gc.isenabled()
    for _ in range(rounds):
        shuffle(order)
        for key in order:
            setup(key)
            gc.disable()
            try:
                t0 = time.perf_counter()
                out = fns[key]()
                times[key].times.append(time.perf_counter() - t0)
            finally:
                if gc_was:
                    gc.enable()
            first.setdefault(key, out)
    return {key: times[key] for key in fns}, {key: first[key] for key in fns}


def fit_table(title, rows, ref, epochs, extra) -> str:
    lines = [f"### {title}", "",
             "| implementation | median fit | min–max | runs | per epoch (fit / epochs) | time / numpy | "
             "final full cost |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r.name + (f" ({r.note})" if r.note else "")
        if r is ref:
            name = f"**{name}** (ref)"
        lines.append(f"| {name} | {fmt_time(r.median)} | {fmt_time(r.min)}–{fmt_time(r.max)} | {len(r.times)} | "
                     f"{fmt_time(r.median / epochs)} | {r.median / ref.median:.2f}× | {extra.get(r.name, '')} |")
    lines.append("")
    return "\n".join(lines)


def parts_table(a, prog, x0, X, labels, blas) -> str:
    """One 64-row minibatch's value and gradient, one thread. Each call takes the next of
    ``reps`` distinct batches (rows of one permutation): glibc's scalar tanh costs about twice
    as much on fresh arguments as on the same ones again (its branches: 16 against 8.7 ns a
    call here), so repeating one batch would flatter the kernels that call it."""
    mod = prog.module
    theta = pack(x0)
    reps = 200  # calls per timing: a minibatch takes tens of µs to ms
    n_rows = X.shape[0]
    perm = np.random.default_rng(99).permutation(n_rows)
    idx = np.resize(perm, reps * BATCH)  # repeated where N < 200 x 64 rows
    xbs = np.ascontiguousarray(X[idx]).reshape(reps, BATCH, D)
    cbs = np.ascontiguousarray(labels[idx]).reshape(reps, BATCH)
    pre = np.ascontiguousarray((xbs @ x0["W1"].T + x0["b1"]).reshape(reps, BATCH * H))  # pre-activations
    pre_out = np.empty(BATCH * H)
    acc = np.zeros(mod.ACC_SIZES["vg"])
    out_cm = np.empty(N_PARAMS + 1)
    out_fx = np.empty(N_PARAMS + 1)
    v0 = np.empty(0)
    np_p = NumpyNet(x0)

    def cm_vg(i):
        acc[:] = 0.0
        mod.vg_rows(theta, v0, xbs[i], cbs[i], 0, BATCH, 1.0 / BATCH, acc)
        mod.vg_finish(theta, v0, acc, out_cm)

    def fixed_vg(i):  # the same accumulator layout: calcml's vg_finish turns it into (value, gradient)
        acc[:] = 0.0
        fixed_vg_rows(theta, v0, xbs[i], cbs[i], 0, BATCH, 1.0 / BATCH, acc)
        mod.vg_finish(theta, v0, acc, out_fx)

    def numpy_vg(i):
        return np_p.batch_vg(xbs[i], cbs[i])

    cm_vg(0)
    fixed_vg(0)
    ref_v = numpy_vg(0)
    g_ref = np_p.g.copy()

    def err(out):
        return max(abs(out[0] - ref_v) / abs(ref_v), np.max(np.abs(out[1:] - g_ref)) / np.max(np.abs(g_ref)))

    err_cm, err_fx = err(out_cm), err(out_fx)
    ntanh, where = count_tanh(prog.source)
    parts = {
        "numpy batch_vg (fwd + bwd)": numpy_vg,
        f"calcml vg_rows + vg_finish (generated) (rel. diff {err_cm:.0e})": cm_vg,
        f"numba fixed (tanh once, np.dot for every product) + vg_finish (rel. diff {err_fx:.0e})": fixed_vg,
    }
    if ntanh:
        parts[f"{ntanh * BATCH:,} math.tanh calls (calcml's count for 64 rows: the batch's 8,192 values "
              f"{ntanh // H} times)"] = lambda i: tanh_calls(pre[i], ntanh * BATCH)
    parts[f"{H * BATCH:,} math.tanh calls (one per unit and row)"] = lambda i: tanh_calls(pre[i], H * BATCH)
    parts[f"NumPy np.tanh on the same {H * BATCH:,} values (SIMD)"] = lambda i: np.tanh(pre[i], out=pre_out)
    for fn in parts.values():  # compile
        fn(0)
    numba.set_num_threads(1)
    blas.set(numpy_threads=1, scipy_threads=1)
    rows = {name: Timing(name) for name in parts}
    order = list(parts)
    shuffle = random.Random(1).shuffle
    for _ in range(max(a.rounds, 7)):
        shuffle(order)
        for name in order:
            fn = parts[name]
            fn(reps - 1)
            t0 = time.perf_counter()
            for i in range(reps):
                fn(i)
            rows[name].times.append((time.perf_counter() - t0) / reps)
    blas.set()
    rows = list(rows.values())
    text = table(f"One 64-row minibatch: value and gradient, one thread, the mean of {reps} calls on distinct "
                 f"batches per run (load avg {load_avg()})", rows, rows[0], ratio_label="time / numpy")
    if ntanh:
        text += (f"\ncalcml's generated vg_rows calls math.tanh {ntanh:,} times per row in its source "
                 f"({' + '.join(map(str, where))}; LLVM may hoist some out of an inner loop) where {H} would do: the hidden layer tanh(b1[h] + t1[r, h]) is "
                 f"recomputed inside every loop that reads it instead of being stored once per block. "
                 f"Rel. diff: value and gradient against numpy's on the first batch, max |a - b| / max |b|.\n")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="N rows (default 50000; quick 5000)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per fit (default 10; quick 2)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the per-epoch table (default 5; quick 3)")
    ap.add_argument("--fit-rounds", type=int, default=None, help="rounds of the fit table (default 3; quick 2)")
    ap.add_argument("--threads", default="1,2", help="thread counts for the per-epoch table, e.g. 1,2")
    ap.add_argument("--fit-threads", default=None,
                    help="thread counts of the NumPy and PyTorch fits (default 1; calcml's fit runs once)")
    ap.add_argument("--quick", action="store_true", help="N = 5000, 2 epochs, few rounds (smoke run)")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    ap.add_argument("--no-parts", action="store_true", help="skip the one-minibatch table")
    ap.add_argument("--no-build", action="store_true", help="skip calcml's cold-build table")
    ap.add_argument("--no-whatif", action="store_true",
                    help="skip the what-if row (calcml's module with a hand-fixed vg_rows)")
    ap.add_argument("--build-rows", type=int, default=1000, help="rows of data for the build's runs")
    ap.add_argument("--build-repeat", type=int, default=None, help="processes per build row (default 2; quick 1)")
    ap.add_argument("--build-timeout", type=float, default=900.0)
    a = ap.parse_args(argv)
    a.rows = a.rows or (5000 if a.quick else 50000)
    a.epochs = a.epochs or (2 if a.quick else 10)
    a.rounds = a.rounds or (3 if a.quick else 5)
    a.fit_rounds = a.fit_rounds or (2 if a.quick else 3)
    a.build_repeat = a.build_repeat or (1 if a.quick else 2)
    threads = [int(t) for t in a.threads.split(",")]
    tmax = max(threads)
    fit_threads = [int(t) for t in (a.fit_threads or "1").split(",")]

    print("# W10: 64-128-10 tanh network, Adam, batch 64\n")
    print("Command: " + " ".join([os.path.relpath(sys.executable), *sys.argv]) + "\n")
    blas = BlasThreads()
    torch = None
    torch_note = ""
    if not a.no_torch:
        try:
            import torch  # noqa: F811
        except Exception as exc:  # noqa: BLE001
            torch_note = f"PyTorch: not available ({type(exc).__name__}: {exc})"
            torch = None
    print(f"{machine_line()} | torch {torch.__version__ if torch is not None else '(none)'} | "
          f"load avg at start {load_avg()}\n")
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')} | {blas.describe()}\n")

    n = a.rows
    X, labels = make_data(n)
    x0 = make_x0()
    counts = np.bincount(labels, minlength=K)
    print(f"Data: N = {n:,}, d = {D}, H = {H}, K = {K} ({N_PARAMS:,} parameters), seed {SEED_DATA}; "
          f"class shares {counts.min() / n:.1%}–{counts.max() / n:.1%}; {-(-n // BATCH)} updates an epoch, "
          f"{a.epochs} epochs\n")
    notes = [torch_note] if torch_note else []

    # --- calcml -------------------------------------------------------------------------
    import calcml as cm

    t0 = time.perf_counter()
    cost, prog = calcml_program(cm)
    print(f"{calcml_revision(cm)}; generated module: BLOCK = {getattr(prog.module, 'BLOCK', '?')} rows\n")
    assert np.array_equal(cost.pack(x0), pack(x0)), "calcml's parameter order differs"
    data = {"x": X, "c": labels}
    res1 = prog.run(x0, data, epochs=1, seed=SEED_ORDER, tol=0.0)  # compiles or loads
    notes.append(f"calcml: Cost + generate + first run (epochs=1) in this process {time.perf_counter() - t0:.2f} s "
                 f"(CALCML_CACHE_DIR={os.environ['CALCML_CACHE_DIR']}, possibly warm)")

    # --- correctness after one epoch ----------------------------------------------------
    def setup_threads(impl, t):
        numba.set_num_threads(t)
        if impl == "numpy":
            blas.set(numpy_threads=t)
        elif impl == "calcml":  # as prog.run sets it (the per-epoch rows call _epoch directly)
            blas.set(scipy_threads=1)
        elif impl == "torch":
            torch.set_num_threads(t)

    print("## Correctness\n")
    setup_threads("numpy", tmax)
    np1, npf1, nph1 = numpy_fit(x0, X, labels, 1)
    # the per-epoch and what-if rows drive the generated module's internals (_epoch, columns,
    # new_state): if its layout changes, they are left out and the fits (public API) remain
    ce = cw = None
    try:
        perm0 = calcml_order(prog.module, n, SEED_ORDER)
        ce = CalcmlEpoch(prog, x0, X, labels)
        ce_h = ce.epoch(perm0)
        same_direct = np.array_equal(ce.theta, res1.x)
        print(f"- calcml `_epoch` called directly (the per-epoch rows) gives prog.run(epochs=1, tol=0)'s "
              f"{'bits' if same_direct else 'DIFFERENT values'} (max |diff| {np.max(np.abs(ce.theta - res1.x)):.1e}); "
              f"epoch mean cost {ce_h:.12f} vs history {res1.history[-1]:.12f}")
        if not same_direct:
            ce = None
            notes.append("calcml per-epoch row left out: calling _epoch directly does not reproduce prog.run")
        if ce is not None and not a.no_whatif:
            cw = CalcmlEpoch(prog, x0, X, labels, module=whatif_module(prog))
            cw.epoch(perm0)
    except Exception as exc:  # noqa: BLE001 - reported in the notes
        ce = cw = None
        notes.append(f"calcml per-epoch and what-if rows left out (the generated module's internals changed?): "
                     f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    d1 = rel_diffs(res1.params, np1)
    print(f"- after 1 epoch, calcml vs numpy, max |a - b| / max |b|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in d1.items())
          + f"; epoch mean minibatch cost {res1.history[-1]:.15f} vs {nph1[-1]:.15f}; full cost {res1.fun:.15f} vs "
          f"{npf1:.15f}")
    if cw is not None:
        dw = rel_diffs(unpack(cw.theta), np1)
        print("- after 1 epoch, the what-if module (calcml's loop, vg_rows replaced by numba fixed) vs numpy: "
              + ", ".join(f"{k} {v:.1e}" for k, v in dw.items()))
    if torch is not None:
        torch.set_num_threads(tmax)
        tp1, tpf1, tph1 = torch_fit(torch, x0, X, labels, 1)
        dt1 = rel_diffs(tp1, np1)
        print(f"- after 1 epoch, torch vs numpy: " + ", ".join(f"{k} {v:.1e}" for k, v in dt1.items())
              + f"; epoch mean cost {tph1[-1]:.15f}; full cost {tpf1:.15f}")

    print()

    # --- per epoch -------------------------------------------------------------------------
    epoch_rng = np.random.default_rng(12345)
    perms = [epoch_rng.permutation(n).astype(np.int64) for _ in range(4)]
    perm_i = {"i": 0}

    def next_perm():
        perm_i["i"] += 1
        return perms[perm_i["i"] % len(perms)]

    np_net = NumpyNet(x0)
    epochs_fns = {}
    for t in threads:
        epochs_fns[("numpy", t)] = lambda: np_net.epoch(X, labels, next_perm())
        if torch is not None:
            tn = TorchNet(torch, x0, X, labels)
            epochs_fns[("torch", t)] = lambda tn=tn: tn.epoch(next_perm())
        if ce is not None:
            epochs_fns[("calcml _epoch", t)] = lambda: ce.epoch(next_perm())
        if cw is not None and t == tmax:
            epochs_fns[("what-if: calcml _epoch, vg_rows replaced by numba fixed", t)] = lambda: cw.epoch(next_perm())

    def setup(key):
        setup_threads("calcml" if key[0].startswith("what-if") else key[0].split()[0], key[1])

    first = {}
    for key, fn in epochs_fns.items():  # compile; find the rows too slow for the round-robin
        setup(key)
        t0 = time.perf_counter()
        fn()
        first[key] = time.perf_counter() - t0
    fastest = min(first.values())
    slow = {k for k, v in first.items() if v > 1.0 and v > 5 * fastest}
    res = measure_interleaved({k: f for k, f in epochs_fns.items() if k not in slow}, rounds=a.rounds,
                              budget=600.0, setup=setup)
    if slow:
        res.update(timed_rounds({k: epochs_fns[k] for k in slow}, 3, setup)[0])
        notes.append("per epoch, timed in 3 rounds of their own outside the round-robin (the untimed first call "
                     "took over 1 s and over 5x the fastest row's): "
                     + "; ".join(f"{k[0]}, {k[1]} thr ({fmt_time(first[k])})" for k in sorted(slow)))
    res = {k: res[k] for k in epochs_fns}
    blas.set()
    rows = []
    for (name, t), r in res.items():
        r.name = f"{name}, {t} thr"
        rows.append(r)
    ref_e = min((r for k, r in res.items() if k[0] == "numpy"), key=lambda r: r.median)  # the faster numpy
    print(table(f"W10 per epoch: {-(-n // BATCH)} Adam updates on 64-row minibatches, N = {n:,} "
                f"(load avg {load_avg()})", rows, ref_e, ratio_label="time / numpy"))
    print("\"t thr\": NumPy's BLAS threads (threadpoolctl) for numpy; torch.set_num_threads for torch; "
          "numba.set_num_threads for calcml, whose minibatch loop is one single-threaded compiled function "
          "(its np.dot calls on SciPy's BLAS, set to 1 thread as prog.run does).\n")

    # --- the fits: timed in interleaved rounds (calcml's module is already compiled); the
    # first round's results are the 10-epoch check ---------------------------------------
    fits = {}
    for t in fit_threads:
        fits[("numpy", t)] = lambda: numpy_fit(x0, X, labels, a.epochs)
        if torch is not None:
            fits[("torch", t)] = lambda: torch_fit(torch, x0, X, labels, a.epochs)
    # calcml once: no thread count changes its run (see the per-epoch table)
    fits[("calcml prog.run", tmax)] = lambda: prog.run(x0, data, epochs=a.epochs, seed=SEED_ORDER)
    fits[("calcml prog.run tol=0", tmax)] = lambda: prog.run(x0, data, epochs=a.epochs, seed=SEED_ORDER, tol=0.0)
    fres, results = timed_rounds(fits, a.fit_rounds, lambda key: setup_threads(key[0].split()[0], key[1]))
    for key, out in results.items():
        if key[0].startswith("calcml"):
            results[key] = (out.params, out.fun, list(out.history[1:]))
    blas.set()
    ref_key = min((k for k in fres if k[0] == "numpy"), key=lambda k: fres[k].median)  # the faster numpy
    ref_p, ref_f, ref_h = results[ref_key]
    print(f"After {a.epochs} epochs (final full training cost; per-epoch mean minibatch costs; parameters, "
          f"each against numpy on {ref_key[1]} thread(s)):\n")
    print("| implementation | final full cost | rel. diff of cost | max rel. diff of epoch costs | "
          "max rel. diff of parameters (W1, b1, W2, b2) |")
    print("|---|---:|---:|---:|---|")
    extra = {}
    for key, (p, f, h) in results.items():
        dp = rel_diffs(p, ref_p)
        dh = max(abs(x - y) / abs(y) for x, y in zip(h, ref_h))
        print(f"| {label(key)} | {f:.12f} | {abs(f - ref_f) / abs(ref_f):.1e} | {dh:.1e} | "
              + ", ".join(f"{v:.1e}" for v in dp.values()) + " |")
        extra[label(key)] = f"{f:.10f}"
    acc = np.mean(np.argmax(np.tanh(X @ ref_p["W1"].T + ref_p["b1"]) @ ref_p["W2"].T + ref_p["b2"], 1) == labels)
    print(f"\nEpoch mean minibatch costs (numpy): {', '.join(f'{v:.4f}' for v in ref_h)}; the final numpy "
          f"parameters classify {acc:.1%} of the training rows as the teacher does.\n")

    # --- fits ------------------------------------------------------------------------------
    frows = []
    for (name, t), r in fres.items():
        r.name = label((name, t))
        frows.append(r)
    print(fit_table(f"W10 fit: {a.epochs} epochs from x0 to the final full training cost, N = {n:,} "
                    f"(load avg {load_avg()})", frows, fres[ref_key], a.epochs, extra))
    print("calcml prog.run (default tol=1e-8) makes one full-data value-and-gradient pass before the first "
          "epoch, one after each epoch (its convergence test) and one at the end; tol=0 skips the per-epoch "
          "ones. NumPy and PyTorch: the epochs plus one full-data forward pass for the final cost.\n")

    # --- parts -------------------------------------------------------------------------------
    if not a.no_parts:
        try:
            print(parts_table(a, prog, x0, X, labels, blas))
        except Exception as exc:  # noqa: BLE001 - the generated module's internals changed?
            blas.set()
            notes.append(f"parts table left out: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

    for note in notes:
        print(f"- {note}")
    print()

    # --- cold build --------------------------------------------------------------------------
    if not a.no_build:
        print(run_build(a))


if __name__ == "__main__":
    main()
