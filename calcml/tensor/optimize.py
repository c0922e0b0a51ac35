"""Optimizers on tensor costs: one generated module per (cost, optimizer, schedule, batching).

Every module holds the cost's kernels (:mod:`calcml.tensor.codegen`). A first-order method's
loop, full batch or minibatch, is calcml.loop's, written by :mod:`calcml.tensor.loops` (its
gradient by the kernels); here calcml runs it (:func:`_run_loop`), and over Dask data a
minibatch fit's epochs go chunk by chunk (:func:`_dask_epochs`). Line-search and trust-region
methods (L-BFGS, Newton, Newton-CG) take NumPy steps over the threaded kernels
(:mod:`calcml.tensor.search`); their module's ``minimize`` runs the same steps over its own
kernels, serially. Every module needs only NumPy and Numba (``prog.export(path)``).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from functools import partial

import numpy as np

from .. import result as _result
from ..dataset import is_dask, real_array
from ..errors import DataError, OptimizeError, ParamError
from ..optim import Optimizer
from .. import ir
from .. import loop as _loop
from ..schedules import Schedule
from .kernels import (HESSIAN_MAX, STRIPES, TensorData, _SingleThreadedBlas, as_tensor_data, compile_tensor,
                      run_striped, sum_in_order, thread_count)
from . import loops
from .model import TensorCost

__all__ = ["TensorProgram", "program_for_tensor"]


_EVAL = '''

# -- full-data evaluations: the compiled kernels stripe by stripe ------------------------------------''' + loops.STRIPES_SOURCE + '''

def full_value_and_grad(theta, cols, g):
    """the full cost at theta, its gradient into g: the compiled kernels called stripe by stripe
    from Python (as calcml's kernels do; the same bits)"""
    v = np.empty(0)
    bounds = cols[0]
    acc = np.zeros((bounds.shape[0], max(ACC_SIZES["vg"], 1)))
    if len(cols) > 2 and DATA_NAMES:
        for k in range(bounds.shape[0]):
            vg_rows(theta, v, *cols[2:], bounds[k, 0], bounds[k, 1], cols[1], acc[k])
    total = _in_order(acc)
    res = np.empty(N_PARAMS + 1)
    vg_finish(theta, v, total, res)
    g[:] = res[1:]
    return float(res[0])


def _in_order(acc):
    total = acc[0].copy()
    for k in range(1, acc.shape[0]):
        total += acc[k]
    return total


'''

_SEARCH_DRIVER = '''

def _hvp_at(theta, cols):
    """v -> H(theta) v through this module's hvp kernels, stripe by stripe"""
    def hv(v):
        bounds = cols[0]
        acc = np.zeros((bounds.shape[0], max(ACC_SIZES["hvp"], 1)))
        if DATA_NAMES:
            for k in range(bounds.shape[0]):
                hvp_rows(theta, v, *cols[2:], bounds[k, 0], bounds[k, 1], cols[1], acc[k])
        out = np.empty(N_PARAMS)
        hvp_finish(theta, v, _in_order(acc), out)
        return out
    return hv


def minimize(x0, arrays=(), n_rows=0, maxiter=None, tol=1e-8, callback=None):
    """Minimize from x0 (flat, PARAM_NAMES order) with METHOD; arrays: the data in DATA_NAMES
    order, (N, ...) each. Returns the report dict (x, fun, grad, grad_norm, nit, status, ...)."""
    cols = columns(tuple(np.ascontiguousarray(a) for a in arrays), n_rows, REDUCE_MEAN)
    g = np.empty(N_PARAMS)

    def fg(t):
        f = full_value_and_grad(t, cols, g)
        return f, g.copy()

    def hess(t):
        hv = _hvp_at(t, cols)
        H = np.column_stack([hv(e) for e in np.eye(N_PARAMS)])
        return 0.5 * (H + H.T)

    return run_search(METHOD, fg, np.asarray(x0, dtype=np.float64), tol=tol, hyper=HYPER,
                      maxiter=DEFAULT_MAXITER if maxiter is None else maxiter,
                      value=lambda t: fg(t)[0], hvp=lambda t: _hvp_at(t, cols), hess=hess, callback=callback)
'''


# The standalone entry of every tensor optimizer module: run() over a dict of data arrays,
# as an exported module's user calls it (calcml itself validates the data and calls drive
# or minimize).
_DATA_ARRAYS = '''

# -- run(): the fit over a dict of data arrays (what an exported module's user calls) ------------
def data_arrays(data):
    """The data in DATA_NAMES order, checked against DATA_LAYOUT ((name, shape of a row, number
    of classes for labels, else None)), and their row count."""
    if not DATA_LAYOUT:
        if data is not None:
            raise ValueError("this cost reads no data: leave data out")
        return (), 0
    if not isinstance(data, dict):
        raise ValueError(f"data is a dict {{name: array}} with {list(DATA_NAMES)}, got {type(data).__name__}")
    missing = [name for name in DATA_NAMES if name not in data]
    if missing:
        raise ValueError(f"data is missing {', '.join(map(repr, missing))}; the cost reads {list(DATA_NAMES)}")
    arrays, n = [], None
    for name, shape, classes in DATA_LAYOUT:
        if classes is None:
            a = np.ascontiguousarray(data[name], dtype=np.float64)
            if a.ndim != 1 + len(shape) or a.shape[1:] != shape:
                raise ValueError(f"data {name!r} must have shape (N{''.join(f', {s}' for s in shape)}), got {a.shape}")
            bad = np.flatnonzero(~np.isfinite(a.reshape(a.shape[0], -1)).all(1))
            if bad.size:
                raise ValueError(f"data {name!r} holds NaN or inf at row {int(bad[0])}")
        else:
            raw = np.asarray(data[name])
            a = np.ascontiguousarray(raw, dtype=np.int64)
            if a.ndim != 1 or (a != raw).any() or (a.size and (a.min() < 0 or a.max() >= classes)):
                raise ValueError(f"labels {name!r} must be a 1-D array of class numbers 0 … {classes - 1}")
        if n is not None and a.shape[0] != n:
            raise ValueError(f"data {name!r} has {a.shape[0]} rows but {DATA_NAMES[0]!r} has {n}")
        n = a.shape[0]
        arrays.append(a)
    if n == 0:
        raise ValueError("the data have no rows")
    return tuple(arrays), n


def _flat_x0(x0):
    """x0 flat (PARAM_NAMES in order, each in C order), or a dict {name: array of its PARAM_SHAPES shape}."""
    if isinstance(x0, dict):
        if sorted(x0) != sorted(PARAM_NAMES):
            raise ValueError(f"x0 as a dict names the parameters {list(PARAM_NAMES)}, got {sorted(x0)}")
        parts = []
        for name, shape in zip(PARAM_NAMES, PARAM_SHAPES):
            a = np.asarray(x0[name], dtype=np.float64)
            if a.shape != shape:
                raise ValueError(f"x0[{name!r}] must have shape {shape}, got {a.shape}")
            parts.append(a.reshape(-1))
        x0 = np.concatenate(parts) if parts else np.zeros(0)
    x = np.array(x0, dtype=np.float64).reshape(-1)
    if x.shape != (N_PARAMS,):
        raise ValueError(f"x0 must hold the {N_PARAMS} parameters {list(PARAM_NAMES)} flat (C order), got {x.size}")
    return x
'''

_SEARCH_RUN = _DATA_ARRAYS + '''

def run(x0, data=None, *, epochs=None, maxiter=None, tol=1e-8, seed=0, callback=None):
    """Minimize from x0 (flat: PARAM_NAMES in order, each in C order; or a dict {name: array}) over data, a dict
    {name: array} with DATA_NAMES ((N, *shape of a row) each; labels as class numbers), with
    METHOD and its numbers HYPER. The keywords are those of every calcml program: a full-batch
    method counts its iterations in maxiter (or epochs, when maxiter is None); seed does not
    change it. callback(iteration, max_iterations, value), if given, is called after each
    iteration. Returns the report: a dict with x, fun, grad, nit, status, status_name,
    history and the bookkeeping."""
    arrays, n_rows = data_arrays(data)
    rep = minimize(_flat_x0(x0), arrays, n_rows, epochs if maxiter is None else maxiter, tol, callback)
    rep["status_name"] = STATUS_NAMES[rep["status"]]
    return rep
'''


def _layout(cost: TensorCost) -> tuple:
    """(name, shape of a row, number of classes for labels, else None) per datum, in order."""
    from .statement import Label

    return tuple((name, tuple(shape), item.classes if isinstance(item, Label) else None)
                 for item, (name, shape) in zip(cost.data, cost.data_shapes.items()))


class _Source:
    """A line-search or trust-region program's module after the kernels (first-order methods'
    loops are calcml.loop's generator's: :mod:`calcml.tensor.loops`)."""

    def __init__(self, cost: TensorCost, opt: Optimizer):
        self.cost, self.opt = cost, opt

    @staticmethod
    def _constants(**values) -> list:
        """The status codes and the module's constants."""
        return _result.status_statements(with_names=True) + [ir.Assign(name, repr(v)) for name, v in values.items()]

    def search_text(self) -> str:
        """A line-search or trust-region program's standalone part: calcml.tensor.search's
        steps and a ``minimize`` over this module's kernels (run serially; calcml itself runs
        the same steps over its threaded kernels)."""
        import inspect

        from . import search

        opt, cost = self.opt, self.cost
        body = [self._constants(REDUCE_MEAN=cost.reduce == "mean", STRIPES=STRIPES, DATA_NAMES=cost.data_names,
                                PARAM_NAMES=cost.param_names, PARAM_SHAPES=tuple(cost.param_shapes.values()),
                                METHOD=opt.kind, HYPER=dict(opt.hyper, **opt.extra),
                                DATA_LAYOUT=_layout(cost),
                                DEFAULT_MAXITER=opt.default_maxiter),
                ir.Assign("DUMMY_DATA", "(np.zeros(1),)")]
        steps = inspect.getsource(search)
        steps = steps[steps.index("\nRUNNING = -1\n") + 1:]  # the steps, after the file's imports and statuses
        return (ir.render(body) + _EVAL + "\n\n# -- the steps (calcml/tensor/search.py) --\n" + steps + _SEARCH_DRIVER
                + _SEARCH_RUN)


class TensorProgram:
    """A compiled optimizer for a tensor cost (what :func:`calcml.generate` returns for one)."""

    def __init__(self, cost: TensorCost, opt: Optimizer, schedule: Schedule | None, batch_size):
        self.cost, self.optimizer, self.schedule, self.batch_size = cost, opt, schedule, batch_size
        self.minibatch = batch_size is not None
        self.notes_batch_default = False
        self._module = None
        self._text = None
        self.param_names = cost.param_names

    @property
    def has_data(self) -> bool:
        return self.cost.has_data

    def _kinds(self):
        kinds = ["value", "vg"]
        if self.optimizer.kind in ("newton", "newton-cg"):
            kinds.append("hvp")
        return tuple(kinds)

    def _build(self) -> str:
        if loops.takes(self.optimizer, self.minibatch):  # calcml.loop's generator, the kernels its gradient
            return loops.generate_source(self.cost, self.optimizer, self.schedule, self.minibatch)
        base, _sizes = self.cost.module_source(self._kinds())
        return base + "\n\n" + _Source(self.cost, self.optimizer).search_text()

    @property
    def module(self):
        if self._module is None:
            from ..compile import _fingerprint, load_or_build

            sched = self.schedule.structure() if self.schedule is not None else "none"
            key = hashlib.sha256(
                f"tensor-opt|{_fingerprint()}|{self.cost.key}|{self.optimizer.structure()}|{sched}|"
                f"{self.minibatch}".encode()).hexdigest()
            self._module, self._text, self.path = load_or_build(key, self._build)
            self.module_key = key
            mod = self._module
            if hasattr(mod, "run_segment_c") and not isinstance(mod._segment, _loop._NativeSegment):
                mod.python_tier_passes = _tier_passes(self.cost)
                mod.python_tier_seconds = partial(_tier_seconds, mod)
                mod._segment = _loop._NativeSegment(mod, self.path)
        return self._module

    @property
    def source(self) -> str:
        """The generated module: kernels, compiled loops and the driver, readable Python."""
        self.module  # noqa: B018
        return self._text

    def export(self, path):
        """Write the module as a standalone file (it needs only NumPy and Numba) whose
        ``run(x0, data, ...)`` does the whole fit, data a dict of arrays; its defaults are this
        program's hyperparameters, schedule numbers and batch size."""
        from ..program import export_text

        text = export_text(self.source, self, numbers=self.optimizer.kind == "first_order")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def __repr__(self):
        return f"<calcml.Program {self.optimizer!r} for {self.cost!r}>"

    def run(self, x0, data=None, *, epochs=None, maxiter=None, tol=1e-8, seed=0, progress=False):
        return run_tensor(self, x0, data, epochs=epochs, maxiter=maxiter, tol=tol, seed=seed, progress=progress)


def _x0(cost: TensorCost, x0) -> np.ndarray:
    if isinstance(x0, dict):
        return cost.pack(x0)
    x = real_array(x0, "x0", ParamError, copy=True)
    if x.shape != (cost.n_params,):
        raise ParamError(f"x0 must have shape ({cost.n_params},) (parameters {list(cost.param_names)} flat, in C "
                         f"order) or be a dict {{name: array}}; got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ParamError(f"x0[{bad[0]}] ({cost.flat_names()[bad[0]]}) is {x[bad[0]]}: the starting point must be finite")
    return x


class Evaluations:
    """A fit's full-data evaluations in memory: the cost's compiled, threaded kernels over the
    validated data (calcml.dask_data.DaskFit has the same methods over Dask data)."""

    def __init__(self, cost: TensorCost, td):
        self.k, self.td = compile_tensor(cost), td
        self._fast = {}  # kind -> the kernel prepared for this data (TensorKernels.prepared), or None

    def _prepared(self, kind):
        if kind not in self._fast:
            self._fast[kind] = self.k.prepared(kind, self.td)
        return self._fast[kind]

    def value(self, theta) -> float:
        fast = self._prepared("value")
        return float(fast(theta)[0]) if fast is not None else self.k.value(theta, self.td)

    def value_and_grad(self, theta) -> tuple:
        fast = self._prepared("vg")
        if fast is None:
            return self.k.value_and_grad(theta, self.td)
        out = fast(theta)
        return float(out[0]), out[1:]

    def hvp(self, theta, v):
        fast = self._prepared("hvp")
        return fast(theta, v) if fast is not None else self.k.hvp(theta, v, self.td)

    def hvp_at(self, theta):
        return self.k.hvp_at(theta, self.td)

    def hessian(self, theta):
        return self.k.hessian(theta, self.td)


_H_DIFF = float(np.finfo(np.float64).eps) ** (1 / 3)  # central differences' step, relative to max(1, |x|)


def _differences(full, cols, n: int):
    """``hvp(x, v)``: H(x) v for a unit v from central differences of the exact gradient,
    (g(x + h v) - g(x - h v)) / 2h, by the fit's own evaluation ``full(theta, cols, g)``;
    None where the cost is not finite at x +- h v."""
    g1, g2 = np.empty(n), np.empty(n)

    def hvp(x, v):
        h = _H_DIFF * max(1.0, float(np.linalg.norm(x)))
        if not (math.isfinite(full(x + h * v, cols, g1)) and math.isfinite(full(x - h * v, cols, g2))):
            return None
        return (g1 - g2) / (2.0 * h)
    return hvp


def _auto_rate(prog: TensorProgram, x, ev, notes, differences=None) -> float:
    """lr="auto": 1/L, L the Hessian's largest eigenvalue at x0 by power iteration
    (:func:`calcml.program.largest_eigenvalue`, as for a scalar cost beyond 16 parameters).
    Its products H v: in memory, central differences of the exact gradient by the loop's own
    evaluation (``differences``, :func:`_differences`: within about 1e-9 of L, measured, far
    inside the iteration's 1e-4, and no Hessian kernel to build for a first fit: about 1.9 s of
    a cold one); over Dask data, or where the cost is not finite a step away, exact products."""
    from ..program import largest_eigenvalue

    how = ["differences of exact gradients" if differences is not None else "exact Hessian-vector products"]

    def hvp(v):
        hv = differences(x, v) if differences is not None and how[0].startswith("differences") else None
        if hv is None:
            how[0] = "exact Hessian-vector products"
            hv = ev.hvp(x, v)
        return hv
    lam = largest_eigenvalue(hvp, prog.cost.n_params)
    if not (lam > 0.0 and math.isfinite(lam)):
        notes.append("lr='auto' chose lr=1: the Hessian at x0 is zero, so it bounds no step")
        return 1.0
    notes.append(f"lr='auto' chose lr={1.0 / lam:.6g} = 1/L, L={lam:.6g} the largest eigenvalue of the Hessian "
                 f"at x0, estimated by power iteration on {how[0]}")
    return 1.0 / lam


def run_tensor(prog: TensorProgram, x0, data=None, *, epochs=None, maxiter=None, tol=1e-8, seed=0, progress=False):
    cost, opt = prog.cost, prog.optimizer
    x = _x0(cost, x0)
    from ..program import _count, _decaying, _rate_reported  # the scalar path's check of a count: one message for both

    epochs = _count("epochs", epochs)
    maxiter = _count("maxiter", maxiter, minimum=0)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
        raise OptimizeError(f"tol must be a non-negative number, got tol={tol!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise OptimizeError(f"seed must be an integer in [0, 2**64), got seed={seed!r}")
    if progress not in (True, False):
        raise OptimizeError(f"progress must be True or False, got progress={progress!r}")
    over = _over_dask(cost, data)  # Dask data: each evaluation one Dask computation
    if over is not None:  # (the row count: from the first pass, except for minibatches, which need it first)
        ev, arrays, n_rows = over, (), over.n_rows if prog.minibatch else 0
    else:
        td = as_tensor_data(cost, data, check_finite=True) if cost.has_data or data is not None else None
        ev = Evaluations(cost, td)
        arrays, n_rows = (td.arrays, td.n_rows) if td is not None else ((), 0)
    if prog.batch_size is not None and over is not None and n_rows == 0:
        raise DataError("the data have no rows")
    if prog.batch_size is not None and prog.batch_size > n_rows:
        raise OptimizeError(f"batch_size={prog.batch_size} is larger than the data ({n_rows} rows)")
    if opt.kind == "newton" and cost.n_params > HESSIAN_MAX:
        raise OptimizeError(f"method='newton' solves with the dense Hessian, {cost.n_params} x {cost.n_params} here "
                            f"({cost.n_params ** 2 * 8 / 2**30:.1f} GiB, {cost.n_params} passes over the data a step); "
                            f"for more than {HESSIAN_MAX} parameters use method='newton-cg' (exact Hessian-vector "
                            f"products, no dense Hessian) or 'lbfgs'")
    notes = []
    lr_used = opt.lr
    sched_values = prog.schedule.values() if prog.schedule is not None else []
    by_loop = loops.takes(opt, prog.minibatch)  # calcml.loop's run_segment, the kernels its gradient
    if lr_used == "auto":
        differences = _differences(_ev_full(ev), None, cost.n_params) if by_loop and over is None else None
        with _SingleThreadedBlas():
            lr_used = _auto_rate(prog, x, ev, notes, differences)
        sched_values = [lr_used]
    bar = None
    if progress:
        from ..program import _ProgressBar

        bar = _ProgressBar(opt.name)
    try:
        if by_loop and over is not None and prog.minibatch:  # the epochs chunk by chunk, the loop's steps
            rep = _dask_epochs(prog, x, over, sched_values, epochs, maxiter, float(tol), int(seed), bar)
        elif by_loop:
            rep = _run_loop(prog, x, ev, over, arrays, n_rows, sched_values, epochs, maxiter, float(tol), int(seed), bar)
        else:
            rep = _search(prog, x, ev, epochs, maxiter, float(tol), bar)
        if bar is not None:
            bar.finish(rep["nit"], rep["fun"], rep["status"])
    finally:
        if bar is not None:
            bar.close()
    if over is not None:
        n_rows = over.n_rows
    status = rep["status"]
    if status == _result.DIVERGED and rep["nit"] == 0:
        problem = _result.start_error(rep["fun"], rep["grad"], cost.flat_names())
        if problem:
            raise ParamError(problem)
    rate_hint = ""
    if prog.schedule is not None and opt.lr is not None:
        lr = lr_used if isinstance(lr_used, float) else prog.schedule.initial
        rate_hint = f" (lr was {lr:g}; try lr={lr / 10:g})"
    if status == _result.CONVERGED and rep["nit"]:
        status = _result.unbounded(status, rep["x"], x, rep["fun"], ev.value)
    noise = None
    if n_rows and cost.has_data:
        noise = partial(_dask_noise, cost, over, rep["x"]) if over is not None else \
            partial(_tensor_noise, prog, arrays, n_rows, rep["x"])
    status, level = _result.within_noise(status, rep["grad_norm"], noise, rep["nit"])
    success, message = _result.message(
        status, grad_norm=rep["grad_norm"], tol=tol, nit=rep["nit"], epochs=rep["epochs"],
        diverged_at=rep["diverged_at"], blowup=rep["blowup"], best_step=rep["best_step"],
        best_value=rep["best_value"], rate_hint=rate_hint, x=rep["x"], noise=level, n_rows=n_rows,
        method=opt.name, decaying=_decaying(prog.schedule))
    return _result.OptimizeResult(
        x=rep["x"], params=cost.unpack(rep["x"]), fun=float(rep["fun"]), grad_norm=float(rep["grad_norm"]),
        jac=rep["grad"], nit=int(rep["nit"]), nfev=int(rep["nfev"]), success=success, status=status, message=message,
        history=rep["history"], history_every=rep.get("history_every", 1), method=opt.name, lr=_rate_reported(opt, prog.schedule, lr_used),
        notes=notes, path=rep.get("path"), minibatch=prog.batch_size is not None)


def _ev_full(ev):
    """``full(theta, cols, g)``: the full cost at theta, its gradient into g, by the fit's
    evaluations ``ev`` (cols is not read)."""
    def full(theta, _cols, g):
        value, grad = ev.value_and_grad(theta)
        g[:] = grad
        return value
    return full


# drive's report, in its order (calcml.loop's modules)
_REPORT = ("x", "fun", "grad", "grad_norm", "nit", "nfev", "status", "history", "history_every", "path", "epochs",
           "best_step", "best_value", "diverged_at", "blowup")


def _run_loop(prog: TensorProgram, x, ev, over, arrays, n_rows, sched_values, epochs, maxiter, tol, seed, bar) -> dict:
    """A run of a module of calcml.loop's generator (:mod:`calcml.tensor.loops`): its ``drive``,
    each full pass over large data on calcml's threads (the same bits as the loop's own), over
    Dask data each one Dask computation (the loop then reads stand-in arrays of one row, NaN,
    which no pass reads)."""
    cost, opt, mod = prog.cost, prog.optimizer, prog.module
    hyper = {k: float(v) for k, v in opt.hyper.items()}
    sched = sched_values or [0.0]
    if over is not None:
        def passes(_cols):
            return lambda theta, g: over.full(theta, None, g)

        stand_in = tuple(np.full((1, *shape), np.nan) if classes is None else np.zeros(1, dtype=np.int64)
                         for _, shape, classes in mod.DATA_LAYOUT)
        with _SingleThreadedBlas():  # the kernels' BLAS calls on the calling thread, for the whole run
            out = mod._drive(x, stand_in, hyper, sched, None, epochs, maxiter, tol, seed, bar, first_segment=1,
                             passes=mod._Passes(passes(None)))
    else:
        extra = {}
        if cost.has_data and thread_count("auto", n_rows) > 1:
            full = _threaded_passes(prog, ev, arrays, n_rows)
            extra["passes"] = lambda _cols: full
        with _SingleThreadedBlas():  # the kernels' BLAS calls on the calling thread, for the whole run
            out = mod.drive(x, arrays if cost.has_data else None, hyper, sched, prog.batch_size, epochs, maxiter, tol,
                            seed, bar, **extra)
    return dict(zip(_REPORT, out))


def _threaded_passes(prog: TensorProgram, ev, arrays, n_rows: int):
    """``full(theta, g)``: the run's passes over all rows on calcml's threads (the kernels'
    stripes, their sums added in stripe order: the bits of the loop's serial pass), chosen at
    the first pass by what costs no compile: the cost's compiled kernels (``ev``) where this
    process has them or their machine code is kept on disk; else the loop module's own kernels,
    which the loop's compile made in this process, or Numba's cache of the module holds (the
    cost's kernels would be a second compile of the same code: 1.5 s of W10's first fit)."""
    cost, mod = prog.cost, prog.module
    chosen = []

    def full(theta, g):
        if not chosen:
            chosen.append(_ev_full(ev) if _kernels_on_hand(cost) else _module_passes(mod, arrays, n_rows))
        return chosen[0](theta, None, g)

    return full


def _kernels_on_hand(cost: TensorCost) -> bool:
    """Whether the machine code of the cost's value-and-gradient kernels is loaded in this
    process or kept on disk (calcml.native)."""
    from .. import native

    k = compile_tensor(cost)
    if k._native_fns.get("vg"):
        return True
    base = k._module("base")
    return native.object_path(base._calcml_path, "vg_rows_c").exists()


def _module_passes(mod, arrays, n_rows: int):
    """``full(theta, cols, g)`` over ``arrays`` by the loop module's own compiled kernels
    (``vg_rows`` on calcml's threads, one stripe each, then ``vg_finish``): the loop's pass."""
    threads = thread_count("auto", n_rows)
    bounds = [tuple(b) for b in mod.stripes(n_rows).tolist()]
    scale = 1.0 / n_rows if mod.REDUCE_MEAN else 1.0

    def full(theta, _cols, g):
        return _striped_pass(mod.vg_rows, mod.vg_finish, max(mod.ACC_VG, 1), theta, arrays, bounds, scale, g, threads)

    return full


def _striped_pass(rows, finish, size, theta, arrays, bounds, scale, g, threads: int = 1) -> float:
    """The full cost at theta, its gradient into g: ``rows`` over each stripe of ``bounds`` (on
    up to ``threads`` of calcml's threads), the stripes' sums (``size`` each) added in stripe
    order, then ``finish``: a loop module's ``_fg`` pass, bit for bit."""
    empty = np.empty(0)
    acc = np.zeros((len(bounds), size))
    run_striped(rows, theta, empty, arrays, bounds, scale, acc, threads)
    res = np.empty(g.shape[0] + 1)
    finish(theta, empty, sum_in_order(acc), res)
    g[:] = res[1:]
    return float(res[0])


def _tier_seconds(mod, ints, n_rows) -> float:
    """The Python time of a first-order run of a loop module (calcml.tensor.loops) in the Python
    tier, estimated (the kernels' machine code aside): each step's statements, and its NumPy
    operations over the parameters (the rule, the norm, the copies: calcml.tensor.loops's
    NumPy forms); a full batch's stripes called; a minibatch's rows gathered, and each epoch's
    shuffle (a Python loop over the rows) and its pass over all rows for the tolerance."""
    stripes = len(mod.stripes(n_rows)) if mod.DATA_NAMES else 0
    steps = int(ints[mod.I_MAX_STEPS])
    per_step = _TIER_STEP_SECONDS + mod.N_UPDATE * _TIER_STATEMENT_SECONDS + \
        mod.N_PARAMS * (mod.N_UPDATE + 2) * _TIER_ELEMENT_SECONDS
    if not mod.MINIBATCH:
        return steps * (per_step + stripes * _PYTHON_STRIPE_CALL_SECONDS)
    datum = sum(math.prod(shape) for _, shape, _ in mod.DATA_LAYOUT)
    epochs = int(ints[mod.I_MAX_EPOCHS])
    per_step += _TIER_GATHER_SECONDS + int(ints[mod.I_BATCH]) * datum * _TIER_ELEMENT_SECONDS
    per_epoch = n_rows * _PYTHON_ROW_SECONDS + stripes * _PYTHON_STRIPE_CALL_SECONDS
    return steps * per_step + epochs * per_epoch


# What a step costs in the Python tier beyond the kernels' machine code, measured with the loops'
# NumPy forms (benchmarks/RESULTS.md, 2026-12-04 21:38): chained Rosenbrock, 1,000 parameters,
# 71 us a step with gd, 83 with Adam; W10's network, 9,610 parameters, Adam on 64 rows, 567 us
# (of which its kernels' about 100); the digits' gd, 16 stripes, 352 us (kernels about 150).
# A step's statements; one of the update rule's; an element of a NumPy operation (the rule's
# statements and two more over the parameters, a minibatch's data gathered); a minibatch's
# gather; a stripe's kernel called (ctypes) and its sums added; a row shuffled at an epoch's start.
_TIER_STEP_SECONDS = 50e-6
_TIER_STATEMENT_SECONDS = 4e-6
_TIER_ELEMENT_SECONDS = 5e-9
_TIER_GATHER_SECONDS = 20e-6
_PYTHON_STRIPE_CALL_SECONDS = 8e-6
_PYTHON_ROW_SECONDS = 1.0e-6


def _tier_passes(cost: TensorCost):
    """``install(py)``: a tensor loop module run as Python (calcml.loop's Python tier) gets its
    passes over rows as the machine code of the cost's compiled kernels (the same source and
    flags: the same bits), their stripes' sums added by NumPy in stripe order."""
    def install(py):
        fns = _native_vg(cost)
        if fns is None:
            raise RuntimeError("no machine code for the kernels")  # the loop is compiled instead
        size, rows_for, finish = fns
        py.vg_finish = finish
        if rows_for is None:  # no data: the finish alone, on zero sums
            return
        rows_raw = rows_for.raw

        def vg_rows(theta, v, *rest):  # a minibatch's gathered rows (the kernels' C entry)
            arrays, (lo, hi, scale, acc) = rest[:-4], rest[-4:]
            rows_raw(theta.ctypes.data, v.ctypes.data, *[a.ctypes.data for a in arrays], arrays[0].shape[0],
                     int(lo), int(hi), float(scale), acc.ctypes.data)

        def fg_serial(theta, cols, g):
            arrays = cols[2:]
            return _striped_pass(rows_for(arrays[0].shape[0], arrays), finish, size, theta, arrays, cols[0].tolist(),
                                 cols[1], g)

        py._fg_serial = fg_serial
        py._fg_rows = lambda theta, cols, g, acc, total, res: fg_serial(theta, cols, g)
        py.vg_rows = vg_rows
        py._calcml_keep = fns
    return install


def _tensor_noise(prog: TensorProgram, arrays, n_rows, x) -> float:
    """The sampling noise of the full gradient at x (result.gradient_noise), each row's
    gradient (plus the penalty's) over that one row: by the loop's machine code where the run
    loaded or compiled it (run_segment_c's evaluation, a call a row), else by
    the machine code of the cost's compiled kernels where this process has it or it is kept on
    disk (the run's passes or its Python tier called it), else by the loop module's ``_fg`` (its
    kernels, which Numba's cache of the module holds: the cost's kernels would be another
    compile of the same code, 1.5 s of W10's first fit). The same source and flags: the same
    bits."""
    cost, mod = prog.cost, prog.module
    segment = getattr(mod, "_segment", None)
    if isinstance(segment, _loop._NativeSegment) and segment.fn is not None and arrays:
        def rows(sample):  # the sampled rows' gradients, by the loop's machine code
            return segment.row_gradients(x, tuple(arrays), sample)

        return _result.gradient_noise(None, n_rows, cost.reduce == "mean", rows=rows)
    fg = getattr(mod, "_fg", None) if prog.optimizer.kind == "first_order" else None
    if fg is not None and not _kernels_on_hand(cost):
        theta, g = np.array(x, dtype=np.float64), np.empty(cost.n_params)

        def row(i):  # _fg over the one stripe [i, i + 1), unscaled, serial (passes 0)
            fg(theta, (np.array([[i, i + 1]], dtype=np.int64), 1.0) + tuple(arrays), g, 0)
            return g.copy()
    else:
        row = _row_gradients(cost, arrays, x)
    if row is None:  # no machine code (NUMBA_DISABLE_JIT): the kernels' own calls
        k = compile_tensor(cost)

        def row(i):
            return k.value_and_grad(x, TensorData(tuple(a[i:i + 1] for a in arrays), 1, True))[1]

    return _result.gradient_noise(row, n_rows, cost.reduce == "mean")


def _native_vg(cost: TensorCost):
    """(accumulator size, rows maker, finish) of the machine code of the cost's compiled
    value-and-gradient kernels (kernels._native_entry_points; no rows maker without data), or
    None where there is none (NUMBA_DISABLE_JIT)."""
    k = compile_tensor(cost)
    base = k._module("base")
    fns = k._native("vg", base)
    return None if fns is None else (max(base.ACC_SIZES["vg"], 1), *fns)


def _row_gradients(cost: TensorCost, arrays, x):
    """``row(i)``: the gradient of row i's term plus the penalty's at x, by the machine code
    of the cost's compiled kernels over the stripe [i, i + 1), unscaled (two C calls a row,
    every address taken once: 256 rows in about a millisecond, where k.value_and_grad on each
    row took 39 ms); None where there is no machine code."""
    fns = _native_vg(cost)
    if fns is None or fns[1] is None:
        return None
    size, rows_for, finish = fns
    rows_raw, finish_raw = rows_for.raw, finish.raw
    theta = np.array(x, dtype=np.float64)
    v, acc = np.empty(0), np.zeros(size)
    out = np.empty(cost.n_params + 1)
    head = (theta.ctypes.data, v.ctypes.data, *(a.ctypes.data for a in arrays), arrays[0].shape[0])
    ends = (theta.ctypes.data, v.ctypes.data, acc.ctypes.data, out.ctypes.data)

    def row(i):
        acc[:] = 0.0
        rows_raw(*head, i, i + 1, 1.0, acc.ctypes.data)
        finish_raw(*ends)
        return out[1:].copy()

    row.buffers = (theta, v, acc, out, arrays, fns)  # alive while row is: the calls use their addresses
    return row


def _search(prog: TensorProgram, x, ev, epochs, maxiter, tol, bar):
    """Line-search and trust-region methods: NumPy steps over the full-data evaluations ``ev``
    (the compiled, threaded kernels; Dask computations over Dask data)."""
    from .search import run_search

    opt = prog.optimizer
    budget = maxiter if maxiter is not None else (epochs if epochs is not None else opt.default_maxiter)
    hyper = dict(opt.hyper, **opt.extra)
    with _SingleThreadedBlas():  # SciPy's BLAS on one thread for the whole fit, not set per evaluation
        return run_search(opt.kind, ev.value_and_grad, x, maxiter=budget, tol=tol, value=ev.value, hvp=ev.hvp_at,
                          hess=ev.hessian, callback=bar, hyper=hyper)


def _over_dask(cost: TensorCost, data):
    """calcml.dask_data.DaskFit for Dask data (made by a scalar cost's front, or here), else None."""
    if getattr(data, "is_dask_fit", False):
        return data
    if not is_dask(data):
        return None
    from ..dask_data import DaskFit

    if not cost.has_data:
        raise DataError("this cost has no data; call minimize without data")
    return DaskFit(cost, data)


def _dask_noise(cost: TensorCost, over, x) -> float:
    """_tensor_noise over Dask data: the same sample of rows, fetched."""
    n = over.n_rows
    if n < 2:
        return float("nan")
    rows = np.arange(n) if n <= _result.NOISE_SAMPLE else \
        np.sort(np.random.default_rng(0).choice(n, size=_result.NOISE_SAMPLE, replace=False))
    arrays = tuple(np.ascontiguousarray(a) for a in over.take(rows))
    where = {int(r): j for j, r in enumerate(rows)}
    taken = _row_gradients(cost, arrays, x)
    if taken is None:  # no machine code (NUMBA_DISABLE_JIT): the kernels' own calls
        k = compile_tensor(cost)

        def taken(j):
            return k.value_and_grad(x, TensorData(tuple(a[j:j + 1] for a in arrays), 1, True))[1]

    return _result.gradient_noise(lambda i: taken(where[i]), n, cost.reduce == "mean")


# Where a minibatch fit over Dask data runs its epochs: "chunks" (a chain of tasks, each where
# its chunk is: only the parameters and the optimizer's state travel) or "client" (each chunk
# fetched to this process). The same bits either way; benchmarks/w8_minibatch.py measures them.
MINIBATCH_WHERE = "chunks"


def _chunk_epochs(prog: TensorProgram, over, seed: int):
    """One epoch over Dask data, ``epoch(theta, step, budget, hyper, sa, blowup, state) ->
    (status, updates, the minibatch costs' sum weighted by their rows, rows)``: it visits the
    chunks of rows in a seeded random order, the rows of the j-th visited chunk shuffled by a
    generator seeded with the j-th of the integers drawn next (the same seed, the same bits),
    and runs the module's ``_epoch`` (the loop's steps) over each where the chunk is
    (MINIBATCH_WHERE). Minibatches do not cross chunks: a chunk's last one may be short."""
    from ..dask_data import run_chunk

    mod, batch = prog.module, prog.batch_size
    sizes = over.chunk_rows()
    n_rows = sum(sizes)
    rng = np.random.default_rng(seed)

    def epoch(theta, step, budget, hyper, sa, blowup, state):
        order = rng.permutation(len(sizes))
        seeds = rng.integers(0, 2**63, size=len(sizes))  # the j-th visited chunk's row order
        if MINIBATCH_WHERE == "chunks":  # one chain of tasks, each where its chunk is
            theta[:], after, _step, total, rows, done, code = over.epoch(
                prog, (theta, state, step, 0.0, 0, 0, mod.RUNNING), order, seeds, batch, budget, hyper, sa, blowup)
            for a, b in zip(state, after):
                a[:] = b
            return code, done, total, rows
        total, rows, done, code = 0.0, 0, 0, mod.RUNNING  # each chunk fetched here
        for c, chunk_seed in zip(order, seeds):
            if step + done >= budget or not sizes[c]:
                continue
            k, part, code = run_chunk(mod, theta, state, over.chunk(int(c)), sizes[c], int(chunk_seed), batch,
                                      step + done, budget, hyper, sa, n_rows, blowup)
            done, total, rows = done + k, total + part, rows + min(k * batch, sizes[c])
            if code == mod.DIVERGED:
                break
        return code, done, total, rows

    epoch.per_epoch = sum(-(-s // batch) for s in sizes)
    return epoch


def _dask_epochs(prog: TensorProgram, x, over, sched_values, epochs, maxiter, tol, seed, bar) -> dict:
    """A minibatch fit over Dask data: each epoch one pass over the chunks (:func:`_chunk_epochs`:
    the loop module's ``_epoch``, the steps of its run_segment, over each chunk), and between
    epochs, here, run_segment's bookkeeping of a minibatch run: each epoch's mean minibatch cost
    in the history, the best point (of the lowest, or x0), divergence, ``tol`` on the full
    gradient (one Dask computation), the callback, Ctrl-C (the best point returned)."""
    mod, n = prog.module, prog.cost.n_params
    full = over.full
    epoch = _chunk_epochs(prog, over, seed)
    per_epoch = epoch.per_epoch
    if epochs is None and maxiter is None:
        epochs = mod.DEFAULT_EPOCHS
    budget = min(s for s in (maxiter, None if epochs is None else epochs * per_epoch) if s is not None)
    hyper = np.array([float(prog.optimizer.hyper[h]) for h in mod.HYPER_NAMES], dtype=np.float64)
    sa = np.array(sched_values or [0.0], dtype=np.float64)
    theta = np.array(x, dtype=np.float64)
    g = np.empty(n)
    value = full(theta, None, g)
    gnorm = math.sqrt(float(g @ g))
    finite = math.isfinite(value) and math.isfinite(gnorm) and bool(np.isfinite(theta).all())
    blowup = mod.BLOWUP * max(1.0, abs(value)) if finite else math.inf
    state = mod.new_optimizer_state(n)
    best, best_value, best_step = theta.copy(), value if finite else math.inf, 0
    history, path = [], [] if n <= _result.PATH_MAX_PARAMS else None
    status, nit, epochs_done, diverged_at = mod.RUNNING, 0, 0, -1
    if not finite:
        status, diverged_at = mod.DIVERGED, 0
    elif gnorm <= tol:
        status = mod.CONVERGED
    try:
        while status == mod.RUNNING and nit < budget:
            code, done, total, rows = epoch(theta, nit, budget, hyper, sa, blowup, state)
            nit += done
            if code == mod.DIVERGED:
                status, diverged_at = mod.DIVERGED, nit
                break
            epochs_done += done == per_epoch  # (a run's budget may end it within an epoch)
            mean_cost = total / max(rows, 1)  # weighted by the minibatches' rows (a short last one weighs less)
            history.append(mean_cost)
            if path is not None:
                path.append(theta.copy())
            if mean_cost < best_value:
                best[:] = theta
                best_value, best_step = mean_cost, nit
            if bar is not None:
                bar(nit, budget, mean_cost)
            if tol > 0.0:
                full(theta, None, g)
                if math.sqrt(float(g @ g)) <= tol:
                    status = mod.CONVERGED
        if status == mod.RUNNING:  # maxiter ended it within an epoch, or its epochs are done
            status = mod.EPOCHS_DONE if nit % per_epoch == 0 else mod.MAXITER
    except KeyboardInterrupt:
        status = mod.INTERRUPTED
    x = best.copy() if status in (mod.DIVERGED, mod.INTERRUPTED) else theta.copy()
    fun = full(x, None, g)
    grad_norm = math.sqrt(float(g @ g))
    if status not in (mod.DIVERGED, mod.INTERRUPTED) and not (abs(fun) <= blowup and math.isfinite(grad_norm)):
        status, diverged_at = mod.DIVERGED, nit
        x = best.copy()
        fun = full(x, None, g)
        grad_norm = math.sqrt(float(g @ g))
    return {"x": x, "fun": fun, "grad": g.copy(), "grad_norm": grad_norm, "nit": nit, "nfev": 0, "status": status,
            "history": np.array(history), "history_every": 1, "epochs": epochs_done, "best_step": best_step,
            "best_value": best_value, "diverged_at": diverged_at, "blowup": blowup,
            "path": None if path is None else np.array(path)}


_PROGRAMS: dict = {}


def program_for_tensor(cost: TensorCost, opt: Optimizer, schedule, batch_size) -> TensorProgram:
    from ..compile import cache_dir

    key = (cost.key, opt.structure(), schedule.structure() if schedule is not None else None, batch_size,
           str(cache_dir()))
    prog = _PROGRAMS.get(key)
    if prog is None:
        prog = _PROGRAMS[key] = TensorProgram(cost, opt, schedule, batch_size)
    # the same compiled module serves other numbers (rates, hyperparameters): a fresh front object
    out = TensorProgram(cost, opt, schedule, batch_size)
    out._module, out._text = prog.module, prog._text
    out.module_key = prog.module_key
    out.path = getattr(prog, "path", None)
    return out
