"""Optimizers on tensor costs: one generated module per (cost, optimizer, schedule, batching).

The module holds the cost's kernels (:mod:`calcml.tensor.codegen`), full-batch evaluations
over all rows in the kernels' stripes (``_fg``: the same bits as ``k.value_and_grad``), the optimizer's update rule over the parameter array (its own
description from :mod:`calcml.optim`, with its own names: nothing is renamed or unrolled),
and the compiled loop of a minibatch method: ``_epoch`` (one epoch of minibatches; a full-batch
first-order method's loop is calcml.loop's, written by :mod:`calcml.tensor.loops`). Line-search and trust-region methods (L-BFGS, Newton, Newton-CG) take NumPy
steps over the threaded kernels (:mod:`calcml.tensor.search`). ``drive`` is the plain
Python driver that calls them in segments of about a quarter of a second, between which
Ctrl-C and progress are handled. calcml runs those loops from ``loop_c``'s machine code, or
first, while runs are short, as Python over the kernels' machine code (:class:`PythonLoop`). The module needs only NumPy and Numba
(``prog.export(path)``).
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
from ..optim import GRAD, PARAM, RATE, STEP, Optimizer, slot
from .. import ir
from ..printing import NumbaPrinter
from ..codegen import KERNEL_FLAGS, NUMBA_FLAGS, njit_flags
from .. import loop as _loop
from ..loop import _RNG_SOURCE, fisher_yates
from ..schedules import Schedule
from .kernels import HESSIAN_MAX, STRIPES, TensorData, _SingleThreadedBlas, as_tensor_data, compile_tensor, run_striped, sum_in_order, thread_count
from . import loops
from .model import TensorCost

__all__ = ["TensorProgram", "program_for_tensor"]

_NJIT_FLAGS = njit_flags(NUMBA_FLAGS)

_EVAL = '''

# -- full-data evaluations: the compiled kernels stripe by stripe ------------------------------------''' + loops.STRIPES_SOURCE + '''

def full_value_and_grad(theta, cols, g):
    """the full cost at theta, its gradient into g: the compiled kernels called stripe by stripe
    from Python (as calcml's kernels do; the same bits), for the driver's few evaluations"""
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


def row_gradient(theta, cols, i, g):
    """the gradient of row i's term into g (plus the penalty's: a constant that the gradient's
    noise estimate ignores), by the value-and-gradient kernel over that one row"""
    v = np.empty(0)
    acc = np.zeros(max(ACC_SIZES["vg"], 1))
    if len(cols) > 2 and DATA_NAMES:
        vg_rows(theta, v, *cols[2:], i, i + 1, 1.0, acc)
    res = np.empty(N_PARAMS + 1)
    vg_finish(theta, v, acc, res)
    g[:] = res[1:]


def _in_order(acc):
    total = acc[0].copy()
    for k in range(1, acc.shape[0]):
        total += acc[k]
    return total


'''

_DRIVER = '''

# -- the driver: plain Python around the compiled loops ------------------------------------------------
def drive(x0, arrays, n_rows, hyper, sched, batch_size=None, epochs=None, maxiter=None, tol=1e-8, seed=0,
          callback=None, segment_seconds=0.25, full=None, epoch=None, per_epoch=None, loop=None):
    """Minimize from x0 (flat float64); arrays: the data arrays in DATA_NAMES order (validated).
    full: the full-data evaluation, (theta, cols, g) -> value (default full_value_and_grad;
    calcml passes the same stripes on its threads: the same bits). epoch: one epoch of
    minibatches run elsewhere, (theta, step, budget, hyper, sa, blowup, state) -> (status,
    updates, the minibatch costs' sum weighted by their rows, the rows), making per_epoch updates (calcml: over the chunks
    of Dask data); default: _epoch over a seeded shuffle of all rows. loop: what runs in place
    of _epoch, with its arguments (calcml: loop_c's machine code).
    Returns a dict: x, fun, grad, grad_norm, nit, nfev, status, history, history_every, epochs, best_step,
    best_value, diverged_at, blowup."""
    evaluate = full_value_and_grad if full is None else full
    theta = np.array(x0, dtype=np.float64)
    cols = columns(arrays, n_rows, REDUCE_MEAN)
    hyper = np.asarray(hyper, dtype=np.float64).reshape(-1)
    sa = np.asarray(sched, dtype=np.float64).reshape(-1)
    g = np.empty(N_PARAMS)
    value = evaluate(theta, cols, g)
    f0 = value
    blowup = 1e10 * max(1.0, abs(f0))
    state = new_state()
    best = theta.copy()
    best_value, best_step = value, 0
    history_every = 1
    history = []  # each epoch's mean minibatch cost
    path = [] if PATH_COLS else None  # the iterates beside the history
    status, nit, nfev, epochs_done, diverged_at = RUNNING, 0, 0, 0, -1
    gnorm = math.sqrt(float(g @ g))
    if not math.isfinite(value) or not math.isfinite(gnorm):
        status, diverged_at = DIVERGED, 0
    elif gnorm <= tol:
        status = CONVERGED
    try:
        if status != RUNNING:
            pass
        else:
            if per_epoch is None:
                per_epoch = -(-n_rows // batch_size)
            if epochs is None and maxiter is None:
                epochs = DEFAULT_EPOCHS
            budget = min(s for s in (maxiter, None if epochs is None else epochs * per_epoch) if s is not None)
            bufs = tuple(np.empty((batch_size,) + a.shape[1:], dtype=a.dtype) for a in arrays)
            scale_mean = REDUCE_MEAN
            # the row order: Fisher-Yates shuffles of one permutation, epoch after epoch, drawn from
            # SplitMix64 seeded by seed (the scalar loops' shuffles: the same rows in each minibatch)
            perm = np.arange(n_rows, dtype=np.int64)
            rng = np.array([seed], dtype=np.uint64)
            best_epoch_cost = math.inf
            while nit < budget and status == RUNNING:
                if epoch is None:
                    code, done, total = (loop or _epoch)(theta, g, perm, rng, 1, batch_size, nit, budget - nit, hyper,
                                                         sa, cols, bufs, scale_mean, n_rows, blowup, *state)
                    rows = min(done * batch_size, n_rows)
                else:
                    code, done, total, rows = epoch(theta, nit, budget, hyper, sa, blowup, state)
                nit += done
                if code == DIVERGED:
                    status, diverged_at = DIVERGED, nit
                    break
                epochs_done += done == per_epoch  # (a run's budget may end it within an epoch)
                mean_cost = total / max(rows, 1)  # weighted by the minibatches' rows (a short last one weighs less)
                history.append(mean_cost)
                if path is not None:
                    path.append(theta.copy())
                if mean_cost < best_epoch_cost:
                    best_epoch_cost = mean_cost
                    best[:] = theta
                    best_value, best_step = mean_cost, nit
                if callback is not None:
                    callback(nit, budget, mean_cost)
                if tol > 0.0:
                    value = evaluate(theta, cols, g)
                    if math.sqrt(float(g @ g)) <= tol:
                        status = CONVERGED
            if status == RUNNING:  # maxiter ended it within an epoch, or its epochs are done
                status = EPOCHS_DONE if nit % per_epoch == 0 else MAXITER
    except KeyboardInterrupt:
        status = INTERRUPTED
    x = best.copy() if status in (DIVERGED, INTERRUPTED) else theta.copy()
    fun = evaluate(x, cols, g)
    grad_norm = math.sqrt(float(g @ g))
    if status not in (DIVERGED, INTERRUPTED) and not (abs(fun) <= blowup and math.isfinite(grad_norm)):
        status, diverged_at = DIVERGED, nit
        x = best.copy()
        fun = evaluate(x, cols, g)
        grad_norm = math.sqrt(float(g @ g))
    return {"x": x, "fun": fun, "grad": g.copy(), "grad_norm": grad_norm, "nit": nit, "nfev": nfev,
            "status": status, "history": np.array(history), "history_every": history_every, "epochs": epochs_done, "best_step": best_step,
            "best_value": best_value, "diverged_at": diverged_at, "blowup": blowup,
            "path": None if path is None else np.array(path)}
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

_RUN = _DATA_ARRAYS + '''

# this program's numbers, run()'s defaults (Program.export writes them; None: pass them to run)
HYPER_DEFAULTS = None
SCHEDULE_DEFAULTS = None
BATCH_SIZE = None


def run(x0, data=None, *, hyper=None, schedule_args=None, batch_size=None, epochs=None, maxiter=None, tol=1e-8,
        seed=0, callback=None):
    """Minimize from x0 (flat: PARAM_NAMES in order, each in C order; or a dict {name: array}) over data, a dict
    {name: array} with DATA_NAMES ((N, *shape of a row) each; labels as class numbers).
    hyper: dict of HYPER_NAMES values (default HYPER_DEFAULTS); schedule_args: the schedule's
    numbers (default SCHEDULE_DEFAULTS); batch_size: default BATCH_SIZE (None: full batch).
    callback(step, max_steps, value), if given, is called between segments; Ctrl-C stops the
    run at its best point. Returns the report: a dict with x, fun, grad, nit, status,
    status_name, history and the bookkeeping."""
    hyper = HYPER_DEFAULTS if hyper is None else hyper
    sched = SCHEDULE_DEFAULTS if schedule_args is None else schedule_args
    if hyper is None or sched is None:
        raise ValueError("this module holds no program's numbers: pass hyper={...} and schedule_args=[...] "
                         "(a module written by Program.export has them)")
    batch_size = BATCH_SIZE if batch_size is None else batch_size
    if (batch_size is not None) != MINIBATCH:
        raise ValueError(f"this module runs {'minibatches: give batch_size' if MINIBATCH else 'full batches: no batch_size'}")
    arrays, n_rows = data_arrays(data)
    rep = drive(_flat_x0(x0), arrays, n_rows, [float(hyper[k]) for k in HYPER_NAMES], list(sched) or [0.0],
                batch_size, epochs, maxiter, tol, seed, callback)
    rep["status_name"] = STATUS_NAMES[rep["status"]]
    return rep
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


def _rule(opt: Optimizer, schedule: Schedule | None) -> tuple:
    """(the rate's code, per-step statements, per-parameter statements, helpers they call) of a
    first-order rule, printed once by one printer: the rate of ``step`` from ``sa``, the rule
    over the parameter array (loop variable ``j``), its symbols named as symbols."""
    printer = NumbaPrinter({})
    rate = schedule.code(printer) if schedule is not None else None
    names = {slot(RATE): "lr", slot(STEP): "step", **{slot(h): f"hp_{h}" for h in opt.hyper},
             **{slot(v): f"o_{v}" for v in opt.locals}}
    per_step = printer.assignments(opt.per_step, names)
    names.update({slot(PARAM): "theta[j]", slot(GRAD): "g[j]", **{slot(s[0]): f"st_{s[0]}[j]" for s in opt.state}})
    return rate, per_step, printer.assignments(opt.update, names), printer.helpers_used


def _jit(name: str, params: str, doc: str, body, decorator: str = "_jit") -> list:
    """A compiled function of the module, and the two blank lines after it."""
    return [ir.Def(name, (params,), body, doc=doc, decorators=(decorator,)), ir.Blank(2)]


def _each(i: str, n: str, *body) -> ir.For:
    """``for i in range(n):`` (element by element, not a slice: an array setitem costs Numba
    seconds of compile)."""
    return ir.For(i, ir.range_(n), list(body))


def _layout(cost: TensorCost) -> tuple:
    """(name, shape of a row, number of classes for labels, else None) per datum, in order."""
    from .statement import Label

    return tuple((name, tuple(shape), item.classes if isinstance(item, Label) else None)
                 for item, (name, shape) in zip(cost.data, cost.data_shapes.items()))


class _Source:
    """The optimizer part of a tensor optimizer module, as statements (:mod:`calcml.ir`)."""

    def __init__(self, cost: TensorCost, opt: Optimizer, schedule: Schedule | None, minibatch: bool, sizes: dict,
                 rule=None):
        self.cost, self.opt, self.schedule, self.minibatch = cost, opt, schedule, minibatch
        self.rule = rule  # first order: _rule(opt, schedule)
        self.sizes = sizes
        self.state = [f"st_{s[0]}" for s in opt.state]  # the state arrays' names in the loops

    def data_args(self, cols="cols", first=2):
        n = len(self.cost.data)
        return ", ".join(f"{cols}[{first + i}]" for i in range(n)) if n else "cols[2]"

    def full_batch(self) -> list:
        over_rows = [
            ir.Assign("bounds", "cols[0]"),
            _each("k", "bounds.shape[0]",
                  _each("q", "acc.shape[0]", ir.Assign("acc[q]", "0.0")),
                  ir.Stmt(f"vg_rows(theta, v, {self.data_args()}, bounds[k, 0], bounds[k, 1], cols[1], acc)"),
                  _each("q", "acc.shape[0]", ir.Assign("total[q]", "acc[q] if k == 0 else total[q] + acc[q]"))),
        ] if self.cost.has_data else []
        return _jit("_fg", "theta, cols, g, acc, total, res, v",
                    "the full cost at theta; its gradient into g (all rows, in the kernels' stripes, their sums added\n"
                    "in stripe order: the same bits as the kernels). acc, total (zeros, ACC_SIZES['vg'] each), res,\n"
                    "v (empty): the caller's scratch, allocated once per run",
                    [over_rows,
                     ir.Stmt("vg_finish(theta, v, total, res)"),
                     _each("i", "N_PARAMS", ir.Assign("g[i]", "res[i + 1]")),
                     ir.Return("res[0]")],
                    "_jit_inline")

    def state_factory(self) -> list:
        items = [made for _, made in self.opt.state_arrays("N_PARAMS")]
        return [ir.Def("new_state", (), [ir.Return(f"({', '.join(items)}{',' if len(items) == 1 else ''})")],
                       doc="the optimizer's state arrays, at their initial values"),
                ir.Blank(2)]

    def first_order(self) -> list:
        opt = self.opt
        state = ", ".join(self.state)
        tail = f", {state}" if state else ""
        rate, per_step, update, _ = self.rule
        out = [
            _jit("_rate", "step, sa", "the learning rate at update step (from 0)", [ir.Return(rate)], "_jit_inline"),
            _jit("_update", f"theta, g, lr, step, o_hyper{tail}", f"one {opt.name} update of every parameter ({opt.reference})",
                 [[ir.Assign(f"hp_{name}", f"o_hyper[{k}]") for k, name in enumerate(opt.hyper)],
                  per_step,
                  ir.For("j", ir.range_("theta.shape[0]"), update)],
                 "_jit_inline"),
        ]
        return out + self._epoch(tail)

    @property
    def path_cols(self) -> int:
        """The parameters recorded beside each history entry (calcml.result.PATH_MAX_PARAMS): all
        of a cost that has that few, else none."""
        n = self.cost.n_params
        return n if n <= _result.PATH_MAX_PARAMS else 0

    def _gather(self) -> list:
        """The minibatch's rows copied into the buffers, element by element (a row assigned as
        an array compiles Numba's broadcasting and its error message, str of shapes: 2.6 s of a
        5 s first fit, measured)."""
        out = []
        for k, name in enumerate(self.cost.data_names):
            shape = self.cost.data_shapes[name]
            idx = "".join(f", o_a{a}" for a in range(len(shape)))
            copy = ir.Assign(f"o_bufs[{k}][o_i{idx}]", f"cols[{2 + k}][o_p{idx}]")
            for a in reversed(range(len(shape))):
                copy = _each(f"o_a{a}", str(shape[a]), copy)
            out.append(copy)
        return out

    def _epoch(self, tail: str) -> list:
        bufs = ", ".join(f"o_bufs[{k}]" for k in range(len(self.cost.data)))
        return _jit(
            "_epoch", f"theta, g, o_perm, o_rng, o_shuffle, o_batch, o_step0, o_max_steps, o_hyper, o_sa, cols, o_bufs, o_mean, "
                      f"o_rows, o_blowup{tail}",
            "one epoch of minibatches in the order perm (at most max_steps updates), perm first shuffled\n"
            "in place (Fisher-Yates, SplitMix64 state rng) where shuffle is set.\n"
            "Returns (status, updates, the minibatch costs' sum, each weighted by its rows)",
            [ir.Assign("o_v", "np.empty(0)"),
             ir.Assign("o_acc", f"np.zeros({max(self.sizes['vg'], 1)})"),
             ir.Assign("o_res", "np.empty(N_PARAMS + 1)"),
             ir.Assign("o_total", "0.0"),
             ir.Assign("o_count", "0"),
             ir.Assign("o_n", "o_perm.shape[0]"),
             ir.If("o_shuffle != 0", [fisher_yates("o_perm", "o_rng", "o_n", "o_")],
                   comment="a new epoch's row order (the scalar loops' shuffle)"),
             ir.For("o_lo", ir.range_(0, "o_n", "o_batch"), [
                 ir.If("o_count >= o_max_steps", [ir.Break()]),
                 ir.Assign("o_hi", "min(o_lo + o_batch, o_n)"),
                 ir.Assign("o_nb", "o_hi - o_lo"),
                 _each("o_i", "o_nb", ir.Assign("o_p", "o_perm[o_lo + o_i]"), self._gather()),
                 _each("o_i", "o_acc.shape[0]", ir.Assign("o_acc[o_i]", "0.0")),
                 ir.Assign("o_scale", "1.0 / o_nb if o_mean else o_rows / o_nb"),
                 # o_nb - o_nb, not a literal 0: one signature
                 ir.Stmt(f"vg_rows(theta, o_v, {bufs}, o_nb - o_nb, o_nb, o_scale, o_acc)"),
                 ir.Stmt("vg_finish(theta, o_v, o_acc, o_res)"),
                 ir.Assign("o_f", "o_res[0]"),
                 ir.If("not (abs(o_f) <= o_blowup)", [ir.Return("DIVERGED, o_count, o_total")]),
                 _each("o_i", "N_PARAMS", ir.Assign("g[o_i]", "o_res[o_i + 1]")),
                 ir.Assign("o_step", "o_step0 + o_count"),
                 ir.Stmt(f"_update(theta, g, _rate(o_step, o_sa), o_step, o_hyper{tail})"),
                 ir.AugAssign("o_total", "+", "o_f * o_nb"),
                 ir.AugAssign("o_count", "+", "1"),
             ]),
             ir.Return("RUNNING, o_count, o_total")],
            "_jit_inline")

    def _entry_point(self) -> list:
        """loop_c: the module's one C entry point, over raw pointers (``numba.cfunc``). Mode
        EVALUATE: the full cost and gradient (``_fg``); mode STEPS: ``_epoch``, whose code is
        compiled into it (Numba's inline="always"). calcml compiles
        it and keeps its machine code beside this file (calcml.native), so a later process
        runs a fit without loading Numba's cache of this module (about 0.3 s)."""
        cost, opt = self.cost, self.opt
        params = [("mode", "types.int64"), ("theta_p", "_F64P"), ("g_p", "_F64P"), ("hyper_p", "_F64P"),
                  ("n_hyper", "types.int64"), ("sa_p", "_F64P"), ("n_sa", "types.int64"), ("bounds_p", "_I64P"),
                  ("n_stripes", "types.int64"), ("scale", "types.float64")]
        data = []
        for k, t in enumerate(cost._din):  # in DATA_NAMES order; labels are int64
            params.append((f"d{k}_p", "_I64P" if t.role == "label" else "_F64P"))
            data.append((f"d{k}_p", "".join(f", {m}" for m in t.shape) or ","))
        if not data:  # DUMMY_DATA's one float
            params.append(("d0_p", "_F64P"))
        params.append(("n", "types.int64"))
        cols = "".join(f"carray({p}, (n{shape})), " for p, shape in data) or "carray(d0_p, (1,)), "
        params += [("perm_p", "_I64P"), ("n_perm", "types.int64"), ("rng_p", "types.CPointer(types.uint64)"),
                   ("shuffle", "types.int64"), ("batch", "types.int64"),
                   ("step0", "types.int64"), ("max_steps", "types.int64"), ("mean", "types.int64"),
                   ("rows", "types.int64"), ("blowup", "types.float64")]
        params += [(f"b{k}_p", t) for k, (p, t) in enumerate(params[10:10 + len(data)])]
        state = []
        for k, (_, shape, _) in enumerate(opt.state):
            params.append((f"st{k}_p", "_F64P"))
            state.append(f"carray(st{k}_p, ({', '.join(opt.dims(shape, 'N_PARAMS'))},))")
        params.append(("io_p", "_F64P"))
        tail = "".join(f", {a}" for a in state)
        bufs = "".join(f"carray(b{k}_p, (batch{shape})), " for k, (_, shape) in enumerate(data))
        run = [ir.Assign("status, done, value",
                         f"_epoch(theta, g, carray(perm_p, (n_perm,)), carray(rng_p, (1,)), shuffle, batch, step0,\n"
                         f"       max_steps, hyper, sa, cols,\n"
                         f"       ({bufs.rstrip(' ')}), mean != 0, rows, blowup{tail})")]
        size = max(self.sizes["vg"], 1)
        return [
            ir.Comment("-- the C entry point (numba.cfunc): pointers in, the loop above on arrays of them -----------"),
            ir.Raw("from numba import carray, types  # noqa: E402"),
            ir.Blank(),
            ir.Assign("_F64P", "types.CPointer(types.float64)"),
            ir.Assign("_I64P", "types.CPointer(types.int64)"),
            ir.Assign("EVALUATE", "0"),
            ir.Assign("STEPS", "1"),
            ir.Assign("LOOP_ARGS", repr(tuple(name for name, _ in params))),
            ir.Assign("SIG_LOOP", f"types.void({', '.join(t for _, t in params)})"),
            ir.Assign("CFUNC_FLAGS", repr(KERNEL_FLAGS)),
            ir.Blank(2),
            ir.Def("loop_c", tuple(name for name, _ in params), [
                ir.Assign("theta", "carray(theta_p, (N_PARAMS,))"),
                ir.Assign("g", "carray(g_p, (N_PARAMS,))"),
                ir.Assign("hyper", "carray(hyper_p, (n_hyper,))"),
                ir.Assign("sa", "carray(sa_p, (n_sa,))"),
                ir.Assign("io", "carray(io_p, (3,))"),
                ir.Assign("cols", f"(carray(bounds_p, (n_stripes, 2)), scale, {cols.rstrip(', ')})"),
                ir.If("mode == EVALUATE", [
                    ir.Assign("io[0]", f"_fg(theta, cols, g, np.zeros({size}), np.zeros({size}), np.empty(N_PARAMS + 1), "
                                       "np.empty(0))"),
                    ir.Return(None)]),
                run,
                ir.Assign("io[0]", "value"),
                ir.Assign("io[1]", "status"),
                ir.Assign("io[2]", "done"),
            ], doc="EVALUATE: io[0] = the full cost at theta, its gradient into g.\nSTEPS: "
                   "one epoch of minibatches (_epoch); io = [value (the sum of the minibatch costs), status, "
                   "updates].\nArrays as pointers, their sizes beside them."),
            ir.Blank(),
        ]

    def _constants(self, **values) -> list:
        """The status codes and the module's constants."""
        return _result.status_statements(with_names=True) + [ir.Assign(name, repr(v)) for name, v in values.items()]

    def text(self) -> str:
        opt, cost = self.opt, self.cost
        body = [
            ir.Comment(f"-- the optimizer: {opt!r}" + (f", schedule {self.schedule!r}" if self.schedule else "")),
            self._constants(MINIBATCH=self.minibatch, REDUCE_MEAN=cost.reduce == "mean", STRIPES=STRIPES,
                            PATH_COLS=self.path_cols, HIST_STRIDE=1 + self.path_cols,
                            HISTORY_MAX=_result.HISTORY_MAX,
                            DEFAULT_EPOCHS=10, DEFAULT_MAXITER=opt.default_maxiter, DATA_NAMES=cost.data_names,
                            PARAM_NAMES=cost.param_names, PARAM_SHAPES=tuple(cost.param_shapes.values()),
                            HYPER_NAMES=tuple(opt.hyper), DATA_LAYOUT=_layout(cost)),
            ir.Assign("DUMMY_DATA", "(np.zeros(1),)"),
            ir.Comment("the optimizer's functions go into their one compiled caller, loop_c (Numba's inline=\"always\"):\n"
                       "compiled once, there, not also each on its own (the kernels above stay functions of their own).\n"
                       "_PYTHON_TIER (calcml sets it; never otherwise): this source run as Python, its kernels machine code"),
            ir.Assign("_PYTHON_TIER", 'bool(globals().get("_PYTHON_TIER"))'),
            ir.Assign("_jit_inline", f"numba.njit(inline='always', {_NJIT_FLAGS}) if not _PYTHON_TIER else (lambda f: f)"),
            ir.Blank(2),
            self.full_batch(),
            self.state_factory(),
            ir.Raw(_RNG_SOURCE.strip("\n").replace("@_jit\n", "@_jit_inline\n")) if self.minibatch else None,
            ir.Blank(2) if self.minibatch else None,
            self.first_order(),
            self._entry_point(),
        ]
        return ir.render(body) + _EVAL + _DRIVER + _RUN

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
        rule = _rule(self.optimizer, self.schedule) if self.optimizer.kind == "first_order" else None
        base, sizes = self.cost.module_source(self._kinds(), helpers=rule[3] if rule else ())
        src = _Source(self.cost, self.optimizer, self.schedule, self.minibatch, sizes, rule)
        if self.optimizer.kind != "first_order":
            return base + "\n\n" + src.search_text()
        return base + "\n\n" + src.text()

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
    extra = {}
    runner = None
    by_loop = loops.takes(opt, prog.minibatch)  # calcml.loop's run_segment, the kernels its gradient
    if opt.kind == "first_order" and not by_loop:  # minibatches: the module's _epoch, its driver
        extra["full"] = _threaded_full(prog.module, n_rows)
        if over is not None:  # each full pass one Dask computation; the epochs chunk by chunk
            extra["full"] = over.full
            extra["epoch"] = _chunk_epochs(prog, over, int(seed))
            extra["per_epoch"] = extra["epoch"].per_epoch
        elif (runner := loop_for(prog, n_rows, epochs, maxiter)) is not None:
            extra["loop"] = runner.run  # the loop's machine code (or, first, its Python); threaded passes stay on the threads
            if extra["full"] is None:
                extra["full"] = runner.full
    if lr_used == "auto":
        differences = None
        if by_loop and over is None:
            differences = _differences(_ev_full(ev), None, cost.n_params)
        elif over is None and extra.get("full") is not None:
            differences = _differences(extra["full"], prog.module.columns(arrays, n_rows, cost.reduce == "mean"),
                                       cost.n_params)
        with _SingleThreadedBlas():
            lr_used = _auto_rate(prog, x, ev, notes, differences)
        sched_values = [lr_used]
    bar = None
    if progress:
        from ..program import _ProgressBar

        bar = _ProgressBar(opt.name)
    try:
        hyper = [float(v) for v in opt.hyper.values()]
        if by_loop:
            rep = _run_loop(prog, x, ev, over, arrays, n_rows, sched_values, epochs, maxiter, float(tol), int(seed), bar)
        elif opt.kind == "first_order":
            with _SingleThreadedBlas():
                rep = prog.module.drive(x, arrays, n_rows, hyper, sched_values or [0.0],
                                        prog.batch_size, epochs, maxiter, float(tol), int(seed), bar, **extra)
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
            partial(_tensor_noise, prog, arrays, n_rows, rep["x"], runner)
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
        out = mod._drive(x, stand_in, hyper, sched, None, epochs, maxiter, tol, seed, bar, first_segment=1,
                         passes=mod._Passes(passes(None)))
    else:
        extra = {}
        if cost.has_data and thread_count("auto", n_rows) > 1:
            full = _ev_full(ev)
            extra["passes"] = lambda _cols: (lambda theta, g: full(theta, None, g))
        out = mod.drive(x, arrays if cost.has_data else None, hyper, sched, None, epochs, maxiter, tol, seed, bar,
                        **extra)
    return dict(zip(_REPORT, out))


def _tier_seconds(mod, ints, n_rows) -> float:
    """The Python time of a first-order run of a loop module (calcml.tensor.loops) in the Python
    tier, estimated: each step's update and norm over the parameters, and its pass's stripes
    (their kernels machine code, their sums added by NumPy)."""
    stripes = len(mod.stripes(n_rows)) if mod.DATA_NAMES else 0
    per_param = _PYTHON_PARAM_SECONDS + mod.N_UPDATE * _PYTHON_STATEMENT_SECONDS
    return int(ints[mod.I_MAX_STEPS]) * (mod.N_PARAMS * per_param + stripes * _PYTHON_STRIPE_CALL_SECONDS)


# a stripe's kernel called from the Python tier (ctypes), its sums added; a statement of the
# update rule, a parameter and step (measured on chained Rosenbrock, 1,000 parameters: 1.6 us a
# parameter and step for gd's one statement, 3.8 us for Adam's five)
_PYTHON_STRIPE_CALL_SECONDS = 3e-6
_PYTHON_STATEMENT_SECONDS = 0.55e-6


def _tier_passes(cost: TensorCost):
    """``install(py)``: a tensor loop module run as Python (calcml.loop's Python tier) gets its
    passes over rows as the machine code of the cost's compiled kernels (the same source and
    flags: the same bits), their stripes' sums added by NumPy in stripe order."""
    def install(py):
        fns = _native_vg(cost)
        if fns is None:
            raise RuntimeError("no machine code for the kernels")  # the loop is compiled instead
        size, rows_for, finish = fns
        if rows_for is None:  # no data: the finish alone, on zero sums
            py.vg_finish = finish
            return
        n, empty = cost.n_params, np.empty(0)

        def fg_serial(theta, cols, g):
            bounds, arrays = cols[0].tolist(), cols[2:]
            rows = rows_for(arrays[0].shape[0], arrays)
            acc = np.zeros((len(bounds), size))
            for j, (lo, hi) in enumerate(bounds):
                rows(theta, empty, *arrays, lo, hi, cols[1], acc[j])
            res = np.empty(n + 1)
            finish(theta, empty, sum_in_order(acc), res)
            g[:] = res[1:]
            return float(res[0])

        py._fg_serial = fg_serial
        py._fg_rows = lambda theta, cols, g, acc, total, res: fg_serial(theta, cols, g)
    return install


def _tensor_noise(prog: TensorProgram, arrays, n_rows, x, runner=None) -> float:
    """The sampling noise of the full gradient at x (result.gradient_noise), each row's
    gradient (plus the penalty's) over that one row. Minibatch methods: by the module's
    row_gradient, whose kernel the run compiled or loaded already. Full-batch methods: by the
    cost's compiled kernels, whose machine code their passes ran or the Python tier called
    (the loop module's own pass, fg_c, would cost a cold fit its compile)."""
    cost = prog.cost
    if prog.optimizer.kind == "first_order" and prog.minibatch:
        mod = prog.module
        cols = mod.columns(arrays, n_rows, cost.reduce == "mean")
        g = np.empty(x.shape[0])
        native = runner or native_loop(prog)  # the run's own loop (machine code, or its Python tier)

        def row(i):
            if native is None:
                mod.row_gradient(x, cols, i, g)
            else:  # the full pass over the one stripe [i, i + 1), unscaled: row_gradient's sums
                native.full(x, (np.array([[i, i + 1]], dtype=np.int64), 1.0) + cols[2:], g)
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


class NativeLoop:
    """A tensor optimizer module's ``loop_c`` as machine code: loaded from beside the module,
    else compiled with ``numba.cfunc`` and kept there (:func:`calcml.native.load_or_compile`),
    and called through ctypes with the arrays' addresses. ``full`` and ``run`` take the
    arguments of the module's ``_fg``-based ``full_value_and_grad`` and of its ``_full_steps``
    or ``_epoch``: a warm process so runs a fit without loading Numba's cache of the module."""

    def __init__(self, mod, address, keep):
        import ctypes

        from numba import types

        self.mod, self.keep = mod, keep
        argtypes = [ctypes.c_void_p if isinstance(t, types.CPointer) else
                    ctypes.c_double if t == types.float64 else ctypes.c_int64 for t in mod.SIG_LOOP.args]
        self.fn = ctypes.CFUNCTYPE(None, *argtypes)(address)
        self.n_args = len(argtypes)
        self.io = np.zeros(3)

    def _head(self, mode, theta, g, hyper, sa, cols):
        """The arguments up to the data's row count."""
        bounds = cols[0]
        return [mode, theta.ctypes.data, g.ctypes.data, hyper.ctypes.data, hyper.shape[0], sa.ctypes.data,
                sa.shape[0], bounds.ctypes.data, bounds.shape[0], cols[1],
                *(a.ctypes.data for a in cols[2:]), cols[2].shape[0]]

    def full(self, theta, cols, g):
        """the full cost at theta, its gradient into g (the module's _fg: its stripes, the same bits)"""
        empty = self.io[:0]
        args = self._head(self.mod.EVALUATE, theta, g, empty, empty, cols)
        self.fn(*args, *([0] * (self.n_args - len(args) - 1)), self.io.ctypes.data)
        return float(self.io[0])

    def run(self, theta, g, *rest):
        """_epoch(theta, g, perm, rng, shuffle, batch, step0, max_steps, hyper, sa, cols, bufs,
        mean, rows, blowup, *state), as the module's loop_c"""
        io = self.io
        perm, rng, shuffle, batch, step0, max_steps, hyper, sa, cols, bufs, mean, rows, blowup, *state = rest
        args = self._head(self.mod.STEPS, theta, g, hyper, sa, cols)
        args += [perm.ctypes.data, perm.shape[0], rng.ctypes.data, int(shuffle), batch, step0, max_steps,
                 int(bool(mean)), rows, blowup, *(b.ctypes.data for b in bufs)]
        self.fn(*args, *(s.ctypes.data for s in state), io.ctypes.data)
        return int(io[1]), int(io[2]), float(io[0])


def native_loop(prog: TensorProgram) -> NativeLoop | None:
    """The program's module's NativeLoop (one per module and process), or None where the
    machine code is out of reach (NUMBA_DISABLE_JIT; a compile error: the module's dispatchers
    run the fit, after a warning)."""
    from ..compile import _jit_disabled
    from .. import native

    mod = prog.module
    found = getattr(mod, "_calcml_loop", None)
    if found is not None or not hasattr(mod, "loop_c") or _jit_disabled():
        return found or None
    try:
        address, keep, _ = native.load_or_compile(prog.path, "loop_c", lambda: (mod.loop_c, mod.SIG_LOOP,
                                                                               mod.CFUNC_FLAGS))
        found = NativeLoop(mod, address, keep)
    except Exception as exc:  # noqa: BLE001 - the dispatchers still run the loop
        import warnings

        warnings.warn(f"calcml could not compile the loop's machine code ({type(exc).__name__}: {exc}); "
                      f"Numba's dispatchers run it", RuntimeWarning, stacklevel=3)
        found = False
    mod._calcml_loop = found
    return found or None


# What a step costs as Python in the Python tier, beyond its passes' machine code (measured on
# breast cancer, 31 parameters: 108 us a full-batch step over 16 stripes, 385 us an Adam step
# over 32 rows; the estimate that decides whether a run is short enough for the tier): a
# parameter's update, a datum gathered into a minibatch, a row shuffled at an epoch's start.
_PYTHON_PARAM_SECONDS = 1.0e-6
_PYTHON_DATUM_SECONDS = 0.3e-6
_PYTHON_ROW_SECONDS = 1.0e-6


class PythonLoop:
    """A tensor optimizer module's loops run as the Python they are (calcml.loop's Python
    tier): the module's source run again with ``_PYTHON_TIER`` set, its kernels the machine
    code of the cost's compiled kernels (the same source, the same flags: the same bits), so
    that a first fit does not wait for ``loop_c``'s compile (about 3 s). Once the module's loops
    have spent their threshold in Python (calcml.loop.tier_up_threshold), in all processes
    together, or after a Python float error, ``loop_c`` is compiled and the run goes on there
    from the state the Python left. Each call runs from a copy of the state it changes
    (calcml.loop.python_call). ``full`` and ``run`` are :class:`NativeLoop`'s."""

    def __init__(self, prog, py):
        self.prog, self.py, self.native = prog, py, None
        self.python_seconds = _loop.python_seconds(prog.path)

    def _compiled(self):
        """The loops' machine code (compiled now if need be), or None: the module's dispatchers."""
        if self.native is None:
            self.python_seconds = max(self.python_seconds, _threshold(self.prog))
            self.native = native_loop(self.prog) or False
        return self.native or None

    def _python(self) -> bool:
        return self.native is None and self.python_seconds < _threshold(self.prog)

    def full(self, theta, cols, g):
        if self._python():
            return self.py.full_value_and_grad(theta, cols, g)
        native = self._compiled()
        return native.full(theta, cols, g) if native is not None else self.prog.module.full_value_and_grad(theta, cols, g)

    def run(self, theta, g, *rest):
        if self._python():
            # one epoch: theta, g, perm, rng and the optimizer's state change (rest: _epoch's after g)
            kept, call = [theta, g, rest[0], rest[1], *rest[13:]], self.py._epoch
            out, dt = _loop.python_call(lambda: call(theta, g, *rest), kept)  # a Ctrl-C: stopped where it began
            self.python_seconds += dt
            _loop.save_python_seconds(self.prog.path, self.python_seconds)
            if out is not _loop.FLOAT_ERROR:
                return out
        native = self._compiled()  # past the threshold, or Python's float rules: machine code
        if native is not None:
            return native.run(theta, g, *rest)
        mod = self.prog.module
        return mod._epoch(theta, g, *rest)


def _threshold(prog) -> float:
    """The Python time after which the program's loops are compiled (calcml.loop.tier_up_threshold)."""
    memo = prog.__dict__.setdefault("_tier_memo", {})
    return _loop.tier_up_threshold(prog.path, "loop_c", memo)


def loop_for(prog: TensorProgram, n_rows: int, epochs, maxiter):
    """What runs the program's loops for this run: the Python tier (:class:`PythonLoop`) where
    ``loop_c``'s machine code is not cached yet, the loops have spent less than their threshold
    in Python and this run's Python time, estimated from its steps, rows and parameters, fits in
    what is left of it; else :func:`native_loop`."""
    from ..compile import _jit_disabled
    from .. import native

    mod = prog.module
    found = getattr(mod, "_calcml_loop", None)
    if found is not None or not hasattr(mod, "loop_c") or _jit_disabled():
        return native_loop(prog)
    left = _threshold(prog) - _loop.python_seconds(prog.path)
    n = prog.cost.n_params
    per_epoch = -(-n_rows // prog.batch_size)  # (a minibatch program: full-batch loops are calcml.loop's)
    steps = (epochs or mod.DEFAULT_EPOCHS) * per_epoch
    steps = steps if maxiter is None else min(steps, maxiter) if epochs is not None else maxiter
    datum = sum(math.prod(shape) for _, shape, _ in mod.DATA_LAYOUT)
    estimate = steps * (prog.batch_size * datum * _PYTHON_DATUM_SECONDS + n * _PYTHON_PARAM_SECONDS) + \
        -(-steps // per_epoch) * n_rows * _PYTHON_ROW_SECONDS
    if not (estimate <= left) or native.object_path(prog.path, "loop_c").exists():
        return native_loop(prog)
    py = getattr(mod, "_calcml_python", None)
    if py is None:
        py = _python_module(prog)
        if py is None:
            return native_loop(prog)
        mod._calcml_python = py
    return PythonLoop(prog, py)


def _python_module(prog):
    """The program's module run again as Python (``_PYTHON_TIER``), its ``vg_rows`` and
    ``vg_finish`` the machine code of the cost's compiled kernels; None where that cannot be."""
    try:
        fns = _native_vg(prog.cost)
        if fns is None:
            return None
        py = _loop.python_module(prog.module, prog.path)
    except Exception:  # noqa: BLE001 - the machine code runs the loops instead
        return None
    _, rows_for, finish = fns
    py.vg_finish = finish
    if rows_for is not None:
        rows_raw = rows_for.raw

        def vg_rows(theta, v, *rest):
            arrays, (lo, hi, scale, acc) = rest[:-4], rest[-4:]
            rows_raw(theta.ctypes.data, v.ctypes.data, *[a.ctypes.data for a in arrays], arrays[0].shape[0],
                     int(lo), int(hi), float(scale), acc.ctypes.data)

        py.vg_rows = vg_rows
    py._calcml_keep = fns
    return py


def _threaded_full(mod, n_rows):
    """The module's full_value_and_grad with its stripes on calcml's threads (every pass of a
    full-batch run; a minibatch run's first, last and per-epoch convergence passes), or None
    (the module's own, one thread; compiled full-batch steps) when too few rows pay for threads."""
    threads = thread_count("auto", n_rows)
    if threads <= 1 or not mod.DATA_NAMES:
        return None
    empty = np.zeros(0)

    def full(theta, cols, g):
        bounds = cols[0]
        acc = np.zeros((bounds.shape[0], max(mod.ACC_SIZES["vg"], 1)))
        run_striped(mod.vg_rows, theta, empty, cols[2:], [tuple(b) for b in bounds.tolist()], cols[1], acc, threads)
        res = np.empty(mod.N_PARAMS + 1)
        mod.vg_finish(theta, empty, sum_in_order(acc), res)
        g[:] = res[1:]
        return float(res[0])

    return full


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
    """The generated driver's ``epoch`` over Dask data: each epoch visits the chunks of rows in
    a seeded random order, the rows of the j-th visited chunk shuffled by a generator seeded
    with the j-th of the integers drawn next (the same seed, the same bits), and runs the
    compiled ``_epoch`` over each where the chunk is (MINIBATCH_WHERE). Minibatches do not
    cross chunks: a chunk's last one may be short."""
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
