"""The result of a run: scipy's field names, and one table from status code to message.

Not converging is a result, not an exception (``scipy/optimize/_optimize.py``): ``success``
says whether the run found a minimum, ``status`` is a code from :data:`STATUS`, and
``message`` says in words what happened and, for a divergence, where and what to try.

A minimum is found when the full gradient's norm is at most ``tol`` (CONVERGED) or, for a cost
over data rows, within the gradient's own sampling noise (WITHIN_NOISE: see
:func:`gradient_noise`). A run that spends its budget (iterations or epochs) short of both is
no success, however many epochs it completed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["OptimizeResult", "STATUS", "CONVERGED", "MAXITER", "EPOCHS_DONE", "DIVERGED", "INTERRUPTED", "LINE_SEARCH_FAILED",
           "NO_MINIMUM", "WITHIN_NOISE", "gradient_noise"]

# The codes the generated loop returns (the same numbers are written into every generated module).
CONVERGED = 0
MAXITER = 1
EPOCHS_DONE = 2
DIVERGED = 3
INTERRUPTED = 4
LINE_SEARCH_FAILED = 5
NO_MINIMUM = 6  # set after a run (see unbounded), never by a generated loop
WITHIN_NOISE = 7  # set after a run that spent its budget (see within_noise), never by a loop

# The codes a generated loop returns under the names it uses for them (RUNNING: not yet ended).
LOOP_STATUSES = {"RUNNING": -1, "CONVERGED": CONVERGED, "MAXITER": MAXITER, "EPOCHS_DONE": EPOCHS_DONE,
                 "DIVERGED": DIVERGED, "INTERRUPTED": INTERRUPTED, "LINE_SEARCH_FAILED": LINE_SEARCH_FAILED}


def status_statements(with_names: bool = False) -> list:
    """The loop's codes as statements of a generated module (:mod:`calcml.ir`); ``with_names``:
    and ``STATUS_NAMES``, code -> readable name, for a module's own report."""
    from . import ir

    out = [ir.Assign(name, code) for name, code in LOOP_STATUSES.items()]
    if with_names:
        out.append(ir.Assign("STATUS_NAMES", repr({c: n.lower().replace("_", " ") for n, c in LOOP_STATUSES.items()})))
    return out


# status -> (success, message template). Templates may use the fields of ``_message``.
STATUS = {
    CONVERGED: (True, "Converged: the gradient norm {grad_norm:.3g} is at most tol={tol:g} after {nit} iterations."),
    MAXITER: (False, "Maximum number of iterations reached ({nit}) before the gradient norm ({grad_norm:.3g}) fell "
                     "to tol={tol:g}{noise_or}: not yet at a minimum."),
    EPOCHS_DONE: (False, "Completed {epochs} epoch{epochs_s} ({nit} update{nit_s}) with the gradient norm ({grad_norm:.3g}) above "
                         "tol={tol:g}{noise_and}: not yet at a minimum. {minibatch_advice}"),
    WITHIN_NOISE: (
        True,
        "The gradient norm {grad_norm:.3g} is within its sampling noise after {nit} updates: the standard error "
        "of the gradient as an estimate from the {n_rows} rows is {noise:.3g}, so x is the minimum to the precision "
        "that the data determine it (tol={tol:g} was not reached; {further}).",
    ),
    DIVERGED: (
        False,
        "Diverged at iteration {diverged_at}: the cost or the parameters became non-finite or blew up "
        "(beyond {blowup:.3g}). Returned the best point seen (iteration {best_step}, cost {best_value:.6g}). "
        "Try a smaller learning rate{rate_hint}.",
    ),
    INTERRUPTED: (False, "Interrupted (Ctrl-C) after {nit} iterations; returned the best point seen (iteration {best_step}, cost {best_value:.6g})."),
    NO_MINIMUM: (
        False,
        "The gradient norm fell to {grad_norm:.3g} (tol={tol:g}) after {nit} iterations, but this is no "
        "minimum: the cost keeps decreasing beyond it, along the way the run came (the parameters reached "
        "{size:.3g} in magnitude). The cost may have no finite minimum (for a classifier: classes that a "
        "hyperplane separates); a penalty (penalty=) gives it one.",
    ),
    LINE_SEARCH_FAILED: (
        False,
        "The line search found no point that decreases the cost at iteration {nit} (gradient norm {grad_norm:.3g}); "
        "the point is as close to a minimum as this precision allows, or the cost is not smooth there.",
    ),
}


def unbounded(status: int, x, x0, fun, value) -> int:
    """The status of a run whose stop test was met: NO_MINIMUM when it ended far from its start
    (by more than 10 times max(1, the start's size)) and the cost still decreases further along
    the way it came, f(x + (x - x0)) < f(x): the gradient vanished without a minimum there, as
    the logistic loss's does on separable classes. ``value``: the cost at a point (called only
    then). Else ``status``."""
    if status != CONVERGED or not len(x):
        return status
    d = x - x0
    if not float(np.max(np.abs(d))) > 10.0 * max(1.0, float(np.max(np.abs(x0)))):
        return status
    try:
        further = value(x + d)
    except (ArithmeticError, ValueError):
        return status
    return NO_MINIMUM if further < fun else status


# Costs with at most this many parameters record the iterates beside the history entries
# (OptimizeResult.path: what plot_path draws).
PATH_MAX_PARAMS = 2
# A full-batch history keeps at most about this many entries: every k-th iteration's beyond
# (OptimizeResult.history_every), and always the last one.
HISTORY_MAX = 10_000


def start_error(fun: float, grad, names) -> str | None:
    """What is wrong at x0 when a run stopped there (cost or gradient not finite), or None: the
    message of the ParamError that calcml raises instead of calling the run diverged (a smaller
    rate cannot help). ``names``: the parameters' names, in x order."""
    if not math.isfinite(fun):
        return f"the cost at x0 is {fun}: start from a point where it is finite"
    g = np.asarray(grad, dtype=float).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(g))
    if not bad.size:
        return None
    shown = ", ".join(f"{names[i]} ({g[i]})" for i in bad[:6]) + (f" and {bad.size - 6} more" if bad.size > 6 else "")
    return (f"the gradient at x0 is not finite in {shown}: the cost has no derivative there (a kink, sqrt or abs of 0, "
            f"or an overflow); start from another point")


# Rows drawn (with a fixed seed) to estimate the spread of the per-row gradients: the standard
# error of a variance estimated from m draws is about sqrt(2/m) of it, 9% at 256.
NOISE_SAMPLE = 256


def gradient_noise(row_gradient, n_rows: int, reduce_mean: bool, sample: int = NOISE_SAMPLE, rows=None) -> float:
    """The standard error of the full gradient as the mean (or sum) of ``n_rows`` per-row
    gradients: sqrt(tr C / N) for a mean, sqrt(N tr C) for a sum, where tr C is the per-row
    gradients' total variance, estimated from min(N, ``sample``) rows drawn with a fixed seed.
    ``row_gradient(i)``: the gradient of row i's term (plus any constant, such as a penalty's
    gradient, which the spread ignores); or ``rows(indices)``: those rows' gradients at once, a
    matrix (row_gradient then unused). NaN with fewer than 2 rows.

    A full gradient smaller than this is as small as the data can tell from zero: the
    distance to the exact minimum of the empirical cost is then within the statistical
    uncertainty of that minimum itself (its standard error, in the Hessian's metric)."""
    if n_rows < 2:
        return float("nan")
    if n_rows <= sample:
        chosen = np.arange(n_rows)
    else:
        chosen = np.sort(np.random.default_rng(0).choice(n_rows, size=sample, replace=False))
    G = rows(chosen) if rows is not None else np.array([row_gradient(int(i)) for i in chosen])
    spread = float(np.sum((G - G.mean(axis=0)) ** 2)) / (len(chosen) - 1)
    return float(np.sqrt(spread / n_rows if reduce_mean else spread * n_rows))


def within_noise(status: int, grad_norm: float, noise, nit: int | None = None) -> tuple:
    """(status, noise level or None): WITHIN_NOISE for a run that spent its budget (MAXITER,
    EPOCHS_DONE) with its full gradient no larger than ``noise()`` (a callable, or None for a
    cost without data: estimated only when needed); else ``status`` unchanged."""
    if status not in (MAXITER, EPOCHS_DONE) or noise is None or not grad_norm < float("inf") or nit == 0:
        return status, None  # (a run of no updates left x0 as it was: no success to report)
    level = noise()
    return (WITHIN_NOISE if grad_norm <= level else status), level


def message(status: int, **fields) -> tuple:
    """(success, message) for a status code, filled from ``fields`` (``method``, the method's
    name, and ``decaying``, whether a schedule that decays ran, choose the advice given)."""
    success, template = STATUS[status]
    if status == NO_MINIMUM and "size" not in fields:
        fields["size"] = float(np.max(np.abs(fields["x"]))) if "x" in fields else float("nan")
    noise = fields.get("noise")
    fields.setdefault("n_rows", 0)
    fields["epochs_s"] = "" if fields.get("epochs") == 1 else "s"
    fields["nit_s"] = "" if fields.get("nit") == 1 else "s"
    # advice that does not name what the run already did
    searched = fields.get("method") in ("lbfgs", "newton", "newton-cg")
    fields["further"] = "more iterations go further than the data determine" if searched else "lbfgs or newton go further"
    fields["minibatch_advice"] = (
        "Minibatch steps keep moving by their own noise: a schedule that decays faster, a smaller rate, or a "
        "full-batch method goes closer." if fields.get("decaying") else
        "Minibatch steps at a constant rate keep moving by their own noise: a decaying schedule "
        "(cm.schedules.inverse_time) or a smaller rate goes closer, or a full-batch method.")
    known = noise is not None and noise == noise
    fields["noise_or"] = f" or to its sampling noise ({noise:.3g})" if known else ""
    fields["noise_and"] = f" and above its sampling noise ({noise:.3g})" if known else ""
    return success, template.format(**fields)


@dataclass
class OptimizeResult:
    """The outcome of :func:`calcml.minimize` or ``Program.run``.

    ``x`` (array, ``cost.params`` order), ``params`` (name -> float), ``fun`` (the full cost
    at ``x``), ``grad_norm`` (Euclidean norm of the full gradient at ``x``), ``jac`` (that
    gradient), ``nit`` (optimizer updates), ``nfev`` (cost evaluations by line searches, 0 for
    first-order methods), ``success``, ``status``, ``message``, ``history`` (full batch: the
    cost at each iterate, x0's first and the last one's last, so ``history[-1] == fun`` unless
    the run diverged or was stopped; minibatch runs: per epoch, the mean of its minibatch costs
    weighted by their rows, and the same for an unfinished last epoch), ``history_every``
    (full batch: the history holds every k-th iterate's cost and the last one's, k = 1 up to
    10,000 iterations), ``method``, ``lr`` (the rate used, when one: None for a method without
    one or a schedule whose rate changes), ``notes`` (choices made for the user, e.g. by
    ``lr="auto"``), ``path`` (a cost of at most two parameters, a tensor's entries counted: the
    iterates beside ``history``, what :func:`calcml.plot_path` draws; else None),
    ``minibatch`` (whether the run took minibatches); ``history_steps`` numbers the history's
    entries.
    """

    x: np.ndarray
    params: dict
    fun: float
    grad_norm: float
    jac: np.ndarray
    nit: int
    nfev: int
    success: bool
    status: int
    message: str
    history: np.ndarray
    history_every: int = 1
    method: str = ""
    lr: object = None
    notes: list = field(default_factory=list)
    # two-parameter costs: the iterates beside ``history`` (full batch: the point whose cost
    # is history[i]; minibatch: the parameters at the end of each epoch); else None
    path: np.ndarray | None = None
    minibatch: bool = False  # a minibatch run: its history holds one cost per epoch

    @property
    def history_steps(self) -> np.ndarray:
        """What each ``history`` entry belongs to: full batch, its iteration (0 for x0, every
        ``history_every``-th, and ``nit`` for the last iterate of a run that was not stopped by a
        divergence or Ctrl-C); minibatch, its epoch, from 1 (an unfinished last one counts)."""
        n = len(self.history)
        if self.minibatch:
            return np.arange(1, n + 1)
        steps = np.arange(n) * max(1, int(self.history_every))
        if n and self.status not in (DIVERGED, INTERRUPTED):
            steps[-1] = self.nit
        return steps

    # -- calcml's own runs: the message and params written on first use ------------------------
    @classmethod
    def _lazy(cls, fields: dict, names: tuple, finish):
        """A result from ``fields`` whose ``params`` (``names`` -> floats of ``x``) and the
        fields that ``finish()`` returns (a dict: ``message``, and ``status`` and ``success``
        where they are not in ``fields``) are made when first read: formatting a message, or
        estimating the gradient's noise for a run that spent its budget, costs more than the
        rest of a short run."""
        self = cls.__new__(cls)
        fields["_pending"] = (names, finish)
        self.__dict__ = fields
        return self

    def __getattr__(self, name):  # only for attributes not in __dict__: the pending ones
        pending = self.__dict__.get("_pending")
        if pending is None or name not in ("message", "params", "status", "success"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self._settle()
        return self.__dict__[name]

    def _settle(self):
        pending = self.__dict__.pop("_pending", None)
        if pending is not None:
            names, finish = pending
            self.__dict__["params"] = dict(zip(names, self.x.tolist()))
            self.__dict__.update(finish())

    def __getstate__(self):  # pickle and copy: the fields, all of them made
        self._settle()
        return self.__dict__

    def __repr__(self):
        lines = [
            f"  message: {self.message}",
            f"  success: {self.success}",
            f"   status: {self.status}",
            f"      fun: {self.fun!r}",
            f"        x: {np.array2string(self.x, precision=8)}",
            f"grad_norm: {self.grad_norm!r}",
            f"      nit: {self.nit}",
            f"   method: {self.method}",
        ]
        for note in self.notes:
            lines.append(f"     note: {note}")
        return "OptimizeResult(\n" + "\n".join(lines) + "\n)"

    def plot(self, ax=None):
        """The cost history (matplotlib; log scale when the costs are positive); see
        :func:`calcml.plot.plot_history`. A clear error says how to install matplotlib."""
        from .plot import plot_history

        return plot_history(self, ax)
