"""``TensorCost``: a cost stated in index notation, its exact derivatives in index form, and
the source of its kernels.

``cm.Cost`` returns a ``TensorCost`` when a parameter or a data item is a tensor
(``cm.params("W", shape=...)``, ``cm.data("x", shape=...)``, ``cm.data("c", classes=K)``), or
the expression holds index notation. Nothing is ever expanded into scalar symbols: the
statement, the derivatives, the generated loops and the build time are the same size for a
784-pixel image as for a 4-pixel one.
"""

from __future__ import annotations

import hashlib
from functools import cached_property

import numpy as np
import sympy as sp

from .. import ir
from ..codegen import NUMBA_FLAGS, cache_statements, njit_flags
from ..printing import HELPERS
from ..cost import Cost
from ..dataset import by_name, real_array
from ..errors import CostError, ParamError
from .codegen import BLAS_SOURCE, HVP_BLOCK_VALUES, LANES, KernelSpec, block_rows, write_kernel
from .graph import ROW, SCALE, Graph, Lowering, Tensor, entries_as_sums
from .statement import Label, LogSumExp, _items, axis_range, is_tensor_statement  # noqa: F401

__all__ = ["TensorCost", "is_tensor_statement"]


class _step:
    """Turns an unexpected failure inside a symbolic step into a CostError naming the step."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (CostError, KeyboardInterrupt)):
            return False
        raise CostError(f"{self.what} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                        "(please report this cost to calcml)") from exc


def _check_item(item, role: str):
    if isinstance(item, str):
        raise CostError(f"{role} must be SymPy objects (from cm.{role}), got the string {item!r}; "
                        "calcml never parses strings here")
    if isinstance(item, sp.IndexedBase):
        if item.shape is None:
            raise CostError(f"{role} tensor {item.label} has no shape; make it with cm.{role}({str(item.label)!r}, shape=(...))")
        return item
    if isinstance(item, Label):
        if role == "params":
            raise CostError(f"class label {item.name!r} is data, not a parameter")
        return item
    if isinstance(item, sp.Symbol):
        if item.is_real is not True:
            if item.is_real is False:
                raise CostError(f"{role} symbol {item.name!r} is declared non-real; calcml costs are real-valued")
            raise CostError(f"{role} symbol {item.name!r} must be real: make it with cm.{role}({item.name!r})")
        return item
    raise CostError(f"{role} must hold SymPy symbols or tensors, got {item!r} of type {type(item).__name__}")


def _name(item) -> str:
    return str(item.label) if isinstance(item, sp.IndexedBase) else item.name


def _size(item) -> int:
    if isinstance(item, sp.IndexedBase):
        return int(np.prod([int(n) for n in item.shape]))
    return 1


# what _build_graph sets: made on first use (TensorCost.__getattr__)
_GRAPH_ATTRS = ("_graph", "_pin", "_din", "_f", "_pen", "_v", "_value")


class TensorCost(Cost):
    """A :class:`calcml.Cost` stated in index notation (see the module docstring).

    ``cm.Cost(...)`` makes one by itself when the statement holds tensors or indices."""

    def __init__(self, expr, params, data=None, reduce: str = "mean", penalty=None):
        if reduce not in ("mean", "sum"):
            raise CostError(f"reduce must be one of ('mean', 'sum'), got {reduce!r}")
        plist = [_check_item(p, "params") for p in _items(params)]
        dlist = [_check_item(d, "data") for d in _items(data)]
        if not plist:
            raise CostError("a cost needs at least one parameter; params is empty")
        seen: dict = {}
        for role, items in (("params", plist), ("data", dlist)):
            for it in items:
                name = _name(it)
                if name in seen:
                    raise CostError(f"{role} lists {name!r} twice" if seen[name] == role
                                    else f"{name!r} is listed both as a parameter and as data")
                seen[name] = role
        if isinstance(expr, str) or (penalty is not None and isinstance(penalty, str)):
            raise CostError("the cost expression is a string; build it from SymPy objects. calcml never evaluates strings")
        try:
            e = sp.sympify(expr, strict=True)
            pen = None if penalty is None else sp.sympify(penalty, strict=True)
        except (sp.SympifyError, TypeError):
            raise CostError(f"the cost expression must be a SymPy expression, got {type(expr).__name__}") from None
        self._expr, self._penalty = entries_as_sums(e), None if pen is None else entries_as_sums(pen)
        self._params, self._data, self._reduce = tuple(plist), tuple(dlist), reduce
        # the statement's checks now (a bad statement fails here, naming the problem); the
        # graph that derivations and code read, stabilized, when first needed: a process
        # served from the kernel cache never needs it (nor the rewrite's imports)
        self._build_graph(stabilize=False)
        for name in _GRAPH_ATTRS:
            del self.__dict__[name]

    def __getattr__(self, name):  # only for attributes not set: the graph's, built on first use
        if name in _GRAPH_ATTRS and "_params" in self.__dict__:
            self._build_graph()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- the graph --------------------------------------------------------------------------
    def _build_graph(self, stabilize: bool = True):
        g = self._graph = Graph()
        self._pin = [g.add_input(p, "param") for p in self._params]
        self._din = [g.add_input(d, "label" if isinstance(d, Label) else "data") for d in self._data]
        known = {t.placeholder: t for t in self._pin + self._din}
        low = Lowering(g, known, stabilize)
        fbody = low.stable(low.lower(self._expr))
        left = g.free_indices(fbody)
        if left:
            names = ", ".join(str(i) for i in left)
            raise CostError(f"index {names} is left free in the per-row cost; a cost is one number per row: "
                            f"sum over it (cm.sum(..., {left[0]})) or use it inside cm.logsumexp")
        self._f = g.derived("map", fbody, (), note="the per-row cost")
        self._pen = None
        if self._penalty is not None:
            data_atoms = {d for d in self._data}
            used = sorted({_name(a.base if isinstance(a, sp.Indexed) else a)
                           for a in self._penalty.atoms(sp.Indexed, sp.Symbol)
                           if (a.base if isinstance(a, sp.Indexed) else a) in data_atoms})
            if used:
                raise CostError(f"the penalty uses data {used[0]!r}; a penalty is a function of the parameters "
                                "only (it is added once, not per row)")
            pbody = low.stable(low.lower(self._penalty))
            left = g.free_indices(pbody)
            if left:
                raise CostError(f"index {', '.join(map(str, left))} is left free in the penalty; sum over it")
            self._pen = g.derived("map", pbody, (), note="the penalty")
        if self._f.row:
            self._v = g.derived("sum", SCALE * self._f.ref(), (), (ROW,), row=False,
                                note="the per-row cost summed over rows (times 1/N for a mean)")
        elif self._data:
            # a per-row cost that reads no data: the same value on every row
            self._v = g.derived("sum", SCALE * self._f.ref(), (), (ROW,), row=False, note="the cost over rows")
        else:
            self._v = self._f
        total = self._v.ref() + (self._pen.ref() if self._pen is not None else 0)
        self._value = g.derived("map", total, (), note="the cost")

    @property
    def has_data(self) -> bool:
        return bool(self._data)

    @cached_property
    def _grads(self) -> list:
        """Adjoint expressions of each parameter input (reduced, seeded for kernels)."""
        with _step("the reverse-mode derivation of the gradient"):
            return self._derive_grads()

    def _derive_grads(self) -> list:
        g = self._graph
        roots = [(self._v, 1)] + ([(self._pen, 1)] if self._pen is not None else [])
        adj = g.reverse(roots, self._pin)
        return [self._materialize(adj[p], p.free, f"gradient of {p.name}") for p in self._pin]

    def _materialize(self, expr, free, note):
        if expr == 0:
            return None
        g = self._graph
        t = g.tensor_of(expr) if isinstance(expr, (sp.Indexed, sp.Symbol)) else None
        if t is not None and tuple(getattr(expr, "indices", ())) == t.free:
            return t
        return g.derived("map", expr, free, note=note, prefix="g")

    @cached_property
    def _hvps(self) -> list:
        with _step("the forward-over-reverse derivation of Hessian-vector products"):
            return self._derive_hvps()

    def _derive_hvps(self) -> list:
        g = self._graph
        self._vin = [g.add_input(sp.IndexedBase(f"v_{p.name}", shape=p.shape) if p.free else sp.Symbol(f"v_{p.name}"),
                                 "direction") for p in self._pin]
        for p, v in zip(self._pin, self._vin):
            v.free = p.free
            v.name = p.name
        grads = [t.ref() if t is not None else sp.S.Zero for t in self._grads]
        tans = g.tangents(grads, dict(zip(self._pin, self._vin)))
        return [self._materialize(e, p.free, f"Hessian-vector product, {p.name}") for e, p in zip(tans, self._pin)]

    # -- the statement ----------------------------------------------------------------------
    @property
    def penalty(self):
        return self._penalty

    @property
    def block(self) -> int:
        """Rows per block of the kernels (fixed by the statement: the same bits on every call)."""
        return block_rows(sum(_size(d) for d in self._data))

    @property
    def hvp_block(self) -> int:
        """Rows per block of the Hessian-vector product's kernels (their own module)."""
        return block_rows(sum(_size(d) for d in self._data), HVP_BLOCK_VALUES)

    @property
    def n_params(self) -> int:
        return sum(_size(p) for p in self._params)

    @property
    def param_shapes(self) -> dict:
        return {_name(p): tuple(int(n) for n in p.shape) if isinstance(p, sp.IndexedBase) else () for p in self._params}

    @property
    def data_shapes(self) -> dict:
        return {_name(d): tuple(int(n) for n in d.shape) if isinstance(d, sp.IndexedBase) else () for d in self._data}

    @property
    def param_names(self) -> tuple:
        return tuple(_name(p) for p in self._params)

    @property
    def data_names(self) -> tuple:
        return tuple(_name(d) for d in self._data)

    def pack(self, values: dict) -> np.ndarray:
        """A dict ``{name: array}`` (each of its parameter's shape) -> the flat ``theta``."""
        if not isinstance(values, dict):
            raise ParamError(f"pack takes a dict {{name: array}}, got {type(values).__name__}")
        values = by_name(values)
        names = self.param_names
        unknown = [k for k in values if k not in names]
        if unknown:
            raise ParamError(f"{', '.join(map(repr, unknown))} not a parameter of this cost; its parameters are {list(names)}")
        missing = [k for k in names if k not in values]
        if missing:
            raise ParamError(f"missing parameter{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
        parts = []
        for name, shape in self.param_shapes.items():
            a = real_array(values[name], f"parameter {name!r}", ParamError)
            if a.shape != shape:
                raise ParamError(f"parameter {name!r} has shape {shape}, got an array of shape {a.shape}")
            parts.append(a.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0)

    def unpack(self, theta) -> dict:
        """The flat ``theta`` -> ``{name: array of its shape}`` (a float for a scalar parameter)."""
        t = np.asarray(theta, dtype=np.float64)
        if t.shape != (self.n_params,):
            raise ParamError(f"theta must have shape ({self.n_params},) for this cost, got {t.shape}")
        out, o = {}, 0
        for name, shape in self.param_shapes.items():
            n = int(np.prod(shape)) if shape else 1
            out[name] = t[o:o + n].reshape(shape).copy() if shape else float(t[o])
            o += n
        return out

    def flat_names(self) -> list:
        """One name per entry of ``theta``: ``W[0, 3]``, ``b[2]``, ``s``."""
        out = []
        for name, shape in self.param_shapes.items():
            if not shape:
                out.append(name)
            else:
                out.extend(f"{name}[{', '.join(map(str, ix))}]" for ix in np.ndindex(*shape))
        return out

    # -- derivatives in index form ----------------------------------------------------------
    @cached_property
    def _display_graph(self):
        """A separate graph for the per-row derivatives shown to people (seed 1, no row sums)."""
        g = Graph()
        pin = [g.add_input(p, "param") for p in self._params]
        din = [g.add_input(d, "label" if isinstance(d, Label) else "data") for d in self._data]
        low = Lowering(g, {t.placeholder: t for t in pin + din})
        f = g.derived("map", low.lower(self._expr), ())
        adj = g.reverse([(f, 1)], pin, per_row=True)
        return g, pin, adj

    def _inline(self, g: Graph, e):
        """A body expression with every derived tensor replaced by its index notation."""
        subs = {}
        for t, idx, ref in g.occurrences(e):
            if t.kind == "input":
                continue
            subs[ref] = self._definition(g, t, idx)
        return e.xreplace(subs) if subs else e

    def _definition(self, g: Graph, t: Tensor, idx):
        src = getattr(t, "source", None)
        mapping = dict(zip(t.free, idx))
        if src is None:
            src = self._inline(g, t.body)
            if t.kind == "sum":
                src = sp.Sum(src, *[(i, i.lower, i.upper) for i in t.over if i != ROW])
            elif t.kind == "lse":
                src = LogSumExp(src, t.over[0]) if len(t.over) == 1 else sp.log(
                    sp.Sum(sp.exp(src), *[(i, i.lower, i.upper) for i in t.over]))
        if not mapping:
            return src
        # a summed index named like one being substituted, or read in what is substituted (t -> m - l),
        # is primed first (j -> j')
        put = {j for v in mapping.values() if isinstance(v, sp.Basic) for j in v.atoms(sp.Idx)}
        return self._rename_bound(src, set(mapping) | put).xreplace(mapping)

    @staticmethod
    def _rename_bound(e, free):
        """Sums and log-sum-exps whose summed index is also a free index of the derivative get
        that index primed (j -> j'), so that substituting the free one touches only it."""
        if not isinstance(e, sp.Basic) or not e.args:
            return e
        args = [TensorCost._rename_bound(a, free) for a in e.args]
        e = e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e
        if isinstance(e, sp.Sum):
            body, limits = e.function, []
            for lim in e.limits:
                i = lim[0]
                if i in free:
                    new = sp.Idx(f"{i.label}'", (i.lower, i.upper))
                    body = body.xreplace({i: new})
                    lim = (new, lim[1], lim[2])
                limits.append(lim)
            return sp.Sum(body, *limits)
        if isinstance(e, LogSumExp) and e.args[1] in free:
            i = e.args[1]
            new = sp.Idx(f"{i.label}'", (i.lower, i.upper))
            return LogSumExp(e.args[0].xreplace({i: new}), new)
        return e

    def diff(self, entry):
        """The exact per-row partial derivative of ``expr`` with respect to ``entry``
        (``W[k, j]`` with indices, or a scalar parameter), in index notation, never expanded.

        The penalty's derivative is :meth:`penalty_diff`."""
        g, pin, adj = self._display_graph
        base, idx = self._entry(entry)
        p = next(t for t in pin if t.placeholder == base)
        e = adj[p]
        e = self._inline(g, e.xreplace(dict(zip(p.free, idx))) if p.free else e)
        return self._rename_bound(e, set(idx))

    def penalty_diff(self, entry):
        """The derivative of the penalty with respect to ``entry`` (0 without a penalty)."""
        if self._penalty is None:
            return sp.S.Zero
        g = Graph()
        pin = [g.add_input(p, "param") for p in self._params]
        low = Lowering(g, {t.placeholder: t for t in pin})
        f = g.derived("map", low.lower(self._penalty), ())
        adj = g.reverse([(f, 1)], pin, per_row=True)
        base, idx = self._entry(entry)
        p = next(t for t in pin if t.placeholder == base)
        e = adj[p]
        return self._inline(g, e.xreplace(dict(zip(p.free, idx))) if p.free else e)

    def _entry(self, entry):
        if isinstance(entry, sp.Indexed):
            if entry.base not in self._params:
                raise CostError(f"{entry}: {entry.base.label} is not a parameter of this cost")
            if len(entry.indices) != len(entry.base.shape):
                raise CostError(f"{entry}: {entry.base.label} has shape {tuple(entry.base.shape)}")
            for a, (i, n) in enumerate(zip(entry.indices, entry.base.shape)):
                if i.is_number and not (i.is_Integer and 0 <= int(i) < int(n)):
                    raise CostError(f"{entry}: entry {i} is outside axis {a} of {entry.base.label}, which runs over "
                                    f"0 … {int(n) - 1}")
                if isinstance(i, sp.Idx) and i.upper is not None and int(i.upper) + 1 != int(n):
                    raise CostError(f"{entry}: index {i} runs over 0 … {i.upper} but axis {a} of {entry.base.label} "
                                    f"has length {int(n)}")
            return entry.base, tuple(entry.indices)
        if isinstance(entry, sp.Symbol) and entry in self._params:
            return entry, ()
        raise CostError(f"diff takes an entry of a parameter, W[k, j] or a scalar parameter; got {entry!r}")

    @cached_property
    def gradient(self) -> tuple:
        """Per parameter, the per-row derivative of ``expr`` at that parameter's generic entry,
        in index notation (indices ``<name>_0``, ``<name>_1``, ...)."""
        g, pin, adj = self._display_graph
        return tuple(self._inline(g, adj[p]) for p in pin)

    @property
    def hessian(self):
        raise CostError("a tensor cost has no expanded Hessian matrix: use the compiled kernels' "
                        "k.hvp(theta, v, data) (exact Hessian-vector products) or k.hessian(theta, data)")

    # -- identity ---------------------------------------------------------------------------
    @cached_property
    def key(self) -> str:
        h = hashlib.sha256()
        parts = [sp.srepr(self._expr), sp.srepr(self._penalty) if self._penalty is not None else "-", self._reduce]
        for p in self._params:
            parts.append(f"P:{sp.srepr(p)}")
        for d in self._data:
            parts.append(f"D:{sp.srepr(d)}:{getattr(d, 'classes', '')}")
        for part in parts:
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def __repr__(self):
        return self._tensor_repr()

    def _repr_latex_(self):
        return self._tensor_latex()

    def __eq__(self, other):
        return isinstance(other, TensorCost) and self.key == other.key

    def __hash__(self):
        return hash(self.key)

    def _tensor_repr(self):
        pen = f", penalty={self._penalty}" if self._penalty is not None else ""
        tail = f", data=[{', '.join(self.data_names)}], reduce={self._reduce!r}" if self._data else ""
        return f"Cost({self._expr}, params=[{', '.join(self.param_names)}]{tail}{pen})"

    def _tensor_latex(self):
        body = sp.latex(self._expr)
        lhs = "J(" + ", ".join(self.param_names) + ")"
        pen = f" + {sp.latex(self._penalty)}" if self._penalty is not None else ""
        if not self._data:
            return f"$\\displaystyle {lhs} = {body}{pen}$"
        red = "\\frac{1}{N}\\sum_{r=1}^{N}" if self._reduce == "mean" else "\\sum_{r=1}^{N}"
        return f"$\\displaystyle {lhs} = {red} \\left({body}\\right)_r{pen}$"

    # -- generated source -------------------------------------------------------------------
    def kernel_specs(self, kinds) -> list:
        specs = []
        n_sizes = [p.size for p in self._pin]
        for kind in kinds:
            if kind == "value":
                specs.append(KernelSpec("value", [("the cost", self._value, 1)]))
            elif kind == "vg":
                outs = [("the cost", self._value, 1)]
                outs += [(f"gradient of {p.name}", t if t is not None else sp.S.Zero, n)
                         for p, t, n in zip(self._pin, self._grads, n_sizes)]
                specs.append(KernelSpec("vg", outs))
            elif kind == "hvp":
                outs = [(f"Hessian-vector product, {p.name}", t if t is not None else sp.S.Zero, n)
                        for p, t, n in zip(self._pin, self._hvps, n_sizes)]
                specs.append(KernelSpec("hvp", outs))
        return specs

    def module_source(self, kinds=("value", "vg"), entry_points: bool = False, helpers=(),
                      numba_cache: bool | None = None) -> tuple:
        """(source text, {kind: accumulator size}) of the kernels' module; ``entry_points``:
        with each kernel's C entry point too (see :func:`_entry_points`); ``helpers``: the
        printer's helpers that code to be added after the kernels calls; ``numba_cache``:
        whether Numba caches the module's functions (default: where there are no entry points)."""
        if "hvp" in kinds:
            self._hvps  # noqa: B018 - makes the direction inputs
        directions = getattr(self, "_vin", [])
        body, helpers, sizes, blas, cached = [], set(helpers), {}, False, []
        for spec in self.kernel_specs(kinds):
            kernel, used, size, gemm, kept = write_kernel(self._graph, spec, self._pin, self._din, directions,
                                                          self.has_data)
            body.append(kernel)
            helpers |= used
            sizes[spec.kind] = size
            blas |= gemm
            cached += kept
        if entry_points:
            defs = {node.name: node for node in ir.flatten(body) if isinstance(node, ir.Def)}
            body.append(_entry_points(self, sizes, cached, defs))
        if numba_cache is None:
            numba_cache = not entry_points
        block = self.hvp_block if set(kinds) == {"hvp"} else self.block
        return _module_text(self, body, helpers, sizes, blas, numba_cache=numba_cache, block=block), sizes


def _entry(name: str, params: tuple, kernel, args: list) -> ir.Def:
    """A C entry point: the kernel ``kernel``'s statements on ``args``, made from the entry's
    ``params`` (printed again, not called: Numba's inline="always" copies a callee's IR, 0.2 s
    of W10's vg_rows_c; ir.inlined)."""
    return ir.Def(name, params, ir.inlined(kernel, args))


def _entry_points(cost, sizes, cached=(), defs=None) -> list:
    """Each kernel of ``sizes`` (value, vg; hvp) over raw pointers: ``<kind>_rows_c`` and
    ``<kind>_finish_c`` run the statements of ``<kind>_rows`` and ``<kind>_finish`` (``defs``:
    the kernels' functions by name) on arrays made from the
    pointers (``numba.carray``). calcml compiles them with ``numba.cfunc`` and keeps their
    machine code beside this file, so a later process runs them without starting Numba (see
    calcml.native): about 40 ms from loading to the first result, instead of about 0.2 s.
    ``cached``: the row tensors [(name, per-row shape)] that a Hessian-vector product keeps
    per point; then ``hvp_lin_rows_c`` and ``hvp_at_rows_c`` too, with one pointer each
    after ``acc`` (``n`` rows of that shape)."""
    data = [(f"d{k}_p", "_I64P" if t.role == "label" else "_F64P", ("n",) + tuple(str(m) for m in t.shape))
            for k, t in enumerate(cost._din)]
    rows_sig = ["_F64P", "_F64P", *(ptr for _, ptr, _ in data), "types.int64", "types.int64", "types.int64",
                "types.float64", "_F64P"]
    out = [
        ir.Blank(2),
        ir.Comment("-- C entry points (numba.cfunc): pointers in, the kernels above on arrays of them ---------"),
        ir.Raw("from numba import carray, types  # noqa: E402"),
        ir.Blank(),
        ir.Assign("_F64P", "types.CPointer(types.float64)"),
        ir.Assign("_I64P", "types.CPointer(types.int64)"),
        ir.Comment("rows: theta, v, the data arrays (n rows each), n, first row, end row, scale, acc"),
        ir.Assign("SIG_ROWS", f"types.void({', '.join(rows_sig)})"),
        ir.Comment("finish: theta, v, the stripes' sums, out"),
        ir.Assign("SIG_FINISH", "types.void(_F64P, _F64P, _F64P, _F64P)"),
    ]
    if cached:
        out += [ir.Comment("a point's kept row tensors (hvp_lin_rows, hvp_at_rows): the rows' arguments, then "
                           "one array each"),
                ir.Assign("SIG_ROWS_KEPT", f"types.void({', '.join(rows_sig + ['_F64P'] * len(cached))})")]
    for kind, size in sizes.items():
        acc = max(size, 1)
        nout = {"value": "1", "hvp": "N_PARAMS"}.get(kind, str(1 + cost.n_params))
        nv = "N_PARAMS" if kind == "hvp" else "0"  # the direction v, for a Hessian-vector product
        head = ["carray(theta_p, (N_PARAMS,))", f"carray(v_p, ({nv},))"]
        rows_params = ("theta_p", "v_p", *(name for name, _, _ in data), "n", "r0", "r1", "scale", "acc_p")
        rows_args = head + [f"carray({name}, ({', '.join(shape)},))" for name, _, shape in data] + \
            ["r0", "r1", "scale", f"carray(acc_p, ({acc},))"]
        if cost.has_data:
            out += [ir.Blank(2), _entry(f"{kind}_rows_c", rows_params, defs[f"{kind}_rows"], rows_args)]
        if kind == "hvp" and cached and cost.has_data:
            kept = [f"k{q}_p" for q in range(len(cached))]
            tup = ", ".join(f"carray({k}, ({', '.join(['n', *map(str, shape)])},))" for k, (_, shape) in zip(kept, cached))
            for part in ("lin", "at"):
                out += [ir.Blank(2), _entry(f"hvp_{part}_rows_c", rows_params + tuple(kept), defs[f"hvp_{part}_rows"],
                                            rows_args + [f"({tup},)"])]
        out += [ir.Blank(2), _entry(f"{kind}_finish_c", ("theta_p", "v_p", "acc_p", "out_p"), defs[f"{kind}_finish"],
                                    head + [f"carray(acc_p, ({acc},))", f"carray(out_p, ({nout},))"])]
    return out


def _docstring_safe(text: str) -> str:
    """``text`` inside a generated module's docstring: backslashes, quotes and characters that
    are not printable escaped (a symbol's name cannot end the docstring or the line)."""
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _module_text(cost, body, helpers, sizes, blas: bool, numba_cache: bool = True, block: int | None = None) -> str:
    """The module: header, helpers (BLAS_SOURCE's where ``blas``), the statements ``body``.
    ``numba_cache=False`` where calcml keeps the kernels' machine code itself (their C entry
    points): Numba's own cache of the functions they call would only be written, never read;
    and the kernels are inlined into the entry points (``inline='always'``, Numba's IR
    inlining), so each is compiled once, as part of its entry point, not also on its own (that
    cost the cold build about 0.6 s at W7)."""
    flags = njit_flags({k: v for k, v in NUMBA_FLAGS.items() if numba_cache or k != "cache"})
    if not numba_cache:
        flags += ", inline='always'"
    doc = "\n".join([
        "calcml tensor kernels (generated; edit the cost, not this file).",
        "",
        f"cost: {_docstring_safe(cost._tensor_repr())}",
        "",
        "Row tensors hold one row per row of the current block (index r); accumulators add their",
        "sums over rows into acc, which the caller adds up over stripes of rows in a fixed order.",
        "",
    ])
    head = [
        ir.Doc(doc),
        ir.Blank(),
        ir.Raw("import math\nimport time\n\nimport numba\nimport numpy as np"),
        ir.Blank(),
        cache_statements(),
        ir.Assign("_jit", f"numba.njit({flags})"),
        ir.Assign("BLOCK", cost.block if block is None else block),
        ir.Assign("LANES", LANES),
        ir.Assign("N_PARAMS", cost.n_params),
        ir.Assign("ACC_SIZES", repr(sizes)),
        ir.Blank(),
    ]
    fixed = [ir.Blank(), ir.Raw(BLAS_SOURCE.strip("\n"))] if blas else []
    for name in sorted(helpers):  # a helper's source ends in a newline: a blank line after it
        fixed += [ir.Blank(), ir.Raw("@_jit\n" + HELPERS[name])]
    return ir.render([head, fixed, ir.Blank(2), body]) + "\n"


def _output_axes(free: tuple, indices) -> tuple:
    """The output's axes of a rowwise expression with free indices ``free``: ``indices`` (which
    must name each exactly once), or the one free index; several need ``indices``."""
    def names(seq):
        return ", ".join(str(i) for i in seq)

    if indices is None:
        if len(free) > 1:
            raise CostError(f"the expression has free indices {names(free)}: give the output's axes in order, "
                            f"indices=({names(free)}) or another order of them")
        return free
    if isinstance(indices, sp.Idx):
        indices = (indices,)
    indices = tuple(indices)
    bad = [i for i in indices if not isinstance(i, sp.Idx)]
    if bad:
        raise CostError(f"indices= takes calcml indices (cm.index), got {bad[0]!r}")
    if len(set(indices)) != len(indices) or set(indices) != set(free):
        raise CostError(f"indices=({names(indices)}) must name each free index of the expression once: "
                        f"{names(free) or 'it has none'}")
    return indices


class Rowwise:
    """``cm.rowwise(expr, params=[...], data=[...])``: ``f(theta, data)`` -> the value of ``expr``
    on every row, shape ``(N,)``, or ``(N, n1, ...)`` for its free indices: the one there is, or
    ``indices`` in their order."""

    def __init__(self, expr, params, data=None, indices=None):
        plist = [_check_item(p, "params") for p in _items(params)]
        dlist = [_check_item(d, "data") for d in _items(data)]
        if isinstance(expr, str):
            raise CostError("rowwise takes a SymPy expression, not a string; calcml never evaluates strings")
        self.expr = entries_as_sums(sp.sympify(expr, strict=True))
        self._probe = TensorCost.__new__(TensorCost)
        self._probe._params, self._probe._data = tuple(plist), tuple(dlist)
        self._probe._reduce, self._probe._penalty, self._probe._expr = "mean", None, self.expr
        g = self.graph = Graph()
        self.pin = [g.add_input(p, "param") for p in plist]
        self.din = [g.add_input(d, "label" if isinstance(d, Label) else "data") for d in dlist]
        body = Lowering(g, {t.placeholder: t for t in self.pin + self.din}).lower(self.expr)
        self.free = _output_axes(tuple(g.free_indices(body)), indices)
        self.top = g.derived("map", body, self.free, note="the value per row")
        self.shape = tuple(axis_range(i) for i in self.free)
        h = hashlib.sha256(("rowwise|" + sp.srepr(self.expr) + "|" + "|".join(
            sp.srepr(x) + str(getattr(x, "classes", "")) for x in plist + dlist) + "|axes=" + sp.srepr(self.free)).encode())
        self.key = h.hexdigest()
        self._module = None

    @property
    def cost(self):  # the data validation of a tensor cost reads these
        return self._probe

    @property
    def source(self) -> str:
        self.module  # noqa: B018
        return self._text

    @property
    def module(self):
        if self._module is None:
            from ..compile import _fingerprint, load_or_build

            key = hashlib.sha256(f"{self.key}|{_fingerprint()}".encode()).hexdigest()
            self._module, self._text, _ = load_or_build(key, self._build)
        return self._module

    def _build(self) -> str:
        spec = KernelSpec("rows", [], rowwise=self.top)
        body, helpers, _, blas, _ = write_kernel(self.graph, spec, self.pin, self.din, [], True)
        return _module_text(self._probe, body, helpers, {}, blas)

    def __call__(self, theta, data):
        from .kernels import as_tensor_data

        probe = self._probe
        if isinstance(theta, dict):  # a fitted model's res.params may hold more than expr reads, as data may
            theta = probe.pack({k: v for k, v in by_name(theta).items() if k in probe.param_names})
        t = np.ascontiguousarray(real_array(theta, "theta", ParamError))
        if t.shape != (probe.n_params,):
            raise ParamError(f"theta must have shape ({probe.n_params},) or be a dict of arrays; got {t.shape}")
        if not self.din:
            raise CostError("rowwise needs data: its values are one per row")
        td = as_tensor_data(probe, data, check_finite=True)
        out = np.empty((td.n_rows,) + self.shape)
        self.module.rows_rows(t, np.empty(0), *td.arrays, 0, td.n_rows, 1.0, out)
        return out

