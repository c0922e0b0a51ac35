"""res.history means the same on every path: a cost stated with scalar symbols (compiled
loops) or in index notation (the tensor generator), in memory or over Dask data.

* Full batch: the cost at each iterate x_0, x_1, …, x_nit (every ``history_every``-th once a
  run could pass ``HISTORY_MAX`` entries), x_0's first and the last iterate's always last, so
  ``history[0]`` is the cost at x0 and ``history[-1]`` is ``res.fun``.
* Minibatches: one entry per epoch (and one for a last, unfinished one): the mean of the
  epoch's minibatch costs, each weighted by its rows, so a short last minibatch weighs less.

References: the compiled kernels' values at x0 and at the result, NumPy's gradient descent on
the same cost, and a run whose rate (1e-300) leaves the parameters where they are, so that
every epoch's row-weighted mean is the full cost at x0.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import calcml as cm
from calcml import result as R

N, D = 203, 3  # 203 rows: batches of 50 leave a last one of 3


@pytest.fixture(scope="module")
def logistic():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D))
    y = (X @ np.array([1.0, -2.0, 0.5]) + 0.3 + rng.normal(size=N) > 0).astype(float)
    w, b, x, yy = cm.params("w", D), cm.params("b"), cm.data("x", D), cm.data("y")
    z = cm.dot(w, x) + b
    scalar = cm.Cost(sp.log(1 + sp.exp(z)) - yy * z, params=[*w, b], data=[*x, yy])
    W, B, xx, Y = cm.params("W", shape=(D,)), cm.params("B"), cm.data("x", shape=(D,)), cm.data("y")
    zt = cm.dot(W, xx) + B
    tensor = cm.Cost(sp.log(1 + sp.exp(zt)) - Y * zt, params=[W, B], data=[xx, Y])
    sdata = {f"x{k}": np.ascontiguousarray(X[:, k]) for k in range(D)}
    sdata["y"] = y
    return {"scalar": (scalar, sdata), "tensor": (tensor, {"x": X, "y": y}), "X": X, "y": y}


def _grad(theta, X, y):
    z = X @ theta[:D] + theta[D]
    r = 1.0 / (1.0 + np.exp(-z)) - y
    return np.append(X.T @ r, r.sum()) / len(y)


def _cost(theta, X, y):
    z = X @ theta[:D] + theta[D]
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


RUNS = [("gd", dict(lr=0.5, maxiter=7)), ("gd", dict(lr=0.5, maxiter=30_000, tol=1e-3)), ("gd", dict(lr=0.5, maxiter=0)),
        ("lbfgs", {}), ("newton", dict(maxiter=2)), ("newton-cg", {})]


@pytest.mark.parametrize("method, options", RUNS)
def test_full_batch_history_is_the_cost_at_each_iterate_on_both_paths(logistic, method, options):
    got = {}
    for form in ("scalar", "tensor"):
        cost, data = logistic[form]
        x0 = np.array([0.1, -0.2, 0.3, 0.0])
        res = cm.minimize(cost, x0, data=data, method=method, **options)
        h = res.history
        assert h[0] == pytest.approx(cm.compile(cost).value(x0, data), rel=1e-12)
        assert h[-1] == pytest.approx(res.fun, rel=1e-12)
        every = res.history_every
        steps = list(range(0, res.nit + 1, every))
        if steps[-1] != res.nit:
            steps.append(res.nit)
        assert len(h) == len(steps), (form, res.nit, every)
        got[form] = res
    s, t = got["scalar"], got["tensor"]
    assert s.nit == t.nit and s.history_every == t.history_every
    np.testing.assert_allclose(s.history, t.history, rtol=1e-9)
    if method == "gd":  # NumPy's gradient descent visits the same iterates
        X, y = logistic["X"], logistic["y"]
        theta, want = np.array([0.1, -0.2, 0.3, 0.0]), []
        for k in range(s.nit + 1):
            want.append(_cost(theta, X, y))
            theta = theta - 0.5 * _grad(theta, X, y)
        np.testing.assert_allclose(s.history, [want[k] for k in steps], rtol=1e-9)


def test_a_long_run_keeps_every_kth_iterate_and_the_last(logistic):
    for form in ("scalar", "tensor"):
        cost, data = logistic[form]
        res = cm.minimize(cost, np.zeros(D + 1), data=data, method="gd", lr=0.5, maxiter=25_000, tol=0.0)
        assert res.history_every == 3 and res.nit == 25_000
        assert len(res.history) == 25_000 // 3 + 2  # steps 0, 3, …, 24_999, then 25_000
        assert res.history[-1] == pytest.approx(res.fun, rel=1e-12)
        assert res.history_steps.tolist() == [*range(0, 25_000, 3), 25_000] and not res.minibatch


def test_history_steps_number_the_entries_in_the_plot_and_the_command_lines_csv(logistic, tmp_path):
    """res.history_steps: the iteration of each entry (the last one's is nit, off the stride),
    or the epoch, from 1; what plot_history draws against and `calcml fit --history` writes."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calcml.plot import plot_history

    cost, data = logistic["tensor"]
    res = cm.minimize(cost, np.zeros(D + 1), data=data, method="gd", lr=0.5, maxiter=30_000, tol=1e-3)
    assert res.history_every == 4 and res.nit % 4 != 0
    assert res.history_steps.tolist() == [*range(0, res.nit, 4), res.nit]
    mb = cm.minimize(cost, np.zeros(D + 1), data=data, method="adam", lr=0.05, batch_size=50, maxiter=12)
    assert mb.minibatch and mb.history_steps.tolist() == [1, 2, 3]  # two epochs of 5 updates, then 2 of a third
    fig, ax = plt.subplots()
    try:
        line = plot_history(res, ax=ax).get_lines()[0]
        np.testing.assert_array_equal(line.get_xdata(), res.history_steps)
        assert plot_history(mb, ax=ax).get_xlabel() == "epoch"
    finally:
        plt.close(fig)
    from calcml.cli import main

    X, y = logistic["X"], logistic["y"]
    csv = tmp_path / "rows.csv"
    np.savetxt(csv, np.column_stack([X[:, 0], y]), delimiter=",", header="x,y", comments="")
    hist = tmp_path / "h.csv"
    assert main(["fit", "log(1 + exp(w*x + b)) - y*(w*x + b)", "--params", "w,b", "--data", str(csv),
                 "--method", "gd", "--lr", "0.5", "--maxiter", "30000", "--tol", "1e-3", "--history", str(hist)]) == 0
    rows = [line.split(",") for line in hist.read_text().splitlines()[1:]]
    steps = [int(r[0]) for r in rows]
    assert steps[0] == 0 and steps[1] == 4 and steps[-1] % 4 != 0 and steps[-2] == 4 * (len(rows) - 2)


@settings(max_examples=3, deadline=None)
@given(batch=st.integers(7, 120), epochs=st.integers(1, 3), form=st.sampled_from(["scalar", "tensor"]),
       method=st.sampled_from(["sgd", "adam"]))
def test_epoch_means_weigh_each_minibatch_by_its_rows(logistic, batch, epochs, form, method):
    """At a rate too small to move the parameters, each epoch's mean minibatch cost is the full
    cost at x0 whatever the shuffle, when a short last minibatch weighs by its rows (the
    unweighted mean of minibatch costs is not)."""
    cost, data = logistic[form]
    x0 = np.array([0.3, -0.2, 0.1, 0.05])
    f0 = cm.compile(cost).value(x0, data)
    res = cm.minimize(cost, x0, data=data, method=method, lr=1e-300, batch_size=batch, epochs=epochs, seed=1)
    assert res.status == R.EPOCHS_DONE and len(res.history) == epochs
    np.testing.assert_allclose(res.history, f0, rtol=1e-12)
    part = cm.minimize(cost, x0, data=data, method=method, lr=1e-300, batch_size=batch, maxiter=2, seed=1)
    if -(-N // batch) > 2:  # an unfinished epoch: its part's mean ends the history
        assert part.status == R.MAXITER and len(part.history) == 1 and np.isfinite(part.history[0])


def test_sum_reduction_epoch_means_estimate_the_full_sum(logistic):
    X, y = logistic["X"], logistic["y"]
    W, B, xx, Y = cm.params("W", shape=(D,)), cm.params("B"), cm.data("x", shape=(D,)), cm.data("y")
    zt = cm.dot(W, xx) + B
    cost = cm.Cost(sp.log(1 + sp.exp(zt)) - Y * zt, params=[W, B], data=[xx, Y], reduce="sum")
    x0 = np.array([0.3, -0.2, 0.1, 0.05])
    res = cm.minimize(cost, x0, data={"x": X, "y": y}, method="sgd", lr=1e-300, batch_size=50, epochs=2)
    np.testing.assert_allclose(res.history, _cost(x0, X, y) * N, rtol=1e-12)


def test_dask_minibatch_epochs_weigh_short_chunk_batches_by_their_rows(logistic):
    da = pytest.importorskip("dask.array")
    X, y = logistic["X"], logistic["y"]
    cost, _ = logistic["tensor"]
    data = {"x": da.from_array(X, chunks=(70, D)), "y": da.from_array(y, chunks=70)}  # 70, 70, 63 rows
    x0 = np.array([0.3, -0.2, 0.1, 0.05])
    res = cm.minimize(cost, x0, data=data, method="sgd", lr=1e-300, batch_size=32, epochs=2, seed=2)
    assert len(res.history) == 2
    np.testing.assert_allclose(res.history, _cost(x0, X, y), rtol=1e-12)


@pytest.mark.parametrize("method", ["sgd", "adam"])
def test_both_statements_draw_the_same_minibatches_from_a_seed(logistic, method):
    """A cost stated with scalar symbols (the compiled scalar loop) and in index notation (the
    tensor loop) shuffle their rows alike (Fisher-Yates from SplitMix64, docs/optimizers.md):
    the same seed gives the same minibatches, hence the same fit to rounding; another seed,
    another fit."""
    (s, sdata), (t, tdata) = logistic["scalar"], logistic["tensor"]
    kw = dict(method=method, lr=0.05, batch_size=7, epochs=3)
    a = cm.minimize(s, np.zeros(D + 1), data=sdata, seed=5, **kw)
    b = cm.minimize(t, np.zeros(D + 1), data=tdata, seed=5, **kw)
    np.testing.assert_allclose(b.x, a.x, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.history, a.history, rtol=1e-12)
    c = cm.minimize(t, np.zeros(D + 1), data=tdata, seed=6, **kw)
    assert np.max(np.abs(c.x - b.x)) > 1e-6
