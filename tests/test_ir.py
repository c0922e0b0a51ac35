"""calcml.ir: statements as nodes, printed once. The printed code is run and compared with
an independent computation; renames go through the printer's name table."""

import math

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings, strategies as st

from calcml import ir
from calcml.errors import CodegenError
from calcml.printing import NumbaPrinter


def _function(body_nodes, name="f", params=("a", "n"), printer=None):
    text = ir.render([ir.Def(name, params, body_nodes, doc="generated")], printer)
    scope = {"math": math, "np": np}
    exec(compile(text, "<ir test>", "exec"), scope)  # noqa: S102 - code this test generated
    return scope[name], text


def test_nested_statements_print_as_python_and_run():
    x = sp.Symbol("x")
    f, text = _function([
        ir.Assign("s", 0.0),
        ir.For("i", ir.range_("n"), [
            ir.If("a[i] >= 0", [ir.AugAssign("s", "+", sp.exp(x) * x, "each term")]),
        ]),
        ir.If("s > 1e300", [ir.Return("math.inf")], ir.If("s == 0", [ir.Return(-1.0)], [ir.Return("s")])),
    ], printer=NumbaPrinter({x: "a[i]"}))
    # the SymPy leaf went through the printer at render time, with x named a[i]
    assert "math.exp(a[i])" in text and "# each term" in text
    assert "elif s == 0:" in text and "else:" in text
    a = np.array([0.5, -2.0, 1.5, 0.0])
    expect = math.fsum(math.exp(v) * v for v in a if v >= 0)
    assert f(a, len(a)) == pytest.approx(expect, rel=1e-15)
    assert f(np.array([0.0]), 1) == -1.0


def test_a_rename_is_a_name_table_and_cannot_hit_half_a_name():
    # the defect of text edits: replacing "g[j]" inside "st_avg[j]"; here g and avg are symbols
    g, avg, lr, theta = sp.symbols("g avg lr theta")
    rule = [(avg, sp.Rational(9, 10) * avg + g / 10), (theta, theta - lr * avg)]
    names = {g: "g[j]", avg: "st_avg[j]", lr: "lr", theta: "theta[j]"}
    printer = NumbaPrinter(names)
    body = [ir.For("j", ir.range_("theta.shape[0]"), [ir.Assign(t, e) for t, e in rule])]
    text = ir.render([ir.Def("update", ("theta", "g", "st_avg", "lr"), body)], printer)
    assert "st_avg[j] = " in text and "st_g" not in text and "st_avg[j]" in text
    scope = {"math": math}
    exec(compile(text, "<ir test>", "exec"), scope)  # noqa: S102
    th, gr, av = np.array([1.0, 2.0]), np.array([0.5, -1.0]), np.array([0.1, 0.2])
    exp_av = 0.9 * av + gr / 10
    exp_th = th - 0.3 * exp_av
    scope["update"](th, gr, av, 0.3)
    np.testing.assert_allclose(av, exp_av, rtol=1e-15)
    np.testing.assert_allclose(th, exp_th, rtol=1e-15)


def test_a_symbol_without_a_name_is_refused():
    with pytest.raises(CodegenError, match="'y'"):
        ir.render([ir.Assign("a", sp.Symbol("y") + 1)], NumbaPrinter({}))


def test_empty_bodies_and_none_and_nested_lists():
    text = ir.render([ir.Def("f", (), [None, [[]], []]), ir.Blank(2), ir.While("False", [])])
    assert text == "def f():\n    pass\n\n\nwhile False:\n    pass"
    with pytest.raises(TypeError, match="no code"):
        ir.render([ir.Assign("a", object())])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), min_size=1, max_size=4))
def test_loop_nests_match_the_count_of_their_iterations(spec):
    """Arbitrary nests of For/If: the printed program counts what a direct loop counts."""
    body = [ir.AugAssign("c", "+", 1)]
    for depth, (cut, extent) in enumerate(reversed(spec)):
        var = f"i{depth}"
        body = [ir.For(var, ir.range_(extent), [ir.If(f"{var} >= {cut}", body)])]
    f, _ = _function([ir.Assign("c", 0), body, ir.Return("c")], params=())
    expect = 1
    for cut, extent in spec:
        expect *= max(0, extent - cut)
    assert f() == expect


def test_code_over_two_lines_is_indented_to_its_statement():
    f, text = _function([ir.If("n > 0", [ir.Return("max(a[0],\nn)")]), ir.Return(0)])
    assert "        return max(a[0],\n        n)" in text
    assert f(np.array([5.0]), 2) == 5.0 and f(np.array([5.0]), 0) == 0


def test_user_text_in_comments_never_becomes_code():
    # a name with a newline or a carriage return (Python ends a line at either) stays comment
    evil = "w\rraise SystemExit\nraise SystemExit"
    f, text = _function([ir.Comment(evil), ir.Assign("s", 1.0, comment=evil), ir.Return("s")], params=())
    assert f() == 1.0
    assert "\r" not in text
    assert all(line.strip().startswith(("#", "def", '"""', "s =", "return")) for line in text.splitlines())
