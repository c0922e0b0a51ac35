"""Shifted reads in index notation (``x[i + 1]``): windows of an axis, and their adjoints.

Chained Rosenbrock, an AR(2) residual over a series, a smoothness penalty: each is stated in
index form with an index shifted by a whole number, and checked against an independent
reference: the same cost in scalar symbols (SymPy's own derivatives, evaluated exactly),
NumPy closed forms, the normal equations of a penalised least squares, scipy's minimizer.
"""

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings, strategies as st

import calcml as cm
from calcml.errors import CostError


def chained(n):
    x = cm.params("x", shape=(n,))
    i = cm.index("i", n - 1)
    return cm.Cost(cm.sum((1 - x[i]) ** 2 + 100 * (x[i + 1] - x[i] ** 2) ** 2, i), params=[x]), x, i


def chained_scalar(n):
    xs = sp.symbols(f"x0:{n}", real=True)
    return sum((1 - xs[j]) ** 2 + 100 * (xs[j + 1] - xs[j] ** 2) ** 2 for j in range(n - 1)), xs


def chained_numpy(t):
    """Chained Rosenbrock's value and gradient, NumPy closed form."""
    f = np.sum((1 - t[:-1]) ** 2 + 100 * (t[1:] - t[:-1] ** 2) ** 2)
    g = np.zeros(t.shape[0])
    g[:-1] += -2 * (1 - t[:-1]) - 400 * t[:-1] * (t[1:] - t[:-1] ** 2)
    g[1:] += 200 * (t[1:] - t[:-1] ** 2)
    return f, g


def assert_chained_kernel(k, n):
    """k's value and gradient against the NumPy closed form, at a spread point."""
    th = np.linspace(-1.5, 1.5, n)
    f, g = k.value_and_grad(th)
    fr, gr = chained_numpy(th)
    assert f == pytest.approx(fr, rel=1e-13)
    assert np.abs(g - gr).max() <= 1e-12 * np.abs(gr).max()


N_SMALL = 7


@pytest.fixture(scope="module")
def rosen():
    cost, x, i = chained(N_SMALL)
    f, xs = chained_scalar(N_SMALL)
    grad = [sp.diff(f, s) for s in xs]
    hess = [[sp.diff(g, s) for s in xs] for g in grad]
    return cost, cm.compile(cost), f, xs, grad, hess


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(-2, 2), min_size=N_SMALL, max_size=N_SMALL), st.lists(st.floats(-1, 1), min_size=N_SMALL,
                                                                              max_size=N_SMALL))
def test_chained_rosenbrock_matches_sympy_scalar_derivatives(rosen, point, direction):
    cost, k, f, xs, grad, hess = rosen
    th, v = np.array(point), np.array(direction)
    sub = {s: sp.Float(t, 30) for s, t in zip(xs, th)}
    fr = float(f.subs(sub))
    gr = np.array([float(g.subs(sub)) for g in grad])
    H = np.array([[float(h.subs(sub)) for h in row] for row in hess])
    value, g = k.value_and_grad(th)
    scale = max(1.0, np.abs(gr).max())
    assert value == pytest.approx(fr, rel=1e-13, abs=1e-12)
    assert np.abs(g - gr).max() <= 1e-13 * scale
    assert np.abs(k.hvp(th, v) - H @ v).max() <= 1e-12 * max(1.0, np.abs(H @ v).max(), np.abs(H).max())
    assert np.allclose(k.hessian(th), H, rtol=1e-13, atol=1e-11)


def test_adjoint_of_a_shifted_read_is_a_shifted_read(rosen):
    cost, *_ = rosen
    x = cost.params[0]
    m = cm.index("m", N_SMALL)
    d = cost.diff(x[m])
    assert d.has(sp.Piecewise)  # a window: the entries the shifted read reaches
    # no sum over the axis (an expanded adjoint would be one)
    assert not d.has(sp.Sum) and not d.has(sp.KroneckerDelta)
    f, xs = chained_scalar(N_SMALL)
    for e in range(N_SMALL):
        entry = cost.diff(x[e])
        claimed = d.xreplace({m: sp.Integer(e)})
        exact = sp.diff(f, xs[e])
        as_scalars = {x[j]: xs[j] for j in range(N_SMALL)}
        assert sp.expand(entry.xreplace(as_scalars) - exact) == 0
        assert sp.expand(sp.piecewise_fold(claimed).xreplace(as_scalars) - exact) == 0


def test_generated_code_reads_neighbours_and_guards_the_ends(rosen):
    _, k, *_ = rosen
    src = k.source
    assert "p_x[i_i + 1]" in src  # the shifted read, an integer subscript
    assert ">= 1) else 0.0" in src and f"<= {N_SMALL - 2}) else 0.0" in src  # the adjoint's windows


def test_verify_proves_an_instance_that_keeps_the_shift():
    cost, x, i = chained(40)
    rep = cm.verify(cost)
    assert rep.ok and len(rep) == 3  # the instance: x of 3 entries, i over 0 … 1
    assert all(v.status == "verified" for v in rep)
    assert "x(3,)" in rep[0].detail


def test_build_stays_small_at_a_thousand_parameters():
    n = 1000
    cost, x, i = chained(n)
    k = cm.compile(cost)
    assert_chained_kernel(k, n)
    assert k.source.count("\n") < 200  # loops, not one line per parameter


@pytest.mark.parametrize("method", ["lbfgs", "newton-cg"])
def test_fit_reaches_scipy_minimum(method):
    from scipy.optimize import minimize as sp_minimize

    n = 30
    cost, x, i = chained(n)
    x0 = np.where(np.arange(n) % 2 == 0, -1.2, 1.0)

    ref = sp_minimize(chained_numpy, x0, jac=True, method="L-BFGS-B", options=dict(maxiter=20000, gtol=1e-10, ftol=0))
    res = cm.minimize(cost, x0, method=method, maxiter=5000, tol=1e-8)
    assert res.success, res.message
    assert np.allclose(res.x, ref.x, atol=1e-6)
    assert res.params["x"].shape == (n,)


def ar2_cost(T):
    """Squared AR(2) residuals s[t+2] - a1 s[t+1] - a2 s[t] over a series of T values per row."""
    s = cm.data("s", shape=(T,))
    t = cm.index("t", T - 2)
    a1, a2 = cm.params("a1 a2")
    return cm.Cost(cm.sum((s[t + 2] - a1 * s[t + 1] - a2 * s[t]) ** 2, t), params=[a1, a2], data=[s])


def test_shifted_reads_of_data_ar2_residuals():
    """An AR(2) model over series of T values per row: residual s[t+2] - a1 s[t+1] - a2 s[t]."""
    T, N = 9, 50
    cost = ar2_cost(T)
    rng = np.random.default_rng(3)
    S = rng.standard_normal((N, T))
    th = np.array([0.4, -0.3])
    r = S[:, 2:] - th[0] * S[:, 1:-1] - th[1] * S[:, :-2]
    fr = np.mean(np.sum(r ** 2, axis=1))
    gr = np.array([np.mean(np.sum(-2 * r * S[:, 1:-1], axis=1)), np.mean(np.sum(-2 * r * S[:, :-2], axis=1))])
    k = cm.compile(cost)
    f, g = k.value_and_grad(th, {"s": S})
    assert f == pytest.approx(fr, rel=1e-13)
    assert np.allclose(g, gr, rtol=1e-12, atol=1e-13)
    # least squares: the fit is the solution of the normal equations
    A = np.stack([S[:, 1:-1].ravel(), S[:, :-2].ravel()], axis=1)
    exact = np.linalg.lstsq(A, S[:, 2:].ravel(), rcond=None)[0]
    res = cm.minimize(cost, np.zeros(2), data={"s": S}, method="newton", tol=1e-10)
    assert np.allclose(res.x, exact, rtol=1e-9, atol=1e-12)


def test_smoothness_penalty_on_a_matrix_axis():
    """Linear regression with a first-difference penalty along the feature axis of each output:
    the minimizer solves (X'X/N + lam D'D) w = X'y/N, per output."""
    d, K, N, lam = 6, 2, 200, 0.7
    W = cm.params("W", shape=(K, d))
    x = cm.data("x", shape=(d,))
    y = cm.data("y", shape=(K,))
    k = cm.index("k", K)
    j = cm.index("j", d)
    jj = cm.index("jj", d - 1)
    cost = cm.Cost(cm.sum((cm.sum(W[k, j] * x[j], j) - y[k]) ** 2, k), params=[W], data=[x, y],
                   penalty=lam * cm.sum((W[k, jj + 1] - W[k, jj]) ** 2, k, jj))
    rng = np.random.default_rng(5)
    X = rng.standard_normal((N, d))
    Y = rng.standard_normal((N, K))
    D = np.diff(np.eye(d), axis=0)  # (d-1, d): rows e_{j+1} - e_j
    theta = rng.standard_normal(K * d)
    Wv = theta.reshape(K, d)
    R = X @ Wv.T - Y
    fr = np.mean(np.sum(R ** 2, axis=1)) + lam * np.sum((Wv @ D.T) ** 2)
    gr = 2 * R.T @ X / N + 2 * lam * Wv @ D.T @ D
    kern = cm.compile(cost)
    f, g = kern.value_and_grad(theta, {"x": X, "y": Y})
    assert f == pytest.approx(fr, rel=1e-13)
    assert np.allclose(g, gr.ravel(), rtol=1e-12, atol=1e-12)
    exact = np.linalg.solve(X.T @ X / N + lam * D.T @ D, X.T @ Y / N).T
    res = cm.minimize(cost, np.zeros(K * d), data={"x": X, "y": Y}, method="lbfgs", tol=1e-10)
    assert np.allclose(res.params["W"], exact, atol=1e-8)


@pytest.mark.parametrize("bad, message", [
    (lambda x, i: x[i + 2], "i \\+ 2 reaches entry 6 of axis 0 of x, which runs over 0 … 5"),
    (lambda x, i: x[i - 1] + x[i + 1], "i - 1 reaches entry -1 of axis 0 of x"),
    (lambda x, i: x[2 * i], "2\\*i on axis 0 of x; calcml reads an entry at an index, or at indices plus a whole number"),
    (lambda x, i: x[i], "index i runs over 0 … 4 but axis 0 of x has length 6"),
])
def test_bad_windows_are_named(bad, message):
    x = cm.params("x", shape=(6,))
    i = cm.index("i", 5)
    with pytest.raises(CostError, match=message):
        cm.Cost(cm.sum(bad(x, i), i), params=[x])


def test_a_diagonal_through_a_shift_is_refused():
    W = cm.params("W", shape=(4, 4))
    i = cm.index("i", 3)
    with pytest.raises(CostError, match="the same index twice"):
        cm.Cost(cm.sum(W[i, i + 1], i), params=[W])


# -- scalar statements restated with shifted reads (calcml.tensor.lift) ---------------------
def test_lift_restates_neighbouring_members_as_a_shifted_read():
    from calcml.tensor.lift import lift

    n = 60
    xs = cm.params("x", n)
    cost = cm.Cost(sp.Add(*[(1 - xs[j]) ** 2 + 100 * (xs[j + 1] - xs[j] ** 2) ** 2 for j in range(n - 1)]),
                   params=list(xs))
    lifted, _ = lift(cost)
    reads = {e for e in lifted.expr.atoms(sp.Indexed)}
    assert any(not isinstance(e.indices[0], sp.Idx) for e in reads)  # x[i + 1]
    k = cm.compile(cost)
    assert_chained_kernel(k, n)
    res = cm.minimize(cost, np.full(n, -1.0), method="lbfgs", maxiter=20000, tol=1e-8)
    assert res.success and np.allclose(res.x, 1.0, atol=1e-6)


def test_lift_leaves_a_prefix_that_no_shift_explains_to_the_scalar_path():
    from calcml.tensor.lift import lift

    n = 40
    xs = cm.params("x", n)
    expr = sp.Add(*[xs[j] ** 2 for j in range(n - 1)]) + sp.Add(*[xs[j] ** 4 / 4 for j in range(n)])
    cost = cm.Cost(expr, params=list(xs))
    assert lift(cost) is None  # x[i] over 0 … n-2 alone is not a statement calcml accepts
    th = np.linspace(-1, 1, n)
    f, g = cm.compile(cost).value_and_grad(th)
    assert f == pytest.approx(np.sum(th[:-1] ** 2) + np.sum(th ** 4) / 4, rel=1e-13)
    gr = th ** 3 + np.where(np.arange(n) < n - 1, 2 * th, 0.0)
    assert np.allclose(g, gr, rtol=1e-13, atol=1e-15)


def _window_reads(source: str) -> tuple:
    """(all, unguarded): subscripts at a tensor's own axis (``i_x_0``) or a window's
    (``i_x_w0``) plus or minus something (``v[i_x_w0 + 1]``, ``c[i_x_w0 - i_l]``), and those of
    them not inside the taken branch of a conditional expression: reads that may fall off the
    array (garbage memory, and 0 times a NaN found there is NaN)."""
    import ast
    import re

    window = re.compile(r"^i_\w+_w?\d+$")  # a tensor's own axis (x_0) or a window's (x_w0)
    found, bad = [], []

    def visit(node, guarded):
        if isinstance(node, ast.IfExp):
            visit(node.test, guarded)
            visit(node.body, True)
            visit(node.orelse, guarded)
            return
        if isinstance(node, ast.Subscript):
            for sub in ast.walk(node.slice):
                if isinstance(sub, ast.BinOp) and isinstance(sub.left, ast.Name) and window.match(sub.left.id):
                    found.append(ast.unparse(node))
                    if not guarded:
                        bad.append(ast.unparse(node))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(source), False)
    return found, bad


@pytest.mark.parametrize("case", ["chained", "penalty"])
def test_every_read_off_a_windows_end_is_guarded(case):
    """The gradient's and the Hessian-vector product's kernels (forward over reverse: the tangent
    of a guarded adjoint) read a shifted neighbour only where it exists."""
    from calcml.tensor.kernels import compile_tensor

    if case == "chained":
        cost = chained(12)[0]
    else:
        W = cm.params("W", shape=(3, 8)); x = cm.data("x", shape=(8,))
        k, j, jj = cm.index("k", 3), cm.index("j", 8), cm.index("jj", 7)
        cost = cm.Cost(cm.sum(sp.tanh(cm.sum(W[k, j] * x[j], j)) ** 2, k), params=[W], data=[x],
                       penalty=cm.sum((W[k, jj + 1] - W[k, jj]) ** 2 * W[k, jj] ** 2, k, jj))
    kern = compile_tensor(cost)
    for kind in ("base", "hvp"):
        source = open(kern._module(kind)._calcml_path).read()
        found, bad = _window_reads(source)
        assert found and bad == []


def test_minibatch_fit_over_shifted_data_reads_reaches_least_squares():
    """Adam over minibatches gathers rows of a series and runs the same kernels: the AR(2) fit
    lands on the normal equations' solution (to Adam's noise), and a seed repeats its bits."""
    T, N = 8, 400
    cost = ar2_cost(T)
    rng = np.random.default_rng(11)
    S = np.zeros((N, T))
    S[:, :2] = rng.standard_normal((N, 2))
    for q in range(2, T):
        S[:, q] = 0.6 * S[:, q - 1] - 0.2 * S[:, q - 2] + 0.1 * rng.standard_normal(N)
    A = np.stack([S[:, 1:-1].ravel(), S[:, :-2].ravel()], axis=1)
    exact = np.linalg.lstsq(A, S[:, 2:].ravel(), rcond=None)[0]
    kw = dict(data={"s": S}, method="adam", lr=0.02, batch_size=32, epochs=40, seed=3)
    res = cm.minimize(cost, np.zeros(2), **kw)
    again = cm.minimize(cost, np.zeros(2), **kw)
    assert np.array_equal(res.x, again.x)
    assert np.allclose(res.x, exact, atol=2e-2)


# -- reads at a sum of indices, x[t + l]: convolutions ------------------------------------------
def conv_cost(n, P):
    """A bilinear convolution of two parameter vectors: sum over t of (sum over l of w[l] x[t + l] - 1)^2."""
    x = cm.params("x", shape=(n,))
    w = cm.params("w", shape=(P,))
    t = cm.index("t", n - P + 1)
    l = cm.index("l", P)
    return cm.Cost(cm.sum((cm.sum(w[l] * x[t + l], l) - 1) ** 2, t), params=[x, w]), x, w


def test_convolution_matches_sympy_scalar_derivatives():
    n, P = 7, 3
    cost, x, w = conv_cost(n, P)
    xs, ws = sp.symbols(f"x0:{n}", real=True), sp.symbols(f"w0:{P}", real=True)
    f = sp.Add(*[(sp.Add(*[ws[q] * xs[t + q] for q in range(P)]) - 1) ** 2 for t in range(n - P + 1)])
    syms = list(xs) + list(ws)
    grad = [sp.diff(f, s) for s in syms]
    hess = [[sp.diff(g, s) for s in syms] for g in grad]
    k = cm.compile(cost)
    rng = np.random.default_rng(4)
    for _ in range(3):
        th, v = rng.standard_normal(n + P), rng.standard_normal(n + P)
        sub = dict(zip(syms, th))
        gr = np.array([float(g.subs(sub)) for g in grad])
        H = np.array([[float(h.subs(sub)) for h in row] for row in hess])
        value, g = k.value_and_grad(th)
        assert value == pytest.approx(float(f.subs(sub)), rel=1e-13)
        assert np.allclose(g, gr, rtol=1e-13, atol=1e-13)
        assert np.allclose(k.hvp(th, v), H @ v, rtol=1e-12, atol=1e-12)
        assert np.allclose(k.hessian(th), H, rtol=1e-13, atol=1e-13)
    # the adjoint of x[t + l] at entry m: the terms of every l whose t = m - l is in range
    m = cm.index("m", n)
    d = cost.diff(x[m])
    assert d.has(sp.Piecewise)
    as_scalars = {**{x[j]: xs[j] for j in range(n)}, **{w[j]: ws[j] for j in range(P)}}
    for e in range(n):
        claimed = sp.piecewise_fold(d.xreplace({m: sp.Integer(e)}).doit()).xreplace(as_scalars)
        assert sp.expand(claimed - sp.diff(f, xs[e])) == 0
    assert cm.verify(cost).ok


def test_autoregression_of_order_p_over_a_data_window():
    """AR(P) with a coefficient vector: s[t + P] predicted by sum over l of a[l] s[t + l]; Newton
    solves the quadratic in one step, onto the normal equations' solution."""
    T, P, N = 10, 3, 120
    s = cm.data("s", shape=(T,))
    a = cm.params("a", shape=(P,))
    t = cm.index("t", T - P)
    l = cm.index("l", P)
    cost = cm.Cost(cm.sum((s[t + P] - cm.sum(a[l] * s[t + l], l)) ** 2, t), params=[a], data=[s])
    rng = np.random.default_rng(8)
    S = rng.standard_normal((N, T))
    A = np.stack([S[:, q:q + T - P].ravel() for q in range(P)], axis=1)  # column q: s[t + q]
    y = S[:, P:].ravel()
    th = rng.standard_normal(P)
    r = y - A @ th
    f, g = cm.compile(cost).value_and_grad(th, {"s": S})
    assert f == pytest.approx(np.sum(r ** 2) / N, rel=1e-13)
    assert np.allclose(g, -2 * A.T @ r / N, rtol=1e-12, atol=1e-13)
    res = cm.minimize(cost, np.zeros(P), data={"s": S}, method="newton", tol=1e-10)
    assert np.allclose(res.x, np.linalg.lstsq(A, y, rcond=None)[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad, message", [
    (lambda x, t, l: x[t + l + 1], "indices l runs over 0 … 2 and t runs over 0 … 4, so l \\+ t \\+ 1 reaches entry 7 of axis 0 of x"),
    (lambda x, t, l: x[t - l], "calcml reads an entry at an index, or at indices plus a whole number"),
    (lambda x, t, l: x[t + t], "calcml reads an entry at an index, or at indices plus a whole number"),
])
def test_bad_sums_of_indices_are_named(bad, message):
    x = cm.params("x", shape=(7,))
    t, l = cm.index("t", 5), cm.index("l", 3)
    with pytest.raises(CostError, match=message):
        cm.Cost(cm.sum(bad(x, t, l), t, l), params=[x])


def test_convolution_kernels_guard_their_windows():
    from calcml.tensor.kernels import compile_tensor

    kern = compile_tensor(conv_cost(9, 3)[0])
    for kind in ("base", "hvp"):
        source = open(kern._module(kind)._calcml_path).read()
        assert "i_x_w0 - i_l" in source
        found, bad = _window_reads(source)
        assert found and bad == []


def test_rowwise_residuals_of_a_window():
    """cm.rowwise with a free index read shifted: the AR(2) residual of every row and time."""
    T = 7
    s = cm.data("s", shape=(T,))
    t = cm.index("t", T - 2)
    a1, a2 = cm.params("a1 a2")
    f = cm.rowwise(s[t + 2] - a1 * s[t + 1] - a2 * s[t], params=[a1, a2], data=[s])
    S = np.random.default_rng(2).standard_normal((5, T))
    out = f(np.array([0.5, -0.25]), {"s": S})
    assert out.shape == (5, T - 2)
    assert np.allclose(out, S[:, 2:] - 0.5 * S[:, 1:-1] + 0.25 * S[:, :-2], rtol=1e-15, atol=1e-15)


def test_check_gradient_of_a_window_names_the_missing_neighbour_term():
    """A hand-written chained-Rosenbrock gradient that forgets the x[i + 1] term's share is
    refuted, naming an entry; the right one is verified."""
    n = 12
    cost = chained(n)[0]

    def right(theta):
        return chained_numpy(theta)[1]

    def forgot(theta):
        g = np.zeros(n)
        g[:-1] = -2 * (1 - theta[:-1]) - 400 * theta[:-1] * (theta[1:] - theta[:-1] ** 2)
        return g  # without the 200 (x[i+1] - x[i]^2) each entry after the first receives

    assert cm.check_gradient(cost, right).ok
    rep = cm.check_gradient(cost, forgot)
    assert not rep.ok and rep[0].status == "refuted" and "x[" in rep[0].detail


def test_a_window_of_a_tensor_never_read_shifted_is_refused():
    """z[i] over 0 … n-2 of a z of n entries, where only x is read shifted: z's last entry would
    be left out without a word; the error says what a plain read covers."""
    n = 6
    x, z = cm.params("x", shape=(n,)), cm.params("z", shape=(n,))
    i = cm.index("i", n - 1)
    with pytest.raises(CostError, match="axis 0 of z has length 6; a plain read covers its axis, unless the "
                                        "statement also reads z shifted by i"):
        cm.Cost(cm.sum(z[i] * (x[i + 1] - x[i]) ** 2, i), params=[x, z])


def test_verify_shrinks_an_axis_read_plainly_by_a_window_index_alike():
    """Weights w[i] (n-1 entries) on the differences x[i + 1] - x[i]: the instance keeps w's axis
    as long as i's shortened range, so the instance is a statement calcml accepts."""
    n = 9
    x, w = cm.params("x", shape=(n,)), cm.params("w", shape=(n - 1,))
    i = cm.index("i", n - 1)
    cost = cm.Cost(cm.sum(w[i] ** 2 * (x[i + 1] - x[i]) ** 2, i), params=[x, w])
    rep = cm.verify(cost)
    assert rep.ok and len(rep) == 3 + 2  # x of 3 entries, w of 2
    f, g = cm.compile(cost).value_and_grad(np.arange(2 * n - 1, dtype=float) / 7)
    xv, wv = np.arange(n) / 7, np.arange(n, 2 * n - 1) / 7
    d = np.diff(xv)
    assert f == pytest.approx(np.sum(wv ** 2 * d ** 2), rel=1e-14)
    gx = np.zeros(n)
    gx[1:] += 2 * wv ** 2 * d
    gx[:-1] -= 2 * wv ** 2 * d
    assert np.allclose(g, np.concatenate([gx, 2 * wv * d ** 2]), rtol=1e-13, atol=1e-15)


def test_two_dimensional_convolution_matches_sympy():
    """A 2x2 filter over a 4x4 image (img[u + a, v + e]), tanh, then a linear read-out: the
    gradient against SymPy's derivatives of the same cost in scalar symbols, on two rows."""
    img = cm.data("img", shape=(4, 4))
    C = cm.params("C", shape=(2, 2))
    W = cm.params("W", shape=(3, 3))
    u, v, a, e = cm.index("u", 3), cm.index("v", 3), cm.index("a", 2), cm.index("e", 2)
    feat = sp.tanh(cm.sum(C[a, e] * img[u + a, v + e], a, e))
    cost = cm.Cost((cm.sum(W[u, v] * feat, u, v) - 1) ** 2, params=[C, W], data=[img], reduce="sum")
    Cs = [[sp.Symbol(f"C{p}{q}") for q in range(2)] for p in range(2)]
    Ws = [[sp.Symbol(f"W{p}{q}") for q in range(3)] for p in range(3)]
    rng = np.random.default_rng(6)
    imgs = rng.standard_normal((2, 4, 4))
    f = 0
    for im in imgs:
        out = sum(Ws[p][q] * sp.tanh(sum(Cs[x][y] * sp.Float(im[p + x, q + y], 30) for x in range(2) for y in range(2)))
                  for p in range(3) for q in range(3))
        f += (out - 1) ** 2
    syms = [s for row in Cs for s in row] + [s for row in Ws for s in row]
    th = 0.5 * rng.standard_normal(len(syms))
    sub = dict(zip(syms, th))
    value, g = cm.compile(cost).value_and_grad(th, {"img": imgs})
    assert value == pytest.approx(float(f.subs(sub)), rel=1e-13)
    assert np.allclose(g, [float(sp.diff(f, s).subs(sub)) for s in syms], rtol=1e-12, atol=1e-13)
