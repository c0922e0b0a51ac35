"""check_gradient: a user's gradient function compared with the exact gradient, compiled, at
points (a numeric comparison of kernels, not a proof; proofs are :mod:`calcml.verify`'s)."""

from __future__ import annotations

import math

import numpy as np

from .cost import Cost
from .dataset import by_name, real_array
from .errors import DataError, ParamError
from .verify.report import Report, Verdict, _short

__all__ = ["check_gradient"]


def check_gradient(cost: Cost, grad_fn, data=None, points=None, *, rtol: float = 1e-6, n_points: int = 20,
                   seed: int = 0, scale: float = 2.0) -> Report:
    """Check a user-written gradient function against the exact gradient of ``cost``.

    The reference is the exact gradient, derived symbolically and compiled
    (``cm.compile(cost).grad``). Each parameter gets one verdict: ``"verified"`` when the
    function agrees at every point checked (this checks those points; it is not a proof for
    all inputs), ``"refuted"`` with the worst point, the expected and actual values and the
    relative error.

    Parameters
    ----------
    cost : Cost
    grad_fn : callable
        ``grad_fn(theta, data) -> array`` of the reduced gradient (mean or sum over rows, as
        ``cost.reduce`` says), with ``data`` a dict ``{name: 1-D array}``; ``grad_fn(theta)``
        for a cost without data. It may return a dict ``{name: value}`` instead (a tensor
        cost's ``{name: array}``, as ``cost.unpack`` gives).
    data : dict, 2-D array or DataFrame
        The rows, for a cost with data columns.
    points : array, optional
        Parameter vectors in ``cost.params`` order, one per row (a 1-D array is one point).
        By default ``n_points`` random points, uniform in ``[-scale, scale]`` (seeded by
        ``seed``), redrawn where the exact gradient is not finite.
    rtol : float
        Relative tolerance: a component agrees when |user - exact| <= rtol max(|user|, |exact|)
        plus what rounding over the rows may explain (16 N eps times the typical |per-row
        term|, for a cost over N rows), so that a sum of large, cancelling terms added in
        another order is not mistaken for a bug, while a real error of 0.1% still is.

    Examples
    --------
    >>> import numpy as np, calcml as cm
    >>> w, b = cm.params("w b"); x = cm.data("x")
    >>> cost = cm.Cost((w*x + b)**2, params=[w, b], data=[x], reduce="sum")
    >>> def grad(theta, d):
    ...     pred = theta[0]*d["x"] + theta[1]
    ...     return np.array([2*np.dot(d["x"], pred), 2*np.sum(pred)])
    >>> cm.check_gradient(cost, grad, data={"x": np.array([1.0, 2.0, 3.0])}).ok
    True
    """
    from .compile import compile as _compile
    from .dataset import as_dataset

    if not isinstance(cost, Cost):
        raise TypeError(f"check_gradient expects a cm.Cost, got {type(cost).__name__}")
    if not callable(grad_fn):
        raise TypeError(f"grad_fn must be callable, got {type(grad_fn).__name__}")
    if not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"rtol must be a positive number, got {rtol!r}")
    from .tensor.statement import is_tensor_cost

    if is_tensor_cost(cost):
        from .tensor.verify import check_gradient_tensor

        return check_gradient_tensor(cost, grad_fn, data, points, rtol, n_points, seed)
    n = len(cost.params)
    kernels = _compile(cost)
    if cost.data:
        if data is None:
            raise DataError(f"this cost has data columns {list(cost.data_names)}; pass data=")
        ds = as_dataset(data, cost.data_names)
        ds.raise_nonfinite()
    elif data is not None:
        raise DataError("this cost has no data columns; call check_gradient without data")
    else:
        ds = None

    def exact(theta):
        return kernels.grad(theta, ds) if ds is not None else kernels.grad(theta)

    def user(theta):
        out = grad_fn(theta.copy(), {k: v.copy() for k, v in ds.as_dict().items()}) if ds is not None else grad_fn(theta.copy())
        if isinstance(out, dict):  # {name: value}
            out = by_name(out)
            if set(out) != set(cost.param_names):
                raise ParamError(f"grad_fn returned a dict with {sorted(map(str, out))}; expected the parameters "
                                 f"{list(cost.param_names)}")
            out = [out[name] for name in cost.param_names]
        arr = real_array(out, "grad_fn's gradient", ParamError)
        if arr.shape != (n,):
            raise ParamError(f"grad_fn returned shape {arr.shape}; expected ({n},), one value per parameter "
                             f"in the order {list(cost.param_names)}")
        return arr

    thetas = _gradient_points(points, n, n_points, seed, scale, exact, cost)
    allowance = rounding_allowance(_row_scale(cost, kernels, ds, thetas), ds.n_rows if ds is not None else 0)
    worst = [None] * n  # (badness, relative error, theta, expected, actual) per component
    for theta in thetas:
        e = exact(theta)
        a = user(theta)
        bad, rel = compare(e, a, rtol, allowance)
        for j in range(n):
            if worst[j] is None or bad[j] > worst[j][0]:
                worst[j] = (bad[j], rel[j], theta, e[j], a[j])
    verdicts = []
    where_all = points_text(thetas, cost.param_names)
    for j, p in enumerate(cost.params):
        bad, rel, theta, e, a = worst[j]
        pt = {name: float(v) for name, v in zip(cost.param_names, theta)}
        where = ", ".join(f"{k} = {v:.6g}" for k, v in pt.items())
        if bad <= 1.0:
            verdicts.append(Verdict(
                f"d/d{p.name}", "verified", "exact gradient at points",
                f"agrees with the exact gradient at {where_all} (largest relative error {rel:.1e}, tolerance "
                f"{rtol:g}{_allowance_text(allowance[j])}); these points only, not a proof for others", None))
        else:
            verdicts.append(Verdict(
                f"d/d{p.name}", "refuted", "exact gradient at points",
                f"at {where}: the exact gradient component d/d{p.name} is {e:.12g}, grad_fn gives {a:.12g} "
                f"(relative error {rel:.3g}, tolerance {rtol:g}{_allowance_text(allowance[j])})", pt, float(e), float(a)))
    return Report(verdicts, title=f"check_gradient: {_short(cost.expr, 60)}")


# The rounding a reduction over N rows may carry, as a multiple of N eps times the typical
# magnitude of the rows' terms: summing in another order, or by another formula (a BLAS
# product, pairwise sums), differs from the kernels' sum by up to about N eps sum|terms|.
ROUNDING_FACTOR = 16.0


def rounding_allowance(row_scale: np.ndarray, n_rows: int) -> np.ndarray:
    """Per gradient entry: the absolute difference that rounding alone may explain, from
    the typical |per-row term| (times N for a sum: the reduced gradient's scale without
    cancellation) and the row count. Zero for a cost without data."""
    return ROUNDING_FACTOR * np.finfo(np.float64).eps * max(n_rows, 1) * np.asarray(row_scale, dtype=np.float64)


def compare(e, a, rtol: float, allowance) -> tuple:
    """(badness, relative error) per entry of the exact gradient ``e`` and the user's ``a``:
    badness at most 1 when |a - e| <= rtol max(|e|, |a|) + allowance (inf where a is not
    finite); the relative error |a - e| / max(|e|, |a|), as a message reports it."""
    e = np.asarray(e, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    finite = np.isfinite(a)
    diff = np.where(finite, np.abs(a - e), np.inf)
    size = np.maximum(np.abs(e), np.where(finite, np.abs(a), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        bad = np.where(finite, diff / np.maximum(rtol * size + allowance, 1e-300), np.inf)
        rel = np.where(finite, diff / np.maximum(size, 1e-300), np.inf)
    return bad.tolist(), rel.tolist()


def points_text(thetas, names, most: int = 3) -> str:
    """The points a check used, for its verdict: up to ``most`` of them written out."""
    def one(t):
        return "(" + ", ".join(f"{nm} = {v:.4g}" for nm, v in zip(names, t)) + ")"
    n = len(thetas)
    if n <= most:
        return f"{n} point{'s' if n > 1 else ''}: " + ", ".join(one(t) for t in thetas)
    return f"{n} points: " + ", ".join(one(t) for t in thetas[:most]) + ", ..."


def _allowance_text(allowance: float) -> str:
    return f", plus {allowance:.1e} that rounding over the rows may explain" if allowance > 0 else ""


def _gradient_points(points, n, n_points, seed, scale, exact, cost) -> list:
    if points is not None:
        arr = np.asarray(points, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[1] != n or arr.shape[0] == 0:
            raise ParamError(f"points must have shape (m, {n}), one row per parameter vector in the order "
                             f"{list(cost.param_names)}; got shape {np.shape(points)}")
        if not np.all(np.isfinite(arr)):
            raise ParamError("points must be finite")
        thetas = [np.ascontiguousarray(row) for row in arr]
        for t in thetas:
            if not np.all(np.isfinite(exact(t))):
                raise ParamError(f"the exact gradient is not finite at the point {t.tolist()}: outside the cost's domain")
        return thetas
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1:
        raise ValueError(f"n_points must be a positive integer, got {n_points!r}")
    rng = np.random.default_rng(seed)
    thetas, draws = [], 0
    while len(thetas) < n_points and draws < 50 * n_points:
        draws += 1
        t = rng.uniform(-scale, scale, size=n)
        with np.errstate(all="ignore"):
            g = exact(t)
        if np.all(np.isfinite(g)):
            thetas.append(t)
    if not thetas:
        raise ParamError(f"no random point in [-{scale}, {scale}]^{n} has a finite exact gradient; pass points=")
    return thetas


def _row_scale(cost, kernels, ds, thetas) -> np.ndarray:
    """Typical |per-row gradient term| (times the row count for a sum), from a few rows."""
    if ds is None:
        return np.zeros(len(cost.params))
    return typical_row_gradient(len(cost.params), cost.reduce, kernels.grad, ds.as_dict(), thetas[:3])


def typical_row_gradient(n: int, reduce: str, grad, arrays: dict, thetas, rows: int = 32) -> np.ndarray:
    """The mean |gradient| over up to ``rows`` single rows of ``arrays`` (``{name: rows}``)
    at ``thetas``, times the row count for a sum: the scale of the rounding that a
    reduction of the rows may carry. ``grad(theta, one_row)`` is the kernels' gradient."""
    n_rows = len(next(iter(arrays.values())))
    total, count = np.zeros(n), 0
    for i in np.linspace(0, n_rows - 1, min(rows, n_rows)).astype(int):
        one = {name: col[i:i + 1].copy() for name, col in arrays.items()}
        for t in thetas:
            with np.errstate(all="ignore"):
                g = np.abs(grad(t, one))
            if np.all(np.isfinite(g)):
                total += g
                count += 1
    typical = total / max(count, 1)
    return typical * (n_rows if reduce == "sum" else 1.0)
