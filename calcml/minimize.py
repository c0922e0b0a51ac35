"""``cm.minimize`` and ``cm.generate``: validate the method's choices, pick the program.

``generate`` resolves the method, rate, schedule and batching into a program: the scalar
path's (:mod:`calcml.program`, whose module :mod:`calcml.loop` generates) or the tensor
path's (:mod:`calcml.tensor.optimize`); ``minimize`` runs it (``Program.run``: the inputs
checked, the compiled loop driven in segments of steps, the result reported).
"""

from __future__ import annotations

import numbers
from functools import partial

from . import optim as _optim
from . import result as _result
from .cost import Cost
from .tensor.statement import is_tensor_cost
from .errors import OptimizeError
from . import loop as _loop
from .program import Program, program_for
from .schedules import Schedule, as_schedule, constant
from .tensor.front import lifted as _lifted, tensor_program as _tensor_program

__all__ = ["minimize", "generate"]

# sgd without a batch size takes minibatches of this many rows (Keras' default).
SGD_DEFAULT_BATCH = 32


def _check_cost(cost):
    if not isinstance(cost, Cost):
        raise TypeError(f"expected a cm.Cost, got {type(cost).__name__}")


def _resolve(cost: Cost, method, lr, schedule, batch_size):
    """(optimizer, schedule or None, batch size or None), all validated."""
    opt = _optim.get(method, lr)
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise OptimizeError(f"batch_size must be a positive integer or None, got batch_size={batch_size!r}")
        batch_size = int(batch_size)
    if opt.stochastic and not cost.data:
        raise OptimizeError(
            f"{opt.name} is a stochastic method: it draws minibatches of data rows, but this cost has no data "
            f"columns. Use method='gd' (or another full-batch method) for a plain function of the parameters"
        )
    if batch_size is not None and not cost.data:
        raise OptimizeError(
            f"batch_size={batch_size} needs data rows to draw minibatches from, but this cost has no data "
            "columns; leave batch_size=None"
        )
    if opt.kind != "first_order":
        if batch_size is not None:
            raise OptimizeError(f"{opt.name} works on the full batch; leave batch_size=None (got batch_size={batch_size})")
        if schedule is not None:
            raise OptimizeError(f"{opt.name} chooses its step by a line search; it takes no schedule (got {schedule!r})")
        return opt, None, None
    if opt.stochastic and batch_size is None:
        batch_size = SGD_DEFAULT_BATCH
    if opt.lr == "auto" and schedule is not None:
        raise OptimizeError("lr='auto' picks a constant rate; with a schedule, the schedule sets the rate (give one or the other)")
    if schedule is not None and not isinstance(schedule, Schedule):
        as_schedule(schedule, None)  # raises the error naming the accepted kinds
    sched = schedule if schedule is not None else constant(1.0 if opt.lr == "auto" else opt.lr)
    return opt, sched, batch_size


def generate(cost: Cost, method="gd", schedule=None, batch_size=None, lr=None) -> Program:
    """A compiled optimizer for ``cost``: ``prog.run(x0, data, epochs=..., seed=...)``,
    ``prog.source`` (the generated module), ``prog.export(path)`` (a standalone module).

    ``method`` is a name or an object from :mod:`calcml.optim`; ``schedule`` an object from
    :mod:`calcml.schedules` (default: the optimizer's constant rate); ``batch_size=None`` for
    full-batch steps, an integer for minibatches of a per-epoch shuffle.

    >>> import calcml as cm, numpy as np
    >>> w, b = cm.params("w b"); x, y = cm.data("x y")
    >>> cost = cm.Cost((w*x + b - y)**2, params=[w, b], data=[x, y])
    >>> prog = cm.generate(cost, method="adam", lr=0.05, batch_size=16)
    >>> D = {"x": np.linspace(0, 1, 64), "y": 2 * np.linspace(0, 1, 64) + 1}
    >>> res = prog.run([0.0, 0.0], D, epochs=200, seed=0)
    >>> res.x.round(2).tolist()
    [2.0, 1.0]
    """
    _check_cost(cost)
    opt, sched, batch = _resolve(cost, method, lr, schedule, batch_size)
    if is_tensor_cost(cost) or opt.kind == "newton-cg" or _lifted(cost) is not None:
        return _tensor_program(cost, opt, sched, batch, batch_size)
    prog = program_for(cost, opt, sched, batch)
    prog.notes_batch_default = batch_size is None and batch is not None
    # the fits over Dask data its loop does not run (minibatches: chunk by chunk) run on the tensor path
    prog.tensor_twin = partial(_tensor_program, cost, opt, sched, batch, batch_size)
    return prog


def minimize(cost: Cost, x0, data=None, method="gd", lr=None, schedule=None, batch_size=None, epochs=None,
             maxiter=None, tol=1e-8, seed=0, progress=False) -> _result.OptimizeResult:
    """Minimize ``cost`` from ``x0`` with a compiled descent loop.

    ``method``: ``"gd"``, ``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adam"``, ``"rmsprop"``,
    ``"adagrad"``, ``"newton"``, ``"lbfgs"`` or an object from :mod:`calcml.optim`; ``lr`` the
    rate (default: the method's; ``"auto"`` for gd picks ``1/L``, ``L`` a bound on the exact
    Hessian's largest eigenvalue at ``x0``). ``schedule`` replaces ``lr``. ``x0``: array in
    ``cost.params`` order or dict ``{name: value}``. ``batch_size``: None (full batch) or
    minibatch rows, drawn from a per-epoch shuffle seeded by ``seed``. Budget: ``maxiter``
    updates, or ``epochs`` (minibatch passes; for full-batch runs the same as ``maxiter``);
    ``tol`` stops the run when the full gradient's norm is at most ``tol`` (full batch:
    tested every step; minibatch: at each epoch's end, by one more pass over the rows).
    ``progress=True`` draws a progress bar on stderr. Ctrl-C returns the best point so far.
    ``lbfgs`` and ``newton`` on a scalar cost, and first-order methods on one where the run is
    short, run their loop as Python first (passes over rows by line searches in machine code,
    the bits the same), and compile it once it has run ``calcml.loop.TIER_UP_SECONDS`` (2 s)
    in all processes together (0: at once).

    >>> import calcml as cm, numpy as np
    >>> w, b = cm.params("w b"); x, y = cm.data("x y")
    >>> cost = cm.Cost((w*x + b - y)**2, params=[w, b], data=[x, y])
    >>> D = {"x": np.array([0.0, 1.0, 2.0]), "y": np.array([1.0, 3.0, 5.0])}
    >>> res = cm.minimize(cost, {"w": 0.0, "b": 0.0}, data=D, method="lbfgs")
    >>> res.success, {k: round(v, 6) for k, v in res.params.items()}
    (True, {'w': 2.0, 'b': 1.0})
    """
    prog = _program(cost, method, lr, schedule, batch_size)
    return prog.run(x0, data, epochs=epochs, maxiter=maxiter, tol=tol, seed=seed, progress=progress)


# minimize's programs by (cost, method name, lr, batch size, what the module depends on): a call
# with a method name makes the same program each time, and making it costs more than a short run
_PROGRAMS: dict = {}


def _program(cost, method, lr, schedule, batch_size) -> Program:
    key = None
    if type(method) is str and schedule is None and type(cost) is Cost:
        key = (cost.key, method, type(lr), lr, type(batch_size), batch_size,
               _loop.UNROLL_MAX, _loop.DELAY_MAX, _loop._cache_token())
        try:
            found = _PROGRAMS.get(key)
        except TypeError:  # unhashable lr or batch_size: generate() refuses them
            found = key = None
        if found is not None:
            return found
    prog = generate(cost, method=method, schedule=schedule, batch_size=batch_size, lr=lr)
    if key is not None:
        if len(_PROGRAMS) >= 64:
            _PROGRAMS.clear()
        _PROGRAMS[key] = prog
    return prog


