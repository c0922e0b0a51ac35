"""W8, out of core: logistic regression fitted over Parquet files bigger than the workers' memory.

See ../shared/BENCHMARKS.md (W8) and ../docs/dask.md. What it does, in one run:

1. Writes a Parquet data set lazily, file by file, on the cluster (never all in memory):
   ``--rows`` rows (default 20,000,000) x 9 float64 columns, ``x0 .. x7`` standard normal and
   a binary label ``y`` drawn from a known logistic model (``P(y=1) = sigmoid(x . w* + b*)``),
   ``--rows-per-file`` rows a file (default 500,000; one Dask partition each). 20 M rows are
   1.44 GB of float64. The files are kept under ``--path`` and reused by the next run with the
   same rows, files and seed (``--rewrite`` writes them again).
2. Starts a ``LocalCluster`` of 2 worker processes, one thread each, ``memory_limit="1GB"``
   each: the data (1.44 GB at 20 M rows) fit in neither worker, nor in both together.
3. Fits logistic regression with calcml: a scalar cost (``cm.params``/``cm.data``), the stable
   mean log-loss ``softplus(z) - y z`` with ``z = w . x + b``, by
   ``cm.minimize(cost, 0, data=dask.dataframe.read_parquet(...), method="lbfgs")``: each pass
   over the rows is one Dask computation in which each worker reads a file and returns its
   sums (10 numbers); nothing else comes back to the client.
4. Fits dask-ml's ``LogisticRegression(solver="lbfgs")`` on the same files in the same run, as
   dask-ml documents it for a DataFrame: ``X = frame.to_dask_array(lengths=True)`` (one array,
   so each of its passes reads each file once), features ``X[:, :8]``, labels ``X[:, 8]``.

**The same problem.** dask-ml regularizes by default (``penalty="l2"``, ``C=1``): it minimizes
the *sum* of the log-losses plus ``||(w, b)||^2 / (2 C)`` (its intercept is penalized too) and,
by default, does so on standardized columns (``normalize=True``), which puts the penalty on the
standardized coefficients. Here dask-ml keeps its default penalty (``--C``, default 1) with
``solver_kwargs={"normalize": False}`` (the penalty on the coefficients it reports), and calcml's
cost gets the same penalty per row: ``softplus(z) - y z + ||(w, b)||^2 / (2 C N)``, whose mean
over the N rows is dask-ml's objective divided by N. Same minimizer. ``--C 0`` fits both without
a penalty (dask-ml ``penalty=None``).

Reported: wall times (calcml's first-run kernel builds separately: the client's L-BFGS loop and
the workers' kernels), iterations and passes over the data, both final costs evaluated by the
same calcml pass, the largest coefficient difference, the largest memory (RSS) of each worker
and of this process, and any worker restart. With ``--in-memory`` (the default up to 5 M rows)
the same rows are also read into this process and fitted in memory (calcml, 2 threads): the
coefficients must agree with the fit over Dask to the fit's tolerance.

Timings are single runs (a fit over 20 M rows takes minutes), on a shared 2-core machine.

Run:   python benchmarks/w8_outofcore.py --write-only         # write the 20,000,000 rows once
       python benchmarks/w8_outofcore.py                      # 20,000,000 rows
       python benchmarks/w8_outofcore.py --rows 2000000       # + the in-memory check
       python benchmarks/w8_outofcore.py --rows 200000 --rows-per-file 50000   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("CALCML_CACHE_DIR", os.path.join(os.path.dirname(HERE), ".bench-cache"))

import numpy as np  # noqa: E402

from _common import load_avg, machine_line  # noqa: E402

D = 8
W_TRUE = np.linspace(-1.0, 1.0, D)
B_TRUE = 0.5
FEATURES = [f"x{j}" for j in range(D)]


def _partition(i: int, rows: int, seed: int):
    """File ``i``: ``rows`` rows of the known logistic model, from its own seed."""
    import pandas as pd

    rng = np.random.default_rng([seed, i])
    X = rng.standard_normal((rows, D))
    p = 1.0 / (1.0 + np.exp(-(X @ W_TRUE + B_TRUE)))
    y = (rng.random(rows) < p).astype(np.float64)
    frame = pd.DataFrame(X, columns=FEATURES)
    frame["y"] = y
    return frame


def write_dataset(path: str, n_rows: int, per_file: int, seed: int, rewrite: bool) -> float:
    """The Parquet files under ``path`` (written by the cluster's workers, one file at a time
    each), unless the same data set is there already; the seconds spent writing."""
    import dask.dataframe as dd

    manifest = {"rows": n_rows, "rows_per_file": per_file, "seed": seed, "w": W_TRUE.tolist(), "b": B_TRUE}
    mark = path.rstrip(os.sep) + ".json"  # beside the folder: the folder holds only the data set
    if not rewrite and os.path.exists(mark):
        with open(mark) as fh:
            if json.load(fh) == manifest:
                return 0.0
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(mark):
        os.remove(mark)
    sizes = [per_file] * (n_rows // per_file) + ([n_rows % per_file] if n_rows % per_file else [])
    t0 = time.perf_counter()
    frame = dd.from_map(_partition, range(len(sizes)), sizes, [seed] * len(sizes),
                        meta=_partition(0, 0, seed), enforce_metadata=False)
    frame.to_parquet(path, write_index=False)
    took = time.perf_counter() - t0
    with open(mark, "w") as fh:
        json.dump(manifest, fh)
    return took


def logistic_cost(C: float, n_rows: int):
    import calcml as cm

    w = cm.params("w", D)
    b = cm.params("b")
    x = cm.data("x", D)
    y = cm.data("y")
    z = sum(wi * xi for wi, xi in zip(w, x)) + b
    per_row = cm.softplus(z) - y * z
    if C > 0:  # dask-ml's penalty ||(w, b)||^2 / (2C) on the sum, shared by the N rows of the mean
        per_row = per_row + (sum(wi**2 for wi in w) + b**2) / (2.0 * C * n_rows)
    return cm.Cost(per_row, params=[*w, b], data=[*x, y])


class PeakMemory:
    """The largest RSS of each worker, sampled every half second while a phase runs."""

    def __init__(self, client):
        self.client, self.peak, self._stop = client, {}, threading.Event()
        self._thread = None

    def __enter__(self):
        self.peak = {}
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        import psutil

        def rss():
            return psutil.Process().memory_info().rss

        while not self._stop.is_set():
            try:
                for worker, value in self.client.run(rss).items():
                    self.peak[worker] = max(self.peak.get(worker, 0), value)
            except Exception:  # noqa: BLE001 - a worker restarting: the next sample sees it
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def text(self) -> str:
        return ", ".join(f"{v / 2**20:.0f} MiB" for _w, v in sorted(self.peak.items())) or "n/a"


def own_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--rows-per-file", type=int, default=500_000)
    ap.add_argument("--path", default=None, help="folder of the Parquet files (default: under the temp folder)")
    ap.add_argument("--rewrite", action="store_true", help="write the files again even if they are there")
    ap.add_argument("--cleanup", action="store_true", help="delete the files at the end")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--C", type=float, default=1.0, help="dask-ml's C (inverse penalty), also in calcml's cost; "
                    "0: no penalty")
    ap.add_argument("--memory-limit", default="1GB")
    ap.add_argument("--in-memory", action=argparse.BooleanOptionalAction, default=None,
                    help="also fit the same rows in memory (default: up to 5,000,000 rows)")
    ap.add_argument("--no-dask-ml", action="store_true")
    ap.add_argument("--write-only", action="store_true", help="write the files and stop (measure in a next run, "
                    "once the disk has settled)")
    args = ap.parse_args()
    in_memory = args.in_memory if args.in_memory is not None else args.rows <= 5_000_000
    path = args.path or os.path.join(tempfile.gettempdir(), f"calcml-w8-outofcore-{args.rows}-{args.rows_per_file}")

    import dask
    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    import calcml as cm

    worker_cache = tempfile.mkdtemp(prefix="calcml-w8ooc-workers-")
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=args.memory_limit,
                           dashboard_address=None, silence_logs=40,
                           env={"CALCML_CACHE_DIR": worker_cache, "OMP_WAIT_POLICY": "PASSIVE",
                                "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    client = Client(cluster)
    out = []

    def say(line=""):
        print(line, flush=True)
        out.append(line)

    try:
        say(f"# W8 out of core: logistic regression over Parquet files, {args.rows:,} rows x {D + 1} float64 "
            f"({args.rows * (D + 1) * 8 / 1e9:.2f} GB as float64), {args.rows_per_file:,} rows a file")
        say(machine_line())
        say(f"load average before: {load_avg()}")
        say(f"LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit={args.memory_limit!r}); "
            f"dask {dask.__version__}")
        workers0 = sorted(client.scheduler_info()["workers"])

        t_write = write_dataset(path, args.rows, args.rows_per_file, args.seed, args.rewrite)
        files = sorted(f for f in os.listdir(path) if f.endswith(".parquet"))
        on_disk = sum(os.path.getsize(os.path.join(path, f)) for f in files)
        say(f"data: {len(files)} files, {on_disk / 1e9:.2f} GB on disk under {path} "
            + (f"(written in {t_write:.1f} s)" if t_write else "(reused: written by an earlier run)"))
        import pyarrow.parquet as pq

        n_rows = sum(pq.ParquetFile(os.path.join(path, f)).metadata.num_rows for f in files)
        assert n_rows == args.rows, (n_rows, args.rows)
        if args.write_only:
            return

        def frame():
            return dd.read_parquet(os.path.join(path, "*.parquet"))

        cost = logistic_cost(args.C, n_rows)
        penalty = (f"both: mean log-loss + ||(w, b)||^2 / (2 C N), C = {args.C:g} (dask-ml's default L2 penalty, "
                   "intercept included, normalize=False; calcml: the same term in the cost)") if args.C > 0 else \
            "both unpenalized (dask-ml penalty=None)"
        say(f"objective: {penalty}")
        k = cm.compile(cost)

        # calcml's first-run builds, apart: the client's L-BFGS loop, the workers' kernels
        t0 = time.perf_counter()
        prog = cm.generate(cost, method="lbfgs")
        t_loop = time.perf_counter() - t0
        t0 = time.perf_counter()
        k.value(np.zeros(D + 1), frame())
        t_workers = time.perf_counter() - t0
        say(f"calcml's first run, before the fit: the client's L-BFGS loop {t_loop:.2f} s; the workers' kernels "
            f"(from the shipped source, into their own empty cache) and one pass over the files {t_workers:.2f} s")

        say()
        with PeakMemory(client) as mem_calcml:
            t0 = time.perf_counter()
            res = prog.run(np.zeros(D + 1), frame())
            t_calcml = time.perf_counter() - t0
        beta_calcml = res.x.copy()
        client_peak_after_calcml = own_peak_mib()
        say(f"calcml lbfgs over Dask: {t_calcml:.1f} s, {res.nit} iterations, {res.nfev} passes over the data "
            f"({t_calcml / max(res.nfev, 1):.2f} s a pass), success={res.success}: {res.message}")
        say(f"  workers' peak RSS {mem_calcml.text()}; this process's peak RSS so far "
            f"{client_peak_after_calcml:.0f} MiB")

        dml = None
        if not args.no_dask_ml:
            dml = run_dask_ml(frame, args.C, n_rows, client, say)

        # both final points, by the same calcml pass over the files
        say()
        f_calcml = k.value(beta_calcml, frame())
        rows = [("calcml lbfgs over Dask", t_calcml, res.nit, res.nfev, f_calcml, beta_calcml, mem_calcml.text())]
        if dml is not None:
            f_dml = k.value(dml["beta"], frame())
            rows.append(("dask-ml LogisticRegression(solver='lbfgs')", dml["time"], dml["nit"], dml["nfev"], f_dml,
                         dml["beta"], dml["mem"]))
        say("| implementation | wall time | iterations | passes (cost + gradient) | final cost (same calcml pass) "
            "| workers' peak RSS |")
        say("|---|---:|---:|---:|---:|---|")
        for name, t, nit, nfev, f, _beta, mem in rows:
            say(f"| {name} | {t:.1f} s | {nit} | {nfev} | {f:.12g} | {mem} |")
        say()
        say(f"calcml: w = {np.array2string(beta_calcml[:D], precision=6)}, b = {beta_calcml[D]:.6f} "
            f"(the model: w* = {np.array2string(W_TRUE, precision=4)}, b* = {B_TRUE})")
        if dml is not None:
            diff = np.max(np.abs(dml["beta"] - beta_calcml))
            say(f"dask-ml: largest coefficient difference from calcml {diff:.3g}; final cost difference "
                f"{f_dml - f_calcml:.3g} (dask-ml's minus calcml's); dask-ml {dml['time'] / t_calcml:.1f}x "
                "calcml's wall time")
            say(f"  dask-ml's L-BFGS: {dml['message']}")
        workers1 = sorted(client.scheduler_info()["workers"])
        say(f"worker restarts (killed for memory or otherwise): {'none' if workers1 == workers0 else workers1}")

        if in_memory:
            say()
            import pandas as pd

            t0 = time.perf_counter()
            table = pd.read_parquet([os.path.join(path, f) for f in files], columns=[*FEATURES, "y"])
            cols = {name: np.ascontiguousarray(table[name].to_numpy(dtype=np.float64)) for name in table.columns}
            del table
            t_read = time.perf_counter() - t0
            prog.run(np.zeros(D + 1), cols)  # the in-memory kernels' first run (their threads' machine code)
            t0 = time.perf_counter()
            mem_res = prog.run(np.zeros(D + 1), cols)
            t_mem = time.perf_counter() - t0
            diff = np.max(np.abs(mem_res.x - beta_calcml))
            rel = diff / np.max(np.abs(mem_res.x))
            ok = mem_res.nit == res.nit and rel <= 1e-8
            say(f"in memory (this process, calcml's 2 threads): read {t_read:.1f} s, fit {t_mem:.2f} s (a second run), "
                f"{mem_res.nit} iterations, {mem_res.nfev} passes; largest coefficient difference from the fit "
                f"over Dask {diff:.3g} ({rel:.2g} relative): {'agree' if ok else 'DISAGREE'} "
                f"(same iterations, within 1e-8); this process's peak RSS {own_peak_mib():.0f} MiB")
            if not ok:
                raise SystemExit("the fit over Dask and the fit in memory disagree")
        say(f"load average after: {load_avg()}")
    finally:
        client.close()
        cluster.close()
        shutil.rmtree(worker_cache, ignore_errors=True)
        if args.cleanup:
            shutil.rmtree(path, ignore_errors=True)
            if os.path.exists(path.rstrip(os.sep) + ".json"):
                os.remove(path.rstrip(os.sep) + ".json")


def run_dask_ml(frame, C: float, n_rows: int, client, say) -> dict:
    """dask-ml's LogisticRegression(solver="lbfgs") on the same files; its L-BFGS's own report
    (iterations, evaluations) kept from SciPy's answer, which dask-glm does not return."""
    import warnings

    from dask_glm import algorithms
    from dask_ml.linear_model import LogisticRegression

    seen = {}
    scipy_lbfgs = algorithms.fmin_l_bfgs_b

    def recording(*a, **kw):
        x, f, info = scipy_lbfgs(*a, **kw)
        seen.update(f=f, nit=info["nit"], nfev=info["funcalls"], warnflag=info["warnflag"],
                    task=info.get("task", ""))
        return x, f, info

    algorithms.fmin_l_bfgs_b = recording
    try:
        penalty = {"penalty": "l2", "C": C} if C > 0 else {"penalty": None}
        model = LogisticRegression(solver="lbfgs", solver_kwargs={"normalize": False}, **penalty)
        with PeakMemory(client) as mem, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # dask-glm's old config key (fuse_ave_width)
            warnings.simplefilter("ignore", DeprecationWarning)  # SciPy on dask-glm's iprint
            t0 = time.perf_counter()
            X = frame().to_dask_array(lengths=True)  # one array: each pass reads each file once
            model.fit(X[:, :D], X[:, D])
            took = time.perf_counter() - t0
    finally:
        algorithms.fmin_l_bfgs_b = scipy_lbfgs
    beta = np.append(np.asarray(model.coef_, dtype=float).reshape(-1), float(model.intercept_))
    task = seen.get("task", "")
    task = task.decode() if isinstance(task, bytes) else str(task)
    say(f"dask-ml lbfgs: {took:.1f} s (lengths of the partitions included), {seen.get('nit')} iterations, "
        f"{seen.get('nfev')} passes ({took / max(seen.get('nfev') or 1, 1):.2f} s a pass); its own final objective "
        f"/ N {seen.get('f', float('nan')) / n_rows:.12g}")
    say(f"  workers' peak RSS {mem.text()}")
    return {"time": took, "nit": seen.get("nit"), "nfev": seen.get("nfev"), "beta": beta, "mem": mem.text(),
            "message": f"warnflag {seen.get('warnflag')} ({task})"}


if __name__ == "__main__":
    main()
