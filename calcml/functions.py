"""Machine-learning activations as SymPy functions with exact derivatives.

Each function stands beside its derivative rule (``fdiff``) and its definition in
elementary functions (``_eval_rewrite_as_*``), which also serves exact and
high-precision evaluation. The compiled forms, which must not overflow, live in the
printer (:mod:`calcml.printing`).

``dot(u, v)`` is not a function object: it expands to ``u0*v0 + u1*v1 + ...`` so that
the derivative rules of ``Add`` and ``Mul`` apply unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import mpmath
import sympy as sp

from .errors import CostError

__all__ = ["sigmoid", "softplus", "relu", "dot"]


def _numeric_evalf(func, prec):
    """Evaluate an activation at a real number with mpmath, with guard bits."""
    arg = func.args[0]._eval_evalf(prec + 20)
    if arg is None or not arg.is_Number or not arg.is_extended_real:
        return None
    with mpmath.workprec(prec + 20):
        value = type(func)._mpmath(arg._to_mpmath(prec + 20))
    return sp.Float._new(mpmath.mpf(value)._mpf_, prec)


class _Activation(sp.Function):
    """Shared behaviour: one real argument, real value on the real line.

    Each activation is the one place that defines it: ``_elementary(z)`` (its form in
    elementary functions, which SymPy's limits and simplification know), ``_mpmath(z)`` (its
    value at high precision, for evalf and calcml's verifier), ``smooth`` (False where the
    verifier must split it into sign cases), ``fdiff`` (its derivative) and ``_numba_name`` /
    ``_numba`` (the compiled helper the generated code calls). Adding an activation is one
    subclass: :data:`ACTIVATIONS` lists them for the printer and the verifier.
    """

    nargs = 1
    smooth = True

    def _eval_is_extended_real(self):
        return self.args[0].is_extended_real

    def _eval_is_finite(self):
        if self.args[0].is_finite:
            return True
        return None

    def _eval_evalf(self, prec):
        return _numeric_evalf(self, prec)

    def _eval_rewrite_as_exp(self, z, **kwargs):
        return type(self)._elementary(z)


class sigmoid(_Activation):
    r"""The logistic function :math:`\sigma(z) = 1 / (1 + e^{-z})`.

    Derivative: :math:`\sigma'(z) = \sigma(z)\,(1 - \sigma(z))`.
    Compiled in the overflow-free form that evaluates ``exp`` of a non-positive number only.
    """

    _numba_name = "_sigmoid"
    _numba = '''\
def _sigmoid(z):
    """logistic 1/(1+exp(-z)) from e = exp(-|z|) in (0, 1]: never overflows. The same e
    as _softplus computes, so LLVM merges the two exp calls when both are inlined."""
    e = math.exp(-abs(z))
    if z >= 0.0:
        return 1.0 / (1.0 + e)
    return e / (1.0 + e)
'''

    @staticmethod
    def _elementary(z):
        return 1 / (1 + sp.exp(-z))

    @staticmethod
    def _mpmath(z):
        return 1 / (1 + mpmath.exp(-z))

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    @classmethod
    def eval(cls, z):
        if z.is_zero:
            return sp.S.Half
        if z is sp.S.Infinity:
            return sp.S.One
        if z is sp.S.NegativeInfinity:
            return sp.S.Zero
        return None

    def _eval_is_positive(self):
        if self.args[0].is_extended_real:
            return True
        return None

    def _eval_rewrite_as_tanh(self, z, **kwargs):
        return (1 + sp.tanh(z / 2)) / 2


class softplus(_Activation):
    r"""The smooth ReLU :math:`\operatorname{softplus}(z) = \log(1 + e^{z})`.

    Derivative: :math:`\sigma(z)`. Compiled as ``max(z, 0) + log1p(exp(-|z|))``, which
    neither overflows for large ``z`` nor loses digits for very negative ``z``.
    """

    _numba_name = "_softplus"
    _numba = '''\
def _softplus(z):
    """log(1+exp(z)) = max(z, 0) + log1p(e), e = exp(-|z|) in (0, 1]: never overflows.

    log1p(e) as log(u)*e/(u-1), u = 1+e (Goldberg 1991, "What every computer scientist
    should know about floating-point arithmetic", Thm 4): within a few ulp, and twice
    as fast as libm's log1p here. NaN in gives NaN out.
    """
    e = math.exp(-abs(z))
    u = 1.0 + e
    if u == 1.0:
        lp = e
    else:
        lp = math.log(u) * e / (u - 1.0)
    if z > 0.0:
        return z + lp
    return lp
'''

    @staticmethod
    def _elementary(z):
        return sp.log(1 + sp.exp(z))

    @staticmethod
    def _mpmath(z):
        return mpmath.log1p(mpmath.exp(z))

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    @classmethod
    def eval(cls, z):
        if z.is_zero:
            return sp.log(2)
        if z is sp.S.Infinity:
            return sp.S.Infinity
        if z is sp.S.NegativeInfinity:
            return sp.S.Zero
        return None

    def _eval_is_positive(self):
        if self.args[0].is_extended_real:
            return True
        return None

    def _eval_rewrite_as_log(self, z, **kwargs):
        return self._elementary(z)


class relu(_Activation):
    r"""The rectifier :math:`\operatorname{relu}(z) = \max(0, z)`.

    Derivative: ``Heaviside(z, 0)``, i.e. 1 for ``z > 0`` and 0 for ``z <= 0`` (the
    subgradient convention of PyTorch and JAX; relu is not differentiable at 0, which
    :func:`calcml.verify_derivative` reports).
    """

    _numba_name = "_relu"
    _numba = '''\
def _relu(z):
    """max(z, 0), NaN in gives NaN out"""
    return 0.0 if z <= 0.0 else z
'''

    smooth = False  # a kink at 0: the verifier splits it into sign cases

    @staticmethod
    def _elementary(z):
        return sp.Max(0, z)

    @staticmethod
    def _mpmath(z):
        if isinstance(z, mpmath.mpc):
            if z.imag != 0:
                raise ValueError("relu of a non-real value")
            z = z.real
        return mpmath.mpf(0) if z <= 0 else z

    def fdiff(self, argindex=1):
        return sp.Heaviside(self.args[0], 0)

    @classmethod
    def eval(cls, z):
        if z.is_nonnegative:
            return z
        if z.is_nonpositive:
            return sp.S.Zero
        return None

    def _eval_is_nonnegative(self):
        if self.args[0].is_extended_real:
            return True
        return None

    def _eval_rewrite_as_Max(self, z, **kwargs):
        return sp.Max(0, z)

    def _eval_rewrite_as_Piecewise(self, z, **kwargs):
        return sp.Piecewise((z, z > 0), (0, True))

    def _eval_rewrite_as_exp(self, z, **kwargs):
        return sp.Max(0, z)


def _as_vector(v, name: str) -> list:
    if isinstance(v, sp.MatrixBase):
        if 1 not in v.shape:
            raise CostError(f"dot: {name} must be a vector, got a matrix of shape {v.shape}")
        return list(v)
    if isinstance(v, (sp.Basic, str)) or not isinstance(v, Iterable):
        raise CostError(
            f"dot: {name} must be a sequence of SymPy expressions (a tuple from cm.params or "
            f"cm.data, a list, a sympy Matrix), got {type(v).__name__}"
        )
    return [sp.sympify(e, strict=True) for e in v]


def dot(u, v) -> sp.Expr:
    """The inner product ``u0*v0 + u1*v1 + ...`` of two equally long sequences of expressions.

    >>> import calcml as cm
    >>> w = cm.params("w", 2); x = cm.data("x", 2)
    >>> cm.dot(w, x)
    w0*x0 + w1*x1
    """
    if isinstance(u, sp.IndexedBase) or isinstance(v, sp.IndexedBase):
        from .tensor.statement import vector_dot

        if not (isinstance(u, sp.IndexedBase) and isinstance(v, sp.IndexedBase)):
            raise CostError("dot: give two tensors (cm.params/cm.data with shape=(n,)) or two sequences of symbols")
        return vector_dot(u, v)
    a, b = _as_vector(u, "u"), _as_vector(v, "v")
    if len(a) != len(b):
        raise CostError(f"dot: lengths differ, len(u) = {len(a)} but len(v) = {len(b)}")
    return sp.Add(*[ai * bi for ai, bi in zip(a, b)])


def _activations():
    """Every activation class (subclasses of _Activation, subclasses of those too)."""
    out, stack = [], list(_Activation.__subclasses__())
    while stack:
        cls = stack.pop(0)
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return tuple(out)


#: The activation classes: the registry calcml's printer, verifier and rewrites read.
ACTIVATIONS = _activations()
