"""cm.to_scipy: compiled exact derivatives driving scipy.optimize.minimize, against scipy's own
Rosenbrock derivatives and NumPy's least squares."""

import numpy as np
import pytest
from scipy.optimize import minimize, rosen, rosen_der, rosen_hess

import calcml as cm
from calcml.errors import DataError


@pytest.fixture(scope="module")
def rosenbrock():
    a, b, c = cm.params("a b c")
    expr = 100 * (b - a**2) ** 2 + (1 - a) ** 2 + 100 * (c - b**2) ** 2 + (1 - b) ** 2
    return cm.Cost(expr, params=[a, b, c])


@pytest.fixture(scope="module")
def regression():
    w0, w1, b = cm.params("w0 w1 b")
    x0, x1, y = cm.data("x0 x1 y")
    cost = cm.Cost((w0 * x0 + w1 * x1 + b - y) ** 2, params=[w0, w1, b], data=[x0, x1, y])
    rng = np.random.default_rng(7)
    X = rng.normal(size=(200, 2))
    Y = X @ np.array([1.5, -0.7]) + 0.3 + 0.1 * rng.normal(size=200)
    A = np.column_stack([X, np.ones(200)])
    sol = np.linalg.lstsq(A, Y, rcond=None)[0]
    return cost, {"x0": X[:, 0], "x1": X[:, 1], "y": Y}, A, Y, sol


def test_functions_match_scipys_rosenbrock(rosenbrock):
    f = cm.to_scipy(rosenbrock)
    assert set(f) == {"fun", "jac", "hess"}
    rng = np.random.default_rng(0)
    for x in rng.uniform(-2, 2, size=(5, 3)):
        assert f["fun"](x) == pytest.approx(rosen(x), rel=1e-14)
        np.testing.assert_allclose(f["jac"](x), rosen_der(x), rtol=1e-13, atol=1e-12)
        np.testing.assert_allclose(f["hess"](x), rosen_hess(x), rtol=1e-13, atol=1e-12)


def test_jac_is_right_at_a_point_other_than_the_last_fun(rosenbrock):
    f = cm.to_scipy(rosenbrock)
    x, z = np.array([0.1, 0.2, 0.3]), np.array([-1.0, 0.5, 2.0])
    f["fun"](x)
    np.testing.assert_allclose(f["jac"](z), rosen_der(z), rtol=1e-13)
    x[0] = 5.0  # the caller reuses its array: the memo must have copied it
    np.testing.assert_allclose(f["jac"](x), rosen_der(x), rtol=1e-13)


METHODS = [
    pytest.param("BFGS", marks=pytest.mark.filterwarnings("ignore:Method BFGS does not use Hessian")),
    "Newton-CG",
    "trust-exact",
]


@pytest.mark.parametrize("method", METHODS)
def test_rosenbrock_minimum(rosenbrock, method):
    x0 = np.array([-1.2, 1.0, 1.0])
    res = minimize(x0=x0, method=method, **cm.to_scipy(rosenbrock))
    ref = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method=method)  # scipy's own derivatives
    assert res.success, res.message
    np.testing.assert_allclose(res.x, np.ones(3), atol=1e-4)
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-6)
    assert abs(res.nit - ref.nit) <= 2


@pytest.mark.parametrize("method", METHODS)
def test_linear_regression_matches_lstsq(regression, method):
    cost, D, A, Y, sol = regression
    res = minimize(x0=np.zeros(3), method=method, **cm.to_scipy(cost, D))
    assert res.success, res.message
    np.testing.assert_allclose(res.x, sol, rtol=1e-6, atol=1e-7)
    assert res.fun == pytest.approx(np.mean((A @ sol - Y) ** 2), rel=1e-9)


def test_linear_regression_derivatives_by_hand(regression):
    cost, D, A, Y, _ = regression
    f = cm.to_scipy(cost, np.column_stack([D["x0"], D["x1"], D["y"]]))  # a 2-D array works too
    theta = np.array([0.5, -0.2, 1.0])
    r = A @ theta - Y
    assert f["fun"](theta) == pytest.approx(np.mean(r**2), rel=1e-13)
    np.testing.assert_allclose(f["jac"](theta), 2 * A.T @ r / len(Y), rtol=1e-12)
    np.testing.assert_allclose(f["hess"](theta), 2 * A.T @ A / len(Y), rtol=1e-12)


def test_without_hessian_bfgs_runs_without_warnings(rosenbrock, recwarn):
    f = cm.to_scipy(rosenbrock, hessian=False)
    assert set(f) == {"fun", "jac"}
    res = minimize(x0=np.array([-1.2, 1.0, 1.0]), method="BFGS", **f)
    assert res.success and not [w for w in recwarn if "Hessian" in str(w.message)]
    np.testing.assert_allclose(res.x, np.ones(3), atol=1e-4)


def test_data_mistakes_are_named(rosenbrock, regression):
    cost = regression[0]
    with pytest.raises(DataError, match="data columns"):
        cm.to_scipy(cost)
    with pytest.raises(DataError, match="no data columns"):
        cm.to_scipy(rosenbrock, {"x": np.ones(3)})
    with pytest.raises(DataError, match="x1"):
        cm.to_scipy(cost, {"x0": np.ones(3), "y": np.ones(3)})
    with pytest.raises(TypeError):
        cm.to_scipy("x**2")
