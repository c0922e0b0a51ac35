"""Optimizers as small, pure descriptions: hyperparameters, state, and the update rule as math.

Each optimizer is what optax calls a gradient transformation, written down as data
(``optax/_src/base.py``, ``alias.py``): its hyperparameters (numbers passed to the compiled
loop at run time, so one compiled loop serves a sweep), its state arrays, and its update rule
as SymPy assignments that the generators (:mod:`calcml.loop`, :mod:`calcml.tensor.optimize`)
print into the generated descent loop, after the cost's exact gradient. Adding an optimizer
is one function here.

An update rule is a sequence of ``(target, expression)`` pairs, done in order for each
parameter. Its symbols are this module's :data:`theta` (the parameter), :data:`g` (its
gradient), :data:`lr` (the scheduled rate of this update) and :data:`step` (updates done so
far, from 0), and symbols named like the optimizer's hyperparameters and state arrays (the
state's entry for this parameter); a target may also be a new name, a value the later pairs
read. ``per_step`` pairs are done once per update, before the parameters' (they may read
``lr``, ``step`` and the hyperparameters). Nothing is code: the generators print the
expressions with the printer that prints the cost, and rename symbols as symbols.

Newton and L-BFGS are full-batch methods that choose their own step by a line search; their
step is a call (``call``: the helper's name and its arguments' names) of helper functions,
given here as source, of the value, gradient and Hessian.

>>> import calcml as cm
>>> opt = cm.optim.adam(lr=1e-3)
>>> opt.name, opt.hyper
('adam', {'b1': 0.9, 'b2': 0.999, 'eps': 1e-08})
"""

from __future__ import annotations

import builtins
import keyword
import numbers
import re
from dataclasses import dataclass, field, replace

import sympy as sp

from .errors import OptimizeError
from .schedules import _real

__all__ = [
    "Optimizer",
    "gd",
    "sgd",
    "momentum",
    "nesterov",
    "adam",
    "rmsprop",
    "adagrad",
    "newton",
    "lbfgs",
    "newton_cg",
    "get",
    "METHODS",
    "theta",
    "g",
    "lr",
    "step",
]

# Hyperparameter, state and rule-local names: plain words. The generators print them under
# names of their own (``hp_<name>``, ``st_<name>``...), so they never meet the cost's.
_NAME = re.compile(r"^[a-z][a-z0-9]*$")
# names the rules read, which a hyperparameter, a state or a rule's own value must not take
_RESERVED = frozenset({"theta", "g", "j", "lr", "step", "math", "np", "n"})

# The rule's vocabulary (what a user's rule is written with).
theta = sp.Symbol("theta")  #: the parameter being updated
g = sp.Symbol("g")  #: its exact gradient (of the batch)
lr = sp.Symbol("lr")  #: the learning rate of this update (the schedule's, or the constant)
step = sp.Symbol("step")  #: the number of updates done so far, from 0
# What the loops read per parameter and per update, as each generator names them.
PARAM, GRAD, RATE, STEP = "theta", "g", "lr", "step"
# The arguments a line-searched step's helper may take besides its state and hyperparameters.
CALL_ARGS = frozenset({"theta", "value", "g", "cols", "passes"})

# One Dummy per name, made once: a rule's symbols never equal a cost's symbols (a parameter
# named "g" or "lr"), and the same name is the same object in every rule of the process.
_SLOTS: dict = {}


def slot(name: str) -> sp.Dummy:
    """The canonical symbol of a rule's name (what the generators map to their own names)."""
    found = _SLOTS.get(name)
    if found is None:
        found = _SLOTS.setdefault(name, sp.Dummy(name))
    return found


# (what, pairs, readable, targets, locals before) -> (canonical pairs, locals after): an
# optimizer is made again for every rate it is given (with_lr) and by every call of its
# factory, and checking a rule is SymPy work (about 1.4 ms for adam's)
_CHECKED: dict = {}


def _rule(opt: str, what: str, pairs, readable: set, targets: set, locals_: set) -> tuple:
    """``pairs`` validated and canonical: ((slot, expression), ...) with every symbol a slot.

    ``readable``: the names the expressions may read; ``targets``: the names they may assign
    besides new locals, which are added to ``locals_`` (readable by the later pairs)."""
    try:
        key = (what, tuple(pairs), frozenset(readable), frozenset(targets), frozenset(locals_))
        found = _CHECKED.get(key)
    except TypeError:  # something unhashable in pairs: checked (and refused) below
        key = found = None
    if found is not None:
        locals_ |= found[1]
        return found[0]
    out = _check_rule(opt, what, pairs, readable, targets, locals_)
    if key is not None and len(_CHECKED) < 1024:
        _CHECKED[key] = (out, frozenset(locals_))
    return out


def _check_rule(opt: str, what: str, pairs, readable: set, targets: set, locals_: set) -> tuple:
    """:func:`_rule`'s work."""
    from .errors import CodegenError
    from .printing import NumbaPrinter

    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, (tuple, list)):
        raise OptimizeError(f"optimizer {opt}: {what} must be a sequence of (target, expression) pairs, got {pairs!r}")
    out = []
    for pair in pairs:
        if isinstance(pair, str):
            raise OptimizeError(
                f"optimizer {opt}: {what} holds the string {pair!r}; rules are (target, expression) pairs of "
                f"SymPy symbols, e.g. (m, beta*m + g) and (theta, theta - lr*m) with theta, g, lr from "
                f"calcml.optim: calcml prints them itself and runs no code it is given")
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise OptimizeError(f"optimizer {opt}: each item of {what} is a (target, expression) pair, got {pair!r}")
        target, expr = pair
        if not isinstance(target, sp.Symbol):
            raise OptimizeError(f"optimizer {opt}: the target of {what} pair {pair!r} must be a SymPy symbol")
        if isinstance(expr, bool) or not isinstance(expr, (sp.Expr, numbers.Real)):
            raise OptimizeError(f"optimizer {opt}: {what} assigns {target.name} a {type(expr).__name__}, "
                                f"not a SymPy expression ({expr!r})")
        expr = sp.sympify(expr)  # a number or an Expr: never a string (refused above)
        for sym in sorted(expr.free_symbols, key=str):
            if not isinstance(sym, sp.Symbol) or sym.name not in readable | locals_:
                known = ", ".join(sorted(readable | locals_))
                raise OptimizeError(f"optimizer {opt}: {what} reads {sym}, which it cannot: it may read {known} "
                                    f"(and the values it assigned before)")
        name = target.name
        if name not in targets:
            if name in readable or not _NAME.match(name) or keyword.iskeyword(name) or hasattr(builtins, name):
                raise OptimizeError(f"optimizer {opt}: {what} cannot assign {name!r}")
            locals_.add(name)
        canon = expr.xreplace({s: slot(s.name) for s in expr.free_symbols})
        printer = NumbaPrinter({slot(n): n for n in readable | locals_})
        try:
            printer.doprint_expr(canon)
        except CodegenError as exc:
            raise OptimizeError(f"optimizer {opt}: {what} assigns {name} what calcml cannot compile: {exc}") from None
        out.append((slot(name), canon))
    return tuple(out)


@dataclass(frozen=True)
class Optimizer:
    """An optimizer: what the generator needs, nothing hidden.

    ``kind`` is ``"first_order"`` (``update`` pairs, done per parameter) or ``"newton"`` /
    ``"lbfgs"`` (a line-searched full-batch step: ``call``, the helper in ``helpers`` and its
    arguments by name). ``lr`` is the default constant rate (``None`` for methods that pick
    their own step; ``"auto"`` for gd's safe step). See the module's docstring for the rules.

    >>> import calcml as cm, sympy as sp
    >>> from calcml.optim import theta, g, lr
    >>> m, beta = sp.symbols("m beta")
    >>> signum = cm.optim.Optimizer("signum", 0.01, {"beta": 0.9}, state=(("m", ("n",), 0.0),),
    ...                             update=[(m, beta*m + (1 - beta)*g), (theta, theta - lr*sp.sign(m))])
    >>> signum.hyper
    {'beta': 0.9}
    """

    name: str
    lr: object
    hyper: dict
    state: tuple = ()  # ((name, shape, initial value), ...); shape items: "n", "memory" or ints
    per_step: tuple = ()  # (target, expression) pairs, once per update
    update: tuple = ()  # first order: (target, expression) pairs, per parameter
    call: tuple = ()  # newton / lbfgs: (helper name, (argument names...))
    helpers: str = ""  # module-level source (jitted functions) the step calls
    kind: str = "first_order"
    stochastic: bool = False  # needs minibatches (sgd)
    reference: str = ""
    default_maxiter: int = 1000
    extra: dict = field(default_factory=dict)  # structural settings (e.g. L-BFGS memory)

    def __post_init__(self):
        names = list(self.hyper) + [s[0] for s in self.state]
        for name in names:
            if not _NAME.match(name):
                raise OptimizeError(f"optimizer {self.name}: name {name!r} must be a plain lower-case word")
            if name in _RESERVED or keyword.iskeyword(name) or hasattr(builtins, name):
                raise OptimizeError(f"optimizer {self.name}: the name {name!r} is taken (the rules read "
                                    f"theta, g, lr and step); choose another")
        if len(set(names)) != len(names):
            raise OptimizeError(f"optimizer {self.name}: a hyperparameter and a state share a name ({names})")
        per_param = {s[0] for s in self.state if tuple(s[1]) == ("n",)}
        locals_: set = set()
        per_step = _rule(self.name, "per_step", self.per_step, {RATE, STEP, *self.hyper}, set(), locals_)
        update = _rule(self.name, "update", self.update, {PARAM, GRAD, RATE, STEP, *self.hyper, *per_param},
                       {PARAM, *per_param}, locals_)
        if self.kind == "first_order" and not any(t == slot(PARAM) for t, _ in update):
            raise OptimizeError(f"optimizer {self.name}: the update never assigns theta")
        object.__setattr__(self, "per_step", per_step)
        object.__setattr__(self, "update", update)
        if self.call:
            helper, args = self.call
            bad = [a for a in args if a not in CALL_ARGS and a not in names]
            if bad or not helper.isidentifier() or f"def {helper}(" not in self.helpers:
                raise OptimizeError(f"optimizer {self.name}: the step calls {helper}{tuple(args)}, which its "
                                    f"helpers do not define or whose arguments {bad} are not known")
            object.__setattr__(self, "call", (helper, tuple(args)))

    def dims(self, shape, n: str) -> list:
        """A state array's shape as code: ``n`` for the parameter count, the memory's size."""
        return [n if d == "n" else str(self.extra[d]) if d == "memory" else str(d) for d in shape]

    def state_arrays(self, n: str) -> list:
        """``(name, code)`` of each state array at its initial value, ``n`` the parameter count's
        code (what both loop generators allocate)."""
        return [(name, f"np.full(({', '.join(self.dims(shape, n))},), {float(init)!r})")
                for name, shape, init in self.state]

    @property
    def locals(self) -> list:
        """The names the rules assign besides theta and the state (in order)."""
        state = {s[0] for s in self.state}
        seen = []
        for target, _ in self.per_step + self.update:
            name = target.name
            if name != PARAM and name not in state and name not in seen:
                seen.append(name)
        return seen

    def structure(self) -> str:
        """What the compiled loop depends on: the rule, not the numbers."""
        found = self.__dict__.get("_structure")  # made once: every run looks its loop up by it
        if found is None:
            rules = [f"{t.name}={e}" for t, e in self.per_step + self.update]  # str: Dummies print by name
            found = "|".join(
                [self.kind, self.name, ",".join(self.hyper), ",".join(f"{s[0]}{s[1]}{s[2]}" for s in self.state),
                 *rules, repr(self.call), self.helpers, repr(sorted(self.extra.items()))]
            )
            object.__setattr__(self, "_structure", found)
        return found

    def with_lr(self, lr) -> "Optimizer":
        """The same optimizer with another default rate (validated like the original's)."""
        return replace(self, lr=_lr(self.name, lr, allow_auto=self.lr == "auto" or self.name == "gd"))

    def __repr__(self):
        args = ([f"lr={self.lr!r}"] if self.lr is not None else []) + [f"{k}={v!r}" for k, v in self.hyper.items()]
        args += [f"{k}={v!r}" for k, v in self.extra.items()]
        return f"cm.optim.{self.name}({', '.join(args)})"


def _lr(name: str, lr, allow_auto=False):
    if allow_auto and isinstance(lr, str) and lr == "auto":
        return "auto"
    return _real(name, "lr", lr, positive=True)


def _unit(name: str, what: str, value) -> float:
    v = _real(name, what, value)
    if not 0.0 <= v < 1.0:
        raise OptimizeError(f"{name} requires 0 <= {what} < 1, got {what}={value!r}")
    return v


# -- line-searched full-batch steps: helper source placed into the generated module ---------
# They call the module's full-batch ``_f(theta, cols, passes)``, ``_fg(theta, cols, g, passes)``
# (value, and gradient into g) and ``_hess(theta, cols, H, passes)``, which the generator writes
# from the cost; ``passes`` is the table of the passes calcml made on its threads (0: serial).

_NEWTON_HELPERS = '''
@_jit
def _cholesky(A, L, mu, floor):
    """L L^T = A + mu I (lower triangle of L); False when not positive definite, or when a
    pivot is at most floor (numerically singular: a step along that direction is noise)"""
    n = A.shape[0]
    for i in range(n):
        for j in range(i + 1):
            s = A[i, j] + (mu if i == j else 0.0)
            for k in range(j):
                s -= L[i, k] * L[j, k]
            if i == j:
                if not (s > floor):
                    return False
                L[i, i] = math.sqrt(s)
            else:
                L[i, j] = s / L[j, j]
    return True


@_jit
def _newton_step(theta, value, g, cols, passes, H, L, d, xt, c1):
    """One damped Newton step with Armijo backtracking; updates theta in place (not g).
    Returns (ok, new value, evaluations)"""
    n = theta.shape[0]
    _hess(theta, cols, H, passes)
    scale = 0.0
    finite = True
    for i in range(n):
        scale = max(scale, abs(H[i, i]))
        for j in range(n):
            finite = finite and abs(H[i, j]) < math.inf
    if not finite:
        # no Hessian here (a kink's DiracDelta, an overflow): a steepest-descent step
        for i in range(n):
            d[i] = -g[i]
    else:
        mu = 0.0
        tau = 1e-10 * max(1.0, scale)
        # smallest mu in {0, tau, 10 tau, ...} making H + mu I positive definite (N&W 3.4), its
        # pivots above 1e-12 max(1, |H_ii|): a Hessian singular to rounding (a direction the
        # cost does not change along) would send the step along that direction by its noise
        while not _cholesky(H, L, mu, 1e-12 * max(1.0, scale)):
            mu = tau if mu == 0.0 else 10.0 * mu
            if not (mu < 1e300):
                return False, value, 0
        # solve L L^T d = -g
        for i in range(n):
            s = -g[i]
            for k in range(i):
                s -= L[i, k] * d[k]
            d[i] = s / L[i, i]
        for i in range(n - 1, -1, -1):
            s = d[i]
            for k in range(i + 1, n):
                s -= L[k, i] * d[k]
            d[i] = s / L[i, i]
    slope = 0.0
    for i in range(n):
        slope += g[i] * d[i]
    alpha = 1.0
    for ls in range(60):
        for i in range(n):
            xt[i] = theta[i] + alpha * d[i]
        ft = _f(xt, cols, passes)
        if ft <= value + c1 * alpha * slope:
            for i in range(n):
                theta[i] = xt[i]
            return True, ft, ls + 1
        alpha *= 0.5
    return False, value, 60
'''

_LBFGS_HELPERS = '''
@_jit
def _phi(a, theta, d, xt, gt, cols, passes):
    """value and directional derivative at theta + a d (gradient left in gt)"""
    for i in range(theta.shape[0]):
        xt[i] = theta[i] + a * d[i]
    f = _fg(xt, cols, gt, passes)
    dphi = 0.0
    for i in range(theta.shape[0]):
        dphi += gt[i] * d[i]
    return f, dphi


@_jit
def _cubicmin(a, fa, da, b, fb, db):
    """minimizer of the cubic through (a, fa, da) and (b, fb, db) (N&W eq. 3.59); nan if none"""
    d1 = da + db - 3.0 * (fa - fb) / (a - b)
    s = d1 * d1 - da * db
    if not (s >= 0.0):
        return math.nan
    d2 = math.copysign(math.sqrt(s), b - a)
    den = db - da + 2.0 * d2
    if den == 0.0:
        return math.nan
    return b - (b - a) * (db + d2 - d1) / den


@_jit
def _wolfe(theta, f0, g, d, xt, gt, cols, passes, a1, c1, c2):
    """Strong Wolfe line search (N&W Alg. 3.5 / 3.6); returns (alpha, f, evaluations, ok)
    with xt, gt the point and gradient at alpha when ok"""
    dphi0 = 0.0
    for i in range(theta.shape[0]):
        dphi0 += g[i] * d[i]
    nfev = 0
    a_prev, f_prev, d_prev = 0.0, f0, dphi0
    a = a1
    lo, flo, dlo, hi, fhi, dhi = 0.0, f0, dphi0, 0.0, f0, dphi0
    bracketed = False
    # Near a minimum, the decrease c1 a g.d falls below the rounding of f: then accept the
    # approximate Wolfe conditions of Hager & Zhang (2005), which test slopes, not values.
    fuzz = 1e-10 * abs(f0)
    for it in range(40):
        fa, da = _phi(a, theta, d, xt, gt, cols, passes)
        nfev += 1
        if fa <= f0 + fuzz and c2 * dphi0 <= da <= (2.0 * c1 - 1.0) * dphi0:
            return a, fa, nfev, True
        if not (fa <= f0 + c1 * a * dphi0) or (it > 0 and fa >= f_prev):
            lo, flo, dlo, hi, fhi, dhi = a_prev, f_prev, d_prev, a, fa, da
            bracketed = True
            break
        if abs(da) <= -c2 * dphi0:
            return a, fa, nfev, True
        if da >= 0.0:
            lo, flo, dlo, hi, fhi, dhi = a, fa, da, a_prev, f_prev, d_prev
            bracketed = True
            break
        a_prev, f_prev, d_prev = a, fa, da
        a = 2.0 * a
    if bracketed:
        for k in range(40):
            delta = hi - lo
            c = _cubicmin(lo, flo, dlo, hi, fhi, dhi) if math.isfinite(fhi) else math.nan
            if not (math.isfinite(c) and min(lo, hi) + 0.1 * abs(delta) <= c <= max(lo, hi) - 0.1 * abs(delta)):
                c = lo + 0.5 * delta
            fc, dc = _phi(c, theta, d, xt, gt, cols, passes)
            nfev += 1
            if fc <= f0 + fuzz and c2 * dphi0 <= dc <= (2.0 * c1 - 1.0) * dphi0:
                return c, fc, nfev, True
            if not (fc <= f0 + c1 * c * dphi0) or fc >= flo:
                hi, fhi, dhi = c, fc, dc
            else:
                if abs(dc) <= -c2 * dphi0:
                    return c, fc, nfev, True
                if dc * (hi - lo) >= 0.0:
                    hi, fhi, dhi = lo, flo, dlo
                lo, flo, dlo = c, fc, dc
            if abs(hi - lo) <= 1e-15 * max(1.0, abs(lo)):
                break
    else:
        lo, flo = a_prev, f_prev
    # No strong-Wolfe point found: accept the best sufficient-decrease point, if any.
    if lo > 0.0 and flo < f0:
        fa, da = _phi(lo, theta, d, xt, gt, cols, passes)
        return lo, fa, nfev + 1, True
    return 0.0, f0, nfev, False


@_jit
def _lbfgs_step(theta, value, g, cols, passes, S, Y, rho, al, d, xt, gt, mem, c1, c2):
    """One L-BFGS step (two-loop recursion, N&W Alg. 7.4); updates theta, g in place.
    Returns (ok, new value, evaluations)"""
    n = theta.shape[0]
    m = S.shape[0]
    nfev = 0
    for attempt in range(2):
        count = int(mem[0])
        head = int(mem[1])
        for i in range(n):
            d[i] = g[i]
        for k in range(count):
            s = (head - k) % m
            a = 0.0
            for i in range(n):
                a += S[s, i] * d[i]
            a *= rho[s]
            al[s] = a
            for i in range(n):
                d[i] -= a * Y[s, i]
        gamma = 1.0
        if count > 0:
            sy = 0.0
            yy = 0.0
            for i in range(n):
                sy += S[head, i] * Y[head, i]
                yy += Y[head, i] * Y[head, i]
            gamma = sy / yy
        for i in range(n):
            d[i] *= gamma
        for k in range(count - 1, -1, -1):
            s = (head - k) % m
            b = 0.0
            for i in range(n):
                b += Y[s, i] * d[i]
            b *= rho[s]
            for i in range(n):
                d[i] += S[s, i] * (al[s] - b)
        slope = 0.0
        gnorm = 0.0
        for i in range(n):
            d[i] = -d[i]
            slope += g[i] * d[i]
            gnorm += g[i] * g[i]
        if not (slope < 0.0):  # not a descent direction: restart from steepest descent
            mem[0] = 0.0
            count = 0
            for i in range(n):
                d[i] = -g[i]
        a1 = 1.0 if count > 0 else min(1.0, 1.0 / math.sqrt(gnorm))
        alpha, fnew, nf, ok = _wolfe(theta, value, g, d, xt, gt, cols, passes, a1, c1, c2)
        nfev += nf
        if ok:
            sy = 0.0
            yy = 0.0
            for i in range(n):
                sy += (xt[i] - theta[i]) * (gt[i] - g[i])
                yy += (gt[i] - g[i]) * (gt[i] - g[i])
            # curvature relative to the pair's own size (L-BFGS-B's test, sy > eps y'y): an
            # absolute floor (it was 1e-12) drops every pair once steps are small, and the
            # method crawls (MGH Penalty II: 10,000 iterations short of scipy's 323)
            if sy > 2.220446049250313e-16 * yy:
                head = (int(mem[1]) + 1) % m
                for i in range(n):
                    S[head, i] = xt[i] - theta[i]
                    Y[head, i] = gt[i] - g[i]
                rho[head] = 1.0 / sy
                mem[1] = head
                mem[0] = min(int(mem[0]) + 1, m)
            for i in range(n):
                theta[i] = xt[i]
                g[i] = gt[i]
            return True, fnew, nfev
        if count == 0:
            break
        mem[0] = 0.0  # the memory misled the search: forget it and try steepest descent
    return False, value, nfev
'''


# The built-in rules' own symbols (named like their hyperparameters, state and values); the
# rate under another Python name, since the factories take a number called lr.
_rate = lr
_m, _v, _nu, _acc, _mhat, _vhat, _bc1, _bc2 = sp.symbols("m v nu acc mhat vhat bc1 bc2")
_momentum, _b1, _b2, _eps, _decay = sp.symbols("momentum b1 b2 eps decay")

_FACTORIES: dict = {}


def _register(fn):
    _FACTORIES[fn.__name__.replace("_", "-")] = fn
    return fn


@_register
def gd(lr=0.01):
    r"""Gradient descent on the full batch: :math:`\theta \leftarrow \theta - \eta\,\nabla J(\theta)`.

    ``lr="auto"`` picks :math:`\eta = 1/L` with :math:`L` a bound on the largest eigenvalue of
    the exact Hessian at ``x0`` (Gershgorin's circle theorem); the result's message says what
    it chose. Reference: Cauchy (1847); optax ``sgd`` without momentum.

    >>> import calcml as cm
    >>> a, b = cm.params("a b")
    >>> res = cm.minimize(cm.Cost((a - 1)**2 + (b + 2)**2, params=[a, b]), [0.0, 0.0], method=cm.optim.gd(lr=0.1))
    >>> res.x.round(6).tolist()
    [1.0, -2.0]
    """
    return Optimizer("gd", _lr("gd", lr, allow_auto=True), {}, update=((theta, theta - _rate * g),),
                     reference="Cauchy 1847; optax.sgd(momentum=None)")


@_register
def sgd(lr=0.01):
    r"""Stochastic gradient descent on minibatches: :math:`\theta \leftarrow \theta - \eta\,g_B`,
    :math:`g_B` the gradient of the cost over one minibatch of a per-epoch shuffle. Needs data
    and ``batch_size`` (default 32). Reference: Robbins & Monro (1951); optax ``sgd``.

    >>> import calcml as cm, numpy as np
    >>> w = cm.params("w"); x, y = cm.data("x y")
    >>> D = {"x": np.linspace(-1, 1, 200), "y": 3 * np.linspace(-1, 1, 200)}
    >>> res = cm.minimize(cm.Cost((w*x - y)**2, params=[w], data=[x, y]), [0.0], data=D, method="sgd", lr=0.1, batch_size=20, epochs=20)
    >>> round(res.params["w"], 4)
    3.0
    """
    return Optimizer("sgd", _lr("sgd", lr), {}, update=((theta, theta - _rate * g),), stochastic=True,
                     reference="Robbins & Monro 1951; optax.sgd")


@_register
def momentum(lr=0.01, momentum=0.9):
    r"""Heavy-ball momentum (Polyak 1964), in the form of optax ``sgd(momentum=...)`` and PyTorch:

    .. math:: m \leftarrow \beta m + g, \qquad \theta \leftarrow \theta - \eta\, m

    >>> import calcml as cm
    >>> cm.optim.momentum(lr=0.01, momentum=0.9).hyper
    {'momentum': 0.9}
    """
    return Optimizer(
        "momentum", _lr("momentum", lr), {"momentum": _unit("momentum", "momentum", momentum)},
        state=(("m", ("n",), 0.0),),
        update=((_m, _momentum * _m + g), (theta, theta - _rate * _m)),
        reference="Polyak 1964; optax.sgd(momentum=b) (trace), torch.optim.SGD",
    )


@_register
def nesterov(lr=0.01, momentum=0.9):
    r"""Nesterov accelerated gradient (Nesterov 1983) in the form of Sutskever et al. (2013),
    as optax ``sgd(momentum=..., nesterov=True)`` and PyTorch write it:

    .. math:: m \leftarrow \beta m + g, \qquad \theta \leftarrow \theta - \eta\,(g + \beta m)

    >>> import calcml as cm
    >>> cm.optim.nesterov(lr=0.01, momentum=0.9)
    cm.optim.nesterov(lr=0.01, momentum=0.9)
    """
    return Optimizer(
        "nesterov", _lr("nesterov", lr), {"momentum": _unit("nesterov", "momentum", momentum)},
        state=(("m", ("n",), 0.0),),
        update=((_m, _momentum * _m + g), (theta, theta - _rate * (g + _momentum * _m))),
        reference="Nesterov 1983; Sutskever et al. 2013; optax.sgd(nesterov=True)",
    )


@_register
def adam(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    r"""Adam (Kingma & Ba 2015, Algorithm 1; optax ``adam`` with ``eps_root=0``), step
    :math:`t` counted from 0:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2, \\
        \theta \leftarrow \theta - \eta\, \frac{m / (1-\beta_1^{t+1})}{\sqrt{v / (1-\beta_2^{t+1})} + \epsilon}

    >>> import calcml as cm
    >>> cm.optim.adam(lr=1e-3, b1=0.9, b2=0.999).hyper["eps"]
    1e-08
    """
    return Optimizer(
        "adam", _lr("adam", lr),
        {"b1": _unit("adam", "b1", b1), "b2": _unit("adam", "b2", b2), "eps": _real("adam", "eps", eps, positive=True)},
        state=(("m", ("n",), 0.0), ("v", ("n",), 0.0)),
        per_step=((_bc1, 1 - _b1 ** (step + 1)), (_bc2, 1 - _b2 ** (step + 1))),
        update=(
            (_m, _b1 * _m + (1 - _b1) * g),
            (_v, _b2 * _v + (1 - _b2) * g**2),
            (_mhat, _m / _bc1),  # the bias-corrected moments, each a division of its own
            (_vhat, _v / _bc2),
            (theta, theta - _rate * _mhat / (sp.sqrt(_vhat) + _eps)),
        ),
        reference="Kingma & Ba 2015, Algorithm 1; optax.adam",
    )


@_register
def rmsprop(lr=0.01, decay=0.9, eps=1e-8):
    r"""RMSProp (Tieleman & Hinton 2012, lecture 6.5), in the form of PyTorch ``RMSprop`` and
    Keras (``eps`` outside the root):

    .. math:: \nu \leftarrow \rho \nu + (1-\rho) g^2, \qquad \theta \leftarrow \theta - \eta\, \frac{g}{\sqrt{\nu} + \epsilon}

    >>> import calcml as cm
    >>> cm.optim.rmsprop(lr=0.01).hyper
    {'decay': 0.9, 'eps': 1e-08}
    """
    return Optimizer(
        "rmsprop", _lr("rmsprop", lr),
        {"decay": _unit("rmsprop", "decay", decay), "eps": _real("rmsprop", "eps", eps, positive=True)},
        state=(("nu", ("n",), 0.0),),
        update=(
            (_nu, _decay * _nu + (1 - _decay) * g**2),
            (theta, theta - _rate * g / (sp.sqrt(_nu) + _eps)),
        ),
        reference="Tieleman & Hinton 2012; torch.optim.RMSprop",
    )


@_register
def adagrad(lr=0.01, eps=1e-10):
    r"""AdaGrad (Duchi, Hazan & Singer 2011), in the form of PyTorch ``Adagrad`` (accumulator from 0):

    .. math:: a \leftarrow a + g^2, \qquad \theta \leftarrow \theta - \eta\, \frac{g}{\sqrt{a} + \epsilon}

    >>> import calcml as cm
    >>> cm.optim.adagrad(lr=0.1).hyper
    {'eps': 1e-10}
    """
    return Optimizer(
        "adagrad", _lr("adagrad", lr), {"eps": _real("adagrad", "eps", eps, positive=True)},
        state=(("acc", ("n",), 0.0),),
        update=((_acc, _acc + g**2), (theta, theta - _rate * g / (sp.sqrt(_acc) + _eps))),
        reference="Duchi, Hazan & Singer 2011; torch.optim.Adagrad",
    )


@_register
def newton(c1=1e-4):
    r"""Damped Newton's method with the exact Hessian and a backtracking (Armijo) line search
    (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Algorithm 3.2 with the modified
    Hessian of section 3.4): solve :math:`(H + \mu I)\,d = -g` by Cholesky with the smallest
    :math:`\mu \in \{0, \tau, 10\tau, \dots\}` that makes the matrix positive definite, then halve
    :math:`\alpha` from 1 until :math:`J(\theta + \alpha d) \le J(\theta) + c_1 \alpha\, g^\top d`.
    Full batch only.

    >>> import calcml as cm
    >>> a, b = cm.params("a b")
    >>> res = cm.minimize(cm.Cost((1 - a)**2 + 100*(b - a**2)**2, params=[a, b]), [-1.2, 1.0], method="newton")
    >>> res.success, res.x.round(8).tolist()
    (True, [1.0, 1.0])
    """
    c1 = _real("newton", "c1", c1, positive=True)
    if c1 >= 0.5:
        raise OptimizeError(f"newton requires 0 < c1 < 0.5, got c1={c1!r}")
    return Optimizer(
        "newton", None, {"c1": c1}, kind="newton", default_maxiter=200,
        state=(("hmat", ("n", "n"), 0.0), ("lmat", ("n", "n"), 0.0), ("d", ("n",), 0.0), ("xt", ("n",), 0.0)),
        call=("_newton_step", ("theta", "value", "g", "cols", "passes", "hmat", "lmat", "d", "xt", "c1")),
        helpers=_NEWTON_HELPERS,
                     reference="Nocedal & Wright 2006, Alg. 3.2 and section 3.4")


@_register
def lbfgs(memory=10, c1=1e-4, c2=0.9):
    r"""Limited-memory BFGS (Liu & Nocedal 1989; Nocedal & Wright Algorithm 7.4, two-loop
    recursion) with a line search satisfying the strong Wolfe conditions (Algorithms 3.5/3.6,
    cubic interpolation in the zoom): :math:`J(\theta+\alpha d) \le J + c_1\alpha g^\top d` and
    :math:`|\nabla J(\theta+\alpha d)^\top d| \le c_2 |g^\top d|`; near the minimum, where the
    decrease is below the rounding of :math:`J`, the approximate Wolfe conditions of Hager & Zhang
    (2005) (slopes only). Full batch only.

    >>> import calcml as cm
    >>> a, b = cm.params("a b")
    >>> res = cm.minimize(cm.Cost((1 - a)**2 + 100*(b - a**2)**2, params=[a, b]), [-1.2, 1.0], method="lbfgs")
    >>> res.success, res.x.round(6).tolist()
    (True, [1.0, 1.0])
    """
    if isinstance(memory, bool) or not isinstance(memory, numbers.Integral) or memory < 1:
        raise OptimizeError(f"lbfgs requires a positive integer memory, got memory={memory!r}")
    c1 = _real("lbfgs", "c1", c1, positive=True)
    c2 = _real("lbfgs", "c2", c2, positive=True)
    if not c1 < c2 < 1.0:
        raise OptimizeError(f"lbfgs requires 0 < c1 < c2 < 1, got c1={c1!r}, c2={c2!r}")
    return Optimizer(
        "lbfgs", None, {"c1": c1, "c2": c2}, kind="lbfgs", default_maxiter=1000,
        state=(
            ("s", ("memory", "n"), 0.0), ("y", ("memory", "n"), 0.0), ("rho", ("memory",), 0.0),
            ("al", ("memory",), 0.0), ("d", ("n",), 0.0), ("xt", ("n",), 0.0), ("gt", ("n",), 0.0), ("mem", (2,), 0.0),
        ),
        call=("_lbfgs_step", ("theta", "value", "g", "cols", "passes", "s", "y", "rho", "al", "d", "xt", "gt", "mem", "c1", "c2")),
        helpers=_LBFGS_HELPERS,
                     extra={"memory": int(memory)},
                     reference="Liu & Nocedal 1989; Nocedal & Wright 2006, Alg. 7.4, 3.5, 3.6")


@_register
def newton_cg():
    r"""Trust-region Newton with conjugate gradients (TRON: Lin & Moré 1999; the trust-region
    Newton method of liblinear and of scikit-learn's ``newton-cg`` family): each step solves
    :math:`\min_s g^\top s + \tfrac12 s^\top H s` subject to :math:`\|s\| \le \Delta` by
    conjugate gradients on exact Hessian-vector products (Steihaug 1983), never forming the
    Hessian; :math:`\Delta` grows or shrinks with the ratio of actual to predicted decrease.
    Full batch only.

    >>> import calcml as cm
    >>> a, b = cm.params("a b")
    >>> res = cm.minimize(cm.Cost((1 - a)**2 + 100*(b - a**2)**2, params=[a, b]), [-1.2, 1.0], method="newton-cg")
    >>> res.success, res.x.round(6).tolist()
    (True, [1.0, 1.0])
    """
    return Optimizer("newton-cg", None, {}, kind="newton-cg", default_maxiter=500,
                     reference="Lin & Moré 1999 (TRON); Steihaug 1983; liblinear's tron.cpp")


def _check_searched_step(name: str, lr):
    """Newton, L-BFGS and newton-cg search their own step, starting from the full step 1:
    ``lr=1`` says just that and is accepted; any other rate is refused, saying why."""
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr == 1:
        return
    raise OptimizeError(f"{name} chooses its own step by a line search (or trust region), starting from the "
                        f"full step 1; it takes no other lr (got lr={lr!r}): leave lr out")


# The registry of method names (scipy's idea: a table, not an if/elif chain).
METHODS = dict(_FACTORIES)


def get(method, lr=None) -> Optimizer:
    """An optimizer from a name (with ``lr``, else its default rate) or an optimizer object.

    A name takes the usual defaults; an object keeps its own settings, and ``lr`` (when not
    None) replaces its rate.
    """
    if isinstance(method, Optimizer):
        opt = method
        if lr is not None:
            if opt.lr is None:
                _check_searched_step(opt.name, lr)
                return opt
            opt = opt.with_lr(lr)
        return opt
    if not isinstance(method, str):
        raise OptimizeError(f"method must be a name or an optimizer from cm.optim, got {method!r}")
    factory = METHODS.get(method)
    memo = (method, factory, type(lr), lr)
    try:
        found = _BY_NAME.get(memo)
    except TypeError:  # an unhashable lr: refused below
        memo = found = None
    if found is not None:
        return found
    if factory is None:
        raise OptimizeError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    opt = factory()
    if lr is not None:
        if opt.lr is None:
            _check_searched_step(method, lr)
        else:
            opt = opt.with_lr(lr)
    if memo is not None and len(_BY_NAME) < 256:
        _BY_NAME[memo] = opt
    return opt


# (name, factory, type of lr, lr) -> the optimizer get() made: optimizers are immutable, and a call of
# cm.minimize looks its method up every time
_BY_NAME: dict = {}


