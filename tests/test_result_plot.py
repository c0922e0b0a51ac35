"""res.plot(): the cost history drawn with matplotlib (Agg backend)."""

import numpy as np
import pytest

import calcml as cm

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def test_result_plot_draws_the_history(tmp_path):
    import matplotlib.pyplot as plt

    a, b = cm.params("a b")
    cost = cm.Cost((1 - a) ** 2 + 100 * (b - a**2) ** 2, params=[a, b])
    res = cm.minimize(cost, np.array([-1.2, 1.0]), method="gd", lr=1e-3, maxiter=500)
    fig, ax = plt.subplots()
    out = res.plot(ax=ax)
    assert out is ax
    (line,) = ax.get_lines()
    x, y = line.get_data()
    np.testing.assert_array_equal(y, res.history)
    assert len(x) == len(res.history) and ax.get_yscale() == "log"
    fig.savefig(tmp_path / "history.png")
    assert (tmp_path / "history.png").stat().st_size > 1000
    plt.close(fig)


def test_two_parameter_runs_record_their_path_and_plot_it():
    import matplotlib.pyplot as plt

    a, b = cm.params("a b")
    cost = cm.Cost((1 - a) ** 2 + 100 * (b - a**2) ** 2, params=[a, b])
    res = cm.minimize(cost, np.array([-1.2, 1.0]), method="gd", lr=1e-3, maxiter=400)
    assert res.path.shape == (len(res.history), 2)
    np.testing.assert_array_equal(res.path[0], [-1.2, 1.0])
    k = cm.compile(cost)
    # each recorded point is the one whose cost the history holds, exactly
    np.testing.assert_array_equal([k.value(p) for p in res.path], res.history)
    fig, ax = plt.subplots()
    cm.plot_path(cost, res, ax=ax)  # no path= needed
    drawn = [line.get_xydata() for line in ax.get_lines()]
    assert any(d.shape == res.path.shape and np.allclose(d, res.path) for d in drawn)
    plt.close(fig)
    w = cm.params("w", 3)
    res3 = cm.minimize(cm.Cost(sum((wi - 1) ** 2 for wi in w), params=w), np.zeros(3), method="gd", lr=0.1, maxiter=5)
    assert res3.path is None


@pytest.mark.parametrize("method,kw", [
    ("gd", dict(lr=1e-3, maxiter=300)),
    ("adam", dict(lr=0.01, maxiter=200)),
    ("lbfgs", {}),
    ("newton", {}),
    ("newton-cg", {}),
])
def test_tensor_runs_of_two_entries_record_their_path(method, kw):
    """A tensor cost of two entries records its iterates as a scalar one does: each row the
    point whose cost the history holds (the compiled cost there, exactly), the first x0; its
    plot needs no path=. Newton-CG's refused trust-region steps repeat their point."""
    import matplotlib.pyplot as plt

    x = cm.params("x", shape=(2,))
    cost = cm.Cost((1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2, params=[x])
    res = cm.minimize(cost, np.array([-1.2, 1.0]), method=method, **kw)
    assert res.path.shape == (len(res.history), 2)
    np.testing.assert_array_equal(res.path[0], [-1.2, 1.0])
    k = cm.compile(cost)
    np.testing.assert_array_equal([k.value(p) for p in res.path], res.history)
    if res.status in (cm.result.CONVERGED, cm.result.MAXITER):
        np.testing.assert_array_equal(res.path[-1], res.x)
    fig, ax = plt.subplots()
    try:
        cm.plot_path(cost, res, ax=ax)
        assert any(d.get_xydata().shape == res.path.shape for d in ax.get_lines())
    finally:
        plt.close(fig)


def test_tensor_paths_over_data_full_batch_threads_and_minibatches():
    """Over data: full-batch steps on calcml's threads (enough rows for two) record each step's
    point; minibatch runs the point at each epoch's end; three entries record none."""
    w = cm.params("w", shape=(2,)); xd = cm.data("xd", shape=(2,)); y = cm.data("y")
    cost = cm.Cost((cm.dot(w, xd) - y) ** 2, params=[w], data=[xd, y])
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300_000, 2)); Y = X @ [1.5, -2.0] + 0.1 * rng.normal(size=300_000)
    D = {"xd": X, "y": Y}
    k = cm.compile(cost)
    res = cm.minimize(cost, np.zeros(2), data=D, method="gd", lr=0.1, maxiter=12)
    assert res.path.shape == (13, 2)
    np.testing.assert_array_equal([k.value(p, D) for p in res.path], res.history)
    small = {"xd": X[:500], "y": Y[:500]}
    res = cm.minimize(cost, np.zeros(2), data=small, method="sgd", lr=0.01, batch_size=50, epochs=3)
    assert res.path.shape == (3, 2) and len(res.history) == 3
    np.testing.assert_array_equal(res.path[-1], res.x)
    v = cm.params("v", shape=(3,)); j = cm.index("j", 3)
    three = cm.Cost(cm.sum((v[j] - 1) ** 2, j), params=[v])
    assert cm.minimize(three, np.zeros(3), method="gd", lr=0.1, maxiter=5).path is None
    assert cm.minimize(three, np.zeros(3), method="lbfgs").path is None
