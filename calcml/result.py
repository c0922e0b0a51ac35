"""The result of a run: scipy's field names, and one table from status code to message.

Not converging is a result, not an exception (``scipy/optimize/_optimize.py``): ``success``
says whether the run reached what it was asked for, ``status`` is a code from
:data:`STATUS`, and ``message`` says in words what happened and, for a divergence, where and
what to try.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["OptimizeResult", "STATUS", "CONVERGED", "MAXITER", "EPOCHS_DONE", "DIVERGED", "INTERRUPTED", "LINE_SEARCH_FAILED",
           "NO_MINIMUM"]

# The codes the generated loop returns (the same numbers are written into every generated module).
CONVERGED = 0
MAXITER = 1
EPOCHS_DONE = 2
DIVERGED = 3
INTERRUPTED = 4
LINE_SEARCH_FAILED = 5
NO_MINIMUM = 6  # set after a run (see unbounded), never by a generated loop

# status -> (success, message template). Templates may use the fields of ``_message``.
STATUS = {
    CONVERGED: (True, "Converged: the gradient norm {grad_norm:.3g} is at most tol={tol:g} after {nit} iterations."),
    MAXITER: (False, "Maximum number of iterations reached ({nit}) before the gradient norm fell to tol={tol:g}."),
    EPOCHS_DONE: (True, "Completed {epochs} epochs ({nit} updates)."),
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


def message(status: int, **fields) -> tuple:
    """(success, message) for a status code, filled from ``fields``."""
    success, template = STATUS[status]
    if status == NO_MINIMUM and "size" not in fields:
        fields["size"] = float(np.max(np.abs(fields["x"]))) if "x" in fields else float("nan")
    return success, template.format(**fields)


@dataclass
class OptimizeResult:
    """The outcome of :func:`calcml.minimize` or ``Program.run``.

    ``x`` (array, ``cost.params`` order), ``params`` (name -> float), ``fun`` (the full cost
    at ``x``), ``grad_norm`` (Euclidean norm of the full gradient at ``x``), ``jac`` (that
    gradient), ``nit`` (optimizer updates), ``nfev`` (cost evaluations by line searches, 0 for
    first-order methods), ``success``, ``status``, ``message``, ``history`` (the cost per
    iteration, or per epoch for minibatch runs: the mean of the epoch's minibatch costs),
    ``history_every`` (full batch: the history holds every k-th iteration's cost, k = 1 up to
    10,000 iterations), ``method``, ``lr`` (the rate used, when one), ``notes`` (choices made
    for the user, e.g. by ``lr="auto"``).
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

    # -- calcml's own runs: the message and params written on first use ------------------------
    @classmethod
    def _lazy(cls, fields: dict, names: tuple, message):
        """A result from ``fields`` (every field but ``message`` and ``params``) whose
        ``message`` (``message()``, a str) and ``params`` (``names`` -> floats of ``x``) are
        made when first read: formatting them costs more than the rest of a short run."""
        self = cls.__new__(cls)
        fields["_pending"] = (names, message)
        self.__dict__ = fields
        return self

    def __getattr__(self, name):  # only for attributes not in __dict__: the pending ones
        pending = self.__dict__.get("_pending")
        if pending is None or name not in ("message", "params"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self._settle()
        return self.__dict__[name]

    def _settle(self):
        pending = self.__dict__.pop("_pending", None)
        if pending is not None:
            names, message = pending
            self.__dict__["params"] = dict(zip(names, self.x.tolist()))
            self.__dict__["message"] = message()

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
