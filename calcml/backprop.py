"""Reverse-mode differentiation of a SymPy expression into straight-line code.

``sympy.diff`` once per parameter walks the whole expression each time and returns
gradients that share nothing, which ``sympy.cse`` must then rediscover: for a tanh network
with 1,000 parameters that is tens of seconds of each. Backpropagation over the
expression's DAG does the same exact calculus in one forward and one backward sweep:

* forward: every distinct subexpression becomes one temporary, ``v = f(children)``;
* backward: every temporary that depends on a parameter gets an adjoint
  ``a = sum over parents of a_parent * d parent / d child``, the local derivative taken
  by SymPy on a node whose children are symbols (so it is small and exact);
* the gradient is the adjoints of the parameters.

The result has the shape of ``sympy.cse``'s output (assignments, outputs), so the code
generator treats both the same way. It is the chain rule, exactly: the compiled values
agree with ``Cost.gradient`` (tests compare both against 50-digit references).
"""

from __future__ import annotations

import sympy as sp

__all__ = ["backprop"]

# Nodes taken apart; anything else (Piecewise, ...) is an opaque node, differentiated whole.
_DECOMPOSED = (sp.Add, sp.Mul, sp.Pow, sp.Function)


def _children(node):
    """The sub-expressions of ``node`` that carry values (numbers are constants)."""
    return [a for a in node.args if not a.is_Number]


def _is_decomposable(node) -> bool:
    return isinstance(node, _DECOMPOSED) and all(isinstance(a, sp.Expr) for a in node.args)


def backprop(expr: sp.Expr, params, dummy_prefix: str = "_bp"):
    """(assignments, value, gradient): straight-line forward and backward sweeps.

    ``assignments`` is a list of ``(symbol, expression)`` in evaluation order; ``value``
    and each entry of ``gradient`` are expressions in those symbols, the parameters and
    the other free symbols of ``expr``.
    """
    params = list(params)
    param_set = set(params)
    counter = iter(range(10**9))

    def fresh():
        return sp.Dummy(f"{dummy_prefix}{next(counter)}", real=True)

    # -- forward: post-order over the DAG of distinct subexpressions ---------------------
    order: list = []  # non-atomic nodes, children before parents
    seen: set = set()
    stack = [(expr, False)]
    while stack:
        node, done = stack.pop()
        if node.is_Atom or node in seen:
            continue
        if done:
            seen.add(node)
            order.append(node)
            continue
        stack.append((node, True))
        if _is_decomposable(node):
            for child in reversed(_children(node)):
                if not child.is_Atom and child not in seen:
                    stack.append((child, False))

    depends: dict = {}  # node -> does it depend on a parameter?
    for node in order:
        if _is_decomposable(node):
            depends[node] = any(
                (c in param_set) if c.is_Atom else depends[c] for c in _children(node)
            )
        else:
            depends[node] = bool(node.free_symbols & param_set)

    sym: dict = {}  # node -> its temporary
    assignments: list = []

    def ref(node):
        return node if node.is_Atom else sym[node]

    for node in order:
        s = fresh()
        sym[node] = s
        if _is_decomposable(node):
            rebuilt = node.func(*[a if a.is_Number else ref(a) for a in node.args], evaluate=False)
        else:
            rebuilt = node
        assignments.append((s, rebuilt))

    if expr.is_Atom:
        value = expr
        grads = [sp.S.One if p == expr else sp.S.Zero for p in params]
        return assignments, value, grads

    # -- backward: reverse order, each node's parents are done before it -----------------
    adj_terms: dict = {expr: [sp.S.One]}
    for node in reversed(order):
        terms = adj_terms.pop(node, None)
        if not terms or not depends[node]:
            continue
        if len(terms) == 1 and (terms[0].is_Atom):
            adj = terms[0]
        else:
            adj = fresh()
            assignments.append((adj, sp.Add(*terms)))
        for child, partial in _local_partials(node, sym, ref):
            if child.is_Atom and child not in param_set:
                continue
            if not child.is_Atom and not depends[child]:
                continue
            if partial == 0:
                continue
            adj_terms.setdefault(child, []).append(adj * partial)

    grads = [sp.Add(*adj_terms.get(p, [])) for p in params]
    return assignments, sym[expr], grads


def _local_partials(node, sym, ref):
    """[(child, d node / d child)] with children and node written as their temporaries."""
    if not _is_decomposable(node):
        # Opaque: differentiate the whole node with respect to each free symbol in it.
        return [(s, sp.diff(node, s)) for s in sorted(node.free_symbols, key=lambda s: s.name)]
    me = sym[node]
    if isinstance(node, sp.Add):
        return [(c, sp.S.One) for c in _children(node)]
    if isinstance(node, sp.Mul):
        args = [a if a.is_Number else ref(a) for a in node.args]
        out = []
        for i, a in enumerate(node.args):
            if a.is_Number:
                continue
            out.append((a, sp.Mul(*(args[:i] + args[i + 1:]))))
        return out
    if isinstance(node, sp.Pow):
        base, exp = node.args
        b, e = ref(base) if not base.is_Number else base, ref(exp) if not exp.is_Number else exp
        out = []
        if not base.is_Number:
            out.append((base, e * b ** (e - 1)))
        if not exp.is_Number:
            out.append((exp, me * sp.log(b)))
        return out
    # A function f(u1, ..., uk): SymPy's derivative rule on symbol arguments.
    dummies = [sp.Dummy(f"_u{i}", real=True) for i in range(len(node.args))]
    applied = node.func(*dummies)
    out = []
    for i, a in enumerate(node.args):
        if a.is_Number:
            continue
        d = sp.diff(applied, dummies[i])
        d = d.xreplace({applied: me}).xreplace({u: (x if x.is_Number else ref(x)) for u, x in zip(dummies, node.args)})
        out.append((a, d))
    return out
