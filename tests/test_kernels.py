"""Compiled kernels against SymPy's own evaluation at 50 digits, and their input handling."""

from __future__ import annotations

import math
import os

import mpmath
import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import calcml as cm
from problems import BY_NAME, PROBLEMS, Problem, as_columns, sample_args

DPS = 50


def _mp_heaviside(z, h0=mpmath.mpf(1) / 2):
    return mpmath.mpf(1) if z > 0 else mpmath.mpf(0) if z < 0 else h0


# SymPy's own mpmath translation, plus the functions it has no mpmath name for.
_MP_FUNCS = {
    "sigmoid": lambda z: 1 / (1 + mpmath.exp(-z)),
    "softplus": lambda z: mpmath.log1p(mpmath.exp(z)),
    "relu": lambda z: max(z, mpmath.mpf(0)),
    "Heaviside": _mp_heaviside,
    "DiracDelta": lambda z, k=0: mpmath.mpf(0) if z != 0 else mpmath.nan,
}
_REFERENCE_FUNCS: dict = {}


def _reference_functions(problem: Problem):
    """value, gradient and Hessian upper triangle of the user's cost, lambdified to mpmath."""
    if problem.name not in _REFERENCE_FUNCS:
        cost = problem.cost
        n = len(cost.params)
        exprs = [cost.expr, *cost.gradient, *[cost.hessian[i, j] for i in range(n) for j in range(i, n)]]
        args = [*cost.params, *cost.data]
        _REFERENCE_FUNCS[problem.name] = sp.lambdify(args, exprs, modules=[_MP_FUNCS, "mpmath"])
    return _REFERENCE_FUNCS[problem.name]


def reference(problem: Problem, theta, cols: dict | None):
    """(value, gradient, hessian) reduced over rows, evaluated by SymPy with mpmath at 50 digits.

    Each comes with the reduced magnitude sum|term|, which bounds the rounding error any
    float64 summation of the rows can have.
    """
    cost = problem.cost
    n = len(cost.params)
    f = _reference_functions(problem)
    n_rows = 1 if cols is None else len(next(iter(cols.values())))
    with mpmath.workdps(DPS):
        base = [mpmath.mpf(float(t)) for t in theta]  # the binary values, exactly
        totals, mags = None, None
        for r in range(n_rows):
            row = [] if cols is None else [mpmath.mpf(float(cols[d][r])) for d in cost.data_names]
            vals = f(*base, *row)
            for v in vals:
                assert mpmath.im(v) == 0 if isinstance(v, mpmath.mpc) else True, f"reference not real: {v}"
            vals = [mpmath.mpf(v) for v in vals]
            totals = vals if totals is None else [t + v for t, v in zip(totals, vals)]
            mags = [abs(v) for v in vals] if mags is None else [m + abs(v) for m, v in zip(mags, vals)]
        if cols is not None and cost.reduce == "mean":
            totals = [t / n_rows for t in totals]
            mags = [m / n_rows for m in mags]
    H, HM = np.empty((n, n), dtype=object), np.empty((n, n), dtype=object)
    k = 1 + n
    for i in range(n):
        for j in range(i, n):
            H[i, j] = H[j, i] = totals[k]
            HM[i, j] = HM[j, i] = mags[k]
            k += 1
    return (totals[0], mags[0]), (totals[1 : n + 1], mags[1 : n + 1]), (H, HM)


def assert_close(actual, ref, mag, what, rel=1e-12):
    """|actual - ref| <= rel * max(|ref|, sum|terms|): 1e-12 relative to the summed magnitudes."""
    actual = np.atleast_1d(np.asarray(actual, dtype=np.float64)).ravel()
    ref = np.atleast_1d(np.asarray(ref, dtype=object)).ravel()
    mag = np.atleast_1d(np.asarray(mag, dtype=object)).ravel()
    for k, (a, r, m) in enumerate(zip(actual, ref, mag)):
        scale = max(abs(float(r)), float(m), 1e-300)
        with mpmath.workdps(DPS):
            err = abs(mpmath.mpf(float(a)) - r)
        assert float(err) <= rel * scale, f"{what}[{k}]: compiled {a!r}, exact {r}, error {float(err):.3e} > {rel:.0e} * {scale:.3e}"


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_kernels_match_sympy_at_50_digits(problem: Problem):
    k = cm.compile(problem.cost)
    has_data = bool(problem.cost.data)

    # No shrinking: a failure is reported as drawn (shrinking re-runs 50-digit references).
    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              phases=(Phase.explicit, Phase.reuse, Phase.generate))
    @given(theta=problem.theta_strategy(), cols=problem.data_strategy() if has_data else st.none())
    def check(theta, cols):
        assume(problem.away_from_kinks(theta, cols))
        th = np.array(theta)
        data = as_columns(problem, cols) if has_data else None
        (v, vm), (g, gm), (h, hm) = reference(problem, th, data)
        args = (th, data) if has_data else (th,)
        assert_close(k.value(*args), v, vm, "value")
        assert_close(k.grad(*args), g, gm, "grad")
        f2, g2 = k.value_and_grad(*args)
        assert_close(f2, v, vm, "value_and_grad.value")
        assert_close(g2, g, gm, "value_and_grad.grad")
        assert_close(k.hessian(*args), h, hm, "hessian")

    check()


def _numpy_reference(name: str, theta, data) -> tuple:
    """(value, gradient) of problems' linreg or logistic by NumPy's closed forms: an
    independent evaluation (matrix products, np.logaddexp), not the generated code."""
    cost = BY_NAME[name].cost
    n_rows = len(data["y"])
    X = np.column_stack([data[c] for c in cost.data_names[:-1]] + [np.ones(n_rows)])
    z = X @ theta
    if name == "linreg":
        r = z - data["y"]
        return np.mean(r**2), 2 * X.T @ r / n_rows
    return np.mean(np.logaddexp(0, z) - data["y"] * z), X.T @ (1 / (1 + np.exp(-z)) - data["y"]) / n_rows


@pytest.mark.parametrize("name", ["linreg", "logistic"])
def test_value_and_grad_gives_value_and_grad_at_every_size(name):
    """value_and_grad returns value's and grad's very bits, and NumPy's closed forms to
    rounding, for row counts on and around the LANES-row blocks and the CHUNK-row chunks
    (no tail, tail rows after the last full block, a partial last chunk)."""
    from calcml.codegen import CHUNK, LANES

    cost = BY_NAME[name].cost
    k = cm.compile(cost)
    rng = np.random.default_rng(17)
    for n in (1, LANES - 1, LANES, LANES + 1, 3 * LANES + 5, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 37):
        data = {c: rng.normal(size=n) for c in cost.data_names}
        if name == "logistic":
            data["y"] = (rng.random(n) < 0.5).astype(float)
        theta = rng.normal(size=len(cost.params))
        f, g = k.value_and_grad(theta, data)
        assert f == k.value(theta, data) and np.array_equal(g, k.grad(theta, data)), n
        ref_f, ref_g = _numpy_reference(name, theta, data)
        assert f == pytest.approx(ref_f, rel=1e-12), n
        np.testing.assert_allclose(g, ref_g, rtol=1e-10, atol=1e-12, err_msg=str(n))


def _run_without_jit(template: str, names: list):
    """``template`` (a script that prints one JSON line last) run in a fresh process with
    NUMBA_DISABLE_JIT=1 for the problems ``names``; its JSON."""
    import json
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "PYTHONPATH": os.path.dirname(here)}
    run = subprocess.run([sys.executable, "-c", template.format(tests=here, names=names)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


_COUNTING_RUN = """
import ctypes, json, sys
import numpy as np
sys.path.insert(0, {tests!r})

# Array constructors count a call made while a generated kernel runs (numpy patched before
# calcml or the generated module imports it, however that module names them).
_inside, _allocs = [False], []
for _name in ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like",
              "array", "copy", "concatenate", "stack", "hstack", "vstack"):
    def _counting(*a, _f=getattr(np, _name), _name=_name, **kw):
        if _inside[0]:
            _allocs.append(_name)
        return _f(*a, **kw)
    setattr(np, _name, _counting)

import calcml as cm
from calcml.codegen import CHUNK, LANES
from problems import BY_NAME

class Counted:
    # a data column that counts how often each of its elements is read
    def __init__(self, arr, reads):
        self.arr, self.reads = arr, reads
    def __getitem__(self, i):
        self.reads[i] += 1
        return self.arr[i]

out = {{}}
for name in {names!r}:
    cost = BY_NAME[name].cost
    k = cm.compile(cost)
    mod = k.module
    for kind in ("value", "grad", "value_and_grad", "hessian"):
        fn = getattr(mod, kind + "_rows")
        def kernel(*a, _fn=fn):
            _inside[0] = True
            try:
                return _fn(*a)
            finally:
                _inside[0] = False
        setattr(mod, kind + "_rows", kernel)  # before the first call: Kernels looks it up then
    real_carray = mod.carray
    reads = {{}}
    def carray(ptr, shape, *a):
        arr = real_carray(ptr, shape, *a)
        found = reads.get(ctypes.cast(ptr, ctypes.c_void_p).value)
        return arr if found is None else Counted(arr, found)
    mod.carray = carray
    rng = np.random.default_rng(2)
    for n in (3 * LANES + 5, CHUNK + 2 * LANES + 7):
        data = {{c: rng.normal(size=n) for c in cost.data_names}}  # float64, contiguous: used in place
        theta = rng.normal(size=len(cost.params))
        for kind in ("value", "grad", "value_and_grad", "hessian"):
            counts = {{c: np.zeros(n, dtype=np.int64) for c in cost.data_names}}
            reads.clear()
            reads.update({{v.ctypes.data: counts[c] for c, v in data.items()}})
            del _allocs[:]
            getattr(k, kind)(theta, data)
            out[f"{{name}} {{n}} {{kind}}"] = {{"reads": {{c: np.bincount(v, minlength=3).tolist() for c, v in counts.items()}},
                                                "allocs": list(_allocs), "compiled": k.compiled}}
print(json.dumps(out))
"""


def test_each_kernel_reads_each_datum_once_and_allocates_nothing():
    """One pass: every kernel (value_and_grad included: value and gradient in the same pass)
    reads each element of each column exactly once, and allocates no array while it runs (no
    per-row or per-chunk temporaries). Observed by running the generated kernels as Python
    (NUMBA_DISABLE_JIT=1, the same source) on columns that count their reads; a block's rows,
    tail rows and a second, partial chunk included."""
    names = ["linreg", "logistic"]
    got = _run_without_jit(_COUNTING_RUN, names)
    assert len(got) == len(names) * 2 * 4
    for what, seen in got.items():
        assert seen["compiled"] == [], f"{what}: Numba compiled a kernel with the JIT disabled"
        for column, histogram in seen["reads"].items():
            n_rows = int(what.split()[1])
            assert histogram == [0, n_rows, 0], f"{what}: column {column}: elements read 0, 1, 2, ... times: {histogram}"
        assert seen["allocs"] == [], f"{what}: the kernel allocated {seen['allocs']}"


# -- numerically stable forms at extreme inputs -------------------------------------------

def test_logistic_loss_stable_at_800():
    for name in ("logistic", "logistic_textbook"):
        cost = BY_NAME[name].cost
        k = cm.compile(cost)
        n = len(cost.params)
        theta = np.zeros(n)
        theta[0] = 800.0
        cols = {c: np.array([1.0, -1.0]) for c in cost.data_names}
        cols["y"] = np.array([0.0, 1.0])
        # rows: z = 800 (+bias 0) with y=0 -> loss 800; z = -800 with y=1 -> loss 800
        f, g = k.value_and_grad(theta, cols)
        assert f == pytest.approx(800.0, rel=1e-15), name
        assert np.all(np.isfinite(g)), name
        assert g[0] == pytest.approx(1.0, rel=1e-15), name  # mean of (sigma(z) - y) * x = (1*1 + (0-1)*(-1))/2
        assert np.all(np.isfinite(k.hessian(theta, cols))), name


def test_softplus_tiny_and_huge():
    w = cm.params("w")
    x = cm.data("x")
    k = cm.compile(cm.Cost(sp.log(1 + sp.exp(w * x)), params=[w], data=[x], reduce="sum"))
    assert k.value(np.array([1.0]), {"x": np.array([800.0])}) == 800.0
    assert k.value(np.array([1.0]), {"x": np.array([-800.0])}) == 0.0  # exp(-800) underflows; exact 3.7e-348
    v = k.value(np.array([1.0]), {"x": np.array([-40.0])})
    assert v == pytest.approx(float(sp.log(1 + sp.exp(-40)).evalf(30)), rel=1e-15)


def test_log1p_and_expm1_keep_precision():
    w = cm.params("w")
    x = cm.data("x")
    k = cm.compile(cm.Cost(sp.log(1 + w * x) + (sp.exp(w * x) - 1), params=[w], data=[x], reduce="sum"))
    tiny = 1e-20
    v, g = k.value_and_grad(np.array([1.0]), {"x": np.array([tiny])})
    assert v == pytest.approx(2e-20, rel=1e-15)  # naive log(1+1e-20) = 0 and exp(1e-20)-1 = 0
    assert g[0] == pytest.approx(2e-20, rel=1e-15)


# -- serial and threaded kernels ----------------------------------------------------------

@pytest.mark.parametrize("name", ["linreg", "logistic"])
def test_parallel_equals_serial_bitwise(name):
    cost = BY_NAME[name].cost
    rng = np.random.default_rng(7)
    n_rows = 100_003  # not a multiple of the chunk size
    data = {c: rng.normal(size=n_rows) for c in cost.data_names}
    if name == "logistic":
        data["y"] = (rng.random(n_rows) < 0.5).astype(float)
    theta = rng.normal(size=len(cost.params))
    ks, kp = cm.compile(cost, parallel=False), cm.compile(cost, parallel=True)
    fs, gs = ks.value_and_grad(theta, data)
    fp, gp = kp.value_and_grad(theta, data)
    assert fs == fp and np.array_equal(gs, gp)
    assert np.array_equal(ks.hessian(theta, data), kp.hessian(theta, data))
    # and both agree with a NumPy evaluation to rounding
    ref_f, ref_g = _numpy_reference(name, theta, data)
    assert fs == pytest.approx(ref_f, rel=1e-12)
    np.testing.assert_allclose(gs, ref_g, rtol=1e-10, atol=1e-12)


# -- data in the three forms, and bad input -----------------------------------------------

@pytest.fixture(scope="module")
def lin():
    cost = BY_NAME["linreg"].cost
    rng = np.random.default_rng(3)
    cols = {c: rng.normal(size=50) for c in cost.data_names}
    return cost, cm.compile(cost), cols, rng.normal(size=len(cost.params))


def test_data_forms_agree(lin):
    cost, k, cols, theta = lin
    want = k.value_and_grad(theta, cols)
    arr = np.column_stack([cols[c] for c in cost.data_names])
    for form in (arr, np.asfortranarray(arr), arr.copy(order="C"), k.prepare(cols),
                 {**cols, "unused": np.zeros(3)}, {c: list(v) for c, v in cols.items()}):
        got = k.value_and_grad(theta, form)
        assert got[0] == want[0] and np.array_equal(got[1], want[1])
    ints = {c: np.arange(50) % 7 for c in cost.data_names}
    np.testing.assert_allclose(k.grad(theta, ints), k.grad(theta, {c: v.astype(float) for c, v in ints.items()}))


def test_dataframe(lin):
    pd = pytest.importorskip("pandas")
    cost, k, cols, theta = lin
    df = pd.DataFrame(cols)
    assert k.value(theta, df) == k.value(theta, cols)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.pop("x1"), r"missing column 'x1'"),
        (lambda c: c.__setitem__("y", c["y"][:-1]), r"column 'y' has 49 rows, but 'x0' has 50"),
        (lambda c: c.__setitem__("x2", np.array(["a"] * 50)), r"column 'x2' must be numeric"),
        (lambda c: c.__setitem__("x0", np.ones((50, 2))), r"column 'x0' must be 1-D, got shape \(50, 2\)"),
        (lambda c: c["x2"].__setitem__(17, np.nan), r"column 'x2' holds a non-finite value \(nan\) at row 17"),
        (lambda c: c["y"].__setitem__(3, -np.inf), r"column 'y' holds a non-finite value \(-inf\) at row 3"),
        (lambda c: [c.__setitem__(n, v[:0]) for n, v in list(c.items())], r"no rows"),
    ],
)
def test_bad_data_is_named(lin, mutate, message):
    cost, k, cols, theta = lin
    bad = {c: v.copy() for c, v in cols.items()}
    mutate(bad)
    for kernel in (k.value, k.grad, k.value_and_grad, k.hessian):
        with pytest.raises(cm.DataError, match=message):
            kernel(theta, bad)


def test_bad_array_shape_and_theta(lin):
    cost, k, cols, theta = lin
    with pytest.raises(cm.DataError, match=r"shape \(N, 4\).*got shape \(50, 3\)"):
        k.value(theta, np.zeros((50, 3)))
    with pytest.raises(cm.DataError, match="data=None"):
        k.value(theta)
    with pytest.raises(cm.ParamError, match=r"shape \(4,\)"):
        k.value(theta[:2], cols)
    bad = theta.copy()
    bad[3] = np.inf
    with pytest.raises(cm.ParamError, match=r"theta\[3\] \(parameter 'b'\)"):
        k.grad(bad, cols)


def test_cost_without_data_takes_theta_only():
    k = cm.compile(BY_NAME["rosenbrock"].cost)
    assert k.value(np.array([1.0, 1.0])) == 0.0
    np.testing.assert_array_equal(k.grad(np.array([1.0, 1.0])), [0.0, 0.0])
    np.testing.assert_array_equal(k.hessian(np.array([1.0, 1.0])), [[802.0, -400.0], [-400.0, 200.0]])
    with pytest.raises(cm.ParamError, match="no data columns"):
        k.value(np.array([1.0, 1.0]), {"x": np.ones(3)})


# -- the printer: every supported construct compiles; the rest is a clear error -----------

def test_unsupported_node_is_named():
    w = cm.params("w")
    f = sp.Function("f")
    with pytest.raises(cm.CodegenError, match="undefined function f"):
        cm.compile(cm.Cost(f(w) ** 2, params=[w]))
    from calcml.printing import NumbaPrinter

    with pytest.raises(cm.CodegenError, match="Integral"):
        NumbaPrinter({w: "p0"}).doprint_expr(sp.Integral(w, (w, 0, 1)))
    with pytest.raises(cm.CodegenError, match="symbol 'q' has no slot"):
        NumbaPrinter({w: "p0"}).doprint_expr(w + sp.Symbol("q"))


def test_symbol_names_never_reach_code_as_code(tmp_path):
    evil = "__import__('os').system('touch " + str(tmp_path / "pwned") + "')"
    w = sp.Symbol(evil, real=True)
    x = sp.Symbol("x\nimport os; os.system('touch " + str(tmp_path / "pwned2") + "')", real=True)
    k = cm.compile(cm.Cost((w * x - 1) ** 2, params=[w], data=[x]))
    assert k.value(np.array([2.0]), {x.name: np.array([1.0, 0.0])}) == pytest.approx(1.0)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    for line in k.source.splitlines():
        code = line.split("#", 1)[0]
        assert "__import__" not in code and "system" not in code, line


def test_piecewise_without_otherwise_is_nan_outside():
    w = cm.params("w")
    x = cm.data("x")
    k = cm.compile(cm.Cost(sp.Piecewise((w * x, x > 0)), params=[w], data=[x], reduce="sum"))
    assert k.value(np.array([2.0]), {"x": np.array([3.0])}) == 6.0
    assert math.isnan(k.value(np.array([2.0]), {"x": np.array([-3.0])}))


def test_piecewise_gives_only_the_branch_that_holds():
    """Piecewise runs as conditionals: a branch that does not hold at a row never reaches the
    result, even where it is NaN or infinite there (log of a negative number, of 0): value,
    gradient and Hessian are SymPy's, row by row, of the branch that holds."""
    w = cm.params("w")
    x = cm.data("x")
    expr = sp.Piecewise((w * sp.log(x), x > 0), (w**2 * x, True))
    k = cm.compile(cm.Cost(expr, params=[w], data=[x], reduce="sum"))
    xs = [-2.0, 0.0, 3.0, 0.5, -0.25]
    theta = np.array([1.5])
    at = [{w: sp.Float(1.5), x: sp.Float(v)} for v in xs]
    ref = [sum(float(e.subs(point)) for point in at) for e in (expr, sp.diff(expr, w), sp.diff(expr, w, 2))]
    f, g = k.value_and_grad(theta, {"x": np.array(xs)})
    assert f == pytest.approx(ref[0], rel=1e-14)
    assert g[0] == pytest.approx(ref[1], rel=1e-14)
    assert k.hessian(theta, {"x": np.array(xs)})[0, 0] == pytest.approx(ref[2], rel=1e-14)


def test_generated_source_is_kept_and_readable():
    k = cm.compile(BY_NAME["huber"].cost)
    assert k.path.exists() and k.source == k.path.read_text()
    assert "# cost (mean over rows):" in k.source
    assert os.path.dirname(k.path) == os.environ["CALCML_CACHE_DIR"]


def test_compiled_softplus_within_4_ulp_over_the_line():
    """softplus's fast log1p (Goldberg's log(u)*e/(u-1)) against mpmath, extremes included."""
    w = cm.params("w")
    x = cm.data("x")
    k = cm.compile(cm.Cost(cm.softplus(w * x), params=[w], data=[x], reduce="sum"))
    rng = np.random.default_rng(1)
    zs = np.concatenate([
        rng.uniform(-40, 40, 1500), rng.uniform(-1e-3, 1e-3, 300),
        10 ** rng.uniform(-300, 2.8, 600), -(10 ** rng.uniform(-300, 2.8, 600)),
        [0.0, 5e-324, -5e-324, 36.7, 37.0, -700.0, 709.0, 800.0, -800.0, -745.0],
    ])
    ones = np.array([1.0])
    with mpmath.workdps(40):
        for z in zs:
            v = k.value(ones, {"x": np.array([z])})
            ref = mpmath.log1p(mpmath.exp(mpmath.mpf(float(z))))
            if ref < 2.2250738585072014e-308:  # subnormal or below: only absolute accuracy exists
                assert abs(v - float(ref)) <= 5e-324, z
            else:
                assert abs(mpmath.mpf(v) - ref) <= 4 * 2.0**-53 * ref, (z, v, ref)


def test_prepared_data_validated_once_and_frozen(lin):
    cost, k, cols, theta = lin
    ds = k.prepare(cols)
    assert ds.validated
    raw = k.value_and_grad(theta, cols)
    prepared = k.value_and_grad(theta, ds)
    assert raw[0] == prepared[0] and np.array_equal(raw[1], prepared[1])
    assert np.array_equal(k.hessian(theta, cols), k.hessian(theta, ds))
    with pytest.raises(ValueError):
        ds.columns[0][0] = np.nan  # read-only: the validation stays true
    bad = {c: v.copy() for c, v in cols.items()}
    bad["x1"][4] = np.inf
    with pytest.raises(cm.DataError, match=r"column 'x1' holds a non-finite value \(inf\) at row 4"):
        k.prepare(bad)


def test_thread_pool_runs_each_part_once_and_hands_back_errors():
    """calcml.native's pool: job(i) for every i exactly once, on distinct threads, and an
    exception raised on a worker reaches the caller (after every worker is done)."""
    import threading
    import time

    from calcml.native import ThreadPool

    pool = ThreadPool()
    for k in (1, 2, 3, 2):
        seen, threads = [], set()
        lock = threading.Lock()

        def job(i):
            time.sleep(0.01 * (k - i))  # the caller's part finishes last
            with lock:
                seen.append(i)
                threads.add(threading.get_ident())

        pool.run(job, k)
        assert sorted(seen) == list(range(k)) and len(threads) == k

    def failing(i):
        if i == 1:
            raise RuntimeError("worker 1 failed")

    with pytest.raises(RuntimeError, match="worker 1 failed"):
        pool.run(failing, 2)
    done = []
    pool.run(lambda i: done.append(i), 2)  # the pool still works, with no stale wake-ups
    assert sorted(done) == [0, 1]


def test_threaded_kernels_equal_serial_for_every_kind(monkeypatch):
    """value, grad, value_and_grad, hessian: threaded (forced, 3 threads) == serial, bit for bit."""
    from calcml import native

    cost = BY_NAME["logistic"].cost
    rng = np.random.default_rng(3)
    n_rows = 5 * 16384 + 37
    data = {c: rng.normal(size=n_rows) for c in cost.data_names}
    theta = rng.normal(size=len(cost.params))
    ks, kp = cm.compile(cost, parallel=False), cm.compile(cost, parallel=True)
    runs = []
    real_run = native.pool.run
    monkeypatch.setattr(native, "thread_count", lambda: 3)
    monkeypatch.setattr(native.pool, "run", lambda job, k: (runs.append(k), real_run(job, k)))
    assert ks.value(theta, data) == kp.value(theta, data)
    assert np.array_equal(ks.grad(theta, data), kp.grad(theta, data))
    assert np.array_equal(ks.hessian(theta, data), kp.hessian(theta, data))
    ds = ks.prepare(data)
    fs, gs = ks.value_and_grad(theta, ds)
    fp, gp = kp.value_and_grad(theta, ds)
    assert fs == fp and np.array_equal(gs, gp)
    assert runs == [3, 3, 3, 3]  # the parallel=True calls ran on three threads


def test_row_major_arrays_over_many_transpose_blocks(lin):
    """(N, d) arrays are transposed in blocks of rows: N spanning several blocks (and not a
    multiple of the block), float64, float32, int, and a strided view give the dict's bits."""
    from calcml import dataset

    cost, k, _cols, theta = lin
    n = 3 * dataset._TRANSPOSE_BLOCK + 123
    rng = np.random.default_rng(11)
    arr = rng.normal(size=(n, len(cost.data_names)))
    as_dict = {c: arr[:, j].copy() for j, c in enumerate(cost.data_names)}
    want = k.value_and_grad(theta, as_dict)
    for form in (arr, arr[::-1].copy()[::-1], np.vstack([arr, arr])[:n]):
        got = k.value_and_grad(theta, form)
        assert got[0] == want[0] and np.array_equal(got[1], want[1])
    ints = (arr * 100).astype(np.int32)
    got = k.value_and_grad(theta, ints)
    ref = k.value_and_grad(theta, {c: ints[:, j].astype(float) for j, c in enumerate(cost.data_names)})
    assert got[0] == ref[0] and np.array_equal(got[1], ref[1])
    f32 = arr.astype(np.float32)
    got = k.value_and_grad(theta, f32)
    ref = k.value_and_grad(theta, {c: f32[:, j].astype(float) for j, c in enumerate(cost.data_names)})
    assert got[0] == ref[0] and np.array_equal(got[1], ref[1])


def test_prepare_row_major_array_packs_once(lin):
    """k.prepare of an (N, d) array transposes straight into the staggered block: the same
    bits as the dict, read-only, a non-finite value named by column and row."""
    cost, k, cols, theta = lin
    arr = np.column_stack([cols[c] for c in cost.data_names])
    ds = k.prepare(arr)
    assert ds.validated and ds.block is not None and not ds.block.flags.writeable
    from calcml.dataset import stagger_lines

    assert ds.block.shape[1] % 512 == 8 * stagger_lines(arr.shape[1]) and np.all(ds.block[:, arr.shape[0]:] == 0.0)
    want = k.value_and_grad(theta, cols)
    got = k.value_and_grad(theta, ds)
    assert got[0] == want[0] and np.array_equal(got[1], want[1])
    bad = arr.copy()
    bad[7, 2] = np.nan
    with pytest.raises(cm.DataError, match=rf"column {cost.data_names[2]!r} holds a non-finite value \(nan\) at row 7"):
        k.prepare(bad)


# -- the data finiteness check, carried by the output sums where it can be ------------------

def test_strictness_analysis_of_expressions():
    """Which columns an expression is sure to pass a NaN or infinity on to (see _Plan.strict_in):
    each verdict checked against float arithmetic on the printed operation."""
    from calcml.codegen import _Plan

    w = cm.params("w")
    x, y = cm.data("x y")
    pl = _Plan([], [], set(), {})
    strict = lambda e: pl.strict_in(e, [x, y])  # noqa: E731
    assert strict(w * x + y) == {x, y}
    assert strict((w * x - y) ** 2) == {x, y}
    assert strict(sp.sqrt(x) * w) == {x}
    assert strict(x * sp.exp(-y)) == {x}  # exp(-inf) is 0: y may vanish
    assert strict(w / x) == frozenset()  # 1/inf is 0
    assert strict(cm.sigmoid(x) + cm.softplus(y)) == frozenset()
    assert strict(sp.Piecewise((x, x > 0), (0, True))) == frozenset()
    assert strict(x ** w) == frozenset()  # a symbolic exponent may be 0 or negative
    # The float facts behind the verdicts (inf * 0 is NaN, so a factor cannot hide a NaN):
    with np.errstate(all="ignore"):
        for bad in (np.nan, np.inf, -np.inf):
            for other in (0.0, -1.5, 2.0):
                assert not np.isfinite(bad + other) and not np.isfinite(bad * other)
                assert not np.isfinite(np.float64(bad) ** 2) and not np.isfinite(np.sqrt(bad))
            assert np.isfinite(np.exp(-np.float64(np.inf))) and np.isfinite(1.0 / np.float64(np.inf))


def _sigmoid_column_cost() -> cm.Cost:
    """(w * sigmoid(x) + b - y)**2: the column x is seen only through sigmoid."""
    w, b = cm.params("w b")
    x, y = cm.data("x y")
    return cm.Cost((w * cm.sigmoid(x) + b - y) ** 2, params=[w, b], data=[x, y])


@pytest.mark.parametrize("name", ["linreg", "sigmoid_column"])
def test_a_nonfinite_datum_is_named_wherever_it_is(name):
    """A NaN, inf or -inf in any column, at any kind of row, is a DataError naming the column
    and the row from value, grad, value_and_grad and hessian, with parameters zero or not.
    Rows: the first, one inside a LANES-row block, the last row of the last full block, the
    first and the last tail row after it, and in a two-chunk dataset the last row of the
    first chunk and a tail row of the second.

    linreg: every column is added and multiplied into the value and the gradient (their sums
    carry the check), but the Hessian has no y in it, so y must be tested per row there.
    sigmoid_column: sigmoid(inf) = 1 and sigmoid(-inf) = 0 are finite, so only a per-row test
    finds an infinity in x."""
    from calcml.codegen import CHUNK, LANES

    cost = BY_NAME["linreg"].cost if name == "linreg" else _sigmoid_column_cost()
    k = cm.compile(cost)
    names = cost.data_names
    rng = np.random.default_rng(23)
    short, long = 3 * LANES + 5, CHUNK + 2 * LANES + 5
    places = [(short, row) for row in (0, LANES + 3, 3 * LANES - 1, 3 * LANES, short - 1)]
    places += [(long, CHUNK - 1), (long, long - 2)]
    # sigmoid of an infinity is finite: a NaN-propagating sum cannot carry x's check
    with np.errstate(over="ignore"):
        assert 1 / (1 + np.exp(-np.inf)) == 1.0 and 1 / (1 + np.exp(np.inf)) == 0.0
    for theta in (np.zeros(len(cost.params)), rng.normal(size=len(cost.params))):
        for n, row in places:
            clean = {c: rng.normal(size=n) for c in names}
            for column in names:
                for bad in (np.nan, np.inf, -np.inf):
                    data = {**clean, column: clean[column].copy()}
                    data[column][row] = bad
                    message = rf"column {column!r} holds a non-finite value \({bad}\) at row {row}"
                    for kernel in (k.value, k.grad, k.value_and_grad, k.hessian):
                        with pytest.raises(cm.DataError, match=message):
                            kernel(theta, data)


def test_linear_regression_leaves_its_data_check_to_the_sums():
    """Structural on purpose: which columns a kernel tests per row and which its output sums
    check changes no result (both give the DataError tested above); it is the kernels' speed
    (no per-row test where the sums carry the check), which only timing would show. So it is
    read from the RowProgram the kernels are printed from (ModuleBuilder.program), not from
    the module's text: linreg's value and gradient sums carry every column, and the Hessian,
    which has no y, checks x0..x2 through its sums and y per row."""
    from calcml.codegen import ModuleBuilder

    cost = BY_NAME["linreg"].cost
    mb = ModuleBuilder(cost, with_hessian=True)
    every = tuple(range(len(cost.data)))
    for kind in ("value", "grad", "value_and_grad"):
        prog = mb.program(kind)
        assert prog.slot_checked == every and prog.row_check is None, kind
    hess = mb.program("hessian")
    assert hess.slot_checked == every[:-1] and hess.row_check is not None


@pytest.mark.parametrize("problem", [p for p in PROBLEMS if p.cost.data], ids=lambda p: p.name)
def test_every_kernel_names_a_nonfinite_datum(problem: Problem):
    """A NaN, inf or -inf anywhere (block rows and tail rows; parameters zero or not) is
    reported by every kernel with its column and row, whether a per-row test or an output
    sum carries the check for that column."""
    k = cm.compile(problem.cost)
    names = problem.cost.data_names
    n_rows = 3 * 16 + 5  # three blocks of lanes, then five tail rows

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(zero_theta=st.booleans(), seed=st.integers(0, 2**32 - 1), column=st.sampled_from(names),
           row=st.integers(0, n_rows - 1), bad=st.sampled_from([np.nan, np.inf, -np.inf]))
    def check(zero_theta, seed, column, row, bad):
        rng = np.random.default_rng(seed)
        lo, hi = problem.data_range
        data = {}
        for name in names:
            if name in problem.binary_columns:
                data[name] = rng.integers(0, 2, n_rows).astype(np.float64)
            elif name in problem.positive_columns:
                data[name] = rng.uniform(0.1, hi, n_rows)
            else:
                data[name] = rng.uniform(lo, hi, n_rows)
        data[column][row] = bad
        theta = np.zeros(len(problem.cost.params)) if zero_theta else rng.uniform(*problem.theta_range, len(problem.cost.params))
        message = rf"column {column!r} holds a non-finite value \({bad}\) at row {row}"
        for kernel in (k.value, k.grad, k.value_and_grad, k.hessian):
            with pytest.raises(cm.DataError, match=message):
                kernel(theta, data)

    check()


def test_finite_data_that_overflow_are_not_an_error(lin):
    """A sum that overflows on finite data sets off the check; the rescan finds the data
    finite and the kernel returns what the unchecked (prepared) kernel returns."""
    cost, k, cols, theta = lin
    big = {c: v.copy() for c, v in cols.items()}
    big["x0"][7] = 1e200
    with np.errstate(all="ignore"):
        want_f, want_g = k.value_and_grad(theta, k.prepare(big))
    assert math.isinf(want_f)
    f, g = k.value_and_grad(theta, big)
    assert f == want_f and np.array_equal(g, want_g, equal_nan=True)
    assert math.isinf(k.value(theta, big))


_PYTHON_RUN = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
import calcml as cm
from problems import BY_NAME, sample_args
out = {{}}
for name in {names!r}:
    problem = BY_NAME[name]
    k = cm.compile(problem.cost)
    args = sample_args(problem)
    f, g = k.value_and_grad(*args)
    out[name] = [float(f).hex(), [float(v).hex() for v in g], [float(v).hex() for v in k.hessian(*args).ravel()],
                 k.compiled, sorted(type(fn).__name__ for fn in k._fns.values())]
print(json.dumps(out))
"""


def test_numba_disable_jit_runs_the_same_kernels_as_python():
    """With NUMBA_DISABLE_JIT=1 (Numba's debugging switch) the generated kernels run as Python
    functions, and give what the compiled kernels give: the same source, two executions."""
    names = ["linreg", "logistic", "huber", "nonsmooth", "tanh_net", "rosenbrock", "nodata_mixed"]
    python = _run_without_jit(_PYTHON_RUN, names)
    for name in names:
        k = cm.compile(BY_NAME[name].cost)
        args = sample_args(BY_NAME[name])
        f, g = k.value_and_grad(*args)
        pf, pg, ph, compiled, kinds = python[name]
        assert compiled == [], f"{name}: Numba compiled a kernel with the JIT disabled"
        assert kinds and set(kinds) == {"function"}, f"{name}: kernels were not run as Python: {kinds}"
        got = np.array([float.fromhex(pf), *map(float.fromhex, pg), *map(float.fromhex, ph)])
        want = np.array([f, *g, *k.hessian(*args).ravel()])
        # the same operations in the same order; math functions: libm either way (tol. 2 ulp)
        np.testing.assert_allclose(got, want, rtol=4.5e-16, atol=0, err_msg=name)
        if name in ("linreg", "rosenbrock"):  # + and * only: the very same bits
            assert np.array_equal(got, want), name


def test_a_step_times_what_vanishes_with_it_is_zero_at_the_kink():
    """Squared hinge stated with a step: the gradient of Heaviside(u)*u**2 has the term
    u**2 * DiracDelta(u), which is 0 at u = 0 (f(u) DiracDelta(u) = f(0) DiracDelta(u)), not
    0 * NaN; relu(u)**2's Hessian has relu(u) * DiracDelta(u), likewise 0. Data with rows on
    the kink: the kernels against the closed forms (relu's derivative 0 at 0), and Newton on
    each statement at the minimum of the Piecewise statement."""
    w, b = cm.params("w b")
    x, y = cm.data("x y")
    xs = np.linspace(-1.0, 1.0, 41)
    D = {"x": xs, "y": np.sign(xs)}
    u = 1 - y * (w * x + b)
    theta = np.array([1.0, 0.0])  # rows x = +-1 sit on the kink u = 0
    U = 1 - D["y"] * (theta[0] * xs + theta[1])
    assert (U == 0).sum() == 2
    J = np.column_stack([-D["y"] * xs, -D["y"]])  # du/dtheta per row
    g_ref = (2 * np.maximum(U, 0)[:, None] * J).mean(0)
    H_ref = 2 * np.einsum("n,ni,nj->ij", (U > 0).astype(float), J, J) / len(xs)
    heaviside = cm.Cost(sp.Heaviside(u) * u**2, params=[w, b], data=[x, y])
    np.testing.assert_allclose(cm.compile(heaviside).grad(theta, D), g_ref, rtol=1e-14, atol=1e-15)
    k = cm.compile(cm.Cost(cm.relu(u) ** 2, params=[w, b], data=[x, y]))
    np.testing.assert_allclose(k.hessian(theta, D), H_ref, rtol=1e-14, atol=1e-15)
    piecewise = cm.Cost(sp.Piecewise((u**2, u > 0), (0, True)), params=[w, b], data=[x, y])
    best = cm.minimize(piecewise, theta, data=D, method="newton")
    assert best.success
    for c in (heaviside, cm.Cost(cm.relu(u) ** 2, params=[w, b], data=[x, y])):
        # Heaviside(u)*u**2's Hessian has u**2 * DiracDelta(u, 1): no value at the kink, so
        # Newton takes a steepest-descent step there, not a NaN one
        res = cm.minimize(c, theta, data=D, method="newton")
        assert res.success, res.message
        np.testing.assert_allclose(res.x, best.x, atol=1e-9)
    # the same in index form (the tensor kernels print through the same rewrite)
    wv, xv = cm.params("wv", shape=(1,)), cm.data("xv", shape=(1,))
    ut = 1 - y * (cm.dot(wv, xv) + b)
    Dt = {"xv": xs[:, None], "y": D["y"]}
    kt = cm.compile(cm.Cost(sp.Heaviside(ut) * ut**2, params=[wv, b], data=[xv, y]))
    np.testing.assert_allclose(kt.grad(theta, Dt), g_ref, rtol=1e-14, atol=1e-15)
    kt = cm.compile(cm.Cost(cm.relu(ut) ** 2, params=[wv, b], data=[xv, y]))
    np.testing.assert_allclose(kt.hessian(theta, Dt), H_ref, rtol=1e-14, atol=1e-15)


def test_dirac_times_helper_values():
    from calcml.printing import DiracTimes, dirac_products, helper_source

    z, r = sp.symbols("z r")
    assert dirac_products(r * z**2 * sp.DiracDelta(z)) == DiracTimes(z, r * z**2)
    assert dirac_products(sp.DiracDelta(z, 1) * z) == sp.DiracDelta(z, 1) * z  # order 1 keeps NaN at 0
    ns: dict = {"math": math}
    exec(helper_source(["_dirac_times"]), ns)
    f = ns["_dirac_times"]
    assert f(0.0, 0.0) == 0.0 and math.isnan(f(0.0, 1.0)) and f(2.0, 5.0) == 0.0
    assert math.isnan(f(math.nan, 0.0)) and math.isnan(f(1.0, math.inf))


def test_a_sum_of_many_terms_prints_in_its_own_order_and_evaluates_exactly(tmp_path, monkeypatch):
    """Sums of more than printing.ORDERED_TERMS_MAX terms print in their canonical argument
    order (SymPy's monomial sort costs seconds at 1,000 symbols): every term is still there, and
    the kernels agree with SymPy's own evaluation; the Cost's key is the same in processes with
    other string hashes."""
    import subprocess
    import sys

    from calcml.printing import ORDERED_TERMS_MAX

    monkeypatch.setenv("CALCML_CACHE_DIR", str(tmp_path))
    n = 40
    xs = cm.params("x", n)
    f = sp.Add(*(100 * (xs[i + 1] - xs[i] ** 2) ** 2 + (1 - xs[i]) ** 2 for i in range(n - 1)))
    assert len(f.args) > ORDERED_TERMS_MAX
    cost = cm.Cost(f, params=list(xs))
    theta = np.random.default_rng(3).uniform(-1.5, 1.5, n)
    at = dict(zip(xs, map(sp.Float, theta)))
    v, g = cm.compile(cost).value_and_grad(theta)
    assert v == pytest.approx(float(f.subs(at)), rel=1e-14)
    np.testing.assert_allclose(g, [float(sp.diff(f, s).subs(at)) for s in xs], rtol=1e-13, atol=1e-12)
    script = ("import sympy as sp, calcml as cm; xs = cm.params('x', 40); "
              "print(cm.Cost(sp.Add(*(100 * (xs[i + 1] - xs[i] ** 2) ** 2 + (1 - xs[i]) ** 2 for i in range(39))), "
              "params=list(xs)).key)")
    keys = {subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout.strip() for seed in ("1", "2")}
    assert keys == {cost.key}
