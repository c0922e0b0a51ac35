"""SymPy expressions evaluated with mpmath at a chosen precision (evidence, never a proof),
and the status of an exact value: real, undefined, complex or unknown."""

from __future__ import annotations

import mpmath
import sympy as sp
from sympy.calculus.accumulationbounds import AccumBounds

from ..functions import ACTIVATIONS


mp = mpmath.mp


class _Undefined(Exception):
    """The expression has no finite value at this point."""


def _acot(z):
    return mp.pi / 2 if z == 0 else mp.atan(1 / z)


def _heaviside(z, h0=None):
    if z > 0:
        return mp.mpf(1)
    if z < 0:
        return mp.mpf(0)
    return mp.mpf(0.5) if h0 is None else h0


#: One-to-one functions: SymPy class -> mpmath function, following SymPy's conventions.
_MP_FUNCS = {
    sp.exp: mp.exp, sp.log: mp.log,
    sp.sin: mp.sin, sp.cos: mp.cos, sp.tan: mp.tan, sp.cot: mp.cot, sp.sec: mp.sec, sp.csc: mp.csc,
    sp.asin: mp.asin, sp.acos: mp.acos, sp.atan: mp.atan, sp.acot: _acot,
    sp.asec: lambda z: mp.acos(1 / z), sp.acsc: lambda z: mp.asin(1 / z),
    sp.sinh: mp.sinh, sp.cosh: mp.cosh, sp.tanh: mp.tanh, sp.coth: mp.coth, sp.sech: mp.sech, sp.csch: mp.csch,
    sp.asinh: mp.asinh, sp.acosh: mp.acosh, sp.atanh: mp.atanh,
    sp.acoth: lambda z: mp.atanh(1 / z), sp.asech: lambda z: mp.acosh(1 / z), sp.acsch: lambda z: mp.asinh(1 / z),
    sp.erf: mp.erf, sp.erfc: mp.erfc, sp.gamma: mp.gamma, sp.loggamma: mp.loggamma,
    sp.Abs: abs, sp.sign: lambda z: mp.mpf(0) if z == 0 else z / abs(z),
    sp.sinc: lambda z: mp.mpf(1) if z == 0 else mp.sin(z) / z,
    sp.Heaviside: _heaviside,
    sp.DiracDelta: lambda z, *k: mp.mpf(0) if z != 0 else mp.inf,
    sp.floor: lambda z: mp.floor(_real(z)), sp.ceiling: lambda z: mp.ceil(_real(z)),
}

# calcml's activations: each class's own high-precision form (calcml/functions.py)
_MP_FUNCS.update({cls: cls._mpmath for cls in ACTIVATIONS})

_MP_CONSTANTS = {sp.pi: lambda: mp.pi, sp.E: lambda: mp.e, sp.EulerGamma: lambda: mp.euler,
                 sp.GoldenRatio: lambda: mp.phi, sp.Catalan: lambda: mp.catalan}


def _real(v):
    if isinstance(v, mpmath.mpc):
        if v.imag != 0:
            raise _Undefined("a comparison of a non-real value")
        return v.real
    return v


def _mp_eval(expr, env: dict):
    """Evaluate a SymPy expression with mpmath at the current precision."""
    memo: dict = {}

    def ev(e):
        v = memo.get(e)
        if v is None:
            v = _mp_node(e, ev, env)
            memo[e] = v
        return v

    v = ev(expr)
    if not mp.isfinite(v):
        raise _Undefined(f"{expr} is not finite here")
    return v


def _mp_node(e, ev, env):
    if e.is_Symbol:
        try:
            return env[e]
        except KeyError:
            raise _Undefined(f"no value for {e}") from None
    if e.is_Integer:
        return mp.mpf(int(e))
    if e.is_Rational:
        return mp.mpf(int(e.p)) / int(e.q)
    if e.is_Float:
        return mp.mpf(e._mpf_)
    if e is sp.I:
        return mp.mpc(0, 1)
    if e in _MP_CONSTANTS:
        return _MP_CONSTANTS[e]()
    if e.has(sp.nan, sp.zoo, sp.oo, -sp.oo) and e.is_Atom:
        raise _Undefined(f"{e}")
    try:
        if e.is_Add:
            return mp.fsum(ev(a) for a in e.args)
        if e.is_Mul:
            return mp.fprod(ev(a) for a in e.args)
        if e.is_Pow:
            b = ev(e.base)
            if e.exp.is_Integer:
                n = int(e.exp)
                if n < 0 and b == 0:
                    raise _Undefined("division by zero")
                return b ** n
            if e.exp == sp.S.Half:
                return mp.sqrt(b)
            x = ev(e.exp)
            if b == 0:
                if _real(x) > 0:
                    return mp.mpf(0)
                raise _Undefined("0 to a non-positive power")
            return mp.power(b, x)
        if isinstance(e, sp.Piecewise):
            for expr_i, cond in e.args:
                if _mp_truth(cond, ev):
                    return ev(expr_i)
            raise _Undefined("no Piecewise branch applies")
        if isinstance(e, (sp.Max, sp.Min)):
            vals = [_real(ev(a)) for a in e.args]
            return max(vals) if isinstance(e, sp.Max) else min(vals)
        fn = _MP_FUNCS.get(type(e))
        if fn is not None:
            v = fn(*[ev(a) for a in e.args])
        else:
            v = _evalf_fallback(e, ev)
    except (ZeroDivisionError, ValueError, OverflowError) as exc:
        raise _Undefined(str(exc)) from None
    if not mp.isfinite(v):
        raise _Undefined(f"{type(e).__name__} is not finite here")
    return v


def _evalf_fallback(e, ev):
    """A function without a table entry: let SymPy's evalf evaluate it at numeric arguments."""
    if not isinstance(e, sp.Function):
        raise _Undefined(f"cannot evaluate {type(e).__name__}")
    args = []
    for a in e.args:
        v = ev(a)
        if isinstance(v, mpmath.mpc):
            args.append(sp.Float(v.real, mp.dps) + sp.I * sp.Float(v.imag, mp.dps))
        else:
            args.append(sp.Float(v, mp.dps))
    r = e.func(*args).evalf(mp.dps)
    re, im = r.as_real_imag()
    if not (re.is_Number and im.is_Number) or re.has(sp.nan, sp.zoo) or im.has(sp.nan, sp.zoo):
        raise _Undefined(f"{type(e).__name__} does not evaluate here")
    return mp.mpf(re) if im == 0 else mp.mpc(re, im)


def _mp_truth(cond, ev) -> bool:
    if cond is sp.true:
        return True
    if cond is sp.false:
        return False
    if isinstance(cond, sp.And):
        return all(_mp_truth(c, ev) for c in cond.args)
    if isinstance(cond, sp.Or):
        return any(_mp_truth(c, ev) for c in cond.args)
    if isinstance(cond, sp.Not):
        return not _mp_truth(cond.args[0], ev)
    if isinstance(cond, sp.core.relational.Relational):
        a, b = _real(ev(cond.lhs)), _real(ev(cond.rhs))
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[cond.rel_op]
    raise _Undefined(f"cannot decide the condition {cond}")


def _mp_real(expr, env):
    """A real value, or ``_Undefined`` (also for a value with a non-negligible imaginary part)."""
    v = _mp_eval(expr, env)
    if isinstance(v, mpmath.mpc):
        if abs(v.imag) > mpmath.mpf(10) ** (10 - mp.dps) * (1 + abs(v.real)):
            raise _NotReal(f"{v}")
        v = v.real
    return v


class _NotReal(_Undefined):
    """The expression is complex here."""


def _value_status(v) -> str:
    """'real', 'undefined', 'complex' or 'unknown' for an exact value."""
    if v.has(sp.nan, sp.zoo, sp.oo, -sp.oo) or v.has(AccumBounds):
        return "undefined"
    if v.is_extended_real:
        return "real"
    if v.is_extended_real is False:
        return "complex"
    if v.is_number:
        try:
            with mp.workdps(50):
                val = _mp_eval(v, {})
        except _Undefined:
            return "unknown"
        if isinstance(val, mpmath.mpc) and abs(val.imag) > mpmath.mpf(10) ** -40 * (1 + abs(val.real)):
            return "complex"
        return "real" if not isinstance(val, mpmath.mpc) or val.imag == 0 else "unknown"
    return "unknown"
