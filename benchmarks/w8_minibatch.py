"""W8, minibatch: where a minibatch fit over Dask data should run its epochs.

A minibatch fit over Dask data visits the chunks of rows in a seeded random order each epoch
and runs the compiled epoch loop over one chunk at a time (calcml.tensor.optimize). Two
places can do that, and this measures both on the same data and seed (they give the same
bits, asserted here):

- "chunks": one chain of Dask tasks per epoch, each running the loop where its chunk is held;
  only the parameters and the optimizer's state (a few hundred bytes) travel between them;
- "client": each chunk fetched to the client (this process), the loop run here.

The data: W8's 4,000,000 x 9 float64 (x0..x7, y; 288 MB) in 8 chunks, generated on a
LocalCluster of 2 workers x 1 thread and persisted there; linear regression, Adam with
batches of 256 rows, 2 epochs. For scale: the same fit's work in memory (calcml's own
minibatch loop over a NumPy array in this process; its shuffle is over all rows, so its
bits differ). Medians of rounds timed round-robin, in one run.

Run:   python benchmarks/w8_minibatch.py            # about two minutes
       python benchmarks/w8_minibatch.py --quick    # 400,000 rows
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("CALCML_CACHE_DIR", os.path.join(os.path.dirname(HERE), ".bench-cache"))

import numpy as np  # noqa: E402

from _common import load_avg, machine_line, measure_interleaved, table  # noqa: E402
from w8_dask import D, cluster_with_rows, w1_cost  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n_rows = 400_000 if args.quick else 4_000_000
    n_chunks = 8

    import calcml as cm
    from calcml.tensor import optimize

    client, cluster, X = cluster_with_rows(n_rows, n_chunks, 2000, "calcml-w8mb-workers-")
    try:
        cost = w1_cost()
        kw = dict(method="adam", lr=0.01, batch_size=256, epochs=2, seed=1, tol=0.0)
        x0 = np.zeros(D + 1)

        def fit(where):
            def run():
                optimize.MINIBATCH_WHERE = where
                try:
                    return cm.minimize(cost, x0, data=X, **kw)
                finally:
                    optimize.MINIBATCH_WHERE = "chunks"
            return run

        Xl = X.compute()
        a, b = fit("chunks")(), fit("client")()  # (also: the workers build the loop's module)
        assert np.array_equal(a.x, b.x) and a.fun == b.fun, (a.x, b.x)
        mem = cm.minimize(cost, x0, data=Xl, **kw)
        print(f"# the fits: over Dask x = {np.round(a.x, 4).tolist()}, in memory x = {np.round(mem.x, 4).tolist()}")
        impls = {
            "epochs where the chunks are (a chain of tasks)": fit("chunks"),
            "epochs on the client (each chunk fetched)": fit("client"),
            "calcml in memory (one process, the same work)": lambda: cm.minimize(cost, x0, data=Xl, **kw),
        }
        timings = measure_interleaved(impls, rounds=args.rounds, budget=240.0)
        print(f"# W8 minibatch: {n_rows:,} x {D + 1} float64, {n_chunks} chunks, LocalCluster(2 workers x 1 thread); "
              f"adam, batch 256, 2 epochs")
        print(machine_line())
        print(f"load average: {load_avg()}")
        print()
        ref = timings["epochs where the chunks are (a chain of tasks)"]
        print(table("W8 minibatch: one fit, ratio to the epochs where the chunks are", list(timings.values()), ref))
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
