"""Stating a cost: symbols, validation errors, exact derivatives against SymPy's own diff."""

import mpmath
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import calcml as cm


def test_params_forms():
    w, b = cm.params("w b")
    assert (w.name, b.name) == ("w", "b") and w.is_real and b.is_real
    single = cm.params("b")
    assert isinstance(single, sp.Symbol) and single.name == "b"
    ws = cm.params("w", 3)
    assert [s.name for s in ws] == ["w0", "w1", "w2"]
    xs = cm.data("x", 2)
    assert [s.name for s in xs] == ["x0", "x1"] and all(s.is_real for s in xs)
    assert [s.name for s in cm.data("x, y")] == ["x", "y"]


@pytest.mark.parametrize("bad", [lambda: cm.params("w", 0), lambda: cm.params("w b", 2), lambda: cm.params("")])
def test_params_bad_arguments(bad):
    with pytest.raises(ValueError):
        bad()


def test_cost_attributes_and_order():
    w = cm.params("w", 2)
    b = cm.params("b")
    x = cm.data("x", 2)
    y = cm.data("y")
    cost = cm.Cost((cm.dot(w, x) + b - y) ** 2, params=[w, b], data=[*x, y])
    assert cost.params == (*w, b)
    assert cost.data == (*x, y)
    assert cost.reduce == "mean"
    assert cost.expr == (w[0] * x[0] + w[1] * x[1] + b - y) ** 2


def test_gradient_and_hessian_equal_sympy():
    w = cm.params("w", 3)
    x = cm.data("x", 3)
    y = cm.data("y")
    z = cm.dot(w, x)
    expr = cm.softplus(z) - y * z + sp.tanh(w[0] * w[1]) * sp.exp(-w[2] ** 2)
    cost = cm.Cost(expr, params=w, data=[*x, y])
    assert cost.gradient == tuple(sp.diff(expr, p) for p in w)
    assert cost.hessian == sp.hessian(expr, w)
    # and symmetric, exactly
    assert cost.hessian == cost.hessian.T


def test_assumption_free_symbols_become_real():
    a, t = sp.symbols("a t")
    cost = cm.Cost(sp.Abs(a * t - 1), params=[a], data=[t])
    (p,) = cost.params
    assert p.is_real and p.name == "a"
    # with real symbols SymPy gives the real derivative sign(a t - 1) * t
    assert sp.simplify(cost.gradient[0] - cost.data[0] * sp.sign(p * cost.data[0] - 1)) == 0


def test_unknown_symbol_is_named():
    w = cm.params("w")
    q = sp.Symbol("q", real=True)
    with pytest.raises(cm.CostError, match="'q'.*neither a parameter nor data"):
        cm.Cost(w * q, params=[w])


def test_parameter_listed_twice():
    w = cm.params("w")
    with pytest.raises(cm.CostError, match="'w' twice"):
        cm.Cost(w**2, params=[w, w])


def test_symbol_both_param_and_data():
    w = cm.params("w")
    with pytest.raises(cm.CostError, match="'w'.*both"):
        cm.Cost(w**2, params=[w], data=[w])


@pytest.mark.parametrize(
    "make",
    [
        lambda w: sp.I * w,
        lambda w: sp.sqrt(-1) * w,
        lambda w: w > 1,
        lambda w: sp.Matrix([w, w]),
    ],
)
def test_not_real_scalar(make):
    w = cm.params("w")
    with pytest.raises(cm.CostError):
        cm.Cost(make(w), params=[w])


@pytest.mark.parametrize("make", [
    lambda a, b: sp.sqrt(-1 - a**2) + b,
    lambda a, b: sp.log(-1 - a**2) * b,
    lambda a, b: sp.asin(2 + a**2) + b,
    lambda a, b: (a + b) ** 2 + (-1 - a**2) ** sp.Rational(1, 3),
    lambda a, b: sp.exp(b) * sp.sqrt(-2 - sp.exp(a)),
])
def test_a_part_provably_not_real_is_refused(make):
    """The parts that can leave the reals (a power with a non-integer exponent, a function) are
    asked, each once, whether they are real: inside sums and products too."""
    a, b = cm.params("a b")
    with pytest.raises(cm.CostError, match="not real-valued"):
        cm.Cost(make(a, b), params=[a, b])


def test_real_parts_that_sympy_cannot_decide_are_accepted():
    a, b = cm.params("a b")
    cost = cm.Cost(sp.sqrt(a**2 + 1) + sp.Abs(b) ** 1.5 + sp.log(1 + sp.exp(a)), params=[a, b])
    assert cost.n_params == 2


def test_declared_non_real_symbol_refused():
    c = sp.Symbol("c", imaginary=True)
    with pytest.raises(cm.CostError, match="'c' is declared non-real"):
        cm.Cost(c**2, params=[c])


def test_string_expression_refused():
    w = cm.params("w")
    with pytest.raises(cm.CostError, match="string"):
        cm.Cost("w**2", params=[w])
    with pytest.raises(cm.CostError, match="string"):
        cm.Cost(w**2, params="w")


def test_no_params_and_bad_reduce():
    w = cm.params("w")
    with pytest.raises(cm.CostError, match="at least one parameter"):
        cm.Cost(w**2, params=[])
    with pytest.raises(cm.CostError, match="reduce"):
        cm.Cost(w**2, params=[w], reduce="max")


def test_latex():
    w, b = cm.params("w b")
    x, y = cm.data("x y")
    latex = cm.Cost((w * x + b - y) ** 2, params=[w, b], data=[x, y])._repr_latex_()
    assert latex.startswith("$") and latex.endswith("$")
    assert "\\frac{1}{N}\\sum_{i=1}^{N}" in latex and "w x" in latex
    assert "\\sum" not in cm.Cost(w**2, params=[w])._repr_latex_()


def test_dot_validates_lengths():
    with pytest.raises(cm.CostError, match="lengths differ"):
        cm.dot(cm.params("w", 2), cm.data("x", 3))


# -- activations: derivatives and values against independent definitions ------------------

z = sp.Symbol("z", real=True)


@pytest.mark.parametrize(
    "f, definition",
    [
        (cm.sigmoid(z), 1 / (1 + sp.exp(-z))),
        (cm.softplus(z), sp.log(1 + sp.exp(z))),
    ],
)
def test_activation_derivative_matches_definition(f, definition):
    assert sp.simplify(sp.diff(f, z).rewrite(sp.exp) - sp.diff(definition, z)) == 0
    assert sp.simplify(sp.diff(f, z, 2).rewrite(sp.exp) - sp.diff(definition, z, 2)) == 0


@settings(max_examples=40, deadline=None)
@given(st.floats(-700, 700, allow_nan=False))
def test_activation_values_match_mpmath(v):
    with mpmath.workdps(50):
        mv = mpmath.mpf(v)
        sig = 1 / (1 + mpmath.exp(-mv))
        sp_ = mpmath.log1p(mpmath.exp(mv))  # log(1 + e) would cancel at v << 0
        assert abs(cm.sigmoid(sp.Float(v, 50)).evalf(40) - sp.Float(sig, 50)) <= sp.Float(sig, 50) * 1e-35
        assert abs(cm.softplus(sp.Float(v, 50)).evalf(40) - sp.Float(sp_, 50)) <= sp.Float(sp_, 50) * 1e-35
    assert cm.relu(sp.Float(v)) == max(sp.Float(v), 0)


def test_relu_derivative_is_heaviside_with_zero_at_zero():
    assert sp.diff(cm.relu(z), z) == sp.Heaviside(z, 0)
    assert cm.relu(sp.Rational(-3, 2)) == 0 and cm.relu(sp.Rational(3, 2)) == sp.Rational(3, 2)
