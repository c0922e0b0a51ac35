"""W7: softmax regression value + gradient at MNIST shape, and calcml's cold build.

See ../shared/BENCHMARKS.md (W7). Everything is float64; data come from a fixed seed.

What is measured
----------------
One value and gradient of the mean softmax cross-entropy over N = 60,000 rows, d = 784
features, K = 10 classes (7,850 parameters), integer labels ``c`` in ``0 .. K-1``:

    z    = X @ W.T + b                                   (N, K)
    J    = mean over rows of  logsumexp_k(z_rk) - z_{r, c_r}
    dJ/dW = (P - Y).T @ X / N,   dJ/db = mean over rows of (P - Y)

with ``P = softmax(z)`` and ``Y`` the one-hot labels; ``X`` is (N, d) C-contiguous (376 MB
at full size), ``W`` (K, d), ``b`` (K,). Implementations, each a row of the table:

- ``numpy_vg``: the reference, NumPy/BLAS vectorised (``X @ W.T``, a stable log-sum-exp,
  ``(P - Y).T @ X``); it reads X twice. Threads: NumPy's OpenBLAS, set to 1 or 2 with
  threadpoolctl.
- ``numba_vg``: the best hand-written Numba kernel found (fastmath off, float64): rows in
  blocks of ``BLOCK`` = 32, each block ``Z = Xb @ W.T`` with ``np.dot`` inside ``@njit``
  (Numba calls SciPy's OpenBLAS), the softmax of the block in plain loops, then
  ``(P - Y).T @ Xb`` while the block is still in cache: one pass over X from memory.
  ``prange`` over ``NSTRIPES`` = 16 fixed stripes of blocks, each with its own accumulators,
  added in stripe order at the end. Threads: Numba's, 1 or 2, with SciPy's BLAS set to one
  thread (each prange thread calls BLAS on its own block; a multi-threaded BLAS under two
  Numba threads oversubscribes the 2 cores and ran about 1.5x slower). **Deterministic:**
  the stripes and blocks do not depend on the thread count and each BLAS call is
  single-threaded, so 1 and 2 threads give the same bits (the script checks it).
- ``numba loops``: the other hand-written kernel tried (timed with ``--variants``): plain
  loops that LLVM vectorises, no BLAS. Two rows at a time, 16 lane accumulators per class
  held in registers (the lane loop is unrolled by the vectoriser, not reassociated), the
  gradient as axpy-style loops over the 784 columns. Slower than ``numba_vg``: in one run
  (OPENBLAS_CORETYPE=Haswell, load average 1.6) 120 ms on one thread and 73 ms on two,
  against numba_vg's 88 and 58 ms; the forward pass alone took about 60 ms of a thread:
  without fastmath the dot product over j vectorises only through lanes, and 2 rows x 10
  classes x 16 lanes of accumulators spill registers (R = 1, 3, 4 rows and 8 lanes were
  slower; an 8-trip lane loop is unrolled to scalar code before the vectoriser runs).
- ``numba dgemm`` (also ``--variants``): ``numba_vg`` calling SciPy's ``dgemm`` directly
  (``beta = 1`` accumulates the gradient, no temporary): 86 / 62 ms in the same run, within
  noise of ``numba_vg``, so the simpler ``np.dot`` version is kept.
- calcml, measured only when the tensor API works (``cm.params(..., shape=)``, ``cm.index``,
  ``cm.sum``, ``cm.logsumexp``, ``cm.onehot``, ``cm.compile``; see ``calcml_impl``):
  otherwise the table says "calcml: not available (<error>)". ``k.value_and_grad`` is timed
  with 1 and 2 Numba threads, twice: with the process's BLAS defaults (SciPy's OpenBLAS on
  2 threads, as a user runs it) and with SciPy's BLAS on one thread (as ``numba_vg``). Its
  generated kernel has numba_vg's structure (np.dot per block of 32 rows, fixed stripes),
  and since commit "one BLAS thread per calcml thread" calcml sets SciPy's BLAS to one thread
  itself while a kernel runs, so the two calcml rows measure the same code (before, the
  defaults row took seconds now and then while another process held a core).

Every implementation is checked against ``numpy_vg`` (value and gradient, 1e-10 relative)
before it is timed; one that disagrees is reported and not timed. Timing: interleaved
rounds in an order shuffled each round, each timed call after an untimed one of the same
callable (``_common.measure_interleaved(warm=True)``); medians, min-max, ratio to
``numpy_vg`` on the most threads, GB/s = the bytes of X (read once) over the median time
(NumPy reads X twice, so its memory traffic is twice the figure shown). A row whose every
check call took over 1 s is timed in 3 rounds of its own instead; the round-robin stops
adding rounds after 180 s (never before 3).

A second table: the BLAS calls alone at these shapes (``--no-parts`` skips it): NumPy's
``X @ W.T`` and ``P.T @ X`` over all rows, and the two ``np.dot`` calls per 32-row block
inside Numba (no softmax). A third: calcml's cold build, a fresh process with an empty
CALCML_CACHE_DIR (and NUMBA_CACHE_DIR), from stating the Cost to the first (value,
gradient), at d = 64 and d = 784 (then a warm process on the same cache); skipped when the
calcml path does not work, or with ``--no-build``.

OpenBLAS and this machine
-------------------------
NumPy and SciPy each ship their own OpenBLAS (``scipy_openblas64_`` for NumPy, SciPy's for
Numba's ``np.dot``); both read OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE. This machine's
environment may set OPENBLAS_CORETYPE=Haswell (AVX2 kernels) and OPENBLAS_L2_SIZE=512 on a
CPU with AVX-512, where OpenBLAS would otherwise pick its SkylakeX kernels. The script does
not change them (it prints them and the kernel each library uses); for the figures with
OpenBLAS's own choice, run it once more with both unset:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/w7_softmax.py

Seen on this machine: idle (load average 0.35, a prototype of the same kernel, 7 plain
repeats), numba_vg took 86 / 46 ms on 1 / 2 threads with the Haswell kernels and 39-42 /
27-31 ms with SkylakeX's; numpy_vg 119 / 75 ms and 106 / 74-88 ms. In the script's runs
(2026-12-02, two runs each way, load average 2-3.6: colleagues' jobs held a core): unsetting both made ``numba_vg`` 2.2x faster on one thread (88-91 -> 40 ms: its
32-row ``np.dot`` calls hit OpenBLAS's small-matrix SkylakeX kernels; 128-row blocks miss
them and ran at the Haswell speed) and ``numpy_vg`` about 12% faster on one thread (121-125
-> 108-109 ms: ``P.T @ X`` 52 -> 32 ms, but ``X @ W.T`` 55 -> 64 ms), with no clear change on
two (82-92 ms either way, while a core was busy elsewhere).

Also seen: with another process holding a core, OpenBLAS on 2 threads sometimes takes 1-2 s
for a call that takes 90 ms (one whole run's median of ``numpy_vg`` on 2 threads was 1.98 s);
the max column shows it. Look at the load average printed with each table.

Run
---
    .venv/bin/python benchmarks/w7_softmax.py                 # N = 60,000, 21 rounds
    .venv/bin/python benchmarks/w7_softmax.py --quick         # N = 5,000, 3 rounds (smoke)
    .venv/bin/python benchmarks/w7_softmax.py --rows 60000 --rounds 31 --threads 1,2 --variants

Options: ``--rows N``, ``--rounds R``, ``--threads T`` (a comma-separated list, default
1,2), ``--quick``, ``--variants`` (also time ``numba loops`` and ``numba dgemm``),
``--no-parts``, ``--no-build``, ``--build-repeat``, ``--build-timeout``, ``--block``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, ROOT)  # the repository root, for an uninstalled calcml
# Passive OpenMP waiting (see kernels.py): spinning idle threads on a shared 2-core machine
# slow everything else in the process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# calcml's compiled-kernel cache for the in-process rows (ignored by git); the caller may
# override. The cold-build table always uses fresh empty directories.
os.environ.setdefault("CALCML_CACHE_DIR", os.path.join(ROOT, ".bench-cache"))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg.cython_blas  # noqa: E402,F401  (loads SciPy's BLAS, which Numba's np.dot calls)
from numba import njit, prange  # noqa: E402
from numba.extending import get_cython_function_address  # noqa: E402

from _common import (build_table_rows, load_avg, machine_line, measure_interleaved,  # noqa: E402
                     table)

K = 10  # classes
D = 784  # features
SEED = 7
BLOCK = 32  # rows per block in numba_vg: 32-128 were best with the Haswell kernels, 32 with SkylakeX's
NSTRIPES = 16  # prange tasks: fixed, so the sum order does not depend on the thread count


# ======================================================================================
# data
# ======================================================================================


def make_data(n: int, d: int = D, k: int = K, seed: int = SEED):
    """W (k, d), b (k,), X (n, d) C-contiguous in [0, 1) (pixel-like), labels c (n,) int64."""
    rng = np.random.default_rng(seed)
    X = rng.random((n, d))
    c = rng.integers(0, k, n).astype(np.int64)
    W = 0.05 * rng.standard_normal((k, d))
    b = 0.1 * rng.standard_normal(k)
    return W, b, X, c


# ======================================================================================
# reference: NumPy / BLAS
# ======================================================================================


def numpy_vg(W, b, X, c):
    """(value, dJ/dW, dJ/db), NumPy vectorised: two BLAS products and (N, K) temporaries."""
    n = X.shape[0]
    Z = X @ W.T
    Z += b
    m = Z.max(axis=1, keepdims=True)
    E = np.exp(Z - m)
    s = E.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    value = float(np.mean(m[:, 0] + np.log(s[:, 0]) - Z[rows, c]))
    P = E / s
    P[rows, c] -= 1.0  # P - Y
    return value, (P.T @ X) / n, P.mean(axis=0)


# ======================================================================================
# hand-written Numba: row blocks, BLAS inside @njit, fixed stripes
# ======================================================================================


@njit(inline="always")
def _softmax_rows(Z, b, c, lo, m, gb):
    """Rows 0..m-1 of the block Z (z without b): add b, replace each row by P - Y in place,
    add P - Y into gb, and return the block's sum of logsumexp(z) - z_c (overflow-free)."""
    k_ = Z.shape[1]
    v = 0.0
    for r in range(m):
        mx = -np.inf
        for k in range(k_):
            z = Z[r, k] + b[k]
            Z[r, k] = z
            if z > mx:
                mx = z
        s = 0.0
        for k in range(k_):
            s += np.exp(Z[r, k] - mx)
        cr = c[lo + r]
        v += mx + np.log(s) - Z[r, cr]
        inv = 1.0 / s
        for k in range(k_):
            Z[r, k] = np.exp(Z[r, k] - mx) * inv
        Z[r, cr] -= 1.0
        for k in range(k_):
            gb[k] += Z[r, k]
    return v


@njit(parallel=True)
def _vg_blocked(W, b, X, c, block, nstripes):
    n, d = X.shape
    k_ = W.shape[0]
    WT = np.ascontiguousarray(W.T)  # (d, K): Xb @ WT is a plain C x C product
    nblk = (n + block - 1) // block
    Gs = np.zeros((nstripes, k_, d))
    gbs = np.zeros((nstripes, k_))
    vs = np.zeros(nstripes)
    for s in prange(nstripes):
        b0 = s * nblk // nstripes
        b1 = (s + 1) * nblk // nstripes
        Z = np.empty((block, k_))
        T = np.empty((k_, d))
        G = Gs[s]
        gb = gbs[s]
        v = 0.0
        for blk in range(b0, b1):
            lo = blk * block
            hi = min(lo + block, n)
            m = hi - lo
            Xb = X[lo:hi]  # a C-contiguous view
            Zb = Z[:m]
            np.dot(Xb, WT, Zb)  # (m, K)
            v += _softmax_rows(Zb, b, c, lo, m, gb)
            np.dot(Zb.T, Xb, T)  # (K, d) = (P - Y).T @ Xb, Xb still in L1/L2
            for k in range(k_):
                for j in range(d):
                    G[k, j] += T[k, j]
        vs[s] = v
    G = np.zeros((k_, d))
    gb = np.zeros(k_)
    v = 0.0
    for s in range(nstripes):  # stripe order: the same for any thread count
        G += Gs[s]
        gb += gbs[s]
        v += vs[s]
    return v / n, G / n, gb / n


def numba_vg(W, b, X, c, block=BLOCK, nstripes=NSTRIPES):
    """(value, dJ/dW, dJ/db). Run it with SciPy's BLAS on one thread (threadpoolctl): each
    prange thread makes its own BLAS calls."""
    return _vg_blocked(W, b, X, c, block, nstripes)


# --- the same with SciPy's dgemm called directly (beta = 1 accumulates the gradient) ----
# Fortran BLAS is column-major: a C-ordered (r, s) array is its transpose, (s, r) col-major.
_dgemm = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13))(
    get_cython_function_address("scipy.linalg.cython_blas", "dgemm"))


@njit(parallel=True)
def _vg_dgemm(W, b, X, c, block, nstripes):
    n, d = X.shape
    k_ = W.shape[0]
    nblk = (n + block - 1) // block
    Gs = np.zeros((nstripes, k_, d))
    gbs = np.zeros((nstripes, k_))
    vs = np.zeros(nstripes)
    for s in prange(nstripes):
        b0 = s * nblk // nstripes
        b1 = (s + 1) * nblk // nstripes
        Z = np.empty((block, k_))
        G = Gs[s]
        gb = gbs[s]
        v = 0.0
        tn = np.empty(2, np.uint8)
        tn[0] = 84  # 'T'
        tn[1] = 78  # 'N'
        dims = np.empty(6, np.int32)
        one_zero = np.empty(2)
        one_zero[0] = 1.0
        one_zero[1] = 0.0
        for blk in range(b0, b1):
            lo = blk * block
            hi = min(lo + block, n)
            m = hi - lo
            Xb = X[lo:hi]
            # Z.T (K x m) = W (T of the d x K col-major view) . Xb.T (d x m), beta = 0
            dims[0] = k_; dims[1] = m; dims[2] = d; dims[3] = d; dims[4] = d; dims[5] = k_  # noqa: E702
            _dgemm(tn[0:].ctypes.data, tn[1:].ctypes.data, dims[0:].ctypes.data, dims[1:].ctypes.data,
                   dims[2:].ctypes.data, one_zero[0:].ctypes.data, W.ctypes.data, dims[3:].ctypes.data,
                   Xb.ctypes.data, dims[4:].ctypes.data, one_zero[1:].ctypes.data, Z.ctypes.data,
                   dims[5:].ctypes.data)
            v += _softmax_rows(Z, b, c, lo, m, gb)
            # G.T (d x K) += Xb.T (d x m) . (P - Y) (T of the K x m col-major view), beta = 1
            dims[0] = d; dims[1] = k_; dims[2] = m; dims[3] = d; dims[4] = k_; dims[5] = d  # noqa: E702
            _dgemm(tn[1:].ctypes.data, tn[0:].ctypes.data, dims[0:].ctypes.data, dims[1:].ctypes.data,
                   dims[2:].ctypes.data, one_zero[0:].ctypes.data, Xb.ctypes.data, dims[3:].ctypes.data,
                   Z.ctypes.data, dims[4:].ctypes.data, one_zero[0:].ctypes.data, G.ctypes.data,
                   dims[5:].ctypes.data)
        vs[s] = v
    G = np.zeros((k_, d))
    gb = np.zeros(k_)
    v = 0.0
    for s in range(nstripes):
        G += Gs[s]
        gb += gbs[s]
        v += vs[s]
    return v / n, G / n, gb / n


def numba_dgemm_vg(W, b, X, c, block=BLOCK, nstripes=NSTRIPES):
    return _vg_dgemm(np.ascontiguousarray(W), b, X, c, block, nstripes)


# ======================================================================================
# hand-written Numba, plain loops (no BLAS): the slower alternative, kept for --variants
# ======================================================================================

ROWS = 2  # rows per tile: 2 x 10 classes x 16 lanes of accumulators (R = 3 or 4 was slower)
LANES = 16  # an 8-trip lane loop is fully unrolled before the vectoriser sees it: scalar code


def _make_loops_kernel(k_: int, rows: int, lanes: int):
    """The class count, rows per tile and lanes are compile-time constants (closure): LLVM
    unrolls the class and row loops, vectorises the lane loop and keeps the accumulators in
    registers."""

    @njit(inline="always")
    def _tile(W, b, X, c, i, R, acc, Zt, G, gb):
        d = X.shape[1]
        dv = d - d % lanes
        acc[:] = 0.0
        for jb in range(0, dv, lanes):
            for l in range(lanes):  # noqa: E741 - vectorised: no dependence across l
                j = np.uintp(jb + l)
                for k in range(k_):
                    w = W[np.uintp(k), j]
                    for r in range(R):
                        acc[np.uintp(r), np.uintp(k), np.uintp(l)] += w * X[np.uintp(i + r), j]
        v = 0.0
        for r in range(R):
            mx = -np.inf
            for k in range(k_):
                z = b[k]
                for l in range(lanes):  # noqa: E741
                    z += acc[r, k, l]
                for j in range(dv, d):
                    z += W[k, j] * X[i + r, j]
                Zt[r, k] = z
                if z > mx:
                    mx = z
            s = 0.0
            for k in range(k_):
                s += np.exp(Zt[r, k] - mx)
            cr = c[i + r]
            v += mx + np.log(s) - Zt[r, cr]
            inv = 1.0 / s
            for k in range(k_):
                Zt[r, k] = np.exp(Zt[r, k] - mx) * inv
            Zt[r, cr] -= 1.0
            for k in range(k_):
                gb[k] += Zt[r, k]
        for k in range(k_):  # G[k, :] += sum_r (P - Y)[r, k] * X[i + r, :], vectorised over j
            for jj in range(d):
                j = np.uintp(jj)
                g = G[k, j]
                for r in range(R):
                    g += Zt[r, k] * X[np.uintp(i + r), j]
                G[k, j] = g
        return v

    @njit(parallel=True)
    def vg_loops(W, b, X, c, nstripes):
        n, d = X.shape
        ntile = n // rows
        Gs = np.zeros((nstripes, k_, d))
        gbs = np.zeros((nstripes, k_))
        vs = np.zeros(nstripes)
        for s in prange(nstripes):
            t0 = s * ntile // nstripes
            t1 = (s + 1) * ntile // nstripes
            acc = np.zeros((rows, k_, lanes))
            Zt = np.empty((rows, k_))
            v = 0.0
            for t in range(t0, t1):
                v += _tile(W, b, X, c, t * rows, rows, acc, Zt, Gs[s], gbs[s])
            if s == nstripes - 1:  # the n % rows rows after the last full tile
                for i in range(ntile * rows, n):
                    v += _tile(W, b, X, c, i, 1, acc, Zt, Gs[s], gbs[s])
            vs[s] = v
        G = np.zeros((k_, d))
        gb = np.zeros(k_)
        v = 0.0
        for s in range(nstripes):
            G += Gs[s]
            gb += gbs[s]
            v += vs[s]
        return v / n, G / n, gb / n

    return vg_loops


_LOOPS = {}


def numba_loops_vg(W, b, X, c, nstripes=NSTRIPES):
    k_ = W.shape[0]
    if k_ not in _LOOPS:
        _LOOPS[k_] = _make_loops_kernel(k_, ROWS, LANES)
    return _LOOPS[k_](W, b, X, c, nstripes)


# --- the BLAS calls alone, for the "parts" table ---------------------------------------


@njit(parallel=True)
def _blocked_dots_only(W, X, block, nstripes):
    """numba_vg's two np.dot calls per block, without the softmax (P - Y := Z)."""
    n, d = X.shape
    k_ = W.shape[0]
    WT = np.ascontiguousarray(W.T)
    nblk = (n + block - 1) // block
    out = np.zeros(nstripes)
    for s in prange(nstripes):
        b0 = s * nblk // nstripes
        b1 = (s + 1) * nblk // nstripes
        Z = np.empty((block, k_))
        T = np.empty((k_, d))
        acc = 0.0
        for blk in range(b0, b1):
            lo = blk * block
            hi = min(lo + block, n)
            Xb = X[lo:hi]
            Zb = Z[:hi - lo]
            np.dot(Xb, WT, Zb)
            np.dot(Zb.T, Xb, T)
            acc += T[0, 0]
        out[s] = acc
    return out


# ======================================================================================
# calcml (the tensor API of ../shared/API.md, "Tensor costs")
# ======================================================================================


def calcml_cost(cm, k_: int = K, d: int = D):
    W = cm.params("W", shape=(k_, d))
    b = cm.params("b", shape=(k_,))
    x = cm.data("x", shape=(d,))
    c = cm.data("c", classes=k_)
    k = cm.index("k", k_)
    j = cm.index("j", d)
    z = cm.sum(W[k, j] * x[j], j) + b[k]
    return cm.Cost(cm.logsumexp(z, k) - cm.sum(cm.onehot(c, k) * z, k), params=[W, b], data=[x, c])


def calcml_impl(W, b, X, c):
    """A callable returning (value, gW, gb) from calcml, and the seconds its in-process build
    took (Cost, compile, first call; the cache under CALCML_CACHE_DIR may be warm); or None
    and the reason it is not available."""
    try:
        t0 = time.perf_counter()
        import calcml as cm

        cost = calcml_cost(cm, W.shape[0], W.shape[1])
        kern = cm.compile(cost)
        theta = cost.pack({"W": W, "b": b})
        data = {"x": X, "c": c}
        kd = W.size

        def fn():
            v, g = kern.value_and_grad(theta, data)
            return v, g[:kd].reshape(W.shape), g[kd:]

        fn()
        return fn, time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - reported in the table's notes
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        return None, msg[:300]


# --- cold build in a fresh process -------------------------------------------------------

CHILD_BUILD = """
import time
_t_start = time.perf_counter()
import json, sys
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
import numpy as np, numba, sympy
t1 = time.perf_counter()
import calcml as cm
t2 = time.perf_counter()
K, d, n = {k}, {d}, {n}
rng = np.random.default_rng(0)
X = rng.random((n, d)); c = rng.integers(0, K, n)
Wv = 0.05 * rng.standard_normal((K, d)); bv = 0.1 * rng.standard_normal(K)
t3 = time.perf_counter()
W = cm.params("W", shape=(K, d)); b = cm.params("b", shape=(K,))
x = cm.data("x", shape=(d,)); cl = cm.data("c", classes=K)
k = cm.index("k", K); j = cm.index("j", d)
z = cm.sum(W[k, j] * x[j], j) + b[k]
cost = cm.Cost(cm.logsumexp(z, k) - cm.sum(cm.onehot(cl, k) * z, k), params=[W, b], data=[x, cl])
t4 = time.perf_counter()
kern = cm.compile(cost)
t5 = time.perf_counter()
theta = cost.pack({{"W": Wv, "b": bv}})
f, g = kern.value_and_grad(theta, {{"x": X, "c": c}})
t6 = time.perf_counter()
print(json.dumps({{"imports": t1 - t0, "import_calcml": t2 - t1, "cost": t4 - t3, "compile": t5 - t4,
                  "first_call": t6 - t5, "to_gradient": t6 - t3, "beyond_imports": (t2 - t1) + (t6 - t3),
                  "process": t6 - _t_start}}))
"""


def run_build(a) -> str:
    """Cold (empty caches) and warm (the same caches, a second process) builds at d = 64, 784."""
    lines = [f"### calcml build, fresh processes, Cost → first (value, gradient) at N = {a.build_rows:,} rows: "
             f"median (min–max) of {a.build_repeat}; load avg {load_avg()}", "",
             "| d (parameters) | cache | Cost → first gradient | of which compile | first call | "
             "beyond the imports | imports (numpy, numba, sympy) | import calcml | whole process |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for d in (64, D):
        src = CHILD_BUILD.format(root=ROOT, k=K, d=d, n=a.build_rows)
        rows, failed = build_table_rows(src, a.build_repeat, a.build_timeout, ROOT, "calcml-w7-",
                                        [f"{d} ({K * d + K:,})"],
                                        ["to_gradient", "compile", "first_call", "beyond_imports", "imports",
                                         "import_calcml", "process"], where=f"d = {d}, ")
        lines += rows
        notes += failed
    lines.append("")
    lines.append("\"Beyond the imports\" = import calcml + Cost → first gradient (not the data's generation). "
                 "Targets: cold < 10 s, warm < 0.3 s beyond the imports, about the same at d = 64 and 784.")
    return "\n".join(lines + notes) + "\n"


# ======================================================================================
# threads: Numba's, and each OpenBLAS's (threadpoolctl)
# ======================================================================================


class BlasThreads:
    """NumPy's and SciPy's OpenBLAS, each set to a thread count with threadpoolctl."""

    def __init__(self):
        self.numpy = self.scipy = None
        self.note = ""
        try:
            from threadpoolctl import ThreadpoolController

            libs = [lc for lc in ThreadpoolController().lib_controllers if lc.user_api == "blas"]
        except Exception as exc:  # noqa: BLE001
            self.note = f"threadpoolctl unavailable ({exc!r}): BLAS thread counts left at their defaults"
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


def rel_diff(a, b) -> float:
    """max(|va - vb| / |vb|, ||ga - gb||_inf / ||gb||_inf), the gradient as (gW, gb) flat."""
    ga = np.concatenate([np.ravel(a[1]), np.ravel(a[2])])
    gb = np.concatenate([np.ravel(b[1]), np.ravel(b[2])])
    return max(abs(a[0] - b[0]) / abs(b[0]), float(np.max(np.abs(ga - gb)) / np.max(np.abs(gb))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="N rows (default 60000; quick 5000)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 21; quick 3)")
    ap.add_argument("--threads", default="1,2", help="thread counts to time, e.g. 1,2")
    ap.add_argument("--quick", action="store_true", help="N = 5000, 3 rounds, build at 1 repeat (smoke run)")
    ap.add_argument("--variants", action="store_true", help="also time the plain-loops and direct-dgemm kernels")
    ap.add_argument("--block", type=int, default=BLOCK, help=f"rows per block in numba_vg (default {BLOCK})")
    ap.add_argument("--no-parts", action="store_true", help="skip the table of BLAS calls alone")
    ap.add_argument("--no-build", action="store_true", help="skip calcml's cold-build table")
    ap.add_argument("--build-repeat", type=int, default=None, help="processes per build row (default 2; quick 1)")
    ap.add_argument("--build-rows", type=int, default=1000, help="rows of data for the build's first call")
    ap.add_argument("--build-timeout", type=float, default=600.0, help="seconds allowed per build process")
    a = ap.parse_args(argv)
    a.rows = a.rows or (5000 if a.quick else 60000)
    a.rounds = a.rounds or (3 if a.quick else 21)
    a.build_repeat = a.build_repeat or (1 if a.quick else 2)
    threads = [int(t) for t in a.threads.split(",")]
    tmax = max(threads)

    print("# W7: softmax regression value + gradient (MNIST shape)\n")
    print("Command: " + " ".join([os.path.relpath(sys.executable), *sys.argv]) + "\n")
    _blocked_dots_only(np.zeros((K, 8)), np.zeros((4, 8)), 2, 2)  # start the threading layer
    blas = BlasThreads()
    print(f"{machine_line()} | load avg at start {load_avg()}\n")
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')} | {blas.describe()}\n")

    t0 = time.perf_counter()
    W, b, X, c = make_data(a.rows)
    n = a.rows
    print(f"Data: N = {n:,}, d = {D}, K = {K}, X {X.nbytes / 1e6:.0f} MB, seed {SEED} "
          f"(generated in {time.perf_counter() - t0:.1f} s)\n")

    # --- implementations: name -> (callable returning (value, gW, gb), kind) -------------
    impls = {
        "numpy_vg": (lambda: numpy_vg(W, b, X, c), "numpy"),
        f"numba_vg (np.dot in @njit, {a.block}-row blocks)": (lambda: numba_vg(W, b, X, c, a.block), "numba"),
    }
    if a.variants:
        impls["numba dgemm (direct, beta = 1)"] = (lambda: numba_dgemm_vg(W, b, X, c, a.block), "numba")
        impls[f"numba loops ({ROWS} rows x {LANES} lanes, no BLAS)"] = (lambda: numba_loops_vg(W, b, X, c), "numba")
    notes = []
    cm_fn, cm_info = calcml_impl(W, b, X, c)
    if cm_fn is None:
        notes.append(f"calcml: not available ({cm_info})")
    else:
        impls["calcml k.value_and_grad, BLAS defaults"] = (cm_fn, "calcml")
        impls["calcml k.value_and_grad, SciPy BLAS 1 thread"] = (cm_fn, "calcml-blas1")
        notes.append(f"calcml: built and first call in process in {cm_info:.2f} s "
                     f"(CALCML_CACHE_DIR={os.environ['CALCML_CACHE_DIR']}, possibly warm)")

    def setup(key):
        name, t = key
        kind = impls[name][1]
        numba.set_num_threads(t)
        if kind == "calcml":  # the process's BLAS defaults, as a user would run it
            blas.set()
        else:  # numpy: t BLAS threads; numba (and calcml-blas1): one BLAS thread per worker thread
            blas.set(numpy_threads=t, scipy_threads=1)

    # --- correctness: every implementation against numpy_vg, on every thread count -------
    setup(("numpy_vg", tmax))
    ref = numpy_vg(W, b, X, c)
    timed, slow = {}, {}
    worst = {}
    for name in list(impls):
        outs = []
        took = []
        try:  # compile (Numba) or load (calcml) first: the calls below are timed
            setup((name, tmax))
            impls[name][0]()
        except Exception:  # noqa: BLE001 - reported by the loop below
            pass
        for t in threads:
            setup((name, t))
            try:
                t0 = time.perf_counter()
                outs.append(impls[name][0]())
                took.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{name}, {t} thr: failed: {type(exc).__name__}: {exc}")
                outs = None
                break
        if outs is None:
            continue
        err = max(rel_diff(o, ref) for o in outs)
        worst[name] = err
        same = all(o[0] == outs[0][0] and np.array_equal(o[1], outs[0][1]) and np.array_equal(o[2], outs[0][2])
                   for o in outs[1:])
        if name != "numpy_vg" and len(threads) > 1:
            notes.append(f"{name}: {'the same bits' if same else 'different bits'} on "
                         f"{' and '.join(map(str, threads))} threads")
        if err > 1e-10:
            notes.append(f"{name}: disagrees with numpy_vg ({err:.1e} relative > 1e-10): not timed")
            continue
        # every check call over a second (not one slow call: OpenBLAS on 2 threads takes 1-2 s now
        # and then when another process holds a core): a few rounds only, outside the round-robin
        for t in threads:
            (slow if min(took) > 1.0 else timed)[(name, t)] = impls[name][0]

    # --- timing -------------------------------------------------------------------------
    res = measure_interleaved(timed, rounds=a.rounds, budget=180.0, nbytes=X.nbytes,
                              setup=setup, warm=True)
    if slow:
        res.update(measure_interleaved(slow, rounds=3, budget=0.0, nbytes=X.nbytes, setup=setup))
        notes.append(f"timed in 3 rounds of their own, outside the round-robin (a call took over 1 s): "
                     f"{', '.join(sorted({k[0] for k in slow}))}")
    blas.set()
    rows = []
    for (name, t), r in res.items():
        r.name = f"{name}, {t} thr"
        r.note = f"rel. diff {worst[name]:.0e}" if name != "numpy_vg" else ""
        rows.append(r)
    ref_t = res[("numpy_vg", tmax)]
    print(table(f"W7: softmax regression value + gradient, N = {n:,}, d = {D}, K = {K}, "
                f"{X.nbytes / 1e6:.0f} MB of X; GB/s = X bytes / median (load avg {load_avg()})",
                rows, ref_t, ratio_label="time / numpy_vg"))
    print("\"t thr\": NumPy's BLAS threads for numpy_vg; Numba's threads for the Numba and calcml rows, "
          "with SciPy's BLAS (Numba's np.dot) on one thread except in calcml's \"BLAS defaults\" rows "
          f"({blas.default.get(id(blas.scipy), '?') if blas.scipy is not None else '?'} threads).\n")
    for note in notes:
        print(f"- {note}")
    print()

    # --- the BLAS calls alone -----------------------------------------------------------
    if not a.no_parts:
        P = np.random.default_rng(1).random((n, K))
        parts = {}
        for t in threads:
            parts[("NumPy X @ W.T", t)] = (lambda: X @ W.T, "numpy")
            parts[("NumPy P.T @ X", t)] = (lambda: P.T @ X, "numpy")
            parts[(f"Numba np.dot pair per {a.block}-row block (no softmax)", t)] = (
                lambda: _blocked_dots_only(W, X, a.block, NSTRIPES), "numba")

        def psetup(key):
            numba.set_num_threads(key[1])
            blas.set(numpy_threads=key[1], scipy_threads=1)

        pres = measure_interleaved({k: v[0] for k, v in parts.items()}, rounds=a.rounds,
                                   budget=90.0, nbytes=X.nbytes, setup=psetup, warm=True)
        blas.set()
        prow = []
        for (name, t), r in pres.items():
            r.name = f"{name}, {t} thr"
            prow.append(r)
        print(table(f"The BLAS products alone at these shapes (each reads X once; load avg {load_avg()})",
                    prow, ref_t, ratio_label="time / numpy_vg"))

    # --- cold build ---------------------------------------------------------------------
    if a.no_build:
        pass
    elif cm_fn is None:
        print("calcml build: skipped (the calcml path is not available)\n")
    else:
        print(run_build(a))


if __name__ == "__main__":
    main()
