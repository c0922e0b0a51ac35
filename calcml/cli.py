"""The command line: ``calcml demo``, ``diff``, ``verify`` and ``fit``.

Every expression string goes through :func:`calcml.parse` (no ``eval``); data comes from a
CSV file whose header names the columns, read into memory, or from Parquet or CSV files read
lazily by Dask (a glob, a Parquet file or folder; :mod:`calcml.dask_data`), optionally on a
running ``dask.distributed`` cluster (``--scheduler``). Dask is imported only then. An error is
one line on stderr and a non-zero exit, never a traceback (set ``CALCML_TRACEBACK=1`` to see
one while debugging calcml itself).

Exit status: 0 success; 1 an error; 2 a usage error; 3 the command ran but its answer is
negative (``verify``: not verified; ``fit``: the run ended without success).
"""

from __future__ import annotations

import argparse
import ast
import csv
import glob
import math
import os
import re
import sys

from ._version import __version__
from .errors import CalcmlError, ParseError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NEGATIVE = 0, 1, 2, 3


class CommandError(CalcmlError, ValueError):
    """A command-line input is wrong (a file, an option's value)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: what is wrong and where to read more."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _subparser(sub, name, help, description, examples):
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="calcml",
        description="Exact symbolic gradients of ML costs, verified and compiled with Numba.\n\n"
        "Expressions are Python-style arithmetic (+ - * / **, unary minus) on numbers and names,\n"
        "with the functions exp, log, sqrt, sin, cos, tan, asin, acos, atan, atan2, sinh, cosh,\n"
        "tanh, asinh, acosh, atanh, abs, sign, max, min, erf, Heaviside, sigmoid, softplus, relu,\n"
        "log1p, expm1 and the constants pi and e. They are parsed, never evaluated as code.",
        epilog="examples:\n"
        "  calcml demo\n"
        '  calcml diff "x*sin(x)" --wrt x\n'
        '  calcml verify "log(1 + exp(x))" --wrt x\n'
        '  calcml fit "(w*x + b - y)**2" --params w,b --data data.csv --method adam --lr 0.1\n'
        "  calcml fit \"(w*x + b - y)**2\" --params w,b --data 'rows/*.parquet' --method lbfgs\n\n"
        "exit status: 0 success, 1 error, 2 usage error, 3 not verified / fit without success",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"calcml {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _subparser(
        sub, "demo", "run the built-in example",
        "State the linear-regression cost, derive its exact gradient, compile it and check it.",
        ["calcml demo"],
    )

    p = _subparser(
        sub, "diff", "print the exact derivative of an expression",
        "Differentiate EXPR exactly (SymPy) with respect to one or more variables.",
        ['calcml diff "x*sin(x)" --wrt x', 'calcml diff "(w*x + b - y)**2" --wrt w,b',
         'calcml diff "sigmoid(z)" --latex'],
    )
    p.add_argument("expr", metavar="EXPR", help="the expression, e.g. \"x*sin(x)\"")
    p.add_argument("--wrt", metavar="NAMES", help="variable(s), comma separated (default: the only name in EXPR)")
    p.add_argument("--latex", action="store_true", help="print LaTeX instead of plain text")

    p = _subparser(
        sub, "verify", "check a derivative against the limit definition",
        "Check d EXPR / d NAME against lim_{h->0} (f(x+h) - f(x))/h, for general x or at a point,\n"
        "and print the verdict table. Exit status 0 when verified, 3 otherwise.",
        ['calcml verify "log(1 + exp(x))" --wrt x', 'calcml verify "abs(x)" --wrt x --at 0',
         'calcml verify "x*y**2" --wrt x --at x=1,y=pi/6'],
    )
    p.add_argument("expr", metavar="EXPR", help="the function, e.g. \"log(1 + exp(x))\"")
    p.add_argument("--wrt", metavar="NAME", help="the variable (default: the only name in EXPR)")
    p.add_argument("--at", metavar="POINT", help="a point: a number (1/3, pi/6, 0.1) or NAME=VALUE,... ")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="time budget of the check")

    p = _subparser(
        sub, "fit", "fit the parameters of a cost to a CSV file, or to Parquet/CSV files via Dask",
        "Minimize the mean (or sum) over the rows of --data of the per-row cost EXPR with a compiled\n"
        "descent loop. The CSV header (or the Parquet schema) names the columns; the names of EXPR\n"
        "that are not parameters are columns. A CSV file is read into memory. A glob of Parquet or\n"
        "CSV files ('rows/*.parquet', 'rows/part-*.csv'; quote it), a Parquet file or a folder of\n"
        "Parquet files is read lazily by Dask, chunk by chunk, and fitted out of core: a full-batch\n"
        "method's passes over the rows are one Dask computation each; a minibatch method (--batch-size)\n"
        "visits the chunks in a seeded random order each epoch, one at a time. On Dask's default\n"
        "scheduler (this machine's threads) or, with --scheduler, on a running cluster, whose workers\n"
        "then read the files (they must see the same paths). Dask data need\n"
        "pip install 'calcml[dask]'. Exit status 0 when the fit succeeded, 3 when it did not\n"
        "(divergence, iteration limit, Ctrl-C): the table then says why.",
        ['calcml fit "(w*x + b - y)**2" --params w,b --data data.csv --method adam --lr 0.1',
         'calcml fit "(w*x + b - y)**2" --params w,b --data data.csv --method sgd \\\n'
         '      --batch-size 16 --epochs 50 --schedule "exponential(0.05, 0.99)" --seed 1',
         'calcml fit "(1 - a)**2 + 100*(b - a**2)**2" --params a,b --method lbfgs --x0 a=-1.2,b=1',
         'calcml fit "log(1 + exp(-t*(w*x + b)))" --params w,b --data d.csv --method newton \\\n'
         '      --history hist.csv --plot loss.png --export fit_model.py',
         "calcml fit \"softplus(w*x + b) - t*(w*x + b)\" --params w,b --data 'rows/*.parquet' --method lbfgs",
         "calcml fit \"(w*x + b - y)**2\" --params w,b --data '/shared/rows/*.csv' --method lbfgs \\\n"
         "      --scheduler tcp://10.0.0.5:8786"],
    )
    p.add_argument("expr", metavar="EXPR", help="the per-row cost, e.g. \"(w*x + b - y)**2\"")
    p.add_argument("--params", required=True, metavar="NAMES", help="the parameters, comma separated: w,b")
    p.add_argument("--data", metavar="PATH",
                   help="a CSV file (read into memory; its header names the columns), or, read lazily by Dask: a "
                        "quoted glob of Parquet or CSV files ('rows/*.parquet'), a .parquet file or a folder of them")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="fit on the running dask.distributed cluster at ADDRESS (tcp://host:8786): its workers read "
                        "--data (a single CSV file too) and make the passes; the client is closed afterwards")
    p.add_argument("--scheduler-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="give up connecting to --scheduler after this long (default 10)")
    p.add_argument("--method", default="gd", metavar="NAME",
                   help="gd, sgd, momentum, nesterov, adam, rmsprop, adagrad, newton, lbfgs (default gd)")
    p.add_argument("--lr", metavar="RATE", help="the learning rate (a number, or 'auto' for gd)")
    p.add_argument("--schedule", metavar="SCHEDULE",
                   help="a rate schedule replacing --lr: constant(lr), step(lr, every, factor), exponential(lr, "
                        "decay), inverse_time(lr, decay), cosine(lr, steps, final), warmup(SCHEDULE, steps)")
    p.add_argument("--batch-size", type=int, metavar="N", help="minibatch rows (default: the full batch)")
    p.add_argument("--epochs", type=int, metavar="N", help="passes over the data (minibatch runs)")
    p.add_argument("--maxiter", type=int, metavar="N", help="optimizer updates at most")
    p.add_argument("--tol", type=float, default=1e-8, metavar="TOL", help="stop when the gradient norm is at most TOL")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the minibatch shuffle (default 0)")
    p.add_argument("--x0", metavar="VALUES", help="the start: w=0.5,b=0 or 0.5,0 in --params order (default zeros); write --x0=-1,2 when it starts with a minus")
    p.add_argument("--reduce", choices=["mean", "sum"], default="mean", help="how rows are combined (default mean)")
    p.add_argument("--history", metavar="CSV", help="write the cost per iteration (or epoch) to this CSV file")
    p.add_argument("--plot", metavar="PNG", help="save the cost curve as an image (needs matplotlib)")
    p.add_argument("--export", metavar="PY", help="write the compiled optimizer as a standalone Python module")
    p.add_argument("--progress", action="store_true", help="draw a progress bar on stderr")
    return parser


# -- shared helpers ------------------------------------------------------------------------------
def _names(text: str, option: str) -> list:
    from .parse import check_name

    names = [n for n in text.replace(",", " ").split()]
    if not names:
        raise CommandError(f"{option} names nothing")
    seen = set()
    for n in names:
        check_name(n, f"{option} name")
        if n in seen:
            raise CommandError(f"{option} lists {n!r} twice")
        seen.add(n)
    return names


def _symbols_of(expr) -> dict:
    return {s.name: s for s in expr.free_symbols}


def _wrt(expr, option_value, option="--wrt", many=True) -> list:
    """The variables to differentiate by: the option's names, or the expression's only name."""
    present = _symbols_of(expr)
    if option_value is None:
        if len(present) != 1:
            listed = ", ".join(sorted(present)) or "none"
            raise CommandError(f"say which variable with {option} (the expression's names: {listed})")
        return list(present.values())
    names = _names(option_value, option)
    if not many and len(names) > 1:
        raise CommandError(f"{option} takes one name, got {option_value!r}")
    missing = [n for n in names if n not in present]
    if missing:
        listed = ", ".join(sorted(present)) or "none"
        raise CommandError(f"{missing[0]!r} does not appear in the expression (its names: {listed})")
    return [present[n] for n in names]


def _number(text: str, what: str):
    """An exact number from text such as 1/3, pi/6, -0.5 (read by the safe parser)."""
    from .parse import parse

    value = parse(text)
    if value.free_symbols:
        raise CommandError(f"{what}: {text!r} is not a number")
    return value


# -- diff ------------------------------------------------------------------------------------------
def _cmd_diff(args, out) -> int:
    import sympy as sp

    from .parse import parse

    expr = parse(args.expr)
    variables = _wrt(expr, args.wrt)
    show = sp.latex if args.latex else sp.sstr
    for v in variables:
        d = sp.diff(expr, v)
        out(show(d) if len(variables) == 1 else f"d/d{v.name}: {show(d)}")
    return EXIT_OK


# -- verify ----------------------------------------------------------------------------------------
def _point(text: str, expr, x):
    if "=" not in text:
        return _number(text, "--at")
    point = {}
    present = _symbols_of(expr)
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CommandError(f"--at: expected NAME=VALUE, got {item.strip()!r}")
        if name not in present:
            raise CommandError(f"--at: {name!r} does not appear in the expression")
        if present[name] in point:
            raise CommandError(f"--at: {name!r} is given twice")
        point[present[name]] = _number(value.strip(), f"--at {name}")
    return point


def _cmd_verify(args, out) -> int:
    from .parse import parse
    from .verify import verify_derivative

    expr = parse(args.expr)
    (x,) = _wrt(expr, args.wrt, many=False)
    at = None if args.at is None else _point(args.at, expr, x)
    kwargs = {} if args.timeout is None else {"timeout": args.timeout}
    if args.timeout is not None and not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise CommandError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    report = verify_derivative(expr, x, at=at, **kwargs)
    out(str(report))
    return EXIT_OK if report.ok else EXIT_NEGATIVE


# -- fit -------------------------------------------------------------------------------------------
class CsvTable:
    """A CSV file's columns by name (the header's, stripped), each read as numbers when first
    asked for: a column the expression does not use may hold anything, as in files that Dask
    reads (docs/dask.md)."""

    def __init__(self, path: str, names: list, rows: list):
        self.path, self.names, self._rows, self._done = path, names, rows, {}

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, name) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name):
        found = self._done.get(name)
        if found is None:
            import numpy as np

            j = self.names.index(name)
            found = np.empty(len(self._rows))
            for i, (line, row) in enumerate(self._rows):
                cell = row[j]
                try:
                    found[i] = float(cell)
                except ValueError:
                    raise CommandError(f"{self.path} line {line}, column {name!r}: {cell.strip()!r} is not a number") \
                        from None
                if not math.isfinite(found[i]):  # here, with the file's line, before any compile
                    raise CommandError(f"{self.path} line {line}, column {name!r}: {cell.strip()!r} is not finite; "
                                       "data must be finite numbers")
            self._done[name] = found
        return found


def read_csv(path: str) -> CsvTable:
    """A CSV file with a header row of names: its columns by name (:class:`CsvTable`)."""
    from .parse import check_name

    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise CommandError(f"no such data file: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CommandError(f"cannot read {path}: {exc}") from None
    rows = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not rows:
        raise CommandError(f"{path} is empty; it needs a header row naming the columns")
    header_line, header = rows[0]
    names = [h.strip() for h in header]
    for j, name in enumerate(names):
        try:
            check_name(name, f"{path}: column {j + 1} of the header,")
        except ParseError as exc:
            raise CommandError(str(exc)) from None
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CommandError(f"{path}: the header names the column {dup!r} twice")
    if len(rows) == 1:
        raise CommandError(f"{path} has a header but no data rows")
    for line, row in rows[1:]:
        if len(row) != len(names):
            raise CommandError(f"{path} line {line}: {len(row)} fields, but the header has {len(names)}")
    return CsvTable(path, names, rows[1:])


# -- files read lazily by Dask ----------------------------------------------------------------------
_GLOB = re.compile(r"[*?\[]")
_PARQUET = (".parquet", ".pq", ".parq")


def _kind(path: str):
    """"parquet", "csv" or None, from a file name."""
    low = path.lower()
    if low.endswith(_PARQUET):
        return "parquet"
    if low.endswith(".csv"):
        return "csv"
    return None


def _natural(path: str) -> list:
    """Sort key: part.2 before part.10 (the order of the rows: Dask writes part.0, part.1, ...)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path)]


def _strict_csv_reader():
    """pandas' read_csv with its warning that a row's fields outnumber the header's (data it
    would drop) raised as an error. Made here, so that Dask ships it to its workers by value:
    they need not have calcml installed."""
    def read_csv(*args, **kwargs):
        import warnings

        import pandas as pd

        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            try:
                return pd.read_csv(*args, **kwargs)
            except pd.errors.ParserWarning:
                raise ValueError("a row has more fields than the header has names") from None
    return read_csv


class LazyFiles:
    """What ``--data`` names when Dask reads it: ``kind`` ("parquet" or "csv") and the files,
    in natural order of their names (the order of the rows)."""

    def __init__(self, path: str, kind: str, files: list):
        self.path, self.kind, self.files = path, kind, files
        self._columns = None  # {name as the expression writes it: the file's column label}
        if kind == "csv":  # Dask's reader would fail on the first one, vaguely, and skip the others
            for f in files:
                with open(f, "rb") as fh:
                    head = fh.read(4096)
                if not head.lstrip(b"\xef\xbb\xbf").strip():
                    raise CommandError(f"{f} is empty; every CSV file needs a header row")

    def describe(self) -> str:
        n = len(self.files)
        return f"{n} {'Parquet' if self.kind == 'parquet' else 'CSV'} file{'s' if n > 1 else ''}"

    def _read(self, columns=None):
        try:
            import dask.dataframe as dd
        except ImportError:
            raise CommandError(f"reading {self.path} lazily needs Dask: pip install 'calcml[dask]' "
                               "(or give one CSV file, read into memory)") from None
        try:
            # Every field of a CSV row is read and counted, as in memory (pandas' usecols would
            # drop a row's extra fields silently, and its implicit index shift a row with one
            # more field than the header): the columns not used are read as text.
            options = {"encoding": "utf-8-sig", "skipinitialspace": True, "index_col": False}
            if columns is not None:
                options["dtype"] = {label: "float64" if label in columns else "object"
                                    for label in self._columns.values()}
            named = any(_GLOB.search(f) for f in self.files)
            if self.kind == "parquet":
                # Dask's readers match each path as a pattern again: a file named [a].csv would
                # match nothing, silently. Such names are read one partition per file, as named.
                if named:
                    import pandas as pd

                    return dd.from_map(pd.read_parquet, self.files, columns=columns)
                return dd.read_parquet(self.files, columns=columns)
            if named:
                frame = dd.from_map(_strict_csv_reader(), self.files, **options)
            else:
                from dask.dataframe.io.csv import read_pandas

                frame = read_pandas(_strict_csv_reader(), self.files, **options)
            return frame if columns is None else frame[columns]
        except CalcmlError:
            raise
        except Exception as exc:  # noqa: BLE001 - a reader's error, one line, naming the files
            raise CommandError(f"cannot read {self.path}: {_one_line(exc)}") from None

    def columns(self) -> list:
        """The columns' names (the Parquet schema, or the first CSV file's header)."""
        if self._columns is None:
            labels = list(self._read().columns)
            self._columns = {}
            for label in labels:  # a CSV header's names are stripped, as in memory
                self._columns.setdefault(str(label).strip(), label)
        return list(self._columns)

    def frame(self, names: list):
        """A Dask DataFrame of the columns ``names`` (the expression's), read lazily."""
        self.columns()
        labels = [self._columns[n] for n in names]
        frame = self._read(labels)
        if labels != names:
            frame = frame.rename(columns=dict(zip(labels, names)))
        return frame

    def n_rows(self):
        """The row count, where the files' metadata give it without reading them (Parquet), else None."""
        if self.kind != "parquet":
            return None
        try:
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)
        except Exception:  # noqa: BLE001 - only a figure for the table
            return None


def lazy_files(path: str, scheduler=None):
    """The files Dask reads for ``--data PATH`` (a glob, a Parquet file, a folder of Parquet files;
    with ``--scheduler``, a CSV file too), or None for a CSV file read into memory."""
    if _GLOB.search(path) and not os.path.exists(path):  # (a file named [a].csv is that file)
        found = glob.glob(path)
        files = sorted((f for f in found if os.path.isfile(f)), key=_natural)
        if not files:
            folders = [f for f in found if os.path.isdir(f)]
            hint = f" (only the folder {folders[0]}: name its files, e.g. {os.path.join(folders[0], '*.parquet')})" \
                if folders else ""
            raise CommandError(f"no file matches {path}{hint}")
        kinds = {f: _kind(f) for f in files}
        other = [f for f in files if kinds[f] is None]
        if other:
            raise CommandError(f"{path} matches {other[0]}, which is neither Parquet (.parquet, .pq) nor CSV (.csv); "
                               "narrow the pattern, e.g. rows/*.parquet")
        if len(set(kinds.values())) > 1:
            raise CommandError(f"{path} matches both Parquet and CSV files; match one kind, e.g. rows/*.parquet")
        return LazyFiles(path, kinds[files[0]], files)
    if os.path.isdir(path):
        files = sorted((f for f in glob.glob(os.path.join(path, "*")) if os.path.isfile(f) and _kind(f) == "parquet"),
                       key=_natural)
        if not files:
            raise CommandError(f"the folder {path} holds no Parquet file (*.parquet, *.pq)")
        return LazyFiles(path, "parquet", files)
    kind = _kind(path)
    if kind != "parquet" and scheduler is None:
        return None  # a CSV file, read into memory
    if not os.path.isfile(path):
        raise CommandError(f"no such data file: {path}")
    return LazyFiles(path, kind or "csv", [path])


def _connect(address: str, timeout: float):
    """A dask.distributed Client of the running scheduler at ``address``, the default for Dask."""
    if not (timeout > 0 and math.isfinite(timeout)):
        raise CommandError(f"--scheduler-timeout must be a positive number of seconds, got {timeout}")
    try:
        from distributed import Client
    except ImportError:
        raise CommandError("--scheduler needs dask.distributed: pip install 'calcml[dask]'") from None
    try:
        return Client(address, timeout=timeout, set_as_default=True)
    except Exception as exc:  # noqa: BLE001 - unreachable, malformed: one line naming the address
        raise CommandError(f"cannot connect to the Dask scheduler at {address} (--scheduler): {_one_line(exc)}") \
            from None


_SCHEDULES = ("constant", "step", "exponential", "inverse_time", "cosine", "warmup")


def _schedule(text: str):
    """A schedule from text such as ``warmup(cosine(0.1, 1000), 100)``: a whitelisted tree of
    schedule calls with number arguments, built directly (no eval)."""
    from . import schedules

    if len(text) > 500:
        raise CommandError("--schedule is too long")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise CommandError(f"--schedule: cannot read {text!r}; write e.g. exponential(0.01, 0.99)") from None

    def value(node, depth=0):
        if depth > 8:
            raise CommandError("--schedule is nested too deeply")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SCHEDULES:
            kwargs = {}
            for kw in node.keywords:
                if kw.arg is None:
                    raise CommandError("--schedule: ** arguments are not allowed")
                kwargs[kw.arg] = value(kw.value, depth + 1)
            args = [value(a, depth + 1) for a in node.args]
            factory = schedules.__dict__[node.func.id]
            try:
                return factory(*args, **kwargs)
            except TypeError as exc:
                raise CommandError(f"--schedule: {node.func.id}: {exc}") from None
        number = _literal_number(node)
        if number is not None:
            return number
        raise CommandError(
            f"--schedule: {ast.get_source_segment(text.strip(), node)!r} is neither a number nor one of "
            f"{', '.join(_SCHEDULES)}(...)"
        )

    return value(tree)


def _literal_number(node):
    sign = 1
    while isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -sign if isinstance(node.op, ast.USub) else sign
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if type(node.value) is int and abs(node.value) > 10**15:
            raise CommandError(f"--schedule: the number {node.value} is too large")
        return sign * node.value
    return None


def _x0(text, names):
    if text is None:
        return [0.0] * len(names)
    items = [s.strip() for s in text.split(",") if s.strip()]

    def num(s, what):
        try:
            v = float(s)
        except ValueError:
            raise CommandError(f"--x0: {what} {s!r} is not a number") from None
        if not math.isfinite(v):
            raise CommandError(f"--x0: {what} must be finite, got {s!r}")
        return v

    if any("=" in s for s in items):
        x0 = {}
        for s in items:
            name, sep, v = s.partition("=")
            name = name.strip()
            if not sep:
                raise CommandError(f"--x0: give every value as NAME=VALUE or none, got {s!r}")
            if name not in names:
                raise CommandError(f"--x0: {name!r} is not one of the parameters {', '.join(names)}")
            if name in x0:
                raise CommandError(f"--x0: {name!r} is given twice")
            x0[name] = num(v.strip(), f"the value of {name}")
        missing = [n for n in names if n not in x0]
        if missing:
            raise CommandError(f"--x0: no value for {', '.join(missing)}")
        return [x0[n] for n in names]
    if len(items) != len(names):
        raise CommandError(f"--x0: {len(items)} values for {len(names)} parameters ({', '.join(names)})")
    return [num(s, "the value") for s in items]


def _lr(text):
    if text is None:
        return None
    if text == "auto":
        return "auto"
    try:
        v = float(text)
    except ValueError:
        raise CommandError(f"--lr must be a number or 'auto', got {text!r}") from None
    return v


def _build_cost(args):
    """(cost, data, parameter names) from the expression, --params and --data: data is a dict of
    columns read from a CSV file, a Dask DataFrame of the used columns (``args.lazy``, read
    lazily), or None."""
    from .cost import Cost, data as data_symbols, params as param_symbols
    from .parse import CONSTANTS, FUNCTIONS, names_in, parse

    names = _names(args.params, "--params")
    for n in names:
        if n in FUNCTIONS or n in CONSTANTS:
            raise CommandError(f"--params: {n!r} names a {'function' if n in FUNCTIONS else 'constant'} in expressions")
    psyms = [param_symbols(n) for n in names]
    expr = parse(args.expr, symbols=dict(zip(names, psyms)))
    present = _symbols_of(expr)
    unused = [n for n in names if n not in present]
    if unused:
        raise CommandError(f"--params: {', '.join(repr(n) for n in unused)} not in the expression")
    others = sorted(n for n in present if n not in names)
    if args.data is None:
        if others:
            raise CommandError(
                f"{', '.join(repr(n) for n in others)} in the expression {'is' if len(others) == 1 else 'are'} not "
                "parameters (--params); give --data with a column of that name, or list it in --params"
            )
        return Cost(expr, params=psyms, reduce=args.reduce), None, names
    args.data = os.path.expanduser(args.data)  # a quoted '~/rows/*.csv' reaches calcml unexpanded
    args.lazy = lazy_files(args.data, args.scheduler)
    table = read_csv(args.data) if args.lazy is None else args.lazy.columns()
    clash = [n for n in table if n in CONSTANTS and n not in names]
    if clash:  # a column named as a constant: does the expression mean it? (it would read the constant)
        used = sorted(set(clash) & names_in(args.expr))
        if used:
            raise CommandError(
                f"{', '.join(repr(n) for n in used)} in the expression {'is' if len(used) == 1 else 'are'} both a "
                f"column of {args.data} and a constant ({', '.join(f'{n} = {float(CONSTANTS[n]):.6g}' for n in used)}); "
                "rename the column to fit with it")
    unknown = [n for n in others if n not in table]
    if unknown:
        raise CommandError(
            f"{', '.join(repr(n) for n in unknown)} in the expression {'is' if len(unknown) == 1 else 'are'} neither "
            f"a parameter (--params) nor a column of {args.data} (columns: {', '.join(table)})"
        )
    if not others:
        raise CommandError(f"the expression uses no column of {args.data} (columns: {', '.join(table)})")
    columns = [n for n in table if n in others]  # header order
    dsyms = [data_symbols(n) for n in columns]
    expr = expr.xreplace({present[n]: s for n, s in zip(columns, dsyms)})
    cost = Cost(expr, params=psyms, data=dsyms, reduce=args.reduce)
    shadowed = [n for n in names if n in table]
    if shadowed:
        args.notes.append(f"column{'s' if len(shadowed) > 1 else ''} {', '.join(repr(n) for n in shadowed)} of "
                          f"{args.data} not used: {'they are parameters' if len(shadowed) > 1 else 'a parameter'}")
    if args.lazy is not None:
        return cost, args.lazy.frame(columns), names
    return cost, {n: table[n] for n in columns}, names


def _table(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _fmt(v) -> str:
    return f"{v:.10g}"


def _write_history(path, res, minibatch: bool):
    unit = "epoch" if minibatch else "iteration"  # minibatch runs keep one mean cost per epoch
    try:
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([unit, "cost"])
            for i, v in zip(res.history_steps.tolist(), res.history.tolist()):
                w.writerow([i, repr(v)])
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None


def _save_plot(path, res):
    from .plot import require_matplotlib

    require_matplotlib("--plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        res.plot(ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def _cmd_fit(args, out) -> int:
    from .minimize import generate

    if args.plot:  # before the run, not after it
        from .plot import require_matplotlib

        require_matplotlib("--plot")
    args.notes = []
    args.lazy = None
    client = None
    if args.scheduler is not None:
        if args.data is None:
            args.notes.append("--scheduler not used: a cost without data runs here")
        else:  # first: an unreachable address fails before any work
            client = _connect(args.scheduler, args.scheduler_timeout)
    try:
        cost, data, names = _build_cost(args)
        x0 = _x0(args.x0, names)
        schedule = None if args.schedule is None else _schedule(args.schedule)
        prog = generate(cost, method=args.method, schedule=schedule, batch_size=args.batch_size, lr=_lr(args.lr))
        try:
            res = prog.run(x0, data, epochs=args.epochs, maxiter=args.maxiter, tol=args.tol, seed=args.seed,
                           progress=args.progress)
        except CalcmlError as exc:
            if args.lazy is not None and ("take Dask data" in str(exc) or "needs the data in memory" in str(exc)):
                raise CommandError(f"{exc}; on the command line, one CSV file without --scheduler is read into "
                                   "memory") from None
            raise
        except Exception as exc:  # noqa: BLE001 - over Dask: a reader's or the cluster's error, in one line
            if args.lazy is None or os.environ.get("CALCML_TRACEBACK"):
                raise
            raise CommandError(f"reading {args.data} with Dask failed: {type(exc).__name__}: {_one_line(exc)}") \
                from None
        return _report_fit(args, out, cost, prog, schedule, res, data)
    finally:
        if client is not None:
            client.close()


def _report_fit(args, out, cost, prog, schedule, res, data) -> int:
    rate = f"schedule {schedule!r}" if schedule is not None else (f"lr {_fmt(res.lr)}" if isinstance(res.lr, float) else "")
    if data is None:
        over = "no data"
    elif args.lazy is None:
        over = f"{cost.reduce} over {len(next(iter(data.values())))} rows of {args.data}"
    else:
        n = args.lazy.n_rows()
        over = f"{cost.reduce} over {f'{n} rows' if n is not None else 'the rows'} of {args.data}"
    rows = [("method", f"{res.method}{', ' + rate if rate else ''}")]
    if args.lazy is not None:
        where = f"the cluster at {args.scheduler}" if args.scheduler else "Dask's default scheduler (this machine)"
        rows.append(("data", f"{args.lazy.describe()} read lazily by Dask, on {where}"))
    rows.append(("cost", over))
    rows += [(f"  {n}", _fmt(v)) for n, v in res.params.items()]
    rows += [("value", _fmt(res.fun)), ("gradient norm", f"{res.grad_norm:.3g}"), ("iterations", str(res.nit)),
             ("success", str(res.success)), ("message", res.message)]
    rows += [("note", n) for n in list(res.notes) + args.notes]
    out(_table(rows))
    if args.history:
        _write_history(args.history, res, prog.batch_size is not None)
        out(f"history written to {args.history}")
    if args.plot:
        _save_plot(args.plot, res)
        out(f"plot written to {args.plot}")
    if args.export:
        try:
            path = prog.export(args.export)
        except OSError as exc:
            raise CommandError(f"cannot write {args.export}: {exc.strerror or exc}") from None
        out(f"optimizer exported to {path}")
    return EXIT_OK if res.success else EXIT_NEGATIVE


def _cmd_demo(args, out) -> int:
    from .demo import run

    run()
    return EXIT_OK


_COMMANDS = {"demo": _cmd_demo, "diff": _cmd_diff, "verify": _cmd_verify, "fit": _cmd_fit}


def _one_line(exc) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def main(argv=None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE

    def out(text):
        print(text, flush=True)

    try:
        return _COMMANDS[args.command](args, out)
    except KeyboardInterrupt:
        print("calcml: interrupted", file=sys.stderr)
        return 130
    except (CalcmlError, ValueError, TypeError, OSError) as exc:
        if os.environ.get("CALCML_TRACEBACK"):
            raise
        print(f"calcml {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug in calcml: still one line, with a way to see more
        if os.environ.get("CALCML_TRACEBACK"):
            raise
        print(f"calcml {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(set CALCML_TRACEBACK=1 for details)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
