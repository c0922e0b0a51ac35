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
