"""Plots (matplotlib, the optional extra ``plot``): cost histories and descent paths.

matplotlib is imported only when a plot is drawn; without it, a plot raises
:class:`MissingDependencyError` that says how to install it.
"""

from __future__ import annotations

import numpy as np

from .cost import Cost
from .errors import CalcmlError, DataError

__all__ = ["plot_history", "plot_path", "require_matplotlib", "MissingDependencyError"]


class MissingDependencyError(CalcmlError, ImportError):
    """An optional dependency (matplotlib) is not installed."""


def require_matplotlib(what: str = "plotting"):
    """Import matplotlib or raise an error that says how to install it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            f"{what} needs matplotlib, which is not installed: pip install 'calcml[plot]' (or pip install matplotlib)"
        ) from None


def _axes(ax, what: str):
    require_matplotlib(what)
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.gca()


def plot_history(res, ax=None):
    """The cost history of a result (one point per iteration, or per epoch), on a log scale
    when every cost is positive. Returns the axes."""
    ax = _axes(ax, "plot_history")
    h = np.asarray(res.history, dtype=float)
    steps = getattr(res, "history_steps", None)
    if steps is None:  # a result of another library: one entry per iteration
        steps = np.arange(len(h)) * (getattr(res, "history_every", 1) or 1)
    ax.plot(steps, h, lw=1.5)
    finite = h[np.isfinite(h)]
    if finite.size and np.all(finite > 0):
        ax.set_yscale("log")
    ax.set_xlabel("epoch" if getattr(res, "minibatch", False) else "iteration")
    ax.set_ylabel("cost")
    ax.set_title(f"{getattr(res, 'method', '')}: {str(getattr(res, 'message', '')).split(':')[0]}".strip(": "))
    return ax


def _path_of(res, path) -> np.ndarray:
    if path is None:
        path = getattr(res, "path", None)
    if path is None:
        raise ValueError(
            "this result does not record the iterates of its run; pass path=... (an array with one "
            "parameter vector per row) to plot_path"
        )
    p = np.asarray(path, dtype=float)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"path must have one row of 2 parameters per iterate, got shape {p.shape}")
    return p[np.all(np.isfinite(p), axis=1)]


def _box(points: np.ndarray, margin: float):
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = hi - lo
    pad = np.where(span > 0, margin * span, np.maximum(1.0, np.abs(lo)) * 0.5)
    return lo - pad, hi + pad


def _grid_values(cost: Cost, data, a, b) -> np.ndarray:
    from .compile import compile as compile_cost

    k = compile_cost(cost)
    if cost.data:
        if data is None:
            raise DataError(f"this cost has data columns {list(cost.data_names)}; pass data=... to plot_path")
        ds = k.prepare(data)
        value = lambda t: k.value(t, ds)  # noqa: E731
    else:
        if data is not None:
            raise DataError("this cost has no data columns; call plot_path without data")
        value = k.value
    Z = np.empty((len(b), len(a)))
    theta = np.empty(2)
    for i, bv in enumerate(b):
        for j, av in enumerate(a):
            theta[0], theta[1] = av, bv
            Z[i, j] = value(theta)
    return Z


def _levels(Z, n: int):
    finite = Z[np.isfinite(Z)]
    lo, hi = float(finite.min()), float(finite.max())
    if lo > 0 and hi / lo > 100:  # costs spanning decades: contours evenly spaced in log
        return np.geomspace(lo, hi, n)
    if hi == lo:
        return None
    return np.linspace(lo, hi, n)


def plot_path(cost: Cost, res, data=None, *, path=None, ax=None, levels: int = 30, margin: float = 0.25,
              resolution: int = 80):
    """The descent path of a run over the contours of a two-parameter cost. Returns the axes.

    ``res`` is the result of :func:`calcml.minimize`; its iterates are ``res.path`` where the
    run recorded them, else give them as ``path`` (one parameter vector per row, in
    ``cost.params`` order). ``data`` is needed for a cost with data columns. The contours are
    the compiled cost on a ``resolution`` x ``resolution`` grid over the path's bounding box,
    widened by ``margin``; log-spaced when the cost spans more than two decades.
    """
    if not isinstance(cost, Cost):
        raise TypeError(f"plot_path takes a cm.Cost, got {type(cost).__name__}")
    names = list(cost.flat_names() if hasattr(cost, "flat_names") else cost.param_names)  # tensors: w[0], w[1]
    if cost.n_params != 2:
        shown = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
        raise ValueError(f"plot_path draws costs of two parameters; this one has {cost.n_params} ({shown})")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 2 <= resolution <= 1000:
        raise ValueError(f"resolution must be an integer from 2 to 1000, got {resolution!r}")
    ax = _axes(ax, "plot_path")
    p = _path_of(res, path)
    x_end = np.asarray(getattr(res, "x", p[-1] if len(p) else None), dtype=float)
    points = np.vstack([p, x_end[None, :]]) if len(p) else x_end[None, :]
    lo, hi = _box(points, margin)
    a = np.linspace(lo[0], hi[0], resolution)
    b = np.linspace(lo[1], hi[1], resolution)
    Z = _grid_values(cost, data, a, b)
    if np.any(np.isfinite(Z)):
        ax.contour(a, b, np.ma.masked_invalid(Z), levels=_levels(Z, levels), cmap="viridis", linewidths=0.8)
    if len(p):
        ax.plot(p[:, 0], p[:, 1], "-o", color="tab:red", ms=2.5, lw=1.2, label="path")
        ax.plot(p[0, 0], p[0, 1], "s", color="black", ms=6, label="start")
    ax.plot(x_end[0], x_end[1], "*", color="gold", mec="black", ms=12, label="result")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title(f"{getattr(res, 'method', '')} path over the cost".strip())
    ax.legend(loc="best", fontsize="small")
    return ax
