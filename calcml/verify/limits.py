"""Symbolic limits of the difference quotient: at general x (term by term, through a linear
inner argument, by Taylor coefficient or SymPy's limit), one-sided at a given point, and the
exact zero tests that compare a limit with the derivative under test."""

from __future__ import annotations

import sympy as sp
from sympy.calculus.accumulationbounds import AccumBounds

from ..functions import ACTIVATIONS
from .cases import _NONSMOOTH, _Undecided, _resolve, _up_to_sign
from .report import _short


_H = sp.Dummy("h", real=True)
_T = sp.Dummy("t", positive=True)
_U = sp.Dummy("u", real=True)
_K = sp.Dummy("k", real=True)


_SMOOTH_ACTIVATIONS = tuple(cls for cls in ACTIVATIONS if cls.smooth)  # sigmoid, softplus
_GIVE_UP = (sp.Limit, sp.Order, AccumBounds, sp.Derivative, sp.Integral, sp.Subs)


def _elementary(e):
    """The smooth activations (sigmoid, softplus) in elementary form (SymPy's limit and
    simplify know exp and log)."""
    if not e.has(*_SMOOTH_ACTIVATIONS):
        return e
    return e.replace(lambda n: isinstance(n, _SMOOTH_ACTIVATIONS), lambda n: type(n)._elementary(n.args[0]))


def _prepare(e, var):
    """Forms SymPy's limit handles soundly: activations to exp/log, ``b**e`` with ``var`` in
    the exponent to ``exp(e*log(b))`` (SymPy's definition of the principal power)."""
    e = _elementary(e)
    return e.replace(lambda n: n.is_Pow and n.exp.has(var), lambda n: sp.exp(n.exp * sp.log(n.base)))


def _clean(L, source) -> bool:
    """Is a limit SymPy returned usable as a finite answer?"""
    if not isinstance(L, sp.Expr) or L.has(sp.oo, -sp.oo, sp.zoo, sp.nan, _H, _T, _K) or L.has(*_GIVE_UP):
        return False
    for cls in (sp.sign, sp.Abs, sp.Piecewise, sp.Heaviside, sp.re, sp.im, sp.arg):
        if len(L.atoms(cls)) > len(source.atoms(cls)):
            return False  # a new sign(...) or Abs(...) is how SymPy disguises an undecided case
    return L.is_finite is not False


# -- limits at general x -----------------------------------------------------------------


_LEMMAS: dict = {}


class _NoLimit(Exception):
    pass


def _linear_inner(g, x):
    """The inner argument through which ``g`` depends on ``x``, if it is one linear form.

    Returns (u, a) with u = a*x + c (a, c free of x) and g depending on x only via u (up to
    sign), or (x, 1).
    """
    found = []

    def visit(n):
        if not n.has(x):
            return
        if n == x:
            found.append(n)
            return
        if n.is_Add or n.is_Mul:
            a = n.coeff(x) if n.is_Add else n.as_independent(x, as_Add=False)[0]
            rest = sp.expand(n - a * x) if n.is_Mul else n - a * x
            if a != 0 and not a.has(x) and not rest.has(x):
                found.append(n)
                return
        for arg in n.args:
            visit(arg)

    visit(g)
    canon = {_up_to_sign(u)[0] for u in found}
    if len(canon) != 1:
        return x, sp.S.One
    u = canon.pop()
    a = u.coeff(x) if u.is_Add else u.as_independent(x, as_Add=False)[0] if u.is_Mul else sp.S.One
    return u, a


def _lemma(G, depth=0):
    """lim_{k->0} (G(u + k) - G(u)) / k for an expression G in the dummy ``_U``; cached."""
    hit = _LEMMAS.get(G)
    if hit is not None:
        return hit
    result = None
    normal = _normalize_logs(_elementary(G))
    if normal != G and normal.is_Add and depth < 2:
        L, methods = _limit_general(normal, _U, depth + 1)
        result = (L, " and ".join(sorted(methods)))
    if result is None and G.is_rational_function(_U):
        q = sp.cancel(sp.together((G.xreplace({_U: _U + _K}) - G) / _K))
        num, den = sp.fraction(q)
        den0 = den.subs(_K, 0)
        if den0 != 0 and not den0.is_zero:
            result = (sp.cancel(num.subs(_K, 0) / den0), "exact cancellation")
    if result is None:
        # The Taylor coefficient is the cheaper route for SymPy at a generic point; its
        # limit (Gruntz) is the second opinion when the expansion is not a clean series.
        Gp = _prepare(G, _U)
        result = _taylor_coefficient(Gp)
        if result is None:
            q = (Gp.xreplace({_U: _U + _K}) - Gp) / _K
            try:
                L = sp.limit(q, _K, 0, "+")
                if _clean(L, Gp):
                    result = (L, "symbolic limit")
            except (NotImplementedError, ValueError, TypeError, AttributeError, sp.PoleError, RecursionError):
                pass
    if result is None:
        raise _NoLimit(f"SymPy found no usable limit for the quotient of {_short(G.xreplace({_U: sp.Symbol('u')}))}")
    _LEMMAS[G] = result
    return result


def _linear_taylor(g, var, value, ref=None):
    """a1 when ``g`` (a function of ``var``) expands as a0 + a1*var + O(var**2) with clean
    coefficients and a0 proven equal to ``value``; None otherwise. The one Taylor routine of
    the two limits below (at a general point, and one-sided at a given point)."""
    try:
        ser = g.series(var, 0, 2)
    except Exception:
        return None
    order = ser.getO()
    if order is None or order.expr != var**2:
        return None
    try:
        poly = sp.Poly(ser.removeO(), var)
    except sp.PolynomialError:
        return None
    if poly.degree() > 1 or any(c.has(var) for c in poly.coeffs()):
        return None
    a0, a1 = poly.coeff_monomial(1), poly.coeff_monomial(var)
    if not _clean(a1, g if ref is None else ref) or not _proven_zero(a0 - value):
        return None
    return a1


def _taylor_coefficient(Gp):
    """The h-coefficient of the Taylor expansion of G(u + h): the limit at a regular point."""
    a1 = _linear_taylor(Gp.xreplace({_U: _U + _K}), _K, Gp, ref=Gp)
    return None if a1 is None else (a1, "Taylor expansion")


def _normalize_logs(e):
    """Exact rewrites that split logarithms into simpler terms: ``log(a/b)`` becomes
    ``log(a) - log(b)`` where SymPy knows both positive (``expand_log`` without force), after
    bringing each argument over a common denominator. ``log(sigmoid(z))`` becomes
    ``z - log(exp(z) + 1)``, which shares its limit with ``softplus``."""
    if not e.has(sp.log):
        return e
    e = e.replace(lambda n: isinstance(n, sp.log), lambda n: sp.log(sp.together(n.args[0])))
    return sp.expand_log(e)


def _limit_general(f, x, depth=0):
    """lim_{h->0} (f(x+h) - f(x))/h for a smooth expression at general x, with the methods used."""
    if not f.has(x):
        return sp.S.Zero, {"exact cancellation"}
    total, methods = [], set()
    for term in sp.Add.make_args(f):
        c, g = term.as_independent(x, as_Add=False)
        if not g.has(x):
            continue
        u, a = _linear_inner(g, x)
        G = g.xreplace({u: _U, -u: -_U}) if u != x else g.xreplace({x: _U})
        if G.has(x):
            u, a, G = x, sp.S.One, g.xreplace({x: _U})
        L, m = _lemma(G, depth)
        methods.update(m.split(" and "))
        total.append(c * a * L.xreplace({_U: u}))
    return sp.Add(*total), methods


# -- zero tests ------------------------------------------------------------------------


def _abstract_arguments(e):
    """Replace each compound function argument (up to sign) by a fresh symbol.

    An identity that holds for an independent symbol holds for any value put in its place,
    so a zero proven here is a zero of ``e``. It makes ``exp(z)`` and ``exp(-z)`` with a long
    linear form ``z`` cheap to cancel.
    """
    table = {}
    for node in sp.preorder_traversal(e):
        if isinstance(node, sp.Function):
            for arg in node.args:
                if arg.is_Add and arg.free_symbols:
                    c, _ = _up_to_sign(arg)
                    if c not in table:
                        table[c] = sp.Dummy("z", real=True) if c.is_extended_real else sp.Dummy("z")
    if not table:
        return e
    mapping = {}
    for c, z in table.items():
        mapping[c] = z
        mapping[-c] = -z
    return e.xreplace(mapping)


def _exp_symbols(e):
    """exp(c) and exp(-c) as z and 1/z with one symbol per canonical argument (sound, see above)."""
    exps = e.atoms(sp.exp)
    if not exps:
        return e
    table, mapping = {}, {}
    for node in exps:
        c, flip = _up_to_sign(sp.expand(node.args[0]))
        if c not in table:  # exp of a real number is positive; otherwise no assumption
            table[c] = sp.Dummy("E", positive=True) if c.is_extended_real else sp.Dummy("E")
        z = table[c]
        mapping[node] = z if flip > 0 else 1 / z
    return e.xreplace(mapping)


_ZERO_STEPS = (
    sp.expand,
    lambda e: sp.cancel(sp.together(e)),
    lambda e: sp.cancel(sp.together(_exp_symbols(e))),
    sp.simplify,
    lambda e: sp.simplify(sp.expand_trig(e)),
    lambda e: sp.simplify(_exp_symbols(sp.powsimp(sp.expand(e, power_exp=True)))),
)


def _powers_as_exp(e):
    """``b**e`` with a non-numeric exponent as ``exp(e*log(b))``: SymPy's own definition."""
    return e.replace(lambda n: n.is_Pow and not n.exp.is_Number and n.base is not sp.E,
                     lambda n: sp.exp(n.exp * sp.log(n.base)))


def _proven_zero(e, region=None) -> bool:
    """True only if ``e`` is shown to be exactly zero (within ``region``)."""
    e = sp.sympify(e)
    if region:
        e = e.xreplace(region)
    if e == 0 or e.is_zero:
        return True
    e = _elementary(e)
    if any(not p.exp.is_Number for p in e.atoms(sp.Pow)):
        e = _powers_as_exp(e)
    forms = [e]
    abstracted = _abstract_arguments(e)
    if abstracted is not e:
        forms.insert(0, abstracted)
    for form in forms:
        for step in _ZERO_STEPS:
            try:
                r = step(form)
            except Exception:
                continue
            if r == 0 or r.is_zero:
                return True
    if e.is_number and e.is_algebraic:
        try:
            return sp.minimal_polynomial(e, _U).is_Symbol
        except Exception:
            return False
    return False


# -- one-sided limits at a given point --------------------------------------------------


def _sign_near(g, t=_T) -> int:
    """The sign of g(t) for all small t > 0."""
    if g.has(*_NONSMOOTH):
        g = _resolve(g, _sign_near)
        if g.has(*_NONSMOOTH):
            raise _Undecided(f"the sign of {g.subs(t, sp.Symbol('t'))} near the point is not decided")
    if not g.has(t):
        if g.is_positive:
            return 1
        if g.is_negative:
            return -1
        if g.is_zero:
            return 0
        raise _Undecided(f"the sign of {g} is not decided")
    if g.is_positive:
        return 1
    if g.is_negative:
        return -1
    g0 = g.subs(t, 0)
    if g0.is_number and not g0.has(sp.nan, sp.zoo):
        if g0.is_positive:
            return 1
        if g0.is_negative:
            return -1
    if g0.is_zero or g0 == 0:
        try:
            c, _ = g.leadterm(t)
        except Exception:
            raise _Undecided(f"the sign of {g} near the point is not decided") from None
        if c.is_positive:
            return 1
        if c.is_negative:
            return -1
    raise _Undecided(f"the sign of {g.subs(t, sp.Symbol('t'))} near the point is not decided")


def _side_taylor(g, fa):
    """The t-coefficient of g(t) = f(a + s t) when g has a Taylor expansion a0 + a1 t + O(t**2)
    with a0 = f(a) proven: then the one-sided quotient tends to a1 / s. None otherwise."""
    return _linear_taylor(_prepare(g, _T), _T, fa)


def _one_sided_limit(q):
    """lim_{t->0+} q(t): ('finite', L), ('inf', +-1), ('osc', L), ('complex', L) or None."""
    try:
        if q.is_rational_function(_T):
            L = sp.limit(sp.cancel(sp.together(q)), _T, 0, "+")
        else:
            L = sp.limit(_prepare(q, _T), _T, 0, "+")
    except (NotImplementedError, ValueError, TypeError, AttributeError, sp.PoleError, RecursionError):
        return None
    if L is sp.oo:
        return "inf", 1
    if L is sp.S.NegativeInfinity:
        return "inf", -1
    if isinstance(L, AccumBounds):
        return "osc", L
    if L in (sp.I * sp.oo, -sp.I * sp.oo) or L is sp.zoo:
        return "complex", L
    if _clean(L, q):
        if L.is_extended_real is False:
            return "complex", L
        return "finite", L
    return None
