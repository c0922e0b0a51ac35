"""Compiled optimizers against independent oracles.

* known minima (Rosenbrock's (1, 1)), numpy's least squares, a scipy L-BFGS fit of the
  logistic log-loss written in NumPy;
* the published update rules transcribed into plain NumPy, step by step (full batch), and a
  NumPy transcription of a whole minibatch run, shuffle included (SplitMix64 in Python ints);
* the schedules' closed forms, inside the compiled loop;
* divergence, determinism, Ctrl-C, progress, bad inputs.

Compiled programs are shared through module-scoped fixtures: each (cost, optimizer rule,
schedule kind, batching) compiles once per test session.
"""

from __future__ import annotations

import _thread
import math
import threading

from functools import partial

import numpy as np
import pytest
import scipy.optimize
import sympy as sp

import calcml as cm
from calcml import result as R
from problems import BY_NAME

ROSEN = BY_NAME["rosenbrock"].cost
LINREG = BY_NAME["linreg"].cost  # w0 w1 w2 b ; x0 x1 x2 y ; mean of squared residuals
LOGISTIC = BY_NAME["logistic"].cost  # softplus(z) - y z, z = w.x + b


def rosen_f(p):
    a, b = p
    return (1 - a) ** 2 + 100 * (b - a * a) ** 2


def rosen_grad(p):
    a, b = p
    return np.array([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)])


@pytest.fixture(scope="module")
def linreg_data():
    rng = np.random.default_rng(42)
    X = rng.normal(size=(120, 3))
    y = X @ np.array([1.5, -2.0, 0.5]) + 0.7 + 0.1 * rng.normal(size=120)
    data = {"x0": X[:, 0], "x1": X[:, 1], "x2": X[:, 2], "y": y}
    A = np.column_stack([X, np.ones(len(y))])
    exact = np.linalg.lstsq(A, y, rcond=None)[0]
    return data, A, y, exact


def linreg_cost(theta, A, y):
    r = A @ theta - y
    return float(np.mean(r * r))


@pytest.fixture(scope="module")
def logistic_data():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(150, 3))
    z = X @ np.array([1.0, -1.5, 0.5]) - 0.3
    y = (rng.random(150) < 1 / (1 + np.exp(-z))).astype(float)
    return {"x0": X[:, 0], "x1": X[:, 1], "x2": X[:, 2], "y": y}, np.column_stack([X, np.ones(150)]), y


# --------------------------------------------------------------------------------------------
# Rosenbrock: every method that can reaches (1, 1)
# --------------------------------------------------------------------------------------------
ROSEN_RUNS = {
    # method -> (optimizer, schedule, maxiter, how close to (1, 1))
    "gd": (cm.optim.gd(lr=1e-3), None, 100_000, 1e-6),
    "momentum": (cm.optim.momentum(lr=1e-3, momentum=0.9), None, 50_000, 1e-6),
    "nesterov": (cm.optim.nesterov(lr=1e-3, momentum=0.9), None, 50_000, 1e-6),
    "adam": (cm.optim.adam(lr=1e-3), None, 50_000, 1e-6),
    "adagrad": (cm.optim.adagrad(lr=0.5), None, 50_000, 1e-6),
    # RMSProp's steps do not shrink with the gradient: it needs a decaying rate to settle
    "rmsprop": (cm.optim.rmsprop(lr=1e-3), cm.schedules.exponential(1e-3, decay=0.9999), 50_000, 1e-4),
    "newton": (cm.optim.newton(), None, 200, 1e-8),
    "lbfgs": (cm.optim.lbfgs(), None, 1000, 1e-8),
}


@pytest.fixture(scope="module")
def rosen_programs():
    return {name: cm.generate(ROSEN, method=opt, schedule=sched) for name, (opt, sched, _, _) in ROSEN_RUNS.items()}


@pytest.mark.parametrize("name", list(ROSEN_RUNS))
def test_rosenbrock_minimum(rosen_programs, name):
    _, _, maxiter, close = ROSEN_RUNS[name]
    res = rosen_programs[name].run([-1.2, 1.0], maxiter=maxiter, tol=1e-9)
    assert np.all(np.isfinite(res.x))
    assert np.max(np.abs(res.x - 1.0)) < close, (name, res)
    assert res.fun == pytest.approx(rosen_f(res.x), rel=1e-12, abs=1e-300)
    assert res.grad_norm == pytest.approx(np.linalg.norm(rosen_grad(res.x)), rel=1e-9, abs=1e-13)  # cancellation near 0
    if name in ("gd", "momentum", "nesterov", "adam", "newton", "lbfgs", "adagrad"):
        assert res.success and res.status == R.CONVERGED, res.message
    assert set(res.params) == {"a", "b"}


# --------------------------------------------------------------------------------------------
# Update rules step by step against NumPy transcriptions of the published rules
# --------------------------------------------------------------------------------------------
def numpy_trajectory(name, hyper, lr, x0, steps):
    """Iterates x_0..x_steps of the published rule, in plain NumPy (lr: function of t)."""
    x = np.array(x0, dtype=float)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    out = [x.copy()]
    for t in range(steps):
        g = rosen_grad(x)
        if name == "gd":
            x = x - lr(t) * g
        elif name == "momentum":  # Polyak heavy ball, optax trace form
            m = hyper["momentum"] * m + g
            x = x - lr(t) * m
        elif name == "nesterov":  # Sutskever et al. 2013 / optax nesterov=True
            m = hyper["momentum"] * m + g
            x = x - lr(t) * (g + hyper["momentum"] * m)
        elif name == "adam":  # Kingma & Ba 2015, Algorithm 1
            b1, b2, eps = hyper["b1"], hyper["b2"], hyper["eps"]
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            mhat = m / (1 - b1 ** (t + 1))
            vhat = v / (1 - b2 ** (t + 1))
            x = x - lr(t) * mhat / (np.sqrt(vhat) + eps)
        elif name == "rmsprop":  # Tieleman & Hinton 2012 / torch.optim.RMSprop
            v = hyper["decay"] * v + (1 - hyper["decay"]) * g * g
            x = x - lr(t) * g / (np.sqrt(v) + hyper["eps"])
        elif name == "adagrad":  # Duchi et al. 2011 / torch.optim.Adagrad
            v = v + g * g
            x = x - lr(t) * g / (np.sqrt(v) + hyper["eps"])
        out.append(x.copy())
    return out


@pytest.mark.parametrize("name", ["gd", "momentum", "nesterov", "adam", "rmsprop", "adagrad"])
def test_update_rule_step_by_step(rosen_programs, name):
    opt, sched, _, _ = ROSEN_RUNS[name]
    lr = sched if sched is not None else (lambda t: opt.lr)
    x0 = [-1.2, 1.0]
    want = numpy_trajectory(name, opt.hyper, lr, x0, 20)
    prog = rosen_programs[name]
    for k in range(1, 21):
        res = prog.run(x0, maxiter=k, tol=0.0)
        assert res.nit == k
        np.testing.assert_allclose(res.x, want[k], rtol=1e-12, atol=1e-14, err_msg=f"{name} step {k}")
    # the history holds the cost at each iterate, x0's first, the last one's last
    np.testing.assert_allclose(res.history, [rosen_f(x) for x in want[:21]], rtol=1e-12)


def splitmix_shuffles(seed, n, epochs):
    """The row orders of the generated loop, in Python integers (SplitMix64 + Fisher-Yates)."""
    mask = (1 << 64) - 1
    state = seed
    perm = list(range(n))
    orders = []
    for _ in range(epochs):
        for i in range(n - 1, 0, -1):
            state = (state + 0x9E3779B97F4A7C15) & mask
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            z = z ^ (z >> 31)
            k = z % (i + 1)
            perm[i], perm[k] = perm[k], perm[i]
        orders.append(list(perm))
    return orders


def numpy_nesterov_epochs(A, y, batch, epochs, lr, mom, seed):
    """Minibatch Nesterov on the linear least-squares cost, transcribed in NumPy: the
    parameters at each epoch's end, and each epoch's mean minibatch cost."""
    n = len(y)
    x = np.zeros(A.shape[1])
    m = np.zeros(A.shape[1])
    xs, means = [], []
    for order in splitmix_shuffles(seed, n, epochs):
        total = 0.0
        for start in range(0, n, batch):
            rows = np.array(order[start:start + batch])
            r = A[rows] @ x - y[rows]
            total += np.sum(r * r)
            g = 2 * A[rows].T @ r / len(rows)
            m = mom * m + g
            x = x - lr * (g + mom * m)
        xs.append(x)
        means.append(total / n)
    return xs, means


def test_minibatch_nesterov_against_numpy(linreg_data):
    """A whole minibatch run, shuffles and the short last batch included, in NumPy."""
    data, A, y, _ = linreg_data
    batch, epochs, lr, mom = 16, 3, 0.01, 0.9  # 120 rows: 7 batches of 16, one of 8
    res = cm.minimize(LINREG, np.zeros(4), data=data, method=cm.optim.nesterov(lr=lr, momentum=mom),
                      batch_size=batch, epochs=epochs, seed=123)
    xs, means = numpy_nesterov_epochs(A, y, batch, epochs, lr, mom, 123)
    np.testing.assert_allclose(res.x, xs[-1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(res.history, means, rtol=1e-12)
    assert res.nit == epochs * 8
    # three epochs are far from the minimum: spent, not a success (the gradient is above its noise)
    gn, noise = np.linalg.norm(linreg_grad(xs[-1], A, y)), numpy_gradient_noise(xs[-1], A, y)
    assert gn > 3 * noise
    assert not res.success and res.status == R.EPOCHS_DONE, res.message
    assert f"sampling noise ({noise:.3g})" in res.message and "not yet at a minimum" in res.message


def linreg_grad(x, A, y):
    return 2 * A.T @ (A @ x - y) / len(y)


def numpy_gradient_noise(x, A, y):
    """The standard error of the mean gradient, from every row's exact gradient 2 r_i a_i."""
    G = 2 * (A @ x - y)[:, None] * A
    return float(np.sqrt(np.sum(np.var(G, axis=0, ddof=1)) / len(y)))


def test_a_spent_budget_is_a_success_only_within_the_gradients_noise(linreg_data):
    """A run that spends its budget found the minimum when its full gradient is within the
    sampling noise of the gradient (the standard error of a mean of the rows' exact gradients,
    computed here in NumPy from all 120 rows): then success, status WITHIN_NOISE; above it,
    not (MAXITER, EPOCHS_DONE); both statuses against the NumPy criterion, across budgets."""
    data, A, y, exact = linreg_data
    seen = set()
    for maxiter in (5, 20, 40, 60, 80, 120, 160):
        res = cm.minimize(LINREG, np.zeros(4), data=data, method="gd", lr=0.05, maxiter=maxiter)
        gn, noise = np.linalg.norm(linreg_grad(res.x, A, y)), numpy_gradient_noise(res.x, A, y)
        assert res.grad_norm == pytest.approx(gn, rel=1e-9) and res.nit == maxiter
        if abs(gn - noise) < 0.02 * noise:
            continue  # too close to call against the estimate's rounding
        expect = R.WITHIN_NOISE if gn <= noise else R.MAXITER
        assert res.status == expect and res.success == (expect == R.WITHIN_NOISE), (maxiter, gn, noise, res.message)
        assert f"{noise:.3g}" in res.message
        seen.add(expect)
    assert seen == {R.WITHIN_NOISE, R.MAXITER}  # both cases were met
    # a cost without data has no noise: a spent budget is no success
    rosen = cm.minimize(ROSEN, [-1.2, 1.0], method="gd", lr=1e-3, maxiter=100)
    assert rosen.status == R.MAXITER and not rosen.success and "noise" not in rosen.message


def test_gradient_noise_estimate_against_numpy():
    """result.gradient_noise: exact from every row up to NOISE_SAMPLE rows; from a seeded sample
    beyond (within the estimate's own error), for mean and sum costs."""
    rng = np.random.default_rng(8)
    for n in (50, 256, 5000):
        G = rng.standard_normal((n, 3)) * [1.0, 3.0, 0.2] + [5.0, -1.0, 0.0]
        exact = np.sqrt(np.sum(np.var(G, axis=0, ddof=1)) / n)
        got = R.gradient_noise(lambda i: G[i], n, reduce_mean=True)
        got_sum = R.gradient_noise(lambda i: G[i], n, reduce_mean=False)
        rel = 1e-12 if n <= R.NOISE_SAMPLE else 0.15
        assert got == pytest.approx(exact, rel=rel) and got_sum == pytest.approx(exact * n, rel=rel)
    assert math.isnan(R.gradient_noise(lambda i: np.ones(2), 1, True))


@pytest.mark.parametrize("tol", [0.3, 0.05])
def test_minibatch_tol_on_the_full_gradient_at_epoch_ends(linreg_data, tol):
    """Minibatch runs stop at the first epoch's end where the full gradient's norm is at most
    tol: the epoch the NumPy transcription names, at its point; tol=0 runs every epoch."""
    data, A, y, _ = linreg_data
    batch, epochs, lr, mom = 16, 40, 0.01, 0.9
    xs, _ = numpy_nesterov_epochs(A, y, batch, epochs, lr, mom, 7)
    norms = [np.linalg.norm(2 * A.T @ (A @ x - y) / len(y)) for x in xs]
    first = next(k for k, gn in enumerate(norms) if gn <= tol)  # epoch index, from 0
    assert 0 < first < epochs - 1 and norms[first - 1] > tol  # the case is not trivial
    opt = cm.optim.nesterov(lr=lr, momentum=mom)
    res = cm.minimize(LINREG, np.zeros(4), data=data, method=opt, batch_size=batch, epochs=epochs, seed=7, tol=tol)
    assert res.status == R.CONVERGED and res.success, res.message
    assert res.nit == (first + 1) * 8 and len(res.history) == first + 1
    np.testing.assert_allclose(res.x, xs[first], rtol=1e-12, atol=1e-14)
    assert res.grad_norm == pytest.approx(norms[first], rel=1e-10)
    assert "Converged" in res.message
    full = cm.minimize(LINREG, np.zeros(4), data=data, method=opt, batch_size=batch, epochs=epochs, seed=7, tol=0.0)
    np.testing.assert_allclose(full.x, xs[-1], rtol=1e-12, atol=1e-14)
    within = norms[-1] <= numpy_gradient_noise(xs[-1], A, y)  # 40 epochs: the noise floor
    assert within and full.status == R.WITHIN_NOISE and full.success and full.nit == epochs * 8


# --------------------------------------------------------------------------------------------
# Linear regression against numpy's least squares; logistic regression against scipy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gd", "newton", "lbfgs"])
def test_linreg_full_batch_matches_lstsq(linreg_data, method):
    data, A, y, exact = linreg_data
    lr = "auto" if method == "gd" else None
    res = cm.minimize(LINREG, np.zeros(4), data=data, method=method, lr=lr, maxiter=20_000, tol=1e-10)
    assert res.success, res.message
    np.testing.assert_allclose(res.x, exact, rtol=0, atol=1e-8)
    if method == "gd":
        assert any("lr='auto' chose lr=" in note for note in res.notes)
        # the chosen rate is 1/L, L >= the largest eigenvalue of the Hessian 2 A^T A / n
        lam = np.linalg.eigvalsh(2 * A.T @ A / len(y)).max()
        assert 0 < res.lr <= 1 / lam


STOCHASTIC = {
    "sgd": cm.optim.sgd(lr=0.05),
    "momentum": cm.optim.momentum(lr=0.01, momentum=0.9),
    "nesterov": cm.optim.nesterov(lr=0.01, momentum=0.9),
    "adam": cm.optim.adam(lr=0.02),
    "rmsprop": cm.optim.rmsprop(lr=0.01),
    "adagrad": cm.optim.adagrad(lr=0.5),
}


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_linreg_minibatch_close_to_lstsq(linreg_data, name):
    data, A, y, exact = linreg_data
    opt = STOCHASTIC[name]
    epochs, batch = 60, 12
    steps = epochs * math.ceil(len(y) / batch)
    sched = cm.schedules.cosine(opt.lr, steps=steps)  # decay to 0: the noise floor vanishes
    res = cm.minimize(LINREG, np.zeros(4), data=data, method=opt, schedule=sched, batch_size=batch,
                      epochs=epochs, seed=3)
    best = linreg_cost(exact, A, y)
    # the decayed rate ends within the gradient's sampling noise: a minimum, to the data's precision
    assert np.linalg.norm(linreg_grad(res.x, A, y)) <= numpy_gradient_noise(res.x, A, y)
    assert res.success and res.status == R.WITHIN_NOISE, res.message
    assert res.fun == pytest.approx(linreg_cost(res.x, A, y), rel=1e-12)
    assert (res.fun - best) / best < 1e-3, (name, res.fun, best)
    assert len(res.history) == epochs


@pytest.mark.parametrize("method", ["lbfgs", "newton"])
def test_logistic_matches_scipy(logistic_data, method):
    data, A, y = logistic_data

    def f_and_g(theta):
        z = A @ theta
        f = np.mean(np.logaddexp(0, z) - y * z)
        g = A.T @ (1 / (1 + np.exp(-z)) - y) / len(y)
        return f, g

    ref = scipy.optimize.minimize(f_and_g, np.zeros(4), jac=True, method="L-BFGS-B",
                                  options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000})
    res = cm.minimize(LOGISTIC, np.zeros(4), data=data, method=method, tol=1e-10)
    assert res.success, res.message
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-6, atol=1e-7)
    assert res.fun == pytest.approx(ref.fun, rel=1e-10)


# --------------------------------------------------------------------------------------------
# Schedules: closed forms, and the same rates inside the compiled loop
# --------------------------------------------------------------------------------------------
SCHEDULES = {
    "constant": (cm.schedules.constant(0.1), lambda t: 0.1),
    "step": (cm.schedules.step(0.1, every=3, factor=0.5), lambda t: 0.1 * 0.5 ** (t // 3)),
    "exponential": (cm.schedules.exponential(0.1, decay=0.9), lambda t: 0.1 * 0.9**t),
    "inverse_time": (cm.schedules.inverse_time(0.1, decay=0.5), lambda t: 0.1 / (1 + 0.5 * t)),
    "cosine": (cm.schedules.cosine(0.1, steps=10, final=0.01),
               lambda t: 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * min(t, 10) / 10))),
    "warmup": (cm.schedules.warmup(cm.schedules.exponential(0.1, decay=0.9), steps=4),
               lambda t: t / 4 * 0.1 if t < 4 else 0.1 * 0.9 ** (t - 4)),
    "warmup_cosine": (cm.schedules.warmup(cm.schedules.cosine(0.1, steps=8), steps=3),
                      lambda t: t / 3 * 0.1 if t < 3 else 0.05 * (1 + math.cos(math.pi * min(t - 3, 8) / 8))),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_closed_form(name):
    sched, want = SCHEDULES[name]
    for t in range(25):
        assert sched(t) == pytest.approx(want(t), rel=1e-14, abs=1e-300)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("form", ["scalar", "tensor"])
def test_schedule_in_compiled_loop(name, form):
    """gd on a bowl, (x - 3)^2 / 2: x_{t+1} = x_t - lr(t) (x_t - 3), transcribed; the scalar
    loop and the tensor loop each print the schedule's rate expression."""
    sched, want = SCHEDULES[name]
    if form == "scalar":
        u = cm.params("u")
        bowl = cm.Cost((u - 3) ** 2 / 2, params=[u])
    else:
        w, k = cm.params("w", shape=(1,)), cm.index("k", 1)
        bowl = cm.Cost(cm.sum((w[k] - 3) ** 2, k) / 2, params=[w])
    res = cm.minimize(bowl, [0.0], method="gd", schedule=sched, maxiter=15, tol=0.0)
    x = 0.0
    for t in range(15):
        x = x - want(t) * (x - 3)
    assert res.x[0] == pytest.approx(x, rel=1e-13)


def test_one_compiled_loop_serves_a_rate_sweep(rosen_programs):
    """Rates are arguments: another lr reuses the module (no new source, same file)."""
    prog1 = cm.generate(ROSEN, method="gd", lr=1e-3)
    prog2 = cm.generate(ROSEN, method="gd", lr=5e-4)
    assert prog1.path == prog2.path and prog1.module is prog2.module
    r1 = prog1.run([-1.2, 1.0], maxiter=10, tol=0.0)
    r2 = prog2.run([-1.2, 1.0], maxiter=10, tol=0.0)
    np.testing.assert_allclose(r1.x, numpy_trajectory("gd", {}, lambda t: 1e-3, [-1.2, 1.0], 10)[-1], rtol=1e-13)
    np.testing.assert_allclose(r2.x, numpy_trajectory("gd", {}, lambda t: 5e-4, [-1.2, 1.0], 10)[-1], rtol=1e-13)


# --------------------------------------------------------------------------------------------
# Determinism, divergence, Ctrl-C, progress
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adam_minibatch():
    return cm.generate(LINREG, method=cm.optim.adam(lr=0.01), batch_size=16)


def test_same_seed_bit_identical(adam_minibatch, linreg_data):
    data = linreg_data[0]
    a = adam_minibatch.run(np.zeros(4), data, epochs=5, seed=11)
    b = adam_minibatch.run(np.zeros(4), data, epochs=5, seed=11)
    c = adam_minibatch.run(np.zeros(4), data, epochs=5, seed=12)
    assert a.x.tobytes() == b.x.tobytes() and a.history.tobytes() == b.history.tobytes()
    assert a.x.tobytes() != c.x.tobytes()


def test_segmenting_does_not_change_the_bits(adam_minibatch, linreg_data):
    """The run resumes exactly between segments: 1-step segments give the one-call bits."""
    data = linreg_data[0]
    cols = tuple(data[k] for k in LINREG.data_names)
    kw = dict(hyper=dict(adam_minibatch.optimizer.hyper), schedule_args=[0.01], batch_size=16, epochs=3, seed=5)
    whole = adam_minibatch.module.run(np.zeros(4), cols, first_segment=10**9, **kw)
    steps = adam_minibatch.module.run(np.zeros(4), cols, first_segment=1, **kw)
    assert whole["x"].tobytes() == steps["x"].tobytes()
    assert whole["history"].tobytes() == steps["history"].tobytes()


def test_divergence_returns_best_point(rosen_programs):
    prog = cm.generate(ROSEN, method="gd", lr=0.01)  # far too large for Rosenbrock
    res = prog.run([-1.2, 1.0], maxiter=1000)
    assert not res.success and res.status == R.DIVERGED
    assert "Diverged at iteration" in res.message and "smaller learning rate" in res.message
    assert "lr=0.001" in res.message  # the suggestion
    assert np.all(np.isfinite(res.x)) and np.isfinite(res.fun)
    assert res.fun <= rosen_f([-1.2, 1.0])
    assert res.fun == pytest.approx(rosen_f(res.x), rel=1e-12)
    assert res.nit < 1000


@pytest.mark.parametrize("name, lr", [("gd", 0.0062), ("momentum", 0.0044), ("nesterov", 0.0064)])
def test_divergence_stops_at_once_with_the_best_point(name, lr):
    """A step whose cost blows up (beyond 1e10 max(1, J(x0))) or is not finite, or whose squared
    gradient norm is not finite, stops the run there: nit is that step, x the evaluated iterate of lowest cost (NumPy transcription), the
    history ends at it, in one call or in segments of 1 and 3 steps."""
    hyper = {"momentum": 0.9} if name != "gd" else {}
    opt = getattr(cm.optim, name)(lr=lr, **hyper)
    with np.errstate(all="ignore"):
        xs = numpy_trajectory(name, hyper, lambda t: lr, [-1.2, 1.0], 200)
        fs = [rosen_f(x) if np.all(np.isfinite(x)) else np.nan for x in xs]
        gn2 = [float(np.sum(rosen_grad(x) ** 2)) for x in xs]  # inf once |g| passes ~1e154
    blowup = 1e10 * max(1.0, fs[0])
    stop = next(k for k in range(len(xs)) if not (abs(fs[k]) <= blowup and gn2[k] < np.inf))
    best = int(np.argmin(fs[:stop]))
    assert stop > 3 and best > 0  # the cases: a few steps down, then up
    prog = cm.generate(ROSEN, method=opt)
    res = prog.run([-1.2, 1.0], maxiter=1000, tol=0.0)
    assert res.status == R.DIVERGED and res.nit == stop
    np.testing.assert_allclose(res.x, xs[best], rtol=1e-12)
    assert f"(iteration {best}, cost" in res.message
    np.testing.assert_allclose(res.history, fs[:stop + 1], rtol=1e-12)  # every step, the last one too
    for segment in (1, 3):
        out = prog.module.run(np.array([-1.2, 1.0]), None, hyper=dict(opt.hyper), schedule_args=[lr], maxiter=1000,
                              tol=0.0, first_segment=segment)
        assert out["nit"] == stop and out["x"].tobytes() == res.x.tobytes()
        assert out["history"].tobytes() == res.history.tobytes()


def test_long_history_is_subsampled(rosen_programs):
    res = rosen_programs["gd"].run([-1.2, 1.0], maxiter=25_000, tol=0.0)
    assert res.history_every == 3 and len(res.history) == 25_000 // 3 + 2  # steps 0, 3, …, 24_999 and the last
    assert res.history[1] == pytest.approx(rosen_f(numpy_trajectory("gd", {}, lambda t: 1e-3, [-1.2, 1.0], 3)[3]), rel=1e-12)
    assert res.history[-1] == res.fun


def test_divergence_minibatch(linreg_data):
    data = linreg_data[0]
    res = cm.minimize(LINREG, np.zeros(4), data=data, method="sgd", lr=50.0, batch_size=16, epochs=5)
    assert res.status == R.DIVERGED and "Diverged at iteration" in res.message
    np.testing.assert_array_equal(res.x, np.zeros(4))  # no epoch finished: the best point is x0


def test_interrupt_from_callback_returns_best_point(rosen_programs):
    prog = rosen_programs["gd"]
    calls = []

    def callback(step, total, value):
        calls.append(step)
        raise KeyboardInterrupt

    out = prog.module.run(np.array([-1.2, 1.0]), None, hyper={}, schedule_args=[1e-3], maxiter=10**6, tol=0.0,
                          callback=callback, first_segment=100)
    assert out["status"] == R.INTERRUPTED and calls == [100]
    assert out["nit"] == 100
    assert out["fun"] == pytest.approx(rosen_f(out["x"]), rel=1e-12)
    assert out["fun"] <= rosen_f([-1.2, 1.0])


def test_ctrl_c_during_a_long_run(rosen_programs):
    """A real KeyboardInterrupt in the main thread during minimize: the best point comes back."""
    rosen_programs["gd"].run([-1.2, 1.0], maxiter=1)  # compiled before the clock starts
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    try:
        res = cm.minimize(ROSEN, [-1.2, 1.0], method="gd", lr=1e-5, maxiter=10**10, tol=0.0)
    finally:
        timer.cancel()
    assert res.status == R.INTERRUPTED and not res.success
    assert "Interrupted" in res.message
    assert 0 < res.nit < 10**10
    assert res.fun < rosen_f([-1.2, 1.0])


def test_progress_bar(rosen_programs, capsys):
    res = cm.minimize(ROSEN, [-1.2, 1.0], method="gd", lr=1e-3, maxiter=2000, progress=True)
    err = capsys.readouterr().err
    assert "gd [" in err and "cost" in err and err.endswith("\n")
    assert res.nit == 2000
    assert err.rstrip().split("\r")[-1].startswith("gd [" + "#" * 30 + "] 100.0% 2000/2000")


def test_progress_bar_of_a_run_that_ends_early_says_why(capsys):
    """A run that converges before its budget ends on a full bar that says so (it stayed at
    the last redraw's fraction, "8.6% 86/1000")."""
    res = cm.minimize(ROSEN, [0.9, 0.8], method="newton", maxiter=1000, tol=1e-10, progress=True)
    assert res.status == cm.result.CONVERGED and res.nit < 1000
    last = capsys.readouterr().err.rstrip().split("\r")[-1]
    assert last.startswith("newton [" + "#" * 30 + f"] converged at {res.nit}/1000 cost")


def test_result_fields_and_dict_x0(linreg_data):
    """Every field against NumPy: a dict x0 is the array x0; fun, jac and grad_norm are the
    full cost and gradient at x; params names x; history starts at the cost of x0."""
    data, A, y, exact = linreg_data
    x0 = {"b": 0.25, "w0": 0.5, "w1": -0.5, "w2": 1.0}  # any order: by name
    res = cm.minimize(LINREG, x0, data=data, method="lbfgs")
    arr = cm.minimize(LINREG, np.array([0.5, -0.5, 1.0, 0.25]), data=data, method="lbfgs")
    np.testing.assert_array_equal(res.x, arr.x)
    assert res.nit == arr.nit and res.fun == arr.fun
    assert list(res.params) == ["w0", "w1", "w2", "b"] and list(res.params.values()) == res.x.tolist()
    assert res.fun == pytest.approx(linreg_cost(res.x, A, y), rel=1e-12)
    np.testing.assert_allclose(res.jac, 2 * A.T @ (A @ res.x - y) / len(y), rtol=1e-9, atol=1e-13)
    assert res.grad_norm == pytest.approx(np.linalg.norm(res.jac), rel=1e-12)
    assert res.history[0] == pytest.approx(linreg_cost(np.array([0.5, -0.5, 1.0, 0.25]), A, y), rel=1e-12)
    assert res.success and res.status == R.CONVERGED and res.grad_norm <= 1e-8
    np.testing.assert_allclose(res.x, exact, atol=1e-8)
    assert "success: True" in repr(res) and res.message in repr(res)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: cm.optim.adam(lr=-1.0), r"positive lr, got lr=-1.0"),
        (lambda: cm.optim.momentum(momentum=1.5), r"momentum=1.5"),
        (lambda: cm.optim.adam(b1=1.0), r"b1=1.0"),
        (lambda: cm.optim.adam(lr=float("nan")), r"finite"),
        (lambda: cm.optim.lbfgs(memory=0), r"memory=0"),
        (lambda: cm.optim.lbfgs(c1=0.9, c2=0.5), r"c1 < c2"),
        (lambda: cm.schedules.step(0.1, every=0), r"every=0"),
        (lambda: cm.schedules.exponential(0.1, decay=1.5), r"decay=1.5"),
        (lambda: cm.schedules.cosine(0.1, steps=2.5), r"steps=2.5"),
        (lambda: cm.schedules.warmup(0.1, steps=3), r"warmup wraps a schedule"),
        (lambda: cm.optim.gd(lr="fast"), r"lr='fast'"),
    ],
)
def test_bad_hyperparameters_refused_at_construction(make, match):
    with pytest.raises(cm.OptimizeError, match=match):
        make()


def test_bad_minimize_inputs(linreg_data):
    data = linreg_data[0]
    with pytest.raises(cm.OptimizeError, match="unknown method 'adamw'"):
        cm.minimize(ROSEN, [0.0, 0.0], method="adamw")
    with pytest.raises(cm.OptimizeError, match="stochastic method"):
        cm.minimize(ROSEN, [0.0, 0.0], method="sgd")
    with pytest.raises(cm.OptimizeError, match="no data columns"):
        cm.minimize(ROSEN, [0.0, 0.0], method="adam", batch_size=4)
    with pytest.raises(cm.OptimizeError, match=r"batch_size=500 is larger than the data \(120 rows\)"):
        cm.minimize(LINREG, np.zeros(4), data=data, method="sgd", batch_size=500)
    with pytest.raises(cm.OptimizeError, match="batch_size must be a positive integer"):
        cm.minimize(LINREG, np.zeros(4), data=data, method="sgd", batch_size=0)
    with pytest.raises(cm.OptimizeError, match="newton works on the full batch"):
        cm.minimize(LINREG, np.zeros(4), data=data, method="newton", batch_size=8)
    with pytest.raises(cm.OptimizeError, match="it takes no other lr"):
        cm.minimize(ROSEN, [0.0, 0.0], method="lbfgs", lr=0.1)
    with pytest.raises(cm.OptimizeError, match="it takes no other lr"):
        cm.minimize(ROSEN, [0.0, 0.0], method=cm.optim.newton(), lr=2.0)
    # lr=1 is the full step these methods start from: accepted, the same run as without it
    for method in ("newton", "lbfgs"):
        a = cm.minimize(ROSEN, [-1.2, 1.0], method=method, lr=1.0)
        b = cm.minimize(ROSEN, [-1.2, 1.0], method=method)
        assert a.success and np.array_equal(a.x, b.x) and a.nit == b.nit
    with pytest.raises(cm.OptimizeError, match="schedule must be an object"):
        cm.minimize(ROSEN, [0.0, 0.0], method="gd", schedule=0.1)
    with pytest.raises(cm.OptimizeError, match="lr='auto'"):
        cm.minimize(ROSEN, [0.0, 0.0], method="gd", lr="auto", schedule=cm.schedules.constant(0.1))
    with pytest.raises(cm.ParamError, match=r"shape \(2,\)"):
        cm.minimize(ROSEN, [0.0, 0.0, 0.0], method="gd")
    with pytest.raises(cm.ParamError, match="missing parameter 'b'"):
        cm.minimize(ROSEN, {"a": 0.0}, method="gd")
    with pytest.raises(cm.ParamError, match="'c', not parameters"):
        cm.minimize(ROSEN, {"a": 0.0, "b": 0.0, "c": 1.0}, method="gd")
    with pytest.raises(cm.ParamError, match="must be finite"):
        cm.minimize(ROSEN, [np.nan, 0.0], method="gd")
    with pytest.raises(cm.DataError, match="no data columns"):
        cm.minimize(ROSEN, [0.0, 0.0], data={"x": [1.0]}, method="gd")
    with pytest.raises(cm.DataError, match="needs data"):
        cm.minimize(LINREG, np.zeros(4), method="gd")
    bad = dict(data, y=np.where(np.arange(120) == 7, np.nan, data["y"]))
    with pytest.raises(cm.DataError, match="'y'.*row 7"):
        cm.minimize(LINREG, np.zeros(4), data=bad, method="gd")
    with pytest.raises(cm.OptimizeError, match="epochs must be"):
        cm.minimize(LINREG, np.zeros(4), data=data, method="sgd", epochs=2.5)
    with pytest.raises(cm.OptimizeError, match="seed must be"):
        cm.minimize(LINREG, np.zeros(4), data=data, method="sgd", seed=-1)
    with pytest.raises(cm.OptimizeError, match="tol must be"):
        cm.minimize(ROSEN, [0.0, 0.0], method="gd", tol=-1.0)
    small = {k: v[:10] for k, v in data.items()}
    with pytest.raises(cm.OptimizeError, match=r"batch_size=32 \(sgd's default\) is larger than the data \(10 rows\)"):
        cm.minimize(LINREG, np.zeros(4), data=small, method="sgd")
    u = cm.params("u")
    with pytest.raises(cm.ParamError, match="the cost at x0 is nan"):
        cm.minimize(cm.Cost(sp.log(u), params=[u]), [-1.0], method="gd")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_x0_array_refused_first(rosen_programs, bad):
    """A float64 array x0 of the right shape goes to the compiled loop unchecked (its entries
    are checked there); a non-finite entry is still refused by name, before the other inputs'
    errors, and also where the cost would be finite there."""
    prog = rosen_programs["gd"]
    x0 = np.array([1.0, bad])
    with pytest.raises(cm.ParamError, match=rf"x0\[1\] \(parameter 'b'\) is {bad}"):
        prog.run(x0)
    for kw in (dict(tol=-1.0), dict(maxiter=-1), dict(epochs=0), dict(seed=-1), dict(progress=1)):
        with pytest.raises(cm.ParamError, match="must be finite"):
            prog.run(x0, **kw)
    with pytest.raises(cm.ParamError, match="must be finite"):
        cm.minimize(ROSEN, x0, data={"x": [1.0]}, method="gd")
    u = cm.params("u")
    flat = cm.Cost(cm.sigmoid(u), params=[u])  # finite (1) at u = +inf
    with pytest.raises(cm.ParamError, match=r"x0\[0\] \(parameter 'u'\) is inf"):
        cm.minimize(flat, np.array([np.inf]), method="gd", maxiter=3)


def test_result_message_and_params_made_when_read(rosen_programs):
    """A run's result formats its message and params dict on first read; pickle, copy and
    dataclasses see every field."""
    import copy
    import dataclasses
    import pickle

    res = rosen_programs["gd"].run([-1.2, 1.0], maxiter=10, tol=0.0)
    twin = copy.deepcopy(res)
    assert twin.message == res.message and "Maximum number of iterations reached (10)" in res.message
    assert res.params == {"a": res.x[0], "b": res.x[1]}
    back = pickle.loads(pickle.dumps(rosen_programs["gd"].run([-1.2, 1.0], maxiter=10, tol=0.0)))
    assert back.message == res.message and back.params == res.params and back.x.tobytes() == res.x.tobytes()
    fields = dataclasses.asdict(rosen_programs["gd"].run([-1.2, 1.0], maxiter=10, tol=0.0))
    assert fields["message"] == res.message and fields["params"] == res.params
    with pytest.raises(AttributeError):
        res.no_such_field


def test_minimize_reuses_its_program_but_follows_the_cache_folder(fresh_cache, monkeypatch, tmp_path):
    """cm.minimize with a method name makes its program once; another cache folder or another
    DELAY_MAX makes another (and the same results)."""
    import importlib

    import calcml.loop as loop

    mz = importlib.import_module("calcml.minimize")  # the module, not the function cm.minimize
    first = cm.minimize(ROSEN, [-1.2, 1.0], method="gd", lr=1e-3, maxiter=50, tol=0.0)
    progs = [p for p in mz._PROGRAMS.values() if p.cost is ROSEN and p.path.parent == fresh_cache]
    assert len(progs) == 1
    again = cm.minimize(ROSEN, [-1.2, 1.0], method="gd", lr=1e-3, maxiter=50, tol=0.0)
    assert again.x.tobytes() == first.x.tobytes()
    assert [p for p in mz._PROGRAMS.values() if p.cost is ROSEN and p.path.parent == fresh_cache] == progs
    other = tmp_path / "other-cache"
    monkeypatch.setenv("CALCML_CACHE_DIR", str(other))
    moved = cm.minimize(ROSEN, [-1.2, 1.0], method="gd", lr=1e-3, maxiter=50, tol=0.0)
    assert moved.x.tobytes() == first.x.tobytes()
    in_other = [p for p in mz._PROGRAMS.values() if p.cost is ROSEN and p.path.parent == other]
    assert len(in_other) == 1
    monkeypatch.setattr(loop, "DELAY_MAX", 0)  # the plain loop: the same bits
    plain = cm.minimize(ROSEN, [-1.2, 1.0], method="gd", lr=1e-3, maxiter=50, tol=0.0)
    assert plain.x.tobytes() == first.x.tobytes() and plain.history.tobytes() == first.history.tobytes()
    # ... from another program: another module file, another loop (so the bits above are two
    # loops' bits, not one loop's twice)
    made = [p for p in mz._PROGRAMS.values() if p.cost is ROSEN and p.path.parent == other and p is not in_other[0]]
    assert len(made) == 1 and made[0].path != in_other[0].path and made[0].source != in_other[0].source


# --------------------------------------------------------------------------------------------
# The exported module: a fresh process with only numpy and numba
# --------------------------------------------------------------------------------------------
_EXPORT_SCRIPT = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('sympy', 'calcml', 'scipy'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import numpy as np
import fit_linreg
data = np.load(sys.argv[2])
cols = {name: data[name] for name in fit_linreg.COLUMN_NAMES}
out = fit_linreg.run(np.zeros(4), cols, epochs=4, seed=9)
import fit_full
full = fit_full.run(np.zeros(4), cols, maxiter=50, tol=0.0)
print(json.dumps({"x": out["x"].tolist(), "fun": out["fun"], "status": out["status_name"],
                  "history": out["history"].tolist(), "full_x": full["x"].tolist(),
                  "mods": sorted(m for m in sys.modules if m.split('.')[0] in ('sympy', 'calcml'))}))
"""


def test_export_runs_standalone(tmp_path, linreg_data):
    import json
    import subprocess
    import sys

    data = linreg_data[0]
    prog = cm.generate(LINREG, method=cm.optim.nesterov(lr=0.02, momentum=0.8),
                       schedule=cm.schedules.exponential(0.02, decay=0.99), batch_size=10)
    path = prog.export(tmp_path / "fit_linreg.py")
    text = path.read_text()
    imports = [line for line in text.splitlines() if line.lstrip().startswith(("import ", "from "))]
    assert imports and not any("sympy" in line or "calcml" in line for line in imports), imports
    full = cm.generate(LINREG, method=cm.optim.momentum(lr=0.05, momentum=0.5))  # full batch, threaded pass
    full.export(tmp_path / "fit_full.py")
    np.savez(tmp_path / "data.npz", **data)
    script = tmp_path / "check.py"
    script.write_text(_EXPORT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "data.npz")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["mods"] == [] and got["status"] == "epochs done"
    mine = prog.run(np.zeros(4), data, epochs=4, seed=9)
    assert np.array(got["x"]).tobytes() == mine.x.tobytes()  # same bits in the fresh process
    assert got["history"] == mine.history.tolist()
    assert got["full_x"] == full.run(np.zeros(4), data, maxiter=50, tol=0.0).x.tolist()


_RUN_PATH_SCRIPT = r"""
import json, runpy, sys
import numpy as np
data = dict(np.load(sys.argv[2]))
out = {}
for name in ("fit_scalar", "fit_tensor"):
    g = runpy.run_path(sys.argv[1] + "/" + name + ".py")  # not importable by name afterwards
    d = data if name == "fit_scalar" else {"X": np.column_stack([data["x"], np.ones(len(data["x"]))]), "y": data["y"]}
    out[name] = g["run"](np.zeros(2), d, maxiter=40)["x"].tolist()
print(json.dumps(out))
"""


def test_an_export_run_by_path_runs_again_in_a_later_process(tmp_path):
    """An exported module loaded with runpy.run_path (or a spec left out of sys.modules) is not
    importable by name when Numba compiles it: Numba's cache, written under the name
    "<dynamic>", broke every later process (ModuleNotFoundError deep in Numba). Such a module
    compiles without the cache; a second process gets the first one's answer."""
    import json
    import subprocess
    import sys

    w, b = cm.params("w b")
    x, y = cm.data("x y")
    cm.generate(cm.Cost((w * x + b - y) ** 2, params=[w, b], data=[x, y]), method="gd", lr=0.3).export(
        tmp_path / "fit_scalar.py")
    W, X = cm.params("W", shape=(2,)), cm.data("X", shape=(2,))
    cm.generate(cm.Cost((cm.dot(W, X) - y) ** 2, params=[W], data=[X, y]), method="adam", lr=0.1).export(
        tmp_path / "fit_tensor.py")
    xs = np.linspace(0.0, 1.0, 50)
    np.savez(tmp_path / "d.npz", x=xs, y=2 * xs + 1)
    script = tmp_path / "check.py"
    script.write_text(_RUN_PATH_SCRIPT)
    got = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "d.npz")],
                              capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr[-2000:]
        got.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert got[0] == got[1]
    assert np.abs(np.array(got[0]["fit_scalar"]) - [2.0, 1.0]).max() < 0.5


def test_array_path_matches_unrolled_path(linreg_data, fresh_cache, monkeypatch):
    """Costs with more than UNROLL_MAX parameters keep them in arrays: same arithmetic, same bits."""
    import calcml.loop as loop

    data = linreg_data[0]
    opt = cm.optim.adam(lr=0.01)
    unrolled = cm.minimize(LINREG, np.zeros(4), data=data, method=opt, batch_size=16, epochs=2, seed=4)
    # with a loose tol, the epoch-end test stops the run after the first epoch
    unrolled_stop = cm.minimize(LINREG, np.zeros(4), data=data, method=opt, batch_size=16, epochs=2, seed=4, tol=1e3)
    unrolled_prog = cm.generate(LINREG, method=opt, batch_size=16)
    monkeypatch.setattr(loop, "UNROLL_MAX", 0)
    prog = cm.generate(LINREG, method=opt, batch_size=16)
    # another module, another loop: the bits below compare two loops, not one loop twice
    assert prog.path != unrolled_prog.path and prog.source != unrolled_prog.source
    arrays = prog.run(np.zeros(4), data, epochs=2, seed=4)
    assert arrays.x.tobytes() == unrolled.x.tobytes()
    assert arrays.history.tobytes() == unrolled.history.tobytes()
    arrays_stop = prog.run(np.zeros(4), data, epochs=2, seed=4, tol=1e3)
    assert unrolled_stop.status == arrays_stop.status == R.CONVERGED
    assert unrolled_stop.nit == arrays_stop.nit == 8  # 120 rows: 8 batches an epoch
    assert arrays_stop.x.tobytes() == unrolled_stop.x.tobytes()


def test_full_batch_threaded_pass_matches_numpy():
    """From PARALLEL_MIN_ROWS rows on, each full-batch step sums on all threads in fixed
    chunks: one thread and two give the same bits, and NumPy's closed-form steps to rounding.
    The thread count is Numba's (numba.set_num_threads), which calcml's threads follow too."""
    import numba

    import calcml.loop as loop

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has one thread here (NUMBA_NUM_THREADS=1): nothing to compare")
    n = loop.PARALLEL_MIN_ROWS + 1234
    rng = np.random.default_rng(5)
    X = rng.normal(size=(n, 3))
    y = X @ np.array([1.0, -1.0, 2.0]) + 0.5 + 0.1 * rng.normal(size=n)
    data = {"x0": X[:, 0], "x1": X[:, 1], "x2": X[:, 2], "y": y}
    A = np.column_stack([X, np.ones(n)])
    method = cm.optim.momentum(lr=0.05, momentum=0.5)
    before = numba.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            runs[threads] = cm.minimize(LINREG, np.zeros(4), data=data, method=method, maxiter=6, tol=0.0)
    finally:
        numba.set_num_threads(before)
    one, two = runs[1], runs[2]
    assert one.x.tobytes() == two.x.tobytes() and one.history.tobytes() == two.history.tobytes()
    assert one.fun == two.fun and one.nit == two.nit == 6
    x, m = np.zeros(4), np.zeros(4)
    for _ in range(6):
        g = 2 * A.T @ (A @ x - y) / n
        m = 0.5 * m + g
        x = x - 0.05 * m
    np.testing.assert_allclose(two.x, x, rtol=1e-12, atol=1e-14)


def test_ctrl_c_in_a_threaded_pass_returns_the_best_point(monkeypatch):
    """A KeyboardInterrupt that lands inside a pass on calcml's threads (called back from the
    compiled loop) stops the run between segments with its state whole: status INTERRUPTED, x
    the best point, fun its cost (NumPy), and the steps before it the same bits as a run that
    was not interrupted."""
    import calcml.loop as loop

    import calcml.program as mz
    n = loop.PARALLEL_MIN_ROWS + 77
    rng = np.random.default_rng(6)
    X = rng.normal(size=(n, 3))
    y = X @ np.array([0.5, 2.0, -1.0]) - 0.25 + 0.1 * rng.normal(size=n)
    data = {"x0": X[:, 0], "x1": X[:, 1], "x2": X[:, 2], "y": y}
    A = np.column_stack([X, np.ones(n)])
    made = mz._threaded_passes
    calls = []

    def counting(cost, cols):
        full = made(cost, cols)

        def counted(theta, g):
            calls.append(1)
            if len(calls) == 7:
                raise KeyboardInterrupt
            return full(theta, g)

        return counted

    whole = cm.minimize(LINREG, np.zeros(4), data=data, method="gd", lr=0.1, maxiter=20, tol=0.0)
    monkeypatch.setattr(mz, "_threaded_passes", counting)
    res = cm.minimize(LINREG, np.zeros(4), data=data, method="gd", lr=0.1, maxiter=20, tol=0.0)
    assert len(calls) > 7 and res.status == R.INTERRUPTED and not res.success
    # the pass that was interrupted is made again: the steps before the stop are the whole run's
    np.testing.assert_array_equal(res.history, whole.history[:len(res.history)])
    assert res.fun == pytest.approx(np.mean((A @ res.x - y) ** 2), rel=1e-12)
    assert res.fun == min(res.history) and 5 <= res.nit < 20


def test_calcml_leaves_its_users_process_alone(tmp_path):
    """Issue 12, item 5: importing calcml sets no environment variable (it set OMP_WAIT_POLICY
    for the whole process), and threaded kernels and fits over large data start no OpenMP or
    other Numba threading layer: the threads are calcml's own."""
    import os
    import subprocess
    import sys

    script = """
import os, numpy as np
before = dict(os.environ)
import calcml as cm
from numba.np.ufunc import parallel
assert dict(os.environ) == before, set(os.environ) ^ set(before)
w = cm.params("w", 2); b = cm.params("b"); x = cm.data("x", 2); y = cm.data("y")
cost = cm.Cost((cm.dot(w, x) + b - y)**2, params=[*w, b], data=[*x, y])
n = 70000
X = np.random.default_rng(0).normal(size=(n, 2))
D = {"x0": X[:, 0], "x1": X[:, 1], "y": X @ [1.0, 2.0] + 3.0}
cm.compile(cost).value_and_grad(np.zeros(3), D)
res = cm.minimize(cost, np.zeros(3), data=D, method="lbfgs")
cm.minimize(cost, np.zeros(3), data=D, method="momentum", lr=0.1, maxiter=5)
assert res.success and np.allclose(res.x, [1, 2, 3])
assert not getattr(parallel, "_is_initialized", False), "a Numba threading layer started"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("state", ["m", "avg", "thetag", "g0", "p1"])
def test_a_new_optimizer_is_one_description(state):
    """An optimizer from outside the registry: state, hyperparameters and a rule of SymPy
    pairs. The rule's symbols are renamed as symbols: a state named like the generator's own
    names (``avg`` holds ``g``, ``g0``/``p1`` are its unrolled locals) means only itself."""
    from calcml.optim import g, lr, theta

    m, beta = sp.symbols(f"{state} beta")
    signed = cm.optim.Optimizer(
        "signum", 0.01, {"beta": 0.5}, state=((state, ("n",), 0.0),),
        update=[(m, beta * m + (1 - beta) * g), (theta, theta - lr * sp.sign(m))],
    )
    u, v = cm.params("u v")
    bowl = cm.Cost((u - 3) ** 2 / 2 + (v + 1) ** 2, params=[u, v])
    res = cm.minimize(bowl, [0.0, 0.0], method=signed, maxiter=10, tol=0.0)
    np.testing.assert_allclose(res.x, [0.1, -0.1], atol=1e-12)  # ten steps of 0.01 towards (3, -1)
    assert cm.minimize(bowl, [0.0, 0.0], method=signed, lr=0.5, maxiter=5, tol=0.0).x[0] == pytest.approx(2.5)
    # the same rule on a tensor cost (its loops print the rule over the parameter array)
    w = cm.params("w", shape=(2,)); k = cm.index("k", 2)
    tbowl = cm.Cost(cm.sum((w[k] - 3) ** 2, k) / 2, params=[w])
    np.testing.assert_allclose(cm.minimize(tbowl, np.zeros(2), method=signed, maxiter=10, tol=0.0).x, [0.1, 0.1],
                               atol=1e-12)


def test_a_rule_with_values_of_its_own_against_numpy():
    """A rule's own values (per update and per parameter), hyperparameters and step, on a
    cost over data, unrolled (2 parameters) and over arrays (70 parameters), against NumPy."""
    from calcml.optim import g, lr, step, theta

    m, beta, decay, rate, mhat = sp.symbols("m beta decay rate mhat")
    opt = cm.optim.Optimizer(
        "decaying", 0.1, {"beta": 0.5, "decay": 0.01}, state=(("m", ("n",), 0.0),),
        per_step=[(rate, lr / (1 + decay * step))],
        update=[(m, beta * m + g), (mhat, m * (1 - beta)), (theta, theta - rate * mhat)],
    )
    rng = np.random.default_rng(3)
    for d in (2, 70):
        X = rng.normal(size=(200, d)); y = X @ rng.normal(size=d)
        w = cm.params(" ".join(f"w{i}" for i in range(d)))
        w = [w] if d == 1 else list(w)
        xs = cm.data(" ".join(f"x{i}" for i in range(d))); ys = cm.data("y")
        cost = cm.Cost((sum(wi * xi for wi, xi in zip(w, xs)) - ys) ** 2, params=w, data=[*xs, ys])
        D = {f"x{i}": X[:, i] for i in range(d)} | {"y": y}
        res = cm.minimize(cost, np.zeros(d), data=D, method=opt, maxiter=15, tol=0.0)
        t, mm = np.zeros(d), np.zeros(d)
        for k in range(15):
            grad = 2 * X.T @ (X @ t - y) / len(y)
            mm = 0.5 * mm + grad
            t = t - 0.1 / (1 + 0.01 * k) * (mm * 0.5)
        np.testing.assert_allclose(res.x, t, rtol=1e-10, atol=1e-12)


def test_optimizer_names_that_the_rules_read_are_refused():
    from calcml.optim import g, lr, theta

    for name in ("g", "j", "theta", "lr", "step", "math", "max", "for"):
        with pytest.raises(cm.OptimizeError, match=rf"the name '{name}' is taken"):
            cm.optim.Optimizer("mine", 0.1, {}, state=((name, ("n",), 0.0),), update=[(theta, theta - lr * g)])


def test_bad_rules_are_refused_with_what_is_wrong():
    from calcml.optim import g, lr, step, theta

    m, beta, other = sp.symbols("m beta other")
    make = partial(cm.optim.Optimizer, "mine", 0.1, {"beta": 0.9}, state=(("m", ("n",), 0.0),))
    with pytest.raises(cm.OptimizeError, match=r"holds the string 'theta\[j\] -= lr \* g\[j\]'.*runs no code"):
        make(update=("theta[j] -= lr * g[j]",))
    with pytest.raises(cm.OptimizeError, match="update reads other, which it cannot"):
        make(update=[(theta, theta - lr * other)])
    with pytest.raises(cm.OptimizeError, match="per_step reads g, which it cannot"):
        make(per_step=[(other, lr * g)], update=[(theta, theta - other)])
    with pytest.raises(cm.OptimizeError, match="update cannot assign 'g'"):
        make(update=[(g, 2 * g), (theta, theta - lr * g)])
    with pytest.raises(cm.OptimizeError, match="update cannot assign 'beta'"):
        make(update=[(beta, 2 * g), (theta, theta - lr * g)])
    with pytest.raises(cm.OptimizeError, match="never assigns theta"):
        make(update=[(m, beta * m + g)])
    with pytest.raises(cm.OptimizeError, match="cannot compile.*undefined function f"):
        make(update=[(theta, theta - lr * sp.Function("f")(g))])
    with pytest.raises(cm.OptimizeError, match="assigns theta a str"):
        make(update=[(theta, "theta - lr*g")])
    # a value is read only after it is assigned
    with pytest.raises(cm.OptimizeError, match="update reads other"):
        make(update=[(theta, theta - lr * other), (other, g)])
    make(update=[(other, step * g), (theta, theta - lr * other)])  # and then it may be


def test_minibatch_of_a_summed_cost_is_scaled_to_the_full_sum():
    """reduce="sum": a minibatch gradient is scaled by N/|B|, an unbiased estimate of the full one."""
    u = cm.params("u")
    x, y = cm.data("x y")
    cost = cm.Cost((u * x - y) ** 2, params=[u], data=[x, y], reduce="sum")
    xs, ys = np.arange(1.0, 6.0), 2 * np.arange(1.0, 6.0) + np.array([0.1, -0.2, 0.0, 0.3, -0.1])
    res = cm.minimize(cost, [0.0], data={"x": xs, "y": ys}, method="sgd", lr=0.001, batch_size=2, epochs=2, seed=8)
    w = 0.0
    sums = []
    for order in splitmix_shuffles(8, 5, 2):
        total = 0.0
        for start in range(0, 5, 2):
            rows = np.array(order[start:start + 2])
            r = w * xs[rows] - ys[rows]
            total += np.sum(r * r)
            w -= 0.001 * (5 / len(rows)) * np.sum(2 * r * xs[rows])
        sums.append(total)
    assert res.x[0] == pytest.approx(w, rel=1e-13)
    np.testing.assert_allclose(res.history, sums, rtol=1e-13)


_FITS = """
import json
import numpy as np
import calcml as cm
w = cm.params("w", 2); b = cm.params("b"); x = cm.data("x", 2); y = cm.data("y")
cost = cm.Cost((cm.dot(w, x) + b - y) ** 2, params=[*w, b], data=[*x, y])
rng = np.random.default_rng(0)
D = {"x0": rng.normal(size=200), "x1": rng.normal(size=200)}
D["y"] = 2 * D["x0"] - D["x1"] + 0.5 + 0.1 * rng.normal(size=200)
out = {}
for method, kw in [("adam", dict(batch_size=16, epochs=2, seed=3)), ("lbfgs", dict(maxiter=50)),
                   ("newton", dict(maxiter=5))]:
    res = cm.minimize(cost, np.zeros(3), data=D, method=method, **kw)
    out[method] = [list(map(float.hex, map(float, res.x))), res.nit, res.status]
"""
# the child: the fits with warnings as errors (the Python run must not warn either), printed
_PYTHON_FIT = 'import warnings\nwarnings.simplefilter("error", RuntimeWarning)\n' + _FITS + "print(json.dumps(out))\n"


def test_numba_disable_jit_runs_the_generated_optimizers_as_python():
    """NUMBA_DISABLE_JIT=1: the generated loops run as Python (shuffles included) and reach
    what the compiled loops reach, with no warning (SplitMix64's uint64 wrap-around)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "PYTHONPATH": root}
    run = subprocess.run([sys.executable, "-c", _PYTHON_FIT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    python = json.loads(run.stdout.strip().splitlines()[-1])
    namespace: dict = {}
    exec(_FITS, namespace)  # the same fits, compiled
    for method, (x, nit, status) in namespace["out"].items():
        px, pnit, pstatus = python[method]
        assert (pnit, pstatus) == (nit, status), method
        # same operations; pow/sqrt from libm either way (Adam's bias correction): a few ulp
        np.testing.assert_allclose(list(map(float.fromhex, px)), list(map(float.fromhex, x)), rtol=1e-13, err_msg=method)


@pytest.mark.parametrize("form", ["scalar", "index"])
def test_separable_classes_have_no_minimum_and_say_so(form):
    """On separable data the logistic loss has its infimum at infinity: lbfgs stops where the
    gradient vanishes, far out; the result is no success and says why (it said "converged" and
    nothing else). With a penalty, or overlapping classes: a minimum, a success."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((200, 2))
    sep = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(float)
    noisy = (X[:, 0] + 0.5 * X[:, 1] + rng.standard_normal(200) > 0).astype(float)
    if form == "scalar":
        w = cm.params("w", 2); b = cm.params("b"); x = cm.data("x", 2); y = cm.data("y")
        z = cm.dot(w, x) + b
        cost = cm.Cost(cm.softplus(z) - y * z, params=[*w, b], data=[*x, y])
        data = lambda labels: {"x0": X[:, 0], "x1": X[:, 1], "y": labels}  # noqa: E731
    else:
        w = cm.params("w", shape=(2,)); b = cm.params("b"); x = cm.data("x", shape=(2,)); y = cm.data("y")
        j = cm.index("j", 2)
        z = cm.dot(w, x) + b
        cost = cm.Cost(cm.softplus(z) - y * z, params=[w, b], data=[x, y])
        data = lambda labels: {"x": X, "y": labels}  # noqa: E731
    res = cm.minimize(cost, np.zeros(3), data=data(sep), method="lbfgs", maxiter=2000)
    assert res.status == cm.result.NO_MINIMUM and not res.success and res.grad_norm <= 1e-8
    assert "no finite minimum" in res.message and "penalty" in res.message
    # the same data with a ridge penalty has a minimum, which lbfgs finds: a success
    pen = cm.Cost(cost.expr, params=cost.params, data=cost.data, reduce="sum",
                  penalty=(sum(p ** 2 for p in w) if form == "scalar" else cm.sum(w[j] ** 2, j)) / 2)
    assert cm.minimize(pen, np.zeros(3), data=data(sep), method="lbfgs").success
    fine = cm.minimize(cost, np.zeros(3), data=data(noisy), method="lbfgs")
    assert fine.success and fine.status == cm.result.CONVERGED


# --------------------------------------------------------------------------------------------
# The loops' machine code, kept by calcml (run_segment_c)
# --------------------------------------------------------------------------------------------
_WARM_FITS = """
import json, sys
import numpy as np
import calcml as cm
from calcml import loop
loop.TIER_UP_SECONDS = 0.0  # line searches compile their loop at once (not the Python tier first)
a, b = cm.params("a b")
ros = cm.Cost((1 - a) ** 2 + 100 * (b - a**2) ** 2, params=[a, b])
w = cm.params("w", 2); x = cm.data("x", 2); y = cm.data("y")
lin = cm.Cost((w[0] * x[0] + w[1] * x[1] - y) ** 2, params=list(w), data=[*x, y])
rng = np.random.default_rng(1)
D = {"x0": rng.normal(size=300), "x1": rng.normal(size=300)}
D["y"] = 2 * D["x0"] - D["x1"]
B = {"x0": rng.normal(size=loop.PARALLEL_MIN_ROWS + 5), "x1": rng.normal(size=loop.PARALLEL_MIN_ROWS + 5)}
B["y"] = B["x0"] + 0.5 * B["x1"] + 0.1 * rng.normal(size=B["x0"].shape[0])
out = {}
for name, cost, data, method, kw in [("gd", ros, None, "gd", dict(lr=1e-3, maxiter=3000)),
                                     ("lbfgs", ros, None, "lbfgs", {}),
                                     ("adam", lin, D, "adam", dict(lr=0.05, batch_size=16, epochs=3, seed=2)),
                                     ("momentum", lin, D, "momentum", dict(lr=0.1, maxiter=50)),
                                     ("lbfgs-threaded", lin, B, "lbfgs", {})]:
    res = cm.minimize(cost, np.zeros(2), data=data, method=method.split("-")[0], **kw)
    res.success  # a spent budget: the rows' gradients' spread, by the module's machine code too
    mod = cm.generate(cost, method=method.split("-")[0], batch_size=kw.get("batch_size")).module
    out[name] = [list(map(float.hex, map(float, res.x))), res.nit, int(res.status),
                 len(mod.run_segment.signatures) + len(mod._fg.signatures), type(mod._segment).__name__]
print(json.dumps(out))
"""


def test_a_warm_process_runs_the_loops_machine_code(fresh_cache):
    """The first process compiles each loop's C entry point and keeps its machine code beside
    the module; a second process runs the same fits from that code, never compiling or loading
    the loop's Numba dispatcher, to the same bits (scalar loops without data, minibatch, full batch
    over data, and full batch over large data, whose passes run on calcml's threads); a spent
    budget's noise test (the rows' own gradients, fg_c) runs from machine code too."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "CALCML_CACHE_DIR": str(fresh_cache), "PYTHONPATH": root}

    def child():
        done = subprocess.run([sys.executable, "-c", _WARM_FITS], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold = child()
    assert len(list(fresh_cache.glob("*.run_segment_c.*.o"))) == 5
    warm = child()
    for name in cold:
        assert warm[name][:3] == cold[name][:3], name  # the same iterates, bit for bit
        assert warm[name][3] == 0 and warm[name][4] == "_NativeSegment", (name, warm[name])
    assert int(cold["gd"][2]) in (R.CONVERGED, R.MAXITER) and cold["lbfgs"][2] == R.CONVERGED
    assert cold["lbfgs-threaded"][2] == R.CONVERGED
    assert cold["adam"][2] in (R.EPOCHS_DONE, R.WITHIN_NOISE)  # the noise test ran


def test_the_loops_machine_code_gives_the_dispatchers_bits(linreg_data):
    """run_segment through its C entry point's machine code and through Numba's dispatcher:
    the same iterates, bit for bit (full batch without data, minibatch with a shuffle, full batch
    over large data with its passes called back on calcml's threads)."""
    from calcml import loop

    rng = np.random.default_rng(8)
    X = rng.normal(size=(loop.PARALLEL_MIN_ROWS + 9, 3))
    big = {"x0": X[:, 0], "x1": X[:, 1], "x2": X[:, 2], "y": X @ np.array([1.0, 0.5, -2.0]) + 0.3}

    for cost, method, kw, data in [
        (ROSEN, "nesterov", dict(lr=1e-3, maxiter=500, tol=0.0), None),
        (LINREG, "rmsprop", dict(lr=0.01, batch_size=8, epochs=2, seed=4), linreg_data[0]),
        (LINREG, "lbfgs", dict(lr=None, maxiter=30, tol=0.0), big),  # its passes on calcml's threads
    ]:
        prog = cm.generate(cost, method=method, lr=kw.pop("lr"), batch_size=kw.pop("batch_size", None))
        mod = prog.module
        assert isinstance(mod._segment, loop._NativeSegment)
        native = prog.run(np.full(cost.n_params, 0.3), data=data, **kw)
        saved, mod._segment = mod._segment, mod.run_segment
        try:
            jitted = prog.run(np.full(cost.n_params, 0.3), data=data, **kw)
        finally:
            mod._segment = saved
        np.testing.assert_array_equal(native.x, jitted.x)
        np.testing.assert_array_equal(native.history, jitted.history)
        assert native.nit == jitted.nit and native.status == jitted.status


@pytest.mark.parametrize("method,kw", [("gd", {"lr": 0.1}), ("lbfgs", {}), ("newton", {}), ("adam", {"lr": 0.1})])
def test_a_gradient_without_a_value_at_x0_is_named_not_called_divergence(method, kw):
    """sqrt(w**2 + b**2) has no gradient at 0 (NaN): a ParamError that names the entries, not
    "diverged at iteration 0 ... try a smaller learning rate"; from another point the fit runs."""
    w, b = cm.params("w b")
    cost = cm.Cost(sp.sqrt(w**2 + b**2) + (w - 1) ** 2, params=[w, b])
    with pytest.raises(cm.ParamError, match=r"gradient at x0 is not finite in w \(nan\), b \(nan\)"):
        cm.minimize(cost, np.zeros(2), method=method, **kw)
    v = cm.params("v", shape=(2,))
    j = cm.index("j", 2)
    tensor = cm.Cost(sp.sqrt(cm.sum(v[j] ** 2, j)) + (v[0] - 1) ** 2, params=[v])
    with pytest.raises(cm.ParamError, match=r"not finite in v\[0\] \(nan\), v\[1\] \(nan\)"):
        cm.minimize(tensor, np.zeros(2), method=method, **kw)
    if method == "lbfgs":  # the minimum (1/2, 0): |v| + (v0 - 1)^2, d/dv0 = 1 + 2 (v0 - 1) = 0
        np.testing.assert_allclose(cm.minimize(cost, np.array([0.5, 0.5]), method=method).x, [0.5, 0.0], atol=1e-6)


def test_advice_does_not_name_what_the_run_did():
    """A run that spent its budget is told what goes further, not what it already did: lbfgs
    within the data's noise is not told "lbfgs or newton go further"; minibatches under a
    decaying schedule are not told to use one. A run of no updates reports no success."""
    a, b = cm.params("a b")
    x, y = cm.data("x y")
    cost = cm.Cost((a * x + b - y) ** 2, params=[a, b], data=[x, y])
    rng = np.random.default_rng(0)
    X = rng.normal(size=200)
    D = {"x": X, "y": 2 * X + 1 + rng.normal(size=200)}
    res = cm.minimize(cost, np.zeros(2), data=D, method="lbfgs", maxiter=3, tol=1e-14)
    assert res.status == cm.result.WITHIN_NOISE and "lbfgs or newton" not in res.message
    res = cm.minimize(cost, np.zeros(2), data=D, method="gd", lr=0.1, maxiter=40, tol=1e-14)
    assert res.status == cm.result.WITHIN_NOISE and "lbfgs or newton go further" in res.message
    res = cm.minimize(cost, np.zeros(2), data=D, method="sgd", lr=0.01, batch_size=10, epochs=2,
                      schedule=cm.schedules.inverse_time(0.01, 0.1))
    assert res.status == cm.result.EPOCHS_DONE and "a decaying schedule" not in res.message
    assert "decays faster" in res.message
    res = cm.minimize(cost, np.zeros(2), data=D, method="sgd", lr=0.01, batch_size=10, epochs=2)
    assert "a decaying schedule (cm.schedules.inverse_time)" in res.message
    for method in ("lbfgs", "gd"):
        res = cm.minimize(cost, np.zeros(2), data=D, method=method, maxiter=0, **({"lr": 0.1} if method == "gd" else {}))
        assert res.status == cm.result.MAXITER and not res.success


def test_a_run_that_ends_within_an_epoch_keeps_that_part_in_its_history():
    """maxiter within the first epoch, or a divergence there, left a scalar minibatch run's
    history empty (nothing for res.plot()); its last entry is now the mean minibatch cost of
    the part run, a sum over its rows divided by them (mean reduction; for a sum, times N).
    The tensor path reports such a run as the scalar one does: MAXITER, whole epochs counted."""
    a, b = cm.params("a b")
    x, y = cm.data("x y")
    rng = np.random.default_rng(0)
    X = rng.normal(size=200)
    D = {"x": X, "y": 2 * X + 1}
    for reduce in ("mean", "sum"):
        cost = cm.Cost((a * x + b - y) ** 2, params=[a, b], data=[x, y], reduce=reduce)
        lr = 0.01 if reduce == "mean" else 0.01 / 200
        res = cm.minimize(cost, np.zeros(2), data=D, method="sgd", lr=lr, batch_size=10, maxiter=5, tol=0.0, seed=3)
        assert res.status == cm.result.MAXITER and res.history.shape == (1,)
        # the reference: the same five steps by hand, over the same shuffle (the minibatch costs at each step)
        full = cm.minimize(cost, np.zeros(2), data=D, method="sgd", lr=lr, batch_size=10, maxiter=20, tol=0.0, seed=3)
        assert full.history.shape == (1,)  # one whole epoch: its mean
        # exactly: rows whose cost at x0 is 9 each, a rate too small to move x0 (a mean of 9s; a sum: N 9s)
        flat = {"x": np.zeros(200), "y": np.full(200, 3.0)}
        part = cm.minimize(cost, np.zeros(2), data=flat, method="sgd", lr=1e-300, batch_size=10, maxiter=5, tol=0.0)
        assert part.history.tolist() == [9.0 if reduce == "mean" else 1800.0]
        res = cm.minimize(cost, np.zeros(2), data=D, method="sgd", lr=lr, batch_size=10, maxiter=25, tol=0.0, seed=3)
        assert res.history.shape == (2,) and res.history[0] == full.history[0]
    res = cm.minimize(cost, np.zeros(2), data=D, method="sgd", lr=1e3, batch_size=10, epochs=2)
    assert res.status == cm.result.DIVERGED and len(res.history) == 1
    w, xv = cm.params("w", shape=(2,)), cm.data("xv", shape=(2,))
    ct = cm.Cost((cm.dot(w, xv) - y) ** 2, params=[w], data=[xv, y])
    Dt = {"xv": np.column_stack([X, np.ones(200)]), "y": D["y"]}
    res = cm.minimize(ct, np.zeros(2), data=Dt, method="sgd", lr=0.01, batch_size=10, maxiter=25, tol=0.0)
    assert res.status == cm.result.MAXITER and "Maximum number of iterations reached (25)" in res.message
    res = cm.minimize(ct, np.zeros(2), data=Dt, method="sgd", lr=0.01, batch_size=10, maxiter=40, tol=0.0)
    assert res.status == cm.result.EPOCHS_DONE and "Completed 2 epochs" in res.message


def test_res_lr_is_the_rate_the_run_took():
    """A schedule replaces lr: with constant(0.1) the steps are 0.1 and res.lr says so (it said
    the lr argument, 0.3, or the method's default); a decaying schedule has no one rate (None)."""
    a = cm.params("a")
    cost = cm.Cost((a - 1) ** 2, params=[a])
    res = cm.minimize(cost, np.zeros(1), method="gd", lr=0.3, schedule=cm.schedules.constant(0.1), maxiter=1)
    assert res.lr == 0.1 and res.x[0] == pytest.approx(0.2)  # one step: 0 - 0.1 * 2 * (0 - 1)
    assert cm.minimize(cost, np.zeros(1), method="gd", schedule=cm.schedules.exponential(0.1, 0.9), maxiter=3).lr is None
    assert cm.minimize(cost, np.zeros(1), method="gd", lr=0.2, maxiter=3).lr == 0.2
    v = cm.params("v", shape=(2,))
    j = cm.index("j", 2)
    tensor = cm.Cost(cm.sum((v[j] - 1) ** 2, j), params=[v])
    res = cm.minimize(tensor, np.zeros(2), method="gd", lr=0.3, schedule=cm.schedules.constant(0.1), maxiter=1)
    assert res.lr == 0.1 and res.x == pytest.approx([0.2, 0.2])
    assert cm.minimize(tensor, np.zeros(2), method="gd", schedule=cm.schedules.cosine(0.1, 10), maxiter=3).lr is None
