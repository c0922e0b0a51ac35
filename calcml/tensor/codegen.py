"""Tensor programs -> a structured kernel (loops, slots, contractions) -> Python source.

A kernel is planned from the tensors its outputs need, then written as statements
(:mod:`calcml.ir` nodes, the module printed from them once):

* each derived tensor is *stored* (an array, one row of it per row of a block) or *inlined*
  into the bodies that read it, when that costs no extra work (its readers loop over no
  index it lacks) or the body is a single read or product;
* each stored tensor runs in a *phase*: ``A`` (parameters only, once per call), ``B`` (per
  block of rows: row tensors, and the accumulators summed over rows) or ``C`` (after the
  stripes' sums are added: what depends on accumulators, such as the gradient);
* a contraction of two stored tensors over one index with matrix shape is a matrix
  product (one call of the BLAS that Numba's ``np.dot`` calls, SciPy's: ``BLAS_SOURCE``);
  everything else is a loop
  nest over the tensor's free indices with its summed indices innermost.

The printed module has, per kernel kind, ``<kind>_rows(theta, v, *data, r0, r1, scale, acc)``
(adds the sums over rows ``r0 … r1-1`` into ``acc``) and ``<kind>_finish(theta, v, acc, out)``
(phase C and the outputs), each commented with the index notation of what it computes.
"""

from __future__ import annotations

import sympy as sp

from .. import ir
from ..errors import CodegenError
from ..printing import NumbaPrinter
from .graph import ROW, SCALE, Graph, Tensor, index_terms
from .statement import axis_range

__all__ = ["KernelSpec", "write_kernel", "BLOCK", "HVP_BLOCK_VALUES", "LANES", "block_rows"]

# Rows per block: a block's row tensors (BLOCK x axes) stay in cache between the forward
# and the backward sweep, and a contraction over a block is one BLAS call. 32 rows keep
# OpenBLAS on its small-matrix kernels: on W7's shapes 24-64 rows ran twice as fast as 128
# (benchmarks/RESULTS.md, W7).
BLOCK = 32
# Narrow rows get longer blocks, up to about this many data values a block: each block pays a
# few BLAS calls and loop starts (about 1 us), which 32 rows of 17 values do not amortise.
BLOCK_VALUES = 8192
BLOCK_MAX = 1024
# A Hessian-vector product's blocks hold more: its pass at a point reads the forward sweep's
# row tensors from memory and makes two skinny matrix products a block (the direction's tangent,
# the adjoint's contraction), which longer blocks amortise. The digits softmax (65 values a row):
# 480-row blocks 182 us a product against 212 us at 96 rows, W9's newton-cg 24.8 ms against
# 26.6-27.7 (benchmarks/RESULTS.md, 2026-12-04 23:48). Rows of hundreds of values (W7's 785)
# keep BLOCK.
HVP_BLOCK_VALUES = 4 * BLOCK_VALUES
# Partial sums of a fused row loop: row r adds into lane r % LANES, so that LLVM vectorises
# the loop over LANES rows (with an unsigned row index: no negative-index test). At 8 lanes
# LLVM left the loop scalar; at 16 it vectorises (benchmarks/RESULTS.md, "fused row loop").
LANES = 16


# The matrix products' BLAS calls, placed in a module whose kernels make any. np.dot would do,
# but Numba compiles its implementation (shape checks, allocation, one specialisation per
# layout) in a fresh process in about 0.9 s, a fifth of a small cost's first fit; these
# intrinsics emit the one call of the BLAS function np.dot ends in (``numba_xxgemm`` /
# ``numba_xxgemv``, over SciPy's BLAS), with the accumulation (beta = 1) in the same call.
BLAS_SOURCE = '''
# -- matrix products: one BLAS call each (what np.dot calls, without its checks) --------------
from llvmlite import ir  # noqa: E402
from numba.core import cgutils, types  # noqa: E402
from numba.core.errors import TypingError  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

_I8P = ir.IntType(8).as_pointer()
_CHAR = ir.IntType(8)


def _matrices(name, *arrays):
    from numba.np.linalg import ensure_blas  # (compiling only: its import costs a warm start 70 ms)

    for a, ndim in arrays:
        if not (isinstance(a, types.Array) and a.ndim == ndim and a.layout == "C" and a.dtype == types.float64):
            raise TypingError(f"{name}: expected a C-contiguous float64 array of {ndim} dimensions, got {a}")
    ensure_blas()


def _at_least_one(builder, n):
    one = ir.Constant(n.type, 1)
    return builder.select(builder.icmp_signed("<", n, one), one, n)


def _flag(builder, transposed):
    return builder.select(transposed, ir.Constant(_CHAR, ord("t")), ir.Constant(_CHAR, ord("n")))


@intrinsic
def _gemm(typingctx, ta, tb, alpha, a, b, beta, c):
    """c := alpha op(a) op(b) + beta c, op(x) = x.T where its flag is set (row-major matrices)"""
    _matrices("_gemm", (a, 2), (b, 2), (c, 2))

    def codegen(context, builder, signature, args):
        ta, tb, alpha, a, b, beta, c = args
        arr = [context.make_array(signature.args[k])(context, builder, v) for k, v in ((3, a), (4, b), (6, c))]
        (a0, a1), (b0, b1) = (cgutils.unpack_tuple(builder, x.shape, 2) for x in arr[:2])
        m, k = builder.select(ta, a1, a0), builder.select(ta, a0, a1)
        n = builder.select(tb, b0, b1)
        fnty = ir.FunctionType(ir.IntType(32), [_CHAR, _CHAR, _CHAR, m.type, m.type, m.type, _I8P, _I8P, m.type,
                                                _I8P, m.type, _I8P, _I8P, m.type])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        # row-major c = op(a) op(b) is column-major c.T = op(b).T op(a).T: b first, the flags as they are
        builder.call(fn, (ir.Constant(_CHAR, ord("d")), _flag(builder, tb), _flag(builder, ta), n, m, k,
                          builder.bitcast(cgutils.alloca_once_value(builder, alpha), _I8P),
                          builder.bitcast(arr[1].data, _I8P), _at_least_one(builder, b1),
                          builder.bitcast(arr[0].data, _I8P), _at_least_one(builder, a1),
                          builder.bitcast(cgutils.alloca_once_value(builder, beta), _I8P),
                          builder.bitcast(arr[2].data, _I8P), _at_least_one(builder, n)))
        return context.get_dummy_value()

    return types.void(types.boolean, types.boolean, types.float64, a, b, types.float64, c), codegen


@intrinsic
def _gemv(typingctx, ta, alpha, a, x, beta, y):
    """y := alpha op(a) x + beta y, op(a) = a.T where ta is set (a row-major matrix)"""
    _matrices("_gemv", (a, 2), (x, 1), (y, 1))

    def codegen(context, builder, signature, args):
        ta, alpha, a, x, beta, y = args
        am, xv, yv = (context.make_array(t)(context, builder, v)
                      for t, v in ((signature.args[2], a), (signature.args[3], x), (signature.args[5], y)))
        rows, cols = cgutils.unpack_tuple(builder, am.shape, 2)
        fnty = ir.FunctionType(ir.IntType(32), [_CHAR, _CHAR, rows.type, rows.type, _I8P, _I8P, rows.type,
                                                _I8P, _I8P, _I8P])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemv")
        # a row-major (rows, cols) is a column-major (cols, rows): a x is that one transposed
        builder.call(fn, (ir.Constant(_CHAR, ord("d")), _flag(builder, builder.not_(ta)), cols, rows,
                          builder.bitcast(cgutils.alloca_once_value(builder, alpha), _I8P),
                          builder.bitcast(am.data, _I8P), _at_least_one(builder, cols),
                          builder.bitcast(xv.data, _I8P),
                          builder.bitcast(cgutils.alloca_once_value(builder, beta), _I8P),
                          builder.bitcast(yv.data, _I8P)))
        return context.get_dummy_value()

    return types.void(types.boolean, types.float64, a, x, types.float64, y), codegen


def _scipy_missing():
    import importlib.util

    try:
        return importlib.util.find_spec("scipy") is None
    except ImportError:
        return True


if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: the same products, by NumPy
    def _gemm(ta, tb, alpha, a, b, beta, c):
        p = alpha * np.dot(a.T if ta else a, b.T if tb else b)
        c[...] = p if beta == 0.0 else p + beta * c

    def _gemv(ta, alpha, a, x, beta, y):
        p = alpha * np.dot(a.T if ta else a, x)
        y[...] = p if beta == 0.0 else p + beta * y
elif _scipy_missing():
    # No SciPy, whose BLAS Numba calls (an exported module on a machine with NumPy and Numba
    # only): the same products as loops, slower on large blocks, to rounding the same values.
    @numba.njit(cache=_CACHE, fastmath=False, error_model="numpy", nogil=True)
    def _gemm(ta, tb, alpha, a, b, beta, c):
        m, n = c.shape
        k = a.shape[0] if ta else a.shape[1]
        for i in range(m):
            for j in range(n):
                s = 0.0
                for p in range(k):
                    s += (a[p, i] if ta else a[i, p]) * (b[j, p] if tb else b[p, j])
                c[i, j] = alpha * s + (beta * c[i, j] if beta != 0.0 else 0.0)

    @numba.njit(cache=_CACHE, fastmath=False, error_model="numpy", nogil=True)
    def _gemv(ta, alpha, a, x, beta, y):
        rows, cols = a.shape
        for i in range(cols if ta else rows):
            s = 0.0
            for p in range(rows if ta else cols):
                s += (a[p, i] if ta else a[i, p]) * x[p]
            y[i] = alpha * s + (beta * y[i] if beta != 0.0 else 0.0)
'''


def block_rows(row_width: int, values: int = BLOCK_VALUES) -> int:
    """Rows per block for rows of ``row_width`` data values: a multiple of 32, at least BLOCK,
    about ``values`` data values a block (at most BLOCK_MAX rows)."""
    return BLOCK * max(1, min(BLOCK_MAX // BLOCK, values // (BLOCK * max(row_width, 1))))


class KernelSpec:
    """What one kernel computes: ``outputs`` = [(label, tensor or zero expression, size)]."""

    def __init__(self, kind: str, outputs, rowwise=None):
        self.kind = kind
        self.outputs = outputs
        self.rowwise = rowwise  # for "rows": the tensor whose value per row is the output


def _context(t: Tensor) -> set:
    s = set(t.free) | set(t.over)
    if t.row:
        s.add(ROW)
    return s


def _axes(t: Tensor) -> set:
    s = set(t.free)
    if t.row:
        s.add(ROW)
    return s


class _Printer(NumbaPrinter):
    """The Numba printer, with tensor reads as array subscripts and indices as loop variables."""

    def __init__(self, writer):
        super().__init__({})
        self.w = writer

    def _print_Indexed(self, e):
        t = self.w.g.tensor_of(e)
        if t is None:
            raise CodegenError(f"cannot compile {e}: {e.base} is not a tensor of this cost")
        idx = (["r"] if t.row else []) + [self.w.index_code(i) for i in e.indices]
        return f"{self.w.code(t)}[{', '.join(idx)}]"

    def _print_Symbol(self, e):
        if e == SCALE:
            return "scale"
        if e in self.w.local_syms:
            return self.w.local_syms[e]
        t = self.w.g.tensor_of(e)
        if t is None:
            raise CodegenError(f"symbol {e} has no slot in the generated code")
        if t in self.w.local_rows:
            return f"{t.name}_r"  # this row's value, a local of the fused row loop
        return f"{self.w.code(t)}[r]" if t.row else self.w.code(t)

    def _print_Dummy(self, e):
        return self._print_Symbol(e)

    # exp and tanh as the branch-free helpers: a loop over a block's rows that calls them
    # vectorises (libm's are scalar calls: tanh was 60% of a tanh network's minibatch).
    def _print_exp(self, e):
        return self._helper("_exp", e.args[0])

    def _print_tanh(self, e):
        return self._helper("_tanh", e.args[0])

    def _print_Idx(self, e):
        return self.w.loopvar(e)

    def _print_Relational(self, e):
        # a window's bound (m >= 1, m - l <= 28: from a shifted read's adjoint): integers, as the loop
        # variables are
        sides = (e.lhs, e.rhs)
        if e.rel_op in ("<=", ">=", "<", ">") and all(isinstance(x, sp.Integer) or index_terms(x) is not None
                                                       for x in sides) and not all(isinstance(x, sp.Integer) for x in sides):
            return f"({self.w.index_code(e.lhs)} {e.rel_op} {self.w.index_code(e.rhs)})"
        return super()._print_Relational(e)

    def _print_KroneckerDelta(self, e):
        a, b = (self._print(x) for x in e.args)
        return f"(1.0 if {a} == {b} else 0.0)"


class _Writer:
    """Plans and prints the two functions of one kernel kind."""

    def __init__(self, g: Graph, spec: KernelSpec, params, data, directions, has_data: bool):
        self.g, self.spec = g, spec
        self.params, self.data, self.directions = params, data, directions
        self.has_data = has_data
        self._loopvars: dict = {}
        self.printer = _Printer(self)
        self.blas = False  # whether a matrix product calls BLAS_SOURCE's functions
        roots = [t for _, t, _ in spec.outputs if isinstance(t, Tensor)]
        if spec.rowwise is not None:
            roots.append(spec.rowwise)
        self.needed = self._closure(roots)
        self.outputs = set(roots)
        self.gemm: dict = {}
        self.inlined: set = set()
        self._plan_storage()
        self.phase: dict = {}
        for t in self.order:
            self.phase[t] = self._phase(t)
        self.mode = None
        self.cached: list = []
        self.out_views: dict = {}  # finish: output tensor -> its offset in out (computed there, in place)
        self.local_rows: set = set()
        self.local_syms: dict = {}  # cse temporaries of a fused row loop -> their names
        self.n_lanes = 0

    # -- names ----------------------------------------------------------------------------
    def loopvar(self, i) -> str:
        if i == ROW:
            return "r"
        name = self._loopvars.get(i)
        if name is None:
            base = f"i_{i.label}"
            name = base
            n = 1
            while name in self._loopvars.values():
                n += 1
                name = f"{base}_{n}"
            self._loopvars[i] = name
        return name

    def index_code(self, e) -> str:
        """A subscript: the loop variable of index ``i``, or ``i_t + i_l + 1``, ``i_m - i_l`` for a
        shifted read (integer arithmetic, not the printer's floats); a whole number as itself."""
        if isinstance(e, sp.Integer):
            return str(int(e))
        found = index_terms(e)
        if found is None:
            raise CodegenError(f"cannot compile the subscript {e}: indices plus a whole number")
        terms, s = found
        terms = sorted(terms, key=lambda ic: -ic[1])  # the added indices first: i_m - i_l, not -i_l + i_m
        text = "".join(f" {'+' if c == 1 else '-'} {self.loopvar(i)}" for i, c in terms) + \
            (f" + {s}" if s > 0 else f" - {-s}" if s < 0 else "")
        return text[3:] if text.startswith(" + ") else "-" + text[3:]

    def code(self, t: Tensor) -> str:
        if t.kind == "input":
            return {"param": "p_", "direction": "v_", "data": "x_", "label": "x_"}[t.role] + t.code
        return t.name

    # -- planning -------------------------------------------------------------------------
    def _closure(self, roots) -> list:
        seen, out = set(), []

        def visit(t):
            if t in seen:
                return
            seen.add(t)
            if t.kind != "input":
                for u, _, _ in self.g.occurrences(t.body):
                    visit(u)
            out.append(t)

        for t in roots:
            visit(t)
        return out  # topological: inputs and operands first

    def _readers(self):
        readers = {t: [] for t in self.needed}
        for t in self.needed:
            if t.kind != "input":
                for u, _, _ in self.g.occurrences(t.body):
                    readers[u].append(t)
        return readers

    def _plan_storage(self):
        for t in self.needed:
            if t.kind != "input":
                plan = self._gemm_plan(t, t.body)
                if plan is not None:
                    self.gemm[t] = plan
        readers = self._readers()
        for t in self.needed:
            if t.kind != "map" or t in self.outputs or t.accumulates:
                continue
            rs = readers[t]
            if not rs or any(r in self.gemm for r in rs):
                continue
            # inlined: a read or product of reads (nothing to keep), or a body with one reader
            # that loops over no index it lacks (computed once either way)
            if _cheap(t.body) or (len(rs) == 1 and _context(rs[0]) <= self._read_axes(rs[0], t)):
                self.inlined.add(t)
        self._bodies: dict = {}
        self.order = [t for t in self.needed if t.kind == "input" or t not in self.inlined]
        # an lse whose softmax (exp(term - lse), over its free and summed indices) is stored
        # too computes it in its own pass (_emit_lse_softmax)
        self.fused_softmax: dict = {}
        stored = set(self.order)
        for t in self.order:
            if t.kind == "lse" and not t.accumulates:
                soft = self.g.softmax_of(t)
                if soft is not None and soft in stored and soft.row == t.row and \
                        tuple(soft.free) == tuple(t.free) + tuple(i for i in t.over if i != ROW):
                    self.fused_softmax[t] = soft
        self.fused = set(self.fused_softmax.values())

    def _read_axes(self, reader: Tensor, t: Tensor) -> set:
        """The indices at which ``reader`` reads ``t`` (its one read: ``c5[x_0]`` reads c5's axis at
        x_0, whatever c5 calls it), and the row where t has one; empty for two or more reads
        (inlined, t would be computed once per read)."""
        reads = [idx for u, idx, _ in self.g.occurrences(reader.body) if u is t]
        if len(reads) != 1:
            return set()
        return {j for e in reads[0] for j in (e.atoms(sp.Idx) if isinstance(e, sp.Basic) else ())} | \
            ({ROW} if t.row else set())

    def body(self, t: Tensor):
        """t's body with the inlined tensors it reads substituted, recursively."""
        found = self._bodies.get(t)
        if found is None:
            subs = {}
            for u, idx, e in self.g.occurrences(t.body):
                if u in self.inlined:
                    inner = self.body(u)
                    subs[e] = inner.xreplace(dict(zip(u.free, idx))) if u.free else inner
            found = self._bodies[t] = t.body.xreplace(subs) if subs else t.body
        return found

    def _phase(self, t: Tensor) -> str:
        if t.kind == "input":
            return "B" if t.row else "A"
        if t.row or t.accumulates:
            return "B"
        deps = [u for u, _, _ in self.g.occurrences(self.body(t))]
        if any(u.accumulates or self.phase.get(u) == "C" for u in deps if u.kind != "input"):
            return "C"
        return "A"

    def _gemm_plan(self, t: Tensor, body):
        """(coefficient, A, B, transpose A, transpose B) when ``t`` is a matrix product."""
        if t.kind != "sum" or len([i for i in t.over if i != ROW]) + (1 if t.accumulates else 0) != 1:
            return None
        coeff, factors = body.as_coeff_mul()
        # the two operands: reads of tensors with an axis (a row tensor without one has the row)
        refs = [f for f in factors if self.g.tensor_of(f) is not None and f != SCALE
                and (isinstance(f, sp.Indexed) or self.g.tensor_of(f).row)]
        rest = [f for f in factors if not any(f is r for r in refs)]
        if len(refs) != 2 or any(f != SCALE for f in rest):
            return None
        ta, tb = (self.g.tensor_of(f) for f in refs)
        if ta is tb:
            return None
        (s,) = t.over
        axes_a = ([ROW] if ta.row else []) + list(getattr(refs[0], "indices", ()))
        axes_b = ([ROW] if tb.row else []) + list(getattr(refs[1], "indices", ()))
        out = ([ROW] if t.row else []) + list(t.free)
        if len(axes_a) > 2 or len(axes_b) > 2 or s not in axes_a or s not in axes_b:
            return None
        ma = [i for i in axes_a if i != s]
        mb = [i for i in axes_b if i != s]
        if len(ma) + len(mb) != len(out) or len(out) == 0 or len(out) > 2:
            return None
        if out == ma + mb:
            first, second = (refs[0], axes_a, ma), (refs[1], axes_b, mb)
        elif out == mb + ma:
            first, second = (refs[1], axes_b, mb), (refs[0], axes_a, ma)
        else:
            return None
        # first operand: (m, s) -> transposed when stored (s, m); second: (s, n) -> transposed when (n, s)
        trans_first = len(first[1]) == 2 and first[1][0] == s
        trans_second = len(second[1]) == 2 and second[1][1] == s
        return (coeff * sp.Mul(*rest), first[0], second[0], trans_first, trans_second)

    # -- printing: each method returns the statements it makes (calcml.ir nodes) -------------
    def expr(self, e) -> str:
        """``e`` printed now: the names of loop variables, the fused row loop's locals and
        its cse temporaries are those of this point of the writing."""
        return self.printer.doprint_expr(e)

    def describe(self, t: Tensor) -> str:
        axes = (["r"] if t.row else []) + [str(i.label) for i in t.free]
        lhs = f"{t.name}[{', '.join(axes)}]" if axes else t.name
        body = sp.sstr(self.body(t))
        over = [str(i.label) if i != ROW else "r" for i in t.over]
        if t.kind == "sum":
            rhs = f"sum_{{{', '.join(over)}}} {body}"
        elif t.kind == "lse":
            rhs = f"log sum_{{{', '.join(over)}}} exp({body})"
        else:
            rhs = body
        note = f"  ({t.note})" if t.note else ""
        return f"{lhs} {'+=' if t.accumulates else '='} {rhs}{note}"

    def _ranges(self, indices) -> list:
        """(loop variable, its range) of each index but the row."""
        return [(self.loopvar(i), str(axis_range(i))) for i in indices if i != ROW]

    def _cache_rows(self, t: Tensor) -> str:
        return f"cache[{self.cached.index(t)}][q0:q1]"

    def _alloc(self, t: Tensor, name: str):
        """Storage of a block's rows of ``t``: fresh, or this block's rows of its cache array."""
        if self.mode is not None and t in self.cached:
            return ir.Assign(name, self._cache_rows(t))
        if t in self.out_views and not t.row:
            return ir.Assign(name, _view("out", self.out_views[t], t), comment="written in place in out")
        shape = (["nb"] if t.row else []) + [str(n) for n in t.shape]
        return ir.Assign(name, f"np.empty(({', '.join(shape)},))")

    def emit(self, t: Tensor, acc_name=None) -> list:
        """The code that computes stored tensor ``t`` (into ``acc_name`` for accumulators)."""
        if t in self.fused:
            return []  # computed by its log-sum-exp
        soft = self.fused_softmax.get(t)
        if self.mode == "read" and t in self.cached:
            out = [ir.Assign(t.name, self._cache_rows(t), comment=f"{t.note}: computed at this theta")]
            if soft is not None:
                out.append(ir.Assign(soft.name, self._cache_rows(soft), comment=soft.note))
            return out
        out = [_comment(self.describe(soft)), self._alloc(soft, soft.name)] if soft is not None else []
        out.append(_comment(self.describe(t)))
        shape = (["nb"] if t.row else []) + [str(n) for n in t.shape]
        name = acc_name or t.name
        if not t.accumulates and shape:
            out.append(self._alloc(t, name))
        plan = self.gemm.get(t)
        if plan is not None:
            return out + [self._emit_gemm(t, plan, name)]
        body = self.expr(self.body(t))
        loops = ([("r", "nb")] if t.row or t.accumulates else []) + self._ranges(t.free)
        inner = self._ranges(t.over)
        target = self._target(t, name)
        if not shape and not t.accumulates and not loops and not inner:
            return out + [ir.Assign(name, body)]
        if t.accumulates and not t.free:
            return out + [ir.Assign("s", "0.0"), _loops(loops + inner, [ir.AugAssign("s", "+", body)]),
                          ir.AugAssign(name, "+", "s")]
        if t.accumulates and inner:
            # a local sum over the summed indices, added once per row and free entry: the target
            # is an array element that LLVM cannot keep in a register across the inner loop (it
            # may alias the arrays read), the local it can, and vectorises the loop
            return out + _loops(loops, [ir.Assign("s", "0.0"), _loops(inner, [ir.AugAssign("s", "+", body)]),
                                        ir.AugAssign(target, "+", "s")])
        if t.accumulates:
            return out + _loops(loops, [ir.AugAssign(target, "+", body)])
        return out + _loops(loops, self._emit_value(t, body, inner, target))

    def _emit_value(self, t, body, inner, target) -> list:
        """``target`` = t's value (a map, a sum or a log-sum-exp over the ``inner`` loops)."""
        if t.kind == "map":
            return [ir.Assign(target, body)]
        if t.kind == "sum":
            return [ir.Assign("s", "0.0"), _loops(inner, [ir.AugAssign("s", "+", body)]), ir.Assign(target, "s")]
        return self._emit_lse(t, body, inner, target)

    def _emit_lse(self, t, body, inner, target) -> list:
        """m = the largest term, then m + log(sum exp(term - m)): never overflows. When t's
        softmax is stored too it is made in the same pass: e = exp(term - m) is each softmax
        entry times the sum, so the softmax costs a multiplication, not a second exp."""
        self.printer.helpers_used.add("_max2")
        soft = self.fused_softmax.get(t)
        if soft is None:
            terms = [ir.AugAssign("s", "+", f"math.exp({body} - m)")]
        else:
            starget = self._target(soft, soft.name)
            terms = [ir.Assign("e", f"math.exp({body} - m)"), ir.Assign(starget, "e"), ir.AugAssign("s", "+", "e")]
        out = [ir.Assign("m", "-math.inf"), _loops(inner, [ir.Assign("m", f"_max2(m, {body})")]),
               ir.Assign("s", "0.0"), _loops(inner, terms),
               ir.Assign(target, "m + math.log(s) if math.isfinite(m) else m")]
        if soft is not None:
            out += [ir.Assign("inv", "1.0 / s"), _loops(inner, [ir.AugAssign(starget, "*", "inv")])]
        return out

    def _target(self, t: Tensor, name: str) -> str:
        idx = (["r"] if t.row else []) + [self.loopvar(i) for i in t.free]
        return f"{name}[{', '.join(idx)}]" if idx else name

    def _emit_gemm(self, t: Tensor, plan, name: str):
        """One BLAS call (BLAS_SOURCE): ``name`` := (or +=, for an accumulator) coeff op(a) op(b)."""
        self.blas = True
        coeff, a, b, ta, tb = plan
        ca, cb = self.code(self.g.tensor_of(a)), self.code(self.g.tensor_of(b))
        alpha = "1.0" if coeff == 1 else self.expr(coeff)
        beta = "1.0" if t.accumulates else "0.0"
        rank_a, rank_b = (len(getattr(ref, "indices", ())) + (1 if self.g.tensor_of(ref).row else 0) for ref in (a, b))
        if rank_a == 2 and rank_b == 2:
            return ir.Stmt(f"_gemm({ta}, {tb}, {alpha}, {ca}, {cb}, {beta}, {name})")
        if rank_a == 2:  # matrix . vector
            return ir.Stmt(f"_gemv({ta}, {alpha}, {ca}, {cb}, {beta}, {name})")
        return ir.Stmt(f"_gemv({not tb}, {alpha}, {cb}, {ca}, {beta}, {name})")  # vector . matrix = matrix.T . vector

    # -- the two functions ----------------------------------------------------------------
    def accumulators(self) -> list:
        return [t for t in self.order if t.kind != "input" and t.accumulates]

    def acc_layout(self) -> dict:
        out, o = {}, 0
        for t in self.accumulators():
            out[t] = o
            o += t.size
        return out

    def _param_views(self, which: set) -> list:
        out = []
        for t in self.params + self.directions:
            if t in which:
                src, o = ("theta" if t.role == "param" else "v"), self._offset(t)
                out.append(ir.Assign(self.code(t), _view(src, o, t) if t.free else f"{src}[{o}]"))
        return out

    def _offset(self, t: Tensor) -> int:
        o = 0
        group = self.params if t.role == "param" else self.directions
        for u in group:
            if u is t:
                return o
            o += u.size
        raise AssertionError(t)

    def _needs(self, targets) -> set:
        """Stored tensors (and inputs) that ``targets`` read, transitively, targets included."""
        seen = set()
        stack = list(targets)
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t.kind != "input":
                stack.extend(u for u, _, _ in self.g.occurrences(self.body(t)))
        return seen

    def plan_cache(self):
        """The row tensors of a Hessian-vector product that do not depend on the direction:
        computed once per point (``<kind>_lin_rows``) and read by every product there."""
        self.cached = [t for t in self.order if t.kind != "input" and self.phase[t] == "B" and t.row
                       and not t.accumulates and not self.g.depends(t, {"direction"})]
        return self.cached

    def print_rows(self, fname: str, data_args: list[str], mode=None) -> list:
        """``<kind>_rows``: phase A, then phase B block by block over rows r0 … r1-1.
        ``mode``: None; "fill" (only the cached tensors, into ``cache``); "read" (they are
        read from ``cache``)."""
        self.mode = mode
        b_tensors = [t for t in self.order if t.kind != "input" and self.phase[t] == "B"]
        if mode == "fill":
            b_tensors = [t for t in b_tensors if t in self.cached]
        need = self._needs(b_tensors + ([self.spec.rowwise] if self.spec.rowwise is not None else []))
        a_tensors = [t for t in self.order if t.kind != "input" and self.phase[t] == "A" and t in need]
        layout = self.acc_layout()
        what = "per-row values into acc[r0:r1]" if self.spec.rowwise is not None else "the sums over rows into acc"
        if mode == "fill":
            what = "the rows' tensors that do not depend on v, into cache"
        elif mode == "read":
            what += " (the tensors that do not depend on v read from cache)"
        body = [self._param_views(need), [self.emit(t) for t in a_tensors],
                [ir.Assign(t.name, _view("acc", layout[t], t))
                 for t in (self.accumulators() if mode != "fill" else []) if t.free]]
        self.n_lanes = 0
        block = [ir.Assign("q1", "min(q0 + BLOCK, r1)"), ir.Assign("nb", "q1 - q0"),
                 [ir.Assign(self.code(t), f"data_{t.code}[q0:q1]") for t in self.data if t in need],
                 self._emit_block(b_tensors, layout)]
        if self.spec.rowwise is not None:
            block.append(self._rowwise_values(self.spec.rowwise))
        if self.n_lanes:
            body.append(ir.Assign("lanes", f"np.empty(({self.n_lanes}, LANES))",
                                  comment="the fused row loops' sums, lane by lane"))
        body.append(ir.For("q0", ir.range_("r0", "r1", "BLOCK"), block))
        params = ("theta", "v", *data_args, "r0", "r1", "scale", "acc") + (("cache",) if mode is not None else ())
        return [ir.Def(fname, params, body, doc=f"{self.spec.kind}: {what}, rows r0 … r1-1 in blocks of BLOCK",
                       decorators=("_jit",)),
                ir.Blank(2)]

    def _rowwise_values(self, t: Tensor) -> list:
        """The rowwise tensor's values on the block's rows, into acc[q0:q1]."""
        loops = self._ranges(t.free)
        idx = [var for var, _ in loops]
        return [ir.Comment("the values of every row of the block"),
                ir.For("r", "range(nb)", _loops(loops, [ir.Assign(f"acc[{', '.join(['q0 + r'] + idx)}]",
                                                                   self._target(t, self.code(t)))]))]

    # -- phase B: a block's tensors, the per-row scalars fused into one loop over its rows ------
    def _row_scalar(self, t: Tensor) -> bool:
        """One number per row (or a sum over rows of one): computed in the block's fused row
        loop, its value a local of the loop (no array), unless it is a matrix product, the
        softmax of a fused log-sum-exp, or read from the Hessian-vector products' cache."""
        return (t.kind != "input" and not t.free and t.iterates_rows and t not in self.gemm
                and t not in self.fused and t not in self.fused_softmax
                and not (self.mode is not None and t in self.cached))

    def _emit_block(self, b_tensors, layout) -> list:
        """Phase B in order, except that the per-row scalars go into one loop over the block's
        rows (closed before a tensor that reads a member): each row's values are computed once
        and read where they are, and each sum over the rows is a local added into acc once a
        block, in the same order as a loop of its own."""
        readers: dict = {}
        for t in b_tensors:
            for u, _, _ in self.g.occurrences(self.body(t)):
                readers.setdefault(u, set()).add(t)
        out, group = [], []
        for t in b_tensors:
            if self._row_scalar(t):
                group.append(t)
                continue
            if group and any(u in group for u, _, _ in self.g.occurrences(self.body(t))):
                out.append(self._emit_row_loop(group, layout, readers))
                group = []
            out.append(self.emit(t, acc_name=f"acc[{layout[t]}]" if t.accumulates and not t.free else None))
        if group:
            out.append(self._emit_row_loop(group, layout, readers))
        return out

    def _emit_row_loop(self, group, layout, readers) -> list:
        """One loop over the block's rows for ``group`` (see _emit_block). When every member is
        a map or a sum over the rows alone, their common subexpressions are computed once a
        row (SymPy's cse of the members' bodies: small, per-row expressions), and the sums
        are kept in LANES partial sums, row r in lane r % LANES (the rest of the block in
        lane 0), added in lane order into acc: the loop over a group of LANES rows then
        vectorises."""
        members = set(group)
        kept = [t for t in group if t.row and (t is self.spec.rowwise or readers.get(t, set()) - members)]
        out = [_comment(self.describe(t)) for t in group] + [self._alloc(t, t.name) for t in kept]
        sums = [t for t in group if t.accumulates]
        flat = all(not [i for i in t.over if i != ROW] and t.kind in ("map", "sum") for t in group)
        temps, bodies = [], {}
        if flat:  # the common subexpressions of the members' bodies, u0, u1, ... (in order of need)
            temps, reduced = sp.cse([self.body(t) for t in group], symbols=sp.numbered_symbols("u", cls=sp.Dummy),
                                    order="none")
            bodies = dict(zip(group, reduced))
        if not (flat and sums and all(_vectorises(e) for e in [*reduced, *(e for _, e in temps)])):
            # a libm call or a branch: LLVM keeps the loop scalar, and lanes only cost (the
            # logistic loss ran at half the speed with them: benchmarks/RESULTS.md)
            return out + [[ir.Assign(f"s_{t.name}", "0.0") for t in sums],
                          ir.For("r", "range(nb)", self._row_members(group, kept, bodies, temps)),
                          [ir.AugAssign(f"acc[{layout[t]}]", "+", f"s_{t.name}") for t in sums]]
        lane_of = {t: self.n_lanes + k for k, t in enumerate(sums)}
        self.n_lanes += len(sums)
        first = lane_of[sums[0]]
        return out + [
            ir.For("k", ir.range_(first, first + len(sums)),
                   [ir.For("lane", "range(LANES)", [ir.Assign("lanes[k, lane]", "0.0")])]),
            ir.For("q", "range(0, nb - LANES + 1, LANES)",
                   [ir.For("lane", "range(LANES)", [ir.Assign("r", "np.uintp(q + lane)"),
                                                    self._row_members(group, kept, bodies, temps, lane_of, "lane")])]),
            ir.For("r", "range(nb - nb % LANES, nb)", self._row_members(group, kept, bodies, temps, lane_of, "0"),
                   comment="the block's last rows, in lane 0"),
            [[ir.Assign("s", f"lanes[{lane_of[t]}, 0]"),  # the lanes' sums, in lane order
              ir.For("lane", "range(1, LANES)", [ir.AugAssign("s", "+", f"lanes[{lane_of[t]}, lane]")]),
              ir.AugAssign(f"acc[{layout[t]}]", "+", "s")] for t in sums]]

    def _row_members(self, group, kept, bodies, temps=(), lane_of=None, lane="lane") -> list:
        """One row's values of the group's members (r is the row). ``bodies``: the members'
        bodies after cse (else their own), ``temps``: [(u, expression)]. Printed as they are
        made: the members' values are locals of the loop (local_rows, local_syms) only here."""
        out, done = [], set()
        pending = list(temps)
        for t in group:
            body = bodies.get(t, self.body(t))
            if pending:  # the temporaries this body reads, with those they read, in cse's order
                need = set(body.free_symbols)
                for u, e in reversed(pending):
                    if u in need:
                        need |= e.free_symbols
                for u, e in [p for p in pending if p[0] in need and p[0] not in done]:
                    self.local_syms[u] = u.name
                    out.append(ir.Assign(u.name, self.expr(e)))
                    done.add(u)
            text = self.expr(body)
            inner = self._ranges(t.over)
            local = f"{t.name}_r"
            if t.accumulates:
                if lane_of is not None:
                    out.append(ir.AugAssign(f"lanes[{lane_of[t]}, {lane}]", "+", text))
                else:
                    out.append(_loops(inner, [ir.AugAssign(f"s_{t.name}", "+", text)]))
                continue
            out.append(self._emit_value(t, text, inner, local))
            self.local_rows.add(t)
            if t in kept:
                out.append(ir.Assign(f"{t.name}[r]", local))
        self.local_rows = set()
        self.local_syms = {}
        return out

    def print_finish(self, fname: str) -> list:
        """``<kind>_finish``: phase A and C after the stripes' sums are added; the outputs."""
        roots = [t for _, t, _ in self.spec.outputs if isinstance(t, Tensor)]
        need = self._needs(roots)
        layout = self.acc_layout()
        # An output tensor this function computes is computed in its place in out (a view):
        # no temporary array and no copy (np.empty of a shape and ravel each cost Numba about
        # 0.1-0.3 s of compile, in every cold process)
        # (a tensor output twice keeps its own array: each copy is written from it)
        o, self.out_views = 0, {}
        for _, t, size in self.spec.outputs:
            if isinstance(t, Tensor) and t.free and roots.count(t) == 1 and t.kind != "input" and not t.accumulates \
                    and not t.row and t not in self.fused and self.phase.get(t) in ("A", "C"):
                self.out_views[t] = o
            o += size
        body = [self._param_views(need)]
        for t in self.order:
            if t.kind == "input" or t not in need:
                continue
            if t.accumulates:
                o = layout[t]
                body.append(ir.Assign(t.name, _view("acc", o, t) if t.free else f"acc[{o}]"))
            elif self.phase[t] in ("A", "C"):
                body.append(self.emit(t))
        o = 0
        for label, t, size in self.spec.outputs:
            body.append(ir.Comment(ir.printable(label)))
            # loops, not slice assignments: Numba takes about 2 s to compile an array setitem
            if not isinstance(t, Tensor):
                body.append(ir.For("q", ir.range_(size), [ir.Assign(f"out[{o} + q]", "0.0")]))
            elif t in self.out_views:
                body.append(ir.Comment("(computed in place above)"))
            elif t.free and t.accumulates:  # the sums themselves: their slots of acc, in order
                body.append(ir.For("q", ir.range_(size), [ir.Assign(f"out[{o} + q]", f"acc[{layout[t]} + q]")]))
            elif t.free:
                body += [ir.Assign("flat", f"{self.code(t)}.ravel()"),
                         ir.For("q", ir.range_(size), [ir.Assign(f"out[{o} + q]", "flat[q]")])]
            else:
                body.append(ir.Assign(f"out[{o}]", self.code(t)))
            o += size
        self.out_views = {}
        return [ir.Def(fname, ("theta", "v", "acc", "out"), body,
                       doc=f"{self.spec.kind}: the outputs from the sums over rows in acc", decorators=("_jit",)),
                ir.Blank(2)]


def _loops(loops, body) -> list:
    """``body`` inside ``for var in range(n)`` for each (var, n) of ``loops``, the first outermost."""
    for var, n in reversed(loops):
        body = [ir.For(var, ir.range_(n), body)]
    return body


def _view(src: str, o: int, t: Tensor) -> str:
    """``t``'s entries at offset ``o`` of the flat array ``src``, in t's shape."""
    return f"{src}[{o}:{o + t.size}].reshape(({', '.join(map(str, t.shape))},))"


def _comment(text: str):
    """``text`` as comment lines of at most about 100 characters."""
    return [ir.Comment(ir.printable(line)) for line in _wrap(text)]


def _vectorises(e) -> bool:
    """Arithmetic, integer powers, square roots and the branch-free exp and tanh only: a loop
    of it vectorises (a libm call or a conditional keeps it scalar)."""
    for node in sp.preorder_traversal(e):
        if isinstance(node, (sp.Symbol, sp.Indexed, sp.Number, sp.Add, sp.Mul, sp.exp, sp.tanh, sp.Tuple)):
            continue
        if isinstance(node, sp.Pow) and (node.exp.is_Integer or node.exp in (sp.S.Half, -sp.S.Half)):
            continue
        if isinstance(node, (sp.Idx, sp.IndexedBase)) or node.is_Atom:
            continue
        return False
    return True


def _cheap(body) -> bool:
    """A read, or a product of reads and numbers: no work worth keeping in an array."""
    if isinstance(body, (sp.Indexed, sp.Symbol, sp.Number)):
        return True
    if isinstance(body, sp.Mul):
        return all(isinstance(a, (sp.Indexed, sp.Symbol, sp.Number)) for a in body.args)
    return False


def _wrap(text: str, width: int = 100) -> list:
    out = []
    while len(text) > width:
        cut = text.rfind(" ", 3, width)  # not in a continuation's indent: that cut would loop forever
        if cut <= 2:
            cut = width
        out.append(text[:cut])
        text = "  " + text[cut:].lstrip()
    out.append(text)
    return out


def write_kernel(g: Graph, spec: KernelSpec, params, data, directions, has_data: bool):
    """(the module-level statements, helper names used, accumulator size, whether they call
    BLAS_SOURCE's functions, the row tensors a Hessian-vector product keeps per point as
    [(name, per-row shape)]) of one kernel kind."""
    wr = _Writer(g, spec, params, data, directions, has_data)
    data_args = [f"data_{t.code}" for t in data] or ["data_none"]
    out, cached = [], []
    if has_data:
        out += wr.print_rows(f"{spec.kind}_rows", data_args)
        if spec.kind == "hvp" and wr.plan_cache():
            # a point's products share its forward sweep: computed once, then read
            out += wr.print_rows(f"{spec.kind}_lin_rows", data_args, mode="fill")
            out += wr.print_rows(f"{spec.kind}_at_rows", data_args, mode="read")
            cached = [(t.name, [int(m) for m in t.shape]) for t in wr.cached]
            out += [ir.Assign("HVP_CACHE", repr(cached)), ir.Blank()]
        wr.mode = None
    if spec.rowwise is None:
        out += wr.print_finish(f"{spec.kind}_finish")
    size = sum(t.size for t in wr.accumulators())
    # data whose every entry is multiplied into an output's sum (an operand of a contraction
    # summed over the rows): a NaN or infinity there leaves that output non-finite, so the
    # caller's test of the outputs covers it; other data are checked before the call
    covered = sorted({wr.g.tensor_of(ref).name for t, plan in wr.gemm.items() if t.accumulates and t in wr.needed
                      for ref in plan[1:3] if wr.g.tensor_of(ref).role == "data"})
    out += [ir.Assign(f"COVERED_{spec.kind.upper()}", repr(tuple(covered))), ir.Blank()]
    return out, wr.printer.helpers_used, size, wr.blas, cached
