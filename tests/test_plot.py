"""Plots with the Agg backend: the figure holds what was asked for and the image is drawn;
without matplotlib, a clear message."""

import io
import sys

import numpy as np
import pytest

import calcml as cm
from calcml.cli import main
from calcml.plot import MissingDependencyError, plot_history

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def drawn_pixels(fig) -> np.ndarray:
    """The rendered RGBA image of a figure, through a PNG round trip."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    buf.seek(0)
    return plt.imread(buf)


def assert_drawn(img):
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    rgb = img[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 20  # more than a blank canvas and a frame


@pytest.fixture(scope="module")
def rosenbrock():
    a, b = cm.params("a b")
    return cm.Cost((1 - a) ** 2 + 100 * (b - a**2) ** 2, params=[a, b])


@pytest.fixture(scope="module")
def rosen_run(rosenbrock):
    return cm.minimize(rosenbrock, [-1.2, 1.0], method="lbfgs")


def test_history_plot(rosen_run):
    fig, ax = plt.subplots()
    try:
        out = plot_history(rosen_run, ax=ax)
        assert out is ax
        (line,) = ax.get_lines()
        np.testing.assert_array_equal(line.get_ydata(), rosen_run.history)
        assert ax.get_yscale() == "log" and ax.get_ylabel() == "cost"
        assert_drawn(drawn_pixels(fig))
    finally:
        plt.close(fig)


def test_result_plot_draws(rosen_run):
    fig, ax = plt.subplots()
    try:
        rosen_run.plot(ax=ax)
        assert len(ax.get_lines()) == 1
        assert_drawn(drawn_pixels(fig))
    finally:
        plt.close(fig)


def _gd_path(x0, lr, steps):
    """Gradient descent on Rosenbrock, written out in NumPy: the path to draw."""
    x = np.array(x0, dtype=float)
    out = [x.copy()]
    for _ in range(steps):
        g = np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])
        x = x - lr * g
        out.append(x.copy())
    return np.array(out)


def test_path_over_contours(rosenbrock, rosen_run):
    path = _gd_path([-1.2, 1.0], 1e-3, 200)
    fig, ax = plt.subplots()
    try:
        cm.plot_path(rosenbrock, rosen_run, path=path, ax=ax, resolution=40)
        lines = ax.get_lines()
        np.testing.assert_array_equal(lines[0].get_xdata(), path[:, 0])
        np.testing.assert_array_equal(lines[0].get_ydata(), path[:, 1])
        assert tuple(lines[-1].get_xdata()) == (rosen_run.x[0],)  # the result's point
        assert ax.get_xlabel() == "a" and ax.get_ylabel() == "b"
        contours = [c for c in ax.collections if type(c).__name__ in ("QuadContourSet", "ContourSet", "PathCollection", "LineCollection")]
        assert contours, ax.collections
        lo, hi = ax.get_xlim()
        assert lo < path[:, 0].min() and hi > max(path[:, 0].max(), rosen_run.x[0])
        assert_drawn(drawn_pixels(fig))
    finally:
        plt.close(fig)


def test_path_of_a_cost_with_data():
    w, b = cm.params("w b")
    x, y = cm.data("x y")
    cost = cm.Cost((w * x + b - y) ** 2, params=[w, b], data=[x, y])
    D = {"x": np.linspace(0, 1, 30), "y": 3 * np.linspace(0, 1, 30) - 1}
    res = cm.minimize(cost, [0.0, 0.0], data=D, method="lbfgs")
    fig, ax = plt.subplots()
    try:
        cm.plot_path(cost, res, D, path=[[0.0, 0.0], [1.0, 0.0], list(res.x)], ax=ax, resolution=20)
        assert_drawn(drawn_pixels(fig))
        with pytest.raises(cm.DataError, match="pass data"):
            cm.plot_path(cost, res, path=[[0.0, 0.0]], ax=ax)
    finally:
        plt.close(fig)


def test_path_refusals(rosenbrock, rosen_run):
    a, b, c = cm.params("a b c")
    three = cm.Cost(a**2 + b**2 + c**2, params=[a, b, c])
    with pytest.raises(ValueError, match="two parameters; this one has 3"):
        cm.plot_path(three, rosen_run, path=[[0, 0, 0]])
    fig, ax = plt.subplots()
    try:
        if getattr(rosen_run, "path", None) is None:
            with pytest.raises(ValueError, match="pass path="):
                cm.plot_path(rosenbrock, rosen_run, ax=ax)
        with pytest.raises(ValueError, match="shape"):
            cm.plot_path(rosenbrock, rosen_run, path=[1, 2, 3], ax=ax)
    finally:
        plt.close(fig)


def test_missing_matplotlib_is_a_clear_message(monkeypatch, rosenbrock, rosen_run, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'calcml\[plot\]'"):
        cm.plot_path(rosenbrock, rosen_run, path=[[0.0, 0.0]])
    with pytest.raises(ImportError):
        plot_history(rosen_run)
    png = tmp_path / "loss.png"
    rc = main(["fit", "(1 - a)**2 + 100*(b - a**2)**2", "--params", "a,b", "--method", "lbfgs", "--plot", str(png)])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and "needs matplotlib" in err and len(err.strip().splitlines()) == 1
    assert not png.exists()


def test_fit_writes_the_plot(tmp_path, capsys):
    png = tmp_path / "loss.png"
    rc = main(["fit", "(1 - a)**2 + 100*(b - a**2)**2", "--params", "a,b", "--method", "lbfgs",
               "--x0=-1.2,1", "--plot", str(png)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"plot written to {png}" in out
    assert_drawn(plt.imread(str(png)))


def test_path_of_a_tensor_cost_counts_its_entries():
    """A tensor cost's parameters are its entries: w of shape (2,) is two parameters, drawn
    with axes w[0] and w[1], its contours the compiled cost's values (checked at a grid
    point); W of shape (3, 4) is twelve, refused with the entries named."""
    w = cm.params("w", shape=(2,)); j = cm.index("j", 2)
    cost = cm.Cost(cm.sum((w[j] - 1) ** 2, j) + w[0] ** 4, params=[w])
    res = cm.minimize(cost, np.zeros(2), method="lbfgs")
    fig, ax = plt.subplots()
    try:
        cm.plot_path(cost, res, path=[[0.0, 0.0], [0.5, 0.8], list(res.x)], ax=ax, resolution=15)
        assert ax.get_xlabel() == "w[0]" and ax.get_ylabel() == "w[1]"
        assert_drawn(drawn_pixels(fig))
    finally:
        plt.close(fig)
    from calcml.plot import _grid_values

    Z = _grid_values(cost, None, np.array([0.0, 2.0]), np.array([-1.0, 3.0]))
    assert Z[1, 0] == pytest.approx((0 - 1) ** 2 + (3 - 1) ** 2 + 0.0, rel=1e-15)  # a = 0, b = 3
    assert Z[0, 1] == pytest.approx((2 - 1) ** 2 + (-1 - 1) ** 2 + 2.0 ** 4, rel=1e-15)
    W = cm.params("W", shape=(3, 4)); a = cm.index("a", 3); b = cm.index("b", 4)
    twelve = cm.Cost(cm.sum(W[a, b] ** 2, a, b), params=[W])
    with pytest.raises(ValueError, match=r"two parameters; this one has 12 \(W\[0, 0\], W\[0, 1\]"):
        cm.plot_path(twelve, res, path=[[0.0, 0.0]])
