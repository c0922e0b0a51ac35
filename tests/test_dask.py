"""Kernels over Dask data (issue 13): one task per chunk of rows, the sums added on the client.

Data are generated lazily, chunk by chunk, and are larger than any one chunk (several chunks,
the last one shorter). Answers are compared with the in-memory kernels on the same rows (to
1e-12, relative) and with NumPy's closed forms. The tests without a client (Dask's default
scheduler) come first; the rest share one real LocalCluster of two worker processes, whose
kernel cache is a folder of their own (they get the generated module's source, not a path).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")
pd = pytest.importorskip("pandas")

import calcml as cm  # noqa: E402
from calcml import dask_data  # noqa: E402
from calcml.errors import DataError, OptimizeError  # noqa: E402
from calcml.result import INTERRUPTED  # noqa: E402

D = 3  # features of the linear regression: x0, x1, x2, then y
CHUNK = 12_000
N = 4 * CHUNK + 2_003  # five chunks, the last one shorter
NAMES = ["x0", "x1", "x2", "y"]


def _block(seed: int, rows: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = np.empty((rows, D + 1))
    X[:, :D] = rng.standard_normal((rows, D))
    X[:, D] = X[:, :D] @ np.array([1.5, -2.0, 0.5]) + 0.25 + 0.1 * rng.standard_normal(rows)
    return X


def lazy_rows(n=N, chunk=CHUNK, seed=7, nan_at=None):
    """A 2-D Dask array (n, 4) made chunk by chunk when computed; ``nan_at=(chunk, row, col)``
    plants a NaN there."""
    blocks, start, i = [], 0, 0
    while start < n:
        rows = min(chunk, n - start)
        make = _block if nan_at is None or nan_at[0] != i else _nan_block(nan_at[1], nan_at[2])
        blocks.append(da.from_delayed(dask.delayed(make)(seed + i, rows), shape=(rows, D + 1), dtype=np.float64))
        start += rows
        i += 1
    return da.concatenate(blocks, axis=0)


def _nan_block(row, col):
    def make(seed, rows):
        X = _block(seed, rows)
        X[row, col] = np.nan
        return X
    return make


@pytest.fixture(scope="module")
def linreg():
    w = cm.params("w", D)
    b = cm.params("b")
    x = cm.data("x", D)
    y = cm.data("y")
    cost = cm.Cost((sum(wi * xi for wi, xi in zip(w, x)) + b - y) ** 2, params=[*w, b], data=[*x, y])
    return cost, cm.compile(cost)


THETA = np.array([0.7, -1.1, 0.2, 0.05])


def closed_form(X, theta):
    """Linear regression's mean squared error and its gradient, by NumPy."""
    r = X[:, :D] @ theta[:D] + theta[D] - X[:, D]
    n = X.shape[0]
    return float(r @ r / n), np.append(2.0 * X[:, :D].T @ r / n, 2.0 * r.sum() / n)


def assert_close(a, b, rtol=1e-12):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    scale = np.max(np.abs(b))
    assert np.max(np.abs(a - b)) <= rtol * scale, (a, b)


def softmax_cost(K=3, d=4, n_rows=N):
    W = cm.params("W", shape=(K, d))
    b = cm.params("b", shape=(K,))
    x = cm.data("x", shape=(d,))
    c = cm.data("c", classes=K)
    k = cm.index("k", K)
    j = cm.index("j", d)
    z = cm.sum(W[k, j] * x[j], j) + b[k]
    return cm.Cost(cm.logsumexp(z, k) - cm.sum(cm.onehot(c, k) * z, k), params=[W, b], data=[x, c],
                   penalty=cm.sum(W[k, j] ** 2, k, j) / (2.0 * n_rows))


def softmax_data(K=3, d=4, seed=3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    labels = rng.integers(0, K, N)
    return X, labels


# -- without a client: Dask's default scheduler -------------------------------------------------


def test_no_client_linreg_matches_memory_closed_form_and_repeats_bitwise(linreg):
    cost, k = linreg
    assert dask_data._client() is None
    X = lazy_rows()
    assert X.numblocks[0] == 5 and X.chunks[0][-1] == 2_003
    mem = X.compute()
    v, g = k.value_and_grad(THETA, X)
    v_mem, g_mem = k.value_and_grad(THETA, mem)
    assert_close(v, v_mem)
    assert_close(g, g_mem)
    v_np, g_np = closed_form(mem, THETA)
    assert_close(v, v_np, 1e-10)
    assert_close(g, g_np, 1e-10)
    assert_close(k.value(THETA, X), v_mem)
    assert_close(k.grad(THETA, X), g_mem)
    again = k.value_and_grad(THETA, X)
    assert again[0] == v and np.array_equal(again[1], g)  # the same bits every run
    with dask.config.set(scheduler="threads"):
        threaded = k.value_and_grad(THETA, X)
    assert threaded[0] == v and np.array_equal(threaded[1], g)


def test_no_client_hessian_and_sum_reduction(linreg):
    cost, _k = linreg
    X = lazy_rows(n=30_001, chunk=10_000)
    mem = X.compute()
    k = cm.compile(cost)
    assert_close(k.hessian(THETA, X), k.hessian(THETA, mem))
    total = cm.Cost(cost.expr, params=list(cost.params), data=list(cost.data), reduce="sum")
    ks = cm.compile(total)
    v, g = ks.value_and_grad(THETA, X)
    v_np, g_np = closed_form(mem, THETA)
    assert_close(v, v_np * mem.shape[0], 1e-10)
    assert_close(g, g_np * mem.shape[0], 1e-10)


def test_no_client_dataframe_by_column_name_and_dict_of_arrays(linreg):
    _cost, k = linreg
    X = lazy_rows()
    mem = X.compute()
    frame = dd.from_dask_array(X, columns=NAMES)
    # other column order, an extra column: columns are taken by name
    frame = frame.assign(extra=frame["y"] * 2.0)[["y", "extra", "x2", "x0", "x1"]]
    assert frame.npartitions == 5
    want = k.value_and_grad(THETA, mem)
    got = k.value_and_grad(THETA, frame)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    # a dict of 1-D Dask arrays, chunked differently from one another
    cols = {name: X[:, q].rechunk(CHUNK if q % 2 else 9_000) for q, name in enumerate(NAMES)}
    got = k.value_and_grad(THETA, cols)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


@pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index")  # inside Dask's Parquet reader
def test_no_client_parquet_files_read_lazily(linreg, tmp_path):
    """Rows read lazily from Parquet files (partition lengths unknown to the client): the
    global row of a NaN comes from the partitions' own row counts."""
    _cost, k = linreg
    X = lazy_rows(nan_at=(3, 500, 0))
    frame = dd.from_dask_array(X, columns=NAMES)
    frame.to_parquet(str(tmp_path / "rows"), write_index=False)
    files = dd.read_parquet(str(tmp_path / "rows" / "*.parquet"))
    assert files.npartitions == 5 and not files.known_divisions
    with pytest.raises(DataError, match=rf"column 'x0' holds a non-finite value \(nan\) at row {3 * CHUNK + 500}"):
        k.value_and_grad(THETA, files)
    clean = files.fillna(0.0)
    mem = clean.compute().to_numpy()
    got, want = k.value_and_grad(THETA, clean), k.value_and_grad(THETA, mem)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


def test_wrong_columns_are_named(linreg):
    _cost, k = linreg  # (and what does not take Dask data yet says so)
    X = lazy_rows()
    with pytest.raises(DataError, match=r"shape \(N, 4\).*got a Dask array of shape \(50003, 3\)"):
        k.value(THETA, X[:, :3])
    frame = dd.from_dask_array(X, columns=NAMES).drop(columns=["y"])
    with pytest.raises(DataError, match="missing column 'y'"):
        k.value(THETA, frame)
    with pytest.raises(DataError, match="missing column 'x1'"):
        k.value(THETA, {n: X[:, q] for q, n in enumerate(NAMES) if n != "x1"})
    with pytest.raises(DataError, match="data column 'x2' is a ndarray among Dask arrays"):
        k.value(THETA, {n: (X[:, q] if n != "x2" else np.zeros(N)) for q, n in enumerate(NAMES)})
    with pytest.raises(DataError, match=r"this call needs the data in memory: compute them first"):
        k.prepare(X)
    # a column of text (a pandas extension dtype, which NumPy cannot interpret) is named, not a TypeError
    text = dd.from_pandas(pd.DataFrame({"x0": [1.0, 2.0], "x1": [0.0, 1.0], "x2": [2.0, 3.0],
                                        "y": pd.array(["a", "b"], dtype="string")}), npartitions=1)
    with pytest.raises(DataError, match="data column 'y' must be numeric, got dtype string"):
        k.value(THETA, text)


def test_no_client_nan_in_chunk_3_names_column_and_global_row(linreg):
    _cost, k = linreg
    X = lazy_rows(nan_at=(3, 1234, 1))
    global_row = 3 * CHUNK + 1234
    with pytest.raises(DataError) as on_dask:
        k.value_and_grad(THETA, X)
    with pytest.raises(DataError) as in_memory:
        k.value_and_grad(THETA, X.compute())
    assert str(on_dask.value) == str(in_memory.value)
    assert f"'x1' holds a non-finite value (nan) at row {global_row}" in str(on_dask.value)


def test_no_client_many_parameters_restated_in_index_notation():
    """A scalar cost of 17 parameters runs as its restatement in index notation (lifted)."""
    n_feat = 16
    w = cm.params("w", n_feat)
    b = cm.params("b")
    x = cm.data("x", n_feat)
    y = cm.data("y")
    cost = cm.Cost((sum(wi * xi for wi, xi in zip(w, x)) + b - y) ** 2, params=[*w, b], data=[*x, y])
    k = cm.compile(cost)
    rng = np.random.default_rng(5)
    mem = rng.standard_normal((25_001, n_feat + 1))
    X = da.from_array(mem, chunks=(7_000, n_feat + 1))
    theta = rng.standard_normal(n_feat + 1)
    want = k.value_and_grad(theta, mem)
    got = k.value_and_grad(theta, X)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    assert_close(k.hessian(theta, X), k.hessian(theta, mem), 1e-11)  # every column in one Dask computation
    bad = mem.copy()
    bad[21_003, 5] = np.inf
    with pytest.raises(DataError, match=r"column 'x5' holds a non-finite value \(inf\) at row 21003"):
        k.value(theta, da.from_array(bad, chunks=(7_000, n_feat + 1)))
    # its fits: the restated cost's loops, each pass one Dask computation
    got = cm.minimize(cost, np.zeros(n_feat + 1), data=X, method="lbfgs")
    want = cm.minimize(cost, np.zeros(n_feat + 1), data=mem, method="lbfgs")
    assert got.success and got.nit == want.nit and set(got.params) == set(want.params)
    assert_close(got.x, want.x, 1e-10)
    A = np.column_stack([mem[:, :n_feat], np.ones(len(mem))])
    assert_close(got.x, np.linalg.lstsq(A, mem[:, n_feat], rcond=None)[0], 1e-7)


def test_no_client_tensor_softmax_value_grad_hvp_and_errors():
    cost = softmax_cost()
    k = cm.compile(cost)
    X, labels = softmax_data()
    data = {"x": da.from_array(X, chunks=(CHUNK, 4)), "c": da.from_array(labels, chunks=CHUNK)}
    mem = {"x": X, "c": labels}
    rng = np.random.default_rng(0)
    theta = 0.1 * rng.standard_normal(cost.n_params)
    v = rng.standard_normal(cost.n_params)
    got, want = k.value_and_grad(theta, data), k.value_and_grad(theta, mem)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    assert_close(k.hvp(theta, v, data), k.hvp(theta, v, mem))
    before = next(dask_data._calls)
    assert_close(k.hessian(theta, data), k.hessian(theta, mem))
    assert next(dask_data._calls) == before + 2  # every column's product in one Dask computation
    again = k.value_and_grad(theta, data)
    assert again[0] == got[0] and np.array_equal(again[1], got[1])
    bad_x = X.copy()
    bad_x[3 * CHUNK + 17, 2] = np.inf
    with pytest.raises(DataError, match=rf"data 'x' is inf at row {3 * CHUNK + 17} entry \[2\]"):
        k.value(theta, {"x": da.from_array(bad_x, chunks=(CHUNK, 4)), "c": data["c"]})
    bad_c = labels.copy()
    bad_c[2 * CHUNK + 5] = 3
    with pytest.raises(DataError, match=rf"labels 'c': row {2 * CHUNK + 5} holds class 3, outside 0 … 2"):
        k.value(theta, {"x": data["x"], "c": da.from_array(bad_c, chunks=CHUNK)})
    with pytest.raises(DataError, match=r"data 'x' must have shape \(N, 4\)"):
        k.value(theta, {"x": data["x"][:, :3], "c": data["c"]})


@pytest.mark.parametrize("method", ["lbfgs", "newton-cg", "newton"])
def test_no_client_tensor_softmax_fits_match_memory(method):
    """Line-search and trust-region fits of a tensor cost: each value, gradient and
    Hessian-vector product one Dask computation; the minimum of the in-memory fit."""
    cost = softmax_cost()
    X, labels = softmax_data()
    data = {"x": da.from_array(X, chunks=(CHUNK, 4)), "c": da.from_array(labels, chunks=CHUNK)}
    got = cm.minimize(cost, np.zeros(cost.n_params), data=data, method=method)
    want = cm.minimize(cost, np.zeros(cost.n_params), data={"x": X, "c": labels}, method=method)
    assert got.success and want.success and got.nit == want.nit
    assert_close(got.fun, want.fun, 1e-12)
    assert got.grad_norm <= 1e-8
    # the biases are determined up to a common shift (the softmax is unchanged by it): compare
    # the weights and the biases' differences, which are unique
    W, Wm = got.params["W"], want.params["W"]
    assert_close(W, Wm, 1e-7)
    assert_close(np.diff(got.params["b"]), np.diff(want.params["b"]), 1e-7)


# (gd twice: one compiled loop; the second spends its budget, so its message weighs the gradient's
# noise, estimated from rows sampled out of the Dask data)
@pytest.mark.parametrize("method, options", [("lbfgs", {}), ("gd", {"lr": "auto", "maxiter": 50}),
                                             ("gd", {"lr": 0.05, "maxiter": 40}), ("newton", {})])
def test_no_client_full_batch_fits_match_memory(linreg, method, options):
    """Each step's value and gradient is one Dask computation; the loop is the compiled one."""
    cost, _k = linreg
    X = lazy_rows()
    mem = X.compute()
    got = cm.minimize(cost, np.zeros(4), data=X, method=method, **options)
    want = cm.minimize(cost, np.zeros(4), data=mem, method=method, **options)
    assert got.nit == want.nit and got.status == want.status and got.success == want.success
    assert_close(got.x, want.x, 1e-10)
    assert_close(got.fun, want.fun, 1e-10)
    if method != "newton":  # (Newton's one step lands where the gradient is rounding: its digits differ)
        assert got.message == want.message
    if got.success:  # the closed form: least squares
        A = np.column_stack([mem[:, :D], np.ones(len(mem))])
        assert_close(got.x, np.linalg.lstsq(A, mem[:, D], rcond=None)[0], 1e-6)


def chunked_sgd(mem, sizes, theta, lr, batch, epochs, seed):
    """Minibatch SGD on linear regression by NumPy, visiting chunks as calcml's fits over Dask
    data promise: each epoch the chunks in the order of a permutation drawn from the seeded
    generator, the rows of the j-th visited chunk in the order of a generator seeded with the
    j-th of the integers drawn next; minibatches of ``batch`` rows within a chunk."""
    rng = np.random.default_rng(seed)
    starts = np.cumsum([0] + list(sizes))
    theta = np.array(theta, dtype=float)
    for _ in range(epochs):
        order = rng.permutation(len(sizes))
        seeds = rng.integers(0, 2**63, size=len(sizes))
        for c, chunk_seed in zip(order, seeds):
            rows = mem[starts[c]:starts[c + 1]]
            perm = np.random.default_rng(chunk_seed).permutation(sizes[c])
            for lo in range(0, sizes[c], batch):
                _f, g = closed_form(rows[perm[lo:lo + batch]], theta)
                theta = theta - lr * g
    return theta


SIZES = [CHUNK] * 4 + [N - 4 * CHUNK]


def test_no_client_minibatch_fits_visit_chunks_in_a_seeded_order(linreg):
    """Minibatch methods run the compiled epoch loop one chunk at a time: a NumPy SGD that
    visits the chunks and rows in the promised orders lands on the same point; the same seed
    gives the same bits, from an array or a DataFrame of the same chunks."""
    cost, _k = linreg
    X = lazy_rows()
    mem = X.compute()
    got = cm.minimize(cost, np.zeros(4), data=X, method="sgd", lr=0.02, batch_size=500, epochs=2, seed=3)
    assert got.nit == 2 * sum(-(-s // 500) for s in SIZES)
    assert_close(got.x, chunked_sgd(mem, SIZES, np.zeros(4), 0.02, 500, 2, 3), 1e-10)
    frame = dd.from_dask_array(X, columns=NAMES)  # partition lengths unknown: counted first
    again = cm.minimize(cost, np.zeros(4), data=frame, method="sgd", lr=0.02, batch_size=500, epochs=2, seed=3)
    assert np.array_equal(again.x, got.x) and again.fun == got.fun
    other = cm.minimize(cost, np.zeros(4), data=X, method="sgd", lr=0.02, batch_size=500, epochs=2, seed=4)
    assert not np.array_equal(other.x, got.x)
    from calcml.tensor import optimize

    try:  # each chunk fetched to the client instead of run where it is: the same bits
        optimize.MINIBATCH_WHERE = "client"
        here = cm.minimize(cost, np.zeros(4), data=X, method="sgd", lr=0.02, batch_size=500, epochs=2, seed=3)
    finally:
        optimize.MINIBATCH_WHERE = "chunks"
    assert np.array_equal(here.x, got.x) and here.fun == got.fun
    # a rate that blows up: the run stops, says so, and returns its best point (finite)
    wild = cm.minimize(cost, np.zeros(4), data=X, method="sgd", lr=50.0, batch_size=500, epochs=2, seed=3)
    assert not wild.success and wild.message.startswith("Diverged") and np.all(np.isfinite(wild.x))
    # adam, stopped by tol at an epoch's end (one full pass, as in memory), well before 20 epochs
    adam = cm.minimize(cost, np.zeros(4), data=X, method="adam", lr=0.01, batch_size=256, epochs=20, tol=0.05)
    per_epoch = sum(-(-s // 256) for s in SIZES)
    assert adam.success and adam.nit % per_epoch == 0 and adam.nit < 20 * per_epoch and adam.grad_norm <= 0.05
    A = np.column_stack([mem[:, :D], np.ones(len(mem))])
    assert_close(adam.x, np.linalg.lstsq(A, mem[:, D], rcond=None)[0], 0.02)


def test_no_client_ctrl_c_and_progress_in_a_minibatch_fit(linreg, capsys):
    """A real KeyboardInterrupt during a long minibatch fit over Dask data: the run stops as
    interrupted and returns its best epoch's point; the progress bar is drawn per epoch."""
    import _thread
    import threading

    cost, k = linreg
    X = lazy_rows()
    cm.minimize(cost, np.zeros(4), data=X, method="sgd", lr=0.01, batch_size=64, epochs=1)  # compiled first
    timer = threading.Timer(1.5, _thread.interrupt_main)
    timer.start()
    try:
        res = cm.minimize(cost, np.zeros(4), data=X, method="sgd", lr=0.01, batch_size=64, epochs=10**6, tol=0.0,
                          progress=True)
    finally:
        timer.cancel()
    assert res.status == INTERRUPTED and not res.success and "Interrupted" in res.message
    assert 0 < res.nit < 10**6 * 782
    assert_close(res.fun, k.value(res.x, X.compute()), 1e-12)
    assert res.fun < k.value(np.zeros(4), X.compute())
    assert "sgd [" in capsys.readouterr().err


def test_no_client_fit_errors(linreg):
    cost, _k = linreg
    X = lazy_rows(nan_at=(3, 9, 2))
    with pytest.raises(DataError, match=rf"column 'x2' holds a non-finite value \(nan\) at row {3 * CHUNK + 9}"):
        cm.generate(cost, method="lbfgs").run(np.zeros(4), X)
    with pytest.raises(DataError, match=rf"column 'x2' holds a non-finite value \(nan\) at row {3 * CHUNK + 9}"):
        cm.minimize(cost, np.zeros(4), data=X, method="adam", lr=0.01, batch_size=64)
    with pytest.raises(OptimizeError, match=r"batch_size=60000 is larger than the data \(50003 rows\)"):
        cm.minimize(cost, np.zeros(4), data=lazy_rows(), method="adam", lr=0.01, batch_size=60_000)
    frame = dd.from_dask_array(lazy_rows(), columns=NAMES).drop(columns=["x0"])
    with pytest.raises(DataError, match="missing column 'x0'"):
        cm.minimize(cost, np.zeros(4), data=frame, method="lbfgs")


# -- the command line over files read lazily by Dask (calcml fit --data 'rows/*.parquet') ---------

CLI_PARAMS = ["w0", "w1", "w2", "b"]
CLI_EXPR = "(w0*x0 + w1*x1 + w2*x2 + b - y)**2"
CLI_SIZES = {"part.0": 2_000, "part.2": 1_500, "part.10": 2_500}  # their natural order: 0, 2, 10


def _cli(*argv):
    """calcml's command line in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    from calcml.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _fit_table(text: str) -> dict:
    """{row name: text} of `calcml fit`'s table (parameters by their names)."""
    rows = {}
    for line in text.splitlines():
        key, _sep, value = line.strip().partition("  ")
        rows[key] = value.strip()
    return rows


@pytest.fixture(scope="module")
def cli_rows(tmp_path_factory):
    """The same rows as three Parquet files and three CSV files (in their names' natural order,
    not their sorted order), with a column of text no cost reads; the in-memory fit of the rows
    (one CSV file, by the command line) and NumPy's least squares."""
    folder = tmp_path_factory.mktemp("cli-rows")
    frames = []
    for seed, (stem, rows) in enumerate(CLI_SIZES.items()):
        frame = pd.DataFrame(_block(100 + seed, rows), columns=NAMES)
        frame["tag"] = [f"r{i}" for i in range(rows)]
        frame.to_parquet(folder / f"{stem}.parquet", index=False)
        frame.to_csv(folder / f"{stem}.csv", index=False)
        frames.append(frame)
    whole = pd.concat(frames, ignore_index=True).drop(columns="tag")
    whole.to_csv(folder / "all.csv", index=False)
    rc, out, err = _cli("fit", CLI_EXPR, "--params", ",".join(CLI_PARAMS), "--data", str(folder / "all.csv"),
                        "--method", "lbfgs")
    assert rc == 0, err
    mem = whole.to_numpy()
    A = np.column_stack([mem[:, :D], np.ones(len(mem))])
    return folder, _fit_table(out), np.linalg.lstsq(A, mem[:, D], rcond=None)[0]


def _assert_same_fit(out: str, want: dict, lstsq: np.ndarray):
    got = _fit_table(out)
    assert got["success"] == "True" and got["iterations"] == want["iterations"], (got, want)
    for q, name in enumerate(CLI_PARAMS):  # printed to 10 digits: the same to rounding
        assert abs(float(got[name]) - float(want[name])) <= 2e-9 * abs(float(want[name])), (name, got, want)
        assert abs(float(got[name]) - lstsq[q]) <= 1e-6 * abs(lstsq[q]), (name, got, lstsq)
    assert abs(float(got["value"]) - float(want["value"])) <= 2e-9 * float(want["value"])
    return got


@pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index")  # in Dask's Parquet reader
def test_cli_parquet_glob_fits_out_of_core_like_memory(cli_rows):
    folder, want, lstsq = cli_rows
    rc, out, err = _cli("fit", CLI_EXPR, "--params", ",".join(CLI_PARAMS), "--data", str(folder / "part.*.parquet"),
                        "--method", "lbfgs")
    assert rc == 0 and err == "", err
    got = _assert_same_fit(out, want, lstsq)
    assert got["cost"] == f"mean over 6000 rows of {folder / 'part.*.parquet'}"
    assert got["data"] == "3 Parquet files read lazily by Dask, on Dask's default scheduler (this machine)"


@pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index")  # in Dask's Parquet reader
def test_cli_csv_glob_fits_out_of_core_like_memory(cli_rows):
    folder, want, lstsq = cli_rows
    rc, out, err = _cli("fit", CLI_EXPR, "--params", ",".join(CLI_PARAMS), "--data", str(folder / "part.*.csv"),
                        "--method", "lbfgs")
    assert rc == 0 and err == "", err
    got = _assert_same_fit(out, want, lstsq)
    assert got["data"].startswith("3 CSV files read lazily by Dask")


@pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index")  # in Dask's Parquet reader
def test_cli_minibatch_over_parquet_files_repeats_with_its_seed(cli_rows):
    """Minibatch methods over files: the chunks (files) in a seeded order, the same table twice."""
    folder, _want, lstsq = cli_rows
    argv = ("fit", CLI_EXPR, "--params", ",".join(CLI_PARAMS), "--data", str(folder / "part.*.parquet"),
            "--method", "adam", "--lr", "0.02", "--batch-size", "64", "--epochs", "30", "--seed", "5")
    rc, out, err = _cli(*argv)
    assert rc in (0, 3) and err == "", err
    again = _cli(*argv)
    assert again == (rc, out, err)
    table = _fit_table(out)
    assert table["data"].startswith("3 Parquet files read lazily by Dask")
    got = np.array([float(table[p]) for p in CLI_PARAMS])
    assert np.max(np.abs(got - lstsq)) < 0.05, (got, lstsq)


@pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index")  # in Dask's Parquet reader
def test_cli_dask_errors_name_the_problem(cli_rows, tmp_path):
    folder, _want, _lstsq = cli_rows
    params = ("--params", ",".join(CLI_PARAMS))

    def error(*argv):
        rc, out, err = _cli("fit", *argv)
        assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (rc, out, err)
        assert err.startswith("calcml fit: error: "), err
        return err

    assert f"no file matches {folder / 'rows' / '*.parquet'}" in error(
        CLI_EXPR, *params, "--data", str(folder / "rows" / "*.parquet"), "--method", "lbfgs")
    assert "matches both Parquet and CSV files" in error(CLI_EXPR, *params, "--data", str(folder / "part.*"))
    assert ("'z' in the expression is neither a parameter (--params) nor a column of "
            f"{folder / 'part.*.parquet'} (columns: x0, x1, x2, y, tag)") in error(
        "(w0*x0 + w1*x1 + w2*z + b - y)**2", *params, "--data", str(folder / "part.*.parquet"))
    assert "data column 'tag' must be numeric, got dtype string" in error(
        "(w0*x0 + w1*x1 + w2*x2 + b - tag)**2", *params, "--data", str(folder / "part.*.parquet"), "--method", "lbfgs")
    # a NaN in the third file (part.10, after part.2): named by column and row in the files' natural order
    for stem, rows in CLI_SIZES.items():
        frame = pd.DataFrame(_block(7, rows), columns=NAMES)
        if stem == "part.10":
            frame.loc[7, "x1"] = np.nan
        frame.to_parquet(tmp_path / f"{stem}.parquet", index=False)
    assert "data column 'x1' holds a non-finite value (nan) at row 3507" in error(
        CLI_EXPR, *params, "--data", str(tmp_path / "*.parquet"), "--method", "lbfgs")


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_cli_files_named_like_patterns_are_all_read(tmp_path, kind, monkeypatch):
    """A file named [a].csv matched by a glob: Dask's reader matched its name as a pattern
    again and read nothing of it, silently (the fit was that of the other file). Now both are
    read; the name alone is that file; '~' expands; an empty CSV file is named."""
    rng = np.random.default_rng(0)
    xs = rng.standard_normal(400)
    ys = np.where(np.arange(400) < 200, 3.0, -1.0) * xs + 1
    a, b = pd.DataFrame({"x": xs[:200], "y": ys[:200]}), pd.DataFrame({"x": xs[200:], "y": ys[200:]})
    for frame, name in ((a, "[a]"), (b, "b")):
        if kind == "csv":
            frame.to_csv(tmp_path / f"{name}.csv", index=False)
        else:
            frame.to_parquet(tmp_path / f"{name}.parquet", index=False)
    want = np.linalg.lstsq(np.column_stack([xs, np.ones(400)]), ys, rcond=None)[0]
    monkeypatch.setenv("HOME", str(tmp_path))
    for data in (str(tmp_path / f"*.{kind}"), f"~/*.{kind}"):
        rc, out, err = _cli("fit", "(w*x + c - y)**2", "--params", "w,c", "--data", data, "--method", "lbfgs")
        assert rc == 0, err
        got = _fit_table(out)
        np.testing.assert_allclose([float(got["w"]), float(got["c"])], want, rtol=1e-8)
    rc, out, err = _cli("fit", "(w*x + c - y)**2", "--params", "w,c", "--data", str(tmp_path / f"[a].{kind}"),
                        "--method", "lbfgs")
    assert rc == 0, err
    one = np.linalg.lstsq(np.column_stack([xs[:200], np.ones(200)]), ys[:200], rcond=None)[0]
    np.testing.assert_allclose([float(_fit_table(out)["w"]), float(_fit_table(out)["c"])], one, rtol=1e-8)
    if kind == "csv":
        (tmp_path / "c.csv").write_text("")
        rc, out, err = _cli("fit", "(w*x + c - y)**2", "--params", "w,c", "--data", str(tmp_path / "*.csv"))
        assert rc != 0 and f"{tmp_path / 'c.csv'} is empty" in err


@pytest.mark.parametrize("named", ["b", "[b]"])
def test_cli_a_csv_row_with_more_fields_than_the_header_is_an_error(tmp_path, named):
    """pandas' usecols dropped a row's extra field silently, and a first row with one more field
    than the header shifted every column by one (pandas' implicit index): the fit was that of
    other numbers. One CSV file read into memory names the line; files read by Dask are refused
    too. A column the expression does not use still may hold text."""
    (tmp_path / "a.csv").write_text("x,y,tag\n1,3,u\n2,5,v\n")
    for rows in ("7,15,w\n3,7,w,9\n", "3,7,9,11\n7,15,w\n"):
        (tmp_path / f"{named}.csv").write_text("x,y,tag\n" + rows)
        rc, _out, err = _cli("fit", "(w*x + c - y)**2", "--params", "w,c", "--data", str(tmp_path / "*.csv"),
                             "--method", "lbfgs")
        assert rc != 0 and str(tmp_path / "*.csv") in err and "fields" in err, err
    (tmp_path / f"{named}.csv").write_text("x,y,tag\n7,15,w\n3,7,w\n")
    rc, out, err = _cli("fit", "(w*x + c - y)**2", "--params", "w,c", "--data", str(tmp_path / "*.csv"),
                        "--method", "lbfgs")
    assert rc == 0, err
    np.testing.assert_allclose([float(_fit_table(out)["w"]), float(_fit_table(out)["c"])], [2.0, 1.0], rtol=1e-8)


def test_cli_a_name_given_twice_is_named():
    rc, _out, err = _cli("fit", "(1 - w)**2 + (2 - b)**2", "--params", "w,b", "--x0", "w=1,w=2")
    assert rc != 0 and "--x0: 'w' is given twice" in err
    rc, _out, err = _cli("verify", "x**2", "--wrt", "x", "--at", "x=1,x=2")
    assert rc != 0 and "--at: 'x' is given twice" in err


def test_no_rows_for_minibatches_over_dask_says_so(linreg):
    cost, _k = linreg
    with pytest.raises(DataError, match="the data have no rows"):
        cm.minimize(cost, np.zeros(4), data=da.zeros((0, 4), chunks=(10, 4)), method="adam", lr=0.1, batch_size=10)


def test_no_client_hessian_and_hvp_of_a_scalar_cost_beyond_the_inline_hessian():
    """17 parameters, not restated in index notation: k.hessian takes its own module (not the
    kernels module's inline one); over Dask it was refused, though docs/dask.md lists it. Its
    closed form: the cost is sum_i (i + 1) (w_i x)^4 / 12, its Hessian diagonal with entries
    (i + 1) mean(x^4) w_i^2; k.hvp is H v."""
    p = 17
    w = cm.params("w", p); x = cm.data("x")
    cost = cm.Cost(sum((i + 1) * (w[i] * x) ** 4 / 12 for i in range(p)), params=list(w), data=[x])
    k = cm.compile(cost)
    X = np.random.default_rng(0).standard_normal((1000, 1))
    th = np.linspace(-0.5, 0.5, p)
    want = np.diag([(i + 1) * np.mean(X[:, 0] ** 4) * th[i] ** 2 for i in range(p)])
    for data in (X, da.from_array(X, chunks=(300, 1))):
        H = k.hessian(th, data)
        np.testing.assert_allclose(H, want, rtol=1e-12, atol=1e-14)
        v = np.arange(p, dtype=float)
        np.testing.assert_allclose(k.hvp(th, v, data), want @ v, rtol=1e-12)
    with pytest.raises(cm.ParamError, match=r"v must have shape \(17,\)"):
        k.hvp(th, np.zeros(3), X)


def test_cli_unreachable_scheduler_is_named(cli_rows):
    import socket

    folder, _want, _lstsq = cli_rows
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    rc, out, err = _cli("fit", CLI_EXPR, "--params", ",".join(CLI_PARAMS), "--data", str(folder / "part.*.parquet"),
                        "--method", "lbfgs", "--scheduler", address, "--scheduler-timeout", "0.5")
    assert rc == 1 and out == ""
    assert err.startswith(f"calcml fit: error: cannot connect to the Dask scheduler at {address} (--scheduler): "), err
    assert dask_data._client() is None


def test_in_memory_use_never_imports_dask():
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import calcml as cm
        w = cm.params("w", 3); b = cm.params("b"); x = cm.data("x", 3); y = cm.data("y")
        cost = cm.Cost((sum(wi * xi for wi, xi in zip(w, x)) + b - y) ** 2, params=[*w, b], data=[*x, y])
        X = np.random.default_rng(0).standard_normal((50, 3))
        res = cm.minimize(cost, np.zeros(4), data=np.column_stack([X, X @ [1.0, 2.0, 3.0] + 4.0]), method="lbfgs")
        assert np.allclose(res.x, [1.0, 2.0, 3.0, 4.0], atol=1e-6), res
        # the command line, on one CSV file (read into memory)
        import os, tempfile
        from calcml.cli import main
        path = os.path.join(tempfile.mkdtemp(), "rows.csv")
        np.savetxt(path, np.column_stack([X, X @ [1.0, 2.0, 3.0] + 4.0]), delimiter=",", header="x0,x1,x2,y",
                   comments="")
        assert main(["fit", "(w0*x0 + w1*x1 + w2*x2 + b - y)**2", "--params", "w0,w1,w2,b", "--data", path,
                     "--method", "lbfgs"]) == 0
        print(sorted(m for m in sys.modules if m == "dask" or m.startswith(("dask.", "distributed"))))
    """)
    # the session's kernel cache (the fits above compiled this cost's L-BFGS), in a new process
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# -- a real LocalCluster: two worker processes ----------------------------------------------------


@pytest.fixture(scope="module")
def client():
    worker_cache = tempfile.mkdtemp(prefix="calcml-dask-workers-")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       env={"CALCML_CACHE_DIR": worker_cache}, silence_logs=40)
    c = distributed.Client(cluster)
    c.calcml_worker_cache = worker_cache
    try:
        yield c
    finally:
        c.close()
        cluster.close()
        import shutil

        shutil.rmtree(worker_cache, ignore_errors=True)


def test_cluster_lazy_and_persisted_match_memory_bitwise_alike(client, linreg):
    _cost, k = linreg
    assert dask_data._client() is client
    X = lazy_rows()
    mem = X.compute()
    lazy = k.value_and_grad(THETA, X)  # one task per chunk, the chunks made on the workers
    want = k.value_and_grad(THETA, mem)
    assert_close(lazy[0], want[0])
    assert_close(lazy[1], want[1])
    v_np, g_np = closed_form(mem, THETA)
    assert_close(lazy[1], g_np, 1e-10)
    held = X.persist()
    distributed.wait(held)
    for _ in range(2):  # the chunks where they are held, as many times as asked: the same bits
        got = k.value_and_grad(THETA, held)
        assert got[0] == lazy[0] and np.array_equal(got[1], lazy[1])
    assert_close(k.value(THETA, held), want[0])
    # held chunks are evaluated by the workers holding them (no task graph); lazy ones by tasks
    args = (dask_data.scalar_spec(k), "value_and_grad", THETA)
    direct = dask_data._direct(dask_data._scalar_chunk_sums, args, held)
    assert direct is not None and len(direct) == 5 and all(r is not None for r in direct)
    assert sum(r[0] for r in direct) == N
    assert dask_data._direct(dask_data._scalar_chunk_sums, args, X) is None
    # the workers' run handler called directly; where that fails, Client.run: the same bits
    real = dask_data._rpc_run

    async def broken(*_a):
        raise OSError("no direct route")

    dask_data._rpc_run = broken
    try:
        fallback = dask_data._direct(dask_data._scalar_chunk_sums, args, held)
    finally:
        dask_data._rpc_run = real
    assert fallback is not None and all(r is not None for r in fallback)  # still where the chunks are held
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(fallback, direct))
    # the same chunk sums without a client give the same bits too
    with dask.config.set(scheduler="sync"):
        assert dask_data._client() is None
        local = k.value_and_grad(THETA, X)
    assert local[0] == lazy[0] and np.array_equal(local[1], lazy[1])


def test_cluster_workers_build_from_shipped_source_in_their_own_cache(client, linreg):
    _cost, k = linreg
    k.value_and_grad(THETA, lazy_rows(n=20_000, chunk=8_000))
    spec = dask_data.scalar_spec(k)
    name = f"calcml_{spec.key[:40]}.py"
    from calcml.compile import cache_dir

    assert os.path.realpath(client.calcml_worker_cache) != os.path.realpath(cache_dir())
    assert name in os.listdir(client.calcml_worker_cache)
    # each worker process keeps the kernels it loaded
    held = client.run(lambda: sorted(dask_data._worker_kernels))
    assert any(spec.key in keys for keys in held.values())
    with open(os.path.join(client.calcml_worker_cache, name)) as fh:
        assert fh.read() == spec.source


def test_cluster_dataframe_and_nan_in_chunk_3(client, linreg):
    _cost, k = linreg
    X = lazy_rows()
    frame = dd.from_dask_array(X, columns=NAMES)[["y", "x1", "x0", "x2"]]
    got, want = k.value_and_grad(THETA, frame), k.value_and_grad(THETA, X.compute())
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    held_frame = frame.persist()
    distributed.wait(held_frame)
    args = (dask_data.scalar_spec(k), "value_and_grad", THETA)
    direct = dask_data._direct(dask_data._scalar_chunk_sums, args, held_frame)
    assert direct is not None and all(r is not None for r in direct)  # evaluated where held
    again = k.value_and_grad(THETA, held_frame)
    assert again[0] == got[0] and np.array_equal(again[1], got[1])
    bad = lazy_rows(nan_at=(3, 77, 3))
    message = f"data column 'y' holds a non-finite value (nan) at row {3 * CHUNK + 77}"
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        k.value_and_grad(THETA, bad)  # tasks
    held = bad.persist()
    distributed.wait(held)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        k.grad(THETA, held)  # where the chunks are held


def test_cluster_lbfgs_fit_over_persisted_data_matches_memory(client, linreg):
    cost, _k = linreg
    X = lazy_rows(seed=21).persist()
    distributed.wait(X)
    got = cm.minimize(cost, np.zeros(4), data=X, method="lbfgs")
    want = cm.minimize(cost, np.zeros(4), data=X.compute(), method="lbfgs")
    assert got.success and got.nit == want.nit
    assert_close(got.x, want.x, 1e-10)
    assert_close(got.fun, want.fun, 1e-10)


def test_cluster_tensor_softmax(client):
    cost = softmax_cost()
    k = cm.compile(cost)
    X, labels = softmax_data(seed=11)
    data = {"x": da.from_array(X, chunks=(CHUNK, 4)), "c": da.from_array(labels, chunks=CHUNK)}
    theta = 0.1 * np.random.default_rng(2).standard_normal(cost.n_params)
    want = k.value_and_grad(theta, {"x": X, "c": labels})
    held = {name: a.persist() for name, a in data.items()}
    distributed.wait(list(held.values()))
    for d in (data, held):
        got = k.value_and_grad(theta, d)
        assert_close(got[0], want[0])
        assert_close(got[1], want[1])
    # a Newton-CG fit over the held chunks: each value, gradient and product where they are held
    fit = cm.minimize(cost, np.zeros(cost.n_params), data=held, method="newton-cg")
    mem_fit = cm.minimize(cost, np.zeros(cost.n_params), data={"x": X, "c": labels}, method="newton-cg")
    assert fit.success and fit.nit == mem_fit.nit
    assert_close(fit.fun, mem_fit.fun, 1e-12)
    assert_close(fit.params["W"], mem_fit.params["W"], 1e-7)


def test_cluster_minibatch_fit_repeats_the_bits_of_dasks_default_scheduler(client, linreg):
    """A minibatch fit over a cluster's chunks: the chunks' seeded order, the same bits as on
    Dask's default scheduler and as NumPy's SGD visiting the chunks in that order."""
    cost, _k = linreg
    X = lazy_rows(seed=31)
    kw = dict(method="sgd", lr=0.02, batch_size=500, epochs=2, seed=9)
    got = cm.minimize(cost, np.zeros(4), data=X, **kw)
    with dask.config.set(scheduler="sync"):
        local = cm.minimize(cost, np.zeros(4), data=X, **kw)
    assert np.array_equal(got.x, local.x) and got.fun == local.fun
    assert_close(got.x, chunked_sgd(X.compute(), SIZES, np.zeros(4), 0.02, 500, 2, 9), 1e-10)


@pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index")  # in Dask's Parquet reader
def test_cluster_cli_scheduler_fits_on_the_cluster_and_closes_its_client(client, cli_rows):
    folder, want, lstsq = cli_rows

    def calcml_tasks(dask_scheduler, prefix=dask_data._PREFIX):  # the keys of calcml's chunk-sum tasks
        return {str(entry[0]) for entry in dask_scheduler.transition_log if str(entry[0]).startswith(prefix)}

    tasks = client.run_on_scheduler(calcml_tasks)
    n_clients = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.clients))
    rc, out, err = _cli("fit", CLI_EXPR, "--params", ",".join(CLI_PARAMS), "--data", str(folder / "part.*.parquet"),
                        "--method", "lbfgs", "--scheduler", client.scheduler.address)
    assert rc == 0, err
    got = _assert_same_fit(out, want, lstsq)
    assert got["data"] == f"3 Parquet files read lazily by Dask, on the cluster at {client.scheduler.address}"
    # each pass's chunk sums were tasks of the cluster (3 files: 3 tasks a pass)
    assert len(client.run_on_scheduler(calcml_tasks) - tasks) >= 3 * int(got["iterations"])
    # the command line's client is closed; this module's client is the default again
    assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.clients)) == n_clients
    assert dask_data._client() is client
