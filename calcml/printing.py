"""The Numba printer: SymPy expressions to scalar Python that Numba compiles in nopython mode.

Built on SymPy's ``PythonCodePrinter`` (the ``math`` module functions, which Numba
supports for scalars), with the changes Numba and numerical safety need:

* strict: an unsupported node is a :class:`~calcml.errors.CodegenError` naming its type,
  never silently wrong code, and undefined functions are refused;
* symbols print through a name table (``theta`` slots, data columns, temporaries), so a
  symbol's own name never reaches the code;
* ``Piecewise`` prints as nested conditional expressions (not ``numpy.select``, which
  Numba rejects and which evaluates every branch), with ``nan`` when no branch holds;
* numbers print as float literals, small integer powers as products;
* activations and non-smooth functions call helpers from :data:`HELPERS`, written to
  propagate NaN and never to overflow.
"""

from __future__ import annotations

import importlib
import math
from contextlib import contextmanager

import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.printing.codeprinter import PrintMethodNotImplementedError

from .errors import CodegenError

_pycode = importlib.import_module("sympy.printing.pycode")


class DiracTimes(sp.Function):
    """``DiracTimes(z, r)``: the product ``r * DiracDelta(z)`` as the kernels compute it
    (``_dirac_times``): 0 where z != 0, and at z = 0 also 0 when r is 0 there. A derivative
    of a step times what vanishes with its argument (``u**2 * DiracDelta(u)`` in the gradient
    of ``Heaviside(u) * u**2``, ``relu(u) * DiracDelta(u)`` in the Hessian of ``relu(u)**2``)
    is 0 at the kink, not 0 * NaN. Made by :func:`dirac_products`: in ``doprint_expr`` for
    every expression printed, and before the scalar kernels' CSE, which could otherwise take
    ``DiracDelta(u)`` into a temporary of its own, away from its factor."""

    nargs = 2


def _is_delta(f) -> bool:
    return isinstance(f, sp.DiracDelta) and len(f.args) == 1  # order 0: DiracDelta(z, 1) keeps NaN at 0


def dirac_products(e):
    """``e`` with each product that has a factor ``DiracDelta(z)`` written as ``DiracTimes(z,
    the other factors)`` (see :class:`DiracTimes`); ``e`` itself when it has no DiracDelta."""
    if not isinstance(e, sp.Basic) or not e.has(sp.DiracDelta):
        return e

    def rule(m):
        args = list(m.args)
        k = next(i for i, f in enumerate(args) if _is_delta(f))
        delta = args.pop(k)
        return DiracTimes(delta.args[0], dirac_products(sp.Mul(*args)))

    return e.replace(lambda m: m.is_Mul and any(_is_delta(f) for f in m.args), rule)

# Helper functions the printed code may call. Each is emitted into the generated module
# only when used, compiled with the module's Numba flags.
HELPERS = {
    "_exp": '''\
def _exp(x):
    """exp(x) within 2 ulp of the true value, with no branch and no libm call, so that a loop
    of them vectorises: x = n ln2 + r, |r| <= ln2/2 (Cody-Waite), exp(r) by its Taylor
    polynomial to r**13, times 2**n built in the exponent bits (two factors, so that
    results in the subnormal range round once). inf, 0 and NaN where exp gives them."""
    if x > 710.0:
        x = 710.0
    if x < -746.0:
        x = -746.0
    n = np.floor(x * 1.4426950408889634 + 0.5)
    n = n if n == n else 0.0
    r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10
    p = _EXPM1_POLY
    k = np.int64(n)
    k1 = k >> 1
    s1 = np.int64((k1 + 1023) << 52).view(np.float64)
    s2 = np.int64((k - k1 + 1023) << 52).view(np.float64)
    return ((1.0 + p) * s1) * s2
''',
    "_tanh": '''\
def _tanh(x):
    """tanh(x) within 3 ulp of the true value, with no branch and no libm call, so that a
    loop of them vectorises: t = expm1(2|x|) / (expm1(2|x|) + 2) with the sign of x, the
    expm1 as in _exp (2|x| = n ln2 + r, expm1 = 2**n expm1(r) + 2**n - 1), |x| capped at
    20 where tanh is 1 to double precision. NaN in gives NaN out."""
    a = abs(x)
    if a > 20.0:
        a = 20.0
    y = a + a
    n = np.floor(y * 1.4426950408889634 + 0.5)
    n = n if n == n else 0.0
    r = (y - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10
    p = _EXPM1_POLY
    s = np.int64((np.int64(n) + 1023) << 52).view(np.float64)
    em = s * p + (s - 1.0)
    return math.copysign(em / (em + 2.0), x)
''',
    "_heaviside": '''\
def _heaviside(z, h0):
    """step function with value h0 at 0; NaN in gives NaN out"""
    if z > 0.0:
        return 1.0
    if z < 0.0:
        return 0.0
    if z == 0.0:
        return h0
    return z
''',
    "_sign": '''\
def _sign(z):
    """sign of z: -1, 0 or 1; NaN in gives NaN out"""
    if z > 0.0:
        return 1.0
    if z < 0.0:
        return -1.0
    return z
''',
    "_dirac": '''\
def _dirac(z):
    """DiracDelta as a function: 0 away from 0; NaN at 0, where it has no value"""
    if z != 0.0:
        return 0.0 if z == z else z
    return math.nan
''',
    "_dirac_times": '''\
def _dirac_times(z, r):
    """r * DiracDelta(z): 0 away from z = 0; at z = 0, 0 when r is 0 there (f(x) DiracDelta(x)
    is f(0) DiracDelta(x) for a continuous f: u**2 DiracDelta(u), relu(u) DiracDelta(u) vanish),
    else NaN, where it has no value"""
    if z != 0.0:
        return r * 0.0 if z == z else z
    return 0.0 if r == 0.0 else math.nan
''',
    "_max2": '''\
def _max2(a, b):
    """max of two floats; NaN if either is NaN (like numpy.maximum)"""
    if a >= b:
        return a
    if b > a:
        return b
    return a + b
''',
    "_min2": '''\
def _min2(a, b):
    """min of two floats; NaN if either is NaN (like numpy.minimum)"""
    if a <= b:
        return a
    if b < a:
        return b
    return a + b
''',
}

# calcml's activations bring their own compiled form (calcml/functions.py: _numba_name, _numba)
from .functions import ACTIVATIONS as _ACTIVATIONS  # noqa: E402

for _cls in _ACTIVATIONS:
    HELPERS[_cls._numba_name] = _cls._numba
_ACTIVATION_SET = frozenset(_ACTIVATIONS)

# expm1(r) for |r| <= ln2/2: Taylor to r**13 (remainder below 2**-60 relative), Horner.
_EXPM1_POLY = "r * (1.0 + r * (" + " + r * (".join(
    f"1.0 / {math.factorial(k)}.0" for k in range(2, 14)) + ")" * 13
for _name in ("_exp", "_tanh"):
    HELPERS[_name] = HELPERS[_name].replace("_EXPM1_POLY", _EXPM1_POLY)

# One-to-one function names: SymPy class name -> function in the generated module's scope.
_MATH_FUNCTIONS = {
    name: f"math.{target}"
    for name, target in _pycode._known_functions_math.items()
    if name not in {"factorial", "isinf", "isnan", "floor", "ceiling"}
}
_MATH_FUNCTIONS.update({"floor": "np.floor", "ceiling": "np.ceil"})

# Functions printed through their definition in other functions.
_RECIPROCAL = {"sec": "math.cos", "csc": "math.sin", "cot": "math.tan"}


# Sums of more terms print in their own (canonical) order, not SymPy's (NumbaPrinter._as_ordered_terms).
ORDERED_TERMS_MAX = 64


class NumbaPrinter(_pycode.PythonCodePrinter):
    """Prints one scalar expression at a time; ``names`` maps every symbol to its code name."""

    printmethod = "_numbacode"
    language = "Python (Numba nopython)"

    def __init__(self, names: dict, settings=None, memo: bool = False):
        base = {"strict": True, "fully_qualified_modules": True, "allow_unknown_functions": False}
        base.update(settings or {})
        super().__init__(base)
        self.known_functions = dict(_MATH_FUNCTIONS)
        self.names = names
        self.helpers_used: set[str] = set()
        # memo: each expression printed once per name table (a module renders the same
        # statements in several kernels); only for printers whose output depends on nothing
        # but the expression and the names
        self._printed = {} if memo else None

    # -- entry point ---------------------------------------------------------------------
    def doprint_expr(self, expr) -> str:
        memo = self._printed
        if memo is not None:
            found = memo.get(expr)
            if found is not None:
                return found
        try:
            text = self._print(dirac_products(expr))
        except PrintMethodNotImplementedError as exc:
            raise CodegenError(f"cannot compile {expr}: {exc.args[0].splitlines()[0]}") from None
        if memo is not None:
            memo[expr] = text
        return text

    @contextmanager
    def naming(self, extra: dict):
        """Print with the symbols of ``extra`` under its names (over the table's own): how a
        statement is renamed, symbol by symbol, never by editing its text."""
        saved, saved_memo = self.names, self._printed
        self.names = {**saved, **extra}
        if saved_memo is not None:
            self._printed = {}
        try:
            yield self
        finally:
            self.names, self._printed = saved, saved_memo

    def assignments(self, pairs, extra: dict) -> list:
        """``(target, expression)`` pairs as assignments (:mod:`calcml.ir`), their symbols
        named by ``extra``, printed now (under that naming)."""
        from .ir import Assign

        with self.naming(extra):
            return [Assign(self.doprint_expr(t), self.doprint_expr(e)) for t, e in pairs]

    def _print_not_supported(self, expr):
        raise CodegenError(
            f"cannot compile a {type(expr).__name__} node ({expr}); calcml's Numba printer "
            f"supports real elementary functions, Piecewise, Abs, Max/Min, sign, Heaviside "
            f"and cm.sigmoid/softplus/relu"
        )

    emptyPrinter = _print_not_supported

    def _helper(self, name: str, *args) -> str:
        self.helpers_used.add(name)
        return f"{name}({', '.join(self._print(a) for a in args)})"

    # -- atoms ---------------------------------------------------------------------------
    def _print_Symbol(self, expr):
        try:
            return self.names[expr]
        except KeyError:
            raise CodegenError(f"symbol {expr.name!r} has no slot in the generated code") from None

    _print_Dummy = _print_Symbol

    def _float(self, value: float) -> str:
        if math.isnan(value):
            return "math.nan"
        if math.isinf(value):
            return "math.inf" if value > 0 else "(-math.inf)"
        text = repr(float(value))
        return f"({text})" if value < 0 else text

    def _print_Integer(self, expr):
        try:
            return self._float(float(int(expr)))
        except OverflowError:
            raise CodegenError(f"the integer {expr} does not fit in a float64") from None

    def _print_Rational(self, expr):
        return self._float(float(expr))

    def _print_Float(self, expr):
        return self._float(float(expr))

    def _print_NumberSymbol(self, expr):
        return self._float(float(expr))

    _print_Exp1 = _print_Pi = _print_EulerGamma = _print_GoldenRatio = _print_Catalan = _print_NumberSymbol

    def _print_Infinity(self, expr):
        return "math.inf"

    def _print_NegativeInfinity(self, expr):
        return "(-math.inf)"

    def _print_NaN(self, expr):
        return "math.nan"

    def _print_ComplexInfinity(self, expr):
        raise CodegenError("cannot compile complex infinity (zoo): the expression divides by zero")

    def _print_ImaginaryUnit(self, expr):
        raise CodegenError("cannot compile the imaginary unit I: calcml kernels are real-valued")

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    # -- arithmetic ----------------------------------------------------------------------
    def _as_ordered_terms(self, expr, order=None):
        """A sum's terms in SymPy's print order, or, beyond ORDERED_TERMS_MAX terms, in the sum's
        own argument order (canonical: the same in every process). SymPy orders terms by their
        monomials in all the sum's symbols, in time terms x symbols: 2.5 s of printing for
        chained Rosenbrock over 1,000 symbols."""
        if order is None and len(expr.args) > ORDERED_TERMS_MAX:
            return list(expr.args)
        return super()._as_ordered_terms(expr, order=order)

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.base, expr.exp
        if base is sp.E:
            return f"math.exp({self._print(exp)})"
        if exp.is_Float and (float(exp).is_integer() or abs(float(exp)) == 0.5):
            # 2.0, 0.5, -1.0, ...: as the integer or half they are (LLVM makes pow(x, 0.5) a sqrt,
            # pow(x, 2.0) a product and pow(x, -1.0) a division, where Python calls pow)
            exp = sp.Integer(int(exp)) if float(exp).is_integer() else sp.Rational(int(2 * float(exp)), 2)
        b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Mul"] + 1)
        if exp.is_Integer and abs(int(exp)) <= 8:
            n = int(exp)
            if n == 0:
                return "1.0"
            prod = "*".join([b] * abs(n))
            return f"({prod})" if n > 0 else f"(1.0/({prod}))"
        if exp == sp.S.Half:
            return f"math.sqrt({self._print(base)})"
        if exp == -sp.S.Half:
            return f"(1.0/math.sqrt({self._print(base)}))"
        # Powers are libm's pow of two floats, as Python's are, so that the loops run as Python
        # (calcml.loop's Python tier) give the machine code's bits: never ** of an int exponent
        # (Numba squares repeatedly where Python calls pow), and a positive number to a power as
        # exp(power * log(number)) (LLVM rewrites pow(2^k, y) as exp2(k y) where Python does not).
        e = self._print(exp)  # a number prints as a float
        if exp.is_Number:
            return f"math.pow({self._print(base)}, {e})"
        if base.is_Number and base.is_positive:
            return f"math.exp({self._float(float(sp.log(base).evalf(20)))}*float({e}))"
        return f"math.pow({self._print(base)}, float({e}))"

    # -- functions -----------------------------------------------------------------------
    def _print_function(self, expr):
        if isinstance(expr, AppliedUndef):
            raise CodegenError(f"cannot compile the undefined function {expr.func.__name__}: define it with SymPy functions")
        name = type(expr).__name__
        if name in _RECIPROCAL:
            return f"(1.0/{_RECIPROCAL[name]}({self._print(expr.args[0])}))"
        return super()._print_Function(expr)

    def _print_Function(self, expr):  # calcml's activations (their own helpers), else SymPy's functions
        if type(expr) in _ACTIVATION_SET:
            return self._helper(type(expr)._numba_name, expr.args[0])
        return self._print_function(expr)

    def _print_Heaviside(self, expr):
        h0 = expr.args[1] if len(expr.args) > 1 else sp.S.Half
        return self._helper("_heaviside", expr.args[0], h0)

    def _print_DiracDelta(self, expr):
        # The derivative of a step (sign, Heaviside, Abs'), and its derivatives
        # DiracDelta(z, k): zero away from 0.
        return self._helper("_dirac", expr.args[0])

    def _print_DiracTimes(self, expr):
        return self._helper("_dirac_times", *expr.args)

    def _print_sign(self, expr):
        return self._helper("_sign", expr.args[0])

    def _print_Abs(self, expr):
        return f"abs({self._print(expr.args[0])})"

    def _nary(self, helper, args):
        args = list(args)
        out = self._print(args[-1])
        for a in reversed(args[:-1]):
            self.helpers_used.add(helper)
            out = f"{helper}({self._print(a)}, {out})"
        return out

    def _print_Max(self, expr):
        return self._nary("_max2", expr.args)

    def _print_Min(self, expr):
        return self._nary("_min2", expr.args)

    def _print_atan2(self, expr):
        return f"math.atan2({self._print(expr.args[0])}, {self._print(expr.args[1])})"

    def _print_log(self, expr):
        if len(expr.args) == 2:  # log(x, b) only when unevaluated
            return f"(math.log({self._print(expr.args[0])})/math.log({self._print(expr.args[1])}))"
        return f"math.log({self._print(expr.args[0])})"

    # -- conditionals --------------------------------------------------------------------
    def _print_Piecewise(self, expr):
        out = "math.nan"
        for pe in reversed(expr.args):
            value = self._print(pe.expr)
            if pe.cond is sp.true:
                out = value
            else:
                out = f"({value} if {self._print(pe.cond)} else {out})"
        return out

    def _print_ITE(self, expr):
        return self._print(expr.rewrite(sp.Piecewise))

    def _print_Relational(self, expr):
        ops = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
        if expr.rel_op not in ops:
            return self._print_not_supported(expr)
        return f"({self._print(expr.lhs)} {ops[expr.rel_op]} {self._print(expr.rhs)})"

    def _print_And(self, expr):
        return "(" + " and ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " or ".join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"(not {self._print(expr.args[0])})"

    # -- refused outright ----------------------------------------------------------------
    def _print_Derivative(self, expr):
        return self._print_not_supported(expr)

    _print_Integral = _print_Subs = _print_Sum = _print_Product = _print_Derivative
    _print_MatrixBase = _print_Derivative


def helper_source(names) -> str:
    """Source of the helpers in ``names``, in a fixed order (deterministic modules)."""
    return "\n".join(HELPERS[n] for n in sorted(names))


class NotExact(Exception):
    """An operation whose NumPy form may round otherwise than the machine code's."""


class ArrayForms:
    """Mixed into a printer (:func:`array_printer`): prints an elementwise rule (an optimizer's
    update of each parameter) over whole arrays, the Python tier's NumPy form of a loop over the
    parameters (calcml.loop), with the printer's own order of terms and factors. Only
    operations that NumPy rounds as the machine code does (IEEE's correctly rounded +, -, *, /,
    sqrt; abs; integer powers as products), each element's operations in the statement's
    order: the same bits. Anything else (a libm function, a helper) raises NotExact: that rule
    keeps its loop in the tier too."""

    def _print_Pow(self, expr, rational=False):
        exp = expr.exp
        half = exp == sp.S.Half or (exp.is_Float and float(exp) == 0.5)
        if expr.base is not sp.E and half:
            return f"np.sqrt({self._print(expr.base)})"
        if expr.base is not sp.E and (exp.is_Integer or (exp.is_Float and float(exp).is_integer())) \
                and 0 < abs(int(exp)) <= 8:
            return super()._print_Pow(expr, rational)
        raise NotExact(str(expr))

    def _print_Abs(self, expr):
        return f"np.abs({self._print(expr.args[0])})"

    def _not_exact(self, expr, *args):
        raise NotExact(str(expr))

    _print_Function = _print_function = _print_log = _print_Piecewise = _print_ITE = _print_Relational = _not_exact
    _print_atan2 = _print_Max = _print_Min = _print_Heaviside = _print_DiracDelta = _print_sign = _not_exact

    def _helper(self, name: str, *args) -> str:
        raise NotExact(name)


def array_printer(printer: NumbaPrinter) -> NumbaPrinter:
    """A copy of ``printer`` (its names, its order of terms) that prints NumPy forms (ArrayForms)."""
    import copy

    out = copy.copy(printer)
    out.__class__ = type(f"Array{type(printer).__name__}", (ArrayForms, type(printer)), {})
    out.helpers_used = set()
    return out
