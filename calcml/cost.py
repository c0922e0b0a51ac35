"""Stating a cost: parameter and data symbols, and the validated :class:`Cost`.

A ``Cost`` is the per-row expression, the ordered parameters and data columns, and the
reduction over rows. Its exact gradient and Hessian are derived once, on first use, and
kept.
"""

from __future__ import annotations

import hashlib
from functools import cached_property

import sympy as sp

from .errors import CostError

__all__ = ["params", "data", "Cost"]

_REDUCTIONS = ("mean", "sum")


def _symbols(kind: str, names, n):
    if not isinstance(names, str):
        raise TypeError(f"cm.{kind}: names must be a string such as 'w b', got {type(names).__name__}")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"cm.{kind}: the count must be a positive integer, got {n!r}")
        base = names.strip()
        if not base or len(base.split()) != 1:
            raise ValueError(f"cm.{kind}: with a count, give one base name, got {names!r}")
        return tuple(sp.Symbol(f"{base}{i}", real=True) for i in range(n))
    split = names.replace(",", " ").split()
    if not split:
        raise ValueError(f"cm.{kind}: no names given in {names!r}")
    syms = tuple(sp.Symbol(s, real=True) for s in split)
    return syms[0] if len(syms) == 1 else syms


def params(names: str, n: int | None = None, *, shape=None):
    """Real symbols for trainable parameters.

    ``params("w b")`` gives ``(w, b)``; ``params("b")`` gives the single symbol ``b``;
    ``params("w", 3)`` gives ``(w0, w1, w2)``; ``params("W", shape=(10, 784))`` gives a tensor
    parameter, a real SymPy ``IndexedBase`` of that shape, for costs in index notation.
    """
    if shape is not None:
        if n is not None:
            raise ValueError("cm.params: give a count or a shape, not both")
        from .tensor.statement import tensor

        return tensor("params", names, shape)
    return _symbols("params", names, n)


def data(names: str, n: int | None = None, *, shape=None, classes=None):
    """Real symbols for per-row data columns; same forms as :func:`params`.

    ``data("x", shape=(784,))``: each row holds a 784-vector (an ``IndexedBase``);
    ``data("c", classes=10)``: a per-row integer class label in ``0 … 9``.
    """
    if shape is not None or classes is not None:
        if n is not None or (shape is not None and classes is not None):
            raise ValueError("cm.data: give one of a count, a shape or classes")
        from .tensor.statement import label, tensor

        return tensor("data", names, shape) if shape is not None else label(names, classes)
    return _symbols("data", names, n)


def _flatten(items, role: str) -> list:
    """Accept symbols, and tuples/lists of them (``params=[w, b]`` with ``w`` a tuple)."""
    if items is None:
        return []
    if isinstance(items, sp.Symbol):
        return [items]
    if isinstance(items, (str, bytes)):
        raise CostError(
            f"{role} must be SymPy symbols (from cm.{role} or sympy.symbols), got the string "
            f"{items!r}; calcml never parses strings here"
        )
    out = []
    try:
        iterator = iter(items)
    except TypeError:
        raise CostError(f"{role} must be a sequence of SymPy symbols, got {type(items).__name__}") from None
    for item in iterator:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(item, role))
        elif isinstance(item, sp.Symbol):
            out.append(item)
        else:
            raise CostError(
                f"{role} must hold SymPy symbols only, got {item!r} of type {type(item).__name__}"
            )
    return out


def _realify(sym: sp.Symbol, role: str) -> sp.Symbol:
    """Parameters and data are real. A symbol without assumptions becomes its real twin."""
    if sym.is_real:
        return sym
    if sym.is_real is False or sym.is_extended_real is False:
        raise CostError(f"{role} symbol {sym.name!r} is declared non-real; calcml costs are real-valued")
    return sp.Symbol(sym.name, real=True)


def _sympify_expr(expr) -> sp.Expr:
    if isinstance(expr, str):
        raise CostError(
            "the cost expression is a string; build it from SymPy objects (cm.params, cm.data, "
            "sympy functions). calcml never evaluates strings here"
        )
    if isinstance(expr, sp.MatrixBase):
        raise CostError(f"the cost expression must be a scalar, got a matrix of shape {expr.shape}")
    try:
        e = sp.sympify(expr, strict=True)
    except (sp.SympifyError, TypeError):
        raise CostError(f"the cost expression must be a SymPy expression, got {type(expr).__name__}") from None
    if isinstance(e, (sp.logic.boolalg.BooleanFunction, sp.logic.boolalg.BooleanAtom, sp.core.relational.Relational)):
        raise CostError(f"the cost expression must be a real scalar, got the condition {e}")
    if not isinstance(e, sp.Expr):
        raise CostError(f"the cost expression must be a scalar SymPy expression, got {type(e).__name__}")
    return e


class Cost:
    """A cost function: a per-row expression reduced over the rows of the data.

    Parameters
    ----------
    expr : sympy.Expr
        The per-row loss, in the parameter and data symbols.
    params : sequence of sympy.Symbol
        The trainable parameters, in the order of every ``theta`` vector.
    data : sequence of sympy.Symbol, optional
        The per-row data columns. Omit for a plain function of the parameters.
    reduce : {"mean", "sum"}
        How the per-row values are combined.

    Examples
    --------
    >>> import calcml as cm
    >>> w, b = cm.params("w b"); x, y = cm.data("x y")
    >>> cost = cm.Cost((w*x + b - y)**2, params=[w, b], data=[x, y])
    >>> cost.gradient
    (2*x*(b + w*x - y), 2*b + 2*w*x - 2*y)
    """

    def __new__(cls, expr=None, params=None, data=None, reduce="mean", penalty=None):
        if cls is Cost:
            from .tensor.statement import is_tensor_statement

            # index notation, or a penalty beside a sum over rows (kept apart from the rows'
            # sum, which only the tensor kernels do): the tensor path
            if is_tensor_statement(expr, params, data, penalty) or (penalty is not None and reduce == "sum"):
                from .tensor.model import TensorCost

                return object.__new__(TensorCost)
        return object.__new__(cls)

    def __init__(self, expr, params, data=None, reduce: str = "mean", penalty=None):
        if reduce not in _REDUCTIONS:
            raise CostError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
        raw_params = _flatten(params, "params")
        raw_data = _flatten(data, "data")
        if not raw_params:
            raise CostError("a cost needs at least one parameter; params is empty")
        e = _sympify_expr(expr)

        self._check_duplicates(raw_params, raw_data)
        # Replace assumption-free symbols by their real twins everywhere.
        mapping = {}
        plist, dlist = [], []
        for sym, role, out in [(s, "params", plist) for s in raw_params] + [(s, "data", dlist) for s in raw_data]:
            real = _realify(sym, role)
            if real is not sym:
                mapping[sym] = real
            out.append(real)
        if mapping:
            e = e.xreplace(mapping)
        self._check_free_symbols(e, plist, dlist)
        self._check_real(e)
        self._penalty = None
        if penalty is not None:
            pen = _sympify_expr(penalty)
            if mapping:
                pen = pen.xreplace(mapping)
            used = sorted(pen.free_symbols & set(dlist), key=lambda s: s.name)
            if used:
                raise CostError(f"the penalty uses data {used[0].name!r}; a penalty is a function of the "
                                "parameters only (it is added once, not per row)")
            self._check_free_symbols(pen, plist, [])
            self._check_real(pen)
            self._penalty = pen
            # J = mean(expr) + penalty = mean(expr + penalty): one per-row expression
            e = e + pen

        self._expr = e
        self._params = tuple(plist)
        self._data = tuple(dlist)
        self._reduce = reduce

    # -- validation ---------------------------------------------------------------------
    @staticmethod
    def _check_duplicates(plist, dlist):
        seen: dict[str, str] = {}
        for role, syms in (("params", plist), ("data", dlist)):
            for s in syms:
                if s.name in seen:
                    where = seen[s.name]
                    if where == role:
                        raise CostError(f"{role} lists {s.name!r} twice")
                    raise CostError(f"{s.name!r} is listed both as a parameter and as a data column")
                seen[s.name] = role

    @staticmethod
    def _check_free_symbols(e, plist, dlist):
        known = set(plist) | set(dlist)
        names = {s.name for s in known}
        unknown = sorted(e.free_symbols - known, key=lambda s: s.name)
        if not unknown:
            return
        clash = [s for s in unknown if s.name in names]
        if clash:
            s = clash[0]
            raise CostError(
                f"symbol {s.name!r} in the expression has assumptions {s.assumptions0} that differ "
                f"from the declared {s.name!r}; use the symbol returned by cm.params/cm.data"
            )
        listed = ", ".join(repr(s.name) for s in unknown)
        hint = "" if dlist else " (a per-row data column goes in data=[...])"
        raise CostError(
            f"symbol{'s' if len(unknown) > 1 else ''} {listed} in the expression "
            f"{'are' if len(unknown) > 1 else 'is'} neither a parameter nor data{hint}"
        )

    @staticmethod
    def _check_real(e):
        if e.has(sp.I) or e.has(sp.zoo) or Cost._provably_complex(e):
            raise CostError(f"the cost expression is not real-valued: {e}")
        bad = {sp.re, sp.im, sp.arg, sp.conjugate}
        found = [f for f in e.atoms(sp.Function) if type(f) in bad]
        if found:
            raise CostError(f"the cost expression uses the complex-valued function {type(found[0]).__name__}: {found[0]}")
        if e.has(sp.nan):
            raise CostError("the cost expression contains nan")
        if e.atoms(sp.Derivative, sp.Integral):
            raise CostError("the cost expression holds an unevaluated Derivative or Integral; call .doit() first")

    @staticmethod
    def _provably_complex(e) -> bool:
        """Whether SymPy proves a part of ``e`` not real: asked of the parts that can leave the
        reals (a power with a non-integer exponent, a function), each once, not of the whole
        expression (SymPy's assumptions on a sum of 1,000 terms took 4.5 s: chained Rosenbrock)."""
        seen = set()
        for node in sp.preorder_traversal(e):
            if node in seen or node.is_Atom:
                continue
            seen.add(node)
            if (node.is_Pow and not node.exp.is_integer) or isinstance(node, sp.Function):
                if node.is_extended_real is False:
                    return True
        return False

    # -- the statement ------------------------------------------------------------------
    @property
    def expr(self) -> sp.Expr:
        """The per-row SymPy expression."""
        return self._expr

    @property
    def params(self) -> tuple:
        """Parameter symbols, in ``theta`` order."""
        return self._params

    @property
    def data(self) -> tuple:
        """Data column symbols, in column order."""
        return self._data

    @property
    def penalty(self):
        """The penalty added once to the reduced cost (None without one). For a scalar cost with
        ``reduce="mean"`` it is part of ``expr`` too: mean(expr + penalty) = mean(expr) + penalty."""
        return self._penalty

    @property
    def n_params(self) -> int:
        """The number of scalar parameters."""
        return len(self._params)

    def pack(self, values: dict):
        """A dict ``{name: value}`` -> the flat parameter vector in ``params`` order."""
        import numpy as np

        from .errors import ParamError

        if not isinstance(values, dict):
            raise ParamError(f"pack takes a dict {{name: value}}, got {type(values).__name__}")
        unknown = [k for k in values if k not in self.param_names]
        if unknown:
            raise ParamError(f"{', '.join(map(repr, unknown))} not a parameter of this cost; its parameters are "
                             f"{list(self.param_names)}")
        missing = [k for k in self.param_names if k not in values]
        if missing:
            raise ParamError(f"missing parameter{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
        return np.array([float(values[k]) for k in self.param_names])

    def unpack(self, theta) -> dict:
        """The flat parameter vector -> ``{name: float}``."""
        import numpy as np

        from .errors import ParamError

        t = np.asarray(theta, dtype=np.float64)
        if t.shape != (len(self._params),):
            raise ParamError(f"theta must have shape ({len(self._params)},) for this cost, got {t.shape}")
        return {k: float(v) for k, v in zip(self.param_names, t)}

    @property
    def reduce(self) -> str:
        """``"mean"`` or ``"sum"``."""
        return self._reduce

    @property
    def param_names(self) -> tuple:
        return tuple(s.name for s in self._params)

    @property
    def data_names(self) -> tuple:
        return tuple(s.name for s in self._data)

    # -- exact derivatives ---------------------------------------------------------------
    @cached_property
    def gradient(self) -> tuple:
        """Exact partial derivatives of the per-row expression, one per parameter."""
        return tuple(sp.diff(self._expr, p) for p in self._params)

    @cached_property
    def hessian(self) -> sp.Matrix:
        """Exact Hessian of the per-row expression (same construction as ``sympy.hessian``)."""
        n = len(self._params)
        H = sp.zeros(n, n)
        for i, gi in enumerate(self.gradient):
            for j in range(i, n):
                H[i, j] = sp.diff(gi, self._params[j])
                H[j, i] = H[i, j]
        return H

    # -- identity -----------------------------------------------------------------------
    @cached_property
    def key(self) -> str:
        """A hash of the statement (expression, symbol order, reduction): the cache key's core."""
        h = hashlib.sha256()
        # order="none": a sum's arguments in their own canonical order (the same in every
        # process), not sorted again by their monomials (2.5 s for a sum of 2,000 terms)
        expr = sp.srepr(self._expr, order="none")
        for part in (expr, *map(sp.srepr, self._params), "|", *map(sp.srepr, self._data), self._reduce):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def __eq__(self, other):
        return isinstance(other, Cost) and self.key == other.key

    def __hash__(self):
        return hash(self.key)

    # -- display ------------------------------------------------------------------------
    def __repr__(self):
        p = ", ".join(self.param_names)
        d = ", ".join(self.data_names)
        tail = f", data=[{d}], reduce={self._reduce!r}" if self._data else ""
        return f"Cost({self._expr}, params=[{p}]{tail})"

    def _repr_latex_(self):
        body = sp.latex(self._expr)
        if not self._data:
            return f"$\\displaystyle J({', '.join(sp.latex(p) for p in self._params)}) = {body}$"
        lhs = "J(" + ", ".join(sp.latex(p) for p in self._params) + ")"
        if self._reduce == "mean":
            red = "\\frac{1}{N}\\sum_{i=1}^{N}"
        else:
            red = "\\sum_{i=1}^{N}"
        return f"$\\displaystyle {lhs} = {red} \\left({body}\\right)_i$"
