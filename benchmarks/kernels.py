"""W0, W1, W2: memory bandwidth, and value + gradient of linear and logistic regression.

See ../shared/BENCHMARKS.md. Everything is float64, data from a fixed seed, and every
figure is a median of repeated runs, timed round-robin (each round calls every
implementation once, so a burst of load from another process hits all of them alike).
Ratios are to the reference measured in the same run: the best hand-written two-thread
Numba kernel without fastmath (the policy). GB/s is the bytes of data read per pass over
the median time.

- W0: triad ``a = b + s*c`` over 200 MB (three 66.7 MB arrays), Numba prange, 1 and 2
  threads; also read-only sums over the same 200 MB, one stream and nine concurrent
  streams (W1 and W2 only read, nine columns at once: that is their ceiling).
- W1: linear regression, mean squared error, d = 8 + bias, N = 1,000,000: one value and
  gradient, mean over rows.
- W2: logistic regression, the stable log-loss ``softplus(z) - y*z`` with ``z = w.x + b``,
  ``softplus(z) = max(z, 0) + log1p(exp(-|z|))``, ``sigmoid`` without overflow.

References: hand-written Numba kernels (column layout and row-major, serial and threaded,
fastmath off, plus fastmath rows for comparison), NumPy vectorised, SymPy ``lambdify`` of
the exact gradient (with and without ``cse``), and calcml when ``calcml.compile`` exists
(see ``calcml_impls``: the one place to adjust to calcml's API). The cost of converting a
row-major (N, 9) array into column layout once is in its own table.

Run:   python benchmarks/kernels.py            # W0, W1, W2 (about a minute or two)
       python benchmarks/kernels.py --quick    # smoke run: small sizes, few repeats
       python benchmarks/kernels.py --only W1 --threading-layer workqueue

The loop structure of the hand-written kernels is the fastest one found by
``benchmarks/kernel_variants.py`` (the structure study); see that file for the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # the repository root, for an uninstalled calcml
# libgomp's default (active) wait policy spins idle OpenMP threads; when another process
# holds a core of this 2-core machine, that makes 2-thread kernels (and everything else in
# the process, NumPy included) several times slower. Passive unless the caller says so.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# calcml's compiled-kernel cache for this benchmark (ignored by git); the caller may override.
os.environ.setdefault("CALCML_CACHE_DIR", os.path.join(os.path.dirname(HERE), ".bench-cache"))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import sympy as sp  # noqa: E402
from numba import njit, prange  # noqa: E402

from _common import Timing, load_avg, machine_line, measure_interleaved, table  # noqa: E402

D = 8  # features
NCOLS = D + 1  # x0..x7, y: one column per cost.data symbol
NOUT = D + 2  # value, d/dw0..d/dw7, d/db
CHUNK = 16384  # rows per prange task: fixed, so the sum order does not depend on threads
LANES = 16  # lane accumulators per chunk (see the note above _w1_cols)
SEED = 12345

# ======================================================================================
# W0: memory bandwidth
# ======================================================================================


@njit(parallel=True)
def triad(a, b, c, s):
    for i in prange(a.shape[0]):
        a[i] = b[i] + s * c[i]


@njit(parallel=True, fastmath={"reassoc"})
def read_sum(x):
    """One read stream."""
    s = 0.0
    for i in prange(x.shape[0]):
        s += x[i]
    return s


@njit(parallel=True, fastmath={"reassoc"})
def read_sum9(X, chunk):
    """Read-only over X = (9, m), the nine rows at once: nine concurrent streams, like
    W1's nine columns."""
    m = X.shape[1]
    nch = (m + chunk - 1) // chunk
    part = np.empty(nch)
    for c in prange(nch):
        lo = c * chunk
        hi = min(lo + chunk, m)
        s = 0.0
        for t in range(lo, hi):
            i = np.uintp(t)
            s += X[0, i] + X[1, i] + X[2, i] + X[3, i] + X[4, i] + X[5, i] + X[6, i] + X[7, i] + X[8, i]
        part[c] = s
    return part.sum()


# ======================================================================================
# Hand-written kernels. Structure (see kernel_variants.py for the alternatives timed):
#   * prange over fixed CHUNK-row chunks; each chunk writes its partial sums to its own
#     row of `part`, and the rows are added in chunk order at the end, so the answer is
#     the same for any number of threads;
#   * indices cast to np.uintp: Numba then emits no negative-index wraparound, which
#     otherwise turns vector loads into scalar loads + inserts;
#   * "lane" accumulators: a (NOUT, LANES) array per chunk, row base+l adding into
#     column l. The loop over l carries no dependence, so LLVM's loop vectoriser
#     vectorises it with no fastmath flag; the summation order is fixed by the source
#     (not by the vector width LLVM picks). About 2x the scalar-accumulator loop on this
#     machine. LANES = 16, not 8: outside a prange body LLVM fully unrolls an 8-trip loop
#     first and, with Numba's SLP vectoriser off, leaves it scalar.
# They return the raw sums; the wrappers scale by 1/N (and 2/N for W1's gradient).
# ======================================================================================


def _w1_cols(theta, X, chunk):
    """W1 sums over rows, X = (NCOLS, N) C-contiguous, one row per column (x0..x7, y)."""
    n = X.shape[1]
    w0 = theta[0]; w1 = theta[1]; w2 = theta[2]; w3 = theta[3]  # noqa: E702
    w4 = theta[4]; w5 = theta[5]; w6 = theta[6]; w7 = theta[7]  # noqa: E702
    b = theta[8]
    nch = (n + chunk - 1) // chunk
    part = np.empty((nch, NOUT))
    for c in prange(nch):
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc = np.zeros((NOUT, LANES))
        nblk = (hi - lo) // LANES
        for blk in range(nblk):
            base = lo + blk * LANES
            for l in range(LANES):  # noqa: E741
                i = np.uintp(base + l)
                x0 = X[0, i]; x1 = X[1, i]; x2 = X[2, i]; x3 = X[3, i]  # noqa: E702
                x4 = X[4, i]; x5 = X[5, i]; x6 = X[6, i]; x7 = X[7, i]  # noqa: E702
                y = X[8, i]
                r = w0*x0 + w1*x1 + w2*x2 + w3*x3 + w4*x4 + w5*x5 + w6*x6 + w7*x7 + b - y
                acc[0, l] += r * r
                acc[1, l] += r * x0; acc[2, l] += r * x1; acc[3, l] += r * x2  # noqa: E702
                acc[4, l] += r * x3; acc[5, l] += r * x4; acc[6, l] += r * x5  # noqa: E702
                acc[7, l] += r * x6; acc[8, l] += r * x7  # noqa: E702
                acc[9, l] += r
        for k in range(lo + nblk * LANES, hi):  # the last chunk's tail, into lane 0
            i = np.uintp(k)
            x0 = X[0, i]; x1 = X[1, i]; x2 = X[2, i]; x3 = X[3, i]  # noqa: E702
            x4 = X[4, i]; x5 = X[5, i]; x6 = X[6, i]; x7 = X[7, i]  # noqa: E702
            y = X[8, i]
            r = w0*x0 + w1*x1 + w2*x2 + w3*x3 + w4*x4 + w5*x5 + w6*x6 + w7*x7 + b - y
            acc[0, 0] += r * r
            acc[1, 0] += r * x0; acc[2, 0] += r * x1; acc[3, 0] += r * x2  # noqa: E702
            acc[4, 0] += r * x3; acc[5, 0] += r * x4; acc[6, 0] += r * x5  # noqa: E702
            acc[7, 0] += r * x6; acc[8, 0] += r * x7  # noqa: E702
            acc[9, 0] += r
        for k in range(NOUT):
            t = 0.0
            for l in range(LANES):  # noqa: E741
                t += acc[k, l]
            part[c, k] = t
    out = np.zeros(NOUT)
    for c in range(nch):
        for k in range(NOUT):
            out[k] += part[c, k]
    return out


def _w1_rows(theta, R, chunk):
    """W1 sums, R = (N, NCOLS) row-major: the same structure as _w1_cols."""
    n = R.shape[0]
    w0 = theta[0]; w1 = theta[1]; w2 = theta[2]; w3 = theta[3]  # noqa: E702
    w4 = theta[4]; w5 = theta[5]; w6 = theta[6]; w7 = theta[7]  # noqa: E702
    b = theta[8]
    nch = (n + chunk - 1) // chunk
    part = np.empty((nch, NOUT))
    for c in prange(nch):
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc = np.zeros((NOUT, LANES))
        nblk = (hi - lo) // LANES
        for blk in range(nblk):
            base = lo + blk * LANES
            for l in range(LANES):  # noqa: E741
                i = np.uintp(base + l)
                x0 = R[i, 0]; x1 = R[i, 1]; x2 = R[i, 2]; x3 = R[i, 3]  # noqa: E702
                x4 = R[i, 4]; x5 = R[i, 5]; x6 = R[i, 6]; x7 = R[i, 7]  # noqa: E702
                y = R[i, 8]
                r = w0*x0 + w1*x1 + w2*x2 + w3*x3 + w4*x4 + w5*x5 + w6*x6 + w7*x7 + b - y
                acc[0, l] += r * r
                acc[1, l] += r * x0; acc[2, l] += r * x1; acc[3, l] += r * x2  # noqa: E702
                acc[4, l] += r * x3; acc[5, l] += r * x4; acc[6, l] += r * x5  # noqa: E702
                acc[7, l] += r * x6; acc[8, l] += r * x7  # noqa: E702
                acc[9, l] += r
        for k in range(lo + nblk * LANES, hi):
            i = np.uintp(k)
            x0 = R[i, 0]; x1 = R[i, 1]; x2 = R[i, 2]; x3 = R[i, 3]  # noqa: E702
            x4 = R[i, 4]; x5 = R[i, 5]; x6 = R[i, 6]; x7 = R[i, 7]  # noqa: E702
            y = R[i, 8]
            r = w0*x0 + w1*x1 + w2*x2 + w3*x3 + w4*x4 + w5*x5 + w6*x6 + w7*x7 + b - y
            acc[0, 0] += r * r
            acc[1, 0] += r * x0; acc[2, 0] += r * x1; acc[3, 0] += r * x2  # noqa: E702
            acc[4, 0] += r * x3; acc[5, 0] += r * x4; acc[6, 0] += r * x5  # noqa: E702
            acc[7, 0] += r * x6; acc[8, 0] += r * x7  # noqa: E702
            acc[9, 0] += r
        for k in range(NOUT):
            t = 0.0
            for l in range(LANES):  # noqa: E741
                t += acc[k, l]
            part[c, k] = t
    out = np.zeros(NOUT)
    for c in range(nch):
        for k in range(NOUT):
            out[k] += part[c, k]
    return out


def _w1_cols_scalar(theta, X, chunk):
    """W1 sums with plain scalar accumulators (the simplest chunked form)."""
    n = X.shape[1]
    w0 = theta[0]; w1 = theta[1]; w2 = theta[2]; w3 = theta[3]  # noqa: E702
    w4 = theta[4]; w5 = theta[5]; w6 = theta[6]; w7 = theta[7]  # noqa: E702
    b = theta[8]
    nch = (n + chunk - 1) // chunk
    part = np.empty((nch, NOUT))
    for c in prange(nch):
        lo = c * chunk
        hi = min(lo + chunk, n)
        f = g0 = g1 = g2 = g3 = g4 = g5 = g6 = g7 = gb = 0.0
        for k in range(lo, hi):
            i = np.uintp(k)
            x0 = X[0, i]; x1 = X[1, i]; x2 = X[2, i]; x3 = X[3, i]  # noqa: E702
            x4 = X[4, i]; x5 = X[5, i]; x6 = X[6, i]; x7 = X[7, i]  # noqa: E702
            y = X[8, i]
            r = w0*x0 + w1*x1 + w2*x2 + w3*x3 + w4*x4 + w5*x5 + w6*x6 + w7*x7 + b - y
            f += r * r
            g0 += r * x0; g1 += r * x1; g2 += r * x2; g3 += r * x3  # noqa: E702
            g4 += r * x4; g5 += r * x5; g6 += r * x6; g7 += r * x7  # noqa: E702
            gb += r
        part[c, 0] = f
        part[c, 1] = g0; part[c, 2] = g1; part[c, 3] = g2; part[c, 4] = g3  # noqa: E702
        part[c, 5] = g4; part[c, 6] = g5; part[c, 7] = g6; part[c, 8] = g7  # noqa: E702
        part[c, 9] = gb
    out = np.zeros(NOUT)
    for c in range(nch):
        for k in range(NOUT):
            out[k] += part[c, k]
    return out


@njit(inline="always", error_model="numpy")
def _log1p_via_log(e):
    """log1p(e) for 0 <= e <= 1 from log: log(u) * e / (u - 1) with u = 1 + e (Goldberg's
    correction; at most 2 ulp on this machine against mpmath, libm's log1p 1 ulp). log
    is about 2.5x cheaper than libm's log1p here."""
    u = 1.0 + e
    d = u - 1.0
    return e if d == 0.0 else np.log(u) * (e / d)


def _make_w2_cols(log1p):
    """_w2_cols with a given log1p (libm's, or _log1p_via_log)."""

    def _w2_cols(theta, X, chunk):
        """W2 sums: loss softplus(z) - y*z, dloss/dz = sigmoid(z) - y; X as in _w1_cols.

        Stable: e = exp(-|z|) <= 1, softplus = max(z, 0) + log1p(e), sigmoid = 1/(1+e) for
        z >= 0 and e/(1+e) otherwise. exp and log1p are scalar libm calls (no SVML here), so
        the lane loop does not vectorise; it still helps the out-of-order core overlap rows.
        """
        n = X.shape[1]
        w0 = theta[0]; w1 = theta[1]; w2 = theta[2]; w3 = theta[3]  # noqa: E702
        w4 = theta[4]; w5 = theta[5]; w6 = theta[6]; w7 = theta[7]  # noqa: E702
        b = theta[8]
        nch = (n + chunk - 1) // chunk
        part = np.empty((nch, NOUT))
        for c in prange(nch):
            lo = c * chunk
            hi = min(lo + chunk, n)
            acc = np.zeros((NOUT, LANES))
            nblk = (hi - lo) // LANES
            for blk in range(nblk):
                base = lo + blk * LANES
                for l in range(LANES):  # noqa: E741
                    i = np.uintp(base + l)
                    x0 = X[0, i]; x1 = X[1, i]; x2 = X[2, i]; x3 = X[3, i]  # noqa: E702
                    x4 = X[4, i]; x5 = X[5, i]; x6 = X[6, i]; x7 = X[7, i]  # noqa: E702
                    y = X[8, i]
                    z = w0*x0 + w1*x1 + w2*x2 + w3*x3 + w4*x4 + w5*x5 + w6*x6 + w7*x7 + b
                    e = np.exp(-abs(z))
                    q = 1.0 / (1.0 + e)
                    r = (q if z >= 0.0 else e * q) - y
                    acc[0, l] += max(z, 0.0) + log1p(e) - y * z
                    acc[1, l] += r * x0; acc[2, l] += r * x1; acc[3, l] += r * x2  # noqa: E702
                    acc[4, l] += r * x3; acc[5, l] += r * x4; acc[6, l] += r * x5  # noqa: E702
                    acc[7, l] += r * x6; acc[8, l] += r * x7  # noqa: E702
                    acc[9, l] += r
            for k in range(lo + nblk * LANES, hi):
                i = np.uintp(k)
                x0 = X[0, i]; x1 = X[1, i]; x2 = X[2, i]; x3 = X[3, i]  # noqa: E702
                x4 = X[4, i]; x5 = X[5, i]; x6 = X[6, i]; x7 = X[7, i]  # noqa: E702
                y = X[8, i]
                z = w0*x0 + w1*x1 + w2*x2 + w3*x3 + w4*x4 + w5*x5 + w6*x6 + w7*x7 + b
                e = np.exp(-abs(z))
                q = 1.0 / (1.0 + e)
                r = (q if z >= 0.0 else e * q) - y
                acc[0, 0] += max(z, 0.0) + log1p(e) - y * z
                acc[1, 0] += r * x0; acc[2, 0] += r * x1; acc[3, 0] += r * x2  # noqa: E702
                acc[4, 0] += r * x3; acc[5, 0] += r * x4; acc[6, 0] += r * x5  # noqa: E702
                acc[7, 0] += r * x6; acc[8, 0] += r * x7  # noqa: E702
                acc[9, 0] += r
            for k in range(NOUT):
                t = 0.0
                for l in range(LANES):  # noqa: E741
                    t += acc[k, l]
                part[c, k] = t
        out = np.zeros(NOUT)
        for c in range(nch):
            for k in range(NOUT):
                out[k] += part[c, k]
        return out

    return _w2_cols


_w2_cols = _make_w2_cols(np.log1p)
_w2_cols_logfix = _make_w2_cols(_log1p_via_log)


def _w2_rows(theta, R, chunk):
    """W2 sums, R = (N, NCOLS) row-major."""
    n = R.shape[0]
    w0 = theta[0]; w1 = theta[1]; w2 = theta[2]; w3 = theta[3]  # noqa: E702
    w4 = theta[4]; w5 = theta[5]; w6 = theta[6]; w7 = theta[7]  # noqa: E702
    b = theta[8]
    nch = (n + chunk - 1) // chunk
    part = np.empty((nch, NOUT))
    for c in prange(nch):
        lo = c * chunk
        hi = min(lo + chunk, n)
        acc = np.zeros((NOUT, LANES))
        nblk = (hi - lo) // LANES
        for blk in range(nblk):
            base = lo + blk * LANES
            for l in range(LANES):  # noqa: E741
                i = np.uintp(base + l)
                x0 = R[i, 0]; x1 = R[i, 1]; x2 = R[i, 2]; x3 = R[i, 3]  # noqa: E702
                x4 = R[i, 4]; x5 = R[i, 5]; x6 = R[i, 6]; x7 = R[i, 7]  # noqa: E702
                y = R[i, 8]
                z = w0*x0 + w1*x1 + w2*x2 + w3*x3 + w4*x4 + w5*x5 + w6*x6 + w7*x7 + b
                e = np.exp(-abs(z))
                q = 1.0 / (1.0 + e)
                r = (q if z >= 0.0 else e * q) - y
                acc[0, l] += max(z, 0.0) + np.log1p(e) - y * z
                acc[1, l] += r * x0; acc[2, l] += r * x1; acc[3, l] += r * x2  # noqa: E702
                acc[4, l] += r * x3; acc[5, l] += r * x4; acc[6, l] += r * x5  # noqa: E702
                acc[7, l] += r * x6; acc[8, l] += r * x7  # noqa: E702
                acc[9, l] += r
        for k in range(lo + nblk * LANES, hi):
            i = np.uintp(k)
            x0 = R[i, 0]; x1 = R[i, 1]; x2 = R[i, 2]; x3 = R[i, 3]  # noqa: E702
            x4 = R[i, 4]; x5 = R[i, 5]; x6 = R[i, 6]; x7 = R[i, 7]  # noqa: E702
            y = R[i, 8]
            z = w0*x0 + w1*x1 + w2*x2 + w3*x3 + w4*x4 + w5*x5 + w6*x6 + w7*x7 + b
            e = np.exp(-abs(z))
            q = 1.0 / (1.0 + e)
            r = (q if z >= 0.0 else e * q) - y
            acc[0, 0] += max(z, 0.0) + np.log1p(e) - y * z
            acc[1, 0] += r * x0; acc[2, 0] += r * x1; acc[3, 0] += r * x2  # noqa: E702
            acc[4, 0] += r * x3; acc[5, 0] += r * x4; acc[6, 0] += r * x5  # noqa: E702
            acc[7, 0] += r * x6; acc[8, 0] += r * x7  # noqa: E702
            acc[9, 0] += r
        for k in range(NOUT):
            t = 0.0
            for l in range(LANES):  # noqa: E741
                t += acc[k, l]
            part[c, k] = t
    out = np.zeros(NOUT)
    for c in range(nch):
        for k in range(NOUT):
            out[k] += part[c, k]
    return out


def _w2_cols_scalar(theta, X, chunk):
    """W2 sums with plain scalar accumulators."""
    n = X.shape[1]
    w0 = theta[0]; w1 = theta[1]; w2 = theta[2]; w3 = theta[3]  # noqa: E702
    w4 = theta[4]; w5 = theta[5]; w6 = theta[6]; w7 = theta[7]  # noqa: E702
    b = theta[8]
    nch = (n + chunk - 1) // chunk
    part = np.empty((nch, NOUT))
    for c in prange(nch):
        lo = c * chunk
        hi = min(lo + chunk, n)
        f = g0 = g1 = g2 = g3 = g4 = g5 = g6 = g7 = gb = 0.0
        for k in range(lo, hi):
            i = np.uintp(k)
            x0 = X[0, i]; x1 = X[1, i]; x2 = X[2, i]; x3 = X[3, i]  # noqa: E702
            x4 = X[4, i]; x5 = X[5, i]; x6 = X[6, i]; x7 = X[7, i]  # noqa: E702
            y = X[8, i]
            z = w0*x0 + w1*x1 + w2*x2 + w3*x3 + w4*x4 + w5*x5 + w6*x6 + w7*x7 + b
            e = np.exp(-abs(z))
            q = 1.0 / (1.0 + e)
            r = (q if z >= 0.0 else e * q) - y
            f += max(z, 0.0) + np.log1p(e) - y * z
            g0 += r * x0; g1 += r * x1; g2 += r * x2; g3 += r * x3  # noqa: E702
            g4 += r * x4; g5 += r * x5; g6 += r * x6; g7 += r * x7  # noqa: E702
            gb += r
        part[c, 0] = f
        part[c, 1] = g0; part[c, 2] = g1; part[c, 3] = g2; part[c, 4] = g3  # noqa: E702
        part[c, 5] = g4; part[c, 6] = g5; part[c, 7] = g6; part[c, 8] = g7  # noqa: E702
        part[c, 9] = gb
    out = np.zeros(NOUT)
    for c in range(nch):
        for k in range(NOUT):
            out[k] += part[c, k]
    return out


RC = {"reassoc", "contract"}  # reorder sums, allow FMA; NaN/Inf semantics kept


def _jit(fn, parallel=True, fastmath=False):
    return njit(parallel=parallel, fastmath=fastmath, error_model="numpy")(fn)


KERNELS = {
    # name: (python function, parallel, fastmath)
    "W1": {
        "cols": (_w1_cols, True, False),
        "cols serial": (_w1_cols, False, False),
        "rows": (_w1_rows, True, False),
        "cols scalar-acc": (_w1_cols_scalar, True, False),
        "cols scalar-acc fastmath={reassoc,contract}": (_w1_cols_scalar, True, RC),
        "cols scalar-acc fastmath=True": (_w1_cols_scalar, True, True),
    },
    "W2": {
        "cols": (_w2_cols, True, False),
        "cols serial": (_w2_cols, False, False),
        "rows": (_w2_rows, True, False),
        "cols scalar-acc": (_w2_cols_scalar, True, False),
        "cols fastmath={reassoc,contract}": (_w2_cols, True, RC),
        "cols fastmath=True": (_w2_cols, True, True),
        "cols, log1p(e) as log(1+e)*e/((1+e)-1)": (_w2_cols_logfix, True, False),
    },
}


def scale(workload: str, sums: np.ndarray, n: int):
    """Raw sums -> (mean value, mean gradient)."""
    if workload == "W1":  # d/dtheta (r^2) = 2 r dr/dtheta; the 2 is exact to factor out
        return sums[0] / n, 2.0 * sums[1:] / n
    return sums[0] / n, sums[1:] / n


# ======================================================================================
# NumPy and SymPy references
# ======================================================================================


def numpy_vg(workload: str, theta, X, y):
    """Vectorised NumPy. X: (D, N) column block or (N, D) row block; y: (N,)."""
    n = y.shape[0]
    w, b = theta[:D], theta[D]
    cols = X.shape[0] == D
    z = (w @ X if cols else X @ w) + b
    g = np.empty(D + 1)
    if workload == "W1":
        r = z - y
        f = (r @ r) / n
        g[:D] = (X @ r) if cols else (r @ X)
        g[D] = r.sum()
        g *= 2.0 / n
        return f, g
    e = np.exp(-np.abs(z))
    f = np.sum(np.maximum(z, 0.0) + np.log1p(e) - y * z) / n
    q = 1.0 / (1.0 + e)
    r = np.where(z >= 0.0, q, e * q) - y
    g[:D] = (X @ r) if cols else (r @ X)
    g[D] = r.sum()
    g /= n
    return f, g


class _softplus(sp.Function):
    """softplus for the lambdify reference, with the exact derivative rule."""

    nargs = 1

    def fdiff(self, argindex=1):
        return _sigmoid(self.args[0])


class _sigmoid(sp.Function):
    nargs = 1

    def fdiff(self, argindex=1):
        s = _sigmoid(self.args[0])
        return s * (1 - s)


def _np_softplus(z):
    return np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))


def _np_sigmoid(z):
    e = np.exp(-np.abs(z))
    q = 1.0 / (1.0 + e)
    return np.where(z >= 0.0, q, e * q)


def sympy_cost(workload: str):
    """The per-row cost and its exact gradient in plain SymPy."""
    w = sp.symbols(f"w0:{D}", real=True)
    b = sp.Symbol("b", real=True)
    x = sp.symbols(f"x0:{D}", real=True)
    y = sp.Symbol("y", real=True)
    z = sum(wi * xi for wi, xi in zip(w, x)) + b
    expr = (z - y) ** 2 if workload == "W1" else _softplus(z) - y * z
    params = [*w, b]
    grad = [sp.diff(expr, p) for p in params]
    return params, [*x, y], expr, grad


def sympy_lambdify_vg(workload: str, cse: bool):
    params, data, expr, grad = sympy_cost(workload)
    mods = [{"_softplus": _np_softplus, "_sigmoid": _np_sigmoid}, "numpy"]
    f = sp.lambdify([*params, *data], [expr, *grad], modules=mods, cse=cse)

    def vg(theta, cols):
        out = f(*theta, *cols)
        return float(np.mean(out[0])), np.array([np.mean(o) for o in out[1:]])

    return vg


# ======================================================================================
# calcml (skipped with a note while calcml.compile does not exist)
# ======================================================================================


def calcml_cost(workload: str):
    import calcml as cm

    w = cm.params("w", D)
    b = cm.params("b")
    x = cm.data("x", D)
    y = cm.data("y")
    z = cm.dot(w, x) + b
    expr = (z - y) ** 2 if workload == "W1" else cm.softplus(z) - y * z
    return cm.Cost(expr, params=[*w, b], data=[*x, y])


def calcml_impls(workload: str, theta, cols, rows, threads):
    """name -> (callable returning (f, g), threads or None); and notes. Adjust here."""
    out, notes = {}, []
    try:
        import calcml as cm

        compile_ = cm.compile
    except (ImportError, AttributeError) as exc:
        return out, [f"calcml rows skipped: calcml.compile is not importable yet ({exc!r})"]
    cost = calcml_cost(workload)
    names = [s.name for s in cost.data]
    as_dict = {nm: cols[j] for j, nm in enumerate(names)}
    variants = [("calcml", {})]
    try:  # a parallel= option, if compile takes one
        import inspect

        if "parallel" in inspect.signature(compile_).parameters:
            variants = [("calcml parallel=False", {"parallel": False}),
                        ("calcml parallel=True", {"parallel": True})]
    except (TypeError, ValueError):
        pass
    for label, kw in variants:
        try:
            k = compile_(cost, **kw)
        except Exception as exc:  # noqa: BLE001 - report and go on
            notes.append(f"{label}: compile failed: {exc!r}")
            continue
        forms = [("dict of columns", as_dict), ("(N, 9) row-major array", rows)]
        if hasattr(k, "prepare"):
            try:
                forms.append(("prepared", k.prepare(as_dict)))
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{label}: prepare failed: {exc!r}")
        for form, data in forms:
            fn = (lambda k=k, data=data: k.value_and_grad(theta, data))
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{label}, {form}: value_and_grad failed: {exc!r}")
                continue
            for t in threads:
                out[f"{label}, {form}, {t} thr"] = (fn, t)
    return out, notes


def calcml_prepare(workload: str, rows):
    """calcml's own conversion of a row-major array, if it has k.prepare."""
    try:
        import calcml as cm

        k = cm.compile(calcml_cost(workload))
    except Exception:  # noqa: BLE001
        return None
    if not hasattr(k, "prepare"):
        return None
    return lambda: k.prepare(rows)


# ======================================================================================
# data, layout conversion
# ======================================================================================


def make_data(workload: str, n: int, seed: int = SEED):
    """theta (9,), and the data as a (NCOLS, N) C-contiguous column array x0..x7, y."""
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


@njit(parallel=True)
def _to_columns(R, out, chunk):
    n, m = R.shape
    nch = (n + chunk - 1) // chunk
    for c in prange(nch):
        lo = c * chunk
        hi = min(lo + chunk, n)
        for k in range(lo, hi):
            i = np.uintp(k)
            for j in range(m):
                out[j, i] = R[i, j]


def to_columns_numba(R):
    out = np.empty((R.shape[1], R.shape[0]))
    _to_columns(R, out, CHUNK)
    return out


# ======================================================================================
# running
# ======================================================================================


def rel_diff(a, b) -> float:
    """max(|fa - fb| / |fb|, ||ga - gb||_inf / ||gb||_inf)."""
    fa, ga = a
    fb, gb = b
    return max(abs(fa - fb) / abs(fb), float(np.max(np.abs(np.asarray(ga) - gb)) / np.max(np.abs(gb))))


def run_w0(a) -> str:
    total = 20_000_000 if a.quick else 200_000_000
    n = total // 24
    buf = np.empty(3 * n)
    buf[:] = 1.0
    A, B, C = buf[:n], buf[n:2 * n], buf[2 * n:]
    B[:] = 2.0
    fns, nbytes = {}, {}
    for t in a.threads:
        fns[("triad a = b + s*c", t)] = lambda: triad(A, B, C, 3.0)
        nbytes[("triad a = b + s*c", t)] = 3 * n * 8
    X9 = buf[: (buf.shape[0] // 9) * 9].reshape(9, -1)
    for t in a.threads:
        fns[("read-only sum, 1 stream", t)] = lambda: read_sum(buf)
        nbytes[("read-only sum, 1 stream", t)] = buf.nbytes
        fns[("read-only sum, 9 streams (chunks of 16k)", t)] = lambda: read_sum9(X9, CHUNK)
        nbytes[("read-only sum, 9 streams (chunks of 16k)", t)] = X9.nbytes
    res = measure_interleaved(fns, rounds=a.rounds, budget=a.budget * len(fns), nbytes=nbytes,
                              setup=lambda key: numba.set_num_threads(key[1]))
    rows = []
    for (name, t), r in res.items():
        r.name = f"{name}, {t} thr"
        rows.append(r)
    ref = res[("triad a = b + s*c", max(a.threads))]
    return table(f"W0: memory bandwidth, {buf.nbytes / 1e6:.0f} MB (triad counts reads + writes, "
                 f"STREAM convention; load avg {load_avg()})", rows, ref)


def run_workload(workload: str, a) -> str:
    n = 200_000 if a.quick else 1_000_000
    theta, cols = make_data(workload, n)
    rows = np.ascontiguousarray(cols.T)
    nbytes = cols.nbytes
    out_parts = []

    # --- implementations: key -> (callable returning (f, g), threads or None) ------------
    impls = {}
    kern = {name: _jit(fn, par, fm) for name, (fn, par, fm) in KERNELS[workload].items()}
    for name, k in kern.items():
        data = rows if name.startswith("rows") else cols
        fn = (lambda k=k, data=data: scale(workload, k(theta, data, CHUNK), n))
        if name.endswith("serial"):
            impls[f"hand {name}"] = (fn, 1)
        else:
            for t in a.threads:
                impls[f"hand {name}, {t} thr"] = (fn, t)
    ref_key = f"hand cols, {max(a.threads)} thr"
    serial_key = "hand cols serial"
    Xc, yc = cols[:D], cols[D]
    Xr = rows[:, :D]
    impls["NumPy, columns"] = (lambda: numpy_vg(workload, theta, Xc, yc), None)
    impls["NumPy, row-major"] = (lambda: numpy_vg(workload, theta, Xr, rows[:, D]), None)
    col_list = [cols[j] for j in range(NCOLS)]
    if not a.no_sympy:
        t0 = time.perf_counter()
        lam = sympy_lambdify_vg(workload, cse=False)
        t_lam = time.perf_counter() - t0
        lam_cse = sympy_lambdify_vg(workload, cse=True)
        impls["SymPy lambdify"] = (lambda: lam(theta, col_list), None)
        impls["SymPy lambdify cse=True"] = (lambda: lam_cse(theta, col_list), None)
    cm_impls, notes = calcml_impls(workload, theta, cols, rows, a.threads)
    impls.update(cm_impls)

    # --- correctness: every implementation against the hand serial kernel ----------------
    base = impls[serial_key][0]()
    diffs = {}
    for key, (fn, t) in impls.items():
        if t is not None:
            numba.set_num_threads(t)
        diffs[key] = rel_diff(fn(), base)
    numba.set_num_threads(max(a.threads))

    def setup(key):
        t = impls[key][1]
        if t is not None:
            numba.set_num_threads(t)

    slow = [k for k in impls if k.startswith("SymPy")]
    fast = {k: v[0] for k, v in impls.items() if k not in slow}
    # warm: each timed call follows an untimed one (a fit calls its kernel back to back)
    res = measure_interleaved(fast, rounds=a.rounds, budget=a.budget * len(fast), nbytes=nbytes, setup=setup,
                              warm=True)
    if slow:  # 0.1-0.5 s a call: a few runs only, outside the round-robin
        res.update(measure_interleaved({k: impls[k][0] for k in slow}, rounds=3, budget=a.budget,
                                       nbytes=nbytes, setup=setup))
    numba.set_num_threads(max(a.threads))
    ref = res[ref_key]
    rowsout = []
    for key, r in res.items():
        r.name = key
        r.note = "" if diffs[key] < 1e-12 else f"rel. diff {diffs[key]:.1e}"
        rowsout.append(r)
    title = {"W1": "W1: linear regression MSE", "W2": "W2: logistic regression, stable log-loss"}[workload]
    out_parts.append(table(
        f"{title}, value + gradient, N = {n:,}, d = {D} + bias, {nbytes / 1e6:.0f} MB read per pass "
        f"(load avg {load_avg()})", rowsout, ref))
    worst = max(diffs.values())
    out_parts.append(f"All implementations agree with the hand serial kernel to {worst:.1e} "
                     f"(max relative difference over value and gradient; rows above 1e-12 say so)."
                     + (f" SymPy lambdify built in {t_lam:.2f} s." if not a.no_sympy else "") + "\n")
    for note in notes:
        out_parts.append(f"- {note}\n")

    # --- converting row-major data once --------------------------------------------------
    if workload == "W1" or a.conversion_all:
        conv = {
            "np.ascontiguousarray(R.T) -> (9, N)": (lambda: np.ascontiguousarray(rows.T), None),
            "dict of 9 column copies": (lambda: {j: np.ascontiguousarray(rows[:, j]) for j in range(NCOLS)}, None),
        }
        for t in a.threads:
            conv[f"Numba chunked transpose -> (9, N), {t} thr"] = (lambda: to_columns_numba(rows), t)
        cp = calcml_prepare(workload, rows)
        if cp is not None:
            for t in a.threads:
                conv[f"calcml k.prepare(R), {t} thr"] = (cp, t)
        res = measure_interleaved({k: v[0] for k, v in conv.items()}, rounds=a.rounds,
                                  budget=a.budget * len(conv), nbytes=2 * nbytes,
                                  setup=lambda key: conv[key][1] and numba.set_num_threads(conv[key][1]))
        numba.set_num_threads(max(a.threads))
        crow = list(res.values())
        ref_conv = Timing("one W1 value+grad, hand cols 2 thr (for scale)", times=ref.times, nbytes=nbytes)
        out_parts.append(table(
            f"Converting the row-major (N, 9) array to column layout once, N = {n:,} "
            f"(GB/s counts bytes read + written, incl. allocating the output; ratio to one "
            f"{workload} value+grad pass)", [*crow, ref_conv], ref_conv, ratio_label="ratio to one pass"))
    return "\n".join(out_parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    ap.add_argument("--only", default="W0,W1,W2", help="comma-separated workloads: W0,W1,W2")
    ap.add_argument("--threads", default="1,2", help="thread counts to time, e.g. 1,2")
    ap.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 21; quick 3)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per row (default 0.5)")
    ap.add_argument("--threading-layer", default=None, choices=["default", "omp", "workqueue", "tbb"],
                    help="numba threading layer (default: numba's choice, usually omp)")
    ap.add_argument("--no-sympy", action="store_true", help="skip the slow SymPy lambdify rows")
    ap.add_argument("--conversion-all", action="store_true", help="also time the conversion table for W2")
    a = ap.parse_args(argv)
    a.threads = [int(t) for t in a.threads.split(",")]
    a.rounds = a.rounds or (3 if a.quick else 21)
    a.budget = a.budget if a.budget is not None else (0.1 if a.quick else 0.5)
    if a.threading_layer:
        numba.config.THREADING_LAYER = a.threading_layer
    only = [w.strip().upper() for w in a.only.split(",")]

    print("# calcml kernel benchmarks (W0, W1, W2)\n")
    print("Command: " + " ".join([os.path.relpath(sys.executable), *sys.argv]) + "\n")
    triad(np.ones(8), np.ones(8), np.ones(8), 1.0)  # start the threading layer
    print(f"{machine_line()} | load avg at start {load_avg()}\n")
    if "W0" in only:
        print(run_w0(a), flush=True)
    for w in ("W1", "W2"):
        if w in only:
            print(run_workload(w, a), flush=True)


if __name__ == "__main__":
    main()
