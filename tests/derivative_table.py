"""A table of derivatives for the verification tests, assembled from public tables.

Sources (the derivative column is copied from these, in their notation, never from SymPy):

* [W]   Wikipedia, "Differentiation rules" and "Table of derivatives" sections of the
        articles on elementary functions (en.wikipedia.org/wiki/Differentiation_rules,
        .../Inverse_trigonometric_functions, .../Inverse_hyperbolic_functions).
* [DLMF] NIST Digital Library of Mathematical Functions, 4.14 (exp/log), 4.20 (trig),
        4.25 (inverse trig), 4.34 (hyperbolic), 4.37 (inverse hyperbolic: d/dz arccosh z =
        1/((z - 1)^(1/2) (z + 1)^(1/2))).
* [S]   Stewart, "Calculus", reference pages 5-6 (table of differentiation formulas).
* [ML]  The activation functions' derivatives as stated in their papers: logistic sigmoid,
        softplus (Dugas et al. 2001), ReLU, ELU (Clevert et al. 2016), SiLU/swish,
        Mish (Misra 2019), Huber loss (Huber 1964), hinge loss.

Rows
----
``CORRECT``            (label, f, f') at general x; the expected verdict is "verified",
                       except the rows in ``INCONCLUSIVE`` (each with the reason).
``CORRECT_AT``         (label, f, f', point) where f' is right at that point.
``WRONG``              (label, f, wrong f', kind of mistake): expected "refuted".
``WRONG_AT``           (label, f, wrong f', point): expected "refuted".
``NOT_DIFFERENTIABLE`` (label, f, point, why): expected "not differentiable".
"""

from __future__ import annotations

import sympy as sp
from sympy import (
    Abs, Heaviside, Max, Min, Piecewise, Rational, acos, acosh, acot, acoth, acsc, acsch, asec, asech,
    asin, asinh, atan, atanh, cos, cosh, cot, coth, csc, csch, erf, exp, log, pi, real_root, sec, sech,
    sign, sin, sinh, sqrt, tan, tanh,
)

import calcml as cm

x = sp.Symbol("x", real=True)
y = sp.Symbol("y", real=True)
w = sp.Symbol("w", real=True)
n = sp.Symbol("n", real=True)
mu = sp.Symbol("mu", real=True)
s = sp.Symbol("s", positive=True)
sig, sp_, relu = cm.sigmoid, cm.softplus, cm.relu
half = Rational(1, 2)

# ----------------------------------------------------------------------------------------
# Correct pairs at general x
# ----------------------------------------------------------------------------------------
CORRECT = [
    # powers [S], [W]: power rule
    ("const", sp.Integer(5), sp.Integer(0)),
    ("linear", 3 * x + 2, sp.Integer(3)),
    ("x^2", x**2, 2 * x),
    ("x^3", x**3, 3 * x**2),
    ("x^7", x**7, 7 * x**6),
    ("x^-1", 1 / x, -1 / x**2),
    ("x^-3", x**-3, -3 * x**-4),
    ("1/x^2", 1 / x**2, -2 / x**3),
    ("x^(5/2)", x ** Rational(5, 2), Rational(5, 2) * x ** Rational(3, 2)),
    ("x^(2/3)", x ** Rational(2, 3), Rational(2, 3) * x ** Rational(-1, 3)),
    ("x^pi", x**pi, pi * x ** (pi - 1)),
    ("x^n", x**n, n * x ** (n - 1)),
    ("poly", 4 * x**5 - 3 * x**2 + x - 7, 20 * x**4 - 6 * x + 1),
    # roots
    ("sqrt", sqrt(x), 1 / (2 * sqrt(x))),
    ("1/sqrt", 1 / sqrt(x), -1 / (2 * x ** Rational(3, 2))),
    ("cbrt principal", x ** Rational(1, 3), 1 / (3 * x ** Rational(2, 3))),
    ("real cube root", real_root(x, 3), 1 / (3 * Abs(x) ** Rational(2, 3))),
    ("4th root", x ** Rational(1, 4), 1 / (4 * x ** Rational(3, 4))),
    ("sqrt(1+x^2)", sqrt(1 + x**2), x / sqrt(1 + x**2)),
    ("sqrt(1-x^2)", sqrt(1 - x**2), -x / sqrt(1 - x**2)),
    ("sqrt(x^2+4x+5)", sqrt(x**2 + 4 * x + 5), (x + 2) / sqrt(x**2 + 4 * x + 5)),
    # exponentials and logarithms, any base [S], [DLMF 4.14]
    ("exp", exp(x), exp(x)),
    ("exp(2x)", exp(2 * x), 2 * exp(2 * x)),
    ("exp(-x^2)", exp(-(x**2)), -2 * x * exp(-(x**2))),
    ("2^x", 2**x, 2**x * log(2)),
    ("10^x", 10**x, 10**x * log(10)),
    ("(1/2)^x", half**x, -(half**x) * log(2)),
    ("(7/3)^x", Rational(7, 3) ** x, Rational(7, 3) ** x * log(Rational(7, 3))),
    ("log", log(x), 1 / x),
    ("log2", log(x, 2), 1 / (x * log(2))),
    ("log10", log(x, 10), 1 / (x * log(10))),
    ("log3", log(x, 3), 1 / (x * log(3))),
    ("log|x|", log(Abs(x)), 1 / x),
    ("log(x^2+1)", log(x**2 + 1), 2 * x / (x**2 + 1)),
    ("log log", log(log(x)), 1 / (x * log(x))),
    ("log sqrt", log(sqrt(x)), 1 / (2 * x)),
    ("exp exp", exp(exp(x)), exp(x + exp(x))),
    ("x exp", x * exp(x), (x + 1) * exp(x)),
    ("x log x - x", x * log(x) - x, log(x)),
    ("x^2 log x", x**2 * log(x), 2 * x * log(x) + x),
    ("exp/x", exp(x) / x, exp(x) * (x - 1) / x**2),
    ("x^2 exp(-x)", x**2 * exp(-x), (2 * x - x**2) * exp(-x)),
    # trigonometric [S], [DLMF 4.20]
    ("sin", sin(x), cos(x)),
    ("cos", cos(x), -sin(x)),
    ("tan", tan(x), sec(x) ** 2),
    ("tan (1+tan^2)", tan(x), 1 + tan(x) ** 2),
    ("cot", cot(x), -csc(x) ** 2),
    ("sec", sec(x), sec(x) * tan(x)),
    ("csc", csc(x), -csc(x) * cot(x)),
    ("sin 2x", sin(2 * x), 2 * cos(2 * x)),
    ("cos x^2", cos(x**2), -2 * x * sin(x**2)),
    ("sin^2", sin(x) ** 2, 2 * sin(x) * cos(x)),
    ("tan(3x+1)", tan(3 * x + 1), 3 * sec(3 * x + 1) ** 2),
    ("sin cos", sin(x) * cos(x), cos(2 * x)),
    ("sin(1/x)", sin(1 / x), -cos(1 / x) / x**2),
    ("x sin x", x * sin(x), sin(x) + x * cos(x)),
    ("sin(x)/x", sin(x) / x, (x * cos(x) - sin(x)) / x**2),
    ("cos^3", cos(x) ** 3, -3 * cos(x) ** 2 * sin(x)),
    ("sin^2+cos^2", sin(x) ** 2 + cos(x) ** 2, sp.Integer(0)),
    ("tan - x", tan(x) - x, tan(x) ** 2),
    # inverse trigonometric [W], [DLMF 4.25]
    ("asin", asin(x), 1 / sqrt(1 - x**2)),
    ("acos", acos(x), -1 / sqrt(1 - x**2)),
    ("atan", atan(x), 1 / (1 + x**2)),
    ("acot", acot(x), -1 / (1 + x**2)),
    ("asec", asec(x), 1 / (Abs(x) * sqrt(x**2 - 1))),
    ("acsc", acsc(x), -1 / (Abs(x) * sqrt(x**2 - 1))),
    ("asin 2x", asin(2 * x), 2 / sqrt(1 - 4 * x**2)),
    ("atan(1/x)", atan(1 / x), -1 / (1 + x**2)),
    ("x atan x", x * atan(x), atan(x) + x / (1 + x**2)),
    ("asin^2", asin(x) ** 2, 2 * asin(x) / sqrt(1 - x**2)),
    ("atan exp", atan(exp(x)), exp(x) / (1 + exp(2 * x))),
    # hyperbolic [W], [DLMF 4.34]
    ("sinh", sinh(x), cosh(x)),
    ("cosh", cosh(x), sinh(x)),
    ("tanh", tanh(x), 1 - tanh(x) ** 2),
    ("tanh sech^2", tanh(x), sech(x) ** 2),
    ("coth", coth(x), -csch(x) ** 2),
    ("sech", sech(x), -sech(x) * tanh(x)),
    ("csch", csch(x), -csch(x) * coth(x)),
    ("tanh 2x", tanh(2 * x), 2 * sech(2 * x) ** 2),
    ("cosh^2", cosh(x) ** 2, sinh(2 * x)),
    ("cosh - sinh", cosh(x) - sinh(x), -exp(-x)),
    # inverse hyperbolic [W], [DLMF 4.37]
    ("asinh", asinh(x), 1 / sqrt(x**2 + 1)),
    ("acosh (DLMF)", acosh(x), 1 / (sqrt(x - 1) * sqrt(x + 1))),
    ("acosh (Wikipedia)", acosh(x), 1 / sqrt(x**2 - 1)),
    ("atanh", atanh(x), 1 / (1 - x**2)),
    ("acoth", acoth(x), 1 / (1 - x**2)),
    ("asech", asech(x), -1 / (x * sqrt(1 - x**2))),
    ("acsch", acsch(x), -1 / (Abs(x) * sqrt(1 + x**2))),
    # compositions, products, quotients [S]: chain, product and quotient rules
    ("(x^2+1)^10", (x**2 + 1) ** 10, 20 * x * (x**2 + 1) ** 9),
    ("(3x-2)^5", (3 * x - 2) ** 5, 15 * (3 * x - 2) ** 4),
    ("1/(1+x^2)", 1 / (1 + x**2), -2 * x / (1 + x**2) ** 2),
    ("(x+1)/(x-1)", (x + 1) / (x - 1), -2 / (x - 1) ** 2),
    ("(x^2-1)/(x^2+1)", (x**2 - 1) / (x**2 + 1), 4 * x / (x**2 + 1) ** 2),
    ("exp sin", exp(sin(x)), cos(x) * exp(sin(x))),
    ("sin exp", sin(exp(x)), exp(x) * cos(exp(x))),
    ("log cos", log(cos(x)), -tan(x)),
    ("log sin", log(sin(x)), cot(x)),
    ("log(sec+tan)", log(sec(x) + tan(x)), sec(x)),
    ("sqrt sin", sqrt(sin(x)), cos(x) / (2 * sqrt(sin(x)))),
    ("exp sin product", exp(x) * sin(x), exp(x) * (sin(x) + cos(x))),
    ("erf", erf(x), 2 / sqrt(pi) * exp(-(x**2))),
    ("gaussian", exp(-((x - mu) ** 2) / (2 * s**2)) / (s * sqrt(2 * pi)),
     -(x - mu) / s**2 * exp(-((x - mu) ** 2) / (2 * s**2)) / (s * sqrt(2 * pi))),
    ("logsumexp", log(exp(x) + exp(y)), exp(x) / (exp(x) + exp(y))),
    ("cross-entropy in p", -(y * log(x) + (1 - y) * log(1 - x)), -y / x + (1 - y) / (1 - x)),
    # x**x and friends [W] (logarithmic differentiation)
    ("x^x", x**x, x**x * (1 + log(x))),
    ("x^(1/x)", x ** (1 / x), x ** (1 / x) * (1 - log(x)) / x**2),
    ("x^sin x", x ** sin(x), x ** sin(x) * (cos(x) * log(x) + sin(x) / x)),
    ("x^(x^2)", x ** (x**2), x ** (x**2) * (2 * x * log(x) + x)),
    ("(sin x)^x", sin(x) ** x, sin(x) ** x * (log(sin(x)) + x * cot(x))),
    # machine-learning activations [ML]
    ("sigmoid", sig(x), sig(x) * (1 - sig(x))),
    ("sigmoid explicit", 1 / (1 + exp(-x)), exp(-x) / (1 + exp(-x)) ** 2),
    ("softplus", sp_(x), sig(x)),
    ("softplus explicit", log(1 + exp(x)), exp(x) / (1 + exp(x))),
    ("softplus(-x)", sp_(-x), -sig(-x)),
    ("relu", relu(x), Heaviside(x)),
    ("sigmoid(2x+1)", sig(2 * x + 1), 2 * sig(2 * x + 1) * (1 - sig(2 * x + 1))),
    ("log sigmoid", log(sig(x)), 1 - sig(x)),
    ("swish", x * sig(x), sig(x) + x * sig(x) * (1 - sig(x))),
    ("mish", x * tanh(sp_(x)), tanh(sp_(x)) + x * sig(x) * (1 - tanh(sp_(x)) ** 2)),
    ("gelu (erf)", x * (1 + erf(x / sqrt(2))) / 2, (1 + erf(x / sqrt(2))) / 2 + x * exp(-(x**2) / 2) / sqrt(2 * pi)),
    ("relu^2", relu(x) ** 2, 2 * relu(x)),
    ("elu", Piecewise((x, x > 0), (exp(x) - 1, True)), Piecewise((1, x > 0), (exp(x), True))),
    ("leaky relu", Max(x, x / 100), Piecewise((1, x > 0), (Rational(1, 100), True))),
    ("hinge", Max(0, 1 - x), Piecewise((-1, x < 1), (0, True))),
    ("huber", Piecewise((x**2 / 2, Abs(x) <= 1), (Abs(x) - half, True)), Piecewise((x, Abs(x) <= 1), (sign(x), True))),
    # non-smooth functions away from their kinks
    ("abs", Abs(x), sign(x)),
    ("abs as x/|x|", Abs(x), x / Abs(x)),
    ("x|x|", x * Abs(x), 2 * Abs(x)),
    ("|x|^3", Abs(x) ** 3, 3 * x * Abs(x)),
    ("|sin x|", Abs(sin(x)), sign(sin(x)) * cos(x)),
    ("|x-1|+|x+1|", Abs(x - 1) + Abs(x + 1), sign(x - 1) + sign(x + 1)),
    ("min(x, 1)", Min(x, 1), Piecewise((1, x < 1), (0, True))),
    ("max(x, x^2)", Max(x, x**2), Piecewise((1, x > x**2), (2 * x, True))),
    ("piecewise poly", Piecewise((x**2, x < 0), (x**3, True)), Piecewise((2 * x, x < 0), (3 * x**2, True))),
    ("heaviside x^2", Heaviside(x) * x**2, 2 * x * Heaviside(x)),
    ("log(x^2)", log(x**2), 2 / x),
    ("|x|^x", Abs(x) ** x, Abs(x) ** x * (log(Abs(x)) + 1)),
    ("acos(cos x)", acos(cos(x)), sign(sin(x))),
]
# partial derivatives with other free real symbols
PARTIALS = [
    ("squared error d/dw", (w * x - y) ** 2, w, 2 * x * (w * x - y)),
    ("x y d/dy", x * y, y, x),
    ("exp(x y) d/dy", exp(x * y), y, x * exp(x * y)),
    ("sigmoid(w x) d/dw", sig(w * x), w, x * sig(w * x) * (1 - sig(w * x))),
]

# ----------------------------------------------------------------------------------------
# Correct derivatives at points (breakpoints, oscillation, exact points)
# ----------------------------------------------------------------------------------------
_x2sin = Piecewise((x**2 * sin(1 / x), sp.Ne(x, 0)), (0, True))
_flat = Piecewise((exp(-1 / x**2), sp.Ne(x, 0)), (0, True))
_huber = Piecewise((x**2 / 2, Abs(x) <= 1), (Abs(x) - half, True))
CORRECT_AT = [
    ("sin at pi/6", sin(x), cos(x), pi / 6),
    ("asin at 1/2", asin(x), 1 / sqrt(1 - x**2), half),
    ("atan at 1", atan(x), 1 / (1 + x**2), 1),
    ("exp at 0", exp(x), exp(x), 0),
    ("log at 1", log(x), 1 / x, 1),
    ("sqrt at 4", sqrt(x), 1 / (2 * sqrt(x)), 4),
    ("real cbrt at -8", real_root(x, 3), 1 / (3 * Abs(x) ** Rational(2, 3)), -8),
    ("acosh at 2", acosh(x), 1 / sqrt(x**2 - 1), 2),
    ("tanh at 0", tanh(x), 1 - tanh(x) ** 2, 0),
    ("sigmoid at 0", sig(x), sig(x) * (1 - sig(x)), 0),
    ("softplus at 0", sp_(x), sig(x), 0),
    ("x^x at 1", x**x, x**x * (1 + log(x)), 1),
    ("x^3 at 0", x**3, 3 * x**2, 0),
    ("float point 0.5", x**2, 2 * x, 0.5),
    ("x^2 sin(1/x) at 0 (oscillating)", _x2sin, Piecewise((2 * x * sin(1 / x) - cos(1 / x), sp.Ne(x, 0)), (0, True)), 0),
    ("exp(-1/x^2) at 0 (flat)", _flat, Piecewise((2 * exp(-1 / x**2) / x**3, sp.Ne(x, 0)), (0, True)), 0),
    ("x|x| at 0", x * Abs(x), 2 * Abs(x), 0),
    ("|x|^3 at 0", Abs(x) ** 3, 3 * x * Abs(x), 0),
    ("relu^2 at 0", relu(x) ** 2, 2 * relu(x), 0),
    ("C1 piecewise at 1", Piecewise((x**2, x < 1), (2 * x - 1, True)), Piecewise((2 * x, x < 1), (2, True)), 1),
    ("huber at 1", _huber, Piecewise((x, Abs(x) <= 1), (sign(x), True)), 1),
    ("elu at 0", Piecewise((x, x > 0), (exp(x) - 1, True)), Piecewise((1, x > 0), (exp(x), True)), 0),
    ("x y at (2, 3)", x * y, y, {x: 2, y: 3}),
    ("sin(x)/x filled in, at 0", Piecewise((sin(x) / x, sp.Ne(x, 0)), (1, True)),
     Piecewise(((x * cos(x) - sin(x)) / x**2, sp.Ne(x, 0)), (0, True)), 0),
    ("x^2 sign(x) at 0", x**2 * sign(x), 2 * Abs(x), 0),
    ("max(x, 0)^2 at 0", Max(x, 0) ** 2, 2 * Max(x, 0), 0),
    ("sin^2+cos^2 at 3/7", sin(x) ** 2 + cos(x) ** 2, sp.Integer(0), Rational(3, 7)),
    ("log(x^2) at -1", log(x**2), 2 / x, -1),
    ("x y at x = 0, y free", x * y, y, 0),
]

# ----------------------------------------------------------------------------------------
# Deliberately wrong derivatives
# ----------------------------------------------------------------------------------------
WRONG = [
    ("sin -> -cos", sin(x), -cos(x), "sign error"),
    ("cos -> sin", cos(x), sin(x), "sign error"),
    ("cosh -> -sinh", cosh(x), -sinh(x), "sign error"),
    ("atan -> 1/(1-x^2)", atan(x), 1 / (1 - x**2), "sign error"),
    ("acos -> +1/sqrt", acos(x), 1 / sqrt(1 - x**2), "sign error"),
    ("1/x -> 1/x^2", 1 / x, 1 / x**2, "sign error"),
    ("tanh -> 1+tanh^2", tanh(x), 1 + tanh(x) ** 2, "sign error"),
    ("sigmoid -> s(1+s)", sig(x), sig(x) * (1 + sig(x)), "sign error"),
    ("softplus -> sigmoid(-x)", sp_(x), sig(-x), "sign error"),
    ("cross-entropy sign", -(y * log(x) + (1 - y) * log(1 - x)), -y / x - (1 - y) / (1 - x), "sign error"),
    ("exp(2x) -> exp(2x)", exp(2 * x), exp(2 * x), "missing chain-rule factor"),
    ("sin x^2 -> cos x^2", sin(x**2), cos(x**2), "missing chain-rule factor"),
    ("log(x^2+1) -> 1/(x^2+1)", log(x**2 + 1), 1 / (x**2 + 1), "missing chain-rule factor"),
    ("(x^2+1)^10 -> 10(...)^9", (x**2 + 1) ** 10, 10 * (x**2 + 1) ** 9, "missing chain-rule factor"),
    ("sigmoid(2x) -> s(1-s)", sig(2 * x), sig(2 * x) * (1 - sig(2 * x)), "missing chain-rule factor"),
    ("2^x -> 2^x", 2**x, 2**x, "missing chain-rule factor (log 2)"),
    ("log2 -> 1/x", log(x, 2), 1 / x, "missing base factor"),
    ("sqrt -> 1/sqrt", sqrt(x), 1 / sqrt(x), "missing factor 1/2"),
    ("x^3 -> 3x^3", x**3, 3 * x**3, "wrong power"),
    ("x^3 -> 2x^2", x**3, 2 * x**2, "wrong power"),
    ("x^-2 -> -2x^-1", x**-2, -2 * x**-1, "wrong power"),
    ("tan -> sec", tan(x), sec(x), "wrong power"),
    ("2^x -> x 2^(x-1)", 2**x, x * 2 ** (x - 1), "power rule misapplied"),
    ("x^x -> x x^(x-1)", x**x, x * x ** (x - 1), "power rule misapplied"),
    ("x sin x -> cos x", x * sin(x), cos(x), "product rule forgotten"),
    ("sin x/x -> cos x", sin(x) / x, cos(x), "quotient rule forgotten"),
    ("abs -> 1", Abs(x), sp.Integer(1), "wrong for x < 0"),
    ("x|x| -> 2x", x * Abs(x), 2 * x, "wrong for x < 0"),
    ("log|x| -> 1/|x|", log(Abs(x)), 1 / Abs(x), "wrong for x < 0"),
    ("asec missing Abs", asec(x), 1 / (x * sqrt(x**2 - 1)), "wrong for x < -1"),
    ("relu -> H(-x)", relu(x), Heaviside(-x), "wrong branch"),
    ("elu wrong branch", Piecewise((x, x > 0), (exp(x) - 1, True)), Piecewise((1, x > 0), (exp(x) - 1, True)), "wrong branch"),
    ("max(x, x^2) swapped", Max(x, x**2), Piecewise((2 * x, x > x**2), (1, True)), "wrong branch"),
]
WRONG_PARTIALS = [
    ("d/dw (w x - y)^2 -> 2(w x - y)", (w * x - y) ** 2, w, 2 * (w * x - y), "missing chain-rule factor"),
]

WRONG_AT = [
    ("sin at pi/6 -> -cos", sin(x), -cos(x), pi / 6),
    ("C1 piecewise, wrong branch value at 1", Piecewise((x**2, x < 1), (2 * x - 1, True)), Piecewise((2 * x, x < 1), (3, True)), 1),
    ("relu^2 at 0 -> 2x + 1", relu(x) ** 2, 2 * x + 1, 0),
    ("x^2 sin(1/x) at 0, unpieced derivative", _x2sin, 2 * x * sin(1 / x) - cos(1 / x), 0),
]

# ----------------------------------------------------------------------------------------
# Points where the function is not differentiable
# ----------------------------------------------------------------------------------------
NOT_DIFFERENTIABLE = [
    ("|x| at 0", Abs(x), 0, "corner: one-sided derivatives -1 and 1"),
    ("|x - 2| at 2", Abs(x - 2), 2, "corner"),
    ("real cbrt at 0", real_root(x, 3), 0, "vertical tangent"),
    ("principal cbrt at 0", x ** Rational(1, 3), 0, "not real for x < 0"),
    ("x^(2/3) real at 0", real_root(x**2, 3), 0, "cusp"),
    ("relu at 0", relu(x), 0, "corner"),
    ("leaky relu at 0", Max(x, x / 100), 0, "corner"),
    ("hinge at 1", Max(0, 1 - x), 1, "corner"),
    ("sign at 0", sign(x), 0, "jump"),
    ("heaviside at 0", Heaviside(x), 0, "jump"),
    ("piecewise corner at 1", Piecewise((x, x < 1), (x**2, True)), 1, "one-sided derivatives 1 and 2"),
    ("piecewise jump at 1", Piecewise((x, x < 1), (x + 1, True)), 1, "discontinuous"),
    ("max(x, 2 - x) at 1", Max(x, 2 - x), 1, "corner"),
    ("|sin x| at pi", Abs(sin(x)), pi, "corner"),
    ("x sin(1/x) at 0", Piecewise((x * sin(1 / x), sp.Ne(x, 0)), (0, True)), 0, "oscillating quotient"),
    ("sqrt at 0", sqrt(x), 0, "boundary of the domain"),
    ("log at 0", log(x), 0, "undefined"),
    ("log at -1", log(x), -1, "outside the real domain"),
    ("acos at 1", acos(x), 1, "boundary of the domain"),
    ("asin at -1", asin(x), -1, "boundary of the domain"),
    ("x^x at 0", x**x, 0, "right quotient tends to -oo"),
    ("1/x at 0", 1 / x, 0, "undefined"),
    ("x^2 sin(1/x) unpieced at 0", x**2 * sin(1 / x), 0, "undefined at 0 (nan)"),
    ("sqrt((x-1)^2) at 1", sqrt(x**2 - 2 * x + 1), 1, "corner, hidden in a square root"),
    ("heaviside sin at 0", Heaviside(x) * sin(x), 0, "one-sided derivatives 0 and 1"),
    ("tan at pi/2", tan(x), pi / 2, "undefined"),
    ("x log|x| filled in, at 0", Piecewise((x * log(Abs(x)), sp.Ne(x, 0)), (0, True)), 0, "quotient tends to -oo"),
    ("punctured value at 0", Piecewise((x**2, x < 0), (x**2, x > 0), (5, True)), 0, "discontinuous"),
    ("exp(-1/x) at 0", exp(-1 / x), 0, "undefined at 0"),
]

# ----------------------------------------------------------------------------------------
# Expected inconclusive verdicts, each with the reason
# ----------------------------------------------------------------------------------------
INCONCLUSIVE = {
    "acos(cos x)": (
        "the limit sin(x)/sqrt(1 - cos(x)**2) equals sign(sin(x)) only after simplifying "
        "sqrt(1 - cos(x)**2) to |sin(x)|, which SymPy's simplify does not do in the case sin(x) > 0"
    ),
    "acosh (Wikipedia)": (
        "1/sqrt(x**2 - 1) equals the derivative only on the real domain x > 1; for x < -1, where "
        "acosh is complex, it differs in sign from 1/(sqrt(x - 1)*sqrt(x + 1)), so no identity "
        "holds and the check does not reason about real domains"
    ),
}
