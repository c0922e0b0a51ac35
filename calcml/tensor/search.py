"""Line-search and trust-region methods over compiled kernels: L-BFGS, Newton, Newton-CG (TRON).

Each step of these methods is one or more full passes over the data through the compiled,
threaded kernels (``fg``: value and gradient; ``hvp``: exact Hessian-vector products;
``hess``: the exact Hessian); what is left between the passes is a few vector operations,
done here with NumPy. Numba would compile this bookkeeping into every cost's module for
seconds of build time (measured: 4 s for L-BFGS on digits) to save microseconds a step.

The algorithms are those of the scalar loops in :mod:`calcml.optim` (the same line search,
the same damping), written over arrays.
"""

from __future__ import annotations

import math

import numpy as np

from .. import result as _result

__all__ = ["run_search"]

# The statuses by name. A tensor module embeds this file from RUNNING on, after statuses of
# its own (calcml.tensor.optimize): nothing below refers to calcml.
CONVERGED, MAXITER, DIVERGED = _result.CONVERGED, _result.MAXITER, _result.DIVERGED
INTERRUPTED, LINE_SEARCH_FAILED = _result.INTERRUPTED, _result.LINE_SEARCH_FAILED

RUNNING = -1
PATH_MAX_PARAMS = 2  # calcml.result.PATH_MAX_PARAMS (an exported module has no calcml): iterates kept


def _cubicmin(a, fa, da, b, fb, db):
    """Minimizer of the cubic through (a, fa, da) and (b, fb, db) (N&W eq. 3.59); nan if none."""
    d1 = da + db - 3.0 * (fa - fb) / (a - b)
    s = d1 * d1 - da * db
    if not (s >= 0.0):
        return math.nan
    d2 = math.copysign(math.sqrt(s), b - a)
    den = db - da + 2.0 * d2
    if den == 0.0:
        return math.nan
    return b - (b - a) * (db + d2 - d1) / den


def wolfe(fg, x, f0, g, d, a1, c1, c2):
    """Strong Wolfe line search (N&W Alg. 3.5 / 3.6, cubic interpolation in the zoom; near a
    minimum the approximate Wolfe conditions of Hager & Zhang 2005).
    Returns (alpha, x + alpha d, f, gradient there, evaluations, ok)."""
    dphi0 = float(g @ d)
    nfev = 0
    memo = {}

    def phi(a):
        xt = x + a * d
        ft, gt = fg(xt)
        memo[a] = (xt, ft, gt)
        return ft, float(gt @ d)

    a_prev, f_prev, d_prev = 0.0, f0, dphi0
    a = a1
    lo, flo, dlo, hi, fhi, dhi = 0.0, f0, dphi0, 0.0, f0, dphi0
    bracketed = False
    fuzz = 1e-10 * abs(f0)

    def done(a):
        xt, ft, gt = memo[a]
        return a, xt, ft, gt, nfev, True

    for it in range(40):
        fa, da = phi(a)
        nfev += 1
        if fa <= f0 + fuzz and c2 * dphi0 <= da <= (2.0 * c1 - 1.0) * dphi0:
            return done(a)
        if not (fa <= f0 + c1 * a * dphi0) or (it > 0 and fa >= f_prev):
            lo, flo, dlo, hi, fhi, dhi = a_prev, f_prev, d_prev, a, fa, da
            bracketed = True
            break
        if abs(da) <= -c2 * dphi0:
            return done(a)
        if da >= 0.0:
            lo, flo, dlo, hi, fhi, dhi = a, fa, da, a_prev, f_prev, d_prev
            bracketed = True
            break
        a_prev, f_prev, d_prev = a, fa, da
        a = 2.0 * a
    if bracketed:
        for _ in range(40):
            delta = hi - lo
            c = _cubicmin(lo, flo, dlo, hi, fhi, dhi) if math.isfinite(fhi) else math.nan
            if not (math.isfinite(c) and min(lo, hi) + 0.1 * abs(delta) <= c <= max(lo, hi) - 0.1 * abs(delta)):
                c = lo + 0.5 * delta
            fc, dc = phi(c)
            nfev += 1
            if fc <= f0 + fuzz and c2 * dphi0 <= dc <= (2.0 * c1 - 1.0) * dphi0:
                return done(c)
            if not (fc <= f0 + c1 * c * dphi0) or fc >= flo:
                hi, fhi, dhi = c, fc, dc
            else:
                if abs(dc) <= -c2 * dphi0:
                    return done(c)
                if dc * (hi - lo) >= 0.0:
                    hi, fhi, dhi = lo, flo, dlo
                lo, flo, dlo = c, fc, dc
            if abs(hi - lo) <= 1e-15 * max(1.0, abs(lo)):
                break
    else:
        lo, flo = a_prev, f_prev
    if lo > 0.0 and flo < f0:  # no strong-Wolfe point: the best sufficient-decrease point
        if lo not in memo:
            phi(lo)
            nfev += 1
        return done(lo)
    return 0.0, x, f0, g, nfev, False


class LBFGS:
    """L-BFGS (Liu & Nocedal 1989; N&W Alg. 7.4, two-loop recursion) with the Wolfe search above."""

    def __init__(self, memory, c1, c2):
        self.m, self.c1, self.c2 = memory, c1, c2
        self.S, self.Y, self.rho = [], [], []

    def step(self, fg, x, f, g, k):
        nfev = 0
        for _attempt in range(2):
            q = g.copy()
            alphas = []
            for s, y, rho in zip(reversed(self.S), reversed(self.Y), reversed(self.rho)):
                a = rho * float(s @ q)
                alphas.append(a)
                q -= a * y
            if self.S:
                q *= float(self.S[-1] @ self.Y[-1]) / float(self.Y[-1] @ self.Y[-1])
            for (s, y, rho), a in zip(zip(self.S, self.Y, self.rho), reversed(alphas)):
                b = rho * float(y @ q)
                q += s * (a - b)
            d = -q
            if not (float(g @ d) < 0.0):
                self._forget()
                d = -g
            a1 = 1.0 if self.S else min(1.0, 1.0 / math.sqrt(float(g @ g)))
            alpha, xt, ft, gt, nf, ok = wolfe(fg, x, f, g, d, a1, self.c1, self.c2)
            nfev += nf
            if ok:
                s, y = xt - x, gt - g
                sy = float(s @ y)
                if sy > 2.220446049250313e-16 * float(y @ y):  # relative, as L-BFGS-B (see optim.py)
                    self.S.append(s)
                    self.Y.append(y)
                    self.rho.append(1.0 / sy)
                    if len(self.S) > self.m:
                        del self.S[0], self.Y[0], self.rho[0]
                return True, xt, ft, gt, nfev
            if not self.S:
                break
            self._forget()  # the memory misled the search: steepest descent once more
        return False, x, f, g, nfev

    def _forget(self):
        self.S, self.Y, self.rho = [], [], []


class Newton:
    """Damped Newton (N&W Alg. 3.2 with the modified Hessian of section 3.4), Armijo backtracking."""

    def __init__(self, c1):
        self.c1 = c1

    def step(self, fg, x, f, g, k, hess=None, value=None):
        H = hess(x)
        n = H.shape[0]
        if not np.isfinite(H).all():  # no Hessian here (a kink's DiracDelta, an overflow): steepest descent
            d = -g
        else:
            scale = max(1.0, float(np.max(np.abs(np.diag(H)))) if n else 1.0)
            tau, floor = 1e-10 * scale, 1e-12 * scale
            mu = 0.0
            while True:  # pivots above floor: as calcml.optim's _newton_step (a Hessian singular to
                try:  # rounding would send the step along its null direction by the noise there)
                    L = np.linalg.cholesky(H + mu * np.eye(n))
                    if n and not float(np.min(np.diag(L))) ** 2 > floor:
                        raise np.linalg.LinAlgError("numerically singular")
                    break
                except np.linalg.LinAlgError:
                    mu = tau if mu == 0.0 else 10.0 * mu
                    if not mu < 1e300:
                        return False, x, f, g, 0
            d = -np.linalg.solve(L.T, np.linalg.solve(L, g))
        slope = float(g @ d)
        alpha = 1.0
        for ls in range(60):
            xt = x + alpha * d
            ft = value(xt)
            if ft <= f + self.c1 * alpha * slope:
                ft, gt = fg(xt)
                return True, xt, ft, gt, ls + 2
            alpha *= 0.5
        return False, x, f, g, 60


class NewtonCG:
    """Trust-region Newton with Steihaug's conjugate gradients on exact Hessian-vector products
    (TRON: Lin & Moré 1999, with liblinear's radius rules); no Hessian is ever formed."""

    def __init__(self):
        self.delta = None
        self.hvps = 0

    def step(self, fg, x, f, g, k, hvp=None):
        """``hvp(x)`` gives ``v -> H(x) v`` (one forward sweep per point, shared by the products)."""
        hv_at = hvp(x)
        gnorm = math.sqrt(float(g @ g))
        first = self.delta is None
        if first:
            self.delta = gnorm
        delta = self.delta
        n = x.shape[0]
        s = np.zeros(n)
        r = -g
        d = r.copy()
        rr = float(r @ r)
        for _ in range(n + 1):
            if math.sqrt(rr) <= 0.1 * gnorm:
                break
            hd = hv_at(d)
            self.hvps += 1
            dhd = float(d @ hd)
            alpha = rr / dhd if dhd > 0.0 else math.inf
            snew = s + alpha * d if math.isfinite(alpha) else None
            if not (dhd > 0.0) or not (float(snew @ snew) < delta * delta):
                ss, sd, dd = float(s @ s), float(s @ d), float(d @ d)
                rad = math.sqrt(max(sd * sd + dd * (delta * delta - ss), 0.0))
                tau = (delta * delta - ss) / (sd + rad) if sd >= 0.0 else (rad - sd) / dd
                s += tau * d
                r -= tau * hd
                break
            s = snew
            r -= alpha * hd
            rnew = float(r @ r)
            d = r + (rnew / rr) * d
            rr = rnew
        gs = float(g @ s)
        prered = -0.5 * (gs - float(s @ r))
        xt = x + s
        ft, gt = fg(xt)
        actred = f - ft
        snorm = math.sqrt(float(s @ s))
        if first:
            delta = min(delta, snorm)
        denom = ft - f - gs
        alpha = 4.0 if not (denom > 0.0) else max(0.25, -0.5 * (gs / denom))
        if not (actred >= 1e-4 * prered):
            delta = min(max(alpha, 0.25) * snorm, 0.5 * delta)
        elif actred < 0.25 * prered:
            delta = max(0.25 * delta, min(alpha * snorm, 0.5 * delta))
        elif actred < 0.75 * prered:
            delta = max(0.25 * delta, min(alpha * snorm, 4.0 * delta))
        else:
            delta = max(delta, min(alpha * snorm, 4.0 * delta))
        self.delta = delta
        if actred > 1e-4 * prered and math.isfinite(ft):
            return True, xt, ft, gt, 1
        if not (prered > 0.0) or delta <= 1e-14 * max(1.0, math.sqrt(float(x @ x))):
            return False, x, f, g, 1  # no decrease is possible at this precision
        return None, x, f, g, 1  # refused: the radius shrank, try again


def run_search(method, fg, x0, *, maxiter, tol, value=None, hvp=None, hess=None, callback=None, hyper=None):
    """Minimize with ``method`` ("lbfgs", "newton", "newton-cg") from x0; ``fg(x) -> (f, g)``.
    Returns the report dict of the generated drivers (x, fun, grad, status, ...)."""
    hyper = hyper or {}
    if method == "lbfgs":
        solver = LBFGS(hyper.get("memory", 10), hyper.get("c1", 1e-4), hyper.get("c2", 0.9))
        extra = {}
    elif method == "newton":
        solver, extra = Newton(hyper.get("c1", 1e-4)), {"hess": hess, "value": value}
    else:
        solver, extra = NewtonCG(), {"hvp": hvp}
    x = np.array(x0, dtype=np.float64)
    f, g = fg(x)
    blowup = 1e10 * max(1.0, abs(f))
    best, best_value, best_step = x.copy(), f, 0
    history = [f]
    path = [x.copy()] if x.shape[0] <= PATH_MAX_PARAMS else None
    nit = nfev = 0
    status, diverged_at = RUNNING, -1
    gnorm = math.sqrt(float(g @ g))
    if not (math.isfinite(f) and math.isfinite(gnorm)):
        status, diverged_at = DIVERGED, 0
    elif gnorm <= tol:
        status = CONVERGED
    try:
        while status == RUNNING and nit < maxiter:
            ok, x, f, g, nf = solver.step(fg, x, f, g, nit, **extra)
            nfev += nf
            if ok is False:
                status = LINE_SEARCH_FAILED
                break
            nit += 1
            history.append(f)
            if path is not None:
                path.append(x.copy())
            if ok is None:  # a refused trust-region step: the radius shrank
                continue
            gnorm = math.sqrt(float(g @ g))
            if not (abs(f) <= blowup and math.isfinite(gnorm)):
                status, diverged_at = DIVERGED, nit
                break
            if f < best_value:
                best, best_value, best_step = x.copy(), f, nit
            if callback is not None:
                callback(nit, maxiter, f)
            if gnorm <= tol:
                status = CONVERGED
        if status == RUNNING:
            status = MAXITER
    except KeyboardInterrupt:
        status = INTERRUPTED
    if status in (DIVERGED, INTERRUPTED):
        x = best
    f, g = fg(x)
    return {"x": x, "fun": f, "grad": g, "grad_norm": math.sqrt(float(g @ g)), "nit": nit, "nfev": nfev,
            "status": status, "history": np.array(history), "epochs": 0, "best_step": best_step,
            "best_value": best_value, "diverged_at": diverged_at, "blowup": blowup,
            "path": None if path is None else np.array(path)}
