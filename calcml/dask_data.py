"""Kernels over Dask data: one task per chunk of rows, the chunks' sums added on the client.

``k.value``, ``k.grad``, ``k.value_and_grad`` (and ``k.hvp`` of a tensor cost) accept a 2-D
Dask array (columns in ``cost.data`` order), a Dask DataFrame (columns by name) or a dict of
Dask arrays (``(N, *shape)`` each, chunked by rows). This module is imported only when such
data are given (:func:`calcml.dataset.is_dask` tells without importing Dask).

How a call runs:

* The client makes one task per chunk of rows. The task holds what the worker needs to run
  the compiled kernel: the generated module's *source text* (never pointers or ctypes
  objects; workers share no cache folder with the client), the parameters, and the chunk.
* A worker (the active ``dask.distributed.Client``'s, else a thread of Dask's default
  scheduler) writes that source into *its own* kernel cache (``$CALCML_CACHE_DIR`` as set
  for the worker, else the default folder) under the same content-addressed name, loads or
  compiles its machine code once, and keeps the kernels in its process for later tasks.
* Each task computes its chunk's *sums* (not means) with the serial kernel: for a scalar cost
  the kernels of the same per-row expression with ``reduce="sum"``; for a tensor cost the
  sums over rows that the module's ``*_finish`` turns into the outputs. It returns them with
  its row count.
* The client adds the chunks' sums in chunk order and, for ``reduce="mean"``, divides once by
  the total row count (then a tensor cost's ``finish`` adds the penalty). The result equals
  the in-memory one to rounding, and has the same bits on every run: each chunk's sums and
  their order are fixed by the chunks alone, whichever worker ran them.
* A non-finite value, or a label out of range, is reported by the task with its position in
  the chunk; the client names the column and the *global* row (the rows of the chunks before
  it plus the row in the chunk), the same message as for the same data in memory.

Fits (:class:`DaskRows`): ``cm.minimize`` and ``prog.run`` with full-batch ``gd``,
``momentum``, ``nesterov`` and ``lbfgs`` run the compiled loop on the client, each of its
passes (the module's ``_fg``) the registered pass of :mod:`calcml.loop` that calcml's threads
use in memory, here one Dask computation of the chunks' sums.

Row-major 2-D chunks are transposed into one contiguous column per data symbol (the kernels'
layout). On a ``distributed`` worker, that copy is kept while the chunk itself lives in the
worker's memory (a persisted array), so repeated evaluations (a fit) pay for it once;
chunks of a DataFrame or column-major chunks need no copy at all.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
import time
import uuid
import weakref

import numpy as np

from .errors import DataError, OptimizeError

__all__ = ["scalar_run", "tensor_run", "DaskRows", "SUPPORTED"]

SUPPORTED = "a 2-D Dask array, a Dask DataFrame or a dict of Dask arrays"

# -- on the client -----------------------------------------------------------------------------


def _dask():
    try:
        import dask
        import dask.array  # noqa: F401
    except ImportError:  # pragma: no cover - is_dask saw a Dask object, so Dask is there
        raise DataError("Dask data need Dask: pip install 'calcml[dask]'") from None
    return dask


def _is_dask_obj(x) -> bool:
    return type(x).__module__.startswith("dask")


def _is_dask_frame(x) -> bool:
    return _is_dask_obj(x) and hasattr(x, "columns") and hasattr(x, "to_delayed") and hasattr(x, "npartitions")


def _is_dask_array(x) -> bool:
    return _is_dask_obj(x) and hasattr(x, "chunks") and hasattr(x, "to_delayed") and hasattr(x, "ndim")


def _numeric(name_or_what: str, dtype):
    try:
        kind = np.dtype(dtype).kind if dtype is not None else "O"
    except TypeError:  # a pandas extension dtype (string, category, Int64, ...): its own kind
        kind = getattr(dtype, "kind", "O")
    if kind not in "biuf":
        what = f"data column {name_or_what!r}" if not name_or_what.startswith("the ") else name_or_what
        raise DataError(f"{what} must be numeric, got dtype {dtype}")


def _row_blocks(arrays: dict) -> dict:
    """Each Dask array of ``arrays`` as one block per chunk of rows (its other axes whole),
    all on the first array's row chunks: {name: [delayed block, ...]}."""
    names = list(arrays)
    first = arrays[names[0]]
    out = {}
    for name in names:
        a = arrays[name]
        if a.ndim > 1 and any(len(c) > 1 for c in a.chunks[1:]):
            a = a.rechunk({axis: -1 for axis in range(1, a.ndim)})
        if a.chunks[0] != first.chunks[0]:
            if any(math.isnan(c) for c in a.chunks[0] + first.chunks[0]):
                raise DataError(f"data {name!r} and {names[0]!r} are chunked differently and their chunk sizes are "
                                "unknown: compute them (arr.compute_chunk_sizes()) or chunk both alike")
            if a.shape[0] != first.shape[0]:
                raise DataError(f"data {name!r} has {a.shape[0]} rows but {names[0]!r} has {first.shape[0]}")
            a = a.rechunk({0: first.chunks[0]})
        out[name] = list(a.to_delayed().reshape(-1))
    return out


def _scalar_chunks(data, names: tuple) -> list:
    """One delayed chunk per row-chunk of ``data`` for a scalar cost's columns ``names``:
    a 2-D NumPy array, a pandas DataFrame, or a dict of 1-D arrays, on the worker."""
    if isinstance(data, dict):
        missing = [n for n in names if n not in data]
        if missing:
            raise DataError(f"data is missing column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(repr, missing))}; the cost's data columns are {list(names)}")
        cols = {}
        for n in names:
            a = data[n]
            if not _is_dask_array(a):
                raise DataError(f"data column {n!r} is a {type(a).__name__} among Dask arrays: give every column as "
                                "a Dask array (dask.array.from_array) or none")
            if a.ndim == 2 and a.shape[1] == 1:
                a = a.reshape(-1) if not math.isnan(a.shape[0]) else a[:, 0]
            if a.ndim != 1:
                raise DataError(f"data column {n!r} must be 1-D, got shape {a.shape}")
            _numeric(n, a.dtype)
            cols[n] = a
        blocks = _row_blocks(cols)
        return [dict(zip(names, parts)) for parts in zip(*(blocks[n] for n in names))]
    if _is_dask_frame(data):
        present = list(data.columns)
        missing = [n for n in names if n not in present]
        if missing:
            raise DataError(f"data is missing column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(repr, missing))}; the cost's data columns are {list(names)}")
        for n in names:
            _numeric(n, data.dtypes[n])
        return list(data[list(names)].to_delayed())
    if _is_dask_array(data):
        a = data
        if a.ndim == 1 and len(names) == 1:
            a = a[:, None]
        if a.ndim != 2 or a.shape[1] != len(names):
            raise DataError(f"a data array must have shape (N, {len(names)}): one column per data symbol "
                            f"{list(names)}; got a Dask array of shape {a.shape}")
        _numeric("the data array", a.dtype)
        if a.numblocks[1] != 1:
            a = a.rechunk({1: -1})
        return list(a.to_delayed().reshape(-1))
    raise DataError(f"Dask data must be {SUPPORTED}; got {type(data).__module__}.{type(data).__name__}")


# Evaluate persisted chunks by one Client.run per worker (False: always tasks; benchmarks
# compare the two)
DIRECT = True
_calls = itertools.count()
# task keys unique to this process and call (one random draw per process, not one per task)
_PREFIX = f"calcml-chunk-sums-{uuid.uuid4().hex}"


def _evaluate(fn, args: tuple, data, chunks_of) -> list:
    """``fn(*args, chunk, keep)`` for every chunk of rows of ``data``, in chunk order.

    Persisted chunks held by the workers of the active ``distributed`` client are evaluated
    where they are by one call to each worker (``Client.run``: no task graph, no scheduler);
    every other chunk by one Dask task (``chunks_of(data)``: the delayed chunks), with the
    active client or Dask's default scheduler."""
    local = _direct(fn, args, data)
    if local is not None and all(r is not None for r in local):
        return local
    dask = _dask()
    chunks = chunks_of(data)
    if local is not None and len(local) != len(chunks):
        local = None
    call = next(_calls)
    task = dask.delayed(_on_worker, pure=False)
    todo = [i for i in range(len(chunks)) if local is None or local[i] is None]
    done = dask.compute(*[task(fn, args, chunks[i], dask_key_name=f"{_PREFIX}-{call}-{i}") for i in todo])
    out = list(local) if local is not None else [None] * len(chunks)
    for i, r in zip(todo, done):
        out[i] = r
    return out


def _on_worker(fn, args, chunk):
    return fn(*args, chunk, _on_distributed_worker())


def _client():
    """The active ``distributed`` client, unless Dask is told to use another scheduler
    (``dask.config.set(scheduler="threads")``, say)."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    scheduler = _dask().config.get("scheduler", None)
    if scheduler not in (None, "dask.distributed", "distributed"):
        return None
    try:
        return distributed.default_client()
    except (ValueError, AttributeError):
        return None


def _chunk_keys(data, held: set):
    """[(form, keys of one chunk of rows)] of data whose chunks are the ``held`` results as
    they are (a 2-D array one column-chunk wide, a dict of arrays on the same row chunks, a
    DataFrame's partitions), else None."""
    if _is_dask_frame(data):
        graph = data.__dask_graph__()
        out = []
        for key in data.__dask_keys__():
            if key not in held:  # a persisted DataFrame's partitions are aliases of its results
                deps = getattr(graph.get(key), "dependencies", None) or ()
                if len(deps) != 1 or next(iter(deps)) not in held:
                    return None
                key = next(iter(deps))
            out.append(("frame", (key,)))
        return out
    if _is_dask_array(data):
        if data.ndim != 2 or data.numblocks[1] != 1:
            return None
        return [("array", (row[0],)) for row in data.__dask_keys__()]
    if isinstance(data, dict) and data and all(_is_dask_array(a) for a in data.values()):
        names = list(data)
        first = data[names[0]].chunks[0]
        keys = []
        for a in data.values():
            if a.chunks[0] != first or any(len(c) > 1 for c in a.chunks[1:]):
                return None
            k = a.__dask_keys__()
            for _ in range(a.ndim - 1):
                k = [row[0] for row in k]
            keys.append(k)
        return [(("dict", tuple(names)), tuple(ks)) for ks in zip(*keys)]
    return None


def _direct(fn, args, data):
    """The chunks' results from the workers that hold them (None for a chunk no worker holds),
    or None where there is no distributed client or the data are not persisted there."""
    client = _client() if DIRECT else None
    if client is None:
        return None
    from distributed import futures_of

    held = {f.key for f in futures_of(data)}
    if not held:
        return None
    plan = _chunk_keys(data, held)
    if not plan or not all(k in held for _form, keys in plan for k in keys):
        return None
    # The module's source goes only to workers that have not loaded it yet (they answer None)
    lite = (args[0].without_source(),) + tuple(args[1:])
    try:
        found = _run_on_workers(client, _run_held, (fn, lite, plan))
        again = [w for w, r in found.items() if r is None]
        if again:
            found.update(_run_on_workers(client, _run_held, (fn, args, plan), again))
    except Exception as exc:  # noqa: BLE001 - a calcml error is the answer; anything else: the task path
        _addresses.pop(id(client), None)
        if isinstance(exc, DataError):
            raise
        return None
    out = [None] * len(plan)
    for worker in sorted(found):  # a chunk held twice: the same bits from either copy
        for i, r in found[worker].items():
            if out[i] is None:
                out[i] = r
    if any(r is None for r in out):  # held by a worker not asked: ask for the workers again next time
        _addresses.pop(id(client), None)
    return out


_addresses: dict = {}  # id(client) -> (client, its workers' addresses when last asked)


def _run_on_workers(client, fn, args: tuple, workers=None) -> dict:
    """{worker address: fn(*args, dask_worker=worker)} from every worker (or ``workers``): the
    workers' own "run" handler called directly from this process, as ``Client.run`` does
    through the scheduler (one hop less: about 0.4 ms a call of the 1.5-2 ms round trip on a
    LocalCluster); ``Client.run`` itself where that is not possible. The workers' addresses are
    asked once and kept; a worker that joins later holds chunks the answer lacks, which are then
    evaluated by tasks (and the addresses asked again)."""
    if workers is None:
        known = _addresses.get(id(client))
        if known is None or known[0] is not client:
            known = _addresses[id(client)] = (client, tuple(client.scheduler_info()["workers"]))
        workers = known[1]
    try:
        from distributed.protocol.pickle import dumps

        return client.sync(_rpc_run, client, dumps(fn), dumps(args), tuple(workers))
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - the handler is distributed's internal API: then Client.run
        _addresses.pop(id(client), None)
        return client.run(fn, *args, workers=list(workers))


async def _rpc_run(client, fn, args, workers) -> dict:
    import asyncio

    replies = await asyncio.gather(*[client.rpc(w).run(function=fn, args=args, kwargs=None, wait=True)
                                     for w in workers])
    out = {}
    for w, reply in zip(workers, replies):
        if reply.get("status") != "OK":
            from distributed.core import clean_exception

            _t, exc, tb = clean_exception(**reply)
            raise exc.with_traceback(tb)
        out[w] = reply["result"]
    return out


async def _run_held(fn, args, plan, dask_worker=None):
    """On a worker (``Client.run``): {chunk index: result} for the chunks it holds, on up to the
    worker's thread count of threads: off the event loop, or on it where the last evaluation was
    short (_INLINE_SECONDS)."""
    import asyncio

    if args[0].source is None and not _loaded_here(args[0]):
        return None  # send the source
    data = dask_worker.data
    mine = [(i, form, keys) for i, (form, keys) in enumerate(plan) if all(k in data for k in keys)]
    if not mine:
        return {}

    def chunk_of(form, keys):
        if form in ("array", "frame"):
            return data[keys[0]]
        return dict(zip(form[1], (data[k] for k in keys)))

    def run(i, form, keys, out):
        try:
            chunk = chunk_of(form, keys)
        except KeyError:  # released since: left to a task
            return
        out[i] = fn(*args, chunk, True)

    def work():
        out = {}
        threads = max(1, min(len(mine), getattr(dask_worker.state, "nthreads", 1) or 1))
        if threads == 1:
            for i, form, keys in mine:
                run(i, form, keys, out)
            return out
        from .native import pool

        def job(t):
            for i, form, keys in mine[t::threads]:
                run(i, form, keys, out)
        pool.run(job, threads)
        return out

    global _held_seconds
    t0 = time.perf_counter()
    if _held_seconds < _INLINE_SECONDS:  # short work: on the event loop itself, no thread hop
        out = work()
    else:
        out = await asyncio.get_running_loop().run_in_executor(None, work)
    _held_seconds = time.perf_counter() - t0
    return out


# A worker's evaluation of its chunks runs off its event loop (heartbeats, messages) on a thread
# of its own, unless the last one took less than _INLINE_SECONDS: then on the loop, sparing the
# thread hop (0.2 ms of W8's 6 ms call).
_INLINE_SECONDS = 0.02
_held_seconds = float("inf")


def _gather(fn, args: tuple, data, chunks, counts=None) -> tuple:
    """(the chunks' results in chunk order, the row count) of ``fn`` over ``chunks`` of
    ``data`` (:func:`_evaluate`); the count appended to ``counts`` too."""
    results = _evaluate(fn, args, data, lambda _d: chunks)
    n = sum(r[0] for r in results)
    if n == 0:
        raise DataError("the data have no rows")
    if counts is not None:
        counts.append(n)
    return results, n


def _tensor_total(spec, results, n: int, mean: bool) -> np.ndarray:
    """The tensor chunks' sums added in chunk order (divided by the rows for a mean), after the
    first problem a chunk found is raised with its global row."""
    problems = [(r[2], at) for r, at in zip(results, _offsets(results)) if r[2] is not None]
    if problems:
        _raise_tensor_problem(spec, problems)
    total = _sum_in_order(results)
    if mean:
        total /= n
    return total


def _sum_in_order(results):
    """The chunks' sums (``r[1]``, None for an empty chunk) added in chunk order: the same
    bits on every run, whichever worker computed which chunk."""
    total = None
    for r in results:
        if r[1] is None:
            continue
        total = r[1].copy() if total is None else total.__iadd__(r[1])
    return total


def _offsets(results) -> list:
    out, at = [], 0
    for r in results:
        out.append(at)
        at += r[0]
    return out


# -- scalar costs ------------------------------------------------------------------------------


class ScalarSpec:
    """What a worker needs to run the chunk-sum kernels of a scalar cost: the cache key and
    the text of the generated module of the cost's ``reduce="sum"`` twin, and its shape;
    ``hessian_only``: the module is the twin's Hessian module (a cost of more parameters than
    the kernels module's inline Hessian takes)."""

    __slots__ = ("key", "source", "n_params", "data_names", "hessian_only")

    def __init__(self, key: str, source: str, n_params: int, data_names: tuple, hessian_only: bool = False):
        self.key, self.source, self.n_params, self.data_names = key, source, n_params, data_names
        self.hessian_only = hessian_only

    def __getstate__(self):
        return (self.key, self.source, self.n_params, self.data_names, self.hessian_only)

    def without_source(self) -> "ScalarSpec":
        """The same spec without the module's text, for a worker that has loaded it."""
        return ScalarSpec(self.key, None, self.n_params, self.data_names, self.hessian_only)

    def __setstate__(self, state):
        self.key, self.source, self.n_params, self.data_names, self.hessian_only = state


def scalar_spec(kernels, hessian_only: bool = False) -> ScalarSpec:
    """The spec of ``kernels`` (a :class:`calcml.Kernels`), made once per kernels object;
    ``hessian_only``: of its sum twin's Hessian module instead."""
    if hessian_only:
        spec = kernels.__dict__.get("_dask_hessian_spec")
        if spec is None:
            from .codegen import kernel_module_source
            from .compile import _kernel_key, load_or_build

            twin = _sum_twin(kernels.cost)
            key = _kernel_key(twin, "hessian-module")
            _module, text, _path = load_or_build(key, lambda: kernel_module_source(twin, hessian_only=True),
                                                 import_module=False)
            spec = kernels.__dict__["_dask_hessian_spec"] = ScalarSpec(key, text, len(twin.params), twin.data_names,
                                                                       hessian_only=True)
        return spec
    spec = kernels.__dict__.get("_dask_spec")
    if spec is None:
        from .codegen import kernel_module_source
        from .compile import _kernel_key, load_or_build

        cost = kernels.cost
        twin = _sum_twin(cost)
        key = _kernel_key(twin, "kernels")
        _module, text, _path = load_or_build(key, lambda: kernel_module_source(twin), import_module=False)
        spec = kernels.__dict__["_dask_spec"] = ScalarSpec(key, text, len(cost.params), cost.data_names)
    return spec


def _sum_twin(cost):
    from .cost import Cost

    return cost if cost.reduce == "sum" else Cost(cost.expr, params=list(cost.params), data=list(cost.data),
                                                  reduce="sum")


def scalar_run(kernels, kind: str, theta: np.ndarray, data, counts=None) -> np.ndarray:
    """Kernel ``kind`` of a scalar cost over Dask data: the outputs in the in-memory kernels'
    layout (the reduced outputs, then the finiteness slot). ``counts``: a list to append the
    row count to."""
    names = kernels.cost.data_names
    spec = scalar_spec(kernels, hessian_only=kind == "hessian" and not kernels._inline_hessian)
    chunks = _scalar_chunks(data, names)  # (the checks of the columns, on the client)
    results, n = _gather(_scalar_chunk_sums, (spec, kind, theta), data, chunks, counts)
    bad = [(r[2], at) for r, at in zip(results, _offsets(results)) if r[2] is not None]
    if bad:
        # the first column (cost order) holding a non-finite value, at its first row: as in memory
        col, row, value = min(((c, at + row, value) for found, at in bad for c, row, value in found),
                              key=lambda t: (t[0], t[1]))
        raise DataError(f"data column {names[col]!r} holds a non-finite value ({value}) at row {row}")
    total = _sum_in_order(results)
    if kernels.cost.reduce == "mean":
        total[:-1] /= n
    return total


_worker_lock = threading.RLock()
_worker_kernels: dict = {}  # key -> Kernels of the sum twin, in this process
_layouts: dict = {}  # id(chunk) -> (weak reference to the chunk, its Dataset), on distributed workers


def _loaded_here(spec) -> bool:
    if isinstance(spec, ScalarSpec):
        return spec.key in _worker_kernels
    return (spec.key, spec.kind) in _worker_modules


class _Shape:
    """The part of a Cost a worker's :class:`calcml.Kernels` reads (no SymPy on the wire)."""

    class _Named:
        __slots__ = ("name",)

        def __init__(self, name):
            self.name = name

    def __init__(self, n_params: int, data_names: tuple):
        self.params = tuple(self._Named(f"theta[{i}]") for i in range(n_params))
        self.param_names = tuple(p.name for p in self.params)
        self.data = data_names
        self.data_names = data_names
        self.reduce = "sum"


def _source_body(key: str, text: str) -> str:
    from .compile import _CHECKSUM_PREFIX, _checked

    if not _checked(text):
        raise DataError(f"the generated module {key[:12]}… reached this worker damaged (its checksum fails)")
    body = text.rstrip("\n").rpartition("\n")[0] + "\n"
    assert not body.endswith(_CHECKSUM_PREFIX)
    return body


def worker_kernels(spec: ScalarSpec):
    """The sum twin's kernels in this process: its module written into this process's own
    cache from the shipped source (unless already there), loaded once, then kept."""
    k = _worker_kernels.get(spec.key)
    if k is None:
        with _worker_lock:
            k = _worker_kernels.get(spec.key)
            if k is None:
                from .compile import Kernels, load_or_build

                _m, text, path = load_or_build(spec.key, lambda: _source_body(spec.key, spec.source),
                                               import_module=False)
                k = _worker_kernels[spec.key] = Kernels(_Shape(spec.n_params, spec.data_names), None, text, path,
                                                        parallel=False)
                if spec.hessian_only:  # the module is the Hessian module: k.hessian's, not built here
                    k._hessian_path = path
    return k


def _on_distributed_worker() -> bool:
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return False
    try:
        distributed.get_worker()
        return True
    except (ValueError, AttributeError):
        return False


def _chunk_dataset(chunk, names: tuple, keep: bool):
    """The chunk as a :class:`calcml.dataset.Dataset`. ``keep``: the chunk is held by a
    distributed worker (not a user's array that could change): a row-major 2-D chunk's
    column layout is kept while the chunk lives."""
    from .dataset import as_dataset

    if not (keep and isinstance(chunk, np.ndarray) and chunk.ndim == 2 and chunk.shape[0] > 0
            and not (chunk.dtype == np.float64 and chunk.flags.f_contiguous)):
        return as_dataset(chunk, names)
    ident = id(chunk)
    with _worker_lock:
        found = _layouts.get(ident)
        if found is not None and found[0]() is chunk and found[1].names == names:
            return found[1]
    ds = as_dataset(chunk, names)
    try:
        ref = weakref.ref(chunk, lambda _r, i=ident: _layouts.pop(i, None))
    except TypeError:
        return ds
    with _worker_lock:
        _layouts[ident] = (ref, ds)
    return ds


def _rows(chunk) -> int:
    if isinstance(chunk, dict):
        first = next(iter(chunk.values()))
        return len(first)
    return len(chunk)


def _scalar_chunk_sums(spec: ScalarSpec, kind: str, theta: np.ndarray, chunk, keep: bool = False):
    """On a worker: (rows, the chunk's sums of kernel ``kind``, None) or, where a non-finite
    value is found, (rows, None, [(column index, row in the chunk, value), ...])."""
    n = _rows(chunk)
    if n == 0:
        return (0, None, None)
    k = worker_kernels(spec)
    ds = _chunk_dataset(chunk, spec.data_names, keep)
    try:
        out, _ = k._run(kind, theta, ds)
    except DataError:
        found = []
        for j, col in enumerate(ds.columns):
            if np.isfinite(np.add.reduce(col)):
                continue
            bad = np.flatnonzero(~np.isfinite(col))
            if bad.size:
                found.append((j, int(bad[0]), float(col[bad[0]])))
        if not found:
            raise
        return (n, None, found)
    return (n, out.copy(), None)


# -- tensor costs ------------------------------------------------------------------------------


class TensorSpec:
    """What a worker needs to run a tensor module's row sums: its cache key and text, the
    kernel, and the data items (name, shape, classes or None); ``lift``: for a scalar cost
    restated in index notation, (its column names, the restated data's columns)."""

    __slots__ = ("key", "source", "kind", "items", "lift")

    def __init__(self, key, source, kind, items, lift=None):
        self.key, self.source, self.kind, self.items, self.lift = key, source, kind, items, lift

    def __getstate__(self):
        return (self.key, self.source, self.kind, self.items, self.lift)

    def without_source(self) -> "TensorSpec":
        """The same spec without the module's text, for a worker that has loaded it."""
        return TensorSpec(self.key, None, self.kind, self.items, self.lift)

    def __setstate__(self, state):
        self.key, self.source, self.kind, self.items, self.lift = state


def _tensor_items(cost) -> tuple:
    from .tensor.statement import Label

    return tuple((name, tuple(shape), item.classes if isinstance(item, Label) else None)
                 for item, (name, shape) in zip(cost.data, cost.data_shapes.items()))


def _tensor_chunks(cost, data, items) -> list:
    """One delayed dict {name: block} per chunk of rows, after the client-side checks."""
    dask = _dask()
    names = [name for name, _s, _c in items]
    if _is_dask_frame(data):
        present = list(data.columns)
        missing = [n for n in names if n not in present]
        if missing:
            raise DataError(f"data is missing {', '.join(map(repr, missing))}; the cost reads {names}")
        shaped = [n for n, s, _c in items if s]
        if shaped:
            raise DataError(f"data {shaped[0]!r} has shape (N, {', '.join(map(str, dict((n, s) for n, s, _ in items)[shaped[0]]))}): "
                            "a DataFrame holds scalar columns only; give a dict of Dask arrays")
        for n, _s, classes in items:
            if classes is None:
                _numeric(n, data.dtypes[n])
        return [dask.delayed(_frame_dict, pure=True)(part, names) for part in data[names].to_delayed()]
    if not isinstance(data, dict):
        raise DataError(f"data for a tensor cost is a dict {{name: array}} with {names}; Dask data may be a dict "
                        f"of Dask arrays or a Dask DataFrame, got {type(data).__name__}")
    missing = [n for n in names if n not in data]
    if missing:
        raise DataError(f"data is missing {', '.join(map(repr, missing))}; the cost reads {names}")
    arrays = {}
    for name, shape, classes in items:
        a = data[name]
        if not _is_dask_array(a):
            raise DataError(f"data {name!r} is a {type(a).__name__} among Dask arrays: give every item as a Dask "
                            "array (dask.array.from_array) or none")
        if classes is not None:
            if a.ndim != 1:
                raise DataError(f"labels {name!r} must be a 1-D array of class numbers, got shape {a.shape}")
            if np.dtype(a.dtype).kind not in "iubf":
                raise DataError(f"labels {name!r} must be integers, got dtype {a.dtype}")
        else:
            if a.ndim != 1 + len(shape) or tuple(a.shape[1:]) != shape:
                want = "(N,)" if not shape else f"(N, {', '.join(map(str, shape))})"
                raise DataError(f"data {name!r} must have shape {want} (one row per data row), got {a.shape}")
            if np.dtype(a.dtype).kind not in "biuf":
                raise DataError(f"data {name!r} must be numbers, got dtype {a.dtype}")
        arrays[name] = a
    blocks = _row_blocks(arrays)
    return [dict(zip(names, parts)) for parts in zip(*(blocks[n] for n in names))]


def tensor_chunks(cost, data, lift=None, items=None) -> list:
    """The delayed chunks of rows of a tensor cost's Dask data (of a scalar cost's forms where
    ``lift`` is given), after the client-side checks."""
    if lift is not None:
        return _scalar_chunks(data, lift[0])
    return _tensor_chunks(cost, data, items if items is not None else _tensor_items(cost))


def _frame_dict(frame, names):
    return {n: frame[n].to_numpy() for n in names}


def tensor_spec(tkernels, kind: str, lift=None) -> TensorSpec:
    group = "hvp" if kind == "hvp" else "base"
    memo = tkernels.__dict__.setdefault("_dask_specs", {})
    spec = memo.get((kind, lift is not None))
    if spec is None:
        mod = tkernels._module(group)
        items = _tensor_items(tkernels.cost)
        spec = memo[(kind, lift is not None)] = TensorSpec(mod._calcml_key, mod._calcml_text, kind, items, lift)
    return spec


def tensor_run(tkernels, kind: str, theta: np.ndarray, v: np.ndarray, data, lift=None, counts=None,
               chunks=None) -> np.ndarray:
    """Kernel ``kind`` ("value", "vg", "hvp") of a tensor cost over Dask data: the outputs,
    from the chunks' row sums added in order, divided once, and the module's ``finish``.
    ``lift``: (scalar column names, restated columns) for a scalar cost in index notation;
    then ``data`` takes the scalar cost's Dask forms. ``counts``: a list to append the row
    count to; ``chunks``: the delayed chunks, if made already (:func:`tensor_chunks`)."""
    spec = tensor_spec(tkernels, kind, lift)
    if chunks is None:
        chunks = tensor_chunks(tkernels.cost, data, lift, spec.items)
    results, n = _gather(_tensor_chunk_sums, (spec, theta, v), data, chunks, counts)
    total = _tensor_total(spec, results, n, tkernels.cost.reduce == "mean")
    mod = tkernels._module("hvp" if kind == "hvp" else "base")
    nout = {"value": 1, "vg": 1 + tkernels._n, "hvp": tkernels._n}[kind]
    out = np.empty(nout)
    native_fns = tkernels._native(kind, mod)
    finish = native_fns[1] if native_fns is not None else getattr(mod, f"{kind}_finish")
    finish(theta, v, total, out)
    return out


def _raise_tensor_problem(spec: TensorSpec, problems):
    """The in-memory message for the first problem in data order, then row order."""
    entries = [(p, at) for found, at in problems for p in found]
    # labels first (in memory they are checked while the data are read), by item, then row
    labels = [(p, at) for p, at in entries if p[0] == "label"]
    if labels:
        (_t, item, reason, row, value), at = min(labels, key=lambda e: (e[0][1], e[0][2] != "fraction",
                                                                       e[1] + e[0][3]))
        name, _shape, classes = spec.items[item]
        if reason == "fraction":
            raise DataError(f"labels {name!r}: row {at + row} holds {value}, not a class number")
        raise DataError(f"labels {name!r}: row {at + row} holds class {int(value)}, outside 0 … {classes - 1}")
    scalar = [(p, at) for p, at in entries if p[0] == "column"]
    if scalar:  # a lifted scalar cost: named by the scalar column
        (_t, col, row, value), at = min(scalar, key=lambda e: (e[0][1], e[1] + e[0][2]))
        raise DataError(f"data column {spec.lift[0][col]!r} holds a non-finite value ({value}) at row {at + row}")
    (_t, item, row, entry, value), at = min(entries, key=lambda e: (e[0][1], e[1] + e[0][2], e[0][3]))
    name = spec.items[item][0]
    where = f"[{', '.join(map(str, entry))}]" if entry else ""
    raise DataError(f"data {name!r} is {value} at row {at + row}{' entry ' + where if where else ''}: "
                    "data must be finite")


_worker_modules: dict = {}  # what this process made once: shipped modules, their entry points


def _kept(key, make):
    """``make()``, once per process for ``key`` (made under the lock, then kept)."""
    found = _worker_modules.get(key)
    if found is None:
        with _worker_lock:
            found = _worker_modules.get(key)
            if found is None:
                found = _worker_modules[key] = make()
    return found


def _shipped_module(key: str, source):
    """The generated module ``key`` in this process: its shipped source written into this
    process's own cache (unless there already), imported once, then kept."""
    def make():
        from .compile import load_or_build

        mod, text, path = load_or_build(key, lambda: _source_body(key, source))
        mod._calcml_text, mod._calcml_path, mod._calcml_key = text, path, key
        return mod

    return _kept(("module", key), make)


def _worker_module(spec: TensorSpec, kind: str | None = None):
    """(the tensor kernels' module, its native entry points for ``kind`` (default
    ``spec.kind``) or None)."""
    kind = kind or spec.kind

    def make():
        from .tensor.kernels import _native_entry_points

        mod = _shipped_module(spec.key, spec.source)
        return (mod, _native_entry_points(mod, kind, True))

    return _kept((spec.key, kind), make)


def _label_problems(item: int, a: np.ndarray, classes: int) -> list:
    out = []
    if a.dtype.kind == "f":
        bad = np.flatnonzero(a != np.round(a))
        if bad.size:
            out.append(("label", item, "fraction", int(bad[0]), float(a[bad[0]])))
            return out
    lo, hi = a.min(), a.max()
    if lo < 0 or hi >= classes:
        r = int(np.flatnonzero((a < 0) | (a >= classes))[0])
        out.append(("label", item, "range", r, int(a[r])))
    return out


def _nonfinite(item: int, a: np.ndarray):
    ok = np.isfinite(a)
    if ok.all():
        return None
    pos = np.unravel_index(int(np.flatnonzero(~ok.reshape(-1))[0]), a.shape)
    return ("data", item, int(pos[0]), tuple(int(p) for p in pos[1:]), float(a[pos]))


def _chunk_inputs(spec: TensorSpec, chunk, keep: bool):
    """(rows, the module, its native entry points, the chunk's arrays, its scalar Dataset when
    lifted, problems or None): a chunk read for the kernels, labels and data checked as the
    outputs' test does not cover them."""
    n = _rows(chunk)
    mod, native_fns = _worker_module(spec)
    ds = None
    if spec.lift is not None:
        from .tensor.lift import lifted_data

        ds = _chunk_dataset(chunk, spec.lift[0], keep)
        chunk = lifted_data(spec.lift[1], ds)
    arrays, problems = [], []
    for q, (name, shape, classes) in enumerate(spec.items):
        raw = chunk[name]
        if classes is not None:
            a = np.asarray(raw)
            problems += _label_problems(q, a, classes)
            a = np.ascontiguousarray(a, dtype=np.int64)
        else:
            a = np.ascontiguousarray(raw, dtype=np.float64)
        arrays.append(a)
    if problems:
        return n, mod, native_fns, arrays, ds, problems
    covered = getattr(mod, f"COVERED_{spec.kind.upper()}", ())
    for q, (name, _shape, classes) in enumerate(spec.items):
        if classes is None and name not in covered and not np.isfinite(np.add.reduce(arrays[q], axis=None)):
            found = _nonfinite(q, arrays[q])
            if found is not None:
                return n, mod, native_fns, arrays, ds, _located(spec, ds, arrays)
    return n, mod, native_fns, arrays, ds, None


def _tensor_chunk_sums(spec: TensorSpec, theta: np.ndarray, v: np.ndarray, chunk, keep: bool = False):
    """On a worker: (rows, the chunk's row sums, None), or (rows, None, [problems]) where a
    label is out of range or a datum is not finite (positions within the chunk)."""
    from .tensor.kernels import run_striped, stripes, sum_in_order

    if _rows(chunk) == 0:
        return (0, None, None)
    n, mod, native_fns, arrays, ds, problems = _chunk_inputs(spec, chunk, keep)
    if problems:
        return (n, None, problems)
    parts = stripes(n, mod.BLOCK)
    acc = np.zeros((len(parts), max(mod.ACC_SIZES[spec.kind], 1)))
    rows = native_fns[0](n, arrays) if native_fns is not None else getattr(mod, f"{spec.kind}_rows")
    run_striped(rows, theta, v, arrays, parts, 1.0, acc, 1)
    sums = sum_in_order(acc)
    if not np.all(np.isfinite(sums)):
        found = _located(spec, ds, arrays)
        if found:
            return (n, None, found)
    return (n, sums, None)


def _tensor_chunk_hessian(spec: TensorSpec, theta: np.ndarray, chunk, keep: bool = False):
    """On a worker: (rows, the chunk's row sums of H e_i for every unit vector e_i, one row of
    sums each, None), or (rows, None, [problems]). The rows' tensors that do not depend on the
    vector (hvp_lin_rows) are computed once, as ``k.hvp_at`` does in memory."""
    from .tensor.kernels import run_striped, stripes, sum_in_order

    if _rows(chunk) == 0:
        return (0, None, None)
    n, mod, native_fns, arrays, ds, problems = _chunk_inputs(spec, chunk, keep)
    if problems:
        return (n, None, problems)
    parts = stripes(n, mod.BLOCK)
    size = max(mod.ACC_SIZES["hvp"], 1)
    acc = np.zeros((len(parts), size))
    empty = np.empty(0)
    if hasattr(mod, "hvp_lin_rows"):
        kept = tuple(np.empty((n, *shape)) for _, shape in mod.HVP_CACHE)
        lin, at = _worker_module(spec, "hvp_lin")[1], _worker_module(spec, "hvp_at")[1]
        if lin is not None and at is not None:
            run_striped(lin[0](n, arrays, kept), theta, theta, arrays, parts, 1.0, acc, 1)
            rows, extra = at[0](n, arrays, kept), ()
        else:
            run_striped(mod.hvp_lin_rows, theta, empty, arrays, parts, 1.0, acc, 1, (kept,))
            rows, extra = mod.hvp_at_rows, (kept,)
    else:
        rows, extra = (native_fns[0](n, arrays) if native_fns is not None else mod.hvp_rows), ()
    out = np.empty((mod.N_PARAMS, size))
    e = np.zeros(mod.N_PARAMS)
    for i in range(mod.N_PARAMS):
        e[i] = 1.0
        acc[:] = 0.0
        run_striped(rows, theta, e, arrays, parts, 1.0, acc, 1, extra)
        out[i] = sum_in_order(acc)
        e[i] = 0.0
    if not np.all(np.isfinite(out)):
        found = _located(spec, ds, arrays)
        if found:
            return (n, None, found)
    return (n, out, None)


def tensor_hessian(tkernels, theta: np.ndarray, data, lift=None, counts=None, chunks=None) -> np.ndarray:
    """The reduced Hessian of a tensor cost over Dask data in one Dask computation: each chunk
    makes the row sums of every column's Hessian-vector product, the client adds them in
    chunk order, divides once and finishes each column (``k.hessian``'s result, to rounding)."""
    spec = tensor_spec(tkernels, "hvp", lift)
    if chunks is None:
        chunks = tensor_chunks(tkernels.cost, data, lift, spec.items)
    results, n = _gather(_tensor_chunk_hessian, (spec, theta), data, chunks, counts)
    total = _tensor_total(spec, results, n, tkernels.cost.reduce == "mean")
    mod = tkernels._module("hvp")
    native_fns = tkernels._native("hvp", mod)
    finish = native_fns[1] if native_fns is not None else mod.hvp_finish
    N = tkernels._n
    H, e = np.empty((N, N)), np.zeros(N)
    col = np.empty(N)
    for i in range(N):
        e[i] = 1.0
        finish(theta, e, total[i], col)
        H[:, i] = col
        e[i] = 0.0
    return 0.5 * (H + H.T)


def _located(spec: TensorSpec, ds, arrays) -> list:
    """Every item's first non-finite datum in this chunk (by the scalar columns, when lifted)."""
    if ds is not None:
        out = []
        for j, col in enumerate(ds.columns):
            bad = np.flatnonzero(~np.isfinite(col))
            if bad.size:
                out.append(("column", j, int(bad[0]), float(col[bad[0]])))
        return out
    out = []
    for q, (_name, _shape, classes) in enumerate(spec.items):
        if classes is None:
            found = _nonfinite(q, arrays[q])
            if found is not None:
                out.append(found)
    return out


# -- fits: cm.minimize and prog.run over Dask data -----------------------------------------------

# Optimizers of the scalar loop whose every pass over the data is one of the module's
# full-batch passes (``_fg``, and Newton's ``_f`` and ``_hess``), which the run's registered
# passes replace: these run over Dask data in the scalar loop. Every other fit over Dask data
# (minibatches, Newton without an inline Hessian) runs on the tensor path (:class:`DaskFit`).
FIT_METHODS = ("first_order", "lbfgs", "newton")


def scalar_loop_takes(prog) -> bool:
    """Whether ``prog`` (a scalar loop) runs a fit over Dask data with each pass one Dask
    computation; else the fit goes to the tensor path (:func:`calcml.minimize` does that)."""
    from .codegen import HESSIAN_INLINE_MAX

    opt = prog.optimizer
    if prog.batch_size is not None or opt.kind not in FIT_METHODS or not getattr(prog.module, "THREADED", False):
        return False
    return opt.kind != "newton" or len(prog.cost.params) <= HESSIAN_INLINE_MAX


class DaskRows:
    """The data of a fit over Dask data, where the compiled loop expects a Dataset.

    The loop is handed stand-in columns just long enough (``PARALLEL_MIN_ROWS``) that every
    full-batch pass goes through ``_fg`` (``_f``, ``_hess``) to the pass registered for them,
    which is one Dask computation of the chunks' sums (:func:`scalar_run`). The stand-ins are
    NaN: a pass that read them instead (none does) could only make the fit fail, never return
    a wrong minimum. A data error found by a pass is kept here and raised once the loop has
    stopped."""

    def __init__(self, prog, data):
        cost, opt = prog.cost, prog.optimizer
        if not scalar_loop_takes(prog):
            raise OptimizeError(f"{opt.name} does not run over Dask data in the scalar loop; calcml.minimize "
                                "runs it on the tensor path")
        from .compile import compile as compile_cost

        self.kernels = compile_cost(cost)
        self.newton = opt.kind == "newton"
        self.data = data
        _scalar_chunks(data, cost.data_names)  # the columns' checks, now, by name
        self._n = None
        self.errors: list = []
        stand_in = np.full(prog.module.PARALLEL_MIN_ROWS, np.nan)
        stand_in.flags.writeable = False
        self.columns = (stand_in,) * len(cost.data_names)

    @property
    def n_rows(self) -> int:
        if self._n is None:
            self._n = self._count()
        return self._n

    def _count(self) -> int:
        shape0 = getattr(self.data, "shape", (math.nan,))[0] if not isinstance(self.data, dict) else \
            next(iter(self.data.values())).shape[0]
        try:
            if not math.isnan(shape0):
                return int(shape0)
        except TypeError:
            pass
        counts: list = []
        scalar_run(self.kernels, "value", np.zeros(len(self.kernels.cost.params)), self.data, counts)
        return counts[-1]

    def pass_factory(self, _cols):
        """drive's ``passes``: (theta, g) -> the full-batch cost at theta, its gradient into g;
        for Newton also theta -> the cost, and (theta, H) -> the Hessian into H."""
        n = len(self.kernels.cost.params)
        counts: list = []

        def run(kind, theta):
            """The kernel's outputs, or None (a data error, kept; a non-finite theta)."""
            if self.errors or not np.all(np.isfinite(theta)):
                return None
            try:
                out = scalar_run(self.kernels, kind, np.ascontiguousarray(theta, dtype=np.float64), self.data,
                                 counts)
            except DataError as exc:  # names the column and global row: raised when the loop stops
                self.errors.append(exc)
                return None
            if self._n is None and counts:
                self._n = counts[-1]
            return out

        def full(theta, g):
            out = run("value_and_grad", theta)
            if out is None:
                g[:] = math.nan
                return math.nan
            g[:] = out[1:n + 1]
            return float(out[0])

        if not self.newton:
            return full

        def value(theta):
            out = run("value", theta)
            return math.nan if out is None else float(out[0])

        def hess(theta, H):
            out = run("hessian", theta)
            H[:] = math.nan if out is None else out[:n * n].reshape(n, n)

        return (full, value, hess)

    def raise_found(self):
        """The data error a pass found, if any."""
        if self.errors:
            raise self.errors[0]

    def raise_nonfinite(self):
        """(The loop found a non-finite pass at x0.) The data error a pass found; else the loop
        read the stand-in columns, which no pass over Dask data may do."""
        self.raise_found()
        raise DataError("calcml could not run this fit over Dask data: a pass over the rows did not go through "
                        "the Dask computation (please report this); compute the data into memory (data.compute())")

    def value(self, theta) -> float:
        return self.kernels.value(theta, self.data)

    def hessian(self, theta) -> np.ndarray:
        return self.kernels.hessian(theta, self.data)

    def grad(self, theta) -> np.ndarray:
        return self.kernels.grad(theta, self.data)

    def noise(self, module, x, reduce_mean: bool) -> float:
        """result.gradient_noise at x, from the same sample of rows as in memory (fetched)."""
        from .result import NOISE_SAMPLE, gradient_noise

        n = self.n_rows
        if n < 2:
            return float("nan")
        rows = np.arange(n) if n <= NOISE_SAMPLE else \
            np.sort(np.random.default_rng(0).choice(n, size=NOISE_SAMPLE, replace=False))
        cols = self._rows(rows)
        where = {int(r): k for k, r in enumerate(rows)}
        g = np.empty(x.shape[0])

        def row_gradient(i):
            k = where[i]
            module._fg(x, tuple(c[k:k + 1] for c in cols), g)
            return g.copy()

        return gradient_noise(row_gradient, n, reduce_mean)

    def _rows(self, rows) -> tuple:
        """The data's rows ``rows`` (sorted global numbers) as in-memory columns, cost order."""
        names = self.kernels.cost.data_names
        chunks = _scalar_chunks(self.data, names)
        parts = [_chunk_dataset(p, names, False).columns for p in take_rows(chunks, chunk_sizes(self.data, chunks),
                                                                             rows)]
        return tuple(np.ascontiguousarray(np.concatenate(cols)) for cols in zip(*parts))


class DaskFit:
    """Dask data of a fit on the tensor path (tensor costs; scalar costs restated in index
    notation, ``lift`` then naming their columns): each evaluation the fit makes is one Dask
    computation of the chunks' row sums (:func:`tensor_run`). The methods are those of the
    in-memory evaluations (:class:`calcml.tensor.optimize.Evaluations`); a minibatch fit
    fetches one chunk at a time (:meth:`chunk`)."""

    is_dask_fit = True

    def __init__(self, cost, data, scalar_names=None, columns=None):
        from .tensor.kernels import compile_tensor

        from .tensor.lift import lift_spec

        self.cost, self.data = cost, data
        self.lift = lift_spec(scalar_names, columns) if scalar_names is not None else None
        self.kernels = compile_tensor(cost)
        self.items = _tensor_items(cost)
        self.chunks = tensor_chunks(cost, data, self.lift, self.items)  # the checks by name, now
        self._counts: list = []
        self._sizes = None

    # -- evaluations -----------------------------------------------------------------------
    def _run(self, kind, theta, v=None):
        k = self.kernels
        return tensor_run(k, kind, k._theta(theta), k._empty if v is None else k._theta(v, "v"), self.data,
                          self.lift, self._counts, self.chunks)

    def value(self, theta) -> float:
        return float(self._run("value", theta)[0])

    def value_and_grad(self, theta) -> tuple:
        out = self._run("vg", theta)
        return float(out[0]), out[1:].copy()

    def hvp(self, theta, v) -> np.ndarray:
        return self._run("hvp", theta, v)

    def hvp_at(self, theta):
        t = np.array(theta, dtype=np.float64)
        return lambda v: self._run("hvp", t, v)

    def hessian(self, theta) -> np.ndarray:
        """Every column's exact Hessian-vector product in one Dask computation."""
        k = self.kernels
        return tensor_hessian(k, k._theta(theta), self.data, self.lift, self._counts, self.chunks)

    def full(self, theta, _cols, g) -> float:
        """The generated driver's ``full``: the full-data cost at theta, its gradient into g."""
        out = self._run("vg", theta)
        g[:] = out[1:]
        return float(out[0])

    # -- rows --------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        if not self._counts:
            sizes = self.chunk_rows()
            return int(sum(sizes))
        return self._counts[-1]

    def chunk_rows(self) -> list:
        """The rows of each chunk, in chunk order (from the chunks' sizes where Dask knows
        them, else counted: one pass over the data)."""
        if self._sizes is None:
            self._sizes = chunk_sizes(self.data, self.chunks)
        return self._sizes

    def chunk(self, i: int) -> tuple:
        """Chunk ``i`` of rows, fetched to this process, as the tensor cost's arrays."""
        return chunk_arrays(self.items, self.lift, _dask().compute(self.chunks[i])[0])

    def epoch(self, prog, carry, order, seeds, batch_size, budget, hyper, sa, blowup):
        """One epoch of minibatches, the chunks visited in ``order`` (the rows of the j-th
        shuffled by a generator seeded with ``seeds[j]``) where each chunk is: one chain of Dask
        tasks, each running the module's ``_epoch`` over its chunk and handing the parameters
        and the optimizer's state to the next. ``carry``: (theta, state, steps, sum of the
        minibatch costs weighted by their rows, rows, updates, status), the epoch's start; returns its end."""
        dask = _dask()
        spec = self._loop_spec(prog)
        task = dask.delayed(_epoch_on_chunk, pure=False)
        sizes = self.chunk_rows()
        n_rows = sum(sizes)
        out = carry
        for c, seed in zip(order, seeds):
            if sizes[c]:
                out = task(spec, out, self.chunks[c], int(seed), batch_size, budget, hyper, sa, n_rows, blowup)
        return dask.compute(out)[0] if out is not carry else carry

    def _loop_spec(self, prog):
        spec = prog.__dict__.get("_dask_loop_spec")
        if spec is None:
            mod = prog.module
            spec = prog._dask_loop_spec = LoopSpec(prog.module_key, prog.source, self.items, self.lift,
                                                   mod.RUNNING)
        return spec

    def take(self, rows) -> tuple:
        """The rows ``rows`` (sorted global numbers), fetched, as the tensor cost's arrays."""
        parts = [chunk_arrays(self.items, self.lift, p) for p in take_rows(self.chunks, self.chunk_rows(), rows)]
        return tuple(np.concatenate(cols) for cols in zip(*parts))


def chunk_sizes(data, chunks) -> list:
    """The rows of each of ``chunks`` (the delayed chunks of ``data``): from the chunks' sizes
    where Dask knows them, else counted (one pass over the data)."""
    sizes = _known_chunk_rows(data)
    if sizes is None:
        dask = _dask()
        sizes = dask.compute(*[dask.delayed(_rows)(c) for c in chunks])
    return [int(n) for n in sizes]


def take_rows(chunks, sizes, rows) -> list:
    """The rows ``rows`` (sorted global numbers) of the delayed ``chunks`` of ``sizes`` rows,
    fetched: one in-memory piece (of the chunks' form) per chunk holding any of them, in order."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = np.cumsum([0] + list(sizes))
    dask = _dask()
    picks = []
    for i in range(len(sizes)):
        local = rows[(rows >= starts[i]) & (rows < starts[i + 1])] - starts[i]
        if local.size:
            picks.append(dask.delayed(_pick, pure=True)(chunks[i], local))
    return list(dask.compute(*picks))


def _pick(chunk, local):
    if isinstance(chunk, dict):
        return {k: np.asarray(v)[local] for k, v in chunk.items()}
    if isinstance(chunk, np.ndarray):
        return chunk[local]
    return chunk.iloc[local]  # a DataFrame partition


def _known_chunk_rows(data):
    """The rows of each chunk where Dask knows them (arrays of known chunks), else None."""
    if _is_dask_frame(data):
        return None
    sizes = next(iter(data.values())).chunks[0] if isinstance(data, dict) else data.chunks[0]
    return None if any(math.isnan(c) for c in sizes) else list(sizes)


def chunk_arrays(items, lift, chunk) -> tuple:
    """A chunk of rows (or a sample of rows) in memory as a tensor cost's arrays, DATA_NAMES
    order: labels as int64, the rest as float64, C-contiguous (restated first where ``lift``).
    (The data were checked by the fit's first full pass.)"""
    if lift is not None:
        from .tensor.lift import lifted_data

        chunk = lifted_data(lift[1], _chunk_dataset(chunk, lift[0], False))
    elif not isinstance(chunk, dict):
        chunk = _frame_dict(chunk, [name for name, _s, _c in items])
    return tuple(np.ascontiguousarray(chunk[name], dtype=np.int64 if classes is not None else np.float64)
                 for name, _shape, classes in items)


class LoopSpec:
    """What a worker needs to run a tensor program's minibatch epochs on a chunk: the module's
    cache key and text, the data items, the restatement (``lift``), the RUNNING status."""

    __slots__ = ("key", "source", "items", "lift", "running")

    def __init__(self, key, source, items, lift, running):
        self.key, self.source, self.items, self.lift, self.running = key, source, items, lift, running

    def __getstate__(self):
        return (self.key, self.source, self.items, self.lift, self.running)

    def __setstate__(self, state):
        self.key, self.source, self.items, self.lift, self.running = state


def _epoch_on_chunk(spec: LoopSpec, carry, chunk, seed, batch_size, budget, hyper, sa, n_rows, blowup):
    """On a worker: the module's ``_epoch`` over one chunk, its rows in the order of a
    generator seeded with ``seed``, from ``carry`` (theta, state, steps, row-weighted cost sum, rows, updates,
    status); returns the carry for the next chunk."""
    theta, state, nit, total, rows, done, code = carry
    if code != spec.running or nit >= budget:
        return carry
    mod = _shipped_module(spec.key, spec.source)
    arrays = chunk_arrays(spec.items, spec.lift, chunk)
    n = arrays[0].shape[0] if arrays else 0
    theta = theta.copy()
    state = tuple(a.copy() for a in state)
    k, part, code = run_chunk(mod, theta, state, arrays, n, seed, batch_size, nit, budget, hyper, sa, n_rows, blowup)
    return (theta, state, nit + k, total + part, rows + min(k * batch_size, n), done + k, code)


def run_chunk(mod, theta, state, arrays, n, seed, batch_size, nit, budget, hyper, sa, n_rows, blowup):
    """The loop module's ``_epoch`` (calcml.tensor.loops) over one chunk of ``n`` rows in memory,
    in the order of a generator seeded with ``seed`` (theta and the state updated in place):
    (updates, the minibatch costs' sum weighted by their rows, status)."""
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    cols = mod.columns(arrays, n, mod.REDUCE_MEAN)
    g = np.empty(mod.N_PARAMS)
    code, k, part = mod._epoch(theta, g, perm, batch_size, nit, budget - nit, np.asarray(hyper, dtype=np.float64),
                               np.asarray(sa, dtype=np.float64), cols, n_rows, blowup, tuple(state))
    return k, part, code
