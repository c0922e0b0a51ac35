"""Scalar statements with numbered families of symbols, restated in index notation.

``w = cm.params("w", 30); x = cm.data("x", 30)`` and ``cm.dot(w, x)`` expand into thirty
products, and the scalar path's code grows with them: unrolled straight-line code that Numba
compiles in tens of seconds at this size. The same cost in index notation builds in about
two. So before compiling a scalar cost with many parameters, calcml looks for *families*
(symbols ``w0 … w{n-1}`` made by ``cm.params("w", n)`` or ``cm.data``) and for sums whose
terms are one template at every index of its families (``w_i * x_i``, ``w_i**2``), and
restates each such sum as ``Sum(template(w[j], x[j]), j)``. The restatement is exact (the
same terms, summed in another order), and is used only when every occurrence of every
family member is inside such a sum; otherwise the scalar path compiles the cost as before.

The parameter vector is unchanged: a family becomes a vector parameter only when its members
stand together, in index order, in ``cost.params``.
"""

from __future__ import annotations

import re

import sympy as sp

from ..cost import Cost
from ..dataset import is_dask
from ..errors import CostError
from .model import TensorCost

__all__ = ["lift", "LIFT_MIN_PARAMS"]

from .statement import LIFT_MIN_PARAMS  # noqa: E402,F401
# A sum is restated over a family of at least this many members.
LIFT_MIN_FAMILY = 4
# A term may read a family at neighbouring members up to this far apart (x_k and x_{k+2}).
LIFT_MAX_SHIFT = 8

_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _families(symbols) -> dict:
    """base -> [members in index order] for runs of symbols base0 … base{n-1}, contiguous in
    ``symbols`` and in index order."""
    out, i, syms = {}, 0, list(symbols)
    while i < len(syms):
        m = _NUMBERED.match(syms[i].name)
        if m and m.group(2) == "0" and m.group(1):
            base, run = m.group(1), [syms[i]]
            while i + len(run) < len(syms) and syms[i + len(run)].name == f"{base}{len(run)}":
                run.append(syms[i + len(run)])
            if len(run) >= LIFT_MIN_FAMILY and base not in out:
                out[base] = run
            i += len(run)
        else:
            i += 1
    return out


_LIFT_J = sp.Dummy("j")
_PLACEHOLDERS: dict = {}  # placeholder symbol -> (family base, shift)
_PLACEHOLDER_OF: dict = {}  # (family base, shift) -> placeholder symbol


def _placeholder(base: str, shift: int) -> sp.Dummy:
    """The symbol that stands for family ``base``'s member at the template's index plus
    ``shift`` (a Dummy, one per pair: no user's symbol is ever taken for it)."""
    p = _PLACEHOLDER_OF.get((base, shift))
    if p is None:
        p = _PLACEHOLDER_OF[(base, shift)] = sp.Dummy(f"{base}_{shift}", real=True)
        _PLACEHOLDERS[p] = (base, shift)
    return p


class _Lifter:
    def __init__(self, cost: Cost):
        self.cost = cost
        pf, df = _families(cost.params), _families(cost.data)
        taken = {s.name for s in (*cost.params, *cost.data)}
        self.tensor_of: dict = {}  # base name -> IndexedBase
        self.member: dict = {}  # symbol -> (base, index)
        self.families = {**pf, **df}
        self.param_bases = set(pf)
        self.taken = taken
        self.rows: dict = {}  # a matrix made of vector families -> its row count (see merge_rows)
        for kind, fams in (("params", pf), ("data", df)):
            for base, members in fams.items():
                name = base.rstrip("_") or base
                if not name.isidentifier() or name in taken:
                    name = f"{name}_vec"
                    if name in taken or not name.isidentifier():
                        continue
                taken.add(name)
                self.tensor_of[base] = sp.IndexedBase(name, shape=(len(members),), real=True)
                for k, s in enumerate(members):
                    self.member[s] = (base, k)
        self.sizes = {b: t.shape[0] for b, t in self.tensor_of.items()}
        self.used: set = set()

    def _template(self, term):
        """(template in a placeholder index, families it reads, the index) if every family
        member in ``term`` has one index; else None. Members are the family symbols, and the
        rows ``M[a, ...]`` (a number) of matrices made by :meth:`merge_rows`."""
        found = [s for s in term.free_symbols if s in self.member]
        rows = [e for e in term.atoms(sp.Indexed) if e.base in self.rows and e.indices[0].is_Integer]
        if not found and not rows:
            return None
        idx = {self.member[s][1] for s in found} | {int(e.indices[0]) for e in rows}
        bases = {self.member[s][0] for s in found} | {e.base for e in rows}
        if len({self.size(b) for b in bases}) != 1:
            return None
        # neighbours (x_k and x_{k+1}: chained Rosenbrock, differences) read shifted, x[j + 1]
        k = min(idx)
        if len(idx) > 1 and (rows or max(idx) - k > LIFT_MAX_SHIFT):
            return None
        # the template's key: members as placeholder symbols (cheap to build and compare; the
        # same term with Indexed reads costs SymPy's assumptions on every power of a sum)
        key = {s: _placeholder(self.member[s][0], self.member[s][1] - k) for s in found}
        key.update({e: e.base[(_LIFT_J,) + tuple(e.indices[1:])] for e in rows})
        return term.xreplace(key), frozenset(bases), k, max(idx) - k

    def _indexed(self, template, j):
        """A template's placeholders (see _template) as reads of the families' tensors at ``j``."""
        subs = {}
        for p in template.free_symbols:
            found = _PLACEHOLDERS.get(p)
            if found is not None:
                subs[p] = self.tensor_of[found[0]][j + found[1]]
        return template.xreplace({_LIFT_J: j, **subs})

    def size(self, base) -> int:
        return self.rows[base] if base in self.rows else self.sizes[base]

    def label(self, base) -> str:
        return str(base.label) if base in self.rows else str(self.tensor_of[base].label)

    def merge_rows(self, expr, order: dict):
        """Vector parameters named p0, p1, ... (each from a family ``p{a}_0 …``), of one length
        and stored one after another, become the rows of one matrix ``p[a, j]``: the per-class
        weights of a softmax stated with ``cm.params(f"W{a}_", d)``. Returns the expression
        with their reads replaced, and {family base: (matrix, row)}."""
        named = re.compile(r"^(.*?)(\d+)(_?)$")
        groups: dict = {}
        for base in self.param_bases:
            m = named.match(base)
            if m and m.group(1) and base in self.tensor_of:
                groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = base
        merged, rowmap = {}, {}
        for (prefix, _suffix), rows in groups.items():
            m = len(rows)
            if m < 2 or sorted(rows) != list(range(m)):
                continue
            bases = [rows[a] for a in range(m)]
            n = self.sizes[bases[0]]
            starts = [order[self.families[b][0]] for b in bases]
            if any(self.sizes[b] != n for b in bases) or any(starts[a + 1] != starts[a] + n for a in range(m - 1)):
                continue
            name = prefix if prefix.isidentifier() and prefix not in self.taken else f"{prefix}_mat"
            if not name.isidentifier() or name in self.taken:
                continue
            self.taken.add(name)
            M = sp.IndexedBase(name, shape=(m, n), real=True)
            self.rows[M] = m
            for a, b in enumerate(bases):
                merged[b] = (M, a)
                rowmap[self.tensor_of[b]] = (M, a)
        if rowmap:
            expr = expr.replace(lambda e: isinstance(e, sp.Indexed) and e.base in rowmap,
                                lambda e: rowmap[e.base][0][(rowmap[e.base][1],) + tuple(e.indices)])

            def one_name(e):  # the rows' sums, each over its own index, over one name: one template
                i = e.limits[0][0]
                n = int(i.upper) + 1
                j = sp.Idx(f"j{n}", n)
                return sp.Sum(e.function.xreplace({i: j}), (j, 0, n - 1))

            expr = expr.replace(lambda e: isinstance(e, sp.Sum) and len(e.limits) == 1
                                and str(e.limits[0][0].label).startswith("i_"), one_name)
        return expr, merged

    def rewrite(self, e):
        if not e.args:
            return e
        args = [self.rewrite(a) for a in e.args]
        if not isinstance(e, sp.Add):
            return e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e
        groups: dict = {}
        rest, made = [], False
        for term in args:
            t = self._template(term)
            if t is None:
                rest.append(term)
                continue
            tmpl, bases, k, shift = t
            groups.setdefault((tmpl, bases, shift), []).append((k, term))
        for (tmpl, bases, shift), items in groups.items():
            n = self.size(next(iter(bases)))
            ks = sorted(k for k, _ in items)
            # every index, or (a window: x_k, x_{k+1} for k < n-1) a whole range inside the axis
            m = len(ks)
            if ks == list(range(m)) and (m == n or (m >= LIFT_MIN_FAMILY and m + shift <= n and not bases & set(self.rows))):
                idx = sp.Idx(f"i_{'_'.join(sorted(self.label(b) for b in bases))}{'' if m == n else f'_{m}'}", m)
                rest.append(sp.Sum(self._indexed(tmpl, idx), (idx, 0, m - 1)))
                self.used |= set(bases)
                made = True
            else:
                rest.extend(term for _, term in items)
        if not made and all(a is b for a, b in zip(args, e.args)):
            return e  # nothing restated: the same object (rebuilding a power of a sum asks SymPy's assumptions)
        return sp.Add(*rest)


def _coverable(expr, lf) -> bool:
    """A necessary condition for lift, checked in one pass before its rewrite (which builds a
    template per term: 3 s for chained Rosenbrock in 1,000 symbols, to fail): every family read
    in ``expr`` has a sum whose terms, each reading one index of the family or a few neighbouring ones, read all of its
    indices. A member can leave the expression only inside such a sum, restated."""
    read, covered = set(), set()
    for node in sp.preorder_traversal(expr):
        if not node.is_Add:
            continue
        per: dict = {}
        for term in node.args:
            idx: dict = {}
            for sym in term.free_symbols:
                m = lf.member.get(sym)
                if m is not None:
                    idx.setdefault(m[0], set()).add(m[1])
            read.update(idx)
            for base, ks in idx.items():
                if max(ks) - min(ks) <= LIFT_MAX_SHIFT:
                    per.setdefault(base, set()).update(ks)
        covered.update(base for base, ks in per.items() if len(ks) == lf.sizes[base])
    read.update(lf.member[sym][0] for sym in expr.free_symbols if sym in lf.member)
    return read <= covered


def lift(cost: Cost):
    """(the cost restated in index notation, a function turning the scalar cost's data into the
    restated cost's) or None when the cost has too few parameters or no family to restate."""
    if isinstance(cost, TensorCost) or len(cost.params) < LIFT_MIN_PARAMS:
        return None
    lf = _Lifter(cost)
    if not lf.member or not _coverable(cost.expr, lf):
        return None
    expr = lf.rewrite(cost.expr)
    merged = {}
    if {s for s in expr.free_symbols if s in lf.member}:
        # members left: perhaps the sums over rows of a matrix (per-class weight vectors)
        expr, merged = lf.merge_rows(expr, {s: i for i, s in enumerate(cost.params)})
        if merged:
            expr = lf.rewrite(expr)
    left = {s for s in expr.free_symbols if s in lf.member}
    if not lf.used or left or any(b.base in {lf.tensor_of[f] for f in merged} for b in expr.atoms(sp.Indexed)):
        return None  # a family member read outside a restated sum: the scalar path
    params, data, columns = [], [], []
    for role, symbols, out in (("params", cost.params, params), ("data", cost.data, data)):
        for s in symbols:
            base_k = lf.member.get(s)
            if base_k is None:
                out.append(s)
                if role == "data":
                    columns.append((s.name, None))
            elif base_k[0] in merged:
                M, row = merged[base_k[0]]
                if row == 0 and base_k[1] == 0:
                    out.append(M)
            elif base_k[1] == 0:
                base = lf.tensor_of[base_k[0]]
                out.append(base)
                if role == "data":
                    columns.append((str(base.label), [f"{base_k[0]}{k}" for k in range(base.shape[0])]))
    try:
        lifted = TensorCost(expr, params, data or None, cost.reduce)
    except CostError:  # a window the index form does not state (a prefix read, never shifted): the scalar path
        return None
    return lifted, columns


def lifted_data(columns, dataset) -> dict:
    """The restated cost's data dict from a scalar :class:`~calcml.dataset.Dataset`."""
    import numpy as np

    by_name = dict(zip(dataset.names, dataset.columns))
    out = {}
    for name, members in columns:
        out[name] = by_name[name] if members is None else np.column_stack([by_name[m] for m in members])
    return out


def lift_spec(names, columns=None) -> tuple:
    """(the scalar column names, the restated columns, hashable): how a chunk of a scalar cost's
    data is restated (calcml.dask_data); ``columns`` None: each column as itself."""
    columns = columns if columns is not None else [(n, None) for n in names]
    return (tuple(names), tuple((n, None if m is None else tuple(m)) for n, m in columns))


def lifted_for(cost: Cost):
    """``lift(cost)``, made once per cost object."""
    found = cost.__dict__.get("_lifted", False)
    if found is False:
        found = cost.__dict__["_lifted"] = lift(cost)
    return found


class LiftedKernels:
    """A scalar cost's kernels, computed by its restatement in index notation: the same
    ``theta`` order, the scalar cost's data forms (dict of columns, 2-D array, DataFrame)."""

    def __init__(self, cost: Cost, tensor_kernels, columns):
        self.cost, self.tensor, self.columns = cost, tensor_kernels, columns

    def __repr__(self):
        return f"<calcml.Kernels for {self.cost!r}, restated in index notation>"

    @property
    def source(self) -> str:
        return self.tensor.source

    @property
    def path(self):
        return self.tensor.path

    def _data(self, data):
        """The restated cost's data: a dict of columns or a 2-D array straight into the index
        form's arrays (one copy), anything else through the scalar cost's validation."""
        import numpy as np

        from ..dataset import as_dataset

        if data is None or not self.cost.data:
            return data
        names = self.cost.data_names
        try:
            if isinstance(data, dict) and all(n in data for n in names):
                cols = {n: np.asarray(data[n], dtype=np.float64) for n in names}
            elif isinstance(data, np.ndarray) and data.ndim == 2 and data.shape[1] == len(names):
                # a family's columns stand together in the cost's data order: one block copy each
                arr = np.asarray(data, dtype=np.float64)
                where = {n: q for q, n in enumerate(names)}
                return {name: arr[:, where[name]] if members is None else
                        np.ascontiguousarray(arr[:, where[members[0]]:where[members[0]] + len(members)])
                        for name, members in self.columns}
            else:
                cols = None
            if cols is not None and all(c.ndim == 1 and c.shape == cols[names[0]].shape for c in cols.values()):
                return {name: cols[name] if members is None else np.stack([cols[m] for m in members], axis=1)
                        for name, members in self.columns}
        except (TypeError, ValueError):
            pass  # the scalar validation below names the problem
        return lifted_data(self.columns, as_dataset(data, names))

    def _named(self, data, call):
        """``call()``; a bad datum it finds is named by its column and row, as the scalar
        kernels name it."""
        from ..dataset import as_dataset
        from ..errors import DataError

        try:
            return call()
        except DataError:
            if data is not None and self.cost.data:
                as_dataset(data, self.cost.data_names).raise_nonfinite()
            raise

    def prepare(self, data):
        return self.tensor.prepare(self._data(data))

    def _args(self, data):
        from .kernels import TensorData

        return data if isinstance(data, TensorData) else self._data(data)

    def _on_dask(self, kind, theta, v, data):
        """Kernel ``kind`` over Dask data in the scalar cost's forms: each chunk restated on
        its worker (see :mod:`calcml.dask_data`)."""
        from ..dask_data import tensor_run

        t = self.tensor
        return tensor_run(t, kind, t._theta(theta), t._empty if v is None else t._theta(v, "v"), data,
                          lift=self._lift())

    def _lift(self):
        return lift_spec(self.cost.data_names, self.columns)

    def value(self, theta, data=None):
        if is_dask(data):
            return float(self._on_dask("value", theta, None, data)[0])
        return self._named(data, lambda: self.tensor.value(theta, self._args(data)))

    def grad(self, theta, data=None):
        if is_dask(data):
            return self._on_dask("vg", theta, None, data)[1:].copy()
        return self._named(data, lambda: self.tensor.grad(theta, self._args(data)))

    def value_and_grad(self, theta, data=None):
        if is_dask(data):
            out = self._on_dask("vg", theta, None, data)
            return float(out[0]), out[1:].copy()
        return self._named(data, lambda: self.tensor.value_and_grad(theta, self._args(data)))

    def hvp(self, theta, v, data=None):
        if is_dask(data):
            return self._on_dask("hvp", theta, v, data)
        return self._named(data, lambda: self.tensor.hvp(theta, v, self._args(data)))

    def hessian(self, theta, data=None):
        if is_dask(data):  # every column's Hessian-vector product in one Dask computation
            from ..dask_data import tensor_hessian

            t = self.tensor
            return tensor_hessian(t, t._theta(theta), data, lift=self._lift())
        return self._named(data, lambda: self.tensor.hessian(theta, self._args(data)))
