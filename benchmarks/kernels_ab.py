"""W1/W2 value + gradient: calcml against the hand-written kernel, alternated in one process.

kernels.py times each implementation with single calls, interleaved; on this shared 2-core
machine a single two-thread call swings by +-30% with what the other core is doing, so the
per-run ratios there spread over 0.9-1.1. Here each round times every implementation as the
best of ``--calls`` back-to-back calls (a burst of load from another process spoils one
call, rarely all of them), in an order shuffled anew each round, and reports the median over
the rounds. Same data, same hand-written kernels and the same calcml cost as kernels.py.

Run:  python benchmarks/kernels_ab.py [--workload W1|W2] [--rounds 80] [--calls 3]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import kernels as K  # noqa: E402  (sets OMP_WAIT_POLICY and the benchmark's kernel cache)
import numba  # noqa: E402
import numpy as np  # noqa: E402

from _common import load_avg, machine_line  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="W1", choices=["W1", "W2"])
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--calls", type=int, default=3, help="back-to-back calls per round; the best is kept")
    ap.add_argument("--rows", type=int, default=1_000_000)
    a = ap.parse_args(argv)

    import calcml as cm

    theta, X = K.make_data(a.workload, a.rows)[:2]
    hand_src = K._w1_cols if a.workload == "W1" else K._w2_cols_logfix  # W2: the faster log1p form
    hand = K._jit(hand_src, parallel=True)
    k = cm.compile(K.calcml_cost(a.workload), parallel=True)
    names = list(k.cost.data_names)
    as_dict = {nm: X[j] for j, nm in enumerate(names)}
    separate = {nm: X[j].copy() for j, nm in enumerate(names)}
    prepared = k.prepare(as_dict)
    threads = numba.get_num_threads()

    def on(t, fn):
        def call():
            numba.set_num_threads(t)
            try:
                return fn()
            finally:
                numba.set_num_threads(threads)
        return call

    fns = {
        "hand-written (prange), 1 thread": on(1, lambda: hand(theta, X, K.CHUNK)),
        f"hand-written (prange), {threads} threads (ref)": lambda: hand(theta, X, K.CHUNK),
        "calcml, prepared, 1 thread": on(1, lambda: k.value_and_grad(theta, prepared)),
        f"calcml, prepared, {threads} threads": lambda: k.value_and_grad(theta, prepared),
        f"calcml, dict of (9, N) rows, {threads} threads": lambda: k.value_and_grad(theta, as_dict),
        f"calcml, dict of separate columns, {threads} threads": lambda: k.value_and_grad(theta, separate),
    }
    want = K.scale(a.workload, hand(theta, X, K.CHUNK), a.rows)
    for name, fn in fns.items():
        got = fn()
        if name.startswith("calcml"):
            err = max(abs(got[0] - want[0]) / abs(want[0]), float(np.max(np.abs(got[1] - want[1]) / np.abs(want[1]))))
            assert err < 1e-12, f"{name}: relative difference {err:.1e}"
    times = {name: [] for name in fns}
    order = list(fns.items())
    load0 = load_avg()
    for r in range(a.rounds):
        random.Random(r).shuffle(order)
        for name, fn in order:
            best = float("inf")
            for _ in range(a.calls):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[name].append(best)
    ref = np.median(times[f"hand-written (prange), {threads} threads (ref)"])
    print(f"# {a.workload}: value + gradient, N = {a.rows:,}, best of {a.calls} calls a round, "
          f"{a.rounds} shuffled rounds")
    print(machine_line() + f" | load avg {load0} -> {load_avg()}\n")
    print("| implementation | median of the rounds | ratio to ref (time) | speed vs ref |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        med = np.median(ts)
        print(f"| {name} | {med * 1e3:.3f} ms | {med / ref:.3f}× | {ref / med:.3f}× |")


if __name__ == "__main__":
    main()
