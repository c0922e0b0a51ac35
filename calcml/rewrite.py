"""Numerically stable rewrites, declared as rules and applied by one ``optimize``.

Each rule replaces a form that overflows or loses precision in float64 by an equal form
that does not (the stable forms are the activations in :mod:`calcml.functions`, whose
compiled versions are written to be safe, and ``log1p``/``expm1``). The rules are exact
identities, so the rewritten expression is mathematically the one the user stated.

Order matters: logistic forms become ``sigmoid`` first, ``1 - sigmoid`` folds into
``sigmoid(-z)``, logs of those become ``softplus``; only then do the generic ``log1p`` and
``expm1`` rules see what is left.
"""

from __future__ import annotations

from functools import lru_cache

import sympy as sp
from sympy.codegen.cfunctions import expm1

from .functions import sigmoid, softplus

# sympy.codegen.rewriting (ReplaceOptim, log1p_opt, optimize) is imported when the rules
# are first needed, i.e. when a cost is compiled: importing it pulls in sympy.tensor and
# sympy.combinatorics (about 70 ms), which a process served from the kernel cache never needs.

__all__ = ["stable_rules", "stabilize"]


def _one_plus_exp(e):
    """If ``e`` is ``1 + exp(u)``, return ``u``; else None."""
    if isinstance(e, sp.Add) and len(e.args) == 2 and sp.S.One in e.args:
        other = e.args[0] if e.args[1] is sp.S.One else e.args[1]
        if isinstance(other, sp.exp):
            return other.args[0]
    return None


def _is_logistic_reciprocal(e):
    # 1/(1 + exp(u)) == sigmoid(-u)
    return isinstance(e, sp.Pow) and e.exp is sp.S.NegativeOne and _one_plus_exp(e.base) is not None


def _logistic_reciprocal(e):
    return sigmoid(-_one_plus_exp(e.base))


def _is_exp_over_one_plus_exp(e):
    # exp(u)/(1 + exp(u)) == sigmoid(u); SymPy keeps it as Mul(exp(u), Pow(1 + exp(u), -1))
    if not isinstance(e, sp.Mul):
        return False
    return _split_exp_ratio(e) is not None


def _split_exp_ratio(e):
    exps = [a for a in e.args if isinstance(a, sp.exp)]
    for a in e.args:
        u = None
        if isinstance(a, sp.Pow) and a.exp is sp.S.NegativeOne:
            u = _one_plus_exp(a.base)  # exp(u) * (1 + exp(u))**-1
        elif isinstance(a, sigmoid):
            u = -a.args[0]  # exp(u) * sigmoid(-u)
        if u is not None:
            for ex in exps:
                if ex.args[0] == u:
                    return ex, a, u
    return None


def _exp_over_one_plus_exp(e):
    ex, den, u = _split_exp_ratio(e)
    rest = [a for a in e.args if a is not ex and a is not den]
    return sp.Mul(*rest) * sigmoid(u)


def _has_one_minus_sigmoid(e):
    if not isinstance(e, sp.Add) or sp.S.One not in e.args:
        return False
    return any(_neg_sigmoid_arg(a) is not None for a in e.args)


def _neg_sigmoid_arg(a):
    if isinstance(a, sp.Mul) and len(a.args) == 2 and sp.S.NegativeOne in a.args:
        s = a.args[1] if a.args[0] is sp.S.NegativeOne else a.args[0]
        if isinstance(s, sigmoid):
            return s.args[0]
    return None


def _one_minus_sigmoid(e):
    # 1 - sigmoid(u) == sigmoid(-u): the subtraction cancels catastrophically for large u
    args = list(e.args)
    for i, a in enumerate(args):
        u = _neg_sigmoid_arg(a)
        if u is not None:
            rest = args[:i] + args[i + 1:]
            rest.remove(sp.S.One)
            return sp.Add(*rest) + sigmoid(-u)
    return e


def _is_log_of(cls_or_test):
    def query(e):
        return isinstance(e, sp.log) and len(e.args) == 1 and cls_or_test(e.args[0])
    return query


def _is_exp_minus_one(e):
    return (
        isinstance(e, sp.Add)
        and sp.S.NegativeOne in e.args
        and any(isinstance(a, sp.exp) for a in e.args)
    )


def _exp_minus_one(e):
    # exp(u) - 1 == expm1(u): keeps full precision for tiny u. (SymPy's expm1_opt calls
    # factor() on every Add, which costs seconds on a gradient; this is the plain match.)
    args = list(e.args)
    args.remove(sp.S.NegativeOne)
    first = next(a for a in args if isinstance(a, sp.exp))
    args.remove(first)
    return sp.Add(*args) + expm1(first.args[0])


def _is_log_one_plus(e):
    return (isinstance(e, sp.log) and len(e.args) == 1 and isinstance(e.args[0], sp.Add)
            and sp.S.One in e.args[0].args)


def _log_one_plus(e):
    # log(1 + u) == log1p(u): full precision for tiny u. (SymPy's log1p_opt calls factor() on
    # every log's argument: seconds on a large cost, and a RecursionError on the digits'
    # softmax in scalar symbols; this is the plain match.)
    from sympy.codegen.cfunctions import log1p

    args = list(e.args[0].args)
    args.remove(sp.S.One)
    return log1p(sp.Add(*args))


@lru_cache(maxsize=None)
def stable_rules() -> tuple:
    """The rewrites, in the order they are applied (built once)."""
    from sympy.codegen.rewriting import ReplaceOptim

    log1p_opt = ReplaceOptim(_is_log_one_plus, _log_one_plus)

    # log(sigmoid(u)) == -softplus(-u): the log-likelihood of logistic regression, stable.
    log_sigmoid_opt = ReplaceOptim(
        _is_log_of(lambda a: isinstance(a, sigmoid)),
        lambda e: -softplus(-e.args[0].args[0]),
    )
    # log(1 + exp(u)) == softplus(u): no overflow at u = 800.
    softplus_opt = ReplaceOptim(
        _is_log_of(lambda a: _one_plus_exp(a) is not None),
        lambda e: softplus(_one_plus_exp(e.args[0])),
    )
    expm1_opt = ReplaceOptim(_is_exp_minus_one, _exp_minus_one)
    logistic_opt = ReplaceOptim(_is_logistic_reciprocal, _logistic_reciprocal)
    exp_ratio_opt = ReplaceOptim(_is_exp_over_one_plus_exp, _exp_over_one_plus_exp)
    one_minus_sigmoid_opt = ReplaceOptim(_has_one_minus_sigmoid, _one_minus_sigmoid)
    return (
        exp_ratio_opt,
        logistic_opt,
        exp_ratio_opt,
        one_minus_sigmoid_opt,
        log_sigmoid_opt,
        softplus_opt,
        log1p_opt,
        expm1_opt,
    )


def stabilize(expr: sp.Expr, rules=None) -> sp.Expr:
    """Apply the stable rewrites (``rules``, default :func:`stable_rules`) to ``expr``; the
    result is equal to ``expr`` as a function."""
    from sympy.codegen.rewriting import optimize

    return optimize(expr, stable_rules() if rules is None else rules)
