"""A compiled optimizer and its run: ``Program`` (``run``, ``source``, ``export``).

Data flow one way: :mod:`calcml.minimize` (the user's call, validated) -> this module (a
program for the cost and its run: the inputs checked, the generated module's ``drive``
called, its report turned into an :class:`~calcml.result.OptimizeResult`) ->
:mod:`calcml.loop` (the module's source, built or loaded from the cache) and
:mod:`calcml.compile` (the kernels, for the passes over large data). Every descent step
runs in compiled code.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from . import loop as _loop
from . import result as _result
from .codegen import HESSIAN_INLINE_MAX
from .cost import Cost
from .dataset import Dataset, as_dataset, by_name, is_dask, real_array
from .errors import DataError, OptimizeError, ParamError
from .optim import Optimizer
from .schedules import Schedule, constant

__all__ = ["Program", "program_for"]


class Program:
    """A compiled optimizer for one cost: ``run``, ``source``, ``export``.

    Made by :func:`calcml.generate`. The module is generated once per (cost, optimizer rule,
    schedule structure, full batch or minibatch) and cached on disk with the kernels;
    hyperparameters, schedule numbers and the batch size are run-time arguments.
    """

    def __init__(self, cost: Cost, opt: Optimizer, schedule: Schedule | None, batch_size, module, source, path):
        self.cost = cost
        self.optimizer = opt
        self.schedule = schedule
        self.batch_size = batch_size
        self.module = module
        self.source = source
        self.path = path
        self.notes: list = []
        self.notes_batch_default = False  # batch_size chosen for the user (sgd's default)
        self.tensor_twin = None  # () -> the same fit on the tensor path (fits over Dask data; calcml.generate)
        # what every run checks or passes to the module, made once
        self.param_names = cost.param_names
        self.x_shape = (len(self.param_names),)
        self.has_data = bool(cost.data)
        self.hyper = dict(opt.hyper)
        self.schedule_args = schedule.values() if schedule is not None else []

    def __repr__(self):
        return (f"<calcml.Program {self.optimizer!r} schedule={self.schedule!r} batch_size={self.batch_size} "
                f"for {self.cost!r}>")

    def export(self, path) -> Path:
        """Write the module as a standalone file (imports only numpy and numba; no sympy, no
        calcml) whose ``run(x0, data, ...)`` does the whole fit. Its defaults are this
        program's hyperparameters, schedule numbers and batch size."""
        # numba's cache=True needs a writable __pycache__ beside the file; keep it, it is harmless
        p = Path(path)
        p.write_text(export_text(self.source, self), encoding="utf-8")
        return p


def export_text(source: str, prog, numbers: bool = True) -> str:
    """An optimizer module as exported: the module as generated (it serves every program of
    its structure), then (``numbers``) this program's numbers, which its run() reads when it
    is called; a module whose numbers are in its text (a tensor search's HYPER) takes none."""
    lines = [ln for ln in source.split("\n") if not ln.startswith("# calcml-sha256: ")]
    if not numbers:
        return "\n".join(lines)
    opt = prog.optimizer
    if opt.lr == "auto":
        raise OptimizeError(f"lr='auto' is chosen by each run from its data and x0 (the exact Hessian's scale "
                            f"there); an exported module has no such estimate. Export a program with a number: "
                            f"cm.generate(cost, method={opt.name!r}, lr=res.lr), res.lr the rate a run chose")
    hyper = {k: float(v) for k, v in opt.hyper.items()}
    values = prog.schedule.values() if prog.schedule is not None else []
    return "\n".join(lines).rstrip("\n") + "\n\n\n" + "\n".join([
        "# -- this program's numbers: run()'s defaults (written by Program.export) --",
        f"HYPER_DEFAULTS = {hyper!r}",
        f"SCHEDULE_DEFAULTS = {values!r}",
        f"BATCH_SIZE = {prog.batch_size!r}",
    ]) + "\n"


def program_for(cost: Cost, opt: Optimizer, schedule: Schedule | None, batch_size) -> Program:
    module, source, path = _loop.load_module(cost, opt, schedule, batch_size is not None)
    return Program(cost, opt, schedule, batch_size, module, source, path)


# -- running a program ---------------------------------------------------------------------------
_F64 = np.dtype(np.float64)
_NDARRAY = np.ndarray


def _as_x0(cost: Cost, x0, names=None) -> np.ndarray:
    names = cost.param_names if names is None else names
    if type(x0) is np.ndarray and x0.dtype is _F64 and x0.shape == (len(names),):
        # a finite sum: every entry is finite (a matmul or np.isfinite costs microseconds more)
        if math.isfinite(sum(x0.tolist()) if len(names) <= 64 else float(np.sum(x0))):
            return x0
    if isinstance(x0, dict):
        x0 = by_name(x0)
        unknown = [k for k in x0 if k not in names]
        if unknown:
            raise ParamError(f"x0 names {', '.join(repr(str(k)) for k in unknown)}, not parameters of this cost; "
                             f"its parameters are {list(names)}")
        missing = [k for k in names if k not in x0]
        if missing:
            raise ParamError(f"x0 is missing parameter{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(repr(m) for m in missing)}")
        x0 = [x0[k] for k in names]
    x = real_array(x0, "x0", ParamError, copy=True)
    if x.ndim != 1 or x.shape[0] != len(names):
        raise ParamError(f"x0 must have shape ({len(names)},) in the order {list(names)}; got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        j = int(np.flatnonzero(~np.isfinite(x))[0])
        raise ParamError(f"x0[{j}] (parameter {names[j]!r}) is {x[j]}: the starting point must be finite")
    return x


def _count(name, value, minimum=1):
    if value is None:
        return None
    if type(value) is int and value >= minimum:  # the common case, without the ABC checks
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise OptimizeError(f"{name} must be an integer >= {minimum} or None, got {name}={value!r}")
    return int(value)


def _auto_rate(prog: Program, x, ds, notes) -> float:
    """``lr="auto"``: 1/L for gradient descent, L the curvature scale at x0.

    Up to ``HESSIAN_INLINE_MAX`` parameters, L = max_i sum_j |H_ij| (Gershgorin) of the exact
    Hessian at x0: a bound on its largest eigenvalue, so the step is safe where the curvature
    is no larger than at x0 (everywhere, for a quadratic cost). Beyond, where the Hessian is
    costly to compile, L is the largest eigenvalue estimated by power iteration on
    Hessian-vector products, each a central difference of two exact gradients.
    """
    n = len(prog.cost.params)
    if n <= HESSIAN_INLINE_MAX:
        from .compile import compile as compile_cost

        k = compile_cost(prog.cost)
        H = k.hessian(x) if ds is None else k.hessian(x, ds) if type(ds) is Dataset else ds.hessian(x)
        if not np.all(np.isfinite(H)):
            raise OptimizeError("lr='auto': the Hessian at x0 is not finite; give lr explicitly")
        L = float(np.max(np.sum(np.abs(H), axis=1)))
        how = "a Gershgorin bound on the largest eigenvalue of the exact Hessian at x0"
    else:
        L = _power_iteration(prog, x, ds)
        how = ("the largest eigenvalue of the Hessian at x0, estimated by power iteration on "
               "differences of exact gradients")
    if not (L > 0.0 and math.isfinite(L)):
        notes.append("lr='auto' chose lr=1: the Hessian at x0 is zero, so it bounds no step")
        return 1.0
    lr = 1.0 / L
    notes.append(f"lr='auto' chose lr={lr:.6g} = 1/L, L={L:.6g} {how}")
    return lr


def _power_iteration(prog: Program, x, ds) -> float:
    module = prog.module
    n = x.shape[0]
    gp, gm = np.zeros(n), np.zeros(n)
    h = 1e-5 * max(1.0, float(np.linalg.norm(x)))
    if ds is not None and type(ds) is not Dataset:  # Dask data: each gradient one Dask computation
        def fg(theta, _cols, g):
            g[:] = ds.grad(theta)
        cols = None
    else:
        fg = module._fg
        cols = module.columns_of(None if ds is None else ds.columns)

    def hvp(v):
        fg(x + h * v, cols, gp)
        fg(x - h * v, cols, gm)
        return (gp - gm) / (2 * h)
    return largest_eigenvalue(hvp, n)


def largest_eigenvalue(hvp, n: int, iterations: int = 100) -> float:
    """The largest eigenvalue of a Hessian H, by power iteration from a seeded start until two
    estimates agree to 1e-4 (``lr="auto"``'s L); ``hvp(v)`` gives H v for a unit v. A product
    that is zero or not finite ends it with the estimate so far (0 at the first)."""
    v = np.random.default_rng(0).standard_normal(n)
    v /= np.linalg.norm(v)
    lam = 0.0
    for _ in range(iterations):
        hv = hvp(v)
        new = float(np.linalg.norm(hv))
        if not (new > 0.0 and math.isfinite(new)):
            return lam
        v = hv / new
        if abs(new - lam) <= 1e-4 * new:
            return new
        lam = new
    return lam


class _ProgressBar:
    """A one-line progress bar on stderr, redrawn between segments of the compiled loop."""

    def __init__(self, label: str, stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.drawn = False

    def __call__(self, step, total, value):
        frac = step / total if total else 1.0
        width = 30
        full = int(round(frac * width))
        bar = "#" * full + "." * (width - full)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{bar}] {100 * frac:5.1f}% {step}/{total} cost {value:.6g} {elapsed:.1f}s")
        self.stream.flush()
        self.drawn, self.total = True, total

    _ENDS = {_result.CONVERGED: "converged", _result.DIVERGED: "diverged", _result.INTERRUPTED: "interrupted",
             _result.LINE_SEARCH_FAILED: "line search stopped"}

    def finish(self, step, value, status):
        """The last line, when the run ended before its budget: a full bar that says why."""
        word = self._ENDS.get(status)
        if self.drawn and word is not None:
            elapsed = time.perf_counter() - self.start
            self.stream.write(f"\r{self.label} [{'#' * 30}] {word} at {step}/{self.total} cost {value:.6g} "
                              f"{elapsed:.1f}s   ")
            self.stream.flush()

    def close(self):
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _run_program(prog: Program, x0, data=None, *, epochs=None, maxiter=None, tol=1e-8, seed=0, progress=False):
    """Run the compiled descent from ``x0`` (array or dict); same keywords as :func:`calcml.minimize`.

    (This is ``Program.run``, and what ``minimize`` runs: validate, run the program's module,
    report. The common case takes inlined fast paths: a short run spends little time here.)"""
    cost, opt = prog.cost, prog.optimizer
    # x0: a float64 array of the right shape goes to the module as is (its entries are checked
    # for finiteness there, in compiled code: a non-finite x0 ends the run at step 0, and
    # _as_x0 then says which entry); anything else goes through _as_x0's conversions first.
    # Every check below that fails checks x0 first, as _as_x0 would have.
    if type(x0) is not _NDARRAY or x0.dtype is not _F64 or x0.shape != prog.x_shape:
        x0 = _as_x0(cost, x0, prog.param_names)
    if not (epochs is None or (type(epochs) is int and epochs >= 1)):
        x0 = _as_x0(cost, x0, prog.param_names)
        epochs = _count("epochs", epochs)
    if not (maxiter is None or (type(maxiter) is int and maxiter >= 0)):
        x0 = _as_x0(cost, x0, prog.param_names)
        maxiter = _count("maxiter", maxiter, minimum=0)
    if not (type(tol) is float and tol >= 0.0):
        x0 = _as_x0(cost, x0, prog.param_names)
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0 or math.isnan(tol):
            raise OptimizeError(f"tol must be a non-negative number, got tol={tol!r}")
        tol = float(tol)
    if not (type(seed) is int and 0 <= seed < 2**64):
        x0 = _as_x0(cost, x0, prog.param_names)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
            raise OptimizeError(f"seed must be an integer in [0, 2**64), got seed={seed!r}")
        seed = int(seed)
    if progress is not False and progress is not True:
        x0 = _as_x0(cost, x0, prog.param_names)
        raise OptimizeError(f"progress must be True or False, got progress={progress!r}")
    columns = ds = None
    if prog.has_data or data is not None or opt.lr == "auto":
        x0 = _as_x0(cost, x0, prog.param_names)  # before the data's checks; lr="auto" reads x0
    if prog.has_data and is_dask(data):  # each pass one Dask computation (calcml.dask_data)
        from .dask_data import DaskRows, scalar_loop_takes

        if not scalar_loop_takes(prog) and prog.tensor_twin is not None:  # minibatches over chunks, and
            # the rest: the same fit on the tensor path, whose loops take Dask data
            return _on_tensor_path(prog, x0, data, epochs=epochs, maxiter=maxiter, tol=tol, seed=seed,
                                   progress=progress)
        ds = DaskRows(prog, data)
        columns = ds.columns
    elif prog.has_data:
        ds = as_dataset(data, cost.data_names)  # finiteness: checked in the loop's first pass
        columns = ds.columns
        if prog.batch_size is not None and prog.batch_size > ds.n_rows:
            default = f" ({opt.name}'s default)" if prog.notes_batch_default else ""
            raise OptimizeError(f"batch_size={prog.batch_size}{default} is larger than the data ({ds.n_rows} rows)")
    elif data is not None:
        raise DataError("this cost has no data columns; call minimize without data")
    notes = list(prog.notes) if prog.notes else []
    sched_args = prog.schedule_args
    lr_used = opt.lr
    if lr_used == "auto":
        lr_used = _auto_rate(prog, x0, ds, notes)
        sched_args = [lr_used]
    bar = _ProgressBar(f"{opt.name}") if progress else None
    module = prog.module
    try:
        extra = {}
        if type(ds) is not Dataset and ds is not None:  # Dask data: the registered pass is a Dask computation
            extra["passes"] = ds.pass_factory
            extra["first_segment"] = 1  # a step is a pass over all chunks: report and stop between steps
        elif module.THREADED and ds.n_rows >= module.PARALLEL_MIN_ROWS:  # (on one thread too: the same bits)
            extra["passes"] = partial(_threaded_passes, cost)
        (x, fun, grad, grad_norm, nit, nfev, status, history, history_every, path,
         epochs_done, best_step, best_value, diverged_at, blowup) = module.drive(
            x0, columns, prog.hyper, sched_args, prog.batch_size, epochs, maxiter, tol, seed, bar, **extra)
        if bar is not None:
            bar.finish(nit, fun, status)
    except module.NonFiniteData:
        ds.raise_nonfinite()  # names the column and the row
        raise
    finally:
        if bar is not None:
            bar.close()
    if ds is not None and type(ds) is not Dataset:
        ds.raise_found()  # a Dask pass found a bad datum: named by column and global row
    if status == _result.DIVERGED and nit == 0:
        _as_x0(cost, x0, prog.param_names)  # a non-finite entry of x0: says which
        problem = _result.start_error(fun, grad, prog.param_names)
        if problem:
            raise ParamError(problem)
    if status == _result.CONVERGED and nit:
        status = _result.unbounded(status, x, x0, fun, partial(_value_at, prog, ds, columns))
    fields = {
        "x": x, "fun": fun, "grad_norm": grad_norm, "jac": grad, "nit": nit, "nfev": nfev, "history": history,
        "history_every": history_every, "method": opt.name, "lr": _rate_reported(opt, prog.schedule, lr_used),
        "notes": notes, "path": path, "minibatch": prog.batch_size is not None,
    }
    noise = None
    if ds is not None and status in _BUDGET_SPENT:
        if type(ds) is not Dataset:
            noise = partial(ds.noise, module, x, cost.reduce == "mean")
        else:
            noise = partial(_scalar_noise, prog, columns, x, ds.n_rows, cost.reduce == "mean")
    else:
        fields["status"], fields["success"] = status, _result.STATUS[status][0]
    # status (for a run that spent its budget: a gradient within its noise is a minimum) and
    # message are settled when first read (partials: no closure cells in this function)
    finish = partial(_finish, prog, lr_used, status, noise, grad_norm, tol, nit, epochs_done, diverged_at, blowup,
                     best_step, best_value, x, ds.n_rows if ds is not None else 0)
    return _result.OptimizeResult._lazy(fields, prog.param_names, finish)


_BUDGET_SPENT = (_result.MAXITER, _result.EPOCHS_DONE)


def _on_tensor_path(prog: Program, x0, data, **kw):
    """A fit over Dask data that this program's loop does not run (minibatches, visited chunk
    by chunk; Newton beyond the inline Hessian): the same cost and method on the tensor path,
    whose loops take Dask data (``prog.tensor_twin``, set by calcml.generate)."""
    front = prog.__dict__.get("_tensor_front")
    if front is None:
        front = prog._tensor_front = prog.tensor_twin()
    res = front.run(x0, data, **kw)
    if prog.notes:
        res.notes[:0] = prog.notes
    return res


def _scalar_noise(prog, columns, x, n_rows, reduce_mean) -> float:
    """The sampling noise of the full gradient at x (result.gradient_noise), each row's gradient
    by the module's own full-batch pass over that one row (its machine code: loop.native_fg)."""
    from .loop import native_fg

    cols = prog.module.columns_of(columns)
    fg = native_fg(prog.module, prog.path)
    g = np.empty(x.shape[0])

    def row_gradient(i):
        fg(x, tuple(c[i:i + 1] for c in cols), g)
        return g.copy()

    return _result.gradient_noise(row_gradient, n_rows, reduce_mean)


def _threaded_passes(cost, cols):
    """(theta, g) -> the full-batch cost at theta, its gradient into g: the cost's compiled
    value_and_grad kernel over ``cols`` on calcml's threads (fixed chunks of rows, the chunk
    sums added in order: the same bits for any thread count). A non-finite datum gives NaN,
    as the loop's own pass does (the loop then names it)."""
    from .compile import compile as compile_cost

    kernels = compile_cost(cost)
    ds = as_dataset(dict(zip(cost.data_names, cols)), cost.data_names)
    n = len(cost.params)

    def full(theta, g):
        try:
            out, _ = kernels._run("value_and_grad", theta, ds)
        except (DataError, ParamError):
            g[:] = math.nan
            return math.nan
        g[:] = out[1:n + 1]
        return float(out[0])

    return full


def _value_at(prog, ds, columns, theta) -> float:
    """The cost at theta, when a result needs it (see result.unbounded): over data in memory,
    the loop module's own full-batch pass (its machine code, compiled with the loop's or loaded:
    loop.native_fg), else the cost's value kernel (compiled then)."""
    from .compile import compile as compile_cost

    if ds is not None and type(ds) is not Dataset:
        return ds.value(theta)
    if ds is not None and hasattr(prog.module, "fg_c"):
        from .loop import native_fg

        return float(native_fg(prog.module, prog.path)(theta, prog.module.columns_of(columns), np.empty(theta.shape[0])))
    cost = prog.cost
    return compile_cost(cost).value(theta, ds) if ds is not None else compile_cost(cost).value(theta)


def _finish(prog, lr_used, status, noise, grad_norm, tol, nit, epochs, diverged_at, blowup, best_step, best_value,
            x, n_rows) -> dict:
    status, level = _result.within_noise(status, grad_norm, noise, nit)
    success, message = _result.message(
        status, grad_norm=grad_norm, tol=tol, nit=nit, epochs=epochs, diverged_at=diverged_at, blowup=blowup,
        best_step=best_step, best_value=best_value, rate_hint=_rate_hint(prog, lr_used), x=x, noise=level,
        n_rows=n_rows, method=prog.optimizer.name, decaying=_decaying(prog.schedule),
    )
    return {"status": status, "success": success, "message": message}


# Program.run is _run_program itself (one Python call less per run than a method calling it)
Program.run = _run_program


def _rate_reported(opt, schedule, lr_used):
    """res.lr: the one rate the run took: lr="auto"'s choice, a constant schedule's (the
    method's lr by default); None for a schedule whose rate changes, and for a method without
    a rate (a schedule replaces lr: minimize(lr=0.3, schedule=constant(0.1)) steps by 0.1)."""
    if opt.lr is None:
        return None
    if opt.lr == "auto" or schedule is None:
        return lr_used
    return float(schedule.initial) if isinstance(schedule, constant) else None


def _decaying(schedule) -> bool:
    """Whether ``schedule`` (or None) lowers the rate as the steps go."""
    return schedule is not None and not isinstance(schedule, constant)


def _rate_hint(prog: Program, lr_used) -> str:
    sched = prog.schedule
    if sched is None:
        return ""
    if isinstance(sched, constant):
        lr = lr_used if isinstance(lr_used, float) else sched.args[0][1]
        return f" (lr was {lr:g}; try lr={lr / 10:g})"
    return f" (the schedule {sched!r} starts at {sched.initial:g})"
