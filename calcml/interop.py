"""Interoperation with other libraries: compiled exact derivatives for ``scipy.optimize``."""

from __future__ import annotations

import numpy as np

from .compile import compile as _compile
from .cost import Cost
from .errors import DataError

__all__ = ["to_scipy"]


def _finite(*arrays) -> bool:
    return all(np.isfinite(a).all() for a in arrays)


class _ValueAndGrad:
    """One fused pass gives the value and the gradient; ``jac`` at the point ``fun`` was last
    asked about reuses that gradient (what scipy's ``MemoizeJac`` does for ``jac=True``).

    A point or direction that is not finite gives NaNs, as a NumPy objective would (the
    kernels themselves refuse it, naming the entry): scipy decides what a NaN means for its
    method (trust-krylov, for one, hands over a NaN direction when its Krylov basis
    degenerates at a minimum)."""

    def __init__(self, kernels, data):
        self.kernels = kernels
        self.data = data
        self.x = None
        self.g = None

    def _args(self, x):
        return (x,) if self.data is None else (x, self.data)

    def fun(self, x) -> float:
        if not _finite(x):
            return np.nan
        value, g = self.kernels.value_and_grad(*self._args(x))
        self.x = np.array(x, dtype=np.float64, copy=True)
        self.g = g
        return value

    def jac(self, x) -> np.ndarray:
        if self.x is not None and np.shape(x) == self.x.shape and np.array_equal(x, self.x):
            return self.g.copy()
        if not _finite(x):
            return np.full(np.shape(x), np.nan)
        return self.kernels.grad(*self._args(x))

    def hess(self, x) -> np.ndarray:
        if not _finite(x):
            return np.full((np.size(x), np.size(x)), np.nan)
        return self.kernels.hessian(*self._args(x))

    def hessp(self, x, p) -> np.ndarray:
        """The exact Hessian-vector product (tensor costs: one pass over the data)."""
        if not _finite(x, p):
            return np.full(np.shape(p), np.nan)
        return self.kernels.hvp(x, p, self.data)


def to_scipy(cost: Cost, data=None, *, hessian: bool | str = True) -> dict:
    """``{"fun", "jac", "hess"}`` for ``scipy.optimize.minimize``, from compiled exact kernels.

    ``fun(x)`` is the reduced cost, ``jac(x)`` its exact gradient and ``hess(x)`` its exact
    Hessian, each a Numba kernel from :func:`calcml.compile`. ``data`` (a dict of columns,
    a 2-D array or a DataFrame) is validated and laid out once, here; omit it for a cost
    without data columns. ``hessian=False`` leaves ``hess`` out, for methods that do not use
    it (BFGS, L-BFGS-B, CG), which scipy otherwise warns about. ``hessian="products"`` gives
    ``hessp(x, p)`` instead, the exact Hessian-vector product (Newton-CG, trust-krylov,
    trust-ncg): a tensor cost's in one pass over the data without the Hessian, a scalar
    cost's as its Hessian times p. For a tensor cost so does the default past the dense
    Hessian's size (more than 4,096 parameters), where ``hess`` could not be built.

    >>> import calcml as cm, numpy as np
    >>> from scipy.optimize import minimize
    >>> a, b = cm.params("a b")
    >>> cost = cm.Cost((1 - a)**2 + 100*(b - a**2)**2, params=[a, b])
    >>> res = minimize(x0=np.array([-1.2, 1.0]), method="trust-exact", **cm.to_scipy(cost))
    >>> np.round(res.x, 6)
    array([1., 1.])
    """
    if not isinstance(cost, Cost):
        raise TypeError(f"cm.to_scipy takes a cm.Cost, got {type(cost).__name__}")
    kernels = _compile(cost)
    if cost.data:
        if data is None:
            from .tensor.statement import is_tensor_cost

            form = ("a dict {name: array of shape (N, *shape of a row)}" if is_tensor_cost(cost) else
                    "a dict of 1-D arrays, a 2-D array or a DataFrame")
            raise DataError(f"this cost has data {list(cost.data_names)}; pass data=... ({form})")
        prepared = kernels.prepare(data)
    else:
        if data is not None:
            raise DataError("this cost has no data columns; call cm.to_scipy(cost) without data")
        prepared = None
    if hessian not in (True, False, "products"):
        raise ValueError(f"hessian must be True, False or 'products', got {hessian!r}")
    f = _ValueAndGrad(kernels, prepared)
    out = {"fun": f.fun, "jac": f.jac}
    products = hasattr(kernels, "hvp_at")  # products in one pass, no Hessian: the index form's kernels
    # (also those of a scalar cost that calcml compiles in its index form); a scalar cost's
    # kernels make hessian="products" from the Hessian
    if products and hessian is True:
        from .tensor.kernels import HESSIAN_MAX  # (loaded already: the kernels are its)

        hessian = "products" if cost.n_params > HESSIAN_MAX else True
    if hessian == "products":
        out["hessp"] = f.hessp
    elif hessian:
        out["hess"] = f.hess
    return out
