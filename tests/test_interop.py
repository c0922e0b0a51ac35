"""cm.to_scipy: compiled exact derivatives driving scipy.optimize.minimize, against scipy's own
Rosenbrock derivatives and NumPy's least squares."""

import warnings

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
    with pytest.raises(DataError, match=r"this cost has data \['x0', 'x1', 'y'\]; pass data=.*a 2-D array"):
        cm.to_scipy(cost)
    w, x = cm.params("w", shape=(2,)), cm.data("x", shape=(2,))
    with pytest.raises(DataError, match=r"pass data=\.\.\. \(a dict \{name: array of shape \(N, \*shape of a row\)\}\)"):
        cm.to_scipy(cm.Cost(cm.dot(w, x) ** 2, params=[w], data=[x]))
    with pytest.raises(DataError, match="no data columns"):
        cm.to_scipy(rosenbrock, {"x": np.ones(3)})
    with pytest.raises(DataError, match="x1"):
        cm.to_scipy(cost, {"x0": np.ones(3), "y": np.ones(3)})
    with pytest.raises(TypeError):
        cm.to_scipy("x**2")


def test_tensor_costs_give_scipy_exact_hessian_vector_products():
    """hessian='products' hands scipy hessp (one pass over the data each): trust-krylov and
    Newton-CG reach the least-squares solution; the default gives hess where the dense
    Hessian is allowed; a scalar cost refuses 'products' with the reason."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(2)
    N, d = 200, 5
    X = rng.standard_normal((N, d)); y = X @ np.arange(1.0, d + 1) + 0.5 + 0.01 * rng.standard_normal(N)
    w = cm.params("w", shape=(d,)); b = cm.params("b"); x = cm.data("x", shape=(d,)); yy = cm.data("y")
    j = cm.index("j", d)
    cost = cm.Cost((cm.sum(w[j] * x[j], j) + b - yy) ** 2, params=[w, b], data=[x, yy])
    D = {"x": X, "y": y}
    ref = np.linalg.lstsq(np.c_[X, np.ones(N)], y, rcond=None)[0]
    parts = cm.to_scipy(cost, D, hessian="products")
    assert set(parts) == {"fun", "jac", "hessp"}
    v = rng.standard_normal(d + 1)
    A = np.c_[X, np.ones(N)]
    np.testing.assert_allclose(parts["hessp"](ref, v), 2 * A.T @ (A @ v) / N, rtol=1e-12)
    for method in ("trust-krylov", "Newton-CG"):
        res = minimize(x0=np.zeros(d + 1), method=method, tol=1e-8, **parts)
        np.testing.assert_allclose(res.x, ref, atol=1e-7)
    # at a tolerance past what the problem allows, trust-krylov hands hessp a NaN direction
    # (its Krylov basis degenerates): calcml's functions answer as NumPy ones, and scipy ends
    # the same way for both
    def numpy_parts():
        return {"fun": lambda t: ((A @ t - y) ** 2).mean(), "jac": lambda t: 2 * A.T @ (A @ t - y) / N,
                "hessp": lambda t, q: 2 * A.T @ (A @ q) / N}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = minimize(x0=np.zeros(d + 1), method="trust-krylov", tol=1e-12, **parts)
        theirs = minimize(x0=np.zeros(d + 1), method="trust-krylov", tol=1e-12, **numpy_parts())
    assert mine.success == theirs.success and mine.nit == theirs.nit
    # the same end to the problem's precision: the two gradients differ in their last bits, and
    # past the attainable tolerance the iterates follow them (4e-10 apart, seen in a full run)
    np.testing.assert_allclose(mine.x, theirs.x, rtol=1e-8)
    assert set(cm.to_scipy(cost, D)) == {"fun", "jac", "hess"}
    a, c = cm.params("a c")  # a scalar cost's products: its exact Hessian times p
    hessp = cm.to_scipy(cm.Cost(a ** 2 * c + c ** 3, params=[a, c]), hessian="products")["hessp"]
    t, q = np.array([0.5, -2.0]), np.array([3.0, 1.0])
    np.testing.assert_allclose(hessp(t, q), np.array([[2 * t[1], 2 * t[0]], [2 * t[0], 6 * t[1]]]) @ q, rtol=1e-14)
