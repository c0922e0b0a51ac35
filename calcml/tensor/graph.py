"""Tensor programs in index form, and their exact derivatives, never expanded.

A cost stated in index notation is lowered to a DAG of *tensors*. Each tensor has free
indices (its axes), and is an input (a parameter, a data tensor, a class label) or is
defined elementwise by a small SymPy *body* over its free and summed indices:

* ``map``: ``t[free] = body``;
* ``sum``: ``t[free] = sum over `over` of body`` (a contraction when the body is a product);
* ``lse``: ``t[free] = log sum over `over` of exp(body)`` (evaluated overflow-free).

In a body, another tensor appears as ``IndexedBase(name)[indices]`` (or a ``Symbol`` when it
has no axis): the same notation the user wrote. Every tensor that reads data depends on the
row, an implicit index ``r`` (:data:`ROW`); a tensor summed over ``r`` is an *accumulator*,
summed over blocks of rows and then over threads' stripes in a fixed order.

Derivatives are reverse mode over this DAG (Laue, Mitterreiter & Giesen, "A Simple and
Efficient Tensor Calculus", AAAI 2020): the adjoint of ``t`` is a tensor with ``t``'s axes,
and the contribution of a body to the adjoint of a tensor it reads at ``u[a]`` is

    adj_u[a] += sum over (t's free and summed indices not in a) of adj_t[free] * d body / d u[a]

(times ``exp(body - t)``, the softmax, for ``lse``): the adjoint of a contraction is a
contraction. Only scalar bodies are ever differentiated by SymPy, each a few operations
long, so the derivation's cost grows with the statement, not with the tensors' sizes.
Hessian-vector products are forward mode over the reverse sweep (forward-over-reverse):
each tensor's tangent in a direction ``v`` of the parameters is again a tensor of the same
axes.
"""

from __future__ import annotations

import keyword
from collections import defaultdict

import sympy as sp

from ..errors import CostError
from .statement import Label, LogSumExp, axis_range

__all__ = ["ROW", "SCALE", "Tensor", "Graph"]

ROW = sp.Idx("r")  # the row of the data: implicit in every row tensor, explicit in accumulators' sums
SCALE = sp.Symbol("scale", positive=True)  # the per-row seed: 1/N for a mean, 1 for a sum


class Tensor:
    """One node: an input or a derived tensor (see the module docstring)."""

    def __init__(self, name, free, row, kind, body=None, over=(), role="derived", placeholder=None, note=""):
        self.name = name
        self.free = tuple(free)
        self.row = bool(row)
        self.kind = kind  # "input", "map", "sum", "lse"
        self.body = body
        self.over = tuple(over)
        self.role = role  # inputs: "param", "data", "label", "direction"; else "derived"
        self.placeholder = placeholder
        self.note = note  # what it is, for the generated code's comments
        self.code = name  # its name in generated code (inputs: see Graph.add_input)

    @property
    def shape(self) -> tuple:
        return tuple(axis_range(i) for i in self.free)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def accumulates(self) -> bool:
        """Summed over the rows: computed block by block, its sums added up."""
        return ROW in self.over

    @property
    def iterates_rows(self) -> bool:
        return self.row or self.accumulates

    def ref(self, idx=None):
        """This tensor read at ``idx`` (its own axes by default), as a body expression."""
        idx = self.free if idx is None else tuple(idx)
        if not self.free:
            return self.placeholder
        return self.placeholder[idx]

    def __repr__(self):
        return f"<{self.kind} {self.name}{list(self.free)}{' row' if self.row else ''}>"


def index_terms(e):
    """``(((i, c), ...), s)`` of an index expression ``c1*i1 + c2*i2 + ... + s``: indices with
    coefficients 1 or -1 (each index once) and a whole number ``s``; None for anything else. A
    statement reads ``x[i]``, ``x[i + 1]``, ``x[t + l]``; the derivatives read ``a[m - l]``."""
    if isinstance(e, sp.Idx):
        return ((e, 1),), 0
    if not isinstance(e, sp.Add):
        return None
    terms, s = [], 0
    for a in e.args:
        if isinstance(a, sp.Integer):
            s += int(a)
        elif isinstance(a, sp.Idx):
            terms.append((a, 1))
        elif isinstance(a, sp.Mul) and len(a.args) == 2 and a.args[0] == -1 and isinstance(a.args[1], sp.Idx):
            terms.append((a.args[1], -1))
        else:
            return None
    if not terms or len({i for i, _ in terms}) != len(terms):
        return None
    return tuple(terms), s


def _index_atoms(e) -> list:
    """The indices an index expression varies over (none for a number or a label)."""
    found = index_terms(e)
    return [i for i, _ in found[0]] if found is not None else []


def _is_ref(e) -> bool:
    return isinstance(e, (sp.Indexed, sp.Symbol)) and not isinstance(e, sp.Idx)


class Graph:
    """The tensors of one cost: inputs, the lowered statement, and derived sweeps."""

    def __init__(self):
        self.tensors: list[Tensor] = []
        self.by_placeholder: dict = {}
        self._memo: dict = {}
        self._count = 0

    # -- construction ------------------------------------------------------------------------
    def add_input(self, obj, role: str) -> Tensor:
        if isinstance(obj, sp.IndexedBase):
            free = tuple(sp.Idx(f"{obj.label}_{a}", int(n)) for a, n in enumerate(obj.shape))
            placeholder = obj
        else:
            free, placeholder = (), obj
        row = role in ("data", "label")
        t = Tensor(str(obj.label if isinstance(obj, sp.IndexedBase) else obj.name), free, row, "input",
                   role=role, placeholder=placeholder)
        # the name in generated code: the user's own when it is a plain identifier, else a
        # made-up one (a name is never code: "x\nimport os" must stay a name)
        taken = {u.code for u in self.tensors if u.kind == "input"}
        code = t.name
        if not (code.isascii() and code.isidentifier() and not keyword.iskeyword(code)) or code in taken:
            code = f"_{role}{len(self.tensors)}"
            while code in taken:
                code += "_"
        t.code = code
        self.tensors.append(t)
        self.by_placeholder[placeholder] = t
        return t

    def derived(self, kind, body, free, over=(), row=None, note="", prefix="t") -> Tensor:
        """A derived tensor (shared when the same definition was made before)."""
        body = sp.sympify(body)
        free, over = tuple(free), tuple(over)
        if kind == "sum" and not over:
            kind = "map"
        if row is None:
            row = self.reads_rows(body) and ROW not in over
        key = (kind, body, free, over, row)
        found = self._memo.get(key)
        if found is not None:
            return found
        self._count += 1
        name = f"{prefix}{self._count}"
        placeholder = sp.IndexedBase(name, shape=tuple(axis_range(i) for i in free)) if free else sp.Symbol(name)
        t = Tensor(name, free, row, kind, body, over, placeholder=placeholder, note=note)
        self.tensors.append(t)
        self.by_placeholder[placeholder] = t
        self._memo[key] = t
        return t

    # -- reading bodies ----------------------------------------------------------------------
    def tensor_of(self, e):
        if isinstance(e, sp.Indexed):
            return self.by_placeholder.get(e.base)
        if isinstance(e, sp.Symbol):
            return self.by_placeholder.get(e)
        return None

    def occurrences(self, body) -> list:
        """Distinct tensor reads in ``body``: [(tensor, index tuple, the read expression)]."""
        out, seen = [], set()
        for e in sp.preorder_traversal(body):
            if e in seen:
                continue
            t = self.tensor_of(e) if _is_ref(e) else None
            if t is not None:
                seen.add(e)
                out.append((t, tuple(e.indices) if isinstance(e, sp.Indexed) else (), e))
        return out

    def reads_rows(self, body) -> bool:
        return any(t.row for t, _, _ in self.occurrences(body))

    def free_indices(self, body) -> list:
        """The indices ``body`` varies over, in order of first appearance."""
        found: list = []

        def add(i):
            if isinstance(i, sp.Idx) and i not in found:
                found.append(i)

        for e in sp.preorder_traversal(body):
            if isinstance(e, sp.Indexed):
                for i in e.indices:
                    for j in _index_atoms(i):
                        add(j)
            elif isinstance(e, sp.KroneckerDelta):
                for i in e.args:
                    for j in _index_atoms(i):
                        add(j)
        return found

    def depends(self, t: Tensor, roles: set) -> bool:
        """Whether ``t`` depends on an input of one of ``roles``."""
        memo = self._dep_memo = getattr(self, "_dep_memo", {})
        key = (t, frozenset(roles))
        if key in memo:
            return memo[key]
        if t.kind == "input":
            r = t.role in roles
        else:
            r = any(self.depends(u, roles) for u, _, _ in self.occurrences(t.body))
        memo[key] = r
        return r

    # -- calculus ----------------------------------------------------------------------------
    def partials(self, t: Tensor, wrt_roles=("param", "direction")) -> list:
        """[(u, index tuple, d body / d u[index])] for each read of a tensor that varies."""
        occ = [(u, idx, e) for u, idx, e in self.occurrences(t.body) if self.depends(u, set(wrt_roles))]
        if not occ:
            return []
        dummies = {e: sp.Dummy(f"d_{u.name}", real=True) for u, idx, e in occ}  # real: Abs, sign differentiate
        back = {d: e for e, d in dummies.items()}
        body = t.body.xreplace(dummies)
        out = []
        for u, idx, e in occ:
            d = sp.diff(body, dummies[e])
            if d != 0:
                out.append((u, idx, d.xreplace(back)))
        return out

    def reverse(self, roots, wrt, per_row: bool = False) -> dict:
        """Adjoints of the inputs ``wrt`` from ``roots`` = [(tensor, seed expression)].

        Contributions of a row-iterating tensor to a tensor that does not depend on the row
        are summed over the rows (accumulators), unless ``per_row`` (the per-row derivative,
        for display). Returns {input: adjoint expression read at the input's own axes}."""
        contribs: dict = defaultdict(list)
        for t, seed in roots:
            contribs[t].append(sp.sympify(seed))
        for t in reversed(self.tensors):
            if t.kind == "input" or t not in contribs:
                continue
            adj = self._combine(t, contribs.pop(t))
            for u, idx, d in self.partials(t):
                local = self._reuse(t, d)
                if t.kind == "lse":  # d log sum exp(b) = softmax * d b
                    local = self.softmax(t).ref() * d
                body = adj * local
                body, idx, gone = self._window(u, idx, body)
                summed = [i for i in t.free + t.over if i not in idx and i not in gone and i != ROW]
                rows = t.iterates_rows and not u.row and not per_row
                over = summed + ([ROW] if rows else [])
                c = self.derived("sum", body, idx, over, row=t.iterates_rows and (u.row or per_row),
                                 note=f"contribution to the adjoint of {u.name}", prefix="c")
                contribs[u].append(c.ref(u.free))
        return {u: self._combine(u, contribs.get(u, [])) for u in wrt}

    @staticmethod
    def _window(u: Tensor, idx: tuple, body):
        """A contribution ``body`` to the adjoint of ``u`` from a read ``u[idx]``, at u's own
        axes: ``(body, axes, indices no longer in it)``. A plain read (``W[k, j]``, each index
        over its axis's whole range) is its own axes. A read of a window, ``x[i + s]`` with
        ``i`` over ``0 … n_i-1``, reaches entries ``s … s+n_i-1`` of its axis: the contribution
        at entry ``m`` is the body at ``i = m - s`` there and 0 elsewhere, a ``Piecewise`` that
        the kernels print as a conditional expression (the read at ``m - s`` only where it is in
        range). So the adjoint of a shifted read is a shifted read, never a sum over the axis.
        A read at a sum of indices (``x[t + l]``, a convolution) is solved for its index of the
        longest range (``t = m - l``); the others stay summed: entry ``m`` receives the terms
        of every ``l`` whose ``t`` is in range."""
        subs, conds, axes = {}, [], []
        for a, e in enumerate(idx):
            terms, s = index_terms(e)
            n_axis = axis_range(u.free[a])
            if len(terms) == 1 and terms[0][1] == 1 and s == 0 and axis_range(terms[0][0]) == n_axis:
                axes.append(terms[0][0])
                continue
            i, c = max(terms, key=lambda ic: axis_range(ic[0]))  # the first of the longest
            m = sp.Idx(f"{u.name}_w{a}", n_axis)
            at = c * (m - s - sum(cj * j for j, cj in terms if j is not i))  # i where e = m
            subs[i] = at
            conds += [cond for cond in (at >= 0, at <= axis_range(i) - 1) if cond is not sp.true]
            axes.append(m)
        if not subs:
            return body, idx, ()
        body = body.xreplace(subs)
        if conds:
            body = sp.Piecewise((body, sp.And(*conds)), (0, True))
        return body, tuple(axes), tuple(subs)

    def softmax_of(self, t: Tensor):
        """The softmax tensor of log-sum-exp ``t`` if one was made, else None."""
        over = [i for i in t.over if i != ROW]
        key = ("map", sp.exp(t.body - t.ref()), tuple(list(t.free) + over), tuple(), t.row)
        return self._memo.get(key)

    @staticmethod
    def _reuse(t: Tensor, d):
        """A derivative of map ``t``'s body that holds the body itself (exp(u)' = exp(u) u',
        tanh's 1 - tanh^2) reads ``t`` instead: computed once, not again per reader."""
        if t.kind == "map" and t.free is not None and isinstance(d, sp.Basic) and d.has(t.body) and t.body.args:
            return d.xreplace({t.body: t.ref()})
        return d

    def softmax(self, t: Tensor) -> Tensor:
        """exp(body - t) of a log-sum-exp tensor ``t``, over t's free and summed indices: the
        derivative of ``t`` with respect to its body (one tensor, shared by every reader)."""
        over = [i for i in t.over if i != ROW]
        return self.derived("map", sp.exp(t.body - t.ref()), list(t.free) + over, row=t.row,
                            note=f"softmax over {', '.join(str(i) for i in over)} of {t.name}'s terms", prefix="s")

    def _combine(self, t: Tensor, terms):
        """The adjoint of ``t`` as an expression at t's axes (a sum of contributions)."""
        if not terms:
            return sp.S.Zero
        total = sp.Add(*terms)
        if len(terms) == 1 or not t.free:
            return total
        a = self.derived("map", total, t.free, note=f"adjoint of {t.name}", prefix="a")
        return a.ref()

    def tangents(self, exprs, directions: dict) -> list:
        """Forward-mode tangents of ``exprs`` (each an expression over tensor reads) when each
        parameter input ``p`` moves along ``directions[p]`` (a direction input)."""
        memo: dict = {}

        def tan(t: Tensor):
            if t in memo:
                return memo[t]
            if t.kind == "input":
                r = directions.get(t) if t.role == "param" else None
            else:
                dbody = _guarded(self._reuse(t, tan_expr(t.body)))
                if dbody == 0:
                    r = None
                else:
                    kind = t.kind
                    if kind == "lse":
                        dbody, kind = self.softmax(t).ref() * dbody, "sum"
                    r = self.derived(kind, dbody, t.free, t.over, row=t.row, note=f"tangent of {t.name}", prefix="d")
            memo[t] = r
            return r

        def tan_expr(e):
            terms = []
            for u, idx, d in self.partials_expr(e):
                du = tan(u)
                if du is not None:
                    terms.append(d * du.ref(idx))
            return sp.Add(*terms)

        return [tan_expr(e) for e in exprs]

    def partials_expr(self, e) -> list:
        probe = Tensor("probe", (), False, "map", body=e)
        return self.partials(probe)


def _guarded(e):
    """``e`` with every read of a window's guarded body inside its guard: the tangent of a
    ``Piecewise((b, m >= 1), (0, True))`` is that Piecewise's derivative times a tangent read at
    ``m - 1``, which must not be evaluated where the guard is false (at m = 0 it is off the
    array: memory, and 0 times a NaN found there is NaN). ``piecewise_fold`` moves the product
    into the Piecewise; bodies are a few operations, so it stays cheap."""
    if not isinstance(e, sp.Basic) or not e.has(sp.Piecewise):
        return e
    shifted = any(any(not isinstance(i, sp.Idx) for i in r.indices) for r in e.atoms(sp.Indexed))
    return sp.piecewise_fold(e) if shifted else e


def check_index(i, where: str, n_expected=None, axis_of=None) -> sp.Idx:
    if not isinstance(i, sp.Idx):
        raise CostError(f"{where}: index {i} must be an index from cm.index (a SymPy Idx), got {type(i).__name__}")
    n = axis_range(i)
    if n is None:
        raise CostError(f"{where}: index {i} needs a range 0 … n-1 (make it with cm.index({str(i.label)!r}, n))")
    if n_expected is not None and n != n_expected:
        raise CostError(f"{where}: index {i} runs over 0 … {n - 1} but {axis_of} has length {n_expected}")
    return i


def entries_as_sums(e):
    """Each fixed entry of a tensor (``a[0]``, ``W[k, 2]``) as the sum that picks it,
    ``Sum(KroneckerDelta(a_e0, 0)*a[a_e0], a_e0)`` over an index of that axis: calcml's calculus
    reads tensors through indices, and the adjoint of that sum is the one-hot that sends the
    gradient to that entry alone. An entry outside its axis is named."""
    def fixed(x):
        return isinstance(x, sp.Indexed) and any(isinstance(i, sp.Integer) for i in x.indices)

    def as_sum(x):
        base, shape = x.base, x.base.shape
        if shape is None or len(shape) != len(x.indices):
            return x  # the lowering names the problem
        new, picks = [], []
        for a, (i, n) in enumerate(zip(x.indices, shape)):
            if isinstance(i, sp.Integer):
                if not 0 <= int(i) < int(n):
                    raise CostError(f"{x}: entry {i} is outside axis {a} of {base.label}, which runs over 0 … {int(n) - 1}")
                ax = sp.Idx(f"{base.label}_e{a}", int(n))  # not <name>_<axis>: the generic entry's index
                new.append(ax)
                picks.append((ax, i))
            else:
                new.append(i)
        body = base[tuple(new)] * sp.Mul(*[sp.KroneckerDelta(ax, i) for ax, i in picks])
        return sp.Sum(body, *[(ax, 0, int(ax.upper)) for ax, _ in picks])

    if not isinstance(e, sp.Basic) or not e.has(sp.Indexed):
        return e
    return e.replace(fixed, as_sum)


class Lowering:
    """A user's index-notation expression -> tensors of a :class:`Graph`, validated."""

    def __init__(self, graph: Graph, known: dict, stabilize: bool = True):
        self.g = graph
        self.known = known  # placeholder (IndexedBase / Symbol) -> input tensor
        self.stabilize = stabilize  # False: the statement's checks alone (no rewrite)
        self.shifted: set = set()  # (tensor, index) pairs: the tensor read shifted by the index (see lower)

    def lower(self, e):
        """``e`` lowered: its sums and log-sum-exps tensors of the graph, its reads checked."""
        # a tensor the statement reads shifted by an index (x[i + 1]) may be read by that index
        # plainly over a window of its axis too (x[i] over 0 … n-2)
        self.shifted |= {(x.base, j) for x in sp.preorder_traversal(e) if isinstance(x, sp.Indexed)
                         for i in x.indices if not isinstance(i, sp.Idx) for j in _index_atoms(i)}
        return self._lower(e)

    def _lower(self, e):
        if isinstance(e, sp.Sum):
            return self._sum(e)
        if isinstance(e, LogSumExp):
            body = self._lower(e.args[0])
            return self._reduce("lse", body, (check_index(e.args[1], "cm.logsumexp"),), e)
        if isinstance(e, sp.log) and isinstance(e.args[0], sp.Sum) and isinstance(e.args[0].function, sp.exp) \
                and len(e.args[0].limits) == 1:
            # log(sum exp(z)): the same as cm.logsumexp, and compiled overflow-free as it is
            inner = e.args[0]
            i = self._limit(inner.limits[0], inner)
            return self._reduce("lse", self._lower(inner.function.args[0]), (i,), e)
        if isinstance(e, sp.Indexed):
            return self._indexed(e)
        if isinstance(e, sp.IndexedBase):
            raise CostError(f"tensor {e.label} appears without indices; write its entries, e.g. {e.label}[k]")
        if isinstance(e, sp.Idx):
            raise CostError(f"index {e} is used as a number; calcml indices only select entries")
        if isinstance(e, sp.KroneckerDelta):
            for a in e.args:
                if not isinstance(a, (sp.Idx, Label, sp.Integer)):
                    raise CostError(f"KroneckerDelta{e.args}: each argument must be an index, a class label or "
                                    f"an entry number")
                if isinstance(a, Label) and a not in self.known:
                    raise CostError(f"class label {a.name!r} in {e} is not in the cost's data")
                if isinstance(a, sp.Idx):
                    check_index(a, f"{e}")
            labels = [a for a in e.args if isinstance(a, Label)]
            idxs = [a for a in e.args if isinstance(a, sp.Idx)]
            if labels and idxs and axis_range(idxs[0]) != labels[0].classes:
                raise CostError(f"{e}: label {labels[0].name!r} has {labels[0].classes} classes but index "
                                f"{idxs[0]} runs over 0 … {axis_range(idxs[0]) - 1}")
            return e
        if isinstance(e, sp.Symbol):
            if e not in self.known:
                raise CostError(f"symbol {e.name!r} in the expression is neither a parameter nor data")
            if isinstance(e, Label):
                raise CostError(f"class label {e.name!r} can only be compared with an index: use cm.onehot({e.name}, k)")
            return e
        if isinstance(e, (sp.Derivative, sp.Integral, sp.Product)):
            raise CostError(f"the cost holds an unevaluated {type(e).__name__}: {e}")
        if not e.args:
            return e
        return e.func(*[self._lower(a) for a in e.args])

    def _limit(self, limit, where):
        i = limit[0]
        check_index(i, f"the sum {where}")
        lo, hi = (limit[1], limit[2]) if len(limit) == 3 else (i.lower, i.upper)
        if lo != i.lower or hi != i.upper:
            raise CostError(f"the sum {where} runs {i} over {lo} … {hi}, but index {i} ranges over "
                            f"{i.lower} … {i.upper}; calcml sums over an index's whole range")
        return i

    def _sum(self, e: sp.Sum):
        body = self._lower(e.function)
        over = tuple(self._limit(lim, e) for lim in e.limits)
        return self._reduce("sum", body, over, e)

    def stable(self, body):
        """``body`` in numerically stable form (calcml.rewrite: log(1+exp(z)) -> softplus(z),
        ...). A body is a few operations (sums are separate tensors), so the rewrite's
        polynomial steps stay small; if one fails, the body is kept as stated."""
        if not self.stabilize:
            return body
        from ..rewrite import stabilize

        try:
            return stabilize(body)
        except Exception:  # noqa: BLE001 - an optimisation, not a requirement
            return body

    def _hoist(self, body, context):
        """A function of fewer indices than the sum runs over (``tanh(t[h] + b[h])`` inside a sum
        over ``k`` and ``h``) becomes a tensor of its own, computed once per value of its own
        indices: not again for every ``k``. The sum's body is then often a product of two
        tensors: a matrix product."""
        ctx = set(context)

        def visit(e):
            if not e.args or isinstance(e, (sp.Indexed, sp.Symbol, sp.Idx, sp.KroneckerDelta)):
                return e
            e = e.func(*[visit(a) for a in e.args])
            if isinstance(e, sp.Function) or (isinstance(e, sp.Pow) and not e.exp.is_Integer):
                idx = self.g.free_indices(e)
                if set(idx) < ctx:
                    return self.g.derived("map", e, idx, note=f"{sp.sstr(e)[:60]}, once per {', '.join(map(str, idx)) or 'row'}",
                                          prefix="h").ref()
            return e

        return visit(body)

    def _reduce(self, kind, body, over, source):
        body = self.stable(body)
        body = self._hoist(body, list(self.g.free_indices(body)) + [i for i in over if i not in self.g.free_indices(body)])
        free = [i for i in self.g.free_indices(body) if i not in over]
        t = self.g.derived(kind, body, free, over, note=sp.sstr(source))
        t.source = source if getattr(t, "source", None) is None else t.source
        return t.ref()

    def _indexed(self, e: sp.Indexed):
        base = e.base
        t = self.known.get(base)
        if t is None:
            raise CostError(f"tensor {str(base.label)!r} in {e} is neither a parameter nor data of the cost")
        if len(e.indices) != len(t.free):
            raise CostError(f"{e}: {base.label} has {len(t.free)} ax{'is' if len(t.free) == 1 else 'es'} "
                            f"(shape {t.shape}) but is indexed with {len(e.indices)}")
        for a, (i, n) in enumerate(zip(e.indices, t.shape)):
            if isinstance(i, sp.Integer):  # entries_as_sums wrote fixed entries as sums before
                raise CostError(f"{e}: a fixed entry ({i}) of {base.label}; calcml reads entries through indices "
                                f"only: write cm.sum(KroneckerDelta(k, {i}) * {base.label}[k], k)")
            found = index_terms(i)
            if found is None or any(c != 1 for _, c in found[0]):
                raise CostError(f"{e}: {i} on axis {a} of {base.label}; calcml reads an entry at an index, or at "
                                f"indices plus a whole number (x[i], x[i + 1], x[t + l])")
            terms, s = found
            if len(terms) == 1 and s == 0 and (base, terms[0][0]) not in self.shifted:
                j = terms[0][0]
                if axis_range(j) is not None and axis_range(j) != n and j in {k for _, k in self.shifted}:
                    raise CostError(f"{e}: index {j} runs over 0 … {axis_range(j) - 1} but axis {a} of {base.label} "
                                    f"has length {n}; a plain read covers its axis, unless the statement also "
                                    f"reads {base.label} shifted by {j} (then it reads a window)")
                check_index(j, f"{e}", n, f"axis {a} of {base.label}")
                continue
            for j, _ in terms:
                check_index(j, f"{e}")
            last = sum(axis_range(j) - 1 for j, _ in terms) + s
            if s < 0 or last > n - 1:
                ranges = ("index " if len(terms) == 1 else "indices ") + \
                    " and ".join(f"{j} runs over 0 … {axis_range(j) - 1}" for j, _ in terms)
                raise CostError(f"{e}: {ranges}, so {i} reaches entry {s if s < 0 else last} of axis {a} of "
                                f"{base.label}, which runs over 0 … {n - 1}; shift an index up only, over a range "
                                f"that stays inside the axis (x[i] and x[i + 1] with i over 0 … n-2)")
        used = [j for i in e.indices for j in _index_atoms(i)]
        if len(set(used)) != len(used):
            raise CostError(f"{e}: the same index twice (a diagonal); write it with KroneckerDelta instead")
        return e
