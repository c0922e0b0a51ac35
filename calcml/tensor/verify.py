"""Verifying the derivatives of a tensor cost: an instance proven exactly, the full size checked.

The index-form derivative is derived by the same code for any index ranges. So calcml
restates the cost at a small size (every range ``n`` becomes ``min(n, 2)``), expands that
instance into scalar symbols (``W[1, 0]`` becomes the symbol ``W[1,0]``, a label's
``KroneckerDelta(c, 1)`` a one-hot data symbol), instantiates the derivative calcml derived for
the instance at every entry, and hands both to :func:`calcml.verify`, which proves or refutes
each entry against the limit definition. A proof there is what "verified" means; each
verdict's detail says that it was proven on the instance and what the full-size check at
random points (compiled gradient against central differences of the compiled cost) found.
"""

from __future__ import annotations

import numpy as np
import sympy as sp

from .graph import index_terms
from .model import TensorCost, _name
from .statement import Label, LogSumExp, axis_range

__all__ = ["verify_tensor", "instance"]

INSTANCE_RANGE = 2


def instance_range(cost: TensorCost) -> int:
    """The instance's largest range: INSTANCE_RANGE, or more where the statement names a fixed
    entry (``KroneckerDelta(k, 3)``, a cost's ``a[3]``): an instance must still hold it."""
    parts = [part for part in (cost.expr, cost.penalty) if part is not None]
    entries = [int(a) for part in parts for d in part.atoms(sp.KroneckerDelta) for a in d.args if isinstance(a, sp.Integer)]
    # a shifted read (x[i + 1], x[t + l]) needs its axis longer than its indices' instance
    # ranges (INSTANCE_RANGE each) reach: one more entry per index beyond the first, and the shift
    reach = max([0] + [len(idxs) - 1 + s for _, idxs, s in _windows(parts)])
    return max([INSTANCE_RANGE] + [i + 1 for i in entries]) + reach


def _windows(parts) -> list:
    """(axis length, its indices, shift) of each read of a window: ``x[i + s]``, ``x[t + l]``,
    or ``x[i]`` with ``i`` over fewer entries than the axis."""
    return [(n, idxs, s) for _, _, n, idxs, s in _reads(parts)
            if len(idxs) > 1 or s != 0 or axis_range(idxs[0]) != n]


def _reads(parts) -> list:
    """(tensor, axis, axis length, indices, shift) of each read of a tensor's axis by indices."""
    out = []
    for part in parts:
        for e in part.atoms(sp.Indexed):
            shape = e.base.shape or ()
            for a, (i, n) in enumerate(zip(e.indices, shape)):
                found = index_terms(i)
                if found is not None:
                    out.append((e.base, a, int(n), [j for j, _ in found[0]], found[1]))
    return out


class _Shrink:
    """Maps every index, tensor and label of a statement to its small twin (ranges at most
    ``reach``)."""

    def __init__(self, reach: int = INSTANCE_RANGE, reads=()):
        self.map: dict = {}
        self.reach = reach
        # The indices of a window's read (x[i + s], x[t + l]) stay short enough for their axis's
        # small twin (their reaches, added, and the shift within it), and an axis read plainly
        # by an index stays as long as that index's twin: sizes only shrink, to a fixed point.
        self.limit: dict = {}  # index -> its twin's range
        self.axis: dict = {}  # (tensor, axis) -> its twin's length
        changed = True
        while changed:
            changed = False
            for base, a, n, idxs, s in reads:
                size = min(self.small(n), self.axis.get((base, a), reach))
                if len(idxs) == 1 and s == 0 and axis_range(idxs[0]) == n:  # plain: index and axis alike
                    size = min(size, self.limit.get(idxs[0], reach))
                    pairs = [((base, a), self.axis, size), (idxs[0], self.limit, size)]
                else:
                    share = max(1, 1 + (size - 1 - s) // len(idxs))
                    pairs = [(i, self.limit, share) for i in idxs]
                for key, table, value in pairs:
                    if table.get(key, reach + 1) > value:
                        table[key] = value
                        changed = True

    def small(self, n) -> int:
        return min(int(n), self.reach)

    def idx(self, i) -> sp.Expr:
        if not isinstance(i, sp.Idx):  # x[t + l + 1]: each index its twin
            return i.xreplace({j: self.idx(j) for j in i.atoms(sp.Idx)})
        if i not in self.map:
            self.map[i] = sp.Idx(str(i.label), min(self.small(axis_range(i)), self.limit.get(i, self.reach)))
        return self.map[i]

    def item(self, x):
        if x in self.map:
            return self.map[x]
        if isinstance(x, sp.IndexedBase):
            new = sp.IndexedBase(str(x.label), shape=tuple(self.axis.get((x, a), self.small(n))
                                                           for a, n in enumerate(x.shape)), real=True)
        elif isinstance(x, Label):
            new = Label(x.name, self.small(x.classes))
        else:
            new = x
        self.map[x] = new
        return new

    def expr(self, e):
        if isinstance(e, sp.Sum):
            body = self.expr(e.function)
            limits = []
            for lim in e.limits:
                i = self.idx(lim[0])
                limits.append((i, i.lower, i.upper))
            return sp.Sum(body, *limits)
        if isinstance(e, LogSumExp):
            return LogSumExp(self.expr(e.args[0]), self.idx(e.args[1]))
        if isinstance(e, sp.Indexed):
            return self.item(e.base)[tuple(self.idx(i) for i in e.indices)]
        if isinstance(e, sp.Idx):
            return self.idx(e)
        if isinstance(e, (sp.IndexedBase, Label)):
            return self.item(e)
        if not e.args:
            return e
        return e.func(*[self.expr(a) for a in e.args])


def _expand(e, scalars: dict):
    """A small instance's index expression -> scalar symbols (sums written out)."""

    def onehot(a):  # KroneckerDelta(c, k) -> a one-hot data vector, so that doit() writes sums out
        lab = [x for x in a.args if isinstance(x, Label)]
        other = [x for x in a.args if not isinstance(x, Label)]
        if lab and other:
            return sp.IndexedBase(f"{lab[0].name}==", shape=(lab[0].classes,), real=True)[other[0]]
        return a

    e = e.replace(lambda a: isinstance(a, sp.KroneckerDelta), onehot)
    for _ in range(8):
        if not e.has(sp.Sum, LogSumExp):
            break
        e = e.replace(lambda a: isinstance(a, LogSumExp), lambda a: a.doit(deep=False)).doit()

    def entry(a):
        if isinstance(a, sp.Indexed):
            key = a
            if key not in scalars:
                scalars[key] = sp.Symbol(f"{a.base.label}[{','.join(str(i) for i in a.indices)}]", real=True)
            return scalars[key]
        if isinstance(a, sp.KroneckerDelta):
            lab = [x for x in a.args if isinstance(x, Label)]
            num = [x for x in a.args if x.is_Integer]
            if lab and num:
                key = (lab[0], int(num[0]))
                if key not in scalars:
                    scalars[key] = sp.Symbol(f"{lab[0].name}=={int(num[0])}", real=True)
                return scalars[key]
        return a

    return e.replace(lambda a: isinstance(a, (sp.Indexed, sp.KroneckerDelta)), entry)


def instance(cost: TensorCost):
    """(small tensor cost, scalar cost of its expression, claimed derivatives in the scalar
    symbols, flat names) for the instance with every range at most :func:`instance_range`.
    A penalty is part of it: the scalar cost is ``expr + penalty`` (per row), each claimed
    derivative calcml's derivative of ``expr`` plus its derivative of the penalty; the sum or
    mean over rows is linear and needs no proof."""
    from ..cost import Cost

    sh = _Shrink(instance_range(cost), _reads([part for part in (cost.expr, cost.penalty) if part is not None]))
    params = [sh.item(p) for p in cost.params]
    data = [sh.item(d) for d in cost.data]
    penalty = None if cost.penalty is None else sh.expr(cost.penalty)
    small = TensorCost(sh.expr(cost.expr), params, data, cost.reduce, penalty=penalty)
    scalars: dict = {}
    expr = _expand(small.expr + (penalty if penalty is not None else 0), scalars)
    claimed, entries, names = [], [], []
    for p, grad in zip(small._params, small.gradient):
        if isinstance(p, sp.IndexedBase):
            axes = [sp.Idx(f"{p.label}_{a}", int(n)) for a, n in enumerate(p.shape)]
            pen = small.penalty_diff(p[tuple(axes)])
            for ix in np.ndindex(*[int(n) for n in p.shape]):
                e = (grad + pen).xreplace({ax: sp.Integer(v) for ax, v in zip(axes, ix)})
                claimed.append(_expand(e, scalars))
                entries.append(p[tuple(int(v) for v in ix)])
                names.append(f"{p.label}[{', '.join(map(str, ix))}]")
        else:
            claimed.append(_expand(grad + small.penalty_diff(p), scalars))
            entries.append(p)
            names.append(p.name)
    param_syms = [scalars.setdefault(e, sp.Symbol(f"{e.base.label}[{','.join(str(i) for i in e.indices)}]", real=True))
                  if isinstance(e, sp.Indexed) else e for e in entries]
    data_syms = sorted((s for k, s in scalars.items() if s not in param_syms), key=lambda s: s.name)
    # scalar data (a label y, a weight) stay symbols of their own: free reals, as every datum is
    data_syms += [d for d in small.data if isinstance(d, sp.Symbol) and not isinstance(d, Label)]
    scalar_cost = Cost(expr, params=param_syms, data=data_syms or None)
    return small, scalar_cost, claimed, names


def _full_size_check(cost: TensorCost, rows: int = 6, points: int = 2) -> str:
    """The compiled gradient against central differences of the compiled cost, at random points."""
    from .kernels import compile_tensor

    rng = np.random.default_rng(0)
    data = None
    if cost.has_data:
        data = {}
        for item, (name, shape) in zip(cost.data, cost.data_shapes.items()):
            data[name] = rng.integers(0, item.classes, rows) if isinstance(item, Label) else \
                rng.standard_normal((rows, *shape))
    k = compile_tensor(cost)
    worst = 0.0
    for _ in range(points):
        theta = 0.5 * rng.standard_normal(cost.n_params)
        g = k.grad(theta, data)
        pick = rng.choice(cost.n_params, size=min(cost.n_params, 12), replace=False)
        for i in pick:
            h = 1e-6 * max(1.0, abs(theta[i]))
            e = np.zeros(cost.n_params)
            e[i] = h
            fd = (k.value(theta + e, data) - k.value(theta - e, data)) / (2 * h)
            worst = max(worst, abs(fd - g[i]) / max(1.0, abs(fd)))
    return (f"the full size ({cost.n_params} parameters) checked at {points} random points: compiled gradient "
            f"against central differences, largest relative difference {worst:.1e}")


def verify_tensor(cost: TensorCost, timeout: float):
    """The report of :func:`calcml.verify` for a tensor cost (see the module docstring)."""
    from ..verify import Report, Verdict, verify

    small, scalar_cost, claimed, names = instance(cost)
    reach = instance_range(cost)
    report = verify(scalar_cost, gradient=claimed, timeout=timeout)
    full = _full_size_check(cost)
    ranges = ", ".join(f"{_name(p)}{tuple(int(n) for n in p.shape)}" for p in small.params if isinstance(p, sp.IndexedBase))
    with_penalty = " (the per-row cost plus the penalty)" if cost.penalty is not None else ""
    verdicts = []
    for v, name in zip(report, names):
        where = (f"proven on the instance{with_penalty} with every index range at most {reach} ({ranges}); "
                 if v.status == "verified" else f"on the instance{with_penalty} with index ranges at most {reach}: ")
        verdicts.append(Verdict(name=f"d/d{name}", status=v.status, method=f"{v.method}, small instance",
                                detail=f"{where}{v.detail}; {full}", point=v.point, expected=v.expected,
                                actual=v.actual))
    return Report(verdicts, title=f"verify (index form, instance and full size): {str(cost.expr)[:60]}")


def check_gradient_tensor(cost: TensorCost, grad_fn, data, points, rtol: float, n_points: int, seed: int):
    """:func:`calcml.check_gradient` for a tensor cost: ``grad_fn(theta, data)`` (flat, in
    ``theta`` order) against the compiled exact gradient; one verdict per parameter tensor,
    naming the entry that disagrees most."""
    from ..check import _allowance_text, compare, rounding_allowance, typical_row_gradient
    from ..dataset import real_array
    from ..errors import ParamError
    from ..verify import Report, Verdict
    from .kernels import as_tensor_data, compile_tensor

    n = cost.n_params
    k = compile_tensor(cost)
    td = as_tensor_data(cost, data, check_finite=True) if cost.has_data else None
    user_data = dict(zip(cost.data_names, td.arrays)) if td is not None else None
    if points is None:
        rng = np.random.default_rng(seed)
        thetas = [0.5 * rng.standard_normal(n) for _ in range(n_points)]
    else:
        p = np.atleast_2d(np.asarray(points, dtype=np.float64))
        if p.shape[1] != n:
            raise ParamError(f"points must have {n} columns (one per entry of theta), got shape {p.shape}")
        thetas = list(p)
    names = cost.flat_names()
    bounds, o = [], 0
    for name, shape in cost.param_shapes.items():
        size = int(np.prod(shape)) if shape else 1
        bounds.append((name, o, o + size))
        o += size
    scale = np.zeros(n) if user_data is None else typical_row_gradient(n, cost.reduce, k.grad, user_data, thetas[:2])
    allowance = rounding_allowance(scale, td.n_rows if td is not None else 0)
    worst = {name: (-1.0, None, None, None, None, None) for name, _, _ in bounds}
    for theta in thetas:
        e = k.grad(theta, td) if td is not None else k.grad(theta)
        out = grad_fn(theta.copy(), {a: b.copy() for a, b in user_data.items()}) if td is not None \
            else grad_fn(theta.copy())
        if isinstance(out, dict):  # {name: array}, as unpack gives and res.params holds
            a = cost.pack(out)
        else:
            a = real_array(out, "grad_fn's gradient", ParamError).reshape(-1)
        if a.shape != (n,):
            raise ParamError(f"grad_fn returned {a.shape[0]} values; expected {n}, the flat gradient in theta order "
                             f"({', '.join(f'{nm}{tuple(s)}' for nm, s in cost.param_shapes.items())}, C order)")
        bad, rel = compare(e, a, rtol, allowance)
        for name, lo, hi in bounds:
            i = lo + int(np.argmax(bad[lo:hi]))
            if bad[i] > worst[name][0]:
                worst[name] = (bad[i], rel[i], i, theta, float(e[i]), float(a[i]))
    verdicts = []
    for name, lo, hi in bounds:
        bad, rel, i, theta, ev, av = worst[name]
        if bad <= 1.0:
            verdicts.append(Verdict(f"d/d{name}", "verified", "exact gradient at points",
                                    f"all {hi - lo} entries agree with the exact gradient at {len(thetas)} points "
                                    f"(theta given in .point; largest relative error {rel:.1e}, tolerance {rtol:g}"
                                    f"{_allowance_text(float(np.max(allowance[lo:hi])))}); these points only, not a "
                                    f"proof for others", {"thetas": thetas}))
        else:
            verdicts.append(Verdict(f"d/d{name}", "refuted", "exact gradient at points",
                                    f"at a point (theta given in .point): the exact d/d{names[i]} is {ev:.12g}, "
                                    f"grad_fn gives {av:.12g} (relative error {rel:.3g}, tolerance {rtol:g}"
                                    f"{_allowance_text(float(allowance[i]))})",
                                    {"theta": theta, "entry": names[i]}, ev, av))
    return Report(verdicts, title=f"check_gradient: {str(cost.expr)[:60]}")
