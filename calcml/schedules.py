"""Learning-rate schedules: the rate as a function of the step ``t`` (optimizer updates, from 0).

A schedule is a small description, like optax's schedules (``optax/schedules/_schedule.py``):
its kind, its numbers and how they combine. It is compiled into the generated descent loop as
one SymPy expression of the step counter :data:`T` (:meth:`Schedule.rate`), its numbers the
symbols :func:`arg` (k), which the generators print as reads of an argument array, so one
compiled loop serves every value of them (a learning-rate sweep compiles once). Its
*structure* (which kinds, how nested) is what the compiled loop depends on.

Every schedule is also a plain Python function of ``t`` (``schedule(t)``), for plots and tests.

>>> import calcml as cm
>>> s = cm.schedules.warmup(cm.schedules.cosine(0.1, steps=100), steps=10)
>>> round(s(5), 6), round(s(10), 6), round(s(60), 6)
(0.05, 0.1, 0.05)
"""

from __future__ import annotations

import math
import numbers

import sympy as sp

from .errors import OptimizeError

__all__ = ["Schedule", "constant", "step", "exponential", "inverse_time", "cosine", "warmup", "as_schedule"]


def _real(kind: str, name: str, value, *, positive=False, nonneg=False, at_most=None) -> float:
    """A hyperparameter as a float, refused with a message quoting it if out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptimizeError(f"{kind}: {name} must be a real number, got {name}={value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise OptimizeError(f"{kind}: {name} must be finite, got {name}={value!r}")
    if positive and not v > 0:
        raise OptimizeError(f"{kind} requires a positive {name}, got {name}={value!r}")
    if nonneg and not v >= 0:
        raise OptimizeError(f"{kind} requires a non-negative {name}, got {name}={value!r}")
    if at_most is not None and v > at_most:
        raise OptimizeError(f"{kind} requires {name} <= {at_most}, got {name}={value!r}")
    return v


# The step counter and the numbers' slots in a rate's expression (Dummies: never a cost's symbols).
T = sp.Dummy("t")
_ARGS: list = []


def arg(k: int) -> sp.Dummy:
    """The symbol of the schedule's k-th number (depth first, as :meth:`Schedule.values`)."""
    while len(_ARGS) <= k:
        _ARGS.append(sp.Dummy(f"a{len(_ARGS)}"))
    return _ARGS[k]


def _count(kind: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise OptimizeError(f"{kind} requires a positive integer {name}, got {name}={value!r}")
    return int(value)


class Schedule:
    """Base of the schedules: ``args`` (name, float) passed at run time, ``children`` nested."""

    kind = "schedule"

    def __init__(self, args: tuple, children: tuple = ()):
        self.args = tuple(args)
        self.children = tuple(children)

    # -- what the generator needs ------------------------------------------------------
    def structure(self) -> str:
        """What the compiled loop depends on: the kinds and their nesting, not the numbers."""
        inner = ",".join(c.structure() for c in self.children)
        return f"{self.kind}({inner})"

    def values(self) -> list:
        """The numbers, depth first: own arguments, then the children's."""
        out = [v for _, v in self.args]
        for c in self.children:
            out.extend(c.values())
        return out

    def rate(self, t=T, offset: int = 0) -> sp.Expr:
        """The rate at step ``t`` (a SymPy expression), its numbers the symbols ``arg(offset + k)``."""
        a = [arg(offset + k) for k in range(len(self.args))]
        offset += len(self.args)
        kids = []
        for c in self.children:
            kids.append((c, offset))
            offset += len(c.values())
        return self._rate(sp.sympify(t), a, [(lambda tt, c=c, o=o: c.rate(tt, o)) for c, o in kids])

    def names(self, array: str = "sa", step: str = "step") -> dict:
        """How a generator names the rate's symbols: ``array[k]`` and its step counter."""
        return {T: step, **{arg(k): f"{array}[{k}]" for k in range(len(self.values()))}}

    def code(self, printer, array: str = "sa", step: str = "step") -> str:
        """The rate at ``step`` as code, its numbers read from ``array``, printed by ``printer``
        (what both loop generators write)."""
        with printer.naming(self.names(array, step)):
            return printer.doprint_expr(self.rate())

    @property
    def is_constant(self) -> bool:
        """Whether the rate is the same at every step."""
        return T not in self.rate().free_symbols

    # -- subclasses ------------------------------------------------------------------------
    def _rate(self, t, a: list, kids: list) -> sp.Expr:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, t) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def initial(self) -> float:
        """The rate at step 0 (reported in messages)."""
        return self(0)

    def __repr__(self):
        parts = [f"{n}={v!r}" for n, v in self.args]
        parts = [repr(c) for c in self.children] + parts
        return f"{self.kind}({', '.join(parts)})"


class constant(Schedule):
    """``lr`` at every step."""

    kind = "constant"

    def __init__(self, lr: float):
        super().__init__([("lr", _real("constant", "lr", lr, positive=True))])

    def _rate(self, t, a, kids):
        return a[0]

    def __call__(self, t):
        return self.args[0][1]


class step(Schedule):
    """``lr * factor ** floor(t / every)``: the rate is multiplied by ``factor`` every ``every`` steps."""

    kind = "step"

    def __init__(self, lr: float, every: int, factor: float = 0.5):
        super().__init__(
            [
                ("lr", _real("step", "lr", lr, positive=True)),
                ("every", float(_count("step", "every", every))),
                ("factor", _real("step", "factor", factor, positive=True, at_most=1.0)),
            ]
        )

    def _rate(self, t, a, kids):
        return a[0] * a[2] ** sp.floor(t / a[1])

    def __call__(self, t):
        lr, every, factor = (v for _, v in self.args)
        return lr * factor ** math.floor(t / every)


class exponential(Schedule):
    """``lr * decay ** t``."""

    kind = "exponential"

    def __init__(self, lr: float, decay: float):
        super().__init__(
            [
                ("lr", _real("exponential", "lr", lr, positive=True)),
                ("decay", _real("exponential", "decay", decay, positive=True, at_most=1.0)),
            ]
        )

    def _rate(self, t, a, kids):
        return a[0] * a[1] ** t

    def __call__(self, t):
        lr, decay = (v for _, v in self.args)
        return lr * decay**t


class inverse_time(Schedule):
    """``lr / (1 + decay * t)``."""

    kind = "inverse_time"

    def __init__(self, lr: float, decay: float):
        super().__init__(
            [
                ("lr", _real("inverse_time", "lr", lr, positive=True)),
                ("decay", _real("inverse_time", "decay", decay, nonneg=True)),
            ]
        )

    def _rate(self, t, a, kids):
        return a[0] / (1 + a[1] * t)

    def __call__(self, t):
        lr, decay = (v for _, v in self.args)
        return lr / (1.0 + decay * t)


class cosine(Schedule):
    """``final + (lr - final) * (1 + cos(pi * min(t, steps) / steps)) / 2`` (Loshchilov & Hutter,
    SGDR, 2017, without restarts; optax ``cosine_decay_schedule`` with ``alpha = final / lr``)."""

    kind = "cosine"

    def __init__(self, lr: float, steps: int, final: float = 0.0):
        lr = _real("cosine", "lr", lr, positive=True)
        final = _real("cosine", "final", final, nonneg=True)
        super().__init__([("lr", lr), ("steps", float(_count("cosine", "steps", steps))), ("final", final)])

    def _rate(self, t, a, kids):
        return a[2] + (a[0] - a[2]) * (1 + sp.cos(sp.pi * sp.Min(t, a[1]) / a[1])) / 2

    def __call__(self, t):
        lr, steps, final = (v for _, v in self.args)
        return final + (lr - final) * 0.5 * (1.0 + math.cos(math.pi * min(float(t), steps) / steps))


class warmup(Schedule):
    """A linear ramp from 0 to ``schedule(0)`` over ``steps`` steps, then ``schedule(t - steps)``
    (optax ``linear_schedule`` joined to another by ``join_schedules``)."""

    kind = "warmup"

    def __init__(self, schedule, steps: int):
        if not isinstance(schedule, Schedule):
            raise OptimizeError(f"warmup wraps a schedule from cm.schedules, got {schedule!r}")
        super().__init__([("steps", float(_count("warmup", "steps", steps)))], [schedule])

    def _rate(self, t, a, kids):
        inner = kids[0]
        return sp.Piecewise((t / a[0] * inner(0), t < a[0]), (inner(t - a[0]), True))

    def __call__(self, t):
        w = self.args[0][1]
        inner = self.children[0]
        return t / w * inner(0) if t < w else inner(t - w)


def as_schedule(schedule, lr) -> Schedule:
    """``schedule`` itself, or ``constant(lr)`` when it is None."""
    if schedule is None:
        return constant(lr)
    if not isinstance(schedule, Schedule):
        raise OptimizeError(
            f"schedule must be an object from cm.schedules (constant, step, exponential, inverse_time, "
            f"cosine, warmup) or None, got {schedule!r}"
        )
    return schedule
