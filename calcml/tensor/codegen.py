"""Tensor programs -> a structured kernel (loops, slots, contractions) -> Python source.

A kernel is planned from the tensors its outputs need, then printed once:

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

from ..errors import CodegenError
from ..printing import NumbaPrinter
from .graph import ROW, SCALE, Graph, Tensor
from .statement import axis_range

__all__ = ["KernelSpec", "write_kernel", "BLOCK", "LANES", "block_rows"]

# Rows per block: a block's row tensors (BLOCK x axes) stay in cache between the forward
# and the backward sweep, and a contraction over a block is one BLAS call. 32 rows keep
# OpenBLAS on its small-matrix kernels: on W7's shapes 24-64 rows ran twice as fast as 128
# (benchmarks/RESULTS.md, W7).
BLOCK = 32
# Narrow rows get longer blocks, up to about this many data values a block: each block pays a
# few BLAS calls and loop starts (about 1 us), which 32 rows of 17 values do not amortise.
BLOCK_VALUES = 8192
BLOCK_MAX = 1024
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


if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: the same products, by NumPy
    def _gemm(ta, tb, alpha, a, b, beta, c):
        p = alpha * np.dot(a.T if ta else a, b.T if tb else b)
        c[...] = p if beta == 0.0 else p + beta * c

    def _gemv(ta, alpha, a, x, beta, y):
        p = alpha * np.dot(a.T if ta else a, x)
        y[...] = p if beta == 0.0 else p + beta * y
'''


def block_rows(row_width: int) -> int:
    """Rows per block for rows of ``row_width`` data values: a multiple of 32, at least BLOCK."""
    return BLOCK * max(1, min(BLOCK_MAX // BLOCK, BLOCK_VALUES // (BLOCK * max(row_width, 1))))


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
        idx = (["r"] if t.row else []) + [self.w.loopvar(i) for i in e.indices]
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
        self.lines: list[str] = []
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
            if _cheap(t.body) or (len(rs) == 1 and _context(rs[0]) <= _axes(t)):
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

    # -- printing -------------------------------------------------------------------------
    def w(self, indent: int = 0, text: str = ""):
        """One line; characters that are not printable (a newline in a symbol's name, shown
        in a comment) are written escaped: a line of text stays one line of code."""
        if not text.isprintable():
            text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
        self.lines.append("    " * indent + text if text else "")

    def expr(self, e) -> str:
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

    def _alloc(self, t: Tensor, indent: int, name: str):
        """Storage of a block's rows of ``t``: fresh, or this block's rows of its cache array."""
        if self.mode is not None and t in self.cached:
            self.w(indent, f"{name} = cache[{self.cached.index(t)}][q0:q1]")
            return
        shape = (["nb"] if t.row else []) + [str(n) for n in t.shape]
        self.w(indent, f"{name} = np.empty(({', '.join(shape)},))")

    def emit(self, t: Tensor, indent: int, acc_name=None):
        """The code that computes stored tensor ``t`` (into ``acc_name`` for accumulators)."""
        if t in self.fused:
            return  # computed by its log-sum-exp
        if self.mode == "read" and t in self.cached:
            self.w(indent, f"{t.name} = cache[{self.cached.index(t)}][q0:q1]  # {t.note}: computed at this theta")
            soft = self.fused_softmax.get(t)
            if soft is not None:
                self.w(indent, f"{soft.name} = cache[{self.cached.index(soft)}][q0:q1]  # {soft.note}")
            return
        soft = self.fused_softmax.get(t)
        if soft is not None:
            for line in _wrap(self.describe(soft)):
                self.w(indent, f"# {line}")
            self._alloc(soft, indent, soft.name)
        for line in _wrap(self.describe(t)):
            self.w(indent, f"# {line}")
        shape = (["nb"] if t.row else []) + [str(n) for n in t.shape]
        name = acc_name or t.name
        if not t.accumulates:
            if shape:
                self._alloc(t, indent, name)
        plan = self.gemm.get(t)
        if plan is not None:
            self._emit_gemm(t, plan, indent, name)
            return
        body = self.expr(self.body(t))
        loops = []
        if t.row or t.accumulates:
            loops.append(("r", "nb"))
        loops += [(self.loopvar(i), str(axis_range(i))) for i in t.free]
        inner = [(self.loopvar(i), str(axis_range(i))) for i in t.over if i != ROW]
        target = self._target(t, name)
        if not shape and not t.accumulates and not loops and not inner:
            self.w(indent, f"{name} = {body}")
            return
        if t.accumulates and not t.free:
            self.w(indent, "s = 0.0")
            self.w(self._loops(indent, loops + inner), f"s += {body}")
            self.w(indent, f"{name} += s")
            return
        depth = self._loops(indent, loops)
        if t.accumulates:
            self.w(self._loops(depth, inner), f"{target} += {body}")
        else:
            self._emit_value(t, body, inner, depth, target)

    def _emit_value(self, t, body, inner, depth, target):
        """``target`` = t's value (a map, a sum or a log-sum-exp over the ``inner`` loops)."""
        if t.kind == "map":
            self.w(depth, f"{target} = {body}")
        elif t.kind == "sum":
            self.w(depth, "s = 0.0")
            self.w(self._loops(depth, inner), f"s += {body}")
            self.w(depth, f"{target} = s")
        else:
            self._emit_lse(t, body, inner, depth, target)

    def _loops(self, depth: int, loops) -> int:
        """Opens ``for var in range(n)`` for each (var, n); returns the body's depth."""
        for var, n in loops:
            self.w(depth, f"for {var} in range({n}):")
            depth += 1
        return depth

    def _emit_lse(self, t, body, inner, depth, target):
        """m = the largest term, then m + log(sum exp(term - m)): never overflows. When t's
        softmax is stored too it is made in the same pass: e = exp(term - m) is each softmax
        entry times the sum, so the softmax costs a multiplication, not a second exp."""
        self.printer.helpers_used.add("_max2")
        soft = self.fused_softmax.get(t)
        self.w(depth, "m = -math.inf")
        self.w(self._loops(depth, inner), f"m = _max2(m, {body})")
        self.w(depth, "s = 0.0")
        d = self._loops(depth, inner)
        if soft is None:
            self.w(d, f"s += math.exp({body} - m)")
        else:
            starget = self._target(soft, soft.name)
            self.w(d, f"e = math.exp({body} - m)")
            self.w(d, f"{starget} = e")
            self.w(d, "s += e")
        self.w(depth, f"{target} = m + math.log(s) if math.isfinite(m) else m")
        if soft is not None:
            self.w(depth, "inv = 1.0 / s")
            self.w(self._loops(depth, inner), f"{starget} *= inv")

    def _target(self, t: Tensor, name: str) -> str:
        idx = (["r"] if t.row else []) + [self.loopvar(i) for i in t.free]
        return f"{name}[{', '.join(idx)}]" if idx else name

    def _emit_gemm(self, t: Tensor, plan, indent: int, name: str):
        """One BLAS call (BLAS_SOURCE): ``name`` := (or +=, for an accumulator) coeff op(a) op(b)."""
        coeff, a, b, ta, tb = plan
        ca, cb = self.code(self.g.tensor_of(a)), self.code(self.g.tensor_of(b))
        alpha = "1.0" if coeff == 1 else self.expr(coeff)
        beta = "1.0" if t.accumulates else "0.0"
        rank_a, rank_b = (len(getattr(ref, "indices", ())) + (1 if self.g.tensor_of(ref).row else 0) for ref in (a, b))
        if rank_a == 2 and rank_b == 2:
            self.w(indent, f"_gemm({ta}, {tb}, {alpha}, {ca}, {cb}, {beta}, {name})")
        elif rank_a == 2:  # matrix . vector
            self.w(indent, f"_gemv({ta}, {alpha}, {ca}, {cb}, {beta}, {name})")
        else:  # vector . matrix = matrix.T . vector
            self.w(indent, f"_gemv({not tb}, {alpha}, {cb}, {ca}, {beta}, {name})")

    # -- the two functions ----------------------------------------------------------------
    def accumulators(self) -> list:
        return [t for t in self.order if t.kind != "input" and t.accumulates]

    def acc_layout(self) -> dict:
        out, o = {}, 0
        for t in self.accumulators():
            out[t] = o
            o += t.size
        return out

    def _param_views(self, indent: int, which: set):
        for t in self.params + self.directions:
            if t not in which:
                continue
            src = "theta" if t.role == "param" else "v"
            o = self._offset(t)
            if t.free:
                self.w(indent, f"{self.code(t)} = {src}[{o}:{o + t.size}].reshape(({', '.join(map(str, t.shape))},))")
            else:
                self.w(indent, f"{self.code(t)} = {src}[{o}]")

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

    def print_rows(self, fname: str, data_args: list[str], mode=None):
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
        self.w(0, "@_jit")
        tail = ", cache" if mode is not None else ""
        self.w(0, f"def {fname}(theta, v, {', '.join(data_args)}, r0, r1, scale, acc{tail}):")
        what = "per-row values into acc[r0:r1]" if self.spec.rowwise is not None else "the sums over rows into acc"
        if mode == "fill":
            what = "the rows' tensors that do not depend on v, into cache"
        elif mode == "read":
            what += " (the tensors that do not depend on v read from cache)"
        self.w(1, f'"""{self.spec.kind}: {what}, rows r0 … r1-1 in blocks of BLOCK"""')
        self._param_views(1, need)
        for t in a_tensors:
            self.emit(t, 1)
        for t in (self.accumulators() if mode != "fill" else []):
            if t.free:
                o = layout[t]
                self.w(1, f"{t.name} = acc[{o}:{o + t.size}].reshape(({', '.join(map(str, t.shape))},))")
        block_at = len(self.lines)
        self.n_lanes = 0
        self.w(1, "for q0 in range(r0, r1, BLOCK):")
        self.w(2, "q1 = min(q0 + BLOCK, r1)")
        self.w(2, "nb = q1 - q0")
        for t in self.data:
            if t in need:
                self.w(2, f"{self.code(t)} = data_{t.code}[q0:q1]")
        self._emit_block(b_tensors, layout)
        if self.n_lanes:
            self.lines.insert(block_at, f"    lanes = np.empty(({self.n_lanes}, LANES))  # the fused row loops' sums, lane by lane")
        if self.spec.rowwise is not None:
            t = self.spec.rowwise
            self.w(2, "# the values of every row of the block")
            self.w(2, "for r in range(nb):")
            depth = 3
            for i in t.free:
                self.w(depth, f"for {self.loopvar(i)} in range({axis_range(i)}):")
                depth += 1
            idx = [self.loopvar(i) for i in t.free]
            src = self._target(t, self.code(t))
            self.w(depth, f"acc[{', '.join(['q0 + r'] + idx)}] = {src}")
        self.w()
        self.w()

    # -- phase B: a block's tensors, the per-row scalars fused into one loop over its rows ------
    def _row_scalar(self, t: Tensor) -> bool:
        """One number per row (or a sum over rows of one): computed in the block's fused row
        loop, its value a local of the loop (no array), unless it is a matrix product, the
        softmax of a fused log-sum-exp, or read from the Hessian-vector products' cache."""
        return (t.kind != "input" and not t.free and t.iterates_rows and t not in self.gemm
                and t not in self.fused and t not in self.fused_softmax
                and not (self.mode is not None and t in self.cached))

    def _emit_block(self, b_tensors, layout):
        """Phase B in order, except that the per-row scalars go into one loop over the block's
        rows (closed before a tensor that reads a member): each row's values are computed once
        and read where they are, and each sum over the rows is a local added into acc once a
        block, in the same order as a loop of its own."""
        readers: dict = {}
        for t in b_tensors:
            for u, _, _ in self.g.occurrences(self.body(t)):
                readers.setdefault(u, set()).add(t)
        group: list = []
        for t in b_tensors:
            if self._row_scalar(t):
                group.append(t)
                continue
            if group and any(u in group for u, _, _ in self.g.occurrences(self.body(t))):
                self._emit_row_loop(group, layout, readers)
                group = []
            if t.accumulates and not t.free:
                self.emit(t, 2, acc_name=f"acc[{layout[t]}]")
            else:
                self.emit(t, 2)
        if group:
            self._emit_row_loop(group, layout, readers)

    def _emit_row_loop(self, group, layout, readers):
        """One loop over the block's rows for ``group`` (see _emit_block). When every member is
        a map or a sum over the rows alone, their common subexpressions are computed once a
        row (SymPy's cse of the members' bodies: small, per-row expressions), and the sums
        are kept in LANES partial sums, row r in lane r % LANES (the rest of the block in
        lane 0), added in lane order into acc: the loop over a group of LANES rows then
        vectorises."""
        members = set(group)
        kept = [t for t in group if t.row and (t is self.spec.rowwise or readers.get(t, set()) - members)]
        for t in group:
            for line in _wrap(self.describe(t)):
                self.w(2, f"# {line}")
        for t in kept:
            self._alloc(t, 2, t.name)
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
            for t in sums:
                self.w(2, f"s_{t.name} = 0.0")
            self.w(2, "for r in range(nb):")
            self._row_members(group, kept, 3, bodies, temps)
            for t in sums:
                self.w(2, f"acc[{layout[t]}] += s_{t.name}")
            return
        lane_of = {t: self.n_lanes + k for k, t in enumerate(sums)}
        self.n_lanes += len(sums)
        first = lane_of[sums[0]]
        self.w(2, f"for k in range({first}, {first + len(sums)}):")
        self.w(3, "for lane in range(LANES):")
        self.w(4, "lanes[k, lane] = 0.0")
        self.w(2, "for q in range(0, nb - LANES + 1, LANES):")
        self.w(3, "for lane in range(LANES):")
        self.w(4, "r = np.uintp(q + lane)")
        self._row_members(group, kept, 4, bodies, temps, lane_of, "lane")
        self.w(2, "for r in range(nb - nb % LANES, nb):  # the block's last rows, in lane 0")
        self._row_members(group, kept, 3, bodies, temps, lane_of, "0")
        for t in sums:  # the lanes' sums, in lane order
            self.w(2, f"s = lanes[{lane_of[t]}, 0]")
            self.w(2, "for lane in range(1, LANES):")
            self.w(3, f"s += lanes[{lane_of[t]}, lane]")
            self.w(2, f"acc[{layout[t]}] += s")

    def _row_members(self, group, kept, depth, bodies, temps=(), lane_of=None, lane="lane"):
        """One row's values of the group's members at ``depth`` (r is the row). ``bodies``:
        the members' bodies after cse (else their own), ``temps``: [(u, expression)]."""
        done: set = set()
        pending = list(temps)
        for t in group:
            body = bodies.get(t, self.body(t))
            if pending:  # the temporaries this body reads, with those they read, in cse's order
                need = set(body.free_symbols)
                for u, e in reversed(pending):
                    if u in need:
                        need |= e.free_symbols
                for u, e in [p for p in pending if p[0] in need and p[0] not in done]:
                    self.local_syms[u] = f"{u.name}"
                    self.w(depth, f"{u.name} = {self.expr(e)}")
                    done.add(u)
            text = self.expr(body)
            inner = [(self.loopvar(i), str(axis_range(i))) for i in t.over if i != ROW]
            local = f"{t.name}_r"
            if t.accumulates:
                if lane_of is not None:
                    self.w(depth, f"lanes[{lane_of[t]}, {lane}] += {text}")
                else:
                    self.w(self._loops(depth, inner), f"s_{t.name} += {text}")
                continue
            self._emit_value(t, text, inner, depth, local)
            self.local_rows.add(t)
            if t in kept:
                self.w(depth, f"{t.name}[r] = {local}")
        self.local_rows = set()
        self.local_syms = {}

    def print_finish(self, fname: str):
        """``<kind>_finish``: phase A and C after the stripes' sums are added; the outputs."""
        roots = [t for _, t, _ in self.spec.outputs if isinstance(t, Tensor)]
        need = self._needs(roots)
        layout = self.acc_layout()
        self.w(0, "@_jit")
        self.w(0, f"def {fname}(theta, v, acc, out):")
        self.w(1, f'"""{self.spec.kind}: the outputs from the sums over rows in acc"""')
        self._param_views(1, need)
        for t in self.order:
            if t.kind == "input" or t not in need:
                continue
            if t.accumulates:
                o = layout[t]
                if t.free:
                    self.w(1, f"{t.name} = acc[{o}:{o + t.size}].reshape(({', '.join(map(str, t.shape))},))")
                else:
                    self.w(1, f"{t.name} = acc[{o}]")
            elif self.phase[t] in ("A", "C"):
                self.emit(t, 1)
        o = 0
        for label, t, size in self.spec.outputs:
            self.w(1, f"# {label}")
            # loops, not slice assignments: Numba takes about 2 s to compile an array setitem
            if not isinstance(t, Tensor):
                self.w(1, f"for q in range({size}):")
                self.w(2, f"out[{o} + q] = 0.0")
            elif t.free:
                self.w(1, f"flat = {self.code(t)}.ravel()")
                self.w(1, f"for q in range({size}):")
                self.w(2, f"out[{o} + q] = flat[q]")
            else:
                self.w(1, f"out[{o}] = {self.code(t)}")
            o += size
        self.w()
        self.w()


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
    """(source lines, helper names used, accumulator size) of one kernel kind."""
    wr = _Writer(g, spec, params, data, directions, has_data)
    data_args = [f"data_{t.code}" for t in data] or ["data_none"]
    if has_data:
        wr.print_rows(f"{spec.kind}_rows", data_args)
        if spec.kind == "hvp" and wr.plan_cache():
            # a point's products share its forward sweep: computed once, then read
            wr.print_rows(f"{spec.kind}_lin_rows", data_args, mode="fill")
            wr.print_rows(f"{spec.kind}_at_rows", data_args, mode="read")
            wr.lines.append(f"HVP_CACHE = {[(t.name, list(t.shape)) for t in wr.cached]!r}")
            wr.lines.append("")
        wr.mode = None
    if spec.rowwise is None:
        wr.print_finish(f"{spec.kind}_finish")
    size = sum(t.size for t in wr.accumulators())
    # data whose every entry is multiplied into an output's sum (an operand of a contraction
    # summed over the rows): a NaN or infinity there leaves that output non-finite, so the
    # caller's test of the outputs covers it; other data are checked before the call
    covered = sorted({wr.g.tensor_of(ref).name for t, plan in wr.gemm.items() if t.accumulates and t in wr.needed
                      for ref in plan[1:3] if wr.g.tensor_of(ref).role == "data"})
    wr.lines.append(f"COVERED_{spec.kind.upper()} = {tuple(covered)!r}")
    wr.lines.append("")
    return wr.lines, wr.printer.helpers_used, size
