"""Derivative verification against the limit definition (hand-written gradients are checked
at points by :mod:`calcml.check`).

A derivative is called ``"verified"`` only when it was proven exactly: the limit

    lim_{h -> 0} (f(x + h) - f(x)) / h

was computed symbolically (for general ``x``, or one-sidedly at an exact point) and the
difference between that limit and the derivative under test simplified exactly to zero.
SymPy's ``limit`` is treated as a claim, never as a fact: an answer is accepted only when it
is free of the forms SymPy uses when it gives up (``oo*sign(...)`` around a zero in disguise,
``AccumBounds`` where a number was expected, unevaluated ``Limit``), and when it agrees with
high-precision difference quotients computed independently with mpmath.

mpmath difference quotients with shrinking ``h`` (down to 1e-20 at general points and 1e-50
at a given point, in 60 to 90 digit arithmetic) can refute a derivative or support an
``"inconclusive"`` verdict; they never verify.

Every check runs in a worker process (forked from a single-threaded fork server, never from
the caller's process, whose threads may hold locks) with a time budget that holds even when SymPy
never returns: a worker that overruns is killed, and its check is reported
``"inconclusive"`` together with whatever numeric evidence it sent before. Workers are kept
between checks (SymPy's caches stay warm) and independent checks run concurrently.

How a check is decided
----------------------
At general ``x``:

1. numeric evidence at a few rational sample points: a claimed derivative that disagrees
   with converged difference quotients (and with SymPy's own derivative there) is refuted;
2. non-smooth atoms (``Abs``, ``sign``, ``Heaviside``, ``relu``, ``Max``, ``Min``,
   ``Piecewise``) are split into sign cases, each a smooth expression;
3. in each case the limit is computed term by term (the limit of a sum is the sum of the
   limits when these exist), with a term's constant factor taken out and a linear inner
   argument ``u = a*x + c`` substituted (``lim (G(u + a h) - G(u))/h = a * G'(u)``, with
   ``k = a h``), so that one univariate limit serves every parameter of a linear model.
   Logarithms are first split exactly (``log(sigmoid(z)) = z - log(1 + exp(z))``). A
   rational quotient is decided by exact cancellation; otherwise the limit is the
   h-coefficient of the Taylor expansion of ``f(x + h)`` (when SymPy gives a clean
   ``a0 + a1 h + O(h**2)`` with ``a0 = f(x)`` proven), else SymPy's ``limit``, with
   ``b**e`` rewritten as ``exp(e*log(b))`` (which removes the ``x**x`` disguise);
4. the difference between the limit and the derivative under test must simplify to zero
   (after the same exact rewrites on both sides; an identity proven with a compound
   argument replaced by a free symbol holds for the argument too).

At a point ``a``:

1. ``f(a)`` is evaluated exactly; undefined or non-real means not differentiable there;
2. for each side, ``f(a + s t)`` with ``t > 0`` is resolved branch by branch (every
   ``Piecewise`` condition, ``Abs``, ``sign`` ... is decided for small ``t`` from the exact
   value, or the leading term, of its argument), and the one-sided limit is computed
   (Taylor coefficient when ``f(a + s t)`` has one, else SymPy's ``limit``) and compared
   with one-sided difference quotients;
3. infinite, oscillating (``AccumBounds``, confirmed by non-converging quotients), non-real,
   or unequal one-sided limits mean ``"not differentiable"``; equal finite limits are
   compared exactly with the derivative's value at ``a``.

What is where
-------------
- ``api.py``: ``verify_derivative`` and ``verify``; their inputs read as exact checks.
- ``workers.py``: the pool of worker processes, the fork server, the time budget.
- ``checks.py``: one check (``_Spec``) and what a worker runs for it (the steps above).
- ``limits.py``: symbolic limits (general ``x``, one-sided at a point) and exact zero tests.
- ``cases.py``: sign cases of the non-smooth atoms.
- ``numeric.py``: mpmath difference quotients and the refutations they give.
- ``mpeval.py``: SymPy expressions evaluated with mpmath; the status of an exact value.
- ``report.py``: ``Verdict``, ``Report`` and the short forms their messages use.

Each module imports only modules listed below it.
``check_gradient`` lives in :mod:`calcml.check`; ``calcml.verify.check_gradient`` still imports.
"""

from __future__ import annotations

from .api import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT, verify as verify, verify_derivative as verify_derivative
from .report import STATUSES as STATUSES, Report as Report, Verdict as Verdict

# Private names the tests reach through the package. Patch a name in the module that holds it
# (calcml.verify.workers._check, ._CONTEXT): a copy here is not what the workers look up.
from .api import _make_spec as _make_spec
from .workers import (
    _IDLE as _IDLE,
    _context as _context,
    _run_specs as _run_specs,
    _shutdown_pool as _shutdown_pool,
    _worker_main as _worker_main,
)

__all__ = ["Verdict", "Report", "verify_derivative", "verify", "check_gradient", "DEFAULT_TIMEOUT"]


def __getattr__(name):
    # check_gradient moved to calcml.check (issue 12, item 1); the old import keeps working
    # (imported on use: calcml.check imports this package)
    if name == "check_gradient":
        from ..check import check_gradient

        return check_gradient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
