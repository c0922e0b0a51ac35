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
