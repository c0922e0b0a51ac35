"""Cost -> Python module source for the Numba kernels: :mod:`calcml.ir` statements, rendered once; no exec here.

The pipeline, run once per cost (the result is cached on disk by :mod:`calcml.compile`):

1. rewrite the per-row expression into numerically stable form (:mod:`calcml.rewrite`);
2. differentiate it exactly (reusing ``Cost.gradient``/``Cost.hessian`` when no rewrite
   applied, so no derivative is taken twice);
3. one common-subexpression elimination over value, gradient and Hessian together;
4. split the temporaries into row-independent ones (hoisted out of the row loop) and
   per-row ones, and for each kernel keep only the temporaries its outputs need;
5. print each kernel as a fused loop over fixed-size row chunks with per-chunk partial
   sums combined in a fixed order, so the serial and threaded twins give the same bits.

Symbols never reach the code by name: parameters are ``theta`` slots ``p0, p1, ...``,
data columns ``c0, c1, ...`` with row values ``x0, x1, ...``, temporaries ``t0, ...``;
user-supplied names appear only inside comments, escaped with ``ascii()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from .backprop import backprop
from .cost import Cost
from .errors import CodegenError
from . import ir
from .printing import ORDERED_TERMS_MAX, NumbaPrinter, dirac_products, helper_source
from .rewrite import stabilize

# Rows per chunk: the unit of parallel work and of the two-level (chunk, total) summation.
# 16,384 rather than 4,096: a quarter of the per-chunk accumulator allocations, which the
# two-thread W1 kernel felt (benchmarks/RESULTS.md, W1).
CHUNK = 16384
# Rows per block inside a chunk: one accumulator lane per row. 16 (not 8) so that LLVM
# vectorises the lane loop instead of unrolling it into scalar code.
LANES = 16
# Costs with at most this many parameters get the Hessian in the same module (joint CSE).
HESSIAN_INLINE_MAX = 16

# The one Numba-flags policy, rendered into every generated module (which must not import
# calcml: exported modules run with only numpy and numba installed).
NUMBA_FLAGS = {"cache": True, "fastmath": False, "error_model": "numpy", "nogil": True}
# Numba's cache=True pickles a function's environment by its module's name, and a later process
# imports that name to load the cache: calcml's own modules are importable so (compile.import_path
# registers them), but an exported one run with runpy.run_path, or from a spec not put in
# sys.modules, is not ("<dynamic>"), and its cache broke every later process. Such a module
# compiles afresh each time instead.
CACHE_TEST = "__name__ in sys.modules and not __name__.startswith('<')"


def njit_flags(flags: dict) -> str:
    """``flags`` as the keywords of ``numba.njit`` in a generated module: ``cache`` as the name
    ``_CACHE``, which :func:`cache_statements` defines."""
    return ", ".join(f"{k}={'_CACHE' if k == 'cache' and v else repr(v)}" for k, v in flags.items())


def cache_statements() -> list:
    """``import sys`` and ``_CACHE`` (see CACHE_TEST): what ``njit_flags`` refers to."""
    return [ir.Raw("import sys"),
            ir.Assign("_CACHE", CACHE_TEST, "Numba's cache only where a later process can import this module by name")]
# The kernels' flags: compiled with numba.cfunc one by one, their machine code cached by
# calcml (calcml.native), so Numba's own cache is not used.
KERNEL_FLAGS = {"fastmath": False, "error_model": "numpy"}


def _comment(text: str, limit: int = 160) -> str:
    """User text made safe for a comment: ASCII escapes, no line breaks, bounded length. A large
    sum prints in its own argument order (SymPy's print order costs seconds there: printing.ORDERED_TERMS_MAX)."""
    if isinstance(text, sp.Basic) and len(text.args) > ORDERED_TERMS_MAX:
        text = sp.sstr(text, order="none")
    s = ascii(str(text))[1:-1]
    return s if len(s) <= limit else s[: limit - 3] + "..."


@dataclass
class _Symbolic:
    """The derived quantities of a cost, in the form the kernels compute them."""

    value: sp.Expr
    gradient: list
    hessian_upper: list  # entries (i, j) with j >= i, row-major; empty when not inlined
    pairs: list = field(default_factory=list)  # (i, j) for each hessian_upper entry


def derive(cost: Cost, with_hessian: bool) -> _Symbolic:
    """Stable value, gradient and (optionally) Hessian upper triangle, exactly differentiated."""
    stable = stabilize(cost.expr)
    n = len(cost.params)
    pairs = [(i, j) for i in range(n) for j in range(i, n)] if with_hessian else []
    if stable == cost.expr:
        grad = list(cost.gradient)
        hess = [cost.hessian[i, j] for i, j in pairs]
    else:
        grad = [sp.diff(stable, p) for p in cost.params]
        hess = [sp.diff(grad[i], cost.params[j]) for i, j in pairs]
    # products with DiracDelta become DiracTimes before the CSE, which could part them (the printer
    # makes the same rewrite of every expression it prints: the backprop path, the tensor kernels)
    grad = [dirac_products(stabilize(g)) for g in grad]
    hess = [dirac_products(stabilize(h)) for h in hess]
    return _Symbolic(dirac_products(stable), grad, hess, pairs)


@dataclass
class _Plan:
    """CSE result with the classification the printer needs."""

    temps: list  # [(symbol, expr)] in dependency order
    outputs: list  # reduced value, gradient..., hessian... (in that order)
    row_temps: set  # temporaries that depend on a data column
    deps: dict  # temp symbol -> set of temp symbols it uses
    strict: dict | None = None  # temp symbol -> data columns it propagates (see strict_in)

    def strict_in(self, expr, data_symbols) -> frozenset:
        """The data symbols whose non-finite values ``expr`` is sure to pass on.

        With every other input finite, a NaN or infinity in column x makes x + y, x * y
        (inf * 0 is NaN) and x**p for a number p > 0 non-finite again, and a sum over rows
        of a non-finite term is non-finite. So when a kernel's output sum is "strict" in a
        column, that sum being finite proves the column finite, and the kernel needs no
        separate per-row test for it. Anything else (a function, a negative power,
        a conditional) counts as passing on nothing: exp(-inf) is 0, 1/inf is 0,
        sigmoid(inf) is 1. The printer maps Add, Mul and Pow one to one onto ``+``, ``*``
        and products/``sqrt``/``**``, so the analysis holds for the code as printed."""
        if self.strict is None:
            data = frozenset(data_symbols)
            self.strict = {}
            for s, e in self.temps:
                self.strict[s] = _strict(e, self.strict, data)
        return _strict(expr, self.strict, frozenset(data_symbols))


def _strict(e, known: dict, data: frozenset) -> frozenset:
    """See :meth:`_Plan.strict_in`."""
    if e in known:
        return known[e]
    if e.is_Symbol:
        return frozenset([e]) & data
    if e.is_Add or e.is_Mul:
        out = frozenset()
        for a in e.args:
            out |= _strict(a, known, data)
        return out
    if e.is_Pow and e.exp.is_Number and e.exp.is_positive and e.exp.is_finite:
        return _strict(e.base, known, data)
    return frozenset()


def plan(sym: _Symbolic, data_symbols) -> _Plan:
    """One CSE over value, gradient and Hessian together."""
    exprs = [sym.value, *sym.gradient, *sym.hessian_upper]
    gen = sp.numbered_symbols("_cse", cls=sp.Dummy)
    temps, outputs = sp.cse(exprs, symbols=gen, order="none", ignore=())
    return _classify(temps, list(outputs), data_symbols)


def plan_backprop(cost: Cost) -> _Plan:
    """Value and gradient by reverse-mode sweeps over the stable expression (no CSE needed)."""
    temps, value, grads = backprop(stabilize(cost.expr), cost.params)
    return _classify(temps, [value, *grads], cost.data)


def _classify(temps, outputs, data_symbols) -> _Plan:
    """Mark the temporaries that depend on a data column (the rest are hoisted)."""
    temp_set = {s for s, _ in temps}
    data_set = set(data_symbols)
    row_temps, deps = set(), {}
    for s, e in temps:
        free = e.free_symbols
        deps[s] = free & temp_set
        if free & data_set or deps[s] & row_temps:
            row_temps.add(s)
    return _Plan(temps, outputs, row_temps, deps)


def _closure(plan_: _Plan, exprs) -> list:
    """The temporaries ``exprs`` need, in dependency order."""
    need, stack = set(), []
    temp_set = set(plan_.deps)
    for e in exprs:
        stack.extend(e.free_symbols & temp_set)
    while stack:
        s = stack.pop()
        if s not in need:
            need.add(s)
            stack.extend(plan_.deps[s])
    return [(s, e) for s, e in plan_.temps if s in need]


@dataclass(frozen=True)
class RowProgram:
    """Straight-line code for one kernel kind, as :mod:`calcml.ir` statements (see
    ModuleBuilder.program), rendered with the builder's printer.

    Names: ``theta`` and ``cols`` are the inputs; ``p{j}`` parameters, ``c{k}`` column
    arrays, ``x{k}`` the current row's values (:meth:`row_loads`), ``h{i}`` row-independent
    temporaries, ``t{i}`` per-row temporaries. ``outputs`` are (label, expression) per
    accumulated quantity (a SymPy expression, or code), and ``check`` is code that is 0.0
    when the row's data are finite (NaN otherwise).
    """

    kind: str
    param_loads: tuple
    column_loads: tuple
    hoisted: tuple
    n_cols: int
    row: tuple
    outputs: tuple
    check: str
    pairs: tuple
    # The kernels' cheaper form of the finiteness check: ``row_check`` tests per row only the
    # columns that no output propagates (None when there are none), and the outputs at
    # ``check_slots`` propagate the rest (see _Plan.strict_in): their sums, tested once at
    # the end, carry the check for those columns for free.
    row_check: str | None = None
    check_slots: tuple = ()
    slot_checked: tuple = ()  # the columns (indices) those slots check

    def row_loads(self, row: str) -> list:
        """``x{k} = c{k}[row]`` for every column, ``row`` the row index's code. Every column is
        read, even one the outputs do not need: the finiteness check validates all the data,
        whichever kernel sees it."""
        return [ir.Assign(f"x{k}", f"c{k}[{row}]") for k in range(self.n_cols)]


class ModuleBuilder:
    """Prints the kernels of one cost into one module."""

    def __init__(self, cost: Cost, with_hessian: bool, sym: _Symbolic | None = None, hessian_only: bool = False):
        self.cost = cost
        self.with_hessian = with_hessian or hessian_only
        # hessian_only: the on-demand Hessian module of a large cost, whose value and
        # gradient kernels already live in the main module (no second backprop or print).
        self.hessian_only = hessian_only
        with_hessian = self.with_hessian
        # Value and gradient: backpropagation (one forward and one backward sweep; scales to
        # thousands of parameters and shares the adjoint, e.g. 2*(residual), across the
        # gradient). Hessian: exact diff with one CSE over value, gradient and Hessian.
        # A small cost without data is evaluated once per optimizer step, where the length of
        # the dependency chain is the speed: SymPy's closed forms after CSE (Rosenbrock's
        # 400*a*t) are shorter than the adjoint sweep's chain, so such costs keep them.
        small_nodata = not cost.data and len(cost.params) <= HESSIAN_INLINE_MAX
        self.sym = _Symbolic(None, [], [], [])
        cse_plan = None
        if with_hessian or small_nodata:
            self.sym = sym or derive(cost, with_hessian)
            cse_plan = plan(self.sym, cost.data)
        self.plan_h = cse_plan if with_hessian else None
        if hessian_only:
            self.plan_vg = None
        else:
            self.plan_vg = cse_plan if small_nodata else plan_backprop(cost)
        names = {p: f"p{j}" for j, p in enumerate(cost.params)}
        names.update({d: f"x{k}" for k, d in enumerate(cost.data)})
        row_i = hoist_i = 0
        plans = [pl for pl in (self.plan_vg, self.plan_h) if pl is not None]
        if len(plans) == 2 and plans[0] is plans[1]:
            plans = plans[:1]
        for pl in plans:
            for s, _ in pl.temps:
                if s in pl.row_temps:
                    names[s] = f"t{row_i}"
                    row_i += 1
                else:
                    names[s] = f"h{hoist_i}"
                    hoist_i += 1
        self.names = names
        self.printer = NumbaPrinter(names, memo=True)
        self.n = len(cost.params)
        self.has_data = bool(cost.data)

    def _plan(self, kind: str) -> _Plan:
        if kind == "hessian":
            if self.plan_h is None:
                raise CodegenError("this module was built without the Hessian")
            return self.plan_h
        return self.plan_vg

    # -- pieces ----------------------------------------------------------------------------
    def _outputs(self, kind: str) -> list:
        """(label, expr) of what kernel ``kind`` returns, in output-slot order."""
        out = self._plan(kind).outputs
        if kind == "hessian":
            names = [_comment(p.name) for p in self.cost.params]
            return [(f"d2/d {names[i]} d {names[j]}", out[1 + self.n + k]) for k, (i, j) in enumerate(self.sym.pairs)]
        value = [("value", out[0])]
        grad = [(f"d/d {_comment(p.name)}", out[1 + j]) for j, p in enumerate(self.cost.params)]
        return {"value": value, "grad": grad, "value_and_grad": value + grad}[kind]

    def program(self, kind: str) -> "RowProgram":
        """The straight-line code that computes ``kind``'s outputs for one row.

        The building block of every generated loop: the kernels below and the optimizer
        loops of :mod:`calcml.loop` place these statements inside their own loops.
        """
        outs = self._outputs(kind)
        pl = self._plan(kind)
        temps = _closure(pl, [e for _, e in outs])
        used = self._free_symbols(temps, outs)
        data = list(self.cost.data)
        # Which outputs carry the finiteness check of which columns: greedily, in slot order.
        unchecked, check_slots = set(data), []
        for k, (_, e) in enumerate(outs):
            if not unchecked:
                break
            carried = pl.strict_in(e, data) & unchecked
            if carried:
                check_slots.append(k)
                unchecked -= carried
        row_check = " + ".join(f"(x{k} - x{k})" for k, d in enumerate(data) if d in unchecked) or None
        return RowProgram(
            kind=kind,
            param_loads=tuple(ir.Assign(f"p{j}", f"theta[{j}]", _comment(p.name))
                              for j, p in enumerate(self.cost.params) if p in used),
            column_loads=tuple(ir.Assign(f"c{k}", f"cols[{k}]", f"column {_comment(d.name)}")
                               for k, d in enumerate(data)),
            hoisted=tuple(ir.Assign(s, e) for s, e in temps if s not in pl.row_temps),
            n_cols=len(data),
            row=tuple(ir.Assign(s, e) for s, e in temps if s in pl.row_temps),
            outputs=tuple(outs),
            # x - x is 0.0 for finite x and NaN for inf/NaN: a free check that the data are finite.
            check=" + ".join(f"(x{k} - x{k})" for k in range(len(data))) or "0.0",
            pairs=tuple(self.sym.pairs) if kind == "hessian" else (),
            row_check=row_check,
            check_slots=tuple(check_slots),
            slot_checked=tuple(k for k, d in enumerate(data) if d not in unchecked),
        )

    @staticmethod
    def _free_symbols(temps, outs):
        used = set()
        for _, e in temps:
            used |= e.free_symbols
        for _, e in outs:
            used |= e.free_symbols
        return used

    # -- kernels ---------------------------------------------------------------------------
    # Kernels are plain functions over raw pointers, compiled one by one with numba.cfunc
    # when first needed (see calcml.native): the machine code is kept in the cache and a
    # later process loads it without Numba's start-up.
    @staticmethod
    def _load_params(prog: "RowProgram") -> list:
        return [ir.Assign("theta", "carray(theta_p, N_PARAMS)"), prog.param_loads]

    def _kernel_nodata(self, kind: str) -> ir.Def:
        prog = self.program(kind)
        size = kernel_slots(kind, self.n, has_data=False)[1]
        n = self.n
        if kind == "hessian":  # the upper triangle, mirrored
            outs = [[ir.Assign(f"out[{i * n + j}]", e, label),
                     ir.Assign(f"out[{j * n + i}]", f"out[{i * n + j}]") if i != j else None]
                    for (label, e), (i, j) in zip(prog.outputs, prog.pairs)]
        else:
            outs = [ir.Assign(f"out[{k}]", e, label) for k, (label, e) in enumerate(prog.outputs)]
        body = [self._load_params(prog), prog.hoisted, ir.Assign("out", f"carray(out_p, {size})"), outs]
        return ir.Def(kind, ("theta_p", "out_p"), body, doc=f"{kind} of the cost at theta, into out[:{size}]")

    def _kernel_rows(self, kind: str, checked: bool = True) -> ir.Def:
        """A fused pass over the rows: per-chunk partial sums, combined in chunk order.

        Any number of threads may run the function at once on the same arguments: each
        claims the next chunk of CHUNK rows (an atomic counter) and writes the chunk's sums
        to the chunk's own row of ``partial``; the call with ``finalize`` set then adds the
        rows in chunk order, so one thread or many give the same bits.

        Inside a chunk, rows go in blocks of LANES lanes (:func:`chunk_sums`).
        """
        prog = self.program(kind)
        m = len(prog.outputs)  # accumulated slots (+1 for the finiteness check)
        slots, size = kernel_slots(kind, self.n, has_data=True)
        what = "data checked in the same pass" if checked else "prepared (validated) data, slot left 0"
        if checked and prog.check_slots:
            what += ", partly through the output sums"
        claim = ir.While("True", [
            ir.Assign("chunk", "_claim(next_chunk)"),
            ir.If("chunk >= nchunks", [ir.Break()]),
            ir.Assign("start", "chunk * CHUNK"),
            ir.Assign("stop", "min(start + CHUNK, n)"),
            ir.For("k", ir.range_(slots), [ir.For("lane", ir.range_("LANES"), [ir.Assign("acc[k, lane]", "0.0")])]),
            chunk_sums(prog, "LANES", slots, check=prog.row_check if checked else None),
        ])
        total = [
            ir.Assign("total", f"carray(out_p, {size})" if kind != "hessian" else f"carray(acc_p, {slots})"),
            ir.For("k", ir.range_(slots), [ir.Assign("total[k]", "0.0")]),
            ir.For("chunk", ir.range_("nchunks"), [
                ir.For("k", ir.range_(slots), [ir.AugAssign("total[k]", "+", "partial[chunk, k]")])]),
        ]
        if checked and prog.check_slots:
            covered = ", ".join(f"x{k}" for k in prog.slot_checked)
            total += [
                ir.Comment(f"these sums add and multiply {covered}: a NaN or inf there leaves them\n"
                           "non-finite, so testing the sums here checks those columns for free (x - x is 0.0\n"
                           "for finite x, NaN otherwise; finite data that overflow only cost a rescan)"),
                ir.AugAssign(f"total[{m}]", "+", " + ".join(f"(total[{k}] - total[{k}])" for k in prog.check_slots)),
            ]
        if self.cost.reduce == "mean":
            total.append(ir.For("k", ir.range_(m), [ir.AugAssign("total[k]", "/", "n")]))
        if kind == "hessian":
            total += [
                ir.Assign("out", f"carray(out_p, {size})"),
                [[ir.Assign(f"out[{i * self.n + j}]", f"total[{k}]"),
                  ir.Assign(f"out[{j * self.n + i}]", f"total[{k}]") if i != j else None]
                 for k, (i, j) in enumerate(prog.pairs)],
                ir.Assign(f"out[{self.n * self.n}]", f"total[{m}]"),
            ]
        return ir.Def(
            f"{kind}_rows" + ("" if checked else "_prepared"),
            ("theta_p", "cols_p", "n", "nchunks", "next_chunk", "partial_p", "finalize", "out_p", "acc_p"),
            [
                self._load_params(prog),
                [ir.Assign(f"c{k}", f"carray(cols_p[{k}], n)", f"column {_comment(d.name)}")
                 for k, d in enumerate(self.cost.data)],
                [ir.Comment("row-independent subexpressions, computed once"), prog.hoisted] if prog.hoisted else None,
                ir.Assign("partial", f"carray(partial_p, (nchunks, {slots}))"),
                ir.Assign("acc", f"carray(acc_p, ({slots}, LANES))", "this thread's lane accumulators"),
                claim,
                ir.If("finalize", total),
            ],
            doc=f"{kind} of the {self.cost.reduce} over the n rows of the columns at cols_p[k]; slot {m} is the "
                f"finiteness check ({what})",
        )

    # -- the module ------------------------------------------------------------------------
    def kinds(self) -> list:
        if self.hessian_only:
            return ["hessian"]
        kinds = ["value", "grad", "value_and_grad"]
        if self.with_hessian:
            kinds.append("hessian")
        return kinds

    def source(self, header_lines=()) -> str:
        kernels = []
        for kind in self.kinds():
            if self.has_data:
                kernels += [[self._kernel_rows(kind, checked), ir.Blank(2)] for checked in (True, False)]
            else:
                kernels.append(self._kernel_nodata(kind))
            kernels.append(ir.Blank(2))
        body = ir.render(kernels, self.printer)  # printed first: the header lists the helpers it used
        return ir.render(self.header(header_lines, kernels=True)) + "\n" + body + "\n"

    def header(self, header_lines=(), title="the compiled kernels of one cost", kernels: bool = False) -> list:
        """Comments, imports, the Numba flags and the helpers the printed code used so far
        (so made after the module's statements are rendered).

        ``kernels``: the header of the kernel module (C signatures and the chunk counter for
        ``numba.cfunc``); otherwise that of an optimizer module (``njit``).
        """
        flags = njit_flags(KERNEL_FLAGS if kernels else NUMBA_FLAGS)
        return [
            [ir.Comment(line) for line in header_lines],
            ir.Comment(f"Generated by calcml: {title}. Regenerated, never edited."),
            ir.Comment(f"cost ({self.cost.reduce} over rows): {_comment(self.cost.expr, 2000)}"),
            ir.Comment("parameters (theta slots):"),
            [ir.Comment(f"  p{j} = theta[{j}]: {_comment(p.name)}") for j, p in enumerate(self.cost.params)],
            [ir.Comment("data columns:"),
             [ir.Comment(f"  c{k} = cols[{k}]: {_comment(d.name)}") for k, d in enumerate(self.cost.data)]]
            if self.has_data else None,
            ir.Comment("\nEach kernel is compiled on first use with numba.cfunc(SIG_ROWS or SIG_THETA, "
                       "**CFUNC_FLAGS);\n"
                       "calcml keeps its machine code beside this file (<this file>.<kernel>.<cpu>.o).")
            if kernels else None,
            ir.Raw("import math"),
            ir.Blank(),
            ir.Raw("import numba\nimport numpy as np"),
            ir.Raw(_KERNEL_IMPORTS) if kernels else None,
            ir.Blank(),
            cache_statements() if "_CACHE" in flags else None,
            ir.Assign("_jit", f"numba.njit({flags})") if kernels else [
                ir.Assign("_PYTHON_TIER", 'bool(globals().get("_PYTHON_TIER"))',
                          "calcml's Python tier: this source run as Python, its data passes machine code, until "
                          "the loop is worth compiling (calcml.loop._NativeSegment); never set otherwise"),
                ir.Assign("_jit", f"numba.njit({flags}) if not _PYTHON_TIER else (lambda f: f)")],
            [ir.Assign("CFUNC_FLAGS", repr(KERNEL_FLAGS)), ir.Raw(_SIGNATURES)] if kernels else None,
            [ir.Assign("CHUNK", CHUNK), ir.Assign("LANES", LANES)] if self.has_data else None,
            ir.Assign("N_PARAMS", self.n),
            ir.Blank(),
            [ir.Blank(), ir.Raw(_CLAIM_SOURCE.strip("\n")), ir.Blank()] if kernels and self.has_data else None,
            [[ir.Blank(), ir.Raw("@_jit\n" + helper_source([name]).rstrip("\n"))]
             for name in sorted(self.printer.helpers_used)],
            ir.Blank(2),
        ]


_KERNEL_IMPORTS = '''from llvmlite import ir
from numba import carray, types
from numba.core.extending import intrinsic'''

_SIGNATURES = '''_F64P = types.CPointer(types.float64)
# value, gradient, Hessian of a cost without data: f(theta, out)
SIG_THETA = types.void(_F64P, _F64P)
# a pass over rows: f(theta, cols, n, nchunks, next_chunk, partial, finalize, out, acc)
SIG_ROWS = types.void(_F64P, types.CPointer(_F64P), types.int64, types.int64,
                      types.CPointer(types.int64), _F64P, types.int64, _F64P, _F64P)'''

_CLAIM_SOURCE = '''
@intrinsic
def _claim(typingctx, counter):
    """The next chunk to sum: counter[0], atomically incremented (shared by the threads)."""
    def codegen(context, builder, signature, args):
        return builder.atomic_rmw("add", args[0], ir.Constant(ir.IntType(64), 1), "monotonic")
    return types.int64(counter), codegen


if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: the kernels run as Python, counter a ctypes int64*
    import threading

    _claim_lock = threading.Lock()

    def _claim(counter):
        with _claim_lock:
            chunk = counter[0]
            counter[0] = chunk + 1
        return chunk
'''


def chunk_sums(prog: RowProgram, lanes: str, slots: int, check=None) -> list:
    """The sums of one chunk of rows ``[start, stop)`` into ``partial[chunk, :slots]``.

    The rows go in blocks of ``lanes``: row ``base + l`` adds into lane ``l`` of each
    accumulator ``acc[k, :]`` (zeroed by the caller). The lane loop carries no dependence, so
    LLVM vectorises it without reassociating any sum, and the summation order is fixed by
    this source. The rows after the last full block add into lane 0; then each
    accumulator's lanes are added in order. ``check`` (code, or None) is added to slot
    ``len(prog.outputs)``: the data finiteness check. Shared by the kernels and the
    optimizers' threaded full-batch passes (:mod:`calcml.loop`).
    """
    m = len(prog.outputs)

    def row_body(lane):
        return [
            prog.row_loads("i"),
            prog.row,
            [ir.AugAssign(f"acc[{k}, {lane}]", "+", e, label) for k, (label, e) in enumerate(prog.outputs)],
            ir.AugAssign(f"acc[{m}, {lane}]", "+", check) if check is not None else None,
        ]

    return [
        ir.Assign("nblocks", f"(stop - start) // {lanes}"),
        ir.For("block", ir.range_("nblocks"), [
            ir.Assign("base", f"start + block * {lanes}"),
            ir.For("lane", ir.range_(lanes), [
                ir.Assign("i", "np.uintp(base + lane)", "unsigned: no negative-index wraparound test"),
                row_body("lane"),
            ]),
        ]),
        ir.For("r", ir.range_(f"start + nblocks * {lanes}", "stop"), [ir.Assign("i", "np.uintp(r)"), row_body("0")],
               comment="the rows after the last full block"),
        ir.For("k", ir.range_(slots), [
            ir.Assign("s", "0.0"),
            ir.For("lane", ir.range_(lanes), [ir.AugAssign("s", "+", "acc[k, lane]")]),
            ir.Assign("partial[chunk, k]", "s"),
        ]),
    ]


def kernel_slots(kind: str, n_params: int, has_data: bool) -> tuple:
    """(partial sums per chunk, length of ``out``) of kernel ``kind`` for ``n_params`` parameters.

    Row kernels accumulate their outputs plus one finiteness-check slot; the Hessian's
    partial sums hold the upper triangle and its ``out`` the full (n, n) matrix, then the
    check.
    """
    n = n_params
    outputs = {"value": 1, "grad": n, "value_and_grad": n + 1, "hessian": n * (n + 1) // 2}[kind]
    if not has_data:
        return 0, n * n if kind == "hessian" else outputs
    slots = outputs + 1
    return slots, (n * n + 1) if kind == "hessian" else slots


def kernel_module_source(cost: Cost, with_hessian: bool | None = None, header_lines=(),
                         hessian_only: bool = False) -> str:
    """The module text for ``cost``'s kernels (``hessian_only``: just the Hessian kernels)."""
    if with_hessian is None:
        with_hessian = len(cost.params) <= HESSIAN_INLINE_MAX
    return ModuleBuilder(cost, with_hessian, hessian_only=hessian_only).source(header_lines)
