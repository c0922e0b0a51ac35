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
from .model import TensorCost

__all__ = ["lift", "LIFT_MIN_PARAMS"]

# Scalar costs with at least this many parameters are restated when they can be: below it,
# the scalar path's unrolled kernels compile in about a second and run fastest (W1-W4).
LIFT_MIN_PARAMS = 16
# A sum is restated over a family of at least this many members.
LIFT_MIN_FAMILY = 4

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


class _Lifter:
    def __init__(self, cost: Cost):
        self.cost = cost
        pf, df = _families(cost.params), _families(cost.data)
        taken = {s.name for s in (*cost.params, *cost.data)}
        self.tensor_of: dict = {}  # base name -> IndexedBase
        self.member: dict = {}  # symbol -> (base, index)
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
        member in ``term`` has one index; else None."""
        found = [s for s in term.free_symbols if s in self.member]
        if not found:
            return None
        idx = {self.member[s][1] for s in found}
        bases = {self.member[s][0] for s in found}
        if len(idx) != 1 or len({self.sizes[b] for b in bases}) != 1:
            return None
        (k,) = idx
        j = sp.Dummy("j")
        tmpl = term.xreplace({s: self.tensor_of[self.member[s][0]][j] for s in found})
        return tmpl, j, frozenset(bases), k

    def rewrite(self, e):
        if not e.args:
            return e
        args = [self.rewrite(a) for a in e.args]
        if not isinstance(e, sp.Add):
            return e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e
        groups: dict = {}
        rest = []
        for term in args:
            t = self._template(term)
            if t is None:
                rest.append(term)
                continue
            tmpl, j, bases, k = t
            key = (tmpl.xreplace({j: sp.Symbol("_lift_j")}), bases)
            groups.setdefault(key, []).append((k, term))
        for (tmpl, bases), items in groups.items():
            n = self.sizes[next(iter(bases))]
            if sorted(k for k, _ in items) == list(range(n)):
                idx = sp.Idx(f"i_{'_'.join(sorted(str(self.tensor_of[b].label) for b in bases))}", n)
                rest.append(sp.Sum(tmpl.xreplace({sp.Symbol("_lift_j"): idx}), (idx, 0, n - 1)))
                self.used |= set(bases)
            else:
                rest.extend(term for _, term in items)
        return sp.Add(*rest)


def lift(cost: Cost):
    """(the cost restated in index notation, a function turning the scalar cost's data into the
    restated cost's) or None when the cost has too few parameters or no family to restate."""
    if isinstance(cost, TensorCost) or len(cost.params) < LIFT_MIN_PARAMS:
        return None
    lf = _Lifter(cost)
    if not lf.member:
        return None
    expr = lf.rewrite(cost.expr)
    left = {s for s in expr.free_symbols if s in lf.member}
    if not lf.used or left:
        return None  # a family member read outside a restated sum: the scalar path
    params, data, columns = [], [], []
    for role, symbols, out in (("params", cost.params, params), ("data", cost.data, data)):
        for s in symbols:
            base_k = lf.member.get(s)
            if base_k is None:
                out.append(s)
                if role == "data":
                    columns.append((s.name, None))
            elif base_k[1] == 0:
                base = lf.tensor_of[base_k[0]]
                out.append(base)
                if role == "data":
                    columns.append((str(base.label), [f"{base_k[0]}{k}" for k in range(base.shape[0])]))
    lifted = TensorCost(expr, params, data or None, cost.reduce)
    return lifted, columns


def lifted_data(columns, dataset) -> dict:
    """The restated cost's data dict from a scalar :class:`~calcml.dataset.Dataset`."""
    import numpy as np

    by_name = dict(zip(dataset.names, dataset.columns))
    out = {}
    for name, members in columns:
        out[name] = by_name[name] if members is None else np.column_stack([by_name[m] for m in members])
    return out


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

    def value(self, theta, data=None):
        return self._named(data, lambda: self.tensor.value(theta, self._args(data)))

    def grad(self, theta, data=None):
        return self._named(data, lambda: self.tensor.grad(theta, self._args(data)))

    def value_and_grad(self, theta, data=None):
        return self._named(data, lambda: self.tensor.value_and_grad(theta, self._args(data)))

    def hvp(self, theta, v, data=None):
        return self._named(data, lambda: self.tensor.hvp(theta, v, self._args(data)))

    def hessian(self, theta, data=None):
        return self._named(data, lambda: self.tensor.hessian(theta, self._args(data)))
