"""Verdicts and reports: what every check returns (here and in :mod:`calcml.check`), and the
short forms of expressions and numbers that their messages use."""

from __future__ import annotations

from dataclasses import dataclass

import mpmath
import sympy as sp


STATUSES = ("verified", "refuted", "inconclusive", "not differentiable")


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check.

    Attributes
    ----------
    name : str
        What was checked, e.g. ``"d/dw0"`` or ``"d/dx |x| at x = 0"``.
    status : str
        ``"verified"``, ``"refuted"``, ``"inconclusive"`` or ``"not differentiable"``.
    method : str
        How it was decided.
    detail : str
        A readable reason; for a refutation, the point and the two values that disagree.
    point : dict or None
        ``{name: value}`` where a refutation or a point check was decided.
    expected, actual : optional
        For a refutation: the limit of the difference quotient (or the exact gradient) and
        the value of the derivative under test.
    """

    name: str
    status: str
    method: str
    detail: str
    point: dict | None = None
    expected: object = None
    actual: object = None

    @property
    def ok(self) -> bool:
        return self.status == "verified"

    def __str__(self):
        return f"{self.name}: {self.status} [{self.method}] {self.detail}"


class Report:
    """A list of verdicts; ``ok`` only if every one is ``"verified"``.

    Iterate over it, index it by position or by verdict name, print it for a table. Its
    truth value is ``ok`` (a report with a refutation is false, however long).
    """

    def __init__(self, verdicts, title: str = ""):
        self._verdicts = tuple(verdicts)
        self.title = title

    @property
    def verdicts(self) -> tuple:
        return self._verdicts

    @property
    def ok(self) -> bool:
        return bool(self._verdicts) and all(v.ok for v in self._verdicts)

    def counts(self) -> dict:
        """``{status: number of verdicts}`` over all four statuses."""
        out = {s: 0 for s in STATUSES}
        for v in self._verdicts:
            out[v.status] += 1
        return out

    def __iter__(self):
        return iter(self._verdicts)

    def __len__(self):
        return len(self._verdicts)

    def __getitem__(self, key):
        if isinstance(key, str):
            for v in self._verdicts:
                if v.name == key:
                    return v
            raise KeyError(key)
        return self._verdicts[key]

    def __bool__(self):
        return self.ok

    def __str__(self):
        head = ("check", "status", "method", "detail")
        rows = [(_cut(v.name, 48), v.status, _cut(v.method, 48), v.detail) for v in self._verdicts]
        widths = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(3)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines = [self.title] if self.title else []
        lines.append(fmt.format(*head).rstrip())
        lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
        lines += [fmt.format(*r).rstrip() for r in rows]
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        lines.append(f"{len(rows)} check{'s' if len(rows) != 1 else ''}: {counts or 'none'}"
                     + ("  -> OK" if self.ok else ""))
        return "\n".join(lines)

    def __repr__(self):
        counts = ", ".join(f"{s}={n}" for s, n in self.counts().items() if n)
        return f"<Report ok={self.ok} {counts}>"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _short(e, n: int = 70) -> str:
    s = sp.sstr(e) if isinstance(e, sp.Basic) else str(e)
    return s if len(s) <= n else s[: n - 3] + "..."


def _fmt_coord(v) -> str:
    """A point's coordinate for a message: exact as it prints when short (``23/10``,
    ``pi/6``); a long exact number (a float's binary value, 1e200's 200 digits) to 17
    significant digits, marked ``~`` (the verdict's ``point`` keeps it exact)."""
    s = sp.sstr(v)
    if len(s) <= 24 or not (isinstance(v, sp.Basic) and v.is_number and v.is_real):
        return s
    return "~" + mpmath.nstr(mpmath.mpf(sp.N(v, 20)), 17)


def _fmt_num(v) -> str:
    """A number for a message: exact SymPy numbers as they print (a long exact real number
    as :func:`_fmt_coord` gives it), floats to 12 digits."""
    if isinstance(v, sp.Basic):
        if v.is_Rational and len(sp.sstr(v)) > 24:
            return _fmt_coord(v)
        return _short(v, 60)
    if isinstance(v, (mpmath.mpf, mpmath.mpc)):
        return mpmath.nstr(v, 12)
    if isinstance(v, float):
        return f"{v:.12g}"
    return str(v)
