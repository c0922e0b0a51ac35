"""Numeric evidence from mpmath difference quotients, at sample points (general x) and on each
side of a given point: it refutes a derivative or supports a verdict; it never verifies."""

from __future__ import annotations

from dataclasses import dataclass

import mpmath
import sympy as sp

from .mpeval import _NotReal, _Undefined, _mp_eval, _mp_real, _value_status, mp
from .report import Verdict, _fmt_coord, _fmt_num, _short


_GENERAL_KS = (6, 8, 10, 12, 14, 16, 18, 20)
_POINT_KS = (3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 25, 30, 40, 50)


@dataclass
class _Side:
    """One-sided difference quotients q(h) for h = 10**-k, k increasing."""

    qs: list
    kind: str = "real"  # "real", "complex" (f non-real on this side), "undefined"

    def scale(self):
        return max(mpmath.mpf(1), abs(self.qs[-1]))

    def stable(self) -> bool:
        """Converged: the last three quotients agree closely."""
        if self.kind != "real" or len(self.qs) < 3:
            return False
        s = self.scale()
        return abs(self.qs[-1] - self.qs[-2]) <= 1e-12 * s and abs(self.qs[-2] - self.qs[-3]) <= 1e-9 * s

    def value(self):
        return self.qs[-1]

    def supports_finite(self, L) -> bool:
        if self.kind != "real" or len(self.qs) < 4:
            return False
        s = max(mpmath.mpf(1), abs(L))
        errs = [abs(q - L) for q in self.qs[-4:]]
        if errs[-1] <= 1e-6 * s:
            return True
        return all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:])) and errs[-1] <= 1e-3 * s

    def supports_infinite(self, sign: int) -> bool:
        if self.kind != "real" or len(self.qs) < 6:
            return False
        tail = self.qs[-5:]
        if any(q * sign <= 0 for q in tail):
            return False
        mags = [abs(q) for q in tail]
        return all(b > a for a, b in zip(mags, mags[1:])) and mags[-1] > 20 and mags[-1] > 10 * abs(self.qs[0])

    def oscillates(self) -> bool:
        if self.kind != "real" or len(self.qs) < 6:
            return False
        tail = self.qs[-6:]
        spread = max(tail) - min(tail)
        rising = all(b >= a for a, b in zip(tail, tail[1:]))
        falling = all(b <= a for a, b in zip(tail, tail[1:]))
        return spread > 1e-3 * max(mpmath.mpf(1), max(abs(q) for q in tail)) and not (rising or falling)


def _side_quotients(f, x, a, env, sign, ks) -> _Side:
    """q(h) = (f(a + s h) - f(a)) / (s h) for h = 10**-k, at an exact point.

    Each ladder is computed at two working precisions (with room for the cancellation of
    squares of h, and for the magnitudes of the point and of f there: f(a + h) - f(a) keeps
    its digits only when the working precision spans |f(a)| down to h |f'(a)|); where the
    two disagree the digits are not trustworthy and the side is marked ``"unreliable"``,
    which neither refutes nor supports anything.
    """
    base = 30 + 2 * max(ks) + _magnitude_digits(f, x, a, env)
    runs = []
    for dps in (base, base + 40):
        with mp.workdps(dps):
            menv = {s: _mp_eval(v, {}) for s, v in env.items()}
            runs.append(_ladder(f, x, _mp_eval(a, {}), menv, sign, ks))
    lo, hi = runs
    if lo.kind != hi.kind or len(lo.qs) != len(hi.qs):
        return _Side(hi.qs, "unreliable")
    for ql, qh in zip(lo.qs, hi.qs):
        if abs(ql - qh) > 1e-15 * max(mpmath.mpf(1), abs(qh)):
            return _Side(hi.qs, "unreliable")
    return hi


def _magnitude_digits(f, x, a, env) -> int:
    """Decimal digits that the sizes of f(a) and of the point's coordinates add to the
    precision a difference quotient needs (f(a) = 1e400 leaves a step of 1e-20 no digit at
    40 digits; neither does x = 1e200 + 1e-50): their decimal exponents, when above 1."""
    extra = 0
    with mp.workdps(30):
        try:
            menv = {s: _mp_eval(v, {}) for s, v in env.items()}
            point = _mp_eval(a, {})
            for v in [point, *menv.values()]:
                if isinstance(v, mpmath.mpf) and mpmath.isfinite(v) and abs(v) > 1:
                    extra = max(extra, int(mpmath.log10(abs(v))) + 1)
            fa = _mp_real(f, {**menv, x: point})
            if mpmath.isfinite(fa) and abs(fa) > 1:
                extra += int(mpmath.log10(abs(fa))) + 1
        except (_NotReal, _Undefined, ValueError, TypeError, ZeroDivisionError, OverflowError):
            pass
    return min(extra, 4000)


def _ladder(f, x, a, env, sign, ks) -> _Side:
    fa = _mp_real(f, {**env, x: a})
    qs = []
    for k in ks:
        h = mpmath.mpf(10) ** (-k)
        try:
            v = _mp_real(f, {**env, x: a + sign * h})
        except _NotReal:
            return _Side(qs, "complex")
        except _Undefined:
            return _Side(qs, "undefined")
        qs.append((v - fa) / (sign * h))
    return _Side(qs)


#: Sample coordinates: rationals away from the usual special points (0, +-1, +-pi/2 ...).
_SAMPLES = (
    sp.Rational(7, 10), sp.Rational(23, 10), sp.Rational(-3, 5), sp.Rational(13, 10), sp.Rational(1, 3),
    sp.Rational(-17, 10), sp.Rational(31, 10), sp.Rational(11, 20), sp.Rational(-7, 3), sp.Rational(9, 4),
    sp.Rational(3, 8), sp.Rational(-1, 7), sp.Rational(5, 3), sp.Rational(43, 10), sp.Rational(-29, 10),
    sp.Rational(17, 20),
)


def _sample_points(symbols, trials: int = 16):
    syms = sorted(symbols, key=lambda s: s.name)
    n = len(_SAMPLES)
    for i in range(trials):
        yield {s: _SAMPLES[(i + 5 * j) % n] for j, s in enumerate(syms)}


def _close(a, b, rel) -> bool:
    return abs(a - b) <= rel * max(mpmath.mpf(1), abs(a), abs(b))


@dataclass
class _Numeric:
    """Numeric evidence: agreeing points, a refutation, or a conflict to report."""

    agree: int = 0
    digits: float = 0.0
    refutation: Verdict | None = None
    conflict: str = ""
    tried: int = 0

    unevaluated: bool = False  # the derivative under test is an unevaluated Derivative

    def summary(self) -> str:
        if self.conflict:
            return self.conflict
        if self.unevaluated and not self.agree:
            return ("the derivative under test is an unevaluated Derivative (SymPy has no formula for it): "
                    "there is nothing to compare the difference quotients with")
        if self.agree:
            return (f"difference quotients agree with the derivative at {self.agree} sample point"
                    f"{'s' if self.agree > 1 else ''} (to {self.digits:.0f} digits)")
        return "no sample point where the function is real and smooth was found"


def _point_repr(env: dict) -> dict:
    return {s.name: v for s, v in sorted(env.items(), key=lambda kv: kv[0].name)}


def _point_text(env: dict) -> str:
    return ", ".join(f"{s.name} = {_fmt_coord(v)}" for s, v in sorted(env.items(), key=lambda kv: kv[0].name))


def _refutation(name, method, env, v, dv, extra="") -> Verdict:
    rel = abs(v - dv) / max(abs(v), abs(dv), mpmath.mpf(10) ** -30)
    detail = (f"at {_point_text(env)}: the limit of the difference quotient is {_fmt_num(v)}, "
              f"the derivative under test gives {_fmt_num(dv)} (relative error {mpmath.nstr(rel, 3)}){extra}")
    return Verdict(name, "refuted", method, detail, _point_repr(env), float(v) if isinstance(v, mpmath.mpf) else v,
                   float(dv) if isinstance(dv, mpmath.mpf) else dv)


def _region_points(symbols, keys: dict, n: int = 8) -> list:
    """Up to ``n`` sample points (``_sample_points`` scaled by up to 256, either sign) where
    every expression of ``keys`` has its sign (``{expr: +1 or -1}``): points in one case of a
    non-smooth function, such as ``x - 5 > 0``, which the fixed samples may all miss."""
    found = []

    def inside(env):
        menv = {s: _mp_eval(v, {}) for s, v in env.items()}
        try:
            return all(mpmath.sign(_mp_real(k, menv)) == sgn for k, sgn in keys.items())
        except (_Undefined, _NotReal):
            return False

    with mp.workdps(30):
        for base in _sample_points(symbols):
            for factor in (1, 4, -4, 16, -16, 64, -64, 256, -256, -1):
                env = {s: v * factor for s, v in base.items()}
                if inside(env):
                    found.append(env)
                    break
            if len(found) >= n:
                break
        if not found and len(symbols) == 1:  # one variable: a point between the keys' real roots
            (v,) = symbols
            if all(k.free_symbols <= {v} and k.is_polynomial(v) for k in keys):
                from .cases import _Undecided, _cut_points

                try:
                    found = [{v: p} for p in _cut_points(v, list(keys)) if inside({v: p})][:n]
                except (_Undecided, ValueError, TypeError, sp.PolynomialError):
                    found = []
        if not found:  # a region the scaled samples miss (y < x < 2y): seeded random rationals
            import random

            rng = random.Random(20261204)
            syms = sorted(symbols, key=lambda s: s.name)
            for trial in range(400):
                size = (1, 4, 32, 256)[trial // 100]
                env = {s: sp.Rational(rng.randint(-40 * size, 40 * size), 40) for s in syms}
                if inside(env):
                    found.append(env)
                    if len(found) >= n:
                        break
    return found


def _numeric_general(spec, f, x, d, exact, want: int = 3, envs=None) -> _Numeric:
    """Difference quotients at sample points (``envs``, else the fixed ones); refute when they
    clearly disagree with ``d``."""
    out = _Numeric()
    symbols = f.free_symbols | d.free_symbols | {x}
    digits = []
    envs = list(_sample_points(symbols)) if envs is None else envs
    for env in envs:
        if out.agree >= want or out.tried >= len(envs):
            break
        out.tried += 1
        others = {s: v for s, v in env.items() if s != x}
        try:
            right = _side_quotients(f, x, env[x], others, +1, _GENERAL_KS)
            left = _side_quotients(f, x, env[x], others, -1, _GENERAL_KS)
        except _Undefined:
            continue
        with mp.workdps(60):
            menv = {s: _mp_eval(v, {}) for s, v in others.items()}
            a = _mp_eval(env[x], {})
            if not (right.stable() and left.stable()) or not _close(right.value(), left.value(), 1e-9):
                continue
            v = right.value()
            try:
                dv = _mp_real(d, {**menv, x: a})
            except _NotReal:
                dv = _mp_eval(d, {**menv, x: a})
            except _Undefined:
                out.unevaluated = out.unevaluated or d.has(sp.Derivative)
                continue
            ev = None
            if exact is not d:
                try:
                    ev = _mp_real(exact, {**menv, x: a})
                except _Undefined:
                    ev = None
            noise = abs(right.qs[-1] - right.qs[-3]) + abs(left.qs[-1] - left.qs[-3])
            if abs(v - dv) > 1e-6 * max(mpmath.mpf(1), abs(v), abs(dv)) + 100 * noise:
                if ev is not None and not _close(ev, v, 1e-8):
                    out.conflict = (f"at {_point_text(env)} difference quotients give {_fmt_num(v)} but SymPy's "
                                    f"derivative gives {_fmt_num(ev)}")
                    continue
                out.refutation = _refutation(spec.name, "mpmath difference quotients", env, v, dv,
                                             "" if ev is None else "; SymPy's exact derivative agrees with the limit")
                return out
            out.agree += 1
            err = abs(v - dv) / max(mpmath.mpf(1), abs(v))
            digits.append(float(-mpmath.log10(err)) if err > 0 else 30.0)
    out.digits = min(digits) if digits else 0.0
    return out


def _numeric_difference(e, symbols, dps=40):
    """|e| at the first sample point where it is real: evidence that e is not zero."""
    with mp.workdps(dps):
        for env in _sample_points(symbols, trials=8):
            menv = {s: _mp_eval(v, {}) for s, v in env.items()}
            try:
                return env, _mp_eval(e, menv)
            except _Undefined:
                continue
    return None, None


# -- at a given point -------------------------------------------------------------------


def _numeric_point(f, x, a, free):
    """Both one-sided quotient ladders at the point (other symbols at sample values)."""
    for env in _sample_points(free, trials=8):
        try:
            right = _side_quotients(f, x, a, env, +1, _POINT_KS)
            left = _side_quotients(f, x, a, env, -1, _POINT_KS)
        except _Undefined:
            continue
        return {1: right, -1: left}, env
    return None, {}


def _sides_summary(sides) -> str:
    if sides is None:
        return "f could not be evaluated numerically near the point"
    parts = []
    for s, label in ((1, "right"), (-1, "left")):
        side = sides[s]
        if side.kind != "real":
            parts.append(f"{label}: f is {'not real' if side.kind == 'complex' else 'undefined'}")
        elif side.stable():
            parts.append(f"{label} quotients converge to {_fmt_num(side.value())}")
        elif side.oscillates():
            parts.append(f"{label} quotients oscillate")
        else:
            parts.append(f"{label} quotients at h = 1e-{_POINT_KS[-1]}: {_fmt_num(side.value())}")
    return "; ".join(parts)


def _numeric_point_refutation(name, point, env, sides, d, exact, x, a):
    if sides is None or not (sides[1].stable() and sides[-1].stable()):
        return None
    vr, vl = sides[1].value(), sides[-1].value()
    if not _close(vr, vl, 1e-9):
        return None
    with mp.workdps(60):
        menv = {s: _mp_eval(v, {}) for s, v in env.items()}
        menv[x] = _mp_eval(a, {})
        try:
            dv = _mp_eval(d, menv)
        except _Undefined:
            dv = None
        if dv is None:  # numerically undefined (0*DiracDelta(0)...): SymPy's exact value decides
            da = d.subs({x: a, **env})
            if _value_status(da) == "real":
                try:
                    dv = _mp_eval(da, {})
                except _Undefined:
                    return None
        try:
            ev = _mp_real(exact, menv) if exact is not d else None
        except _Undefined:
            ev = None
    if ev is not None and not _close(ev, vr, 1e-8):
        return None  # the numbers and SymPy's derivative disagree: no refutation on numbers
    full = {**point, **env}
    if dv is None and d.has(sp.Derivative):
        return None  # SymPy's derivative is itself unevaluated (floor, a user's function): not a wrong value
    if dv is None:
        return Verdict(name, "refuted", "mpmath difference quotients",
                       f"at {_point_text(full)}: the difference quotient tends to {_fmt_num(vr)} from both sides "
                       f"but the derivative under test is undefined there", _point_repr(full), float(vr), None)
    if abs(dv - vr) > 1e-6 * max(mpmath.mpf(1), abs(vr), abs(dv)):
        return _refutation(name, "mpmath difference quotients", full, vr, dv)
    return None


def _cross_check(limits, sides) -> str:
    """SymPy's one-sided limits against the quotients: an empty string when nothing contradicts."""
    if sides is None:
        return ""
    with mp.workdps(60):
        for s, (kind, L) in limits.items():
            side = sides[s]
            label = "right" if s > 0 else "left"
            if kind == "complex":
                if side.kind == "real" and len(side.qs) == len(_POINT_KS):
                    return f"SymPy calls the {label} side non-real but f is real there"
                continue
            if side.kind != "real":
                return f"SymPy gave a {label} limit {L} but f is not real-valued there numerically"
            if kind == "finite":
                if L.free_symbols:
                    continue  # symbolic in other variables: compared after substitution below
                try:
                    Lv = _mp_real(L, {})
                except _Undefined:
                    return f"the {label} limit {L} does not evaluate"
                if not side.supports_finite(Lv):
                    return f"SymPy's {label} limit {_short(L)} is not supported by difference quotients ({_fmt_num(side.value())})"
            elif kind == "inf" and not side.supports_infinite(L):
                return f"SymPy's {label} limit {'+' if L > 0 else '-'}oo is not supported by difference quotients"
            elif kind == "osc" and not side.oscillates():
                return f"SymPy's {label} limit {L} (oscillation) is not supported by difference quotients"
    return ""
