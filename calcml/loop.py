"""The one generated descent driver: (cost, optimizer, schedule, batching) -> one module.

The module holds, in plain Python that Numba compiles:

* ``run_segment``: the descent loop, the whole of it one Numba function. For first-order
  methods the cost's exact gradient (the straight-line code of
  :meth:`calcml.codegen.ModuleBuilder.program`) is inlined in the loop, parameters and
  optimizer state live in local scalars, and nothing is allocated per step. It runs until
  a stopping test fires or a given step count is reached, keeping every counter in small
  arrays, so a run is a sequence of segments that resume exactly where the last one stopped.
  Its first call evaluates the cost at ``x0`` (``_begin``) and the call that ends the run
  writes the report (``_end``: the final point, its cost and gradient), so a run of one segment
  is one call of compiled code. Cheap steps (costs without data, few parameters) run each
  step's gradient and update first and its bookkeeping after (``_Generator._delayed_body``);
* ``_fg``: the full-batch value and gradient (with the data's finiteness check in the same
  pass), for the cost at ``x0``, the final report and L-BFGS's line search; for Newton also
  ``_f`` (the value) and ``_hess`` (the exact Hessian). Full-batch passes over large data
  (``PARALLEL_MIN_ROWS`` rows or more) run on calcml's threads: ``_fg`` (and Newton's
  ``_f``, ``_hess``, when given) calls back the pass that calcml made for the run's columns
  (its compiled kernels, in fixed chunks: the same bits for any thread count), a ctypes
  callback whose address the loop reads from a table (``_Passes``), so that the loop's machine
  code does not depend on the process that made it; an exported module, given none, makes
  the serial pass;
* a SplitMix64 generator for the per-epoch Fisher-Yates shuffle (minibatch runs), so a seed
  gives the same permutation, hence the same bits, on every machine and in every segmentation;
* ``run(x0, data, ...)``: the plain-Python driver that validates nothing (calcml did), sets up
  the state, calls ``run_segment`` in segments of about a quarter of a second (between which Python
  may raise ``KeyboardInterrupt`` and a callback may draw progress) and reports; ``drive`` is
  the same without the report's dict (what calcml calls). Both are written for each module,
  with only the branches it takes: a short run's Python (run cold, after a millisecond of
  compiled loop) costs as much as thousands of cheap steps, and every line counts.

Words: a run's steps go in *segments* (the steps between two returns to Python); data rows
go in *chunks* (the kernels' fixed units of work and of summation, ``codegen.CHUNK`` rows).

The module imports only the standard library, ``numpy`` and ``numba`` (with its ``llvmlite``): ``Program.export`` writes
it out as a standalone file. Hyperparameters and schedule numbers are arguments of
``run_segment`` (slots of its ``work`` array), not constants, so one compiled loop serves a
whole learning-rate sweep.

Stopping (one place, the loop): ``tol`` on the full gradient's norm (full-batch runs: every
step; minibatch runs: at each epoch's end, by one pass over all rows), the step
budget (``maxiter``, or ``epochs`` of minibatches), and divergence: a non-finite cost or
gradient, or a cost beyond ``1e10 * max(1, |J(x0)|)``, stops the run at once; the best point
seen is kept (full batch: the evaluated iterate of lowest cost; minibatch: the end-of-epoch
parameters of the epoch of lowest mean minibatch cost, or ``x0``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

import sympy as sp
from sympy.printing.precedence import precedence

from . import result as _result
from . import ir
from .codegen import KERNEL_FLAGS, ModuleBuilder, RowProgram, _comment, _Writer, chunk_sums
from .compile import PARALLEL_MIN_ROWS as _PARALLEL_MIN_ROWS
from .cost import Cost
from .optim import CALL_ARGS, GRAD, PARAM, RATE, STEP, Optimizer, slot
from .printing import NumbaPrinter
from .schedules import Schedule

__all__ = ["generate_source", "load_module"]

# Threshold of a blown-up cost, relative to max(1, |J(x0)|).
BLOWUP = 1e10
# Full-batch history keeps at most this many entries (every k-th iteration beyond): a fresh
# array per run, and touching a large one costs page faults (W4: 100,000 steps, +50%).
HISTORY_MAX = 10_000
# Costs with at most this many parameters record the iterates beside the history entries.
PATH_MAX_PARAMS = 2
DEFAULT_EPOCHS = 10
# Chunks of about this long (seconds): how often Python sees Ctrl-C and redraws progress.
SEGMENT_SECONDS = 0.25
# Parameters kept in local scalars (unrolled updates) up to this many; arrays beyond.
UNROLL_MAX = 64
# Full-batch first-order loops of costs without data, up to this many parameters, book each
# step after its update (see _Generator._delayed_body).
DELAY_MAX = 16
# Line-searched steps that leave the gradient at the new point in g (the loop need not evaluate it).
_KEEPS_GRADIENT = frozenset({"lbfgs"})
# Full-batch passes over at least this many rows run on calcml's threads: the kernels' own
# threshold, since they are the kernels' own passes.
PARALLEL_MIN_ROWS = _PARALLEL_MIN_ROWS

_STATUS_LINES = [
    "RUNNING = -1",
    f"CONVERGED = {_result.CONVERGED}",
    f"MAXITER = {_result.MAXITER}",
    f"EPOCHS_DONE = {_result.EPOCHS_DONE}",
    f"DIVERGED = {_result.DIVERGED}",
    f"INTERRUPTED = {_result.INTERRUPTED}",
    f"LINE_SEARCH_FAILED = {_result.LINE_SEARCH_FAILED}",
    "STATUS_NAMES = {-1: 'running', 0: 'converged', 1: 'maxiter', 2: 'epochs done', 3: 'diverged', "
    "4: 'interrupted', 5: 'line search failed'}",
]

# Slots of the two small arrays that carry the run's counters between segments (`ints`, and
# the head of `work`).
_INTS = ["STEP", "STOP", "EPOCH", "POS", "BATCH", "HIST_I", "HIST_NEXT", "HIST_EVERY", "BEST_STEP", "FRESH", "NFEV",
         "MAX_STEPS", "MAX_EPOCHS", "HIST_LEN", "BEGUN", "ENDED", "STATUS", "DIVERGED_AT", "PASSES"]
_FLOATS = ["BEST", "BLOWUP", "TOL", "VALUE", "GNORM", "EPOCH_SUM", "F0", "FUN", "FUN_GNORM"]

# The first and the last act of a run, in compiled code: run_segment calls them (one call of
# compiled code does a whole short run), the driver only after a Ctrl-C.
_BEGIN_END_SOURCE = '''
@_jit
def _begin(x0, theta, best, g, cols, ints, floats):
    """The parameters and the best point so far := x0; the cost at x0 and the divergence
    threshold. Returns whether x0 and the cost at x0 are finite."""
    finite = True
    for j in range(N_PARAMS):
        theta[j] = x0[j]
        best[j] = x0[j]
        finite = finite and math.isfinite(x0[j])
    f0 = _fg(theta, cols, g, ints[I_PASSES])
    gn2 = 0.0
    for j in range(N_PARAMS):
        gn2 += g[j] * g[j]
    ints[I_BEGUN] = 1
    ints[I_FRESH] = 1 if FIRST_ORDER else 0
    ints[I_STATUS] = RUNNING
    floats[F_F0] = f0
    floats[F_VALUE] = f0
    floats[F_GNORM] = math.sqrt(gn2)
    if finite and math.isfinite(f0):
        floats[F_BEST] = f0
        floats[F_BLOWUP] = BLOWUP * max(1.0, abs(f0))
        return True
    floats[F_BEST] = math.inf
    floats[F_BLOWUP] = math.inf
    return False


@_jit
def _end(theta, best, cols, ints, floats, xout, gout, status):
    """The report: the final point (the best one after a divergence or a Ctrl-C) in xout, its
    gradient in gout, its cost and gradient norm in floats; a last update that went off is
    reported as a divergence, at the best point. Returns the final status."""
    step = ints[I_STEP]
    if status == RUNNING:
        status = EPOCHS_DONE if (MINIBATCH and ints[I_EPOCH] >= ints[I_MAX_EPOCHS]) else MAXITER
    diverged_at = step if status == DIVERGED else -1
    at_best = status == DIVERGED or status == INTERRUPTED
    for j in range(N_PARAMS):
        xout[j] = best[j] if at_best else theta[j]
    fun = _fg(xout, cols, gout, ints[I_PASSES])
    gn2 = 0.0
    for j in range(N_PARAMS):
        gn2 += gout[j] * gout[j]
    if status != DIVERGED and not (abs(fun) <= floats[F_BLOWUP] and gn2 < math.inf):
        status = DIVERGED
        diverged_at = step
        for j in range(N_PARAMS):
            xout[j] = best[j]
        fun = _fg(xout, cols, gout, ints[I_PASSES])
        gn2 = 0.0
        for j in range(N_PARAMS):
            gn2 += gout[j] * gout[j]
    floats[F_FUN] = fun
    floats[F_FUN_GNORM] = math.sqrt(gn2)
    ints[I_ENDED] = 1
    ints[I_STATUS] = status
    ints[I_DIVERGED_AT] = diverged_at
    return status
'''

# Full-batch modules over data: the passes over large data, on calcml's threads when calcml
# made them for the run's columns (drive's ``passes``), else serial.
_THREADED_PASS_SOURCE = '''
# -- passes over large data on calcml's threads ------------------------------------------------
# calcml makes, for the length of a run, the passes over that run's columns with its compiled
# kernels on its threads (fixed chunks of rows: the same bits for any thread count). The loop
# finds them as C function pointers (ctypes callbacks) in a table at the address ints[I_PASSES]:
# slot 0 the value and gradient, 1 the value, 2 the Hessian (0: none), then two counters, the
# calls begun and the calls finished. With none made (an exported module, small data), the
# passes are the serial ones below.
P_FG, P_F, P_HESS, P_BEGUN, P_DONE = 0, 1, 2, 3, 4


@intrinsic
def _pass_at(typingctx, table, slot):
    """the function pointer in slot `slot` of the table at address `table` (0: none)"""
    def codegen(context, builder, signature, args):
        entries = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load(builder.gep(entries, [args[1]]))
    return types.int64(types.int64, types.int64), codegen


@intrinsic
def _call_pass(typingctx, table, slot, theta, out):
    """table[slot](theta's data, out's data): the pass's value (NaN when its Python did not
    finish: a Ctrl-C that struck before it could catch it; drive then stops the run)"""
    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        i64 = ir.IntType(64)
        entries = builder.inttoptr(args[0], i64.as_pointer())
        fnty = ir.FunctionType(ir.DoubleType(), [i8p, i8p])
        fn = builder.inttoptr(builder.load(builder.gep(entries, [args[1]])), fnty.as_pointer())
        begun = builder.gep(entries, [i64(P_BEGUN)])
        builder.store(builder.add(builder.load(begun), i64(1)), begun)
        a = context.make_array(signature.args[2])(context, builder, args[2])
        b = context.make_array(signature.args[3])(context, builder, args[3])
        value = builder.call(fn, [builder.bitcast(a.data, i8p), builder.bitcast(b.data, i8p)])
        done = builder.load(builder.gep(entries, [i64(P_DONE)]))
        whole = builder.icmp_signed("==", done, builder.load(begun))
        return builder.select(whole, value, ir.Constant(ir.DoubleType(), float("nan")))
    return types.float64(types.int64, types.int64, theta, out), codegen


if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: the same calls, from Python
    def _pass_at(table, slot):
        return ctypes.c_int64.from_address(int(table) + 8 * int(slot)).value

    def _call_pass(table, slot, theta, out):
        counts = np.ctypeslib.as_array(ctypes.cast(int(table) + 8 * P_BEGUN, ctypes.POINTER(ctypes.c_int64)), (2,))
        counts[0] += 1
        value = _PASS_TYPE(_pass_at(table, slot))(theta.ctypes.data, out.ctypes.data)
        return value if counts[1] == counts[0] else math.nan


_PASS_TYPE = ctypes.CFUNCTYPE(ctypes.c_double, ctypes.c_void_p, ctypes.c_void_p)
_F64P = ctypes.POINTER(ctypes.c_double)


class _Passes:
    """The passes calcml made for a run's columns (``passes(cols)``: the value-and-gradient
    function (theta, g) -> value, or a tuple of it, the value function theta -> value and the
    Hessian function (theta, H) -> anything, None where not made), as the table the loop reads.
    A Ctrl-C inside a pass lets it finish (the loop's state stays whole) and stops the run at the
    segment's end; any other exception stops it and is raised (check)."""

    def __init__(self, made):
        made = made if isinstance(made, tuple) else (made,)
        self.table = np.zeros(5, dtype=np.int64)
        self.errors = []
        self.interrupted = False
        self.callbacks = [None if fn is None else _PASS_TYPE(self._wrap(fn, slot)) for slot, fn in enumerate(made)]
        for slot, c in enumerate(self.callbacks):
            if c is not None:
                self.table[slot] = ctypes.cast(c, ctypes.c_void_p).value
        self.address = self.table.ctypes.data

    def _wrap(self, fn, slot):
        shape = (N_PARAMS, N_PARAMS) if slot == P_HESS else (N_PARAMS,)
        views = {}  # address -> array over it: the loop's arrays live as long as the run

        def view(address, shape):
            found = views.get(address)
            if found is None:
                found = views[address] = np.ctypeslib.as_array(ctypes.cast(address, _F64P), shape)
            return found

        def call(theta_p, out_p):
            try:
                theta = view(theta_p, (N_PARAMS,))
                args = (theta,) if slot == P_F else (theta, view(out_p, shape))
                try:
                    value = fn(*args)
                except KeyboardInterrupt:
                    self.interrupted = True
                    value = fn(*args)
                self.table[P_DONE] += 1
                return math.nan if value is None else value
            except BaseException as exc:  # noqa: BLE001 - raised by check(), once the loop returned
                self.errors.append(exc)
                return math.nan
        return call

    def check(self):
        """After a segment: a pass's exception raised, a Ctrl-C in a pass raised."""
        if self.errors:
            raise self.errors[0]
        if self.interrupted or self.table[P_BEGUN] != self.table[P_DONE]:
            self.interrupted = False
            self.table[P_DONE] = self.table[P_BEGUN]
            raise KeyboardInterrupt


@_jit
def _fg(theta, cols, g, passes=0):
    """the full-batch cost at theta; its gradient is written into g. NaN when a datum is not
    finite. The pass calcml made (its threads), if any"""
    if passes != 0 and _pass_at(passes, P_FG) != 0:
        return _call_pass(passes, P_FG, theta, g)
    return _fg_serial(theta, cols, g)
'''

_RNG_SOURCE = '''
# SplitMix64 (Steele, Lea & Flood 2014): a tiny generator whose whole state is one uint64,
# carried between segments in ``rng``; the same seed gives the same shuffles everywhere.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@_jit
def _randbelow(rng, n):
    """uniform integer in [0, n) (modulo bias below n / 2**64)"""
    z = rng[0] + _GOLDEN
    rng[0] = z
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return np.int64(z % np.uint64(n))


if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: NumPy's uint64 wraps as compiled code does, but warns
    _randbelow_compiled = _randbelow

    def _randbelow(rng, n):
        with np.errstate(over="ignore"):
            return _randbelow_compiled(rng, n)
'''

_DRIVER_HEAD = '''

class NonFiniteData(ValueError):
    """The data hold NaN or inf (found in the first pass over them, at x0)."""


# Arrays that runs read and never write, shared: the columns of a cost without data, the
# iterates of costs that record none.
_NO_COLUMNS = (np.zeros(1),)
_NO_PATH = np.zeros((1, 1))
_F64 = np.dtype(np.float64)


def columns_of(data):
    """The data as a tuple of contiguous float64 columns in COLUMN_NAMES order: a dict of
    columns, a 2-D array with one column per name, or a sequence of columns."""
    if not COLUMN_NAMES:
        return _NO_COLUMNS
    if isinstance(data, dict):
        cols = [data[name] for name in COLUMN_NAMES]
    elif isinstance(data, (tuple, list)):
        cols = list(data)
    else:
        arr = np.asarray(data, dtype=np.float64)
        cols = [arr[:, k] for k in range(arr.shape[1])]
    return tuple(np.ascontiguousarray(c, dtype=np.float64).reshape(-1) for c in cols)


def plan(n_rows, batch_size=None, epochs=None, maxiter=None):
    """(max_steps, max_epochs, steps per epoch) from the budget keywords."""
    if MINIBATCH:
        per_epoch = -(-n_rows // batch_size)
        if epochs is None and maxiter is None:
            epochs = DEFAULT_EPOCHS
        by_epochs = epochs * per_epoch if epochs is not None else None
        max_steps = min(s for s in (maxiter, by_epochs) if s is not None)
        max_epochs = epochs if epochs is not None else -(-max_steps // per_epoch)
        return max_steps, max_epochs, per_epoch
    if maxiter is None:
        maxiter = epochs if epochs is not None else DEFAULT_MAXITER
    return maxiter, 0, 1
'''

_DRIVER_TAIL = '''

def run(x0, data=None, *, hyper=None, schedule_args=None, batch_size=None, epochs=None, maxiter=None,
        tol=1e-8, seed=0, callback=None, segment_seconds=SEGMENT_SECONDS, first_segment=None):
    """Minimize from x0 (a 1-D array in PARAM_NAMES order); returns the report: a dict with x,
    fun, grad, nit, nfev, status, history and the bookkeeping.

    hyper: dict of HYPER_NAMES values (default HYPER_DEFAULTS); schedule_args: the schedule's
    numbers (default SCHEDULE_DEFAULTS); batch_size: default BATCH_SIZE. The loop runs in segments of about segment_seconds;
    callback(step, max_steps, value), if given, is called between segments. Ctrl-C stops the
    run and returns the best point seen.
    """
    (x, fun, grad, grad_norm, nit, nfev, status, history, history_every, path,
     epochs, best_step, best_value, diverged_at, blowup) = drive(
        x0, data, HYPER_DEFAULTS if hyper is None else hyper, SCHEDULE_DEFAULTS if schedule_args is None else schedule_args,
        BATCH_SIZE if batch_size is None else batch_size, epochs, maxiter, tol, seed, callback, segment_seconds,
        first_segment)
    return {
        "x": x, "fun": fun, "grad": grad, "grad_norm": grad_norm, "nit": nit, "nfev": nfev,
        "status": status, "status_name": STATUS_NAMES[status], "history": history, "history_every": history_every,
        "path": path, "epochs": epochs, "best_step": best_step, "best_value": best_value,
        "diverged_at": diverged_at, "blowup": blowup,
    }
'''


class _LatencyPrinter(NumbaPrinter):
    """The Numba printer, with each sum's slowest term added last.

    A descent loop is a chain: each step's parameters wait for the last step's gradient, so
    what counts is the latency from parameters to gradient, not the throughput that the
    kernels care about. Python evaluates ``a + b + c`` left to right; putting the term that
    is ready last at the end lets the other additions run while it is computed (on W4's
    Rosenbrock loop, about 15% of the time per step). ``depth`` estimates when each
    temporary is ready. Same value up to rounding; the kernels keep the plain printer.
    """

    _SLOW = 20  # a function call (exp, log, sqrt...) against 1 for an add or a multiply

    def __init__(self, names: dict, depth: dict):
        super().__init__(names)
        self.depth = depth
        self._memo: dict = {}

    def ready(self, e) -> int:
        """Estimated operations on the longest path from the parameters to ``e``."""
        if e in self.depth:
            return self.depth[e]
        if not e.args:
            return 0
        found = self._memo.get(e)
        if found is None:
            inner = max(self.ready(a) for a in e.args)
            slow = isinstance(e, sp.Function) or (isinstance(e, sp.Pow) and not e.exp.is_Integer)
            found = self._memo[e] = inner + (self._SLOW if slow else 1)
        return found

    def _print_Add(self, expr, order=None):
        terms = sorted(self._as_ordered_terms(expr, order=order), key=self.ready)  # stable
        prec = precedence(expr)
        out = []
        for term in terms:
            t = self._print(term)
            sign = "+"
            if t.startswith("-") and not term.is_Add:
                sign, t = "-", t[1:]
            out.extend([sign, f"({t})" if precedence(term) < prec or term.is_Add else t])
        sign = out.pop(0)
        return ("" if sign == "+" else sign) + " ".join(out)

    def _print_Mul(self, expr):
        """Plain products (no division) with their factors in order of readiness, so that
        ``2*p0*h10`` multiplies the early factors while the late one is computed."""
        coeff, factors = expr.as_coeff_mul()
        plain = len(factors) >= 2 and all(
            not (f.is_Pow and (f.exp.is_negative or not f.exp.is_Integer)) and not f.is_Add for f in factors
        )
        if not plain:
            return super()._print_Mul(expr)
        body = "*".join(self.parenthesize(f, precedence(expr)) for f in sorted(factors, key=self.ready))
        if coeff == 1:
            return body
        if coeff == -1:
            return "-" + body
        return f"{self._print(coeff)}*{body}"


def _latency_printer(mb: ModuleBuilder) -> _LatencyPrinter:
    """A latency-ordering printer with the builder's names, and readiness of its temporaries."""
    printer = _LatencyPrinter(mb.names, {})
    for found in (mb.plan_vg, mb.plan_h):  # the builder's derivation plans (None where not made)
        for sym, expr in getattr(found, "temps", ()):
            printer.depth[sym] = printer.ready(expr)
    return printer


class _Generator:
    """Prints one optimizer module."""

    def __init__(self, cost: Cost, opt: Optimizer, schedule: Schedule | None, minibatch: bool):
        self.cost, self.opt, self.schedule, self.minibatch = cost, opt, schedule, minibatch
        self.first_order = opt.kind == "first_order"
        self.mb = ModuleBuilder(cost, with_hessian=opt.kind == "newton")
        self.mb.printer = _latency_printer(self.mb)
        self.n = len(cost.params)
        self.has_data = bool(cost.data)
        self.unrolled = self.first_order and self.n <= UNROLL_MAX
        # cheap steps (no data, few parameters): the step's bookkeeping after its update
        self.delayed = self.unrolled and not minibatch and not self.has_data and self.n <= DELAY_MAX
        # full-batch loops over data make their passes over large data on calcml's threads
        self.threaded = not minibatch and self.has_data
        self.hyper = list(opt.hyper)
        self.state = [s[0] for s in opt.state]

    # -- shared pieces -----------------------------------------------------------------------
    def _put(self, w, indent, nodes):
        """Write statements (interim: until this generator builds calcml.ir statements itself)."""
        for line in ir.lines(nodes, self.mb.printer, indent):
            w(0, line)

    def _c(self, e):
        return ir.code(e, self.mb.printer)

    def _constant_rate(self) -> bool:
        return self.schedule is not None and self.schedule.is_constant

    def _rate(self) -> str:
        """The schedule's rate at ``step``, its numbers read from ``sa``."""
        with self.mb.printer.naming(self.schedule.names("sa", "step")) as printer:
            return printer.doprint_expr(self.schedule.rate())

    def _scale(self) -> str:
        return "1.0 / n_rows" if self.cost.reduce == "mean" else "1.0"

    def _accumulate(self, w, prog: RowProgram, indent: int, rows: str, row_index: str, acc=None):
        """The fused pass over rows ``rows`` (a range expression), summing prog's outputs."""
        acc = acc or [f"a{k}" for k in range(len(prog.outputs))]
        for k in range(len(prog.outputs)):
            w(indent, f"{acc[k]} = 0.0")
        w(indent, f"for i in {rows}:")
        if row_index != "i":
            w(indent + 1, f"r = {row_index}")
        self._put(w, indent + 1, [prog.row_loads("r" if row_index != "i" else "i"), prog.row])
        for k, (label, e) in enumerate(prog.outputs):
            w(indent + 1, f"{acc[k]} += {self._c(e)}  # {label}")

    def _full_batch_functions(self, w, vg: RowProgram, val: RowProgram | None, hess: RowProgram | None):
        """_fg (value, gradient into g), and when needed _f (value) and _hess (Hessian into H)."""
        n = self.n
        if self.threaded:
            for line in _THREADED_PASS_SOURCE.strip("\n").split("\n"):
                w(0, line)
            w()
            w()
        w(0, "@_jit")
        w(0, "def _fg_serial(theta, cols, g):" if self.threaded else "def _fg(theta, cols, g, passes=0):")
        w(1, '"""the full-batch cost at theta; its gradient is written into g. NaN when a datum is not finite"""')
        self._put(w, 1, [vg.param_loads, vg.column_loads if self.has_data else [], vg.hoisted])
        if self.has_data:
            w(1, "n_rows = c0.shape[0]")
            # x - x is 0.0 for finite x, NaN otherwise: the data are checked in the same pass
            prog = replace(vg, outputs=vg.outputs + (("data finiteness check", vg.check),))
            if self.minibatch:
                # called at each epoch's end for tol: one chunk of all rows, in lanes (vectorised:
                # 3.5x the serial pass on W3's data; see codegen.chunk_sums)
                m = len(prog.outputs)
                w(1, "start, stop, chunk = 0, n_rows, 0  # one chunk: all rows")
                w(1, f"partial = np.zeros((1, {m}))")
                w(1, f"acc = np.zeros(({m}, LANES))")
                self._put(w, 1, chunk_sums(prog, "LANES", m))
                for k in range(m):
                    w(1, f"a{k} = partial[0, {k}]")
            else:
                self._accumulate(w, prog, 1, "range(n_rows)", "i")
            w(1, f"scale = {self._scale()}")
            for j in range(n):
                w(1, f"g[{j}] = a{j + 1} * scale")
            w(1, f"return a0 * scale + a{n + 1}")
        else:
            for j in range(n):
                w(1, f"g[{j}] = {self._c(vg.outputs[j + 1][1])}  # {vg.outputs[j + 1][0]}")
            w(1, f"return {self._c(vg.outputs[0][1])}")
        w()
        w()
        if val is not None:
            if self.threaded:
                self._threaded_wrapper(w, "_f", "theta, cols", "P_F", "theta, theta", "the full-batch cost at theta")
            w(0, "@_jit")
            w(0, "def _f_serial(theta, cols):" if self.threaded else "def _f(theta, cols, passes=0):")
            w(1, '"""the full-batch cost at theta"""')
            self._put(w, 1, [val.param_loads, val.column_loads if self.has_data else [], val.hoisted])
            if self.has_data:
                w(1, "n_rows = c0.shape[0]")
                self._accumulate(w, val, 1, "range(n_rows)", "i")
                w(1, f"return a0 * ({self._scale()})")
            else:
                w(1, f"return {self._c(val.outputs[0][1])}")
            w()
            w()
        if hess is not None:
            if self.threaded:
                self._threaded_wrapper(w, "_hess", "theta, cols, H", "P_HESS", "theta, H",
                                       "the full-batch Hessian at theta, written into H")
            w(0, "@_jit")
            w(0, "def _hess_serial(theta, cols, H):" if self.threaded else "def _hess(theta, cols, H, passes=0):")
            w(1, '"""the full-batch Hessian at theta, written into H"""')
            self._put(w, 1, [hess.param_loads, hess.column_loads if self.has_data else [], hess.hoisted])
            if self.has_data:
                w(1, "n_rows = c0.shape[0]")
                self._accumulate(w, hess, 1, "range(n_rows)", "i")
                w(1, f"scale = {self._scale()}")
                codes = [f"a{k} * scale" for k in range(len(hess.outputs))]
            else:
                codes = [self._c(e) for _, e in hess.outputs]
            for (i, j), code in zip(hess.pairs, codes):
                w(1, f"H[{i}, {j}] = {code}")
                if i != j:
                    w(1, f"H[{j}, {i}] = H[{i}, {j}]")
            w()
            w()

    @staticmethod
    def _threaded_wrapper(w, name: str, args: str, slot: str, call: str, what: str):
        """A full-batch function of a threaded module: the pass calcml made, else the serial one."""
        w(0, "@_jit")
        w(0, f"def {name}({args}, passes=0):")
        w(1, f'"""{what}: the pass calcml made (its threads), if any"""')
        w(1, f"if passes != 0 and _pass_at(passes, {slot}) != 0:")
        w(2, f"{'return ' if name == '_f' else ''}_call_pass(passes, {slot}, {call})")
        if name == "_f":
            w(1, f"return {name}_serial({args})")
        else:
            w(2, "return")
            w(1, f"{name}_serial({args})")
        w()
        w()

    def _stopping(self, w, indent: int, param, restore=()):
        """History, then one rarely taken exit for divergence and (full batch) the tolerance
        test, then the best point. (Two separate exits cost W4's loop about 40% per step.)
        ``restore``: lines that undo an update already made, run before the exit."""
        if not self.minibatch:
            w(indent, "if step == hist_next:")
            w(indent + 1, "history[hist_i] = value")
            self._record_path(w, indent + 1, "hist_i", param)
            w(indent + 1, "hist_i += 1")
            w(indent + 1, "hist_next += hist_every")
        finite = "abs(value) <= blowup and gn2 < math.inf"
        if self.minibatch:
            w(indent, f"if not ({finite}):  # non-finite or blown up: stop at once")
            w(indent + 1, "status = DIVERGED")
            w(indent + 1, "break")
            return
        w(indent, f"if not ({finite}) or gn2 <= tol2:  # diverged (stop at once), or |g| <= tol")
        w(indent + 1, f"status = CONVERGED if ({finite}) else DIVERGED")
        for line in restore:
            w(indent + 1, line)
        w(indent + 1, "break")
        w(indent, "if value < best_value:")
        w(indent + 1, "best_value = value")
        w(indent + 1, "best_step = step")
        self._copy_best(w, indent + 1, param)

    def _record_path(self, w, indent, row, param):
        """Two-parameter costs keep their iterates beside the history (for cm.plot_path)."""
        if self.n <= PATH_MAX_PARAMS:
            for j in range(self.n):
                w(indent, f"path[{row}, {j}] = {param(j)}")

    def _copy_best(self, w, indent, param):
        if self.unrolled:
            for j in range(self.n):
                w(indent, f"best[{j}] = {param(j)}")
        else:
            w(indent, "for j in range(N_PARAMS):")
            w(indent + 1, f"best[j] = {param('j')}")

    # -- run_segment ---------------------------------------------------------------------------
    def _segment_params(self) -> list:
        """run_segment's parameters: as few as the method needs (each costs the call time)."""
        names = ["work", "ints", "history", "path"]
        if self.has_data:
            names.append("cols")
        if self.minibatch:
            names += ["perm", "rng"]
        if self.state:
            names.append("state")
        return names + ["xout", "gout"]

    def _run_segment(self, w, vg: RowProgram):
        w(0, "@_jit")
        w(0, f"def run_segment({', '.join(self._segment_params())}):")
        w(1, '"""Run the descent from the state in the arrays until step ints[I_STOP] or a stopping')
        w(1, "test; every counter is written back, so the next call resumes exactly. Returns the status:")
        w(1, "RUNNING, or the final one once the run has ended (then the report is written: _end).")
        w(1, 'The first call evaluates the cost at x0 (_begin)."""')
        w(1, "# views of `work` (see O_THETA)")
        w(1, "floats = work")
        w(1, "theta = work[O_THETA:O_G]")
        w(1, "g = work[O_G:O_BEST]")
        w(1, "best = work[O_BEST:O_HP]")
        if self.hyper:
            w(1, "hp = work[O_HP:O_SA]")
        if self.schedule is not None:
            w(1, "sa = work[O_SA:O_END]")
        if not self.has_data:
            w(1, "cols = (work,)  # no data: _fg reads no column")
        w(1, "if ints[I_BEGUN] == 0 and not _begin(xout, theta, best, g, cols, ints, floats):")
        w(2, "return _end(theta, best, cols, ints, floats, xout, gout, DIVERGED)  # not finite at x0")
        if self.state:
            w(1, f"{', '.join('st_' + s for s in self.state)}, = state")
        for k, name in enumerate(self.hyper):
            w(1, f"hp_{name} = hp[{k}]  # {name}")
        if self.has_data:
            self._put(w, 1, vg.column_loads)
            w(1, "n_rows = c0.shape[0]")
        if self.threaded and self.first_order:
            w(1, "threaded = n_rows >= PARALLEL_MIN_ROWS  # large data: each step's pass by _fg, on calcml's threads")
        w(1, "step = ints[I_STEP]")
        w(1, "stop_step = ints[I_STOP]")
        w(1, "hist_i = ints[I_HIST_I]")
        w(1, "hist_next = ints[I_HIST_NEXT]")
        w(1, "hist_every = ints[I_HIST_EVERY]")
        w(1, "best_step = ints[I_BEST_STEP]")
        w(1, "fresh = ints[I_FRESH]")
        w(1, "nfev = ints[I_NFEV]")
        if self.threaded or self.opt.call:
            w(1, "passes = ints[I_PASSES]  # the passes calcml made for these columns (0: serial)")
        w(1, "best_value = floats[F_BEST]")
        w(1, "blowup = floats[F_BLOWUP]")
        w(1, "tol = floats[F_TOL]")
        w(1, "tol2 = tol * tol")
        w(1, "value = floats[F_VALUE]")
        w(1, "gnorm = floats[F_GNORM]")
        w(1, "gn2 = gnorm * gnorm")
        if self.minibatch:
            w(1, "epoch = ints[I_EPOCH]")
            w(1, "pos = ints[I_POS]")
            w(1, "batch = ints[I_BATCH]")
            w(1, "epoch_sum = floats[F_EPOCH_SUM]")
        if self.unrolled:
            w(1, "# parameters, gradient and optimizer state live in local scalars during the segment")
            for j, p in enumerate(self.cost.params):
                w(1, f"p{j} = theta[{j}]  # {_comment(p.name)}")
            for j in range(self.n):
                w(1, f"g{j} = g[{j}]")
            for s in self.state:
                for j in range(self.n):
                    w(1, f"st_{s}_{j} = st_{s}[{j}]")
        if self.first_order and self._constant_rate():
            w(1, f"lr = {self._rate()}  # schedule {self.schedule.structure()}: the same every step")
        w(1, "status = RUNNING")
        if self.delayed:
            self._delayed_body(w, vg)
        else:
            w(1, "while step < stop_step:")
            if self.first_order:
                self._first_order_body(w, vg)
            else:
                self._line_search_body(w)
            w(2, "step += 1")
        # write everything back
        if self.unrolled:
            for j in range(self.n):
                w(1, f"theta[{j}] = p{j}")
                w(1, f"g[{j}] = g{j}")
            for s in self.state:
                for j in range(self.n):
                    w(1, f"st_{s}[{j}] = st_{s}_{j}")
        w(1, "ints[I_STEP] = step")
        w(1, "ints[I_HIST_I] = hist_i")
        w(1, "ints[I_HIST_NEXT] = hist_next")
        w(1, "ints[I_BEST_STEP] = best_step")
        w(1, "ints[I_FRESH] = fresh")
        w(1, "ints[I_NFEV] = nfev")
        w(1, "floats[F_BEST] = best_value")
        w(1, "floats[F_VALUE] = value")
        w(1, "floats[F_GNORM] = math.sqrt(gn2)")
        if self.minibatch:
            w(1, "ints[I_EPOCH] = epoch")
            w(1, "ints[I_POS] = pos")
            w(1, "floats[F_EPOCH_SUM] = epoch_sum")
        w(1, "if status != RUNNING or step >= ints[I_MAX_STEPS]:  # the run is over: the report")
        w(2, "return _end(theta, best, cols, ints, floats, xout, gout, status)")
        w(1, "return status")

    def _first_order_body(self, w, vg: RowProgram):
        if not self.unrolled:
            self._put(w, 2, vg.param_loads)
        if self.minibatch:
            w(2, "if pos == 0:  # a new epoch: Fisher-Yates shuffle of the row order")
            w(3, "for i in range(n_rows - 1, 0, -1):")
            w(4, "k = _randbelow(rng, i + 1)")
            w(4, "r = perm[i]")
            w(4, "perm[i] = perm[k]")
            w(4, "perm[k] = r")
            w(2, "stop = min(pos + batch, n_rows)")
        self._gradient(w, 2, vg)
        param = (lambda j: f"p{j}") if self.unrolled else (lambda j: f"theta[{j}]")
        self._stopping(w, 2, param)
        if self.minibatch:
            w(2, "epoch_sum += a0")
        self._update(w, 2)
        if self.minibatch:
            w(2, "pos = stop")
            w(2, "if pos >= n_rows:  # end of an epoch")
            mean_scale = "1.0 / n_rows" if self.cost.reduce == "mean" else "1.0"
            w(3, f"epoch_value = epoch_sum * {mean_scale}")
            w(3, "history[epoch] = epoch_value")
            self._record_path(w, 3, "epoch", param)
            w(3, "if epoch_value < best_value:")
            w(4, "best_value = epoch_value")
            w(4, "best_step = step + 1")
            self._copy_best(w, 4, param)
            w(3, "epoch += 1")
            w(3, "pos = 0")
            w(3, "epoch_sum = 0.0")
            self._epoch_tolerance(w, 3)

    def _epoch_tolerance(self, w, ind: int):
        """Minibatch runs: ``tol`` on the full gradient at each epoch's end, by ``_fg`` (one
        vectorised pass over all rows, in order; skipped when tol is 0: on W3 the pass costs
        about 10% of the fit). A minibatch gradient is a noisy estimate that need not shrink
        at a minimum: it is not tested."""
        w(ind, "if tol2 > 0.0:  # tol: the full gradient's norm at the epoch's end (_fg: one pass)")
        if self.unrolled:
            for j in range(self.n):
                w(ind + 1, f"theta[{j}] = p{j}")
        w(ind + 1, "_fg(theta, cols, g)  # g: scratch here (the next step writes it)")
        w(ind + 1, "full2 = 0.0")
        w(ind + 1, "for j in range(N_PARAMS):")
        w(ind + 2, "full2 += g[j] * g[j]")
        w(ind + 1, "if full2 <= tol2:")
        w(ind + 2, "step += 1  # this update is done")
        w(ind + 2, "status = CONVERGED")
        w(ind + 2, "break")

    def _gradient(self, w, ind: int, vg: RowProgram, late=None):
        """value, the gradient (g{j} or g[j]) and its squared norm gn2 at the parameters.
        ``late`` (a list; no data, unrolled): the value and gn2 lines are not written but put
        there, for after the update, with the point's names p{j} read as its saved copy q{j}."""
        n = self.n
        if vg.hoisted:
            w(ind, "# parameter-only subexpressions")
            self._put(w, ind, vg.hoisted)
        gname = (lambda j: f"g{j}") if self.unrolled else (lambda j: f"g[{j}]")
        if self.has_data:
            w(ind, "# the exact gradient, summed over the " + ("minibatch" if self.minibatch else "rows"))
            if self.minibatch:
                self._accumulate(w, vg, ind, "range(pos, stop)", "perm[i]")
                mean = self.cost.reduce == "mean"
                w(ind, "scale = 1.0 / (stop - pos)" if mean else "scale = n_rows / (stop - pos)")
            elif self.threaded:
                w(ind, "if threaded:")
                if self.unrolled:
                    for j in range(n):
                        w(ind + 1, f"theta[{j}] = p{j}")
                w(ind + 1, "a0 = _fg(theta, cols, g, passes)  # the pass on calcml's threads (value, g scaled)")
                for j in range(n):
                    w(ind + 1, f"a{j + 1} = g[{j}]")
                w(ind + 1, "scale = 1.0")
                w(ind, "else:")
                self._accumulate(w, vg, ind + 1, "range(n_rows)", "i")
                w(ind + 1, f"scale = {self._scale()}")
            else:
                self._accumulate(w, vg, ind, "range(n_rows)", "i")
                w(ind, f"scale = {self._scale()}")
            w(ind, "value = a0 * scale")
            for j in range(n):
                w(ind, f"{gname(j)} = a{j + 1} * scale  # {vg.outputs[j + 1][0]}")
        elif late is not None:
            for j in range(n):
                w(ind, f"{gname(j)} = {self._c(vg.outputs[j + 1][1])}  # {vg.outputs[j + 1][0]}")
            saved = {p: f"q{j}" for j, p in enumerate(self.cost.params)}  # the point before the update
            with self.mb.printer.naming(saved):
                late.append("value = " + self.mb.printer.doprint_expr(vg.outputs[0][1]))
            late.append("gn2 = " + " + ".join(f"g{j} * g{j}" for j in range(n)))
            return
        else:
            w(ind, f"value = {self._c(vg.outputs[0][1])}")
            for j in range(n):
                w(ind, f"{gname(j)} = {self._c(vg.outputs[j + 1][1])}  # {vg.outputs[j + 1][0]}")
        if self.unrolled:
            w(ind, "gn2 = " + " + ".join(f"g{j} * g{j}" for j in range(n)))
        else:
            w(ind, "gn2 = 0.0")
            w(ind, "for j in range(N_PARAMS):")
            w(ind + 1, "gn2 += g[j] * g[j]")

    def _names(self, j=None) -> dict:
        """The code names of the rule's symbols: for parameter ``j`` (unrolled: local
        scalars), for the loop variable ``j`` (None: array slots), or only the per-update
        ones (j == "step")."""
        names = {slot(RATE): "lr", slot(STEP): "step"}
        names.update({slot(h): f"hp_{h}" for h in self.hyper})
        names.update({slot(v): f"o_{v}" for v in self.opt.locals})
        if j is None:
            names.update({slot(PARAM): "theta[j]", slot(GRAD): "g[j]"})
            names.update({slot(s): f"st_{s}[j]" for s in self.state})
        elif j != "step":
            names.update({slot(PARAM): f"p{j}", slot(GRAD): f"g{j}"})
            names.update({slot(s): f"st_{s}_{j}" for s in self.state})
        return names

    def _update(self, w, ind: int):
        """The optimizer's update of the parameters (and its state) by the gradient: its
        rule printed for each parameter, its symbols named by :meth:`_names`."""
        opt, printer = self.opt, self.mb.printer
        if not self._constant_rate():
            w(ind, f"lr = {self._rate()}  # schedule {self.schedule.structure()}")
        for line in printer.assignments(opt.per_step, self._names("step")):
            w(ind, line)
        w(ind, f"# {opt.name} update ({_comment(opt.reference)})")
        if self.unrolled:
            for j in range(self.n):
                for line in printer.assignments(opt.update, self._names(j)):
                    w(ind, line)
        else:
            w(ind, "for j in range(N_PARAMS):")
            for line in printer.assignments(opt.update, self._names()):
                w(ind + 1, line)

    def _delayed_body(self, w, vg: RowProgram):
        """The loop of cheap steps: each step's gradient and update run first, in one block
        with no branch between them, and its bookkeeping (history, stopping tests, best
        point) opens the next pass, on the point saved before the update; a stop undoes the
        update. The same steps, tests and results as the plain loop, and faster per step on
        W4's Rosenbrock loop: measured, not derived (benchmarks/RESULTS.md, W4); the order suits
        the machine code's layout and scheduling.

        Within a step, the cost and the gradient's norm (which only the bookkeeping reads) are
        computed after the update, from the saved point: the core issues instructions oldest
        first, and the same arithmetic written before the update held back the update's chain
        of dependent operations, which sets the time per step (the same bits either way)."""
        saved = [(f"p{j}", f"q{j}") for j in range(self.n)]
        saved += [(f"st_{s}_{j}", f"q_{s}_{j}") for s in self.state for j in range(self.n)]

        def step(ind):
            for live, keep in saved:
                w(ind, f"{keep} = {live}")
            late = []
            self._gradient(w, ind, vg, late=late)
            self._update(w, ind)
            w(ind, "# the cost at q and the gradient's norm, after the update that does not need them")
            for line in late:
                w(ind, line)

        w(1, "if step < stop_step:")
        w(2, "# the first step: its gradient and update here, its bookkeeping at the loop's top")
        step(2)
        w(2, "while True:")
        w(3, "# bookkeeping of step `step`, at its point q (already updated: a stop undoes it)")
        self._stopping(w, 3, lambda j: f"q{j}", restore=[f"{live} = {keep}" for live, keep in saved])
        w(3, "step += 1")
        w(3, "if step >= stop_step:")
        w(4, "break")
        step(3)

    def _line_search_body(self, w):
        w(2, "if fresh == 0:")
        w(3, "value = _fg(theta, cols, g, passes)")
        w(3, "nfev += 1")
        w(2, "fresh = 0")
        w(2, "gn2 = 0.0")
        w(2, "for j in range(N_PARAMS):")
        w(3, "gn2 += g[j] * g[j]")
        self._stopping(w, 2, lambda j: f"theta[{j}]")
        w(2, f"# {self.opt.name} step ({_comment(self.opt.reference)})")
        helper, args = self.opt.call
        names = {**{a: a for a in CALL_ARGS}, **{h: f"hp_{h}" for h in self.hyper}, **{s: f"st_{s}" for s in self.state}}
        w(2, f"ok, fnew, nf = {helper}({', '.join(names[a] for a in args)})")
        w(2, "nfev += nf")
        w(2, "if not ok:")
        w(3, "status = LINE_SEARCH_FAILED")
        w(3, "break")
        w(2, "value = fnew")
        if self.opt.kind in _KEEPS_GRADIENT:
            w(2, "fresh = 1  # the step left the gradient at the new point in g")

    # -- the module ----------------------------------------------------------------------------
    def source(self, header_lines=()) -> str:
        vg = self.mb.program("value_and_grad")
        val = self.mb.program("value") if self.opt.kind == "newton" else None
        hess = self.mb.program("hessian") if self.opt.kind == "newton" else None
        body = _Writer()
        body(0, "# -- machine-level pieces: the C entry point and (threaded modules) calcml's passes --------")
        if self.threaded:
            body(0, "import ctypes  # noqa: E402")
        body(0, "from llvmlite import ir  # noqa: E402")
        body(0, "from numba import carray, types  # noqa: E402")
        body(0, "from numba.extending import intrinsic  # noqa: E402")
        body()
        body()
        self._full_batch_functions(body, vg, val, hess)
        for line in _BEGIN_END_SOURCE.strip("\n").split("\n"):
            body(0, line)
        body()
        body()
        if self.opt.helpers:
            for line in self.opt.helpers.strip("\n").split("\n"):
                body(0, line)
            body()
            body()
        self._run_segment(body, vg)
        body()
        body()
        self._entry_point(body)
        body(0, "_segment = run_segment  # what the driver calls (calcml: run_segment_c's machine code, if any)")
        body()
        body()
        title = f"the {self.opt.name} descent loop of one cost"
        head = ir.render(self.mb.header(header_lines, title=title)) + "\n"
        return head + self._constants() + body.text() + self._python_driver()

    def _entry_point_args(self) -> list:
        """run_segment's C entry point: per argument of run_segment (SEGMENT_ARGS), the C
        parameters (name, Numba type) and the array or tuple made of them. An array comes
        as the address of its NumPy object (``id``; its data pointer is read at byte ``off``
        of it, see _NativeSegment), its sizes beside it: no ``.ctypes`` per call."""
        obj = "types.int64"
        out = []
        for name in self._segment_params():
            if name in ("work", "ints", "xout", "gout", "perm", "rng"):
                dtype = {"ints": "np.int64", "perm": "np.int64", "rng": "np.uint64"}.get(name, "np.float64")
                size = {"work": "O_END", "ints": "N_INTS", "perm": "n_rows", "rng": "1"}.get(name, "N_PARAMS")
                out.append(([(f"{name}_o", obj)], f"carray(_data(off, {name}_o), ({size},), {dtype})"))
            elif name == "history":
                out.append(([("history_o", obj), ("n_hist", "types.int64")],
                            "carray(_data(off, history_o), (n_hist,), np.float64)"))
            elif name == "path":
                out.append(([("path_o", obj), ("path_rows", "types.int64"), ("path_cols", "types.int64")],
                            "carray(_data(off, path_o), (path_rows, path_cols), np.float64)"))
            elif name == "cols":  # a table of the columns' data addresses (made once a run)
                cols = "".join(f"carray(cols_p[{k}], (n_rows,)), " for k in range(len(self.cost.data)))
                out.append(([("cols_p", "_F64PP"), ("n_rows", "types.int64")], f"({cols.rstrip(' ')})"))
            elif name == "state":
                params, arrays = [], []
                for k, (_, shape, _) in enumerate(self.opt.state):
                    params.append((f"st{k}_o", obj))
                    arrays.append(f"carray(_data(off, st{k}_o), ({', '.join(self.opt.dims(shape, 'N_PARAMS'))},), np.float64), ")
                out.append((params, f"({''.join(arrays).rstrip(' ')})"))
            else:  # pragma: no cover - a new argument of run_segment must be added here
                raise AssertionError(f"run_segment's argument {name!r} has no C form")
        return out

    def _entry_point(self, w):
        """run_segment_c: run_segment over raw addresses, which calcml compiles with
        numba.cfunc and keeps as machine code beside this file (calcml.native): a later
        process runs the loop without loading Numba's cache of it (its typing and target
        contexts: about 0.3-0.6 s). ``_segment``, what the driver calls, is run_segment here;
        calcml sets it to the machine code's caller."""
        args = self._entry_point_args()
        params = [("off", "types.int64")] + [p for ps, _ in args for p in ps]
        for line in _ENTRY_SOURCE.strip("\n").split("\n"):
            w(0, line)
        w(0, f"SIG_SEGMENT = types.int64({', '.join(t for _, t in params)})")
        w(0, f"CFUNC_FLAGS = {KERNEL_FLAGS!r}")
        w()
        w()
        w(0, f"def run_segment_c({', '.join(n for n, _ in params)}):")
        w(1, '"""run_segment on the arrays at these addresses (SEGMENT_ARGS order; sizes beside them)"""')
        w(1, "return run_segment(")
        for _, made in args:
            w(2, f"{made},")
        w(1, ")")
        w()
        w()
        if self.has_data:  # the rows' own gradients (their spread: a spent budget's test), by _fg
            cols = "".join(f"carray(cols_p[{k}], (n_rows,)), " for k in range(len(self.cost.data)))
            w(0, "SIG_FG = types.float64(types.int64, types.int64, _F64PP, types.int64, types.int64)")
            w()
            w()
            w(0, "def fg_c(off, theta_o, cols_p, n_rows, g_o):")
            w(1, '"""_fg (the serial pass) on the arrays at these addresses: the cost, the gradient into g"""')
            w(1, "return _fg(carray(_data(off, theta_o), (N_PARAMS,), np.float64),")
            w(1, f"           ({cols.rstrip(' ')}),")
            w(1, "           carray(_data(off, g_o), (N_PARAMS,), np.float64))")
            w()
            w()

    def _constants(self) -> str:
        w = _Writer()
        w(0, "# -- the descent loop ------------------------------------------------------------------")
        w(0, "import time  # noqa: E402 - the driver below times its segments")
        w()
        for line in _STATUS_LINES:
            w(0, line)
        for k, name in enumerate(_INTS):
            w(0, f"I_{name} = {k}")
        w(0, f"N_INTS = {len(_INTS)}")
        for k, name in enumerate(_FLOATS):
            w(0, f"F_{name} = {k}")
        w(0, f"N_FLOATS = {len(_FLOATS)}")
        w(0, "# run_segment's float64 array `work`: the slots F_* above, then the parameters, their")
        w(0, "# gradient, the best point seen, the hyperparameters and the schedule's numbers")
        w(0, "O_THETA = N_FLOATS")
        w(0, "O_G = O_THETA + N_PARAMS")
        w(0, "O_BEST = O_G + N_PARAMS")
        w(0, "O_HP = O_BEST + N_PARAMS")
        w(0, f"O_SA = O_HP + {len(self.hyper)}")
        n_sched = len(self.schedule.values()) if self.schedule is not None else 0
        w(0, f"O_END = O_SA + {n_sched}")
        w(0, f"SEGMENT_ARGS = {tuple(self._segment_params())!r}  # run_segment's parameters")
        w(0, f"FIRST_ORDER = {self.first_order}")
        w(0, f"MINIBATCH = {self.minibatch}")
        w(0, f"PARAM_NAMES = ({''.join(ascii(p.name) + ', ' for p in self.cost.params)})")
        w(0, f"COLUMN_NAMES = ({''.join(ascii(d.name) + ', ' for d in self.cost.data)})")
        w(0, f"HYPER_NAMES = ({''.join(repr(h) + ', ' for h in self.hyper)})")
        # The numbers are run-time arguments (one compiled loop serves them all); an exported
        # module gets its program's numbers written here as the defaults of run().
        w(0, "HYPER_DEFAULTS = None")
        sched = self.schedule
        w(0, f"SCHEDULE = {sched.structure()!r}" if sched is not None else "SCHEDULE = None")
        w(0, "SCHEDULE_DEFAULTS = None")
        w(0, "BATCH_SIZE = None")
        w(0, f"DEFAULT_EPOCHS = {DEFAULT_EPOCHS}")
        w(0, f"DEFAULT_MAXITER = {self.opt.default_maxiter}")
        w(0, f"BLOWUP = {BLOWUP!r}")
        w(0, f"HISTORY_MAX = {HISTORY_MAX}")
        w(0, f"SEGMENT_SECONDS = {SEGMENT_SECONDS}")
        if self.threaded:
            w(0, f"PARALLEL_MIN_ROWS = {PARALLEL_MIN_ROWS}  # calcml's threads from this many rows on")
        w(0, f"THREADED = {self.threaded}  # full-batch passes over large data may run on calcml's threads")
        w()
        w()
        w(0, "def new_optimizer_state(n):")
        w(1, f'"""the {self.opt.name} state arrays, initialized"""')
        shapes = []
        for name, shape, init in self.opt.state:
            dims = self.opt.dims(shape, "n")
            shapes.append(f"np.full(({', '.join(dims)},), {float(init)!r}),  # {name}")
        if shapes:
            w(1, "return (")
            for line in shapes:
                w(2, line)
            w(1, ")")
        else:
            w(1, "return ()")
        w()
        if self.minibatch:
            for line in _RNG_SOURCE.strip("\n").split("\n"):
                w(0, line)
        w()
        w()
        return w.text()

    def _python_driver(self) -> str:
        """columns_of, plan, new_state, drive, run. new_state and drive are written for this
        module (only the branches it takes: a short run spends more time in this Python than
        in its steps, and each line counts)."""
        w = _Writer()
        alloc = self._state_lines()
        call = f"_segment({', '.join(self._segment_params())})"
        w(0, "def new_state(x0, cols, hyper, schedule_args, batch_size, max_steps, max_epochs, tol, seed):")
        w(1, '"""run_segment\'s arguments, in SEGMENT_ARGS order. Its first call evaluates the cost at x0')
        w(1, '(_begin: x0 waits in xout), the call that ends the run writes the report (_end)."""')
        for line in alloc:
            w(1, line)
        w(1, f"return [{', '.join(self._segment_params())}]")
        w()
        w()
        if self.threaded:
            self._threaded_drive(w)
        name = "_drive" if self.threaded else "drive"
        w(0, f"def {name}(x0, data, hyper, schedule_args, batch_size, epochs, maxiter, tol, seed, callback=None,")
        w(0, f"{' ' * len(name)}     segment_seconds=SEGMENT_SECONDS, first_segment=None{', passes=None' if self.threaded else ''}):")
        w(1, '"""The run, its report as a tuple: x, fun, grad, grad_norm, nit, nfev, status, history,')
        w(1, "history_every, path, epochs, best_step, best_value, diverged_at, blowup (run()'s dict, in")
        w(1, 'its order, without status_name). The arguments are run()\'s, hyper and schedule_args given."""')
        if self.has_data:
            w(1, "cols = columns_of(data)")
            w(1, "n_rows = cols[0].shape[0]")
        else:
            w(1, "cols = _NO_COLUMNS")
        if self.minibatch:
            w(1, "max_steps, max_epochs, per_epoch = plan(n_rows, batch_size, epochs, maxiter)")
        else:
            w(1, "max_steps = maxiter if maxiter is not None else epochs if epochs is not None else DEFAULT_MAXITER")
            w(1, "max_epochs = 0")
        for line in alloc:
            w(1, line)
        if self.threaded:
            w(1, "if passes is not None:")
            w(2, "ints[I_PASSES] = passes.address")
        if self.minibatch:
            w(1, "segment = first_segment or max(1, 1_000_000 // batch_size)")
        elif self.has_data:
            w(1, "segment = first_segment or max(1, 1_000_000 // max(1, n_rows))")
        else:
            w(1, "segment = first_segment or 1_000_000")
        w(1, "try:")
        w(2, "if callback is None and max_steps <= segment:  # one segment holds the run: one call")
        w(3, "ints[I_STOP] = max_steps")
        w(3, f"status = {call}")
        if self.threaded:
            w(3, "if passes is not None:")
            w(4, "passes.check()")
        w(2, "else:  # segments until run_segment ends the run (its status is then no longer RUNNING)")
        w(3, "step = 0")
        w(3, "while True:")
        w(4, "ints[I_STOP] = min(step + segment, max_steps)")
        w(4, "t0 = time.perf_counter()")
        w(4, f"status = {call}")
        if self.threaded:
            w(4, "if passes is not None:")
            w(5, "passes.check()")
        w(4, "if callback is not None and max_steps > 0 and math.isfinite(work[F_F0]):")
        w(5, "callback(int(ints[I_STEP]), max_steps, float(work[F_VALUE]))")
        w(4, "if status != RUNNING:")
        w(5, "break")
        w(4, "dt = time.perf_counter() - t0")
        w(4, "done = int(ints[I_STEP]) - step")
        w(4, "step += done")
        w(4, "if first_segment is None and done > 0 and dt > 0:")
        w(5, "segment = max(1, min(int(done * segment_seconds / dt), 100 * segment))")
        w(1, "except KeyboardInterrupt:")
        w(2, "status = INTERRUPTED")
        w(1, "i = ints.tolist()")
        w(1, "if status == INTERRUPTED:  # the report is written here, at the best point")
        w(2, "theta, g, best = work[O_THETA:O_G], work[O_G:O_BEST], work[O_BEST:O_HP]")
        w(2, "if not i[I_BEGUN]:")
        w(3, "_begin(xout, theta, best, g, cols, ints, work)")
        w(2, "_end(theta, best, cols, ints, work, xout, gout, status)")
        w(2, "i = ints.tolist()")
        if self.has_data:
            w(1, "elif status == DIVERGED and not i[I_STEP] and not math.isfinite(work[F_F0]):")
            w(2, "if not all(np.isfinite(c).all() for c in cols):")
            w(3, 'raise NonFiniteData("the data hold a non-finite value (NaN or inf)")')
        w(1, f"f = {'work' if self._work_size() <= 64 else 'work[:N_FLOATS]'}.tolist()")
        w(1, f"n_hist = i[{'I_EPOCH' if self.minibatch else 'I_HIST_I'}]")
        w(1, "full = n_hist == i[I_HIST_LEN]  # the arrays are the report's as they are")
        path = "path if full else path[:n_hist].copy()" if self.n <= PATH_MAX_PARAMS else "None"
        w(1, "return (xout, f[F_FUN], gout, f[F_FUN_GNORM], i[I_STEP], i[I_NFEV], i[I_STATUS],")
        w(1, "        history if full else history[:n_hist].copy(), i[I_HIST_EVERY],")
        w(1, f"        {path},")
        w(1, "        i[I_EPOCH], i[I_BEST_STEP], f[F_BEST], i[I_DIVERGED_AT], f[F_BLOWUP])")
        return _DRIVER_HEAD + "\n\n" + w.text() + _DRIVER_TAIL

    def _threaded_drive(self, w):
        """drive for a module whose passes may run on calcml's threads: _drive with the passes
        calcml made for the run's columns in the table the loop reads (_Passes)."""
        w(0, "def drive(x0, data, hyper, schedule_args, batch_size, epochs, maxiter, tol, seed, callback=None,")
        w(0, "          segment_seconds=SEGMENT_SECONDS, first_segment=None, passes=None):")
        w(1, '"""The run, its report as a tuple: x, fun, grad, grad_norm, nit, nfev, status, history,')
        w(1, "history_every, path, epochs, best_step, best_value, diverged_at, blowup (run()'s dict, in")
        w(1, "its order, without status_name). The arguments are run()'s, hyper and schedule_args given;")
        w(1, "passes(cols), if given, makes the full-batch passes on calcml's threads (see _Passes): the")
        w(1, 'passes over PARALLEL_MIN_ROWS rows or more use them."""')
        w(1, "args = (x0, data, hyper, schedule_args, batch_size, epochs, maxiter, tol, seed, callback, segment_seconds,")
        w(1, "        first_segment)")
        w(1, "if passes is None:")
        w(2, "return _drive(*args)")
        w(1, "cols = columns_of(data)")
        w(1, "if cols[0].shape[0] < PARALLEL_MIN_ROWS:")
        w(2, "return _drive(*args)")
        w(1, "return _drive(x0, cols, *args[2:], passes=_Passes(passes(cols)))")
        w()
        w()

    def _work_size(self) -> int:
        n_sched = len(self.schedule.values()) if self.schedule is not None else 0
        return len(_FLOATS) + 3 * self.n + len(self.hyper) + n_sched

    def _state_lines(self) -> list:
        """The lines that make run_segment's arguments (new_state's body, also inlined in drive)."""
        lines = [
            "if type(x0) is np.ndarray and x0.dtype is _F64 and x0.shape == (N_PARAMS,):",
            "    xout = x0.copy()  # the report's x, in the end",
            "else:",
            "    xout = np.array(x0, dtype=np.float64).reshape(N_PARAMS)",
            "work = np.zeros(O_END)",
            "work[F_TOL] = tol",
        ]
        for k, name in enumerate(self.hyper):
            lines.append(f"work[O_HP + {k}] = hyper[{name!r}]")
        n_sched = len(self.schedule.values()) if self.schedule is not None else 0
        for k in range(n_sched):
            lines.append(f"work[O_SA + {k}] = schedule_args[{k}]")
        if self.minibatch:
            lines += ["n_hist = max(1, max_epochs)", "hist_every = 1"]
        else:
            lines += ["hist_every = -(-(max_steps + 1) // HISTORY_MAX)", "n_hist = max_steps // hist_every + 1"]
        lines += [
            "ints = np.zeros(N_INTS, dtype=np.int64)",
            "ints[I_HIST_EVERY] = hist_every",
            "ints[I_HIST_LEN] = n_hist",
            "ints[I_MAX_STEPS] = max_steps",
        ]
        if self.minibatch:
            lines += [
                "ints[I_BATCH] = batch_size",
                "ints[I_MAX_EPOCHS] = max_epochs",
                "perm = np.arange(cols[0].shape[0], dtype=np.int64)",
                "rng = np.array([seed], dtype=np.uint64)",
            ]
        lines.append("history = np.empty(n_hist)  # not filled: the report reads only the entries the loop wrote")
        if self.n <= PATH_MAX_PARAMS:
            lines.append("path = np.empty((n_hist, N_PARAMS))  # the iterates beside the history entries")
        else:
            lines.append("path = _NO_PATH")
        if self.state:
            lines.append("state = new_optimizer_state(N_PARAMS)")
        lines.append("gout = np.empty(N_PARAMS)")
        return lines


def generate_source(cost: Cost, opt: Optimizer, schedule: Schedule | None, minibatch: bool, header_lines=()) -> str:
    """The full text of the optimizer module."""
    return _Generator(cost, opt, schedule, minibatch).source(header_lines)


def _variant(opt: Optimizer, schedule: Schedule | None, minibatch: bool) -> str:
    s = schedule.structure() if schedule is not None else "none"
    batching = "minibatch" if minibatch else "fullbatch"
    return f"optimizer|{opt.structure()}|schedule={s}|{batching}|unroll<={UNROLL_MAX}|delay<={DELAY_MAX}"


_lock = threading.RLock()
# (cost key, variant, what the cache folder depends on) -> (module, source, path): in one
# process these determine the cache key (the generator's fingerprint is fixed) and the folder
_modules: dict = {}


def _cache_token():
    """What calcml.compile.cache_dir() depends on: cheaper to read than to call it (a mkdir)."""
    env = os.environ
    return env.get("CALCML_CACHE_DIR") or (env.get("XDG_CACHE_HOME"), env.get("HOME"))


def load_module(cost: Cost, opt: Optimizer, schedule: Schedule | None, minibatch: bool):
    """(module, source, path) for the optimizer module, from the kernel cache when possible."""
    variant = _variant(opt, schedule, minibatch)
    memo = (cost.key, variant, _cache_token())
    found = _modules.get(memo)
    if found is not None:
        return found
    from .compile import _kernel_key, load_or_build

    with _lock:
        found = _modules.get(memo)
        if found is None:
            key = _kernel_key(cost, variant)
            found = load_or_build(key, lambda: generate_source(cost, opt, schedule, minibatch))
            module, _, path = found
            if hasattr(module, "run_segment_c") and not isinstance(module._segment, _NativeSegment):
                module._segment = _NativeSegment(module, path)
            _modules[memo] = found
        return found


# The C entry point's imports and helper (see _Generator._entry_point).
_ENTRY_SOURCE = '''
# -- C entry point (numba.cfunc): addresses in, run_segment on arrays of them -----------------
_F64PP = types.CPointer(types.CPointer(types.float64))


@intrinsic
def _data(typingctx, off, obj):
    """The data pointer of the NumPy array whose object is at address obj: the pointer stored
    at byte off of the object (its first field after Python's object header)."""
    def codegen(context, builder, signature, args):
        slot = builder.inttoptr(builder.add(args[1], args[0]), ir.IntType(8).as_pointer().as_pointer())
        return builder.load(slot)
    return types.voidptr(off, obj), codegen

'''


def _data_offset() -> int | None:
    """Where a NumPy array's object holds its data pointer (bytes from its start), found and
    checked on two arrays; None if not found (then ctypes-free calls are not made)."""
    import ctypes

    probes = [np.zeros(3), np.arange(5, dtype=np.int64)[1:]]
    for off in range(8, 129, 8):
        if all(ctypes.c_void_p.from_address(id(p) + off).value == p.ctypes.data for p in probes):
            return off
    return None


class _NativeSegment:
    """What a module's driver calls for run_segment: its C entry point's machine code
    (``run_segment_c``), loaded from beside the module on the first call, else compiled with
    ``numba.cfunc`` and kept there (:func:`calcml.native.load_or_compile`), called through
    ctypes with the arrays' addresses. A warm process so runs a fit without loading Numba's
    cache of the loop (its typing and target contexts: about 0.7 s). Should the machine code
    be out of reach (a Numba release that moved what calcml.native reads), the module's own
    dispatcher runs, after a warning."""

    def __init__(self, module, path):
        self.module, self.path = module, Path(path)
        self.names = module.SEGMENT_ARGS
        self.fn = None
        self.keep = None

    def _load(self):
        import ctypes

        from numba import config, types

        from . import native

        mod = self.module
        if config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: the loop runs as the Python it is
            mod._segment = mod.run_segment
            return mod.run_segment
        try:
            address, self.keep, _ = native.load_or_compile(
                self.path, "run_segment_c", lambda: (mod.run_segment_c, mod.SIG_SEGMENT, mod.CFUNC_FLAGS))
        except Exception as exc:  # noqa: BLE001 - the dispatcher still runs the loop
            import warnings

            warnings.warn(f"calcml could not compile the loop's machine code ({type(exc).__name__}: {exc}); "
                          f"Numba's dispatcher runs it", RuntimeWarning, stacklevel=3)
            mod._segment = mod.run_segment
            return mod.run_segment
        ctypes_of = [ctypes.c_void_p if isinstance(t, types.CPointer) else ctypes.c_int64 for t in mod.SIG_SEGMENT.args]
        self.fn = ctypes.CFUNCTYPE(ctypes.c_int64, *ctypes_of)(address)
        return self

    def __call__(self, *args):
        if self.fn is None and (_OFFSET is None or self._load() is not self):
            return self.module.run_segment(*args)
        c_args = [_OFFSET]
        table = None
        for name, a in zip(self.names, args):
            if name == "history":
                c_args += [id(a), a.shape[0]]
            elif name == "path":
                c_args += [id(a), a.shape[0], a.shape[1]]
            elif name == "cols":  # the columns' addresses, in a table that lives through the call
                table = np.array([c.ctypes.data for c in a], dtype=np.uint64)
                c_args += [table.ctypes.data, a[0].shape[0]]
            elif name == "state":
                c_args += [id(st) for st in a]
            else:  # the arrays the driver made (contiguous, of the loop's types)
                c_args.append(id(a))
        status = self.fn(*c_args)
        del table
        return status


def native_fg(module, path):
    """(theta, cols, g) -> the module's serial full-batch pass over ``cols`` (the cost, its
    gradient into g) as machine code (its C entry ``fg_c``, loaded from beside the module or
    compiled and kept there): what a warm process calls for the rows' own gradients without
    loading Numba's cache of the module (about 0.4 s). The module's ``_fg`` where that is out of
    reach (NUMBA_DISABLE_JIT, a compile error)."""
    found = getattr(module, "_fg_native", None)
    if found is not None:
        return found
    found = module._fg
    from numba import config

    if _OFFSET is not None and hasattr(module, "fg_c") and not config.DISABLE_JIT:
        import ctypes

        from . import native

        try:
            address, keep, _ = native.load_or_compile(Path(path), "fg_c", lambda: (module.fg_c, module.SIG_FG,
                                                                                module.CFUNC_FLAGS))
        except Exception:  # noqa: BLE001 - the dispatcher still makes the pass
            address = None
        if address is not None:
            fn = ctypes.CFUNCTYPE(ctypes.c_double, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                  ctypes.c_int64)(address)

            def found(theta, cols, g, keep=keep):
                table = np.array([c.ctypes.data for c in cols], dtype=np.uint64)
                return fn(_OFFSET, id(theta), table.ctypes.data, cols[0].shape[0], id(g))

    module._fg_native = found
    return found


_OFFSET = _data_offset()
