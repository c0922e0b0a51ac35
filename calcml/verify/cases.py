"""Sign cases: the non-smooth atoms (``Abs``, ``sign``, ``Heaviside``, ``relu``, ``Max``, ``Min``,
``Piecewise``) replaced by their branch for each combination of signs of their arguments."""

from __future__ import annotations

import itertools

import sympy as sp

from ..functions import ACTIVATIONS
from .report import _short


class _Undecided(Exception):
    """A symbolic step could not decide; the check becomes inconclusive with this reason."""


_KINKED = tuple(cls for cls in ACTIVATIONS if not cls.smooth)  # relu
_SIGNED = (sp.Abs, sp.sign, sp.Heaviside, *_KINKED)
_NONSMOOTH = (sp.Abs, sp.sign, sp.Heaviside, *_KINKED, sp.Max, sp.Min, sp.Piecewise, sp.DiracDelta, sp.KroneckerDelta)
_UNSUPPORTED = (sp.floor, sp.ceiling, sp.frac, sp.Mod)


def _up_to_sign(g):
    """(canonical, +-1) with ``g == flip * canonical``: ``x - 1`` and ``1 - x`` share one form."""
    if g.could_extract_minus_sign():
        return -g, -1
    return g, 1


def _canon(g):
    """A sign key: ``g`` up to a positive numeric factor: (canonical, +-1) with ``sign(g) == flip * sign(canonical)``.

    ``99*x/100`` and ``x`` are one key, so are ``1 - x`` and ``x - 1`` (with opposite flips).
    """
    if g.is_Add or g.is_Mul:
        content, prim = g.as_content_primitive()
        if content.is_positive and prim != g:
            g = prim
    if g.is_Mul:
        coeff, rest = g.as_coeff_Mul()
        if coeff.is_Rational and coeff != 0 and rest != 1:
            g = rest if coeff > 0 else -rest
    if g.could_extract_minus_sign():
        return -g, -1
    return g, 1


def _sign_keys(*exprs) -> list:
    """Arguments whose sign selects a branch, innermost first (no non-smooth atom inside)."""
    keys = []
    for e in exprs:
        for node in sp.preorder_traversal(e):
            if isinstance(node, _UNSUPPORTED):
                raise _Undecided(f"{type(node).__name__} is not handled by the symbolic check")
            if isinstance(node, _SIGNED):
                gs = [node.args[0]]
            elif isinstance(node, sp.KroneckerDelta):
                gs = [node.args[0] - node.args[1]]
            elif isinstance(node, (sp.Max, sp.Min)):
                gs = [a - b for a, b in itertools.combinations(node.args, 2)]
            elif isinstance(node, sp.core.relational.Relational) and node.rel_op in ("<", "<=", ">", ">=", "==", "!="):
                gs = [node.lhs - node.rhs]
            else:
                continue
            for g in gs:
                c, _ = _canon(g)
                if c.is_number or c.has(*_NONSMOOTH) or c in keys:
                    continue  # a nested argument becomes a key once its inner atoms are resolved
                keys.append(c)
    return keys


def point_keys(*exprs) -> list:
    """The sign keys at whose zeros alone something changes (``KroneckerDelta(a, b)``: a - b;
    a condition ``Eq(a, b)`` or ``Ne(a, b)``): the sign cases, all open, never see those points."""
    keys = []
    for e in exprs:
        for node in sp.preorder_traversal(e):
            if isinstance(node, sp.KroneckerDelta):
                g = node.args[0] - node.args[1]
            elif isinstance(node, sp.core.relational.Relational) and node.rel_op in ("==", "!="):
                g = node.lhs - node.rhs
            else:
                continue
            c, _ = _canon(g)
            if not c.is_number and c not in keys:
                keys.append(c)
    return keys


class _Inconsistent(Exception):
    """A sign combination that no point realises (Max with no largest argument)."""


def _sign_of(g, signs: dict):
    """+-1 or 0 from the case's signs (or from g itself when constant); None if not decided."""
    c, flip = _canon(g)
    if c in signs:
        return signs[c] * flip
    if c.is_positive:
        return flip
    if c.is_negative:
        return -flip
    if c.is_zero:
        return 0
    return None


def _truth(cond, sign_of):
    """True, False, or None where a sign is not decided yet."""
    if cond is sp.true or cond is True:
        return True
    if cond is sp.false or cond is False:
        return False
    if isinstance(cond, (sp.And, sp.Or)):
        vals = [_truth(c, sign_of) for c in cond.args]
        if isinstance(cond, sp.And):
            return False if False in vals else (None if None in vals else True)
        return True if True in vals else (None if None in vals else False)
    if isinstance(cond, sp.Not):
        v = _truth(cond.args[0], sign_of)
        return None if v is None else not v
    if isinstance(cond, sp.core.relational.Relational):
        s = sign_of(cond.lhs - cond.rhs)
        if s is None:
            return None
        return {"<": s < 0, "<=": s <= 0, ">": s > 0, ">=": s >= 0, "==": s == 0, "!=": s != 0}[cond.rel_op]
    raise _Undecided(f"cannot decide the condition {cond}")


def _resolve_cond(cond, sign_of):
    if isinstance(cond, sp.core.relational.Relational):
        return cond.func(_resolve(cond.lhs, sign_of), _resolve(cond.rhs, sign_of))
    if isinstance(cond, (sp.And, sp.Or, sp.Not)):
        return cond.func(*[_resolve_cond(c, sign_of) for c in cond.args])
    return cond


def _resolve(e, sign_of):
    """Replace each non-smooth atom whose sign ``sign_of`` decides by its branch, bottom up.

    Atoms whose sign is not decided (``None``) are kept, with their arguments resolved.
    """
    if e.is_Atom or not e.has(*_NONSMOOTH):
        return e
    if isinstance(e, sp.Piecewise):
        for i, (expr_i, cond) in enumerate(e.args):
            t = _truth(cond, sign_of)
            if t is True:
                return _resolve(expr_i, sign_of)
            if t is None:
                rest = [(_resolve(ex, sign_of), _resolve_cond(c, sign_of)) for ex, c in e.args[i:]]
                return sp.Piecewise(*rest)
        raise _Undecided(f"no branch of {e} applies")
    args = [_resolve(a, sign_of) for a in e.args]
    if isinstance(e, sp.KroneckerDelta):  # 1 where its arguments are equal, else 0
        s = sign_of(args[0] - args[1])
        return e.func(*args) if s is None else sp.S.One if s == 0 else sp.S.Zero
    if isinstance(e, _SIGNED) or isinstance(e, sp.DiracDelta):
        s = sign_of(e.args[0])
        if s is None:
            return e.func(*args)
        if isinstance(e, sp.Abs):
            return s * args[0]
        if isinstance(e, sp.sign):
            return sp.Integer(s)
        if isinstance(e, sp.Heaviside):
            if s == 0:
                return args[1] if len(args) > 1 else sp.S.Half
            return sp.S.One if s > 0 else sp.S.Zero
        if isinstance(e, _KINKED):  # a kinked activation: its elementary form's branch (relu: Max(0, z))
            return _resolve(type(e)._elementary(args[0]), sign_of)
        if s == 0:  # DiracDelta at its singular point
            raise _Undecided(f"{e} at its singular point")
        return sp.S.Zero
    if isinstance(e, (sp.Max, sp.Min)):
        want = 1 if isinstance(e, sp.Max) else -1
        n = len(e.args)
        signs = [[None if i == j else sign_of(e.args[i] - e.args[j]) for j in range(n)] for i in range(n)]
        if any(s is None for i in range(n) for j, s in enumerate(signs[i]) if i != j):
            return e.func(*args)
        for i in range(n):
            if all(signs[i][j] * want >= 0 for j in range(n) if j != i):
                return args[i]
        raise _Inconsistent()
    return e.func(*args)


_MAX_CASES = 32


def _smooth_cases(f, d):
    """(f_c, d_c, region, signs) for every sign case of the non-smooth atoms of f and d.

    Cases are split one key at a time, innermost arguments first, so that a condition such
    as ``Abs(x) <= 1`` becomes a key once ``Abs(x)`` is resolved.
    """
    cases, seen = [], set()

    def split(fc, dc, signs):
        keys = [k for k in _sign_keys(fc, dc) if k not in signs]  # (a condition kept whole, such as
        # an And whose other part is undecided, still names the keys already split on)
        if not keys:
            if fc.has(*_NONSMOOTH) or dc.has(*_NONSMOOTH):
                raise _Undecided(f"could not resolve the non-smooth parts of {_short(fc, 50)}")
            region = {k: s * sp.Dummy(k.name, positive=True) for k, s in signs.items() if k.is_Symbol}
            if (fc, dc) not in seen:
                seen.add((fc, dc))
                cases.append((fc, dc, region, signs))
            return
        key = keys[0]
        for s in (1, -1):
            if len(cases) > _MAX_CASES:
                raise _Undecided(f"more than {_MAX_CASES} sign cases")
            new = {**signs, key: s}
            if not _realizable(new):
                continue
            try:
                fn = _resolve(fc, lambda g: _sign_of(g, new))
                dn = _resolve(dc, lambda g: _sign_of(g, new))
            except _Inconsistent:
                continue
            split(fn, dn, new)

    split(f, d, {})
    return [k for k in _all_keys(cases)], cases


def _product_signs_agree(signs: dict) -> bool:
    """False when a key that is a product has a sign its factors' signs contradict: with
    ``x < 0`` and ``y > 0``, ``x*y > 0`` is no case. A factor's sign is known when it is a
    number, an even power, or a key itself (up to a positive factor and a flip)."""
    for k, s in signs.items():
        if not k.is_Mul:
            continue
        product = 1
        for factor in k.args:
            if factor.is_number:
                fs = 1 if factor.is_positive else -1 if factor.is_negative else 0
            elif factor.is_Pow and factor.exp.is_Integer and factor.exp.is_even:
                fs = 1
            else:
                base, flip = _canon(factor)
                fs = signs[base] * flip if base in signs else 0
            if fs == 0:
                break
            product *= fs
        else:
            if product != s:
                return False
    return True


def _realizable(signs: dict) -> bool:
    """False only when no real x gives these signs: a product key whose factors' signs
    contradict it, or keys that are polynomials in one symbol x (decided exactly: between
    consecutive real roots every sign is constant)."""
    if not _product_signs_agree(signs):
        return False
    by_symbol: dict = {}
    for k, s in signs.items():
        syms = k.free_symbols
        if len(syms) == 1:
            (v,) = syms
            if k.is_polynomial(v):
                by_symbol.setdefault(v, []).append((k, s))
    for v, items in by_symbol.items():
        if len(items) < 2:
            continue
        try:
            if not _realizable_1d(v, items):
                return False
        except Exception:
            continue  # undecided: keep the case
    return True


def _realizable_1d(v, items) -> bool:
    for p in _cut_points(v, [k for k, _ in items]):
        if all(sp.sign(k.subs(v, p)) == s for k, s in items):
            return True
    return False


def _cut_points(v, keys) -> list:
    """One exact, short rational in each interval of the real line that the real roots of the
    polynomials ``keys`` (in ``v`` alone) cut it into: every combination of their signs off
    the roots is taken at one of these points."""
    roots = set()
    for k in keys:
        roots.update(sp.Poly(k, v).real_roots())
    ordered = sorted(roots, key=lambda r: sp.N(r, 50))
    for a, b in zip(ordered, ordered[1:]):
        if not bool(a < b):  # numeric order confirmed exactly, else give up
            raise _Undecided("root order")
    if not ordered:
        return [sp.Integer(0)]
    points = [sp.floor(ordered[0]) - 1, sp.ceiling(ordered[-1]) + 1]
    for a, b in zip(ordered, ordered[1:]):
        points.append(_simple_between(a, b))
    return points


def _simple_between(a, b):
    """A rational strictly between the real numbers a < b, of small denominator (what a
    message shows): the first of the midpoint's continued-fraction approximations inside."""
    from fractions import Fraction

    mid = Fraction(str(sp.N((a + b) / 2, 60)))
    limit = 1
    while True:
        q = mid.limit_denominator(limit)
        p = sp.Rational(q.numerator, q.denominator)
        if bool(a < p) and bool(p < b):
            return p
        if limit > 10**60:
            raise _Undecided("test point")
        limit *= 10


def _all_keys(cases):
    keys = []
    for *_, signs in cases:
        for k in signs:
            if k not in keys:
                keys.append(k)
    return keys
