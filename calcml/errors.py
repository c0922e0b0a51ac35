"""The exception family.

Every message names what is wrong: the symbol, the column, the shape or the value. All
inherit from :class:`CalcmlError`; the ones about bad input are also ``ValueError`` (or
``TypeError``) so that callers who catch the builtin families keep working.
"""

from __future__ import annotations


class CalcmlError(Exception):
    """Base class of every error calcml raises on purpose."""


class CostError(CalcmlError, ValueError):
    """A cost statement is malformed: unknown symbol, duplicate parameter, non-real expression."""


class DataError(CalcmlError, ValueError):
    """Data handed to a kernel or an optimizer is malformed: missing column, wrong length, NaN."""


class ParamError(CalcmlError, ValueError):
    """A parameter vector has the wrong shape or holds non-finite values."""


class CodegenError(CalcmlError, TypeError):
    """An expression holds a construct the Numba printer cannot translate."""


class CacheError(CalcmlError, OSError):
    """The kernel cache folder cannot be created or written."""


class OptimizeError(CalcmlError, ValueError):
    """An optimizer, schedule or ``minimize`` call is set up wrongly: bad hyperparameter, batch, x0."""


class ParseError(CalcmlError, ValueError):
    """An expression string holds something calcml does not accept; the message quotes the part.

    ``text`` is the whole string, ``column`` (1-based) and ``end_column`` delimit the
    offending part, ``fragment`` is that part (each ``None`` when not about one place).
    """

    def __init__(self, message: str, *, text=None, column=None, end_column=None, fragment=None):
        super().__init__(message)
        self.text = text
        self.column = column
        self.end_column = end_column
        self.fragment = fragment
