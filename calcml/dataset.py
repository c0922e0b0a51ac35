"""Data in the three forms of the contract, validated once into calcml's layout.

The kernels read one contiguous float64 array per data column (a tuple of 1-D arrays):
each row's values are loaded from ``len(columns)`` independent streams, which runs about
twice as fast as row-major rows. Float64 C-contiguous columns are used as they are (no
copy); anything else is converted once. Finiteness is checked inside the kernels, in the
same pass that reads the data (see :mod:`calcml.codegen`), and located here only when
that check fires.
"""

from __future__ import annotations

import ctypes

import numpy as np

from .errors import DataError

__all__ = ["Dataset", "as_dataset", "pack", "is_dask"]


# What an entry point that needs the data in memory says of Dask data
DASK_HERE = ("this call needs the data in memory: compute them first (data.compute()). Dask data are taken as "
             "they are, and evaluated chunk by chunk where they live, by the compiled kernels (k.value, k.grad, "
             "k.value_and_grad, k.hessian; k.hvp of a tensor cost) and by cm.minimize and prog.run (every method)")


def is_dask(data) -> bool:
    """Whether ``data`` is Dask data (a Dask collection, or a dict holding one), told from the
    type's module name alone: nothing here imports Dask."""
    if type(data).__module__.startswith("dask"):
        return True
    if type(data) is dict:
        return any(type(v).__module__.startswith("dask") for v in data.values())
    return False


class Dataset:
    """Validated data: ``columns`` is a tuple of contiguous float64 arrays in cost order."""

    __slots__ = ("names", "columns", "n_rows", "validated", "block", "_pointers")

    def __init__(self, names: tuple, columns: tuple, validated: bool = False, block=None):
        self.names = names
        self.columns = columns
        self.n_rows = columns[0].shape[0]
        # The packed 2-D (columns, stride) array holding ``columns`` as X[k, :n_rows], or None.
        self.block = block
        # True once every value was checked finite (by Kernels.prepare): kernels then skip
        # their in-pass check. The columns are read-only views so the check stays true.
        self.validated = validated
        self._pointers = None  # (uint64 array of the columns' addresses, its own address)

    def pointer_table(self) -> int:
        """The address of a table of the columns' data addresses, in order: what the kernels
        read the rows through (valid while this dataset lives)."""
        if self._pointers is None:
            table = np.array([address(c) for c in self.columns], dtype=np.uint64)
            self._pointers = (table, address(table))
        return self._pointers[1]

    def as_dict(self) -> dict:
        return dict(zip(self.names, self.columns))

    def __repr__(self):
        return f"Dataset({self.n_rows} rows, columns={list(self.names)})"

    def locate_nonfinite(self):
        """(column name, row index, value) of the first non-finite value, or None."""
        for name, col in zip(self.names, self.columns):
            # A finite sum proves every term finite (NaN and inf propagate); only a
            # non-finite sum, which overflow can also cause, needs the element scan.
            if np.isfinite(np.add.reduce(col)):
                continue
            bad = np.flatnonzero(~np.isfinite(col))
            if bad.size:
                return name, int(bad[0]), col[bad[0]]
        return None

    def raise_nonfinite(self):
        found = self.locate_nonfinite()
        if found is not None:
            name, row, value = found
            raise DataError(f"data column {name!r} holds a non-finite value ({value}) at row {row}")


def address(a: np.ndarray) -> int:
    """The address of a contiguous array's first element (what the kernels are handed)."""
    try:  # a writable buffer: 0.4 us, where a.ctypes.data costs 1.4 us
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError):
        return a.ctypes.data


_KINDS = {"c": "complex numbers", "U": "strings", "S": "bytes", "O": "Python objects", "M": "dates",
          "m": "time spans", "V": "records"}


def real_array(values, what: str, error=DataError, copy: bool = False) -> np.ndarray:
    """``values`` as a float64 array (a new one with ``copy``); complex numbers, strings or
    objects (None among numbers), and None or a string itself, are an ``error`` naming ``what``:
    NumPy's conversion would drop an imaginary part with no more than a warning, and read strings
    as numbers."""
    if values is None or isinstance(values, (str, bytes)):
        raise error(f"{what} must be an array of numbers, got {type(values).__name__}")
    try:
        a = np.asarray(values)
    except Exception:  # noqa: BLE001 - ragged nested lists, and the like
        raise error(f"{what} cannot be read as an array of numbers") from None
    if a.dtype.kind not in "biuf":
        raise error(f"{what} must be real numbers, got {_KINDS.get(a.dtype.kind, 'dtype ' + str(a.dtype))}")
    return np.array(a, dtype=np.float64) if copy else np.asarray(a, dtype=np.float64)


def by_name(d: dict) -> dict:
    """``d`` with SymPy keys (a parameter's or a datum's symbol, an ``IndexedBase``) as their
    names, as a SymPy user keys ``subs``: ``{w: 1.0}`` for ``{"w": 1.0}``."""
    if all(type(k) is str for k in d):
        return d
    return {(k.name if type(k).__module__.startswith("sympy") and isinstance(getattr(k, "name", None), str) else k): v
            for k, v in d.items()}


def _column(name: str, values) -> np.ndarray:
    if type(values) is np.ndarray and values.dtype == np.float64 and values.ndim == 1 and values.flags.c_contiguous:
        return values  # already the kernels' layout
    try:
        arr = np.asarray(values)
    except Exception as exc:  # e.g. ragged nested lists
        raise DataError(f"data column {name!r} cannot be read as an array: {exc}") from None
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise DataError(f"data column {name!r} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"data column {name!r} must be numeric, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float64)


# Rows per block of the blocked transpose: a block's rows (and its transposed columns) stay
# in cache while they are copied.
_TRANSPOSE_BLOCK = 4096


def _transpose(arr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``arr.T`` as float64 columns ``out[k, :N]`` (a new C-contiguous array by default),
    copied in blocks of rows.

    A row-major (N, 9) float64 array of a million rows: 45 ms with one
    ``np.ascontiguousarray(arr.T)`` (each column read with a stride of 72 bytes across the
    whole array), 21 ms in blocks of 4,096 rows."""
    n = arr.shape[0]
    if out is None:
        out = np.empty((arr.shape[1], n))
    for start in range(0, n, _TRANSPOSE_BLOCK):
        stop = min(start + _TRANSPOSE_BLOCK, n)
        out[:, start:stop] = arr[start:stop].T
    return out


def _is_dataframe(data) -> bool:
    return hasattr(data, "columns") and hasattr(data, "to_numpy") and hasattr(data, "iloc")


def as_dataset(data, names: tuple, packed: bool = False) -> Dataset:
    """Validate ``data`` against the cost's column ``names`` and lay it out by column.

    ``packed``: a row-major array is transposed straight into :func:`pack`'s block (one
    copy instead of two; :meth:`calcml.Kernels.prepare` asks for it)."""
    if not names:
        raise DataError("this cost has no data columns; call the kernel with theta alone")
    if data is None:
        raise DataError(f"this cost needs data with columns {list(names)}; got data=None")
    if is_dask(data):
        raise DataError(DASK_HERE)
    if isinstance(data, Dataset):
        if data.names != names:
            raise DataError(f"the prepared dataset has columns {list(data.names)}, but this cost needs {list(names)}")
        return data
    if isinstance(data, dict):
        data = by_name(data)
    if isinstance(data, dict) or _is_dataframe(data):
        present = list(data.keys()) if isinstance(data, dict) else list(data.columns)
        missing = [n for n in names if n not in present]
        if missing:
            raise DataError(
                f"data is missing column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(m) for m in missing)}; the cost's data columns are {list(names)}"
            )
        columns = tuple(_column(n, data[n]) for n in names)
    else:
        if isinstance(data, (str, bytes)):
            raise DataError("data must be a dict of columns, a 2-D array or a DataFrame, got a string")
        arr = np.asarray(data)
        if arr.ndim == 1 and len(names) == 1:
            arr = arr.reshape(-1, 1)
        if arr.ndim != 2 or arr.shape[1] != len(names):
            raise DataError(
                f"a data array must have shape (N, {len(names)}): one column per data symbol "
                f"{list(names)}; got shape {arr.shape}"
            )
        if arr.dtype.kind not in "biuf":
            raise DataError(f"the data array must be numeric, got dtype {arr.dtype}")
        # One transposed copy gives every column contiguous; F-ordered float64 needs none.
        block = None
        if packed and arr.shape[0] > 0:
            block = _transpose(arr, _staggered_block(arr.shape[0], arr.shape[1]))
            cols2d = block
        elif arr.dtype == np.float64 and arr.flags.f_contiguous:
            cols2d = arr.T
        else:
            cols2d = _transpose(arr)
        columns = tuple(cols2d[k, : arr.shape[0]] for k in range(len(names)))
        if block is not None:
            return Dataset(tuple(names), columns, block=block)
    lengths = {c.shape[0] for c in columns}
    if len(lengths) > 1:
        n0 = columns[0].shape[0]
        for name, c in zip(names, columns):
            if c.shape[0] != n0:
                raise DataError(f"data column {name!r} has {c.shape[0]} rows, but {names[0]!r} has {n0}")
    if columns[0].shape[0] == 0:
        raise DataError("the data have no rows")
    return Dataset(tuple(names), columns)


def pack(dataset: Dataset) -> Dataset:
    """Copy the columns into one block whose rows start evenly spread over a 4 KiB page.

    Separately allocated columns all start at the same offset within a page, so the
    kernels' parallel read streams compete for the same cache sets: W1's kernel reads such
    columns 4-5% slower than this block (one and two threads, A/B in one process). Rows
    only 64 bytes apart (this block's earlier layout) were 5-10% slower than rows spread over
    the page (see :func:`stagger_lines`). A prepared dataset is also validated once, so its
    kernels skip the finiteness check. Costs one copy of the data: worth it when the data
    are reused (a fit, a benchmark), which is what :meth:`calcml.Kernels.prepare` is for.
    """
    n, k = dataset.n_rows, len(dataset.columns)
    block = dataset.block  # already packed by as_dataset(..., packed=True)
    if block is None:
        block = _staggered_block(n, k)
        for j, col in enumerate(dataset.columns):
            block[j, :n] = col
    block.flags.writeable = False  # the data were validated: keep them as they were
    columns = [block[j, :n] for j in range(k)]
    return Dataset(dataset.names, tuple(columns), validated=dataset.validated, block=block)


def _staggered_block(n: int, k: int) -> np.ndarray:
    """An empty (k, stride) block for n rows: whole pages plus ``STAGGER_LINES(k)`` cache
    lines a row, so the k rows start evenly spread over a 4 KiB page; the padding after
    each row is zero."""
    page = 512  # float64s per 4 KiB
    stride = -(-n // page) * page + 8 * stagger_lines(k)
    block = np.empty((k, stride))
    block[:, n:] = 0.0
    return block


def stagger_lines(k: int) -> int:
    """Cache lines (64 B) between the page offsets of consecutive rows of a k-row block.

    W1 (9 columns, a million rows), one thread / two threads, against the hand-written
    kernel on a plain (9, N) array (AMD EPYC, alternated timings): rows 64 B apart
    0.82-0.90x / 0.93-0.98x; 7 lines (448 B, the page split evenly) 0.93x / 1.06x;
    2 MB-aligned rows 0.72-0.85x."""
    return max(1, 64 // k)
