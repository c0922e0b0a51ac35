"""Generated source -> content-addressed module file -> machine code -> kernels.

The cache is a folder of ``.py`` modules named by a hash of the cost statement, of
calcml's code-generating modules and of the SymPy, NumPy and Numba versions. Each kernel
of a module is compiled on first use with ``numba.cfunc`` and its machine code is kept
beside the module (``<module>.<kernel>.<cpu>.o``, see :mod:`calcml.native`), so a second
process that asks for the same cost neither differentiates, nor imports the module, nor
starts Numba's compiler: it checks the module's checksum line and maps the machine code.
Optimizer modules (:mod:`calcml.loop`) use the same files and Numba's own ``cache=True``.

* Writes are atomic (temporary file + ``os.replace``): two processes compiling the same
  cost at once both succeed, and a reader never sees half a file.
* Every module ends with a SHA-256 of its text and every object file starts with one; a
  corrupt or truncated file fails the check and is rebuilt. A corrupt Numba cache entry of
  an optimizer module is removed and recompiled (:mod:`calcml.loop`).
* The folder is created private to the user (mode 0700).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import math
import os
import sys
import threading
from pathlib import Path

import numpy as np

from . import _version, native
from .codegen import CHUNK, HESSIAN_INLINE_MAX, LANES, kernel_slots
from .cost import Cost
from .dataset import Dataset, address, as_dataset, is_dask, pack, real_array
from .errors import CacheError, CodegenError, ParamError

__all__ = ["compile", "Kernels", "cache_dir"]

_CHECKSUM_PREFIX = "# calcml-sha256: "
# Below this many rows the serial kernel runs: threads cost more than they save.
PARALLEL_MIN_ROWS = 65536

# The cache key covers the code of every module of the package (calcml/**/*.py): any of them
# may shape a generated module (the printers, the derivations, the optimizers' text, the
# line-search steps copied into exported modules), and a list kept by hand had missed some.
_PACKAGE = Path(__file__).parent
_lock = threading.RLock()
_loaded: dict[str, "Kernels"] = {}
# object file path -> ctypes entry point, for every kernel this process loaded or compiled
_machine_code: dict = {}


def _generator_fingerprint(package: Path = _PACKAGE) -> str:
    """Hash of the package's code (each file's path and bytes): a change to any file is a new
    cache key, so no cached module outlives the code that wrote it."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if "__pycache__" in rel:
            continue
        data = path.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _versions() -> str:
    import numba
    import sympy

    return f"calcml={_version.__version__} sympy={sympy.__version__} numpy={np.__version__} numba={numba.__version__}"


_FINGERPRINT = None


def _fingerprint() -> str:
    global _FINGERPRINT
    if _FINGERPRINT is None:
        _FINGERPRINT = hashlib.sha256(f"{_versions()}|{_generator_fingerprint()}".encode()).hexdigest()
    return _FINGERPRINT


def cache_dir() -> Path:
    """``$CALCML_CACHE_DIR``, else ``$XDG_CACHE_HOME/calcml``, else ``~/.cache/calcml``; created 0700."""
    env = os.environ.get("CALCML_CACHE_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "calcml"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the kernel cache folder {str(path)!r}: {exc.strerror}") from None
    return path


def _with_checksum(text: str) -> str:
    return text + _CHECKSUM_PREFIX + hashlib.sha256(text.encode()).hexdigest() + "\n"


def _checked(text: str) -> bool:
    head, sep, last = text.rstrip("\n").rpartition("\n")
    if not sep or not last.startswith(_CHECKSUM_PREFIX):
        return False
    body = head + "\n"
    return last[len(_CHECKSUM_PREFIX):] == hashlib.sha256(body.encode()).hexdigest()


def _write_atomic(path: Path, text: str):
    native.write_atomic(path, text.encode("utf-8"), suffix=".py")


def _import_module(name: str, path: Path):
    """Import a generated module by path, registered in sys.modules so Numba can cache it."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _clear_numba_cache(path: Path):
    pycache = path.parent / "__pycache__"
    for f in pycache.glob(f"{path.stem}.*.nb[ic]"):
        try:
            f.unlink()
        except OSError:
            pass


def load_or_build(key: str, build_source, import_module: bool = True) -> tuple:
    """(module, source text, path) for ``key``: from the cache if valid, else built and written.

    ``import_module=False`` leaves the module unimported (None): the kernels import it only
    when a kernel's machine code is not in the cache yet."""
    folder = cache_dir()
    name = f"calcml_{key[:40]}"
    path = folder / f"{name}.py"
    text = None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = None
    if text is None or not _checked(text):
        text = _with_checksum(build_source())
        try:
            _write_atomic(path, text)
        except OSError as exc:
            raise CacheError(f"cannot write the kernel cache file {str(path)!r}: {exc}") from None
        _clear_numba_cache(path)
        _clear_objects(path)
    if not import_module:
        return None, text, path
    return import_cached(path), text, path


def import_cached(path: Path):
    """The generated module at ``path`` (imported once per process)."""
    name = path.stem
    module = sys.modules.get(name)
    if module is None or getattr(module, "__file__", None) != str(path):
        module = _import_module(name, path)
    return module


def _clear_objects(path: Path):
    """Drop the machine code kept for an older text of the module at ``path``, and the Python
    tier's time counted for it (``<module>.python-seconds``)."""
    for f in [*path.parent.glob(f"{path.stem}.*.o"), path.parent / f"{path.name}.python-seconds"]:
        try:
            f.unlink()
        except OSError:
            pass


class Kernels:
    """Compiled kernels of one :class:`~calcml.Cost`: ``value``, ``grad``, ``value_and_grad``, ``hessian``.

    ``data`` is a dict ``{name: 1-D array}``, a 2-D array with one column per data symbol,
    a pandas DataFrame, or a :class:`~calcml.dataset.Dataset` from :meth:`prepare` (which
    skips validation and conversion: use it when calling repeatedly on the same data).
    Omit ``data`` for a cost without data columns. Dask data (a 2-D Dask array, a Dask
    DataFrame, a dict of Dask arrays) are evaluated chunk by chunk where they live, the
    chunks' sums added on the client (see :mod:`calcml.dask_data`).

    ``parallel``: ``"auto"`` (threads for at least ``PARALLEL_MIN_ROWS`` rows), ``True`` or
    ``False``. Threaded and serial calls give bit-identical results: both sum the same
    fixed-size chunks of rows and combine the chunk sums in the same order. The thread
    count is Numba's (``NUMBA_NUM_THREADS``, or ``numba.set_num_threads``).

    Each kernel is compiled on first use (``numba.cfunc``) and its machine code kept in the
    cache, so a later process loads it in milliseconds (see :mod:`calcml.native`).
    """

    def __init__(self, cost: Cost, module, source: str, path: Path, parallel="auto"):
        if parallel not in ("auto", True, False):
            raise ValueError(f"parallel must be 'auto', True or False, got {parallel!r}")
        self.cost = cost
        self._module = module
        self.source = source
        self.path = path
        self.parallel = parallel
        self._n = len(cost.params)
        self._has_data = bool(cost.data)
        self._inline_hessian = self._n <= HESSIAN_INLINE_MAX
        self._fns: dict = {}
        self._hessian_path = None
        self.compiled: list = []  # names of the kernels this process compiled (not loaded)

    def __repr__(self):
        return f"<calcml.Kernels for {self.cost!r} at {str(self.path)!r}>"

    @property
    def module(self):
        """The generated module (imported on first access)."""
        if self._module is None:
            self._module = import_cached(self.path)
        return self._module

    # -- inputs ------------------------------------------------------------------------
    def prepare(self, data) -> Dataset:
        """Validate ``data`` once and copy it into calcml's preferred layout, for repeated calls.

        The result is a :class:`~calcml.dataset.Dataset` (one contiguous block, one row
        per column) that every kernel accepts without further checks or copies.
        """
        ds = as_dataset(data, self.cost.data_names, packed=True)
        ds.raise_nonfinite()
        ds.validated = True
        return pack(ds)

    def _theta(self, theta) -> np.ndarray:
        if type(theta) is np.ndarray and theta.dtype == np.float64 and theta.shape == (self._n,):
            # the common case: a finite dot product proves every entry finite
            if math.isfinite(theta.dot(theta)):
                return theta
        t = real_array(theta, "theta", ParamError)
        if t.ndim != 1 or t.shape[0] != self._n:
            raise ParamError(
                f"theta must have shape ({self._n},) in the order {list(self.cost.param_names)}; got shape {t.shape}"
            )
        if not np.all(np.isfinite(t)):
            j = int(np.flatnonzero(~np.isfinite(t))[0])
            raise ParamError(f"theta[{j}] (parameter {self.cost.params[j].name!r}) is {t[j]}: parameters must be finite")
        return np.ascontiguousarray(t)

    # -- machine code ------------------------------------------------------------------
    def _fn(self, kind: str, validated: bool = False):
        """The ctypes entry point of kernel ``kind`` (loaded from the cache, else compiled)."""
        name = kind if not self._has_data else f"{kind}_rows{'_prepared' if validated else ''}"
        fn = self._fns.get(name)
        if fn is None:
            with _lock:
                fn = self._fns.get(name)
                if fn is None:
                    fn = self._fns[name] = self._native(kind, name)
        return fn

    def _native(self, kind: str, name: str):
        path = self.path
        if kind == "hessian" and not self._inline_hessian:
            path = self._hessian()
        if _jit_disabled():  # NUMBA_DISABLE_JIT=1: the generated function itself, run by Python
            module = self.module if path == self.path else import_cached(path)
            return _python_kernel(getattr(module, name), self._has_data)
        memo = str(native.object_path(path, name))
        known = _machine_code.get(memo)
        if known is not None:  # another Kernels of this process (e.g. parallel=True) has it
            return known
        def to_compile():
            module = self.module if path == self.path else import_cached(path)
            return getattr(module, name), module.SIG_ROWS if self._has_data else module.SIG_THETA, module.CFUNC_FLAGS

        try:
            address, keep, compiled = native.load_or_compile(path, name, to_compile)
        except Exception as exc:
            raise CodegenError(
                f"Numba could not compile the generated kernel {name} in {path}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        if compiled:
            self.compiled.append(name)
        proto = _ROWS_PROTO if self._has_data else _THETA_PROTO
        fn = proto(address)
        fn._calcml_keep = keep  # the compiled function owns the code: keep it alive
        _machine_code[memo] = fn
        return fn

    def _hessian(self) -> Path:
        if self._hessian_path is None:
            from .codegen import kernel_module_source

            key = _kernel_key(self.cost, "hessian-module")
            _module, _text, path = load_or_build(
                key, lambda: kernel_module_source(self.cost, hessian_only=True), import_module=False
            )
            self._hessian_path = path
        return self._hessian_path

    # -- calls -------------------------------------------------------------------------
    def _run(self, kind: str, theta, data):
        """Run kernel ``kind``; returns (out, dataset or None). All the call's scratch memory
        (theta, out, the chunk counter, per-chunk sums, lane accumulators) is one array,
        so one address lookup serves every pointer argument."""
        n_par = self._n
        slots, size = kernel_slots(kind, n_par, self._has_data)
        if not self._has_data:
            if data is not None:
                raise ParamError("this cost has no data columns; call the kernel with theta alone")
            ws = np.empty(n_par + size)
            ws[:n_par] = self._theta(theta)
            base = address(ws)
            self._fn(kind)(base, base + 8 * n_par)
            return ws[n_par:], None
        if is_dask(data):  # one task per chunk of rows where it lives (calcml.dask_data)
            from .dask_data import scalar_run

            return scalar_run(self, kind, self._theta(theta), data), None
        ds = as_dataset(data, self.cost.data_names)
        fn = self._fn(kind, ds.validated and ds.block is not None)
        n = ds.n_rows
        nchunks = -(-n // CHUNK)
        use_threads = self.parallel is True or (self.parallel == "auto" and n >= PARALLEL_MIN_ROWS)
        threads = min(native.thread_count(), nchunks) if use_threads else 1
        o_out = n_par
        o_count = o_out + size
        o_part = o_count + 1
        o_acc = o_part + nchunks * slots
        ws = np.empty(o_acc + threads * slots * LANES + 7)
        ws[:n_par] = self._theta(theta)
        ws[o_count] = 0.0  # the chunk counter, an int64 0 (same bits)
        base = address(ws)
        # Lane accumulators on a 64 B boundary: their vector loads and stores, once per block
        # of rows, never straddle two cache lines (a thread's block is 128 B * slots long).
        acc = (base + 8 * o_acc + 63) & ~63
        args = (base, ds.pointer_table(), n, nchunks, base + 8 * o_count, base + 8 * o_part)
        if threads == 1:
            fn(*args, 1, base + 8 * o_out, acc)
        else:
            step = 8 * slots * LANES
            native.pool.run(lambda i: fn(*args, 0, 0, acc + i * step), threads)
            fn(*args, 1, base + 8 * o_out, acc)
        out = ws[o_out:o_count]
        if out[-1] != 0.0:  # the in-pass finiteness check fired
            ds.raise_nonfinite()
        return out, ds

    # -- kernels -----------------------------------------------------------------------
    def value(self, theta, data=None) -> float:
        """The reduced cost."""
        out, ds = self._run("value", theta, data)
        return float(out[0])

    def grad(self, theta, data=None) -> np.ndarray:
        """The reduced gradient, in ``cost.params`` order."""
        out, ds = self._run("grad", theta, data)
        return out[: self._n].copy()

    def value_and_grad(self, theta, data=None) -> tuple:
        """``(value, gradient)`` from one fused pass over the data."""
        out, ds = self._run("value_and_grad", theta, data)
        return float(out[0]), out[1 : self._n + 1].copy()

    def hessian(self, theta, data=None) -> np.ndarray:
        """The reduced Hessian, ``(n, n)``."""
        out, ds = self._run("hessian", theta, data)
        return out[: self._n * self._n].reshape(self._n, self._n).copy()

    def hvp(self, theta, v, data=None) -> np.ndarray:
        """The exact Hessian-vector product ``H(theta) v`` (the Hessian kernel's, then the
        product: a scalar cost's parameters are few; a tensor cost's kernels make it in one
        pass without the Hessian)."""
        vv = real_array(v, "v", ParamError)
        if vv.shape != (self._n,):
            raise ParamError(f"v must have shape ({self._n},), one entry per parameter in the order "
                             f"{list(self.cost.param_names)}; got shape {np.shape(v)}")
        if not np.all(np.isfinite(vv)):
            raise ParamError("v must be finite")
        return self.hessian(theta, data) @ vv


_P = ctypes.c_void_p
_I = ctypes.c_int64
# f(theta, cols, n, nchunks, next_chunk, partial, finalize, out, acc); ctypes releases the GIL.
_ROWS_PROTO = ctypes.CFUNCTYPE(None, _P, _P, _I, _I, _P, _P, _I, _P, _P)
_THETA_PROTO = ctypes.CFUNCTYPE(None, _P, _P)


def _jit_disabled() -> bool:
    """Numba's ``NUMBA_DISABLE_JIT``: its config once Numba is imported, else the variable."""
    numba = sys.modules.get("numba")
    if numba is not None:
        return bool(numba.config.DISABLE_JIT)
    try:
        return bool(int(os.environ.get("NUMBA_DISABLE_JIT", "0")))
    except ValueError:
        return False


def _python_kernel(fn, has_data: bool):
    """A kernel of the generated module run as Python (``NUMBA_DISABLE_JIT=1``: for debugging,
    and to check the compiled code against the same source run by the interpreter).

    It takes the addresses the compiled kernel takes; they are handed to the Python function
    as typed ctypes pointers, which ``numba.carray`` (then plain Python) turns into arrays."""
    f64p = ctypes.POINTER(ctypes.c_double)
    if not has_data:
        def call(theta_p, out_p):
            fn(ctypes.cast(theta_p, f64p), ctypes.cast(out_p, f64p))
        return call
    colsp, i64p = ctypes.POINTER(f64p), ctypes.POINTER(ctypes.c_int64)

    def call(theta_p, cols_p, n, nchunks, next_chunk, partial_p, finalize, out_p, acc_p):
        fn(ctypes.cast(theta_p, f64p), ctypes.cast(cols_p, colsp), n, nchunks, ctypes.cast(next_chunk, i64p),
           ctypes.cast(partial_p, f64p), finalize, ctypes.cast(out_p, f64p), ctypes.cast(acc_p, f64p))
    return call


def _kernel_key(cost: Cost, variant: str) -> str:
    return hashlib.sha256(f"{variant}|{_fingerprint()}|{cost.key}".encode()).hexdigest()


def compile(cost: Cost, parallel="auto") -> Kernels:  # noqa: A001 - the API name
    """Numba-compiled kernels for ``cost``, from the on-disk cache when possible.

    >>> import calcml as cm, numpy as np
    >>> w, b = cm.params("w b"); x, y = cm.data("x y")
    >>> k = cm.compile(cm.Cost((w*x + b - y)**2, params=[w, b], data=[x, y]))
    >>> k.value(np.array([2.0, 1.0]), {"x": np.array([1.0, 2.0]), "y": np.array([3.0, 5.0])})
    0.0
    """
    if not isinstance(cost, Cost):
        raise TypeError(f"cm.compile takes a cm.Cost, got {type(cost).__name__}")
    from .tensor.statement import LIFT_MIN_PARAMS, is_tensor_cost

    if is_tensor_cost(cost) or len(cost.params) >= LIFT_MIN_PARAMS:
        from .tensor.kernels import compile_tensor
        from .tensor.lift import LiftedKernels, lifted_for

        if is_tensor_cost(cost):
            return compile_tensor(cost, parallel)
        lifted = lifted_for(cost)  # many parameters in numbered families: index notation builds faster
        if lifted is not None:
            return LiftedKernels(cost, compile_tensor(lifted[0], parallel), lifted[1])
    key = _kernel_key(cost, "kernels")
    memo = (key, parallel, str(cache_dir()))
    with _lock:
        cached = _loaded.get(memo)
        if cached is not None:
            return cached
        from .codegen import kernel_module_source

        module, text, path = load_or_build(key, lambda: kernel_module_source(cost), import_module=False)
        kernels = Kernels(cost, module, text, path, parallel=parallel)
        _loaded[memo] = kernels
        return kernels
