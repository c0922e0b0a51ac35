"""One check (``_Spec``) and what a worker runs for it: at general x (numbers, sign cases, a
symbolic limit in each case, an exact zero test) or at a given point (the exact value,
one-sided limits cross-checked with difference quotients). The package docstring gives the steps."""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .cases import _NONSMOOTH, _Inconsistent, _Undecided, _resolve, _smooth_cases, point_keys
from .limits import _T, _NoLimit, _limit_general, _one_sided_limit, _proven_zero, _side_taylor, _sign_near
from .mpeval import _value_status
from .numeric import (
    _SAMPLES,
    _cross_check,
    _numeric_difference,
    _numeric_general,
    _numeric_point,
    _numeric_point_refutation,
    _point_repr,
    _point_text,
    _region_points,
    _sample_points,
    _sides_summary,
)
from .report import Verdict, _fmt_coord, _fmt_num, _short


@dataclass
class _Spec:
    """One check, as sent to a worker."""

    name: str
    f: sp.Expr
    x: sp.Symbol
    point: dict | None  # {Symbol: exact SymPy number}, or None for general x
    claimed: sp.Expr | None  # derivative under test; None means sympy.diff(f, x)


def _check(spec: _Spec, emit) -> Verdict:
    f, x = spec.f, spec.x
    exact = sp.diff(f, x)
    d = exact if spec.claimed is None else spec.claimed
    if spec.point is None:
        return _check_general(spec, f, x, d, exact, emit)
    return _check_point(spec, f, x, d, exact, emit)


def _check_general(spec, f, x, d, exact, emit) -> Verdict:
    num = _numeric_general(spec, f, x, d, exact)
    if num.refutation is not None:
        return num.refutation
    emit("evidence", {"summary": num.summary()})
    name = spec.name

    def undecided(reason):
        # No proof: before saying so, look for a refutation at every sample point.
        wide = _numeric_general(spec, f, x, d, exact, want=len(_SAMPLES))
        if wide.refutation is not None:
            return wide.refutation
        return Verdict(name, "inconclusive", "symbolic limit", f"{reason}; {(wide if wide.agree else num).summary()}")

    try:
        keys, cases = _smooth_cases(f, d)
    except _Undecided as exc:
        return undecided(str(exc))
    methods = set()
    for fc, dc, region, signs in cases:
        try:
            L, m = _limit_general(fc, x)
        except _NoLimit as exc:
            return undecided(str(exc))
        methods |= m
        if not _proven_zero(L - dc, region):
            if not keys and m == {"exact cancellation"}:
                exact = _exact_refutation(name, x, L, dc)
                if exact is not None:
                    return exact
            where = "" if not keys else " in the case " + ", ".join(
                f"{_short(k, 30)} {'>' if s > 0 else '<'} 0" for k, s in signs.items())
            if signs:  # difference quotients at points of this case, which the fixed samples may miss
                inside = _region_points(f.free_symbols | d.free_symbols | {x}, signs)
                if inside:
                    found = _numeric_general(spec, f, x, d, exact, want=len(inside), envs=inside)
                    if found.refutation is not None:
                        return found.refutation
                    refuted = _case_refutation(name, L, dc, signs, inside, where)
                    if refuted is not None:
                        return refuted
            return undecided(f"the limit{where} is {_short(L)}, which could not be proven equal to {_short(dc)}")
    if num.conflict:
        return Verdict(name, "inconclusive", "symbolic limit", f"exact proof found but {num.conflict}")
    refuted = _at_isolated_points(spec, f, x, d, exact, emit)
    if refuted is not None:
        return refuted
    how = "symbolic limit (" + ", ".join(sorted(methods)) + ")"
    cases_text = f" in each of {len(cases)} sign cases" if keys else ""
    method = f"{how} at general {x.name}"
    detail = (f"lim_(h->0) (f({x.name}+h) - f({x.name}))/h equals {_short(d)} exactly{cases_text}; "
              f"{num.summary()}")
    if keys:  # the proof holds inside the cases, not on their borders: say where it does not
        borders = " or ".join(f"{_short(k, 30)} = 0" for k in keys)
        method += f", except where {borders}"
        detail += (f". Not proven where {borders}: there the cases meet, and the function may have no "
                   f"derivative (a kink)")
    return Verdict(name, "verified", method, detail)


def _at_isolated_points(spec, f, x, d, exact, emit):
    """A KroneckerDelta (or a condition Eq(a, b)) changes f or d at single points only, where the
    sign cases, all open, never look: the real roots in x of such a key (one symbol, a
    polynomial) are checked one by one, as ``at=`` would. The first refutation there, else None."""
    for key in point_keys(f, d):
        if key.free_symbols != {x} or not key.is_polynomial(x):
            continue
        try:
            roots = sp.Poly(key, x).real_roots()
        except Exception:  # noqa: BLE001 - no exact roots: those points stay unproven, as said
            continue
        for r in roots[:8]:
            verdict = _check_point(_Spec(spec.name, f, x, {x: r}, spec.claimed), f, x, d, exact, emit)
            if verdict.status == "refuted":
                return verdict
    return None


def _exact_refutation(name, x, L, d):
    """L is exact algebra (a cancelled rational quotient): an exactly nonzero ``L - d`` at a
    rational point refutes ``d`` however small the difference."""
    symbols = sorted((L - d).free_symbols | {x}, key=lambda s: s.name)
    for env in _sample_points(symbols, trials=8):
        lv, dv = L.subs(env), d.subs(env)
        if not (lv.is_Rational and dv.is_number) or _value_status(dv) != "real":
            continue
        diff = lv - dv
        if diff.is_zero is False and diff.is_real:
            rel = sp.Abs(diff) / sp.Max(sp.Abs(lv), sp.Abs(dv))
            return Verdict(name, "refuted", "symbolic limit (exact cancellation)",
                           f"at {_point_text(env)}: the limit of the difference quotient is exactly {_short(lv)}, "
                           f"the derivative under test gives {_short(dv)} (relative error {sp.N(rel, 3)})",
                           _point_repr(env), lv, dv)
    return None


# -- at a point ---------------------------------------------------------------------------


def _case_refutation(name, L, dc, signs, points, where):
    """The case's limit L and the derivative under test dc evaluated exactly at a point inside
    the case (every sign key's sign checked exactly there): a proven difference refutes, such
    as a derivative off by exactly 1/1000 where a > 3, below what difference quotients tell."""
    for env in points:
        try:
            if any(sp.sign(k.subs(env)) != s for k, s in signs.items()):
                continue
            Lv, dv = L.subs(env), dc.subs(env)
            if not (_value_status(Lv) == "real" and _value_status(dv) == "real"):
                continue
            if (Lv - dv).is_zero is False:
                return Verdict(name, "refuted", "exact limit in a case",
                               f"at {_point_text(env)}{where}: the limit of the difference quotient is exactly "
                               f"{_fmt_num(Lv)}, the derivative under test gives {_fmt_num(dv)}", _point_repr(env), Lv, dv)
        except (TypeError, ValueError, AttributeError, RecursionError):
            continue
    return None


def _check_point(spec, f, x, d, exact, emit) -> Verdict:
    name = spec.name
    a = spec.point[x]
    others = {s: v for s, v in spec.point.items() if s != x}
    if others:
        f, d, exact = f.subs(others), d.subs(others), exact.subs(others)
    where = f"{x.name} = {_fmt_coord(a)}"
    fa = f.subs(x, a)
    status = _value_status(fa)
    if status == "undefined":
        return Verdict(name, "not differentiable", "exact evaluation",
                       f"f is undefined at {where} (it evaluates to {_short(fa)})", _point_repr(spec.point))
    if status == "complex":
        return Verdict(name, "not differentiable", "exact evaluation",
                       f"f is not real at {where} (it evaluates to {_short(fa)})", _point_repr(spec.point))

    free = (f.free_symbols | d.free_symbols) - {x}
    sides, env = _numeric_point(f, x, a, free)
    num_ref = _numeric_point_refutation(name, spec.point, env, sides, d, exact, x, a)
    evidence = {"summary": _sides_summary(sides)}
    if num_ref is not None:
        evidence["refutation"] = num_ref
    emit("evidence", evidence)

    verdict = _point_symbolic(name, spec.point, f, x, a, fa, d, sides, env)
    if verdict.status == "inconclusive" and num_ref is not None:
        return num_ref
    if verdict.status == "verified" and num_ref is not None:
        return Verdict(name, "inconclusive", verdict.method,
                       f"exact limit found but numbers disagree: {num_ref.detail}", _point_repr(spec.point))
    return verdict


def _point_symbolic(name, point, f, x, a, fa, d, sides, env) -> Verdict:
    where = f"{x.name} = {_fmt_coord(a)}"
    pt = _point_repr(point)
    method = "one-sided limits"
    limits = {}
    for s in (1, -1):
        try:
            g = _resolve(f.subs(x, a + s * _T), lambda e: _sign_near(e))
            if g.has(*_NONSMOOTH):
                raise _Undecided(f"could not resolve the branches of f near {where}")
        except (_Undecided, _Inconsistent) as exc:
            return Verdict(name, "inconclusive", method, f"{exc}; {_sides_summary(sides)}", pt)
        if g.is_extended_real is False:
            limits[s] = ("complex", None)
            continue
        a1 = _side_taylor(g, fa)
        res = ("finite", a1 / s) if a1 is not None else _one_sided_limit((g - fa) / (s * _T))
        if res is None:
            return Verdict(name, "inconclusive", method,
                           f"SymPy gave no usable {'right' if s > 0 else 'left'} limit at {where}; {_sides_summary(sides)}", pt)
        limits[s] = res
    checked = _cross_check(limits, sides)
    if checked:
        return Verdict(name, "inconclusive", method, f"{checked} at {where}", pt)

    side_name = {1: "right", -1: "left"}
    for s in (1, -1):
        kind, L = limits[s]
        if kind == "complex":
            other = limits[-s]
            tail = f"; the {side_name[-s]} limit is {_short(other[1])}" if other[0] == "finite" else ""
            return Verdict(name, "not differentiable", method,
                           f"f is not real-valued {'right' if s > 0 else 'left'} of {where}, so it has no two-sided "
                           f"derivative there{tail}", pt)
    for s in (1, -1):
        kind, L = limits[s]
        if kind == "inf":
            return Verdict(name, "not differentiable", method,
                           f"the {side_name[s]} difference quotient tends to {'+' if L > 0 else '-'}oo at {where}", pt)
        if kind == "osc":
            return Verdict(name, "not differentiable", method,
                           f"the {side_name[s]} difference quotient oscillates in {L} as h -> 0 at {where}", pt)
    Lr, Ll = limits[1][1], limits[-1][1]
    if not _proven_zero(Lr - Ll):
        diff_env, diff = _numeric_difference(Lr - Ll, (Lr - Ll).free_symbols)
        if diff is not None and abs(diff) > 1e-20:
            return Verdict(name, "not differentiable", method,
                           f"the one-sided derivatives differ at {where}: left {_short(Ll)}, right {_short(Lr)}", pt)
        return Verdict(name, "inconclusive", method,
                       f"could not decide whether the one-sided limits {_short(Ll)} and {_short(Lr)} are equal", pt)
    da = d.subs(x, a)
    if _value_status(da) in ("undefined", "complex"):
        return Verdict(name, "refuted", method,
                       f"the derivative at {where} is {_short(Lr)} (both one-sided limits), but the derivative under "
                       f"test is {_short(da)} there", pt, Lr, da)
    if _proven_zero(Lr - da):
        return Verdict(name, "verified", method,
                       f"both one-sided limits at {where} equal {_fmt_num(Lr)}, the value of {_short(d, 50)}", pt)
    diff_env, diff = _numeric_difference(Lr - da, (Lr - da).free_symbols)
    if diff is not None and abs(diff) > 1e-20:
        full = {**point, **(diff_env or {})}
        return Verdict(name, "refuted", method,
                       f"at {_point_text(full)}: both one-sided limits equal {_short(Lr)}, the derivative under test "
                       f"gives {_short(da)}", _point_repr(full), Lr, da)
    return Verdict(name, "inconclusive", method,
                   f"the limit {_short(Lr)} could not be proven equal to {_short(da)}", pt)
