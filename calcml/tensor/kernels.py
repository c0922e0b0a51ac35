"""Compiled kernels of a tensor cost: ``value``, ``grad``, ``value_and_grad``, ``hvp``, ``hessian``.

The rows are cut into at most :data:`STRIPES` stripes of whole blocks, fixed by the number of
rows alone; each stripe's sums go into its own row of an accumulator array, and the stripes
are added in order. Threads take stripes (each a ``nogil`` Numba call), so the result has the
same bits for any number of threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import math
import os
import sys
import threading

import numpy as np

from .. import native
from ..dataset import DASK_HERE, by_name, is_dask, real_array
from ..errors import DataError, ParamError
from .model import TensorCost
from .statement import Label

__all__ = ["TensorKernels", "compile_tensor", "TensorData", "STRIPES"]

STRIPES = 16
# Below this many rows one thread does all stripes: threads cost more than they save.
PARALLEL_MIN_ROWS = 16384

_lock = threading.RLock()
_loaded: dict = {}
_BLAS: list | None = None


def _load_cython_blas():
    """Load ``scipy.linalg.cython_blas``, the BLAS that Numba's ``np.dot`` calls (Numba finds
    it by that name in ``sys.modules``). Where ``scipy.linalg`` is not imported yet, the
    extension module is loaded from its file by itself: importing ``scipy.linalg`` first
    costs about 0.2 s of a warm start, and nothing here needs it. Any surprise (another
    layout of SciPy's files): the plain import."""
    name = "scipy.linalg.cython_blas"
    if name in sys.modules:
        return
    if "scipy.linalg" not in sys.modules:
        try:
            import scipy

            folder = os.path.join(os.path.dirname(scipy.__file__), "linalg")
            files = [f for f in os.listdir(folder) if f.startswith("cython_blas.")
                     and f.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))]
            if len(files) == 1:
                spec = importlib.util.spec_from_file_location(name, os.path.join(folder, files[0]))
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
                return
        except Exception:  # noqa: BLE001 - fall back to the plain import below
            pass
    import scipy.linalg.cython_blas  # noqa: F401


def _numba_blas() -> list:
    """threadpoolctl's controllers of the BLAS that Numba's ``np.dot`` calls (SciPy's)."""
    global _BLAS
    if _BLAS is None:
        try:
            _load_cython_blas()  # the library, to find
            from threadpoolctl import ThreadpoolController

            libs = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
            ours = [lib for lib in libs if "scipy" in os.path.basename(os.path.dirname(lib.filepath)).lower()]
            _BLAS = ours or libs
        except Exception:  # no threadpoolctl or an unknown BLAS: threads as they are
            _BLAS = []
    return _BLAS


_held = threading.local()  # .depth: how many _SingleThreadedBlas this thread is inside


class _SingleThreadedBlas:
    """While a kernel runs, each BLAS call runs on the calling thread: BLAS threads of their own
    would compete with calcml's for the cores (OpenBLAS spins while it waits: measured 25x
    slower on a loaded two-core machine), and a block's products are too small to share. The
    count is restored afterwards. Inside another one on the same thread it does nothing: a
    fit holds one around all its evaluations (setting the count costs about 10 us a call)."""

    def __enter__(self):
        depth = getattr(_held, "depth", 0)
        _held.depth = depth + 1
        self.saved = [(lib, lib.num_threads) for lib in _numba_blas()] if depth == 0 else []
        for lib, n in self.saved:
            if n != 1:
                lib.set_num_threads(1)

    def __exit__(self, *exc):
        _held.depth -= 1
        for lib, n in self.saved:
            if n != 1:
                lib.set_num_threads(n)


class TensorData:
    """Data of a tensor cost, validated and laid out: one C-contiguous array per data item."""

    def __init__(self, arrays: tuple, n_rows: int, checked: bool):
        self.arrays, self.n_rows, self.checked = arrays, n_rows, checked


def as_tensor_data(cost: TensorCost, data, check_finite: bool = False) -> TensorData:
    if isinstance(data, TensorData):
        return data
    if is_dask(data):
        raise DataError(DASK_HERE)
    if data is None:
        if cost.has_data:
            raise DataError(f"this cost needs data {{name: array}} for {list(cost.data_names)}")
        return TensorData((), 0, True)
    if not cost.has_data:
        raise DataError("this cost has no data; call the kernel with theta alone")
    if not isinstance(data, dict):
        try:  # a pandas DataFrame of scalar data columns
            import pandas as pd

            if isinstance(data, pd.DataFrame):
                data = {c: data[c].to_numpy() for c in data.columns}
        except ImportError:
            pass
    if not isinstance(data, dict):
        raise DataError(f"data for a tensor cost is a dict {{name: array}} with {list(cost.data_names)}, "
                        f"got {type(data).__name__}")
    data = by_name(data)
    missing = [n for n in cost.data_names if n not in data]
    if missing:
        raise DataError(f"data is missing {', '.join(map(repr, missing))}; the cost reads {list(cost.data_names)}")
    arrays, n = [], None
    for item, (name, shape) in zip(cost.data, cost.data_shapes.items()):
        raw = data[name]
        if isinstance(item, Label):
            a = np.asarray(raw)
            if a.ndim != 1:
                raise DataError(f"labels {name!r} must be a 1-D array of class numbers, got shape {a.shape}")
            if a.dtype.kind == "f":
                bad = np.flatnonzero(a != np.round(a))
                if bad.size:
                    raise DataError(f"labels {name!r}: row {int(bad[0])} holds {a[bad[0]]}, not a class number")
            elif a.dtype.kind not in "iub":
                raise DataError(f"labels {name!r} must be integers, got dtype {a.dtype}")
            a = np.ascontiguousarray(a, dtype=np.int64)
            if a.size:
                lo, hi = int(a.min()), int(a.max())
                if lo < 0 or hi >= item.classes:
                    r = int(np.flatnonzero((a < 0) | (a >= item.classes))[0])
                    raise DataError(f"labels {name!r}: row {r} holds class {int(a[r])}, outside 0 … {item.classes - 1}")
        else:
            a = np.ascontiguousarray(real_array(raw, f"data {name!r}"))
            if a.shape[1:] != shape or a.ndim != 1 + len(shape):
                want = "(N,)" if not shape else f"(N, {', '.join(map(str, shape))})"
                raise DataError(f"data {name!r} must have shape {want} (one row per data row), got {a.shape}")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise DataError(f"data {name!r} has {a.shape[0]} rows but {cost.data_names[0]!r} has {n}")
        arrays.append(a)
    if n == 0:
        raise DataError("the data have no rows")
    td = TensorData(tuple(arrays), n, False)
    if check_finite:
        raise_nonfinite(cost, td)
        td.checked = True
    return td


def check_data(cost: TensorCost, td: TensorData, skip=()):
    """raise_nonfinite for the data not in ``skip``, at the price of one reduction each."""
    for item, name, a in zip(cost.data, cost.data_names, td.arrays):
        if not isinstance(item, Label) and name not in skip and not np.isfinite(np.add.reduce(a, axis=None)):
            raise_nonfinite(cost, td)  # (or an overflowing sum of finite values: then it finds none)


def raise_nonfinite(cost: TensorCost, td: TensorData):
    """A DataError naming the first non-finite datum (its name, row and entry), if any."""
    for item, name, a in zip(cost.data, cost.data_names, td.arrays):
        if isinstance(item, Label):
            continue
        ok = np.isfinite(a)
        if not ok.all():
            pos = np.unravel_index(int(np.flatnonzero(~ok.reshape(-1))[0]), a.shape)
            entry = f"[{', '.join(map(str, pos[1:]))}]" if len(pos) > 1 else ""
            raise DataError(f"data {name!r} is {a[pos]} at row {pos[0]}{' entry ' + entry if entry else ''}: "
                            "data must be finite")


def stripes(n: int, block: int) -> list:
    """[(first row, end row)] of the stripes of ``n`` rows: whole blocks, fixed by n alone."""
    nblocks = -(-n // block)
    s = max(1, min(STRIPES, nblocks))
    return [((k * nblocks // s) * block, min(n, ((k + 1) * nblocks // s) * block)) for k in range(s)]


def thread_count(parallel, n_rows: int) -> int:
    """Threads for a pass over n_rows: calcml's, unless too few rows pay for them."""
    if parallel is True or (parallel == "auto" and n_rows >= PARALLEL_MIN_ROWS):
        return native.thread_count()
    return 1


def run_striped(rows, theta, v, args, parts, scale, acc, threads: int, extra=()):
    """``rows(theta, v, *args, lo, hi, scale, acc[k], *extra)`` for each stripe (lo, hi) of
    ``parts``, on up to ``threads`` of calcml's threads: each stripe's sums go to its own row
    of ``acc``, so the bits do not depend on the threads."""
    threads = min(threads, len(parts))
    with _SingleThreadedBlas():
        if threads <= 1:
            for k, (lo, hi) in enumerate(parts):
                rows(theta, v, *args, lo, hi, scale, acc[k], *extra)
            return
        if hasattr(rows, "signatures") and not rows.signatures:  # a dispatcher: compile (or load) here first
            rows(theta, v, *args, 0, 0, scale, np.zeros_like(acc[0]), *extra)

        def job(i):
            for k in range(i, len(parts), threads):
                lo, hi = parts[k]
                rows(theta, v, *args, lo, hi, scale, acc[k], *extra)

        native.pool.run(job, threads)


_P = ctypes.c_void_p
_I = ctypes.c_int64
_D = ctypes.c_double


def _native_entry_points(mod, kind: str, has_data: bool):
    """(rows maker, finish) over the machine code of ``mod``'s ``<kind>_rows_c`` and
    ``<kind>_finish_c`` (see ``_native``), or None. ``kind`` "hvp_lin" and "hvp_at": the
    Hessian-vector product's parts that keep a point's row tensors (``hvp_lin_rows_c``,
    ``hvp_at_rows_c``, finished by ``hvp_finish_c``); their rows maker takes the kept arrays
    too: ``rows_for(n, arrays, kept)``."""
    from ..compile import _jit_disabled
    from ..codegen import KERNEL_FLAGS

    kept = kind in ("hvp_lin", "hvp_at")
    base = "hvp" if kept else kind
    if _jit_disabled() or not hasattr(mod, f"{base}_finish_c") or (kept and not hasattr(mod, f"{kind}_rows_c")):
        return None
    fns = {}
    for part, name, sig in (("rows", f"{kind}_rows_c", mod.SIG_ROWS_KEPT if kept else mod.SIG_ROWS),
                            ("finish", f"{base}_finish_c", mod.SIG_FINISH)):
        if part == "rows" and not has_data:
            continue
        try:
            address, keep, _ = native.load_or_compile(mod._calcml_path, name,
                                                      lambda: (getattr(mod, name), sig, KERNEL_FLAGS))
        except Exception:  # noqa: BLE001 - the njit kernels serve (they compile on their own)
            return None
        fns[part] = (address, keep)
    finish_fn = ctypes.CFUNCTYPE(None, _P, _P, _P, _P)(fns["finish"][0])
    finish_fn._calcml_keep = fns["finish"][1]

    def finish(theta, v, acc, out):
        finish_fn(theta.ctypes.data, v.ctypes.data, acc.ctypes.data, out.ctypes.data)
    finish.raw = finish_fn  # on addresses: (theta, v, the stripes' sums, out)

    if not has_data:
        return (None, finish)
    n_data = len(mod.SIG_ROWS.args) - 7  # theta, v, the data, n, r0, r1, scale, acc
    n_kept = len(mod.HVP_CACHE) if kept else 0
    rows_fn = ctypes.CFUNCTYPE(None, _P, _P, *([_P] * n_data), _I, _I, _I, _D, _P, *([_P] * n_kept))(fns["rows"][0])
    rows_fn._calcml_keep = fns["rows"][1]

    def rows_for(n, arrays, kept_arrays=()):
        """rows(theta, v, *arrays, lo, hi, scale, acc) over these arrays (and the kept row
        tensors: addresses taken once)"""
        addresses = [a.ctypes.data for a in arrays]
        tail = [a.ctypes.data for a in kept_arrays]

        def rows(theta, v, *rest):
            lo, hi, scale, acc = rest[len(addresses):len(addresses) + 4]
            rows_fn(theta.ctypes.data, v.ctypes.data, *addresses, n, lo, hi, scale, acc.ctypes.data, *tail)
        return rows
    rows_for.raw = rows_fn  # on addresses: (theta, v, the data, n, r0, r1, scale, acc, the kept arrays)

    return (rows_for, finish)


def sum_in_order(acc) -> np.ndarray:
    """The stripes' sums added in stripe order (a fixed order: the same bits on any threads)."""
    total = acc[0].copy()
    for k in range(1, acc.shape[0]):
        total += acc[k]
    return total


# The most parameters k.hessian builds a dense Hessian for (n passes over the data, n**2 floats:
# 128 MiB at 4096); beyond, Hessian-vector products (k.hvp, method="newton-cg").
HESSIAN_MAX = 4096


class TensorKernels:
    """Compiled kernels of one :class:`~calcml.tensor.model.TensorCost` (see :func:`calcml.compile`)."""

    def __init__(self, cost: TensorCost, parallel="auto"):
        if parallel not in ("auto", True, False):
            raise ValueError(f"parallel must be 'auto', True or False, got {parallel!r}")
        self.cost = cost
        self.parallel = parallel
        self._n = cost.n_params
        self._modules: dict = {}
        self._native_fns: dict = {}
        self._empty = np.zeros(0)

    def __repr__(self):
        return f"<calcml.Kernels for {self.cost!r}>"

    # -- modules ----------------------------------------------------------------------------
    def _module(self, group: str):
        """The generated module of ``group``: "base" (value, vg) or "hvp"."""
        mod = self._modules.get(group)
        if mod is None:
            from ..compile import _fingerprint, load_or_build

            kinds = ("value", "vg") if group == "base" else ("hvp",)
            key = hashlib.sha256(f"tensor-{group}|{_fingerprint()}|{self.cost.key}".encode()).hexdigest()
            mod, text, path = load_or_build(key, lambda: self.cost.module_source(kinds, entry_points=True)[0])
            mod._calcml_text, mod._calcml_path, mod._calcml_key = text, path, key
            self._modules[group] = mod
        return mod

    @property
    def source(self) -> str:
        """The generated Python source of the value and gradient kernels."""
        return self._module("base")._calcml_text

    @property
    def path(self):
        return self._module("base")._calcml_path

    @property
    def hvp_source(self) -> str:
        return self._module("hvp")._calcml_text

    # -- inputs -----------------------------------------------------------------------------
    def prepare(self, data) -> TensorData:
        """Validate ``data`` once (shapes, labels, finiteness) for repeated calls."""
        return as_tensor_data(self.cost, data, check_finite=True)

    def _theta(self, theta, what="theta") -> np.ndarray:
        if isinstance(theta, dict):
            return self.cost.pack(theta)
        t = np.ascontiguousarray(real_array(theta, what, ParamError))
        if t.shape != (self._n,):
            raise ParamError(f"{what} must have shape ({self._n},) (parameters {list(self.cost.param_names)} in C "
                             f"order) or be a dict of arrays; got shape {t.shape}")
        if not math.isfinite(float(t @ t)):
            j = int(np.flatnonzero(~np.isfinite(t))[0])
            raise ParamError(f"{what}[{j}] ({self.cost.flat_names()[j]}) is {t[j]}: it must be finite")
        return t

    # -- running ----------------------------------------------------------------------------
    def _run(self, kind: str, theta, v, data, part=None, kept=None) -> np.ndarray:
        """Run ``<kind>_rows`` over the stripes, add the stripes' sums in order, and
        ``<kind>_finish`` them into the outputs. ``part`` "lin" or "at" (kind "hvp"): the rows'
        tensors that do not depend on v into the arrays ``kept`` (``hvp_lin_rows``; nothing is
        returned), or the product that reads them (``hvp_at_rows``)."""
        if data is not None and part is None and is_dask(data):
            from ..dask_data import tensor_run  # one task per chunk of rows where it lives

            return tensor_run(self, kind, theta, v, data)
        mod = self._module("hvp" if kind == "hvp" else "base")
        td = as_tensor_data(self.cost, data)
        nout = {"value": 1, "vg": 1 + self._n, "hvp": self._n}[kind]
        out = np.empty(nout)
        acc_size = mod.ACC_SIZES[kind]
        finish = getattr(mod, f"{kind}_finish") if part != "lin" else None
        native_fns = self._native(kind if part is None else f"{kind}_{part}", mod)
        if native_fns is not None and finish is not None:
            finish = native_fns[1]
        if not self.cost.has_data:
            finish(theta, v, np.zeros(max(acc_size, 1)), out)
            return out
        n = td.n_rows
        if not td.checked:  # data the outputs' test does not cover: checked now, by name
            covered = getattr(mod, f"COVERED_{kind.upper()}", ())
            check_data(self.cost, td, skip=covered)
        parts = stripes(n, mod.BLOCK)
        acc = np.zeros((len(parts), max(acc_size, 1)))
        extra = ()
        if native_fns is not None:
            rows = native_fns[0](n, td.arrays, kept or ())
        else:
            rows = getattr(mod, f"{kind}_rows" if part is None else f"{kind}_{part}_rows")
            extra = (kept,) if part is not None else ()
        scale = 1.0 / n if self.cost.reduce == "mean" else 1.0
        run_striped(rows, theta, v, td.arrays, parts, scale, acc, thread_count(self.parallel, n), extra)
        if not finish:
            return None
        finish(theta, v, sum_in_order(acc), out)
        if not td.checked and not np.all(np.isfinite(out)):
            raise_nonfinite(self.cost, td)  # names the datum; else the values are what they are
        return out


    def _native(self, kind: str, mod):
        """(rows for n rows, finish): kernel ``kind``'s C entry points (``<kind>_rows_c``,
        ``<kind>_finish_c``) as functions of arrays, their machine code loaded from beside
        the module (a later process starts no Numba for them) or compiled with
        ``numba.cfunc`` and kept there; None where the module has none or Numba's JIT is off."""
        found = self._native_fns.get(kind)
        if found is None:
            found = self._native_fns[kind] = _native_entry_points(mod, kind, self.cost.has_data) or False
        return found or None

    def value(self, theta, data=None) -> float:
        """The reduced cost (plus the penalty)."""
        return float(self._run("value", self._theta(theta), self._empty, data)[0])

    def value_and_grad(self, theta, data=None) -> tuple:
        """``(value, gradient)`` from one pass over the data; the gradient in ``theta`` order."""
        out = self._run("vg", self._theta(theta), self._empty, data)
        return float(out[0]), out[1:].copy()

    def grad(self, theta, data=None) -> np.ndarray:
        """The reduced gradient, flat, in ``theta`` order."""
        return self._run("vg", self._theta(theta), self._empty, data)[1:].copy()

    def hvp(self, theta, v, data=None) -> np.ndarray:
        """The exact Hessian-vector product ``H(theta) v``, in one pass over the data."""
        return self._run("hvp", self._theta(theta), self._theta(v, "v"), data)

    def hvp_at(self, theta, data=None):
        """``hv(v)``: exact Hessian-vector products at ``theta``, sharing one forward sweep.

        The rows' tensors that do not depend on ``v`` (for softmax regression: the logits
        and the softmax) are computed once here and kept (one value per row and class); each
        product then only runs what depends on ``v``. Newton-CG takes many products at one
        point: this is its inner loop."""
        t = self._theta(theta).copy()
        if data is not None and is_dask(data):  # no rows kept between products: one Dask pass each
            return lambda v: self._run("hvp", t, self._theta(v, "v"), data)
        td = as_tensor_data(self.cost, data)
        mod = self._module("hvp")
        if not self.cost.has_data or not hasattr(mod, "hvp_lin_rows"):
            return lambda v: self._run("hvp", t, self._theta(v, "v"), td)
        kept = tuple(np.empty((td.n_rows, *shape)) for _, shape in mod.HVP_CACHE)
        self._run("hvp", t, t, td, part="lin", kept=kept)  # (v unread: theta stands in, N_PARAMS long)
        fast = self.prepared("hvp", td, theta=t, part="at", kept=kept)
        if fast is not None:
            return lambda v: fast(None, v)
        return lambda v: self._run("hvp", t, self._theta(v, "v"), td, part="at", kept=kept)

    def prepared(self, kind: str, data, theta=None, part=None, kept=()):
        """``f(theta, v) -> outputs`` (a new array) of kernel ``kind`` over ``data``, as
        :meth:`_run` computes them (the same bits), for repeated calls on one thread over
        checked data: every address is taken once, ``theta`` and ``v`` are copied into buffers,
        each stripe is one call of the C entry, the stripes' sums are added in order into one
        buffer and finished there. A call costs a few microseconds beyond its pass over the
        rows, where :meth:`_run` costs tens: Newton-CG takes thousands of products on a small
        cost. ``theta``: fixed (f's theta is then ignored); ``part``, ``kept``: as for
        :meth:`_run` ("at" only). None where that does not apply (threads, Dask data, data not
        checked, no data, no machine code)."""
        if data is None or is_dask(data) or not self.cost.has_data:
            return None
        td = as_tensor_data(self.cost, data)
        mod = self._module("hvp" if kind == "hvp" else "base")
        fns = self._native(kind if part is None else f"{kind}_{part}", mod)
        if fns is None or not td.checked or thread_count(self.parallel, td.n_rows) > 1:
            return None
        n, size = td.n_rows, max(mod.ACC_SIZES[kind], 1)
        parts = stripes(n, mod.BLOCK)
        acc, total = np.zeros((len(parts), size)), np.empty(size)
        tbuf = np.array(theta, dtype=np.float64) if theta is not None else np.empty(self._n)
        vbuf = np.empty(self._n if kind == "hvp" else 0)
        out = np.empty({"value": 1, "vg": 1 + self._n, "hvp": self._n}[kind])
        rows_fn, finish_fn = fns[0].raw, fns[1].raw
        head = (tbuf.ctypes.data, vbuf.ctypes.data, *(a.ctypes.data for a in td.arrays), n)
        tail = tuple(a.ctypes.data for a in kept)
        scale = 1.0 / n if self.cost.reduce == "mean" else 1.0
        calls = [(lo, hi, acc[k].ctypes.data) for k, (lo, hi) in enumerate(parts)]
        ends = (tbuf.ctypes.data, vbuf.ctypes.data, total.ctypes.data, out.ctypes.data)
        fixed = theta is not None
        check = self._theta

        def f(theta=None, v=None):
            if not fixed:
                tbuf[:] = check(theta)
            if v is not None:
                vbuf[:] = check(v, "v")
            acc[:] = 0.0
            with _SingleThreadedBlas():
                for lo, hi, a in calls:
                    rows_fn(*head, lo, hi, scale, a, *tail)
            total[:] = acc[0]
            for k in range(1, acc.shape[0]):
                np.add(total, acc[k], out=total)
            finish_fn(*ends)
            return out.copy()
        f.buffers = (td, kept, acc, total, tbuf, vbuf, out)  # alive while f is: the calls use their addresses
        return f

    def hessian(self, theta, data=None) -> np.ndarray:
        """The reduced Hessian ``(n, n)``, column by column from exact Hessian-vector products."""
        t = self._theta(theta)
        if data is not None and is_dask(data) and self._n <= HESSIAN_MAX:
            from ..dask_data import tensor_hessian  # every column in one Dask computation

            return tensor_hessian(self, t, data)
        if self._n > HESSIAN_MAX:
            raise ParamError(f"the Hessian of {self._n} parameters takes {self._n ** 2 * 8 / 2**30:.1f} GiB; "
                             "use k.hvp(theta, v, data) (exact Hessian-vector products) instead")
        hv = self.hvp_at(t, data)
        H = np.empty((self._n, self._n))
        e = np.zeros(self._n)
        for i in range(self._n):
            e[i] = 1.0
            H[:, i] = hv(e)
            e[i] = 0.0
        return 0.5 * (H + H.T)


def compile_tensor(cost: TensorCost, parallel="auto") -> TensorKernels:
    from ..compile import cache_dir

    key = (cost.key, parallel, str(cache_dir()))
    with _lock:
        found = _loaded.get(key)
        if found is None:
            found = _loaded[key] = TensorKernels(cost, parallel)
        return found
