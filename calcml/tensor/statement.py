"""Stating a cost in index notation: tensor parameters and data, labels, indices, sums.

Index notation is SymPy's own: a tensor is an ``IndexedBase`` with a shape, an index an
``Idx`` with a range, a contraction a ``Sum`` over ``Idx`` bounds. calcml adds two things
SymPy lacks: class labels (:class:`Label`, a per-row integer in ``0 … K-1``) and an
overflow-free log-sum-exp (:class:`LogSumExp`), whose derivative is the softmax.
"""

from __future__ import annotations

import numbers
import sys

import sympy as sp

from ..errors import CostError

# Scalar costs with at least this many parameters are restated in index notation when they can
# be (calcml/tensor/lift.py): below it, the scalar path's unrolled kernels compile in about a
# second and run fastest (W1-W4).
LIFT_MIN_PARAMS = 16

__all__ = ["is_tensor_statement", "is_tensor_cost", "rowwise", "Label", "LogSumExp", "tensor", "label", "index", "tsum", "logsumexp", "onehot", "vector_dot",
           "is_tensor", "axis_range"]


def _shape(kind: str, name: str, shape) -> tuple:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"cm.{kind}({name!r}): shape must be a tuple of positive integers, got {shape!r}") from None
    if not dims or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in dims):
        raise ValueError(f"cm.{kind}({name!r}): shape must be a tuple of positive integers, got {shape!r}")
    return tuple(int(n) for n in dims)


def _name(kind: str, name) -> str:
    if not isinstance(name, str) or not name.strip().isidentifier() or len(name.split()) != 1:
        raise ValueError(f"cm.{kind}: a tensor takes one name that is a Python identifier, got {name!r}")
    return name.strip()


def tensor(kind: str, name: str, shape) -> sp.IndexedBase:
    """A real ``IndexedBase`` named ``name`` with ``shape`` (``kind``: "params" or "data", for messages)."""
    name = _name(kind, name)
    return sp.IndexedBase(name, shape=_shape(kind, name, shape), real=True)


class Label(sp.Symbol):
    """A per-row integer class label in ``0 … classes-1`` (from ``cm.data("c", classes=K)``)."""

    def __new__(cls, name: str, classes: int):
        obj = sp.Symbol.__xnew__(cls, name, integer=True, nonnegative=True)
        obj.classes = int(classes)
        return obj

    def __getnewargs_ex__(self):
        return ((self.name, self.classes), {})

    def _hashable_content(self):
        return super()._hashable_content() + (self.classes,)


def label(name: str, classes) -> Label:
    name = _name("data", name)
    if isinstance(classes, bool) or not isinstance(classes, numbers.Integral) or classes < 1:
        raise ValueError(f"cm.data({name!r}): classes must be a positive integer, got {classes!r}")
    return Label(name, int(classes))


def index(name: str, n) -> sp.Idx:
    """``cm.index("k", 10)``: a SymPy ``Idx`` running over ``0 … 9``.

    An index reads a tensor's axis whose length is its range (``W[k, j]``), or, shifted, a
    window of a longer one: ``x[i + 1]`` and ``x[i]`` with ``i`` over ``0 … n-2`` (neighbours),
    ``x[t + l]`` (a convolution). Every entry a read reaches must be inside the axis."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"cm.index: the name must be a Python identifier, got {name!r}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"cm.index({name!r}): the range must be a positive integer, got {n!r}")
    return sp.Idx(name, int(n))


def axis_range(i: sp.Idx):
    """``n`` for an ``Idx`` over ``0 … n-1``; None when its bounds are not of that form."""
    lo, hi = i.lower, i.upper
    if lo is None or hi is None or not (lo.is_Integer and hi.is_Integer) or lo != 0 or hi < 0:
        return None
    return int(hi) + 1


def _check_idx(i, where: str) -> sp.Idx:
    if not isinstance(i, sp.Idx):
        raise CostError(f"{where}: expected an index from cm.index (a SymPy Idx), got {i!r}")
    if axis_range(i) is None:
        raise CostError(f"{where}: index {i} needs a range 0 … n-1 (make it with cm.index({str(i.label)!r}, n))")
    return i


def tsum(expr, *indices) -> sp.Sum:
    """``cm.sum(expr, j)``, ``cm.sum(expr, k, j)``: the ``Sum`` over the indices' whole ranges."""
    if not indices:
        raise CostError("cm.sum: name the indices to sum over, e.g. cm.sum(W[k, j] * x[j], j)")
    limits = [(i, i.lower, i.upper) for i in (_check_idx(i, "cm.sum") for i in indices)]
    return sp.Sum(expr, *limits)


class LogSumExp(sp.Function):
    r"""``logsumexp(e, k)`` = :math:`\log \sum_k e^{e_k}`, compiled overflow-free as
    :math:`m + \log \sum_k e^{e_k - m}` with :math:`m = \max_k e_k`.

    Its derivative with respect to :math:`e_k` is the softmax :math:`e^{e_k - \mathrm{logsumexp}}`.
    """

    nargs = 2

    @classmethod
    def eval(cls, e, k):
        if not isinstance(k, sp.Idx):
            raise CostError(f"cm.logsumexp: the second argument must be an index from cm.index, got {k!r}")
        return None

    def _eval_is_extended_real(self):
        return self.args[0].is_extended_real

    @property
    def index(self) -> sp.Idx:
        return self.args[1]

    def doit(self, **hints):
        e, k = self.args
        return sp.log(sp.Sum(sp.exp(e.doit(**hints) if hints.get("deep", True) else e), (k, k.lower, k.upper)))

    def _eval_rewrite_as_log(self, e, k, **kwargs):
        return sp.log(sp.Sum(sp.exp(e), (k, k.lower, k.upper)))

    def _sympystr(self, printer):
        return f"logsumexp({printer._print(self.args[0])}, {printer._print(self.args[1])})"

    def _latex(self, printer):
        return rf"\log \sum_{{{printer._print(self.args[1])}}} e^{{{printer._print(self.args[0])}}}"


def logsumexp(expr, k) -> LogSumExp:
    """``log(sum over k of exp(expr))``, compiled in its overflow-free form."""
    return LogSumExp(sp.sympify(expr), _check_idx(k, "cm.logsumexp"))


def onehot(c, k) -> sp.Expr:
    """``KroneckerDelta(c, k)``: 1 where the label ``c`` equals ``k``."""
    if not isinstance(c, Label):
        raise CostError(f"cm.onehot: the first argument must be a class label from cm.data(name, classes=K), got {c!r}")
    _check_idx(k, "cm.onehot")
    if axis_range(k) != c.classes:
        raise CostError(
            f"cm.onehot({c.name}, {k}): label {c.name!r} has {c.classes} classes but index {k} runs over "
            f"0 … {axis_range(k) - 1}")
    return sp.KroneckerDelta(c, k)


def is_tensor(obj) -> bool:
    return isinstance(obj, sp.IndexedBase)


def vector_dot(u: sp.IndexedBase, v: sp.IndexedBase) -> sp.Sum:
    """``cm.dot(w, x)`` for two vectors of one length: their ``Sum`` of products over a fresh index."""
    for name, t in (("u", u), ("v", v)):
        if t.shape is None or len(t.shape) != 1:
            raise CostError(f"cm.dot: {name} = {t} must be a vector (shape=(n,)), got shape {t.shape}")
    if u.shape[0] != v.shape[0]:
        raise CostError(f"cm.dot: lengths differ, {u} has {u.shape[0]} entries but {v} has {v.shape[0]}")
    # a fresh index: named after the pair, so that two dots of the same pair share it
    i = sp.Idx(f"i_{u.label}_{v.label}", int(u.shape[0]))
    return sp.Sum(u[i] * v[i], (i, i.lower, i.upper))


# -- cheap tests, so that ``import calcml`` and scalar costs never import the tensor machinery ---------
def is_tensor_statement(expr, params, data, penalty=None) -> bool:
    items = list(_items(params)) + list(_items(data))
    if any(isinstance(p, (sp.IndexedBase, Label)) for p in items):
        return True
    for e in (expr, penalty):
        if isinstance(e, sp.Basic) and e.has(sp.Indexed, sp.Sum, LogSumExp, sp.Idx):
            return True
    return False


def _items(xs):
    if xs is None:
        return
    if isinstance(xs, (sp.Basic, str)):
        yield xs
        return
    try:
        it = iter(xs)
    except TypeError:
        yield xs
        return
    for x in it:
        if isinstance(x, (list, tuple)):
            yield from _items(x)
        else:
            yield x


def is_tensor_cost(cost) -> bool:
    """Whether ``cost`` is a TensorCost (none exists unless calcml.tensor.model was imported)."""
    model = sys.modules.get("calcml.tensor.model")
    return model is not None and isinstance(cost, model.TensorCost)


def rowwise(expr, params, data=None, indices=None):
    """Compile ``expr`` (free indices allowed) into ``f(theta, data)`` returning its value on every
    row: ``(N,)``, or ``(N, K)`` for one free index of range K (predicted probabilities, margins).
    With several free indices, ``indices=(i, j, ...)`` names them in the order of the output's
    axes, ``(N, range of i, range of j, ...)``; SymPy keeps no order of its own to go by.

    >>> import calcml as cm, numpy as np
    >>> w = cm.params("w", shape=(2,)); x = cm.data("x", shape=(2,))
    >>> f = cm.rowwise(cm.dot(w, x), params=[w], data=[x])
    >>> f(np.array([1.0, 2.0]), {"x": np.array([[1.0, 1.0], [0.0, 3.0]])}).tolist()
    [3.0, 6.0]
    """
    from .model import Rowwise

    return Rowwise(expr, params, data, indices)
