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
from .codegen import KERNEL_FLAGS, NUMBA_FLAGS, ModuleBuilder, RowProgram, _comment, chunk_sums, njit_flags
from .compile import PARALLEL_MIN_ROWS as _PARALLEL_MIN_ROWS
from .cost import Cost
from .optim import CALL_ARGS, GRAD, PARAM, RATE, STEP, Optimizer, slot
from .errors import CodegenError
from .printing import NotExact, NumbaPrinter, array_printer
from .schedules import Schedule

__all__ = ["generate_source", "load_module"]

# Threshold of a blown-up cost, relative to max(1, |J(x0)|).
BLOWUP = 1e10
# Full-batch history keeps at most this many entries (every k-th iteration beyond): a fresh
# array per run, and touching a large one costs page faults (W4: 100,000 steps, +50%).
HISTORY_MAX = _result.HISTORY_MAX
# Costs with at most this many parameters record the iterates beside the history entries.
PATH_MAX_PARAMS = _result.PATH_MAX_PARAMS
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
_NJIT_FLAGS = njit_flags(NUMBA_FLAGS)

# Slots of the two small arrays that carry the run's counters between segments (`ints`, and
# the head of `work`).
_INTS = ["STEP", "STOP", "EPOCH", "POS", "BATCH", "HIST_I", "HIST_NEXT", "HIST_EVERY", "BEST_STEP", "FRESH", "NFEV",
         "MAX_STEPS", "MAX_EPOCHS", "HIST_LEN", "BEGUN", "ENDED", "STATUS", "DIVERGED_AT", "PASSES", "EVALUATE"]
_FLOATS = ["BEST", "BLOWUP", "TOL", "VALUE", "GNORM", "EPOCH_SUM", "F0", "FUN", "FUN_GNORM"]

# The first act of a run, in compiled code (its last, _end, is _Generator._end_def): run_segment
# calls them (one call of compiled code does a whole short run; a tensor module's prints _end's
# statements and its own full passes instead, calcml.tensor.loops), the driver only after a
# Ctrl-C. (decorator: _jit, or _jit_inline where the callers' compile should take them in, see
# calcml.tensor.loops)
_BEGIN_END_TEMPLATE = '''
@{decorator}
def _begin(x0, f0, theta, best, g, ints, floats):
    """The parameters and the best point so far := x0, whose cost f0 and gradient g the caller
    evaluated (_fg: only callers of _fg compile it into their code); the divergence threshold.
    Returns whether x0 and the cost at x0 are finite."""
    finite = True
    for j in range(N_PARAMS):
        theta[j] = x0[j]
        best[j] = x0[j]
        finite = finite and math.isfinite(x0[j])
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


if numba.config.DISABLE_JIT or _PYTHON_TIER:  # NUMBA_DISABLE_JIT=1 or the Python tier: the same calls, from Python
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

def fisher_yates(perm: str, rng: str, n: str, prefix: str = "") -> ir.For:
    """The loop that shuffles ``perm`` (n entries) in place, Fisher-Yates from its end, drawing
    from SplitMix64 (``_randbelow``, state ``rng``): every calcml minibatch loop's row order.
    ``prefix``: of its variables' names."""
    i, k, r = f"{prefix}i", f"{prefix}k", f"{prefix}r"
    return ir.For(i, ir.range_(f"{n} - 1", 0, -1), [
        ir.Assign(k, f"_randbelow({rng}, {i} + 1)"),
        ir.Assign(r, f"{perm}[{i}]"),
        ir.Assign(f"{perm}[{i}]", f"{perm}[{k}]"),
        ir.Assign(f"{perm}[{k}]", r),
    ])


_DRIVER_SHARED = '''

class NonFiniteData(ValueError):
    """The data hold NaN or inf (found in the first pass over them, at x0)."""


# Arrays that runs read and never write, shared: the columns of a cost without data, the
# iterates of costs that record none.
_NO_COLUMNS = (np.zeros(1),)
_NO_PATH = np.zeros((1, 1))
_F64 = np.dtype(np.float64)
'''

_COLUMNS_OF = '''

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
'''

_PLAN = '''

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
_DRIVER_HEAD = _DRIVER_SHARED + _COLUMNS_OF + _PLAN

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
        super().__init__(names, memo=True)
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
    """Builds one optimizer module as :mod:`calcml.ir` statements. Code that spans lines (a long
    call or tuple) is written as at column 0: ir indents it to its statement."""

    def __init__(self, cost: Cost, opt: Optimizer, schedule: Schedule | None, minibatch: bool):
        self.cost, self.opt, self.schedule, self.minibatch = cost, opt, schedule, minibatch
        self.first_order = opt.kind == "first_order"
        self.mb = ModuleBuilder(cost, with_hessian=opt.kind == "newton")
        self.mb.printer = _latency_printer(self.mb)
        self.printer = self.mb.printer
        # the gradient's source: the cost's RowProgram inlined row by row (a subclass may call
        # kernels instead: calcml.tensor.loops)
        self.inline_rows = True
        self.n = len(cost.params)
        self.has_data = bool(cost.data)
        self.unrolled = self.first_order and self.n <= UNROLL_MAX
        # cheap steps (no data, few parameters): the step's bookkeeping after its update
        self.delayed = self.unrolled and not minibatch and not self.has_data and self.n <= DELAY_MAX
        # full-batch loops over data make their passes over large data on calcml's threads
        self.threaded = not minibatch and self.has_data
        # loops over many parameters get the Python tier's NumPy forms (a few short loops run
        # faster as the Python they are)
        self.array_forms = not self.unrolled and self.n > UNROLL_MAX
        self.hyper = list(opt.hyper)
        self.state = [s[0] for s in opt.state]
        self.param_names = [p.name for p in cost.params]
        self.column_names = [d.name for d in cost.data]
        self.parallel_min_rows = PARALLEL_MIN_ROWS

    # -- shared pieces -----------------------------------------------------------------------
    def _constant_rate(self) -> bool:
        return self.schedule is not None and self.schedule.is_constant

    def _n_sched(self) -> int:
        return len(self.schedule.values()) if self.schedule is not None else 0

    def _rate(self) -> str:
        """The schedule's rate at ``step``, its numbers read from ``sa``."""
        return self.schedule.code(self.printer)

    def _scale(self) -> str:
        return "1.0 / n_rows" if self.cost.reduce == "mean" else "1.0"

    # -- the Python tier's NumPy forms of the loops over the parameters (array_forms) ----------
    # In the tier (_PYTHON_TIER, a branch Numba's compile prunes) a loop over thousands of
    # parameters costs microseconds a parameter as Python; over whole arrays with NumPy, the
    # same operations in the same order per element, a few nanoseconds, and the same bits.
    def _norm2(self, name: str) -> list:
        """``name`` := the squared norm of the gradient array ``g``."""
        loop = [ir.Assign(name, "0.0"), ir.For("j", ir.range_("N_PARAMS"), [ir.AugAssign(name, "+", "g[j] * g[j]")])]
        if not self.array_forms:
            return loop
        return [ir.If("_PYTHON_TIER", [ir.Assign(name, "float(np.cumsum(g * g)[-1]) if N_PARAMS else 0.0")], loop,
                      comment="the Python tier: cumsum adds left to right, as the loop does")]

    @staticmethod
    def _accumulate(prog: RowProgram, rows: str, row_index: str) -> list:
        """The fused pass over rows ``rows`` (a range expression), summing prog's outputs
        into ``a{k}``."""
        row = "r" if row_index != "i" else "i"
        return [
            [ir.Assign(f"a{k}", "0.0") for k in range(len(prog.outputs))],
            ir.For("i", rows, [
                ir.Assign("r", row_index) if row_index != "i" else None,
                prog.row_loads(row),
                prog.row,
                [ir.AugAssign(f"a{k}", "+", e, label) for k, (label, e) in enumerate(prog.outputs)],
            ]),
        ]

    def _full_batch_functions(self, vg: RowProgram, val: RowProgram | None, hess: RowProgram | None) -> list:
        """_fg (value, gradient into g), and when needed _f (value) and _hess (Hessian into H)."""
        n, threaded = self.n, self.threaded

        def loads(prog):
            return [prog.param_loads, prog.column_loads if self.has_data else (), prog.hoisted]

        def fn(name, params, prog, body, doc):
            return ir.Def(name + "_serial" if threaded else name, params if threaded else params + ("passes=0",),
                          [loads(prog), body], doc=doc, decorators=("_jit",))

        if self.has_data:
            # x - x is 0.0 for finite x, NaN otherwise: the data are checked in the same pass
            prog = replace(vg, outputs=vg.outputs + (("data finiteness check", vg.check),))
            if self.minibatch:
                # called at each epoch's end for tol: one chunk of all rows, in lanes (vectorised:
                # 3.5x the serial pass on W3's data; see codegen.chunk_sums)
                m = len(prog.outputs)
                sums = [
                    ir.Assign("start, stop, chunk", "0, n_rows, 0", "one chunk: all rows"),
                    ir.Assign("partial", f"np.zeros((1, {m}))"),
                    ir.Assign("acc", f"np.zeros(({m}, LANES))"),
                    chunk_sums(prog, "LANES", m),
                    [ir.Assign(f"a{k}", f"partial[0, {k}]") for k in range(m)],
                ]
            else:
                sums = self._accumulate(prog, "range(n_rows)", "i")
            fg = [ir.Assign("n_rows", "c0.shape[0]"), sums, ir.Assign("scale", self._scale()),
                  [ir.Assign(f"g[{j}]", f"a{j + 1} * scale") for j in range(n)],
                  ir.Return(f"a0 * scale + a{n + 1}")]
        else:
            fg = [[ir.Assign(f"g[{j}]", e, label) for j, (label, e) in enumerate(vg.outputs[1:])],
                  ir.Return(vg.outputs[0][1])]
        out = [
            [ir.Raw(_THREADED_PASS_SOURCE.strip("\n")), ir.Blank(2)] if threaded else None,
            fn("_fg", ("theta", "cols", "g"), vg, fg,
               "the full-batch cost at theta; its gradient is written into g. NaN when a datum is not finite"),
            ir.Blank(2),
        ]
        if val is not None:
            if self.has_data:
                body = [ir.Assign("n_rows", "c0.shape[0]"), self._accumulate(val, "range(n_rows)", "i"),
                        ir.Return(f"a0 * ({self._scale()})")]
            else:
                body = [ir.Return(val.outputs[0][1])]
            out += [
                self._threaded_wrapper("_f", "theta, cols", "P_F", "theta, theta", "the full-batch cost at theta")
                if threaded else None,
                fn("_f", ("theta", "cols"), val, body, "the full-batch cost at theta"),
                ir.Blank(2),
            ]
        if hess is not None:
            if self.has_data:
                body = [ir.Assign("n_rows", "c0.shape[0]"), self._accumulate(hess, "range(n_rows)", "i"),
                        ir.Assign("scale", self._scale())]
                codes = [f"a{k} * scale" for k in range(len(hess.outputs))]
            else:
                body, codes = [], [e for _, e in hess.outputs]
            body += [[ir.Assign(f"H[{i}, {j}]", c), ir.Assign(f"H[{j}, {i}]", f"H[{i}, {j}]") if i != j else None]
                     for (i, j), c in zip(hess.pairs, codes)]
            what = "the full-batch Hessian at theta, written into H"
            out += [
                self._threaded_wrapper("_hess", "theta, cols, H", "P_HESS", "theta, H", what) if threaded else None,
                fn("_hess", ("theta", "cols", "H"), hess, body, what),
                ir.Blank(2),
            ]
        return out

    @staticmethod
    def _threaded_wrapper(name: str, args: str, slot: str, call: str, what: str) -> list:
        """A full-batch function of a threaded module: the pass calcml made, else the serial one."""
        made, serial = f"_call_pass(passes, {slot}, {call})", f"{name}_serial({args})"
        if name == "_f":
            hit, miss = [ir.Return(made)], ir.Return(serial)
        else:
            hit, miss = [ir.Stmt(made), ir.Return()], ir.Stmt(serial)
        return [
            ir.Def(name, (args, "passes=0"), [ir.If(f"passes != 0 and _pass_at(passes, {slot}) != 0", hit), miss],
                   doc=f"{what}: the pass calcml made (its threads), if any", decorators=("_jit",)),
            ir.Blank(2),
        ]

    def _stopping(self, param, restore=()) -> list:
        """History, then one rarely taken exit for divergence and (full batch) the tolerance
        test, then the best point. (Two separate exits cost W4's loop about 40% per step.)
        ``restore``: statements that undo an update already made, run before the exit."""
        finite = self._finite_test()
        if self.minibatch:
            return [ir.If(f"not ({finite})", [ir.Assign("status", "DIVERGED"), ir.Break()],
                          comment="non-finite or blown up: stop at once")]
        return [
            ir.If("step == hist_next", [
                ir.Assign("history[hist_i]", "value"),
                self._record_path("hist_i", param),
                ir.AugAssign("hist_i", "+", 1),
                ir.AugAssign("hist_next", "+", "hist_every"),
            ]),
            ir.If(f"not ({finite}) or gn2 <= tol2",
                  [ir.Assign("status", f"CONVERGED if ({finite}) else DIVERGED"), restore, ir.Break()],
                  comment="diverged (stop at once), or |g| <= tol"),
            ir.If("value < best_value",
                  [ir.Assign("best_value", "value"), ir.Assign("best_step", "step"), self._copy_best(param)]),
        ]

    def _record_path(self, row, param) -> list:
        """Two-parameter costs keep their iterates beside the history (for cm.plot_path)."""
        if self.n > PATH_MAX_PARAMS:
            return []
        return [ir.Assign(f"path[{row}, {j}]", param(j)) for j in range(self.n)]

    def _copy_best(self, param) -> list:
        if self.unrolled:
            return [ir.Assign(f"best[{j}]", param(j)) for j in range(self.n)]
        loop = [ir.For("j", ir.range_("N_PARAMS"), [ir.Assign("best[j]", param("j"))])]
        return [ir.If("_PYTHON_TIER", [ir.Assign("best[:]", param(":"))], loop)] if self.array_forms else loop

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

    @staticmethod
    def _segment_scratch() -> list:
        """Arrays that run_segment's steps reuse, made once a segment (none here)."""
        return []

    @staticmethod
    def _pass_scratch() -> list:
        """Arrays that run_segment's full passes reuse, made once a segment, before its first
        (none here: _fg's are its own)."""
        return []

    @staticmethod
    def _segment_data_loads(vg: RowProgram) -> list:
        """run_segment's names for its data: the columns c0, c1, ... and n_rows."""
        return [vg.column_loads, ir.Assign("n_rows", "c0.shape[0]")]

    @staticmethod
    def _rows_of(cols: str) -> str:
        """The code of the row count of the data ``cols`` (the driver's tuple)."""
        return f"{cols}[0].shape[0]"

    def _run_segment(self, vg: RowProgram) -> ir.Def:
        n, unrolled = self.n, self.unrolled

        begin = [
            ir.Comment("views of `work` (see O_THETA)"),
            ir.Assign("floats", "work"),
            ir.Assign("theta", "work[O_THETA:O_G]"),
            ir.Assign("g", "work[O_G:O_BEST]"),
            ir.Assign("best", "work[O_BEST:O_HP]"),
            ir.Assign("hp", "work[O_HP:O_SA]") if self.hyper else None,
            ir.Assign("sa", "work[O_SA:O_END]") if self.schedule is not None else None,
            ir.Assign("cols", "(work,)", "no data: _fg reads no column") if not self.has_data else None,
            ir.Assign("passes", "ints[I_PASSES]", "the passes calcml made for these columns (0: serial)")
            if self.threaded or self.opt.call or not self.inline_rows else None,
            self._pass_scratch(),
            ir.Assign("status", "RUNNING"),
            self._first_call(),
            ir.Assign(f"{', '.join('st_' + s for s in self.state)},", "state") if self.state else None,
            [ir.Assign(f"hp_{name}", f"hp[{k}]", name) for k, name in enumerate(self.hyper)],
            self._segment_data_loads(vg) if self.has_data else None,
            ir.Assign("threaded", "n_rows >= PARALLEL_MIN_ROWS",
                      "large data: each step's pass by _fg, on calcml's threads")
            if self.threaded and self.first_order and self.inline_rows else None,
            [ir.Assign(local, slot_) for local, slot_ in (
                ("step", "ints[I_STEP]"), ("stop_step", "ints[I_STOP] if status == RUNNING else step"),
                ("hist_i", "ints[I_HIST_I]"), ("hist_next", "ints[I_HIST_NEXT]"), ("hist_every", "ints[I_HIST_EVERY]"),
                ("best_step", "ints[I_BEST_STEP]"), ("fresh", "ints[I_FRESH]"), ("nfev", "ints[I_NFEV]"))],
            ir.Assign("best_value", "floats[F_BEST]"),
            ir.Assign("blowup", "floats[F_BLOWUP]"),
            ir.Assign("tol", "floats[F_TOL]"),
            ir.Assign("tol2", "tol * tol"),
            ir.Assign("value", "floats[F_VALUE]"),
            ir.Assign("gnorm", "floats[F_GNORM]"),
            ir.Assign("gn2", "gnorm * gnorm"),
            [ir.Assign("epoch", "ints[I_EPOCH]"), ir.Assign("pos", "ints[I_POS]"), ir.Assign("batch", "ints[I_BATCH]"),
             ir.Assign("epoch_sum", "floats[F_EPOCH_SUM]")] if self.minibatch else None,
            [ir.Comment("parameters, gradient and optimizer state live in local scalars during the segment"),
             [ir.Assign(f"p{j}", f"theta[{j}]", _comment(p.name)) for j, p in enumerate(self.cost.params)],
             [ir.Assign(f"g{j}", f"g[{j}]") for j in range(n)],
             [ir.Assign(f"st_{s}_{j}", f"st_{s}[{j}]") for s in self.state for j in range(n)]] if unrolled else None,
            ir.Assign("lr", self._rate(), f"schedule {self.schedule.structure()}: the same every step")
            if self.first_order and self._constant_rate() else None,
            self._segment_scratch(),
        ]
        if self.delayed:
            loop = self._delayed_body(vg)
        else:
            step = self._first_order_body(vg) if self.first_order else self._line_search_body()
            loop = [ir.While("step < stop_step", [step, ir.AugAssign("step", "+", 1)])]
        # write everything back
        finish = [
            [[[ir.Assign(f"theta[{j}]", f"p{j}"), ir.Assign(f"g[{j}]", f"g{j}")] for j in range(n)],
             [ir.Assign(f"st_{s}[{j}]", f"st_{s}_{j}") for s in self.state for j in range(n)]] if unrolled else None,
            [ir.Assign(slot_, local) for slot_, local in (
                ("ints[I_STEP]", "step"), ("ints[I_HIST_I]", "hist_i"), ("ints[I_HIST_NEXT]", "hist_next"),
                ("ints[I_BEST_STEP]", "best_step"), ("ints[I_FRESH]", "fresh"), ("ints[I_NFEV]", "nfev"),
                ("floats[F_BEST]", "best_value"), ("floats[F_VALUE]", "value"), ("floats[F_GNORM]", "math.sqrt(gn2)"))],
            [ir.Assign("ints[I_EPOCH]", "epoch"), ir.Assign("ints[I_POS]", "pos"),
             ir.Assign("floats[F_EPOCH_SUM]", "epoch_sum")] if self.minibatch else None,
            ir.If("status != RUNNING or step >= ints[I_MAX_STEPS]", [
                self._report(),
                None if self.minibatch else ir.If(
                    "status != DIVERGED and (hist_i == 0 or hist_next - hist_every != step)", [
                        ir.Assign("history[hist_i]", "floats[F_FUN]"),
                        [ir.Assign(f"path[hist_i, {j}]", f"xout[{j}]") for j in range(n)]
                        if n <= PATH_MAX_PARAMS else None,
                        ir.Assign("ints[I_HIST_I]", "hist_i + 1"),
                    ], comment="the last iterate, off the history's stride (or maxiter=0's x0): its cost, the "
                               "report's, ends the history"),
            ], comment="the run is over: the report"),
            ir.Return("status"),
        ]
        self._segment_def = ir.Def(
            "run_segment", tuple(self._segment_params()), [begin, loop, finish], decorators=("_jit",), doc=(
            "Run the descent from the state in the arrays until step ints[I_STOP] or a stopping\n"
            "test; every counter is written back, so the next call resumes exactly. Returns the status:\n"
            "RUNNING, or the final one once the run has ended (then the report is written: _end).\n"
            "The first call evaluates the cost at x0 (_begin)."))
        return self._segment_def  # printed again as run_segment_c's body (see _entry_point)

    def _first_order_body(self, vg: RowProgram) -> list:
        param = (lambda j: f"p{j}") if self.unrolled else (lambda j: f"theta[{j}]")
        body = [None if self.unrolled else vg.param_loads]
        if self.minibatch:
            body += [
                ir.If("pos == 0", [fisher_yates("perm", "rng", "n_rows")],
                      comment="a new epoch: Fisher-Yates shuffle of the row order"),
                ir.Assign("stop", "min(pos + batch, n_rows)"),
            ]
        body += [
            self._gradient(vg),
            self._stopping(param),
            ir.AugAssign("epoch_sum", "+", "a0") if self.minibatch else None,
            self._update(),
        ]
        if self.minibatch:
            body += [
                ir.Assign("pos", "stop"),
                ir.If("pos >= n_rows", [
                    ir.Assign("epoch_value", self._epoch_value()),
                    ir.Assign("history[epoch]", "epoch_value"),
                    self._record_path("epoch", param),
                    ir.If("epoch_value < best_value", [
                        ir.Assign("best_value", "epoch_value"),
                        ir.Assign("best_step", "step + 1"),
                        self._copy_best(param),
                    ]),
                    ir.AugAssign("epoch", "+", 1),
                    ir.Assign("pos", 0),
                    ir.Assign("epoch_sum", "0.0"),
                    self._epoch_tolerance(),
                ], comment="end of an epoch"),
            ]
        return body

    # what _begin and _end are compiled with: functions of their own
    _begin_end_decorator = "_jit"

    @staticmethod
    def _first_call() -> list:
        """The run's first call evaluates the cost at x0 (_begin); not finite there, the run takes
        no step (stop_step) and ends in the report, at run_segment's one call of _end."""
        return [ir.If("ints[I_BEGUN] == 0 and not _begin(xout, _fg(xout, cols, g, ints[I_PASSES]), theta, best, g, "
                      "ints, floats)", [ir.Assign("status", "DIVERGED")])]

    @staticmethod
    def _report() -> list:
        """The run's report (the run is over): status := _end's."""
        return [ir.Assign("status", "_end(theta, best, cols, ints, floats, xout, gout, status)")]

    def _end_statements(self, full_pass) -> list:
        """The report's statements (``step`` and ``status`` given; ``full_pass(x, g, out)``: the
        statements of a full pass): the final point (the best one after a divergence or a Ctrl-C)
        in xout, its gradient in gout, its cost and gradient norm in floats; a last update that
        went off is reported as a divergence, at the best point (the pass's second turn)."""
        sum_sq = [ir.Assign("gn2", "0.0"),
                  ir.For("j", ir.range_("N_PARAMS"), [ir.AugAssign("gn2", "+", "gout[j] * gout[j]")])]
        return [
            ir.If("status == RUNNING", [
                ir.Assign("status", "EPOCHS_DONE if (MINIBATCH and ints[I_EPOCH] >= ints[I_MAX_EPOCHS]) else MAXITER")]),
            ir.Assign("diverged_at", "step if status == DIVERGED else -1"),
            ir.Assign("at_best", "status == DIVERGED or status == INTERRUPTED"),
            ir.For("j", ir.range_("N_PARAMS"), [ir.Assign("xout[j]", "best[j] if at_best else theta[j]")]),
            ir.For("attempt", ir.range_(2), [
                full_pass("xout", "gout", "fun"),
                sum_sq,
                ir.If("attempt == 1 or status == DIVERGED or (abs(fun) <= floats[F_BLOWUP] and gn2 < math.inf)",
                      [ir.Break()]),
                ir.Assign("status", "DIVERGED"),
                ir.Assign("diverged_at", "step"),
                ir.For("j", ir.range_("N_PARAMS"), [ir.Assign("xout[j]", "best[j]")]),
            ], comment="the final point; where it went off, the best point"),
            ir.Assign("floats[F_FUN]", "fun"),
            ir.Assign("floats[F_FUN_GNORM]", "math.sqrt(gn2)"),
            ir.Assign("ints[I_ENDED]", 1),
            ir.Assign("ints[I_STATUS]", "status"),
            ir.Assign("ints[I_DIVERGED_AT]", "diverged_at"),
        ]

    def _end_def(self) -> ir.Def:
        """_end: the report (_end_statements), its passes _fg's; run_segment calls it (a tensor
        module's prints its statements instead), the driver after a Ctrl-C."""
        return ir.Def("_end", ("theta", "best", "cols", "ints", "floats", "xout", "gout", "status"), [
            ir.Assign("step", "ints[I_STEP]"),
            self._end_statements(_Generator._full_pass),
            ir.Return("status"),
        ], decorators=(self._begin_end_decorator,), doc=(
            "The report: the final point (the best one after a divergence or a Ctrl-C) in xout, its\n"
            "gradient in gout, its cost and gradient norm in floats; a last update that went off is\n"
            "reported as a divergence, at the best point. Returns the final status."))

    @staticmethod
    def _full_pass(x: str, g: str, out: str | None, comment: str | None = None) -> list:
        """``out`` := the full cost at ``x``, its gradient written into ``g``: _fg's pass (at large
        data on calcml's threads when calcml made them)."""
        call = f"_fg({x}, cols, {g}, ints[I_PASSES])"
        return [ir.Stmt(call, comment) if out is None else ir.Assign(out, call, comment)]

    def _finite_test(self) -> str:
        """The code of the step's test that the run has not diverged."""
        return "abs(value) <= blowup and gn2 < math.inf"

    def _epoch_value(self) -> str:
        """The code of an epoch's mean minibatch cost, from ``epoch_sum`` (each minibatch's a0)."""
        return f"epoch_sum * {self._scale()}"

    def _partial_epoch_value(self) -> str:
        """The driver's code of the mean minibatch cost of a run's last, unfinished epoch (its
        first i[I_POS] rows), from the report's floats ``f``."""
        return f"f[F_EPOCH_SUM] {'/ i[I_POS]' if self.cost.reduce == 'mean' else '* n_rows / i[I_POS]'}"

    def _epoch_tolerance(self) -> ir.If:
        """Minibatch runs: ``tol`` on the full gradient at each epoch's end, by ``_fg`` (one
        vectorised pass over all rows, in order; skipped when tol is 0: on W3 the pass costs
        about 10% of the fit). A minibatch gradient is a noisy estimate that need not shrink
        at a minimum: it is not tested."""
        return ir.If("tol2 > 0.0", [
            [ir.Assign(f"theta[{j}]", f"p{j}") for j in range(self.n)] if self.unrolled else None,
            # ints[I_PASSES] (0 here), not an omitted or literal argument: the signature of
            # _begin's and _end's calls, so _fg is compiled once
            self._full_pass("theta", "g", None, "g: scratch here (the next step writes it)"),
            self._norm2("full2"),
            ir.If("full2 <= tol2", [
                ir.AugAssign("step", "+", 1, "this update is done"),
                ir.Assign("status", "CONVERGED"),
                ir.Break(),
            ]),
        ], comment="tol: the full gradient's norm at the epoch's end (one full pass)")

    def _gradient(self, vg: RowProgram, late=None) -> list:
        """value, the gradient (g{j} or g[j]) and its squared norm gn2 at the parameters.
        ``late`` (a list; no data, unrolled): the value and gn2 statements are not returned but
        put there, for after the update, with the point's names p{j} read as its saved copy q{j}."""
        n = self.n
        gname = (lambda j: f"g{j}") if self.unrolled else (lambda j: f"g[{j}]")
        out = [[ir.Comment("parameter-only subexpressions"), vg.hoisted] if vg.hoisted else None]
        if self.has_data:
            out.append(ir.Comment("the exact gradient, summed over the " + ("minibatch" if self.minibatch else "rows")))
            if self.minibatch:
                mean = self.cost.reduce == "mean"
                out += [self._accumulate(vg, "range(pos, stop)", "perm[i]"),
                        ir.Assign("scale", "1.0 / (stop - pos)" if mean else "n_rows / (stop - pos)")]
            else:
                rows = [self._accumulate(vg, "range(n_rows)", "i"), ir.Assign("scale", self._scale())]
                out.append(ir.If("threaded", [
                    [ir.Assign(f"theta[{j}]", f"p{j}") for j in range(n)] if self.unrolled else None,
                    ir.Assign("a0", "_fg(theta, cols, g, passes)", "the pass on calcml's threads (value, g scaled)"),
                    [ir.Assign(f"a{j + 1}", f"g[{j}]") for j in range(n)],
                    ir.Assign("scale", "1.0"),
                ], rows) if self.threaded else rows)
            out += [ir.Assign("value", "a0 * scale"),
                    [ir.Assign(gname(j), f"a{j + 1} * scale", vg.outputs[j + 1][0]) for j in range(n)]]
        else:
            grad = [ir.Assign(gname(j), e, label) for j, (label, e) in enumerate(vg.outputs[1:])]
            if late is not None:
                saved = {p: f"q{j}" for j, p in enumerate(self.cost.params)}  # the point before the update
                with self.printer.naming(saved) as printer:
                    late.append(ir.Assign("value", printer.doprint_expr(vg.outputs[0][1])))
                late.append(ir.Assign("gn2", " + ".join(f"g{j} * g{j}" for j in range(n))))
                return out + grad
            out += [ir.Assign("value", vg.outputs[0][1]), grad]
        if self.unrolled:
            return out + [ir.Assign("gn2", " + ".join(f"g{j} * g{j}" for j in range(n)))]
        return out + self._norm2("gn2")

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

    def _update(self) -> list:
        """The optimizer's update of the parameters (and its state) by the gradient: its
        rule printed for each parameter, its symbols named by :meth:`_names`."""
        opt = self.opt
        out = [
            None if self._constant_rate() else ir.Assign("lr", self._rate(), f"schedule {self.schedule.structure()}"),
            self.printer.assignments(opt.per_step, self._names("step")),
            ir.Comment(f"{opt.name} update ({_comment(opt.reference)})"),
        ]
        if self.unrolled:
            return out + [self.printer.assignments(opt.update, self._names(j)) for j in range(self.n)]
        return out + self._update_elements()

    def _update_elements(self) -> list:
        """The rule's per-parameter statements, in a loop over the parameters (and, with
        array_forms, over the whole arrays in the tier where the rule's operations allow it:
        printing.array_printer, the same order of operations; a state of more than one value a
        parameter keeps the loop)."""
        loop = [ir.For("j", ir.range_("N_PARAMS"), self.printer.assignments(self.opt.update, self._names()))]
        if not self.array_forms or any(tuple(shape) != ("n",) for _, shape, _ in self.opt.state):
            return loop
        names = self._names()
        names.update({slot(PARAM): "theta[:]", slot(GRAD): "g[:]", **{slot(s): f"st_{s}[:]" for s in self.state}})
        try:
            arrays = array_printer(self.printer).assignments(self.opt.update, names)
        except (NotExact, CodegenError):
            return loop
        return [ir.If("_PYTHON_TIER", arrays, loop,
                      comment="the Python tier: the rule over the arrays (NumPy: the same operations, the same bits)")]

    def _delayed_body(self, vg: RowProgram) -> list:
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

        def step():
            late = []
            return [
                [ir.Assign(keep, live) for live, keep in saved],
                self._gradient(vg, late=late),
                self._update(),
                ir.Comment("the cost at q and the gradient's norm, after the update that does not need them"),
                late,
            ]

        return [ir.If("step < stop_step", [
            ir.Comment("the first step: its gradient and update here, its bookkeeping at the loop's top"),
            step(),
            ir.While("True", [
                ir.Comment("bookkeeping of step `step`, at its point q (already updated: a stop undoes it)"),
                self._stopping(lambda j: f"q{j}", restore=[ir.Assign(live, keep) for live, keep in saved]),
                ir.AugAssign("step", "+", 1),
                ir.If("step >= stop_step", [ir.Break()]),
                step(),
            ]),
        ])]

    def _line_search_body(self) -> list:
        helper, args = self.opt.call
        names = {**{a: a for a in CALL_ARGS}, **{h: f"hp_{h}" for h in self.hyper}, **{s: f"st_{s}" for s in self.state}}
        return [
            ir.If("fresh == 0", [ir.Assign("value", "_fg(theta, cols, g, passes)"), ir.AugAssign("nfev", "+", 1)]),
            ir.Assign("fresh", 0),
            self._norm2("gn2"),
            self._stopping(lambda j: f"theta[{j}]"),
            ir.Comment(f"{self.opt.name} step ({_comment(self.opt.reference)})"),
            ir.Assign("ok, fnew, nf", f"{helper}({', '.join(names[a] for a in args)})"),
            ir.AugAssign("nfev", "+", "nf"),
            ir.If("not ok", [ir.Assign("status", "LINE_SEARCH_FAILED"), ir.Break()]),
            ir.Assign("value", "fnew"),
            ir.Assign("fresh", 1, "the step left the gradient at the new point in g")
            if self.opt.kind in _KEEPS_GRADIENT else None,
        ]

    # -- the module ----------------------------------------------------------------------------
    def source(self, header_lines=()) -> str:
        vg = self.mb.program("value_and_grad")
        val = self.mb.program("value") if self.opt.kind == "newton" else None
        hess = self.mb.program("hessian") if self.opt.kind == "newton" else None
        text = ir.render(self._module_body(vg, val, hess), self.printer)  # printed first: the header lists the helpers it used
        head = self.mb.header(header_lines, title=f"the {self.opt.name} descent loop of one cost")
        return ir.render([head, self._constants()]) + "\n" + text + "\n" + self._python_driver()

    def _module_body(self, vg, val, hess) -> list:
        """The module's functions after its constants: the passes, _begin and _end, the method's
        helpers, run_segment, its C entry."""
        return [
            ir.Comment("-- machine-level pieces: the C entry point and (threaded modules) calcml's passes --------"),
            ir.Raw("import ctypes  # noqa: E402") if self.threaded else None,
            ir.Raw(_MACHINE_IMPORTS),
            ir.Blank(),
            ir.Comment("run_segment's statements are printed twice: as run_segment (a dispatcher, compiled where the\n"
                       "module runs on its own) and as the body of its C entry run_segment_c, which calcml compiles:\n"
                       "one compile of the loop (Numba's inline=\"always\" of run_segment into it copied its IR, 0.5 s)"),
            ir.Assign("_jit_inline", f"numba.njit(inline='always', {_NJIT_FLAGS}) if not _PYTHON_TIER else _jit"),
            ir.Blank(2),
            self._full_batch_functions(vg, val, hess),
            ir.Raw(_BEGIN_END_TEMPLATE.format(decorator=self._begin_end_decorator).strip("\n")),
            ir.Blank(2),
            self._end_def(),
            ir.Blank(2),
            [ir.Raw(self.opt.helpers.strip("\n")), ir.Blank(2)] if self.opt.helpers else None,
            self._run_segment(vg),
            ir.Blank(2),
            self._entry_point(),
            ir.Assign("_segment", "run_segment",
                      "what the driver calls (calcml: run_segment_c's machine code, if any)"),
            ir.Blank(2),
        ]

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
                out.append((self._cols_params(), self._column_arrays()))
            elif name == "state":
                params, arrays = [], []
                for k, (_, shape, _) in enumerate(self.opt.state):
                    params.append((f"st{k}_o", obj))
                    arrays.append(f"carray(_data(off, st{k}_o), ({', '.join(self.opt.dims(shape, 'N_PARAMS'))},), np.float64), ")
                out.append((params, f"({''.join(arrays).rstrip(' ')})"))
            else:  # pragma: no cover - a new argument of run_segment must be added here
                raise AssertionError(f"run_segment's argument {name!r} has no C form")
        return out

    def _cols_params(self) -> list:
        """The C parameters (name, Numba type) that carry run_segment's ``cols``."""
        return [("cols_p", "_F64PP"), ("n_rows", "types.int64")]

    def _column_arrays(self) -> str:
        """The tuple of the columns as arrays over the table ``cols_p`` of their addresses."""
        cols = "".join(f"carray(cols_p[{k}], (n_rows,)), " for k in range(len(self.cost.data)))
        return f"({cols.rstrip(' ')})"

    def _entry_point(self) -> list:
        """run_segment_c: run_segment over raw addresses, which calcml compiles with
        numba.cfunc and keeps as machine code beside this file (calcml.native): a later
        process runs the loop without loading Numba's cache of it (its typing and target
        contexts: about 0.3-0.6 s). ``_segment``, what the driver calls, is run_segment here;
        calcml sets it to the machine code's caller."""
        args = self._entry_point_args()
        params = [("off", "types.int64")] + [p for ps, _ in args for p in ps]
        cols_names = [name for name, _ in self._cols_params()]
        cols_types = ", ".join(t for _, t in self._cols_params())
        out = [
            ir.Raw(_ENTRY_SOURCE.strip("\n")),
            ir.Assign("SIG_SEGMENT", f"types.int64({', '.join(t for _, t in params)})"),
            ir.Assign("CFUNC_FLAGS", repr(KERNEL_FLAGS)),
            ir.Blank(2),
            ir.Def("run_segment_c", tuple(name for name, _ in params),
                   ir.inlined(self._segment_def, [made for _, made in args]),
                   doc="run_segment on the arrays at these addresses (SEGMENT_ARGS order; sizes beside them):\n"
                       "its statements again, so that its code is compiled once, here"),
            ir.Blank(2),
        ]
        if self.has_data:  # the rows' own gradients (their spread: a spent budget's test), by _fg
            out += [
                ir.Assign("SIG_FG", f"types.float64(types.int64, types.int64, {cols_types}, types.int64)"),
                ir.Blank(2),
                ir.Def("fg_c", ("off", "theta_o", *cols_names, "g_o"), [ir.Return(
                    "_fg(carray(_data(off, theta_o), (N_PARAMS,), np.float64),\n"
                    f"           {self._column_arrays()},\n"
                    "           carray(_data(off, g_o), (N_PARAMS,), np.float64),\n"
                    "           np.int64(0))")],  # the serial pass; int64 as in the loop's calls: one compile of _fg
                    doc="_fg (the serial pass) on the arrays at these addresses: the cost, the gradient into g"),
                ir.Blank(2),
            ]
        if self.has_data and self.opt.kind == "newton":  # the Python tier's passes (see _PYTHON_TIER)
            theta = "carray(_data(off, theta_o), (N_PARAMS,), np.float64)"
            out += [
                ir.Assign("SIG_PASSES", f"types.float64(types.int64, types.int64, types.int64, {cols_types}, "
                                        "types.int64)"),
                ir.Def("passes_c", ("kind", "off", "theta_o", *cols_names, "out_o"), [
                    ir.Assign("theta", theta),
                    ir.Assign("cols", self._column_arrays()),
                    ir.If("kind == 0", [ir.Return(
                        "_fg_serial(theta, cols, carray(_data(off, out_o), (N_PARAMS,), np.float64))")]),
                    ir.If("kind == 1", [ir.Return("_f_serial(theta, cols)")]),
                    ir.Stmt("_hess_serial(theta, cols, carray(_data(off, out_o), (N_PARAMS, N_PARAMS), np.float64))"),
                    ir.Return("0.0")],
                    doc="the serial passes on the arrays at these addresses, one compile for the three: kind 0\n"
                        "the cost and its gradient into out (_fg_serial), 1 the cost (_f_serial), 2 the Hessian\n"
                        "into out (_hess_serial)"),
                ir.Blank(2),
            ]
        return out

    def _constants(self) -> list:
        opt, sched = self.opt, self.schedule
        states = "".join(f"    {made},  # {name}\n" for name, made in opt.state_arrays("n"))
        return [
            ir.Comment("-- the descent loop ------------------------------------------------------------------"),
            ir.Raw("import time  # noqa: E402 - the driver below times its segments"),
            ir.Blank(),
            _result.status_statements(with_names=True),
            [ir.Assign(f"I_{name}", k) for k, name in enumerate(_INTS)],
            ir.Assign("N_INTS", len(_INTS)),
            [ir.Assign(f"F_{name}", k) for k, name in enumerate(_FLOATS)],
            ir.Assign("N_FLOATS", len(_FLOATS)),
            ir.Comment("run_segment's float64 array `work`: the slots F_* above, then the parameters, their\n"
                       "gradient, the best point seen, the hyperparameters and the schedule's numbers"),
            ir.Assign("O_THETA", "N_FLOATS"),
            ir.Assign("O_G", "O_THETA + N_PARAMS"),
            ir.Assign("O_BEST", "O_G + N_PARAMS"),
            ir.Assign("O_HP", "O_BEST + N_PARAMS"),
            ir.Assign("O_SA", f"O_HP + {len(self.hyper)}"),
            ir.Assign("O_END", f"O_SA + {self._n_sched()}"),
            ir.Assign("SEGMENT_ARGS", repr(tuple(self._segment_params())), "run_segment's parameters"),
            ir.Assign("FIRST_ORDER", self.first_order),
            ir.Assign("PYTHON_TIER", True,
                      "the loop's source run as Python (a line search's passes over rows machine code) gives its "
                      "machine code's bits (the same IEEE operations; powers by libm's pow in both, see "
                      "calcml.printing): calcml runs it so, where its run is short, until compiling it pays "
                      "(calcml.loop._NativeSegment)"),
            ir.Assign("MINIBATCH", self.minibatch),
            ir.Assign("PARAM_NAMES", f"({''.join(ascii(name) + ', ' for name in self.param_names)})"),
            ir.Assign("COLUMN_NAMES", f"({''.join(ascii(name) + ', ' for name in self.column_names)})"),
            ir.Assign("HYPER_NAMES", f"({''.join(repr(h) + ', ' for h in self.hyper)})"),
            # The numbers are run-time arguments (one compiled loop serves them all); an exported
            # module gets its program's numbers written here as the defaults of run().
            ir.Assign("HYPER_DEFAULTS", "None"),
            ir.Assign("SCHEDULE", repr(sched.structure()) if sched is not None else "None"),
            ir.Assign("SCHEDULE_DEFAULTS", "None"),
            ir.Assign("BATCH_SIZE", "None"),
            ir.Assign("DEFAULT_EPOCHS", DEFAULT_EPOCHS),
            ir.Assign("DEFAULT_MAXITER", opt.default_maxiter),
            ir.Assign("BLOWUP", BLOWUP),
            ir.Assign("HISTORY_MAX", HISTORY_MAX),
            ir.Assign("SEGMENT_SECONDS", SEGMENT_SECONDS),
            ir.Assign("PARALLEL_MIN_ROWS", self.parallel_min_rows, "calcml's threads from this many rows on")
            if self.threaded else None,
            ir.Assign("THREADED", self.threaded, "full-batch passes over large data may run on calcml's threads"),
            ir.Blank(2),
            ir.Def("new_optimizer_state", ("n",), [ir.Return(f"(\n{states})" if states else "()")],
                   doc=f"the {opt.name} state arrays, initialized"),
            ir.Blank(),
            ir.Raw(_RNG_SOURCE.strip("\n")) if self.minibatch else None,
            ir.Blank(2),
        ]

    def _python_driver(self) -> str:
        """columns_of, plan, new_state, drive, run. new_state and drive are written for this
        module (only the branches it takes: a short run spends more time in this Python than
        in its steps, and each line counts)."""
        alloc = self._state()
        call = f"_segment({', '.join(self._segment_params())})"
        check = ir.If("passes is not None", [ir.Stmt("passes.check()")]) if self.threaded else None
        if self.minibatch:
            segment = "first_segment or max(1, 1_000_000 // batch_size)"
        elif self.has_data:
            segment = "first_segment or max(1, 1_000_000 // max(1, n_rows))"
        else:
            segment = "first_segment or 1_000_000"
        path = "path if full else path[:n_hist].copy()" if self.n <= PATH_MAX_PARAMS else "None"
        drive = [
            [ir.Assign("cols", "columns_of(data)"), ir.Assign("n_rows", self._rows_of("cols"))]
            if self.has_data else ir.Assign("cols", "_NO_COLUMNS"),
            ir.Assign("max_steps, max_epochs, per_epoch", "plan(n_rows, batch_size, epochs, maxiter)")
            if self.minibatch else
            [ir.Assign("max_steps",
                       "maxiter if maxiter is not None else epochs if epochs is not None else DEFAULT_MAXITER"),
             ir.Assign("max_epochs", 0)],
            alloc,
            ir.If("passes is not None", [ir.Assign("ints[I_PASSES]", "passes.address")]) if self.threaded else None,
            ir.Assign("segment", segment),
            ir.Try([
                ir.If("callback is None and max_steps <= segment",
                      [ir.Assign("ints[I_STOP]", "max_steps"), ir.Assign("status", call), check],
                      [ir.Assign("step", 0), ir.While("True", [
                          ir.Assign("ints[I_STOP]", "min(step + segment, max_steps)"),
                          ir.Assign("t0", "time.perf_counter()"),
                          ir.Assign("status", call),
                          check,
                          ir.If("callback is not None and max_steps > 0 and math.isfinite(work[F_F0])",
                                [ir.Stmt("callback(int(ints[I_STEP]), max_steps, float(work[F_VALUE]))")]),
                          ir.If("status != RUNNING", [ir.Break()]),
                          ir.Assign("dt", "time.perf_counter() - t0"),
                          ir.Assign("done", "int(ints[I_STEP]) - step"),
                          ir.AugAssign("step", "+", "done"),
                          ir.If("first_segment is None and done > 0 and dt > 0",
                                [ir.Assign("segment", "max(1, min(int(done * segment_seconds / dt), 100 * segment))")]),
                      ])],
                      comment="one segment holds the run: one call",
                      else_comment="segments until run_segment ends the run (its status is then no longer RUNNING)"),
            ], handlers=(("KeyboardInterrupt", [ir.Assign("status", "INTERRUPTED")]),)),
            ir.Assign("i", "ints.tolist()"),
            ir.If("status == INTERRUPTED", [
                ir.Assign("theta, g, best", "work[O_THETA:O_G], work[O_G:O_BEST], work[O_BEST:O_HP]"),
                ir.If("not i[I_BEGUN]", [ir.Stmt("_begin(xout, _fg(xout, cols, g, ints[I_PASSES]), theta, best, g, ints, work)")]),
                ir.Stmt("_end(theta, best, cols, ints, work, xout, gout, status)"),
                ir.Assign("i", "ints.tolist()"),
            ], ir.If("status == DIVERGED and not i[I_STEP] and not math.isfinite(work[F_F0])", [
                ir.If("not all(np.isfinite(c).all() for c in cols)",
                      [ir.Raise('NonFiniteData("the data hold a non-finite value (NaN or inf)")')]),
            ]) if self.has_data and self.inline_rows else (), comment="the report is written here, at the best point"),
            ir.Assign("f", f"{'work' if self._work_size() <= 64 else 'work[:N_FLOATS]'}.tolist()"),
            ir.Assign("n_hist", f"i[{'I_EPOCH' if self.minibatch else 'I_HIST_I'}]"),
            ir.Assign("full", "n_hist == i[I_HIST_LEN]", "the arrays are the report's as they are"),
            ir.If("i[I_POS] > 0 and math.isfinite(f[F_EPOCH_SUM])", [
                ir.Assign("history", f"np.append(history[:n_hist], {self._partial_epoch_value()})"),
                ir.Assign("path", "np.vstack([path[:n_hist], work[O_THETA:O_G]])") if self.n <= PATH_MAX_PARAMS else None,
                ir.Assign("full", "True"),
            ], comment="the run ended within an epoch: that part's mean minibatch cost (and point) ends the history")
            if self.minibatch else None,
            ir.Return("(xout, f[F_FUN], gout, f[F_FUN_GNORM], i[I_STEP], i[I_NFEV], i[I_STATUS],\n"
                      "        history if full else history[:n_hist].copy(), i[I_HIST_EVERY],\n"
                      f"        {path},\n"
                      "        i[I_EPOCH], i[I_BEST_STEP], f[F_BEST], i[I_DIVERGED_AT], f[F_BLOWUP])"),
        ]
        nodes = [
            ir.Def("new_state", ("x0", "cols", "hyper", "schedule_args", "batch_size", "max_steps", "max_epochs", "tol",
                                 "seed"),
                   [alloc, ir.Return(f"[{', '.join(self._segment_params())}]")],
                   doc="run_segment's arguments, in SEGMENT_ARGS order. Its first call evaluates the cost at x0\n"
                       "(_begin: x0 waits in xout), the call that ends the run writes the report (_end)."),
            ir.Blank(2),
            self._threaded_drive() if self.threaded else None,
            ir.Def("_drive" if self.threaded else "drive",
                   (_DRIVE_PARAMS, _DRIVE_KEYWORDS + (("passes=None",) if self.threaded else ())),
                   drive, doc=_DRIVE_DOC + " given."),
        ]
        return self._driver_head() + "\n\n" + ir.render(nodes) + "\n" + _DRIVER_TAIL

    @staticmethod
    def _driver_head() -> str:
        """The driver's helpers: columns_of, plan."""
        return _DRIVER_HEAD

    def _threaded_drive(self) -> list:
        """drive for a module whose passes may run on calcml's threads: _drive with the passes
        calcml made for the run's columns in the table the loop reads (_Passes)."""
        return [
            ir.Def("drive", (_DRIVE_PARAMS, _DRIVE_KEYWORDS + ("passes=None",)), [
                ir.Assign("args", "(x0, data, hyper, schedule_args, batch_size, epochs, maxiter, tol, seed, callback, "
                                  "segment_seconds,\n        first_segment)"),
                ir.If("passes is None", [ir.Return("_drive(*args)")]),
                ir.Assign("cols", "columns_of(data)"),
                ir.If(f"{self._rows_of('cols')} < PARALLEL_MIN_ROWS", [ir.Return("_drive(*args)")]),
                ir.Return("_drive(x0, cols, *args[2:], passes=_Passes(passes(cols)))"),
            ], doc=_DRIVE_DOC + " given;\npasses(cols), if given, makes the full-batch passes on calcml's threads "
                                "(see _Passes): the\npasses over PARALLEL_MIN_ROWS rows or more use them."),
            ir.Blank(2),
        ]

    @staticmethod
    def _x0_code() -> str:
        """The code of the flat float64 x0 from whatever the driver was given."""
        return "np.array(x0, dtype=np.float64).reshape(N_PARAMS)"

    def _work_size(self) -> int:
        return len(_FLOATS) + 3 * self.n + len(self.hyper) + self._n_sched()

    def _state(self) -> list:
        """The statements that make run_segment's arguments (new_state's body, also inlined in drive)."""
        mb = self.minibatch
        return [
            ir.If("type(x0) is np.ndarray and x0.dtype is _F64 and x0.shape == (N_PARAMS,)",
                  [ir.Assign("xout", "x0.copy()", "the report's x, in the end")],
                  [ir.Assign("xout", self._x0_code())]),
            ir.Assign("work", "np.zeros(O_END)"),
            ir.Assign("work[F_TOL]", "tol"),
            [ir.Assign(f"work[O_HP + {k}]", f"hyper[{name!r}]") for k, name in enumerate(self.hyper)],
            [ir.Assign(f"work[O_SA + {k}]", f"schedule_args[{k}]") for k in range(self._n_sched())],
            [ir.Assign("n_hist", "max(1, max_epochs)"), ir.Assign("hist_every", 1)] if mb else
            [ir.Assign("hist_every", "-(-(max_steps + 1) // HISTORY_MAX)"),
             ir.Assign("n_hist", "max_steps // hist_every + 2", "every hist_every-th step's, then the last's")],
            ir.Assign("ints", "np.zeros(N_INTS, dtype=np.int64)"),
            ir.Assign("ints[I_HIST_EVERY]", "hist_every"),
            ir.Assign("ints[I_HIST_LEN]", "n_hist"),
            ir.Assign("ints[I_MAX_STEPS]", "max_steps"),
            [ir.Assign("ints[I_BATCH]", "batch_size"),
             ir.Assign("ints[I_MAX_EPOCHS]", "max_epochs"),
             ir.Assign("perm", f"np.arange({self._rows_of('cols')}, dtype=np.int64)"),
             ir.Assign("rng", "np.array([seed], dtype=np.uint64)")] if mb else None,
            ir.Assign("history", "np.empty(n_hist)", "not filled: the report reads only the entries the loop wrote"),
            ir.Assign("path", "np.empty((n_hist, N_PARAMS))", "the iterates beside the history entries")
            if self.n <= PATH_MAX_PARAMS else ir.Assign("path", "_NO_PATH"),
            ir.Assign("state", "new_optimizer_state(N_PARAMS)") if self.state else None,
            ir.Assign("gout", "np.empty(N_PARAMS)"),
        ]


# drive's parameters (two lines) and the head of its docstring.
_DRIVE_PARAMS = ("x0", "data", "hyper", "schedule_args", "batch_size", "epochs", "maxiter", "tol", "seed",
                 "callback=None")
_DRIVE_KEYWORDS = ("segment_seconds=SEGMENT_SECONDS", "first_segment=None")
_DRIVE_DOC = """The run, its report as a tuple: x, fun, grad, grad_norm, nit, nfev, status, history,
history_every, path, epochs, best_step, best_value, diverged_at, blowup (run()'s dict, in
its order, without status_name). The arguments are run()'s, hyper and schedule_args"""

# The imports of the module's machine-level pieces (after its header's).
_MACHINE_IMPORTS = """from llvmlite import ir  # noqa: E402
from numba import carray, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402"""


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


# The Python tier (a module's PYTHON_TIER): a line search's loop runs as the Python it is, its
# data passes machine code, until its Python time (in all processes) passes TIER_UP_SECONDS; then
# its machine code is compiled (3-6 s for lbfgs or newton) and runs the rest of the run, from
# the state the Python left (the same bits: see PYTHON_TIER). Machine code already cached is
# loaded at once. So a first fit costs the passes' compile (about 0.5 s), not the loop's, and
# a loop that runs long is compiled after all: at most TIER_UP_SECONDS more than compiling first.
# A large loop (a cost of hundreds of parameters, its gradient straight-line code) costs more to
# compile: its loop is compiled once its Python time has reached its compile time, estimated
# from its lines (_COMPILE_SECONDS_PER_LINE), as a ski rental is paid (never more than twice what
# the better choice, known in hindsight, would have cost). 0 compiles every loop at once.
TIER_UP_SECONDS = 2.0
# Numba's compile time of a loop module, a line of its source before the C entry (measured:
# chained Rosenbrock's lbfgs loop 6.9 s at 450 lines, 14 s at 3,200; gd's 10 s at 2,900).
_COMPILE_SECONDS_PER_LINE = 3e-3
# The Python tier runs in slices of about this long: each begins from a copy of the state, so that
# a Ctrl-C or a Python float error (an overflow, a division by zero, where machine code gives inf
# or NaN) leaves the state whole; after an error the slice runs again as machine code.
_SLICE_SECONDS = 0.02
# What a first-order step over data costs in the Python tier, a row and a parameter (measured:
# about 0.4 µs; the estimate that decides whether a run is short enough for the tier, _short).
_PYTHON_ROW_SECONDS = 0.5e-6


def python_seconds(path) -> float:
    """The Python time the loops of the module at ``path`` have spent in the Python tier so far,
    in every process (``<module>.python-seconds``)."""
    try:
        return float(Path(f"{path}.python-seconds").read_text())
    except (OSError, ValueError):
        return 0.0


def save_python_seconds(path, seconds: float):
    """Keep the loops' Python time beside the module (best effort: a read-only cache only leaves
    each process its own count)."""
    try:
        Path(f"{path}.python-seconds").write_text(repr(seconds))
    except OSError:
        pass


def tier_up_threshold(path, entry: str, memo: dict) -> float:
    """The Python time after which the loops of the module at ``path`` are compiled:
    TIER_UP_SECONDS, or their estimated compile time (their lines before the C entry ``entry``)
    where that is longer; 0 compiles at once. ``memo`` keeps the estimate."""
    if not TIER_UP_SECONDS > 0:
        return TIER_UP_SECONDS
    if "estimate" not in memo:
        try:
            text = Path(path).read_text(encoding="utf-8")
            lines = text.count("\n", 0, max(0, text.find(f"\ndef {entry}(")))
        except OSError:
            lines = 0
        memo["estimate"] = lines * _COMPILE_SECONDS_PER_LINE
    return max(TIER_UP_SECONDS, memo["estimate"])


def python_module(module, path):
    """The module's source run again as Python, ``_PYTHON_TIER`` set (its ``_jit_inline``, and for
    a scalar loop its ``_jit``, then leave functions as Python)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{module.__name__}_python", path)
    py = importlib.util.module_from_spec(spec)
    py._PYTHON_TIER = True
    spec.loader.exec_module(py)
    return py


# What python_call returns for a Python float error (the state put back: run it compiled).
FLOAT_ERROR = object()


def python_call(call, kept):
    """``(call(), seconds)`` run in the Python tier from a copy of the arrays ``kept`` (the state
    it changes): a Python float error (an overflow, a division by zero, where machine code gives
    inf or NaN) puts them back and returns FLOAT_ERROR; a Ctrl-C puts them back and is raised."""
    import time

    copies = [a.copy() for a in kept]
    t0 = time.perf_counter()
    try:
        with np.errstate(all="ignore"):
            out = call()
    except (ArithmeticError, ValueError, TypeError):
        out = FLOAT_ERROR
    except KeyboardInterrupt:
        for a, c in zip(kept, copies):
            a[...] = c
        raise
    if out is FLOAT_ERROR:
        for a, c in zip(kept, copies):
            a[...] = c
    return out, time.perf_counter() - t0


class _NativeSegment:
    """What a module's driver calls for run_segment: its C entry point's machine code
    (``run_segment_c``), loaded from beside the module on the first call, else compiled with
    ``numba.cfunc`` and kept there (:func:`calcml.native.load_or_compile`), called through
    ctypes with the arrays' addresses. A warm process so runs a fit without loading Numba's
    cache of the loop (its typing and target contexts: about 0.7 s). Should the machine code
    be out of reach (a Numba release that moved what calcml.native reads), the module's own
    dispatcher runs, after a warning. A line search's loop not yet compiled runs in the Python
    tier first (TIER_UP_SECONDS)."""

    def __init__(self, module, path):
        self.module, self.path = module, Path(path)
        self.names = module.SEGMENT_ARGS
        self.fn = None
        self.keep = None
        self.python = None  # the module run as Python (the Python tier), while it is
        # the loop's Python time so far, in every process (kept beside the module: a script run
        # again and again compiles the loop once its runs have spent its threshold in all)
        self.python_seconds = python_seconds(path)
        self.slice_steps = 8
        self.memo = {}
        self.cols_c = getattr(module, "cols_c", None)  # a module's own C form of its cols (calcml.tensor.loops)

    def _threshold(self) -> float:
        return tier_up_threshold(self.path, "run_segment_c", self.memo)

    def _load(self, args=None):
        import ctypes

        from numba import config

        from . import native

        mod = self.module
        if config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: the loop runs as the Python it is
            mod._segment = mod.run_segment
            return mod.run_segment
        address = None
        if getattr(mod, "PYTHON_TIER", False) and self.python_seconds < self._threshold() and self._short(args):
            address = native.load(native.object_path(self.path, "run_segment_c"))
            if address is None and self._python_tier() is not None:
                return self
        try:
            if address is None:
                address, self.keep, _ = native.load_or_compile(
                    self.path, "run_segment_c", lambda: (mod.run_segment_c, mod.SIG_SEGMENT, mod.CFUNC_FLAGS))
        except Exception as exc:  # noqa: BLE001 - the dispatcher still runs the loop
            import warnings

            warnings.warn(f"calcml could not compile the loop's machine code ({type(exc).__name__}: {exc}); "
                          f"Numba's dispatcher runs it", RuntimeWarning, stacklevel=3)
            mod._segment = mod.run_segment
            return mod.run_segment
        self.fn = _c_function(address, mod.SIG_SEGMENT, ctypes.c_int64)
        self.python = None
        return self

    def _short(self, args) -> bool:
        """Whether this run is short enough for the Python tier: a first-order step over data
        runs its rows in Python (the passes of calcml's threads aside), about _PYTHON_ROW_SECONDS
        a row; at most the tier's threshold of that (_threshold), or the loop is compiled at once."""
        mod = self.module
        own = getattr(mod, "python_tier_seconds", None)  # a module's own estimate (calcml.tensor.loops)
        if own is not None and args is not None:
            n_rows = _rows(mod, args[self.names.index("cols")]) if "cols" in self.names else 0
            return own(args[1], n_rows) <= self._threshold()
        if args is None or not mod.FIRST_ORDER or not mod.COLUMN_NAMES:
            return True  # a line search's passes, a cost without data: machine code or a few lines a step
        ints, n_rows = args[1], _rows(mod, args[self.names.index("cols")])
        if mod.MINIBATCH:
            rows = int(ints[mod.I_MAX_STEPS]) * int(ints[mod.I_BATCH]) + int(ints[mod.I_MAX_EPOCHS]) * n_rows
        elif n_rows >= getattr(mod, "PARALLEL_MIN_ROWS", n_rows + 1):
            rows = int(ints[mod.I_MAX_STEPS])  # each step's pass on calcml's threads
        else:
            rows = int(ints[mod.I_MAX_STEPS]) * n_rows
        return rows * _PYTHON_ROW_SECONDS * max(1, mod.N_PARAMS) <= self._threshold()

    def _python_tier(self):
        """The module's source run again as Python (``_PYTHON_TIER``), its serial data passes
        the machine code of their C entries: ``self.python``, or None where that cannot be."""
        mod = self.module
        try:
            py = python_module(mod, self.path)
            if hasattr(mod, "python_tier_passes"):  # the module's own (calcml.tensor.loops)
                mod.python_tier_passes(py)
            elif mod.COLUMN_NAMES:  # the passes over rows: machine code (without data: Python's, exact)
                if hasattr(mod, "passes_c"):
                    py._fg_serial, py._f_serial, py._hess_serial = _native_passes(mod, self.path)
                else:
                    py._fg_serial = native_fg(mod, self.path)
        except Exception:  # noqa: BLE001 - the machine code runs the loop instead
            return None
        self.python = py
        return py

    def _run_python(self, args):
        """run_segment's call in the Python tier: slices of about _SLICE_SECONDS up to the
        call's stop, each from a copy of the state; past the threshold (_threshold; or after a Python
        float error) the rest as machine code."""
        mod, py = self.module, self.python
        ints = args[1]
        stop = int(ints[mod.I_STOP])
        kept = [a for name, a in zip(self.names, args) if name in ("work", "ints", "xout", "gout", "perm", "rng")]
        kept += list(args[self.names.index("state")]) if "state" in self.names else []
        try:
            while True:
                if self.python_seconds >= self._threshold() or not self._short(args):  # compile; it resumes the run
                    ints[mod.I_STOP] = stop
                    self.python = None
                    self.python_seconds = max(self.python_seconds, self._threshold())
                    if self._load() is not self:
                        return mod.run_segment(*args)
                    return self(*args)
                step = int(ints[mod.I_STEP])
                ints[mod.I_STOP] = min(stop, step + self.slice_steps)
                status, dt = python_call(lambda: py.run_segment(*args), kept)  # a Ctrl-C: stopped at the slice's start
                if status is FLOAT_ERROR:  # Python's float rules: the slice again, compiled
                    self.python_seconds = max(self.python_seconds, self._threshold())
                    continue
                self.python_seconds += dt
                done = int(ints[mod.I_STEP]) - step
                if done > 0:
                    self.slice_steps = max(1, min(4 * self.slice_steps, int(done * _SLICE_SECONDS / max(dt, 1e-6))))
                if status != mod.RUNNING or int(ints[mod.I_STEP]) >= stop:
                    return status
        finally:
            ints[mod.I_STOP] = stop
            save_python_seconds(self.path, self.python_seconds)

    def row_gradients(self, theta, arrays, rows):
        """The gradient at ``theta`` of each row ``rows`` of the data ``arrays`` (a module's,
        DATA_NAMES order) alone, unscaled, as the rows of a matrix, by the loop's machine code
        (run_segment_c with ints[I_EVALUATE] set, over that row's one-row stripe: a module of
        calcml.tensor.loops over data; one call a row, its arguments made once); None where the
        loop is not machine code in this process."""
        mod = self.module
        if self.fn is None or not getattr(mod, "EVALUATES", False) or not arrays:
            return None
        ints = np.zeros(mod.N_INTS, dtype=np.int64)
        ints[mod.I_EVALUATE] = 1
        stripe = np.zeros((1, 2), dtype=np.int64)  # the row's stripe, rewritten before each call
        gout = np.empty(mod.N_PARAMS)
        args = {"work": np.zeros(mod.O_END), "ints": ints, "history": np.zeros(1), "path": np.zeros((1, 1)),
                "cols": (stripe, 1.0) + tuple(arrays), "perm": np.zeros(1, dtype=np.int64),
                "rng": np.zeros(1, dtype=np.uint64), "state": mod.new_optimizer_state(mod.N_PARAMS),
                "xout": np.array(theta, dtype=np.float64), "gout": gout}
        args = [args[name] for name in self.names]
        c_args, table = self._c_args(args)
        out = np.empty((len(rows), mod.N_PARAMS))
        for e, i in enumerate(rows):
            stripe[0, 0], stripe[0, 1] = i, i + 1
            self.fn(*c_args)
            out[e] = gout
        del args, table  # (alive through the calls: their addresses are in c_args)
        return out

    def _c_args(self, args):
        """The C entry's arguments for run_segment's ``args`` (the arrays' objects, their sizes),
        and a table that must live through the call (or None)."""
        c_args = [_OFFSET]
        table = None
        for name, a in zip(self.names, args):
            if name == "history":
                c_args += [id(a), a.shape[0]]
            elif name == "path":
                c_args += [id(a), a.shape[0], a.shape[1]]
            elif name == "cols":  # the columns' addresses, in a table that lives through the call
                if self.cols_c is not None:
                    c_args += self.cols_c(a)
                else:
                    table = np.array([c.ctypes.data for c in a], dtype=np.uint64)
                    c_args += [table.ctypes.data, a[0].shape[0]]
            elif name == "state":
                c_args += [id(st) for st in a]
            else:  # the arrays the driver made (contiguous, of the loop's types)
                c_args.append(id(a))
        return c_args, table

    def __call__(self, *args):
        if self.fn is None:
            if self.python is None and (_OFFSET is None or self._load(args) is not self):
                return self.module.run_segment(*args)
            if self.python is not None:
                return self._run_python(args)
        c_args, table = self._c_args(args)
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
    if hasattr(module, "passes_c"):  # Newton's: the same pass in the entry of its three (one compile)
        module._fg_native = _native_passes(module, path)[0]
        return module._fg_native
    found = module._fg
    fn, keep = _native_entry(module, path, "fg_c", "SIG_FG")
    if fn is not None:
        def found(theta, cols, g, keep=keep):
            args, table = _cols_args(module, cols)
            return fn(_OFFSET, id(theta), *args, id(g))

    module._fg_native = found
    return found


def _native_passes(module, path):
    """A Newton module's serial passes (_fg_serial, _f_serial, _hess_serial), as the machine code
    of its C entry ``passes_c`` (loaded or compiled and kept; one compile for the three), or the
    module's own functions where that is out of reach."""
    found = getattr(module, "_passes_native", None)
    if found is not None:
        return found
    found = module._fg_serial, module._f_serial, module._hess_serial
    fn, keep = _native_entry(module, path, "passes_c", "SIG_PASSES")
    if fn is not None:
        def fg(theta, cols, g, keep=keep):
            args, table = _cols_args(module, cols)
            return fn(0, _OFFSET, id(theta), *args, id(g))

        def f(theta, cols, keep=keep):
            args, table = _cols_args(module, cols)
            return fn(1, _OFFSET, id(theta), *args, id(theta))

        def hess(theta, cols, H, keep=keep):
            args, table = _cols_args(module, cols)
            fn(2, _OFFSET, id(theta), *args, id(H))
        found = fg, f, hess
    module._passes_native = found
    return found


def _cols_args(module, cols):
    """(the C arguments that carry a module's ``cols`` to its C entries, what must outlive the
    call): the table of the columns' addresses and their row count, or the module's own form
    (its ``cols_c``, calcml.tensor.loops)."""
    own = getattr(module, "cols_c", None)
    if own is not None:
        return own(cols), None
    table = np.array([c.ctypes.data for c in cols], dtype=np.uint64)
    return [table.ctypes.data, cols[0].shape[0]], table


def _rows(module, cols) -> int:
    """The row count of a module's ``cols``."""
    own = getattr(module, "rows_of", None)
    return own(cols) if own is not None else cols[0].shape[0]


def _native_entry(module, path, name, signature):
    """(ctypes function, keepalive) of the module's C entry ``name`` (Numba signature
    ``signature``, a module constant), loaded from beside the module or compiled with
    numba.cfunc and kept there; (None, None) where out of reach (NUMBA_DISABLE_JIT, no such
    entry, a compile error)."""
    from numba import config

    if _OFFSET is None or not hasattr(module, name) or config.DISABLE_JIT:
        return None, None
    import ctypes

    from . import native

    sig = getattr(module, signature)
    try:
        address, keep, _ = native.load_or_compile(Path(path), name, lambda: (getattr(module, name), sig,
                                                                          module.CFUNC_FLAGS))
    except Exception:  # noqa: BLE001 - the dispatcher still makes the pass
        return None, None
    return _c_function(address, sig, ctypes.c_double), keep


def _c_function(address, signature, restype):
    """The machine code at ``address`` as a ctypes function of a C entry's Numba signature:
    pointers as void*, float64 as double, the rest (addresses, sizes) as int64."""
    import ctypes

    from numba import types

    args = [ctypes.c_void_p if isinstance(t, types.CPointer) else ctypes.c_double if t == types.float64 else
            ctypes.c_int64 for t in signature.args]
    return ctypes.CFUNCTYPE(restype, *args)(address)


_OFFSET = _data_offset()
