"""Machine code for the kernels: compiled once with ``numba.cfunc``, then loaded without Numba.

A kernel of the generated module (see :mod:`calcml.codegen`) is a plain Python function
over raw pointers. The first process that needs it compiles it with ``numba.cfunc`` and
keeps the object code Numba's LLVM produced in the cache, beside the module, in a file
named for the host CPU. Every later process maps that object with llvmlite's MCJIT and
calls it through ``ctypes``: a few milliseconds, where loading a Numba-cached dispatcher
costs Numba's whole start-up (its typing and target contexts, and an import of
``scipy.linalg`` when SciPy is installed): about half a second.

* The object file ends a header that holds its SHA-256, the entry symbol and the external
  symbols it needs; a file that fails the check, needs a symbol this process cannot
  supply, or that LLVM refuses, is compiled afresh and rewritten (atomically).
* External symbols are resolved exactly as Numba resolves them for its own JIT: its C
  helpers, its runtime (NRT) entry points, the C math functions of CPython's runtime and
  the built-in exception objects.
* Threads: a call over large data runs the kernel on several threads at once (ctypes
  releases the GIL); each thread claims the next chunk of rows with an atomic counter and
  writes that chunk's sums to the chunk's own row, and the sums are added in chunk order
  at the end, so any number of threads gives the same bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

__all__ = ["host_key", "load", "compile_cfunc", "load_or_compile", "ThreadPool", "pool", "thread_count"]

_MAGIC = b"calcml-object 1\n"
_lock = threading.RLock()
_engines: list = []  # every MCJIT engine made here lives as long as the process
_target_machine = None
_host_key = None


def _llvm():
    import llvmlite.binding as ll

    return ll


def host_key() -> str:
    """Short hash of what the machine code depends on: CPU, LLVM, Numba."""
    global _host_key
    if _host_key is None:
        ll = _llvm()
        import llvmlite
        import numba

        cpu = os.environ.get("NUMBA_CPU_NAME") or ll.get_host_cpu_name()
        feats = os.environ.get("NUMBA_CPU_FEATURES") or ll.get_host_cpu_features().flatten()
        text = f"{ll.get_process_triple()}|{cpu}|{feats}|llvmlite={llvmlite.__version__}|numba={numba.__version__}"
        _host_key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return _host_key


def object_path(module_path: Path, name: str) -> Path:
    """Where the machine code of function ``name`` of the module at ``module_path`` is kept."""
    return module_path.with_name(f"{module_path.stem}.{name}.{host_key()}.o")


# -- symbols ---------------------------------------------------------------------------------

_registered = False


def _register_runtime_symbols():
    """Make Numba's runtime symbols known to LLVM, as Numba does before its own JIT runs."""
    global _registered
    if _registered:
        return
    ll = _llvm()
    import builtins

    from numba import _dynfunc, _helperlib
    from numba.core import intrinsics
    from numba.core.runtime import _nrt_python

    ll.add_symbol("_Py_NoneStruct", id(None))
    for helpers in (_helperlib.c_helpers, _dynfunc.c_helpers):
        for py_name, address in helpers.items():
            ll.add_symbol("numba_" + py_name, address)
    for obj in vars(builtins).values():
        if isinstance(obj, type) and issubclass(obj, BaseException):
            ll.add_symbol(f"PyExc_{obj.__name__}", id(obj))
    for fname in intrinsics.INTR_MATH:
        ll.add_symbol(fname, _helperlib.c_helpers[fname])
    for py_name, address in _nrt_python.c_helpers.items():
        ll.add_symbol(py_name if py_name.startswith("_") else "NRT_" + py_name, address)
    _registered = True


def _machine():
    global _target_machine
    if _target_machine is None:
        ll = _llvm()
        ll.initialize_native_target()
        ll.initialize_native_asmprinter()
        target = ll.Target.from_triple(ll.get_process_triple())
        _target_machine = target.create_target_machine(jit=True)
        # An engine's creation also opens this process's own symbols (CPython's C API,
        # libc) to symbol lookup.
        _engines.append(ll.create_mcjit_compiler(ll.parse_assembly(""), _target_machine))
        _register_runtime_symbols()
    return _target_machine


# -- the object cache ------------------------------------------------------------------------

def write_atomic(path: Path, data: bytes, suffix: str = ".o"):
    """Write ``data`` to ``path`` through a private temporary file and ``os.replace``: a
    reader sees the old file or the whole new one, never half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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


def save(path: Path, symbol: str, undefined: list, obj: bytes):
    """Write an object file with its header (checksum, entry symbol, external symbols)."""
    head = json.dumps({"symbol": symbol, "undefined": sorted(undefined)}).encode()
    payload = head + b"\n" + obj
    write_atomic(path, _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def _read(path: Path):
    """(symbol, undefined symbols, object bytes) if the file is intact, else None."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(_MAGIC):
        return None
    rest = data[len(_MAGIC):]
    digest, sep, payload = rest.partition(b"\n")
    if not sep or hashlib.sha256(payload).hexdigest().encode() != digest:
        return None
    head, sep, obj = payload.partition(b"\n")
    if not sep:
        return None
    try:
        meta = json.loads(head)
        return str(meta["symbol"]), list(meta["undefined"]), obj
    except (ValueError, KeyError, TypeError):
        return None


_warned: set = set()


def _warn_once(what: str, exc: BaseException):
    """One warning per process and kind of failure: the cache of machine code is an
    optimisation, so calcml runs on (compiling in every process), but not silently."""
    if what in _warned:
        return
    _warned.add(what)
    import warnings

    import numba

    warnings.warn(
        f"calcml cannot {what} kernel machine code with numba {numba.__version__} "
        f"({type(exc).__name__}: {exc}); each process compiles its kernels again (about a second "
        f"each). calcml is tested with numba 0.68: see pyproject.toml for the supported versions.",
        RuntimeWarning, stacklevel=3)


def load(path: Path):
    """The address of the function in the object file at ``path``, or None (absent, corrupt,
    or not loadable here: the caller compiles it again)."""
    found = _read(path)
    if found is None:
        return None
    symbol, undefined, obj = found
    ll = _llvm()
    with _lock:
        try:  # Numba's runtime symbols come from its internals (see _register_runtime_symbols)
            tm = _machine()
        except Exception as exc:  # noqa: BLE001 - a Numba release moved them
            _warn_once("load", exc)
            return None
        # LLVM aborts the process on a symbol it cannot resolve: check them all first.
        if any(ll.address_of_symbol(s) is None for s in undefined):
            return None
        try:
            engine = ll.create_mcjit_compiler(ll.parse_assembly(""), tm)
            engine.add_object_file(ll.ObjectFileRef.from_data(obj))
            engine.finalize_object()
            address = engine.get_function_address(symbol)
        except Exception:
            return None
        if not address:
            return None
        _engines.append(engine)
    return address


def compile_cfunc(function, signature, flags: dict, save_to: Path | None):
    """Compile ``function`` with ``numba.cfunc``; keep its object code at ``save_to``.

    Returns ``(address, keepalive)``: the entry point and the object that owns the code.
    Saving is best effort (a read-only cache only costs the next process a compile).
    """
    import numba

    cf = numba.cfunc(signature, **flags)(function)
    if save_to is not None:
        try:  # Numba's internals: the library's final LLVM module and the object code its JIT made
            lib = cf._library
            module = lib._final_module
            # Numba keeps the object code of every library it compiles (for its own cache):
            # taking it saves a second pass of LLVM's code generator (emit_object), which cost
            # as much again as the JIT's own (0.2-0.8 s a kernel or loop, measured)
            obj = lib._get_compiled_object() if getattr(lib, "_object_caching_enabled", False) else None
            if obj is None:
                obj = lib._codegen._tm.emit_object(module)
            undefined = [f.name for f in module.functions if f.is_declaration and not f.name.startswith("llvm.")]
            undefined += [g.name for g in module.global_variables if g.is_declaration]
        except Exception as exc:  # noqa: BLE001 - a Numba release moved them: warn, run on
            _warn_once("save", exc)
            return cf.address, cf
        try:
            save(save_to, cf.native_name, undefined, obj)
        except OSError as exc:  # a read-only or full cache folder: the next process compiles again
            _warn_once("write", exc)
    return cf.address, cf


def load_or_compile(module_path: Path, name: str, to_compile) -> tuple:
    """``(address, keepalive, compiled)`` of function ``name`` of the module at ``module_path``:
    its machine code loaded from beside the module, else compiled with ``numba.cfunc`` from
    ``to_compile()`` (``(function, signature, flags)``, made only then) and kept there (see
    :func:`compile_cfunc`). ``keepalive`` is None for loaded code."""
    obj = object_path(module_path, name)
    address = load(obj)
    if address is not None:
        return address, None, False
    function, signature, flags = to_compile()
    address, keep = compile_cfunc(function, signature, flags, obj)
    return address, keep, True


# -- threads ---------------------------------------------------------------------------------

def thread_count() -> int:
    """Numba's thread count: ``numba.set_num_threads`` if Numba's threads run, else NUMBA_NUM_THREADS."""
    import numba
    from numba.np.ufunc import parallel

    if getattr(parallel, "_is_initialized", False):
        return int(numba.get_num_threads())
    return int(numba.config.NUMBA_NUM_THREADS)


class ThreadPool:
    """Persistent worker threads that run one job on ``k`` threads (the caller is one)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._workers: list = []  # (go semaphore, thread)
        self._done = threading.Semaphore(0)
        self._job = None
        self._errors: list = []

    def _worker(self, index: int, go: threading.Semaphore):
        while True:
            go.acquire()
            try:
                self._job(index)
            except BaseException as exc:  # handed to the caller
                self._errors.append(exc)
            finally:
                self._done.release()

    def run(self, job, k: int):
        """``job(i)`` for i in 0..k-1, concurrently; i = 0 on the calling thread."""
        with self._lock:
            while len(self._workers) < k - 1:
                go = threading.Semaphore(0)
                t = threading.Thread(target=self._worker, args=(len(self._workers) + 1, go), daemon=True,
                                     name=f"calcml-kernel-{len(self._workers) + 1}")
                t.start()
                self._workers.append((go, t))
            self._job, self._errors = job, []
            for go, _ in self._workers[: k - 1]:
                go.release()
            interrupted = None
            try:
                job(0)
            finally:
                # Every worker must be done before the call's memory may be read or freed,
                # even when Ctrl-C arrives while waiting: wait on, then re-raise.
                remaining = k - 1
                while remaining:
                    try:
                        self._done.acquire()
                        remaining -= 1
                    except KeyboardInterrupt as exc:
                        interrupted = exc
                self._job = None
            if interrupted is not None:
                raise interrupted
            if self._errors:
                raise self._errors[0]


pool = ThreadPool()


def _after_fork():  # the child has none of the parent's threads
    global pool
    pool = ThreadPool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
