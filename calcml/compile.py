"""Generated source -> content-addressed module file -> import -> kernels.

The cache is a folder of ``.py`` modules named by a hash of the cost statement, of
calcml's code-generating modules and of the SymPy, NumPy and Numba versions. Numba's own
``cache=True`` keeps the machine code beside each module (``__pycache__``), so a second
process that asks for the same cost neither differentiates nor compiles: it reads the
file, checks its checksum line and imports it.

* Writes are atomic (temporary file + ``os.replace``): two processes compiling the same
  cost at once both succeed, and a reader never sees half a file.
* Every module ends with a SHA-256 of its text; a corrupt or truncated module fails the
  check and is rebuilt. A corrupt Numba cache entry is detected on first call, removed
  and recompiled.
* The folder is created private to the user (mode 0700).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from . import _version
from .cost import Cost
from .dataset import Dataset, as_dataset, pack
from .errors import CacheError, CodegenError, ParamError

__all__ = ["compile", "Kernels", "cache_dir"]

_CHECKSUM_PREFIX = "# calcml-sha256: "
# Below this many rows the serial kernel runs: threads cost more than they save.
PARALLEL_MIN_ROWS = 65536

_GENERATOR_FILES = ("codegen.py", "printing.py", "rewrite.py", "functions.py", "compile.py")
_lock = threading.RLock()
_loaded: dict[str, "Kernels"] = {}


def _generator_fingerprint() -> str:
    """Hash of the code that writes modules: any change to it invalidates the cache."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _GENERATOR_FILES:
        h.update((here / name).read_bytes())
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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


def load_or_build(key: str, build_source) -> tuple:
    """(module, source text, path) for ``key``: from the cache if valid, else built and written."""
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
    module = sys.modules.get(name)
    if module is None or getattr(module, "__file__", None) != str(path):
        module = _import_module(name, path)
    return module, text, path


class _Kernel:
    """One generated function: guards the first call against a corrupt Numba cache entry."""

    __slots__ = ("dispatcher", "path", "checked")

    def __init__(self, dispatcher, path):
        self.dispatcher = dispatcher
        self.path = path
        self.checked = False

    def __call__(self, *args):
        if self.checked:
            return self.dispatcher(*args)
        try:
            out = self.dispatcher(*args)
        except Exception as first:
            # A corrupt cache entry fails while unpickling; drop the entries and compile afresh.
            _clear_numba_cache(self.path)
            try:
                out = self.dispatcher(*args)
            except Exception:
                raise CodegenError(
                    f"Numba could not compile the generated kernel {self.dispatcher.__name__} "
                    f"in {self.path}: {type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}"
                ) from first
        self.checked = True
        return out


class Kernels:
    """Compiled kernels of one :class:`~calcml.Cost`: ``value``, ``grad``, ``value_and_grad``, ``hessian``.

    ``data`` is a dict ``{name: 1-D array}``, a 2-D array with one column per data symbol,
    a pandas DataFrame, or a :class:`~calcml.dataset.Dataset` from :meth:`prepare` (which
    skips validation and conversion: use it when calling repeatedly on the same data).
    Omit ``data`` for a cost without data columns.

    ``parallel``: ``"auto"`` (threads for at least ``PARALLEL_MIN_ROWS`` rows), ``True`` or
    ``False``. The threaded and serial kernels give bit-identical results: both sum the
    same fixed-size chunks of rows and combine the chunk sums in the same order.
    """

    def __init__(self, cost: Cost, module, source: str, path: Path, parallel="auto"):
        if parallel not in ("auto", True, False):
            raise ValueError(f"parallel must be 'auto', True or False, got {parallel!r}")
        self.cost = cost
        self.module = module
        self.source = source
        self.path = path
        self.parallel = parallel
        self._n = len(cost.params)
        self._has_data = bool(cost.data)
        self._fns: dict[str, _Kernel] = {}
        self._hessian_module = None

    def __repr__(self):
        return f"<calcml.Kernels for {self.cost!r} at {str(self.path)!r}>"

    # -- inputs ------------------------------------------------------------------------
    def prepare(self, data) -> Dataset:
        """Validate ``data`` once and copy it into calcml's preferred layout, for repeated calls.

        The result is a :class:`~calcml.dataset.Dataset` (one contiguous block, one row
        per column) that every kernel accepts without further checks or copies.
        """
        ds = as_dataset(data, self.cost.data_names)
        ds.raise_nonfinite()
        ds.validated = True
        return pack(ds)

    def _theta(self, theta) -> np.ndarray:
        try:
            t = np.asarray(theta, dtype=np.float64)
        except (TypeError, ValueError):
            raise ParamError(f"theta must be a 1-D array of {self._n} floats, got {type(theta).__name__}") from None
        if t.ndim != 1 or t.shape[0] != self._n:
            raise ParamError(
                f"theta must have shape ({self._n},) in the order {list(self.cost.param_names)}; got shape {t.shape}"
            )
        if not np.all(np.isfinite(t)):
            j = int(np.flatnonzero(~np.isfinite(t))[0])
            raise ParamError(f"theta[{j}] (parameter {self.cost.params[j].name!r}) is {t[j]}: parameters must be finite")
        return np.ascontiguousarray(t)

    def _fn(self, kind: str, parallel: bool = False, validated: bool = False) -> _Kernel:
        name = kind
        if self._has_data:
            name = f"{kind}_{'parallel' if parallel else 'serial'}{'_prepared' if validated else ''}"
        fn = self._fns.get(name)
        if fn is None:
            module, path = self.module, self.path
            if kind == "hessian" and not module.HAS_HESSIAN:
                module, path = self._hessian()
            fn = self._fns[name] = _Kernel(getattr(module, name), path)
        return fn

    def _hessian(self):
        if self._hessian_module is None:
            from .codegen import kernel_module_source

            key = _kernel_key(self.cost, "hessian-module")
            module, _text, path = load_or_build(key, lambda: kernel_module_source(self.cost, hessian_only=True))
            self._hessian_module = (module, path)
        return self._hessian_module

    def _run(self, kind: str, theta, data):
        t = self._theta(theta)
        if not self._has_data:
            if data is not None:
                raise ParamError("this cost has no data columns; call the kernel with theta alone")
            return self._fn(kind)(t), None
        ds = as_dataset(data, self.cost.data_names)
        use_threads = self.parallel is True or (self.parallel == "auto" and ds.n_rows >= PARALLEL_MIN_ROWS)
        if ds.validated and ds.block is not None:
            out = self._fn(kind, use_threads, True)(t, ds.block, ds.n_rows)
        else:
            out = self._fn(kind, use_threads, False)(t, ds.columns)
        if out[-1] != 0.0:  # the in-kernel finiteness check fired
            ds.raise_nonfinite()
        return out, ds

    # -- kernels -----------------------------------------------------------------------
    def value(self, theta, data=None) -> float:
        """The reduced cost."""
        out, ds = self._run("value", theta, data)
        return float(out if ds is None else out[0])

    def grad(self, theta, data=None) -> np.ndarray:
        """The reduced gradient, in ``cost.params`` order."""
        out, ds = self._run("grad", theta, data)
        return out.copy() if ds is None else out[: self._n].copy()

    def value_and_grad(self, theta, data=None) -> tuple:
        """``(value, gradient)`` from one fused pass over the data."""
        out, ds = self._run("value_and_grad", theta, data)
        return float(out[0]), out[1 : self._n + 1].copy()

    def hessian(self, theta, data=None) -> np.ndarray:
        """The reduced Hessian, ``(n, n)``."""
        out, ds = self._run("hessian", theta, data)
        return out[: self._n * self._n].reshape(self._n, self._n).copy()


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
    key = _kernel_key(cost, "kernels")
    memo = (key, parallel, str(cache_dir()))
    with _lock:
        cached = _loaded.get(memo)
        if cached is not None:
            return cached
        from .codegen import kernel_module_source

        module, text, path = load_or_build(key, lambda: kernel_module_source(cost))
        kernels = Kernels(cost, module, text, path, parallel=parallel)
        _loaded[memo] = kernels
        return kernels
