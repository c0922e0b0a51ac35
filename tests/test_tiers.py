"""The Python tier of the line searches' loops (calcml.loop.TIER_UP_SECONDS): a first fit runs
the generated loop as Python, its data passes machine code, and gets the very bits the
loop's machine code gets; the loop is compiled once its Python time passes the threshold, from
the state the Python left; a Ctrl-C or a Python float error leaves that state whole."""

import numpy as np
import pytest
import sympy as sp

import calcml as cm
from calcml import loop
from calcml import result as R

a, b = sp.symbols("a b")
_rng = np.random.default_rng(0)
_X = _rng.standard_normal((300, 3))
_Y = (_X @ [1.0, -2.0, 0.5] + _rng.standard_normal(300) > 0).astype(float)
_w = cm.params("w", 3)
_b0 = cm.params("b")
_x = cm.data("x", 3)
_y = cm.data("y")
_z = cm.dot(_w, _x) + _b0
LOGISTIC = cm.Cost(cm.softplus(_z) - _y * _z, params=[*_w, _b0], data=[*_x, _y])
DATA = {"x0": _X[:, 0], "x1": _X[:, 1], "x2": _X[:, 2], "y": _Y}
ROSEN = cm.Cost((1 - a) ** 2 + 100 * (b - a**2) ** 2, params=[a, b])
# exp(10 a) from a = 60: the first trial steps overflow, which Python's math.exp raises (the
# slice then runs again as machine code, where it is inf)
STEEP = cm.Cost(sp.exp(10 * a) + (b - 1) ** 2 + a**2, params=[a, b])

# functions run as Python in the tier (no data): exp, log, sin, calcml's softplus, |u|**3's sign
u, v = sp.symbols("u v")
MIXED = cm.Cost(sp.exp(u * v / 4) + sp.log(2 + sp.sin(u)) + cm.softplus(u - v) + sp.Abs(u) ** 3, params=[u, v])
# powers that are not products: a non-integer one, an integer beyond the products' 8, one of a
# parameter (libm's pow in both tiers: calcml.printing), and |b|**2.5 defined for b < 0
POWERS = cm.Cost((a**2 + 1) ** 1.5 + (b - 0.5) ** 10 + 2 ** (a * b / 4) + sp.Abs(b) ** 2.5, params=[a, b])

CASES = {
    "rosenbrock": (ROSEN, [-1.2, 1.0], None),
    "mixed functions": (MIXED, [0.7, -0.4], None),
    "overflow": (STEEP, [60.0, 0.0], None),
    "powers": (POWERS, [0.8, -0.6], None),
    "logistic": (LOGISTIC, np.zeros(4), DATA),
}


def _segment(cost, method):
    """The driver's segment caller of the module minimize runs for cost and method."""
    return cm.generate(cost, method=method).module._segment


def _raising(monkeypatch, module, name, at, exc):
    """Make module.name raise exc at its at-th call; returns the list of its calls so far."""
    fn, calls = getattr(module, name), []

    def wrapped(*args):
        calls.append(1)
        if len(calls) == at:
            raise exc
        return fn(*args)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _same(r1, r2):
    assert r1.x.tobytes() == r2.x.tobytes() and r1.jac.tobytes() == r2.jac.tobytes()
    assert (r1.fun, r1.nit, r1.nfev, r1.status) == (r2.fun, r2.nit, r2.nfev, r2.status)
    np.testing.assert_array_equal(r1.history, r2.history)


@pytest.mark.parametrize("method", ["lbfgs", "newton"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_python_tier_gives_the_machine_codes_bits(fresh_cache, monkeypatch, case, method):
    cost, x0, data = CASES[case]
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", float("inf"))
    first = cm.minimize(cost, x0, data=data, method=method, maxiter=500)
    seg = _segment(cost, method)
    assert seg.python is not None and seg.fn is None
    assert not list(fresh_cache.glob("*.run_segment_c.*.o"))  # the loop was not compiled
    passes = "passes_c" if method == "newton" else "fg_c"  # its passes over rows were (newton's three in one)
    assert bool(list(fresh_cache.glob(f"*.{passes}.*.o"))) == (data is not None)
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", 0.0)
    again = cm.minimize(cost, x0, data=data, method=method, maxiter=500)
    assert seg.fn is not None and list(fresh_cache.glob("*.run_segment_c.*.o"))
    _same(first, again)
    if case != "overflow":
        assert first.success


def test_passes_on_calcmls_threads_give_the_same_bits_in_both_tiers(fresh_cache, monkeypatch):
    n = loop.PARALLEL_MIN_ROWS + 7
    X = np.random.default_rng(3).standard_normal((n, 3))
    data = {"x0": X[:, 0], "x1": X[:, 1], "x2": X[:, 2], "y": (X[:, 0] - X[:, 2] > 0.3).astype(float)}
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", float("inf"))
    first = cm.minimize(LOGISTIC, np.zeros(4), data=data, method="lbfgs")
    assert _segment(LOGISTIC, "lbfgs").python is not None
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", 0.0)
    _same(first, cm.minimize(LOGISTIC, np.zeros(4), data=data, method="lbfgs"))


def test_a_long_python_run_is_compiled_midway_and_resumes_to_the_same_bits(fresh_cache, monkeypatch):
    """Past TIER_UP_SECONDS of Python the loop is compiled and the run goes on from the state
    the Python left: the first slice in Python, the rest machine code, the bits of a run
    wholly in machine code."""
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", 1e-12)
    monkeypatch.setattr(loop, "_COMPILE_SECONDS_PER_LINE", 0.0)  # the threshold: TIER_UP_SECONDS alone
    mixed = cm.minimize(ROSEN, [-1.2, 1.0], method="lbfgs")
    seg = _segment(ROSEN, "lbfgs")
    assert seg.fn is not None and seg.python is None and 0 < seg.python_seconds
    assert mixed.nit > seg.slice_steps  # the Python tier ran a slice, the machine code the rest
    _same(mixed, cm.minimize(ROSEN, [-1.2, 1.0], method="lbfgs"))


def test_ctrl_c_in_the_python_tier_returns_an_iterate_of_the_run(fresh_cache, monkeypatch):
    """A Ctrl-C inside a Python slice: the state goes back to the slice's start, the run stops
    there and reports its best point, one of the uninterrupted run's iterates."""
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", float("inf"))
    full = cm.minimize(ROSEN, [-1.2, 1.0], method="lbfgs", tol=0.0, maxiter=30)
    seg = _segment(ROSEN, "lbfgs")
    seg.slice_steps = 4
    monkeypatch.setattr(loop, "_SLICE_SECONDS", 0.0)  # slices of one step after the first
    _raising(monkeypatch, seg.python, "_lbfgs_step", 10, KeyboardInterrupt)
    res = cm.minimize(ROSEN, [-1.2, 1.0], method="lbfgs", tol=0.0, maxiter=30)
    assert res.status == R.INTERRUPTED and not res.success
    assert 0 < res.nit < 10 and res.fun in set(full.history.tolist())
    assert res.fun == pytest.approx(float((1 - res.x[0]) ** 2 + 100 * (res.x[1] - res.x[0] ** 2) ** 2), rel=1e-15)


@pytest.mark.parametrize("method, options", [
    ("gd", dict(lr=1e-3)),
    ("nesterov", dict(lr=1e-3)),
    ("rmsprop", dict(lr=1e-3)),
    ("gd", dict(schedule=cm.schedules.cosine(1e-3, 3000))),
    ("adam", dict(lr=1e-3)),  # its bias corrections: b1 and b2 to the power step + 1
    ("momentum", dict(schedule=cm.schedules.exponential(1e-3, 0.999))),  # a float to an integer power
    ("gd", dict(schedule=cm.schedules.warmup(cm.schedules.step(1e-3, 100, 0.7), 50))),
])
@pytest.mark.parametrize("case", ["rosenbrock", "mixed functions", "powers"])
def test_first_order_loops_without_data_run_in_the_python_tier_to_the_same_bits(fresh_cache, monkeypatch, case,
                                                                                method, options):
    """Without data a first-order step is a few lines of arithmetic: such a loop starts in the
    Python tier too (a first fit in well under a second), to the machine code's bits."""
    cost, x0, _ = CASES[case]
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", float("inf"))
    first = cm.minimize(cost, x0, method=method, maxiter=3000, **options)
    prog = cm.generate(cost, method=method, **options)
    assert prog.module._segment.python is not None and not list(fresh_cache.glob("*.run_segment_c.*.o"))
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", 0.0)
    _same(first, cm.minimize(cost, x0, method=method, maxiter=3000, **options))
    assert prog.module._segment.fn is not None


@pytest.mark.parametrize("method, options", [("gd", dict(lr=0.1, maxiter=100)),
                                             ("sgd", dict(lr=0.05, batch_size=16, epochs=3, seed=4)),
                                             ("adam", dict(lr=0.05, batch_size=16, epochs=3, seed=4))])
def test_short_first_order_runs_over_data_run_in_the_python_tier_to_the_same_bits(fresh_cache, monkeypatch, method,
                                                                                   options):
    """A short first-order run over data (its rows' work, estimated, within TIER_UP_SECONDS of
    Python) starts in the Python tier, minibatch shuffles included, to the machine code's bits."""
    first = cm.minimize(LOGISTIC, np.zeros(4), data=DATA, method=method, **options)
    seg = cm.generate(LOGISTIC, method=method, lr=options["lr"], batch_size=options.get("batch_size")).module._segment
    assert seg.python is not None and not list(fresh_cache.glob("*.run_segment_c.*.o"))
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", 0.0)
    _same(first, cm.minimize(LOGISTIC, np.zeros(4), data=DATA, method=method, **options))
    assert seg.fn is not None


def test_long_runs_are_compiled_at_once_and_no_loop_is_barred_from_the_python_tier(fresh_cache):
    """A long first-order run over data (300 rows, 100,000 steps: about 60 s of Python, by the
    estimate) compiles its loop at once. No generated loop holds a ``**``: powers are libm's pow
    with a float exponent (calcml.printing), which Python calls too, so every loop qualifies."""
    res = cm.minimize(LOGISTIC, np.zeros(4), data=DATA, method="gd", lr=0.1, maxiter=100_000, tol=0.0)
    seg = cm.generate(LOGISTIC, method="gd", lr=0.1).module._segment
    assert res.nit == 100_000 and seg.fn is not None and seg.python_seconds == 0.0
    for prog in (cm.generate(ROSEN, method="adam", lr=0.01), cm.generate(POWERS, method="lbfgs"),
                 cm.generate(ROSEN, method="gd", schedule=cm.schedules.exponential(0.01, 0.99))):
        code = [line.split("#")[0] for line in prog.source.splitlines()]
        assert prog.module.PYTHON_TIER and not any("**" in line.replace("**kw", "") for line in code)
        assert "math.pow(" in prog.source


def test_the_python_time_counts_across_processes(fresh_cache):
    """A loop's Python time is kept beside its module: a script run again and again (each run
    short) compiles the loop once its runs have spent TIER_UP_SECONDS in all."""
    cm.minimize(ROSEN, [-1.2, 1.0], method="lbfgs")
    seg = _segment(ROSEN, "lbfgs")
    assert seg.python is not None and seg.python_seconds > 0
    assert loop._NativeSegment(seg.module, seg.path).python_seconds == seg.python_seconds  # a later process's


# -- tensor costs: the first-order loops of a tensor module (calcml.loop's, calcml.tensor.loops) --
_tw = cm.params("w", shape=(3,))
_tb = cm.params("b")
_tx = cm.data("x", shape=(3,))
_ty = cm.data("y")
_tz = cm.dot(_tw, _tx) + _tb
TENSOR = cm.Cost(cm.softplus(_tz) - _ty * _tz, params=[_tw, _tb], data=[_tx, _ty],
                 penalty=cm.sum(_tw[cm.index("j", 3)] ** 2, cm.index("j", 3)) / 600)
TENSOR_DATA = {"x": _X, "y": _Y}


_m, _beta = sp.symbols("m beta")
SIGNUM = cm.optim.Optimizer("signum", 0.01, {"beta": 0.9}, state=(("m", ("n",), 0.0),),
                            update=[(_m, _beta * _m + (1 - _beta) * cm.optim.g),
                                    (cm.optim.theta, cm.optim.theta - cm.optim.lr * sp.sign(_m))])


def _tensor_fit(method, options):
    return cm.minimize(TENSOR, np.zeros(4), data=TENSOR_DATA, method=method, **options)


def _tensor_module(method, options):
    return cm.generate(TENSOR, method=method, lr=options.get("lr", 0.1), schedule=options.get("schedule"),
                       batch_size=options.get("batch_size")).module


def _tensor_tier(method, options):
    """(the module run as Python in the tier, or None; the C entry whose machine code runs the
    loop otherwise: calcml.loop's run_segment_c, full batch or minibatch)."""
    return _tensor_module(method, options)._segment.python, "run_segment_c"


def _per_step(options) -> str:
    """A function the tier's Python calls once a step: the full pass (a full-batch step: _fg, which
    the run's first call and its report call too) or the kernels' finish of the minibatch's sums (a
    minibatch step; the tolerance's pass at an epoch's end has its own)."""
    return "_fg" if options.get("batch_size") is None else "vg_finish"


@pytest.mark.parametrize("method, options", [
    ("gd", dict(lr=0.5, maxiter=150)),
    ("gd", dict(lr="auto", maxiter=150)),
    ("momentum", dict(schedule=cm.schedules.exponential(0.2, 0.99), maxiter=100)),
    ("adam", dict(lr=0.05, batch_size=16, epochs=3, seed=4)),
    ("sgd", dict(lr=0.05, batch_size=32, maxiter=25, seed=1)),
    ("nesterov", dict(lr=0.1, maxiter=120)),
    ("rmsprop", dict(lr=0.01, maxiter=100)),
    ("adagrad", dict(lr=0.1, batch_size=32, epochs=2, seed=5)),
    (SIGNUM, dict(lr=0.01, maxiter=60)),  # sign(): no NumPy form, its loop in the tier too
])
def test_tensor_loops_run_in_the_python_tier_to_the_machine_codes_bits(fresh_cache, monkeypatch, method, options):
    """A short run of a tensor cost runs its module's loops as Python, their kernels the cost's
    compiled kernels (the loop is not compiled: about 3 s of a first fit), its loops over the
    parameters as NumPy over the arrays where the rule's operations allow it (a rule with
    sign() keeps its loop), and gets the bits of the loop's machine code."""
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", float("inf"))
    first = _tensor_fit(method, options)
    py, entry = _tensor_tier(method, options)
    assert py is not None
    text = cm.generate(TENSOR, method=method, lr=options.get("lr", 0.1), schedule=options.get("schedule"),
                       batch_size=options.get("batch_size")).source
    assert ("the rule over the arrays (NumPy" in text) == (method is not SIGNUM)
    assert not list(fresh_cache.glob(f"*.{entry}.*.o"))
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", 0.0)
    _same(first, _tensor_fit(method, options))
    assert list(fresh_cache.glob(f"*.{entry}.*.o"))


def test_a_tensor_loop_compiled_midway_resumes_to_the_same_bits(fresh_cache, monkeypatch):
    """Past the threshold the loop is compiled and the run goes on from the state the Python
    left: the first slice in Python, the rest machine code, the bits of a run wholly in machine
    code."""
    options = dict(lr=0.5, maxiter=400)
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", 0.0)
    compiled = _tensor_fit("gd", options)
    monkeypatch.setenv("CALCML_CACHE_DIR", str(fresh_cache / "second"))
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", 1e-12)
    monkeypatch.setattr(loop, "_COMPILE_SECONDS_PER_LINE", 0.0)  # the threshold: TIER_UP_SECONDS alone
    mod = _tensor_module("gd", options)
    monkeypatch.setattr(mod, "python_tier_seconds", lambda ints, n_rows: 0.0)  # short enough for the tier
    midway = _tensor_fit("gd", options)
    seg = mod._segment
    assert seg.fn is not None and seg.python is None and 0 < seg.python_seconds
    assert midway.nit > seg.slice_steps and list((fresh_cache / "second").glob("*.run_segment_c.*.o"))
    _same(compiled, midway)


@pytest.mark.parametrize("method, options", [("momentum", dict(lr=0.2, maxiter=400, tol=0.0)),
                                             ("adam", dict(lr=0.05, batch_size=16, epochs=40, seed=2, tol=0.0))])
def test_a_ctrl_c_in_the_tensor_python_tier_returns_a_whole_point(fresh_cache, monkeypatch, method, options):
    """A Ctrl-C inside a call of the Python tier: the call's state (parameters, gradient, best
    point, the optimizer's state, a minibatch run's row order) is put back as the call found
    it, and the run returns its best point, whole: one of its iterates."""
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", float("inf"))
    full = _tensor_fit(method, options)
    _tensor_module(method, options)._segment.slice_steps = 4  # slices of one step after the first
    monkeypatch.setattr(loop, "_SLICE_SECONDS", 0.0)  # (a Ctrl-C goes back to its slice's start)
    _raising(monkeypatch, _tensor_tier(method, options)[0], _per_step(options), 30, KeyboardInterrupt)
    res = _tensor_fit(method, options)
    assert res.status == R.INTERRUPTED and not res.success and 0 < res.nit < 30
    if not res.minibatch:
        assert res.fun in set(full.history.tolist())  # one of the run's iterates, whole
    else:  # the best epoch's point: the same as the uninterrupted run's at that epoch; the history's
        # whole epochs are the uninterrupted run's, then the mean over the unfinished one's minibatches
        done, part = divmod(res.nit, -(-len(_Y) // options["batch_size"]))
        assert res.history[:done].tolist() == full.history[:done].tolist() and len(res.history) == done + (part > 0)
    k = cm.compile(TENSOR)
    assert res.fun == pytest.approx(k.value(res.x, TENSOR_DATA), rel=1e-14)


def test_a_python_float_error_in_the_tensor_tier_reruns_the_call_compiled(fresh_cache, monkeypatch):
    """Where Python raises on a float (a division by zero, an overflow) machine code gives inf or
    NaN: the call is put back as it found it and run again as machine code, to its bits."""
    options = dict(lr=0.2, maxiter=300)
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", 0.0)
    compiled = _tensor_fit("momentum", options)
    monkeypatch.setenv("CALCML_CACHE_DIR", str(fresh_cache / "second"))
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", float("inf"))
    _tensor_fit("momentum", dict(options, maxiter=1))  # the Python module, made
    assert not list((fresh_cache / "second").glob("*.run_segment_c.*.o"))
    calls = _raising(monkeypatch, _tensor_tier("momentum", options)[0], "_fg", 20,
                     ZeroDivisionError("float division by zero"))
    rerun = _tensor_fit("momentum", options)
    assert len(calls) == 20 and list((fresh_cache / "second").glob("*.run_segment_c.*.o"))
    _same(compiled, rerun)


def test_a_loop_that_costs_more_to_compile_stays_in_python_longer(fresh_cache, monkeypatch):
    """The tier's threshold is TIER_UP_SECONDS or the loop's estimated compile time, if longer
    (its lines times _COMPILE_SECONDS_PER_LINE): a ski rental. 0 still compiles at once."""
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", 1e-4)
    monkeypatch.setattr(loop, "_COMPILE_SECONDS_PER_LINE", 1.0)  # every loop: minutes to compile
    res = cm.minimize(ROSEN, [-1.2, 1.0], method="lbfgs", tol=0.0, maxiter=300)
    seg = _segment(ROSEN, "lbfgs")
    lines = seg.path.read_text().split("\ndef run_segment_c")[0].count("\n")
    assert seg._threshold() == lines * 1.0 and seg.python_seconds > 1e-4
    assert seg.python is not None and seg.fn is None and not list(fresh_cache.glob("*.run_segment_c.*.o"))
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", 0.0)
    assert seg._threshold() == 0.0
    _same(res, cm.minimize(ROSEN, [-1.2, 1.0], method="lbfgs", tol=0.0, maxiter=300))
    assert seg.fn is not None


# -- a scalar loop over many parameters: the tier's NumPy forms ----------------------------------
_QS = sp.symbols("q0:70")
BIG = cm.Cost(sp.Add(*[(q - sp.Rational(k, 70)) ** 2 * (1 + q ** 2) for k, q in enumerate(_QS)]), params=list(_QS))


@pytest.mark.parametrize("method, options", [("adam", dict(lr=0.05, maxiter=60)), ("momentum", dict(lr=0.01, maxiter=60)),
                                             ("lbfgs", dict(maxiter=30))])
def test_a_scalar_loop_over_many_parameters_runs_numpy_in_the_tier_to_the_machine_codes_bits(fresh_cache, monkeypatch,
                                                                                             method, options):
    """A scalar cost of more parameters than calcml unrolls (and no index form) loops over them:
    the Python tier runs those loops (the rule, the gradient's norm, the best point's copy) as
    NumPy over the arrays, in the scalar printer's order of operations, to the machine code's bits."""
    x0 = np.linspace(-1.0, 1.0, len(_QS))
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", float("inf"))
    first = cm.minimize(BIG, x0, method=method, **options)
    seg = _segment(BIG, method)
    assert seg.python is not None and seg.fn is None
    assert "float(np.cumsum(g * g)[-1])" in seg.path.read_text()
    monkeypatch.setattr(loop, "TIER_UP_SECONDS", 0.0)
    _same(first, cm.minimize(BIG, x0, method=method, **options))
    assert seg.fn is not None
