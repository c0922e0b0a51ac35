"""Generated code as structure: statements are nodes, printed once.

Every module calcml generates (the scalar kernels, the tensor kernels, the optimizer loops)
is built from these nodes and printed by :func:`render`, in the manner of SymPy's
``sympy.codegen.ast`` (``Assignment``, ``AddAugmentedAssignment``, ``For``, ``CodeBlock``):

* a statement is a node, a loop or a branch holds its body as a list of nodes, so a
  generator says "a loop over 784 features" as ``For("j", range_(784), body)`` and nothing
  depends on indentation counted by hand;
* an expression in a node is either a SymPy expression, printed at render time by the
  printer that prints everything else (its name table decides what each symbol is called,
  so a rename is a change of table and cannot hit half of a name), or code text that the
  generator printed already (a name, a subscript, a call);
* fixed source (the helpers, the driver templates) is :class:`Raw`: verbatim lines that no
  generator edits.

Bodies may nest lists (a piece that returns a list of statements is spliced in) and may hold
``None`` (a statement a branch of the generator left out). Rendering is exact and plain:
four spaces a level, a trailing ``  # comment`` where a node has one. Code text written over
several lines is written as if its statement stood at column 0: every line of it is
indented to the statement's depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

__all__ = [
    "Node", "Assign", "AugAssign", "Stmt", "Return", "Raise", "Break", "Comment", "Blank",
    "Doc", "For", "While", "If", "Try", "Def", "Raw", "range_", "code", "flatten", "lines", "render", "printable",
]

_INDENT = "    "


def code(e, printer=None) -> str:
    """An expression's code: text as it is, a SymPy expression through ``printer``."""
    if type(e) is str or isinstance(e, str):
        return e
    if isinstance(e, bool) or e is None:
        return repr(e)
    if isinstance(e, int):
        return str(e)
    if isinstance(e, float):
        return repr(e)
    if isinstance(e, sp.Basic):
        if printer is None:
            from .printing import NumbaPrinter

            printer = NumbaPrinter({})
        return printer.doprint_expr(e)
    if isinstance(e, (tuple, list)):
        return ", ".join(code(x, printer) for x in e)
    raise TypeError(f"calcml.ir: no code for {type(e).__name__} {e!r}")


def range_(*args) -> str:
    """``range(...)`` of the arguments (numbers, names or SymPy expressions of them)."""
    return "range(" + ", ".join(code(a) for a in args) + ")"


def flatten(body) -> list:
    """The statements of ``body``: nested lists spliced, ``None`` dropped."""
    out = []
    if body is None:
        return out
    if isinstance(body, Node):
        return [body]
    for item in body:
        if item is None:
            continue
        if isinstance(item, Node):
            out.append(item)
        else:
            out.extend(flatten(item))
    return out


def printable(text: str) -> str:
    """``text`` with the characters that are not printable escaped (a newline or a carriage
    return in a symbol's name): text from a user that goes into a comment stays one line of
    comment, never a line of code."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _tail(comment: str) -> str:
    return f"  # {printable(comment)}" if comment else ""


class Node:
    """A statement. ``emit(out, printer, depth)`` appends its lines."""

    def emit(self, out: list, printer, depth: int):  # pragma: no cover - abstract
        raise NotImplementedError


def _line(out: list, depth: int, text: str):
    """``text`` at ``depth``. Code written over several lines (a long call, in its
    parentheses) is written as at column 0: each line is indented to the statement's depth."""
    if "\n" not in text:  # (most statements: no split)
        out.append(_INDENT * depth + text if text else "")
        return
    out.extend(_INDENT * depth + part if part else "" for part in text.split("\n"))


def _body(out: list, body, printer, depth: int):
    stmts = flatten(body)
    if not stmts:
        _line(out, depth, "pass")
    for s in stmts:
        s.emit(out, printer, depth)


def _assign(out: list, printer, depth: int, target, op: str, value, comment: str):
    _line(out, depth, f"{code(target, printer)} {op} {code(value, printer)}{_tail(comment)}")


def _block(out: list, printer, depth: int, head: str, comment: str, body):
    """``head:`` (and its comment), then ``body`` one level in."""
    _line(out, depth, f"{head}:{_tail(comment)}")
    _body(out, body, printer, depth + 1)


@dataclass(frozen=True)
class Assign(Node):
    """``target = value``"""
    target: object
    value: object
    comment: str = ""

    def emit(self, out, printer, depth):
        _assign(out, printer, depth, self.target, "=", self.value, self.comment)


@dataclass(frozen=True)
class AugAssign(Node):
    """``target op= value`` (``op``: ``+``, ``-``, ``*``, ``/``)"""
    target: object
    op: str
    value: object
    comment: str = ""

    def emit(self, out, printer, depth):
        _assign(out, printer, depth, self.target, self.op + "=", self.value, self.comment)


@dataclass(frozen=True)
class Stmt(Node):
    """An expression evaluated for its effect (a call)."""
    value: object
    comment: str = ""

    def emit(self, out, printer, depth):
        _line(out, depth, f"{code(self.value, printer)}{_tail(self.comment)}")


@dataclass(frozen=True)
class Return(Node):
    value: object = None
    comment: str = ""

    def emit(self, out, printer, depth):
        what = "" if self.value is None else " " + code(self.value, printer)
        _line(out, depth, f"return{what}{_tail(self.comment)}")


@dataclass(frozen=True)
class Raise(Node):
    """``raise value``"""
    value: object

    def emit(self, out, printer, depth):
        _line(out, depth, f"raise {code(self.value, printer)}")


@dataclass(frozen=True)
class Break(Node):
    comment: str = ""

    def emit(self, out, printer, depth):
        _line(out, depth, "break" + _tail(self.comment))


@dataclass(frozen=True)
class Comment(Node):
    """``# text``, a line of comment for each line of ``text`` (other characters that are not
    printable escaped: see :func:`printable`)."""
    text: str

    def emit(self, out, printer, depth):
        for part in self.text.split("\n"):
            _line(out, depth, f"# {printable(part)}" if part else "#")


@dataclass(frozen=True)
class Blank(Node):
    """``n`` empty lines."""
    n: int = 1

    def emit(self, out, printer, depth):
        out.extend([""] * self.n)


@dataclass(frozen=True)
class Doc(Node):
    """A docstring, its lines as given."""
    text: str

    def emit(self, out, printer, depth):
        parts = self.text.split("\n")
        parts[0] = '"""' + parts[0]
        parts[-1] = parts[-1] + '"""'
        for part in parts:
            _line(out, depth, part)


@dataclass(frozen=True)
class For(Node):
    """``for var in iterable:`` and its body."""
    var: object
    iterable: object
    body: object = ()
    comment: str = ""

    def emit(self, out, printer, depth):
        _block(out, printer, depth, f"for {code(self.var, printer)} in {code(self.iterable, printer)}", self.comment,
               self.body)


@dataclass(frozen=True)
class While(Node):
    cond: object
    body: object = ()
    comment: str = ""

    def emit(self, out, printer, depth):
        _block(out, printer, depth, f"while {code(self.cond, printer)}", self.comment, self.body)


@dataclass(frozen=True)
class If(Node):
    """``if cond:`` body, then ``orelse``: a list of statements (``else:``, with
    ``else_comment``) or another ``If`` (``elif``)."""
    cond: object
    body: object = ()
    orelse: object = ()
    comment: str = ""
    else_comment: str = ""

    def emit(self, out, printer, depth, word="if"):
        _block(out, printer, depth, f"{word} {code(self.cond, printer)}", self.comment, self.body)
        if isinstance(self.orelse, If):
            self.orelse.emit(out, printer, depth, word="elif")
        elif flatten(self.orelse):
            _block(out, printer, depth, "else", self.else_comment, self.orelse)


@dataclass(frozen=True)
class Try(Node):
    """``try:`` body, then ``except <what>:`` handler for each ``(what, handler)``."""
    body: object
    handlers: tuple = ()

    def emit(self, out, printer, depth):
        _block(out, printer, depth, "try", "", self.body)
        for what, handler in self.handlers:
            _block(out, printer, depth, f"except {what}", "", handler)


@dataclass(frozen=True)
class Def(Node):
    """A function: ``decorators``, ``def name(params):``, its docstring and body. ``params``:
    names, or lines of them (tuples of names), each further line under the first parameter."""
    name: str
    params: tuple
    body: object = ()
    doc: str | None = None
    decorators: tuple = ()

    def emit(self, out, printer, depth):
        for d in self.decorators:
            _line(out, depth, "@" + d)
        rows = [self.params] if all(isinstance(p, str) for p in self.params) else self.params
        head = f"def {self.name}("
        for k, row in enumerate(rows):
            end = "):" if k == len(rows) - 1 else ","
            _line(out, depth, (head if k == 0 else " " * len(head)) + ", ".join(row) + end)
        inner = ([Doc(self.doc)] if self.doc is not None else []) + flatten(self.body)
        _body(out, inner, printer, depth + 1)


@dataclass(frozen=True)
class Raw(Node):
    """Fixed source, verbatim (each line indented to the node's depth); never edited."""
    text: str

    def emit(self, out, printer, depth):
        for part in self.text.split("\n"):
            _line(out, depth, part)


def lines(body, printer=None, depth: int = 0) -> list:
    """The lines of ``body``'s statements, at ``depth`` levels of indentation."""
    out: list = []
    for s in flatten(body):
        s.emit(out, printer, depth)
    return out


def inlined(fn: "Def", args) -> list:
    """``fn``'s statements on ``args`` (code, one per parameter): each parameter assigned its
    argument (unless they are the same name), then ``fn``'s body. A function printed again as
    the body of its caller (a C entry point), where Numba's inline="always" would copy its IR."""
    return [[Assign(p, a) for p, a in zip(fn.params, args) if p != a], fn.body]


def render(body, printer=None, depth: int = 0) -> str:
    """``body`` as source text (lines joined, no final newline)."""
    return "\n".join(lines(body, printer, depth))
