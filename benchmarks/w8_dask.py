"""W8: linear regression value + gradient over Dask data held by a 2-worker local cluster.

See ../shared/BENCHMARKS.md. The data: 4,000,000 x 9 float64 (x0..x7, y; 288 MB), a Dask
array in 8 chunks of 500,000 rows, generated on the workers (a fixed seed per chunk) and
persisted there. Every figure is a median of rounds timed round-robin (each round calls
every implementation once, in a shuffled order), and every ratio is taken in the same run:

- calcml over Dask: ``k.value_and_grad(theta, X)``: the persisted chunks evaluated by the
  workers that hold them (one ``Client.run`` per worker), the chunk sums added on the
  client (the client does no pass over the data); and the same through the scheduler, one
  task per chunk (what lazily read data get);
- Dask's own array expression of the same value and gradient, on the same cluster and the
  same persisted array: ``r = X[:, :8] @ w + b - y``, ``mean(r**2)``,
  ``2/N * X[:, :8].T @ r`` and ``2 * mean(r)``, computed together in one ``dask.compute``;
- calcml on the same data in memory (one process, its two threads), as a user holds them:
  a row-major (N, 9) NumPy array (each call lays it out by column), and the same data
  ``k.prepare``-d once (calcml's layout, the fastest in-memory figure).

A last table times the two rows of the in-memory ratio alone, alternated, each call right
after an untimed one of the same row (``warm=True``: the steady state of a fit's repeated
calls). In the first two tables each round also runs Dask's expression (150 ms of work that
leaves the workers releasing its intermediates) and the row-major and through-the-scheduler
rows, and a call over Dask follows another row's call that held both cores.

The "first call" table times calcml's first evaluation over Dask after the workers have its
machine code: it includes the transposition of each row-major chunk into columns, which a
worker keeps while the chunk lives (later calls skip it).

Run:   python benchmarks/w8_dask.py            # about a minute
       python benchmarks/w8_dask.py --quick    # smoke run: 400,000 rows
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("CALCML_CACHE_DIR", os.path.join(os.path.dirname(HERE), ".bench-cache"))

import numpy as np  # noqa: E402

from _common import load_avg, machine_line, measure_interleaved, table  # noqa: E402

D = 8


def w1_cost():
    import calcml as cm

    w = cm.params("w", D)
    b = cm.params("b")
    x = cm.data("x", D)
    y = cm.data("y")
    return cm.Cost((sum(wi * xi for wi, xi in zip(w, x)) + b - y) ** 2, params=[*w, b], data=[*x, y])


def _chunk(seed: int, rows: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = np.empty((rows, D + 1))
    X[:, :D] = rng.standard_normal((rows, D))
    X[:, D] = X[:, :D] @ np.linspace(-1.0, 1.0, D) + 0.5 + 0.1 * rng.standard_normal(rows)
    return X


def cluster_with_rows(n_rows: int, n_chunks: int, seed0: int, prefix: str):
    """(client, cluster, X): a LocalCluster of 2 single-threaded worker processes with a kernel
    cache of their own (they get the module's source, not the client's cache), and W8's rows
    generated on the workers (a fixed seed per chunk) and persisted there."""
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster, wait

    rows = n_rows // n_chunks
    worker_cache = tempfile.mkdtemp(prefix=prefix)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           env={"CALCML_CACHE_DIR": worker_cache, "OMP_WAIT_POLICY": "PASSIVE",
                                "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    client = Client(cluster)
    blocks = [da.from_delayed(dask.delayed(_chunk)(seed0 + i, rows), shape=(rows, D + 1), dtype=np.float64)
              for i in range(n_chunks)]
    X = da.concatenate(blocks, axis=0).persist()
    wait(X)
    return client, cluster, X


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    n_rows = 400_000 if args.quick else 4_000_000
    n_chunks = 8

    import dask
    from distributed import wait

    import calcml as cm

    client, cluster, X = cluster_with_rows(n_rows, n_chunks, 1000, "calcml-w8-workers-")
    try:
        cost = w1_cost()
        k = cm.compile(cost)
        theta = np.linspace(0.3, -0.3, D + 1)

        t0 = time.perf_counter()
        k.value_and_grad(theta, X)  # the workers write the module, compile (or load) its kernels
        t_build = time.perf_counter() - t0
        X2 = (X + 0.0).persist()  # the same values in new chunks: a first evaluation with the kernels warm
        wait(X2)
        t0 = time.perf_counter()
        first = k.value_and_grad(theta, X2)
        t_first = time.perf_counter() - t0
        del X2

        Xl = X.compute()  # the same data in this process's memory
        prepared = k.prepare(Xl)

        w, b = theta[:D], theta[D]

        def dask_expr():
            feats, y = X[:, :D], X[:, D]
            r = feats @ w + b - y
            return dask.compute((r * r).mean(), (2.0 / n_rows) * (feats.T @ r), 2.0 * r.mean())

        from calcml import dask_data

        def through_tasks():
            dask_data.DIRECT = False
            try:
                return k.value_and_grad(theta, X)
            finally:
                dask_data.DIRECT = True

        impls = {
            "calcml over Dask (2 workers)": lambda: k.value_and_grad(theta, X),
            "calcml over Dask, one task per chunk via the scheduler": through_tasks,
            "Dask array expression (2 workers)": dask_expr,
            "calcml in memory, row-major array": lambda: k.value_and_grad(theta, Xl),
            "calcml in memory, prepared": lambda: k.value_and_grad(theta, prepared),
        }
        # the same answers
        v_dask, g_dask = k.value_and_grad(theta, X)
        v_mem, g_mem = k.value_and_grad(theta, prepared)
        e_val, e_gw, e_gb = dask_expr()
        assert abs(v_dask - v_mem) <= 1e-12 * abs(v_mem), (v_dask, v_mem)
        assert np.allclose(g_dask, g_mem, rtol=1e-12, atol=0), (g_dask, g_mem)
        assert abs(e_val - v_mem) <= 1e-9 * abs(v_mem) and np.allclose(np.append(e_gw, e_gb), g_mem, rtol=1e-9)
        assert first[0] == v_dask
        v_tasks, g_tasks = through_tasks()
        assert v_tasks == v_dask and np.array_equal(g_tasks, g_dask)  # the same bits either way

        timings = measure_interleaved(impls, rounds=args.rounds, budget=60.0)
        ref = timings["Dask array expression (2 workers)"]
        nbytes = n_rows * (D + 1) * 8
        for t in timings.values():
            t.nbytes = nbytes
        print(f"# W8 {n_rows:,} x {D + 1} float64 ({nbytes / 1e6:.0f} MB), {n_chunks} chunks, "
              f"LocalCluster(2 workers x 1 thread)")
        print(machine_line())
        print(f"load average before: {load_avg()}")
        print()
        print(table("W8: value + gradient, ratio to Dask's array expression", list(timings.values()), ref))
        mem = timings["calcml in memory, prepared"]
        print(table("W8: the same, ratio to calcml in memory (prepared)", list(timings.values()), mem))
        calc = timings["calcml over Dask (2 workers)"]
        print(f"calcml over Dask: {ref.median / calc.median:.1f}x faster than Dask's expression (target >= 5x); "
              f"{calc.median / mem.median:.2f}x calcml in memory, prepared (target <= 1.5x); "
              f"{calc.median / timings['calcml in memory, row-major array'].median:.2f}x calcml in memory on the "
              "row-major array")
        # The ratio itself, alone: the two rows alternated, nothing else between them (in the
        # tables above each round also runs Dask's expression, 150 ms of work that leaves the
        # workers releasing its intermediates, and the row-major and through-the-scheduler rows)
        alone = {name: impls[name] for name in ("calcml over Dask (2 workers)", "calcml in memory, prepared")}
        timings2 = measure_interleaved(alone, rounds=2 * args.rounds, budget=60.0, warm=True)
        for t in timings2.values():
            t.nbytes = nbytes
        mem2, calc2 = timings2["calcml in memory, prepared"], timings2["calcml over Dask (2 workers)"]
        print(table("W8: calcml over Dask and in memory (prepared) alone, alternated, each call right after "
                    "an untimed one of its own (a fit's repeated calls)", list(timings2.values()), mem2))
        print(f"calcml over Dask, the two rows alone, steady state: {calc2.median / mem2.median:.2f}x calcml in "
              "memory, prepared (target <= 1.5x)")
        print()
        print("| first calls over Dask | time |")
        print("|---|---:|")
        print(f"| workers cold (own empty cache: write the module, compile its kernel) | {t_build:.2f} s |")
        print(f"| kernels warm, new chunks (each chunk transposed into columns) | {t_first * 1e3:.1f} ms |")
        print(f"load average after: {load_avg()}")
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
