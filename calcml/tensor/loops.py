"""A tensor cost's descent loops, written by calcml's one loop generator (:mod:`calcml.loop`).

:class:`LoopGenerator` is :class:`calcml.loop._Generator` with another source of the
gradient: where a scalar cost's loop inlines its straight-line gradient row by row, a tensor
cost's calls the cost's compiled kernels (:mod:`calcml.tensor.codegen`): for a full batch
``vg_rows`` over the kernels' stripes of rows, their sums added in stripe order, then
``vg_finish`` (the same bits as ``k.value_and_grad``); for a minibatch the same over its rows,
gathered into buffers made once a segment. Everything else is the scalar loop's:
``run_segment`` with its bookkeeping in machine code (history, best point, divergence,
tolerance, a minibatch run's shuffles and epochs), its C entry (``run_segment_c``) whose
machine code calcml keeps beside the module, the Python tier while runs are short (with the
NumPy forms of the loops over the parameters), the passes over large data on calcml's threads
(``_Passes``), and the driver that calls the loop in segments (Ctrl-C, progress). A minibatch
module also holds ``_epoch``, the same steps without the bookkeeping, which calcml runs where
each chunk of Dask data lives (calcml.dask_data.run_chunk).

The module is the cost's kernels (``cost.module_source``) followed by that loop. Its driver
takes the data as the tuple of validated arrays in DATA_NAMES order (what calcml passes) or
as a dict of arrays (an exported module's user), and x0 flat or as a dict of arrays.
"""

from __future__ import annotations

from types import SimpleNamespace

from .. import ir
from .. import loop as _loop
from ..optim import Optimizer
from ..printing import NumbaPrinter
from ..schedules import Schedule
from .kernels import PARALLEL_MIN_ROWS, STRIPES
from .model import TensorCost

__all__ = ["LoopGenerator", "generate_source", "takes"]


def takes(opt: Optimizer, minibatch: bool) -> bool:
    """Whether this generator writes the loop of ``opt`` (the rest: calcml.tensor.optimize).

    First-order methods, full batch or minibatch. Not L-BFGS (measured, benchmarks/RESULTS.md):
    its compiled line search ran the digits softmax warm at tol 1e-6 in 0.62x the time of NumPy
    steps around the kernels, but its first fit took 27 s against 3.5 s (chained Rosenbrock,
    1,000 parameters: 16 s against 1.3 s). The loop's Python tier runs its elementwise helpers
    over hundreds of parameters as Python, tens of ms an iteration, and then its compile adds
    about 10 s (the loop with the kernels inlined), where the NumPy steps need only the kernels."""
    return opt.kind == "first_order"


# A tensor module's data as its loops read them (cols): the kernels' stripes, the rows' scale,
# the arrays (also the minibatch modules', calcml.tensor.optimize).
STRIPES_SOURCE = '''
def stripes(n):
    """[(first row, end row)] of at most STRIPES stripes of whole blocks (the kernels' partition)"""
    nblocks = -(-n // BLOCK)
    s = max(1, min(STRIPES, nblocks))
    return np.array([((k * nblocks // s) * BLOCK, min(n, ((k + 1) * nblocks // s) * BLOCK)) for k in range(s)],
                    dtype=np.int64).reshape(-1, 2)


def columns(arrays, n_rows, reduce_mean):
    """The tuple the loop reads: stripe bounds, the rows' scale, the data arrays"""
    if not arrays:
        return (np.zeros((1, 2), dtype=np.int64), 1.0) + DUMMY_DATA
    return (stripes(n_rows), 1.0 / n_rows if reduce_mean else 1.0) + tuple(arrays)
'''

_COLUMNS = '''

# -- the data as the loop reads them ---------------------------------------------------------------''' + STRIPES_SOURCE + '''

def columns_of(data):
    """The data as the loop reads them (columns): from a dict {name: array} (checked, see
    data_arrays), or the tuple of the arrays in DATA_NAMES order, already checked (calcml's), or
    what this function made already (its second item the rows' scale, a float: drive's own)."""
    if isinstance(data, tuple) and len(data) > 1 and isinstance(data[1], float):
        return data
    if isinstance(data, dict) or data is None:
        arrays, n_rows = data_arrays(data)
    else:
        arrays = tuple(data)
        n_rows = arrays[0].shape[0] if arrays else 0
    return columns(arrays, n_rows, REDUCE_MEAN)


def rows_of(cols):
    """The data's row count."""
    return cols[2].shape[0]
'''


class LoopGenerator(_loop._Generator):
    """calcml.loop's generator for a tensor cost: the gradient from its kernels."""

    def __init__(self, cost: TensorCost, opt: Optimizer, schedule: Schedule | None, minibatch: bool):
        if not takes(opt, minibatch):  # pragma: no cover - the caller asks takes() first
            raise AssertionError(f"{opt.name} over minibatches={minibatch} is not written here")
        self.cost, self.opt, self.schedule, self.minibatch = cost, opt, schedule, minibatch
        self.first_order = opt.kind == "first_order"
        self.mb = None
        self.printer = NumbaPrinter({})
        self.inline_rows = False
        self.n = cost.n_params
        self.has_data = cost.has_data
        self.unrolled = self.delayed = False
        self.array_forms = True  # the Python tier's NumPy forms of the loops over the parameters
        # passes over all rows (each full-batch step; a minibatch run's tol at each epoch's end)
        # on calcml's threads over large data
        self.threaded = self.has_data
        self.hyper = list(opt.hyper)
        self.state = [s[0] for s in opt.state]
        self.param_names = list(cost.param_names)
        self.column_names = list(cost.data_names)
        self.parallel_min_rows = PARALLEL_MIN_ROWS
        self.sizes = None

    # -- the gradient's source: the kernels ------------------------------------------------------
    def _data_args(self) -> str:
        n = len(self.cost.data_names)
        return ", ".join(f"cols[{2 + k}]" for k in range(n))

    def _full_batch_functions(self, vg, val, hess) -> list:
        """_fg_rows: the full cost at theta, its gradient into g, by the kernels over every
        stripe of rows (the stripes' sums added in stripe order: the same bits as the kernels),
        in the caller's scratch arrays; _fg: the same in arrays of its own, or over data the
        pass calcml made on its threads when there is one (_Passes). What calls them: the
        driver (a Ctrl-C's report), the Python tier (the passes run_segment prints, see
        _full_pass, call _fg there), an exported module's user; run_segment's own compile
        does not (_full_pass)."""
        threaded = self.threaded
        over_rows = [
            ir.Assign("bounds", "cols[0]"),
            ir.For("k", ir.range_("bounds.shape[0]"), [
                ir.For("q", ir.range_("acc.shape[0]"), [ir.Assign("acc[q]", "0.0")]),
                ir.Stmt(f"vg_rows(theta, v, {self._data_args()}, bounds[k, 0], bounds[k, 1], cols[1], acc)"),
                ir.For("q", ir.range_("acc.shape[0]"), [ir.Assign("total[q]", "acc[q] if k == 0 else total[q] + acc[q]")]),
            ]),
        ] if self.has_data else [ir.For("q", ir.range_("total.shape[0]"), [ir.Assign("total[q]", "0.0")])]
        rows = [
            ir.Assign("v", "total[:0]", "no direction (a view: no allocation)"),
            over_rows,
            ir.Stmt("vg_finish(theta, v, total, res)"),
            ir.For("i", ir.range_("N_PARAMS"), [ir.Assign("g[i]", "res[i + 1]")]),
            ir.Return("res[0]"),
        ]
        own = [ir.Return("_fg_rows(theta, cols, g, " + self._scratch_made() + ")")]
        return [
            ir.Def("_fg_rows", ("theta", "cols", "g", "acc", "total", "res"), rows, decorators=("_jit_inline",),
                   doc="the full cost at theta; its gradient is written into g (the kernels, stripe by stripe).\n"
                       "acc, total (ACC_VG entries), res (N_PARAMS + 1): scratch"),
            ir.Blank(2),
            [ir.Raw(_loop._THREADED_PASS_SOURCE.strip("\n")), ir.Blank(2)] if threaded else None,
            ir.Def("_fg_serial" if threaded else "_fg", ("theta", "cols", "g") if threaded else
                   ("theta", "cols", "g", "passes=0"), own, decorators=("_jit_inline" if threaded else "_jit",),
                   doc="the full cost at theta; its gradient is written into g (_fg_rows in arrays of its own)"),
            ir.Blank(2),
        ]

    @staticmethod
    def _scratch_made(prefix: str = "") -> str:
        return "np.zeros(max(ACC_VG, 1)), np.zeros(max(ACC_VG, 1)), np.empty(N_PARAMS + 1)" if not prefix else \
            f"{prefix}acc, {prefix}total, {prefix}res"

    def _pass_scratch(self) -> list:
        return [ir.Assign("s_acc, s_total, s_res", self._scratch_made(),
                          "the kernels' sums and results (scratch), for every pass and step"),
                ir.Assign("v", "s_total[:0]", "no direction (a view: no allocation)")]

    def _segment_scratch(self) -> list:
        return [self._batch_buffers("batch")] if self.minibatch else []

    # -- run_segment's full passes: printed where they run ------------------------------------------
    # Each full pass over the rows (the run's first, a full-batch step, a minibatch run's tol at an
    # epoch's end, the report's) is printed into run_segment, not a call of _fg: _fg is a function
    # of its own whose compile links the kernels and optimizes them again (Numba's final module),
    # 0.5 s of the digits' loop, and inlined by Numba each of its calls costs as much.
    def _full_pass(self, x: str, g: str, out: str | None, comment: str | None = None) -> list:
        """``out`` := the cost at ``x`` over the stripes cols[0] of the rows, scaled by cols[1]
        (all rows, the run's scale: the full cost), its gradient written into ``g``: _fg's pass."""
        out = out or "full_value"
        if self.has_data:
            over_rows = [ir.For("k", ir.range_("cols[0].shape[0]"), [
                ir.For("q", ir.range_("s_acc.shape[0]"), [ir.Assign("s_acc[q]", "0.0")]),
                ir.Stmt(f"vg_rows({x}, v, {self._data_args()}, cols[0][k, 0], cols[0][k, 1], cols[1], s_acc)"),
                ir.For("q", ir.range_("s_acc.shape[0]"),
                       [ir.Assign("s_total[q]", "s_acc[q] if k == 0 else s_total[q] + s_acc[q]")]),
            ])]
        else:
            over_rows = [ir.For("q", ir.range_("s_total.shape[0]"), [ir.Assign("s_total[q]", "0.0")])]
        serial = [
            over_rows,
            ir.Stmt(f"vg_finish({x}, v, s_total, s_res)"),
            ir.For("i", ir.range_("N_PARAMS"), [ir.Assign(f"{g}[i]", "s_res[i + 1]")]),
            ir.Assign(out, "s_res[0]"),
        ]
        if self.threaded:
            serial = [ir.If("passes != 0 and _pass_at(passes, P_FG) != 0",
                            [ir.Assign(out, f"_call_pass(passes, P_FG, {x}, {g})")], serial,
                            comment="the pass calcml made (its threads)")]
        return [ir.If("_PYTHON_TIER", [ir.Assign(out, f"_fg({x}, cols, {g}, passes)")], serial,
                      comment=f"{out}: the cost at {x}, its gradient into {g} (_fg's pass; the tier calls _fg)"
                      + (f"; {comment}" if comment else ""))]

    def _first_call(self) -> list:
        """The run's first call evaluates the cost at x0 (_begin). A call with ints[I_EVALUATE] set
        takes no step: it writes the cost at xout over the stripes of ``cols`` (scaled by
        cols[1]) into floats[F_FUN] and its gradient into gout, by the same printed pass. calcml
        so reads the rows' gradients of the noise test after a run (_NativeSegment.row_gradients:
        a call a row, over its one-row stripe, about 3 us), where _fg would load Numba's cache
        of the module in a process that loaded the loop's machine code (0.1 s of a 0.2 s warm
        fit), or compile it. (A mode that loops over the rows in one call, its own printed pass,
        compiled 0.15-0.3 s longer.)"""
        first = [
            self._full_pass("xout", "at" if self.has_data else "g", "f0"),
            ir.If("evaluating", [ir.Assign("floats[F_FUN]", "f0"), ir.Return("status")]) if self.has_data else None,
            ir.If("not _begin(xout, f0, theta, best, g, ints, floats)", [ir.Assign("status", "DIVERGED")],
                  comment="not finite at x0: no step (stop_step), the report"),
        ]
        if not self.has_data:
            return [ir.If("ints[I_BEGUN] == 0", first, comment="the cost at x0 (the run's first call)")]
        return [ir.If("ints[I_EVALUATE] != 0 or ints[I_BEGUN] == 0", [
            ir.Assign("evaluating", "ints[I_EVALUATE] != 0"),
            ir.Assign("at", "gout if evaluating else g"),
            first,
        ], comment="the cost at xout: calcml's evaluation (no step; see _NativeSegment.row_gradients), or x0's")]

    def _report(self) -> list:
        """_end's statements, printed here, its passes too."""
        return [ir.Comment("_end's report, printed here (its passes too)"), self._end_statements(self._full_pass)]

    def _batch_buffers(self, batch: str) -> list:
        """The minibatch's rows, gathered (b0, b1, ...: one array per datum, ``batch`` rows)."""
        out = []
        for k, t in enumerate(self.cost._din):
            shape = ", ".join([batch, *(str(m) for m in t.shape)])
            dtype = "np.int64" if t.role == "label" else "np.float64"
            out.append(ir.Assign(f"b{k}", f"np.empty(({shape},), dtype={dtype})",
                                 f"minibatch rows of {self.cost.data_names[k]}" if k == 0 else None))
        return out

    def _gather(self) -> list:
        """The minibatch's rows perm[pos:stop] copied into the buffers b0, b1, ..., element by
        element (a row assigned as an array compiles Numba's broadcasting and its error message,
        str of shapes: 2.6 s of a 5 s first fit, measured)."""
        out = []
        for k, name in enumerate(self.cost.data_names):
            shape = self.cost.data_shapes[name]
            idx = "".join(f", e{a}" for a in range(len(shape)))
            copy = ir.Assign(f"b{k}[i{idx}]", f"cols[{2 + k}][r{idx}]")
            for a in reversed(range(len(shape))):
                copy = ir.For(f"e{a}", ir.range_(str(shape[a])), [copy])
            out.append(copy)
        return [ir.For("i", ir.range_("nb"), [ir.Assign("r", "perm[pos + i]"), out])]

    def _minibatch_gradient(self) -> list:
        """value, g and a0 (the minibatch's cost weighted by its rows: an epoch's sum of them over
        its rows is its mean minibatch cost) for the rows perm[pos:stop], by the kernels over the
        gathered rows, scaled to a mean over the minibatch (reduce="sum": to the whole data's
        sum)."""
        bufs = ", ".join(f"b{k}" for k in range(len(self.cost.data_names)))
        mean = self.cost.reduce == "mean"
        bufs_tier = [ir.Assign(f"b{k}[:nb]", f"cols[{2 + k}][perm[pos:stop]]") for k in range(len(self.cost.data_names))]
        return [
            ir.Assign("nb", "stop - pos"),
            ir.If("_PYTHON_TIER", [bufs_tier, ir.Assign("s_acc[:]", "0.0")],
                  [self._gather(), ir.For("q", ir.range_("s_acc.shape[0]"), [ir.Assign("s_acc[q]", "0.0")])],
                  comment="the Python tier: NumPy's copies"),
            # nb - nb, not a literal 0: the signature of the full pass's calls (one compile)
            ir.Stmt(f"vg_rows(theta, v, {bufs}, nb - nb, nb, {'1.0 / nb' if mean else 'n_rows / nb'}, s_acc)"),
            ir.Stmt("vg_finish(theta, v, s_acc, s_res)"),
            ir.Assign("value", "s_res[0]"),
            ir.If("_PYTHON_TIER", [ir.Assign("g[:]", "s_res[1:]")],
                  [ir.For("i", ir.range_("N_PARAMS"), [ir.Assign("g[i]", "s_res[i + 1]")])]),
            ir.Assign("a0", "value * nb"),
        ]

    # _begin goes into run_segment_c's compile, and _end's statements are printed there (_report):
    # each function compiled on its own links the kernels it calls and optimizes them again
    # (Numba's final module), and the kernels are most of the loop's code (W10's first fit: 4.0 s
    # of compile against 4.8 s). _end itself is the driver's (a Ctrl-C's report).
    _begin_end_decorator = "_jit_inline"

    def _finite_test(self) -> str:
        """A minibatch step tests its cost alone: the gradient's norm over thousands of parameters
        is a chain of dependent additions (W10: 5% of an epoch), and a non-finite gradient makes
        the next step's cost non-finite (the best point is an epoch's end: nothing is lost)."""
        return "abs(value) <= blowup" if self.minibatch else super()._finite_test()

    @staticmethod
    def _epoch_value() -> str:
        return "epoch_sum / n_rows"

    @staticmethod
    def _partial_epoch_value() -> str:
        return "f[F_EPOCH_SUM] / i[I_POS]"

    @staticmethod
    def _segment_data_loads(vg) -> list:
        return [ir.Assign("n_rows", "cols[2].shape[0]")]

    @staticmethod
    def _rows_of(cols: str) -> str:
        return f"{cols}[2].shape[0]"

    def _gradient(self, vg, late=None) -> list:
        if self.minibatch:  # (no norm: a minibatch's is not tested, see _finite_test)
            return [ir.Comment("the exact gradient over the minibatch: the cost's kernels over its gathered rows"),
                    self._minibatch_gradient()]
        return [ir.Comment("the exact gradient: the cost's kernels over every row (over large data, on calcml's threads)"),
                self._full_pass("theta", "g", "value"),
                self._norm2("gn2")]

    # -- the C entry: cols as the arrays' objects --------------------------------------------------
    def _cols_params(self) -> list:
        data = [(f"d{k}_o", "types.int64") for k in range(max(1, len(self.cost.data_names)))]
        return [("bounds_o", "types.int64"), ("n_stripes", "types.int64"), ("scale", "types.float64"), *data,
                ("n_rows", "types.int64")]

    def _column_arrays(self) -> str:
        arrays = ["carray(_data(off, bounds_o), (n_stripes, 2), np.int64)", "scale"]
        if not self.has_data:
            arrays.append("carray(_data(off, d0_o), (1,), np.float64)")  # DUMMY_DATA
        for k, t in enumerate(self.cost._din):
            shape = ", ".join(["n_rows", *(str(m) for m in t.shape)])
            arrays.append(f"carray(_data(off, d{k}_o), ({shape},), {'np.int64' if t.role == 'label' else 'np.float64'})")
        return f"({', '.join(arrays)})"

    def _cols_c(self) -> list:
        """cols_c: run_segment_c's arguments for cols (the arrays' objects: see _data)."""
        n = max(1, len(self.cost.data_names))
        items = ["id(cols[0])", "cols[0].shape[0]", "cols[1]", *(f"id(cols[{2 + k}])" for k in range(n)),
                 "cols[2].shape[0]"]
        return [ir.Def("cols_c", ("cols",), [ir.Return(f"[{', '.join(items)}]")],
                       doc="The C entries' arguments that carry cols (the arrays' objects, their sizes; see _data)"),
                ir.Blank(2)]

    # -- the module --------------------------------------------------------------------------------
    @staticmethod
    def _x0_code() -> str:
        return "_flat_x0(x0)"

    def _driver_head(self) -> str:
        from .optimize import _DATA_ARRAYS

        return _loop._DRIVER_SHARED + _COLUMNS + _DATA_ARRAYS + _loop._PLAN

    def _kinds(self) -> tuple:
        return ("value", "vg")

    def _entry_point(self) -> list:
        return super()._entry_point() + self._cols_c()

    def _module_body(self, vg, val, hess) -> list:
        return super()._module_body(vg, val, hess) + (self._chunk_epoch() if self.minibatch else [])

    def _chunk_epoch(self) -> list:
        """_epoch: one epoch of minibatches over one chunk of rows in the order ``perm`` (given,
        not shuffled here), the steps of run_segment's (its gather, kernels and update rule, the
        same statements), without its bookkeeping: what calcml runs where each chunk of Dask data
        is (calcml.dask_data.run_chunk), the history, best point and tolerance kept by its driver
        on the client."""
        state = [f"st_{s}" for s in self.state]
        body = [
            ir.Assign("n_rows", "rows", "the whole data's rows (reduce=\"sum\" scales a minibatch to them)"),
            ir.Assign(", ".join(state) + ",", "state") if state else None,
            [ir.Assign(f"hp_{name}", f"hyper[{k}]", name) for k, name in enumerate(self.hyper)],
            ir.Assign("lr", self._rate(), f"schedule {self.schedule.structure()}: the same every step")
            if self._constant_rate() else None,
            self._pass_scratch(),
            self._segment_scratch(),
            ir.Assign("n", "perm.shape[0]"),
            ir.Assign("count", 0),
            ir.Assign("epoch_sum", "0.0"),
            ir.For("pos", ir.range_(0, "n", "batch"), [
                ir.If("count >= max_steps", [ir.Break()]),
                ir.Assign("stop", "min(pos + batch, n)"),
                ir.Assign("step", "step0 + count"),
                self._gradient(None),
                ir.If(f"not ({self._finite_test()})", [ir.Return("DIVERGED, count, epoch_sum")],
                      comment="non-finite or blown up: stop at once"),
                self._update(),
                ir.AugAssign("epoch_sum", "+", "a0"),
                ir.AugAssign("count", "+", 1),
            ]),
            ir.Return("RUNNING, count, epoch_sum"),
        ]
        return [
            ir.Def("_epoch", ("theta", "g", "perm", "batch", "step0", "max_steps", "hyper", "sa", "cols", "rows",
                              "blowup", "state"), body, decorators=("_jit",),
                   doc="One epoch of minibatches over the rows of cols in the order perm (at most max_steps updates,\n"
                       "from update step0; rows: the whole data's row count). theta, g and the optimizer's state\n"
                       "are updated in place. Returns (status, updates, epoch_sum: the minibatch costs' sum, each\n"
                       "weighted by its rows)"),
        ]

    def source(self, header_lines=()) -> str:
        vg = SimpleNamespace(param_loads=None)  # the gradient comes from the kernels: no rows to load
        body = self._module_body(vg, None, None)
        text = ir.render(body, self.printer)  # printed first: the kernels' module adds the helpers it used
        base, self.sizes = self.cost.module_source(self._kinds(), helpers=self.printer.helpers_used)
        head = [
            ir.Comment(f"-- the {self.opt.name} descent loop (calcml.loop's generator; its gradient by the kernels "
                       f"above) --"),
            ir.Assign("_PYTHON_TIER", 'bool(globals().get("_PYTHON_TIER"))',
                      "calcml's Python tier: the loop run as Python, its kernels machine code (calcml.loop)"),
            ir.Assign("_jit", f"numba.njit({_loop._NJIT_FLAGS}) if not _PYTHON_TIER else (lambda f: f)",
                      "the loop's functions (the kernels above keep their own)"),
        ]
        return (base + "\n\n" + ir.render([head, self._constants()]) + "\n" + text + "\n"
                + self._python_driver())

    def _constants(self) -> list:
        from .optimize import _layout

        cost = self.cost
        return super()._constants() + [
            ir.Assign("ACC_VG", self.sizes["vg"], "the value-and-gradient kernel's sums"),
            ir.Assign("N_UPDATE", len(self.opt.update), "the update rule's statements (each parameter's)"),
            ir.Assign("REDUCE_MEAN", cost.reduce == "mean"),
            ir.Assign("EVALUATES", self.has_data, "run_segment takes ints[I_EVALUATE]: calcml's evaluation, no step"),
            ir.Assign("STRIPES", STRIPES),
            ir.Assign("DATA_NAMES", repr(cost.data_names)),
            ir.Assign("PARAM_SHAPES", repr(tuple(cost.param_shapes.values()))),
            ir.Assign("DATA_LAYOUT", repr(_layout(cost))),
            ir.Assign("DUMMY_DATA", "(np.zeros(1),)"),
            ir.Blank(2),
        ]


def generate_source(cost: TensorCost, opt: Optimizer, schedule: Schedule | None, minibatch: bool) -> str:
    """The full text of a tensor cost's optimizer module written by the loop generator."""
    return LoopGenerator(cost, opt, schedule, minibatch).source()
