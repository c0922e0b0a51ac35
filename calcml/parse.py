"""Safe parsing of expression strings: the one way a user's text becomes a SymPy expression.

The text is read by Python's own tokenizer and parser (``ast.parse``), never evaluated: the
tree is walked against a whitelist and each allowed node is built into a SymPy object
directly. No ``eval``, ``sympify`` or ``parse_expr`` ever sees a user's string.

Allowed: numbers (integers up to :data:`MAX_INT_DIGITS` digits, finite decimals), names
(ASCII identifiers, no double underscores), ``+ - * / **``, unary ``-`` and ``+``,
parentheses, and calls of the functions in :data:`FUNCTIONS` with positional arguments.
``pi``, ``E`` and ``e`` are the constants. Every name becomes a real SymPy symbol.

Everything else is refused with a :class:`~calcml.errors.ParseError` that quotes the
offending part and its column. Limits on the length, the nesting and the size of numbers
keep parsing (and SymPy's automatic evaluation of what was parsed) fast on any input.
"""

from __future__ import annotations

import ast
import keyword
import re

import sympy as sp

from .errors import ParseError
from .functions import relu, sigmoid, softplus

__all__ = ["parse", "check_name", "FUNCTIONS", "CONSTANTS"]

# -- limits: checked before and after ast.parse, so that no input can take long -------------
MAX_LENGTH = 2000  # characters of the whole text
MAX_PARENS = 64  # nesting of brackets, checked on the raw text before ast.parse
MAX_DEPTH = 100  # nesting of the tree (a chain such as a + b + c counts once)
MAX_NODES = 1000  # nodes of the tree
MAX_INT_DIGITS = 40  # digits of an integer literal
MAX_EXPONENT = 64  # |n| of a numeric exponent
MAX_BITS = 4096  # bits of an exact number that a power may build
# SymPy's Max and Min compare their arguments pairwise with the assumptions system: 32
# arguments take seconds, 300 take minutes. Bounded over the whole expression.
MAX_MINMAX_ARGS = 10


def _log(x, base=None):
    return sp.log(x) if base is None else sp.log(x, base)


def _heaviside(x, h0=None):
    return sp.Heaviside(x) if h0 is None else sp.Heaviside(x, h0)


# name -> (builder, smallest and largest number of arguments; None: no upper bound).
# log1p and expm1 are read as their definitions; calcml's rewrites compile them stably.
FUNCTIONS = {
    "exp": (sp.exp, 1, 1),
    "log": (_log, 1, 2),
    "log1p": (lambda x: sp.log(1 + x), 1, 1),
    "expm1": (lambda x: sp.exp(x) - 1, 1, 1),
    "sqrt": (sp.sqrt, 1, 1),
    "sin": (sp.sin, 1, 1),
    "cos": (sp.cos, 1, 1),
    "tan": (sp.tan, 1, 1),
    "asin": (sp.asin, 1, 1),
    "acos": (sp.acos, 1, 1),
    "atan": (sp.atan, 1, 1),
    "atan2": (sp.atan2, 2, 2),
    "sinh": (sp.sinh, 1, 1),
    "cosh": (sp.cosh, 1, 1),
    "tanh": (sp.tanh, 1, 1),
    "asinh": (sp.asinh, 1, 1),
    "acosh": (sp.acosh, 1, 1),
    "atanh": (sp.atanh, 1, 1),
    "abs": (sp.Abs, 1, 1),
    "Abs": (sp.Abs, 1, 1),
    "sign": (sp.sign, 1, 1),
    "max": (sp.Max, 2, None),
    "Max": (sp.Max, 2, None),
    "min": (sp.Min, 2, None),
    "Min": (sp.Min, 2, None),
    "erf": (sp.erf, 1, 1),
    "Heaviside": (_heaviside, 1, 2),
    "sigmoid": (sigmoid, 1, 1),
    "softplus": (softplus, 1, 1),
    "relu": (relu, 1, 1),
}

CONSTANTS = {"pi": sp.pi, "E": sp.E, "e": sp.E}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# What each refused kind of node is called in a message.
_REFUSED = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Slice: "slices",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.Compare: "comparisons",
    ast.BoolOp: "'and'/'or'",
    ast.IfExp: "conditional expressions",
    ast.NamedExpr: "assignment expressions (:=)",
    ast.Starred: "starred arguments",
    ast.List: "lists",
    ast.Tuple: "tuples (a comma outside a call)",
    ast.Set: "sets",
    ast.Dict: "dicts",
    ast.JoinedStr: "f-strings",
    ast.FormattedValue: "f-strings",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}

_BINOPS = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**",
}
_REFUSED_BINOPS = {
    ast.FloorDiv: "floor division '//'", ast.Mod: "the remainder operator '%'",
    ast.MatMult: "matrix multiplication '@'", ast.BitAnd: "the bitwise operator '&'",
    ast.BitOr: "the bitwise operator '|'", ast.BitXor: "the bitwise operator '^' (write a power as '**')",
    ast.LShift: "the shift operator '<<'", ast.RShift: "the shift operator '>>'",
}
_REFUSED_UNARY = {ast.Not: "'not'", ast.Invert: "the bitwise operator '~'"}

# Chains of one precedence level are built flat: ``a + b - c`` is one Add of three terms.
_CHAIN = {ast.Add: "sum", ast.Sub: "sum", ast.Mult: "product", ast.Div: "product"}


# Products of up to this many factors are built pair by pair (see _build_BinOp).
_PAIRWISE_MAX = 32

class _Source:
    """The text being parsed, for messages that quote a part of it and give its column."""

    def __init__(self, text: str, lead: int):
        self.text = text
        self.lead = lead  # characters stripped from the left before ast.parse

    def error(self, what: str, start: int, end: int | None = None) -> ParseError:
        """``start``/``end``: 0-based offsets into the stripped text (as ``ast`` gives them)."""
        start += self.lead
        end = start + 1 if end is None else end + self.lead
        end = max(end, start + 1)
        part = self.text[start:end] or self.text[start : start + 1]
        if len(part) > 40:
            part = part[:37] + "..."
        where = f"at column {start + 1}"
        shown = self.text if len(self.text) <= 80 else self.text[:77] + "..."
        msg = f"{what}, {where}: {part!r} in {shown!r}" if part else f"{what}, {where} of {shown!r}"
        return ParseError(msg, text=self.text, column=start + 1, end_column=end + 1, fragment=part)

    def at(self, node, what: str) -> ParseError:
        return self.error(what, node.col_offset, node.end_col_offset)


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it can name a symbol in an expression, else raise :class:`ParseError`.

    A name is an ASCII identifier that is not a Python keyword and holds no double
    underscore. (Names of functions and constants are valid names, but refer to those.)
    """
    if not isinstance(name, str):
        raise ParseError(f"{what} must be a string, got {type(name).__name__}")
    if not _NAME.match(name):
        raise ParseError(f"{what} {name!r} is not a valid name: use letters, digits and '_', starting with a letter or '_'")
    if keyword.iskeyword(name):
        raise ParseError(f"{what} {name!r} is a Python keyword and cannot name a symbol")
    if "__" in name:
        raise ParseError(f"{what} {name!r} holds a double underscore; such names are refused")
    return name


def _check_text(text) -> _Source:
    if not isinstance(text, str):
        raise ParseError(f"an expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ParseError(f"the expression is {len(text)} characters long; at most {MAX_LENGTH} are accepted")
    stripped = text.lstrip(" \t")
    src = _Source(text, len(text) - len(stripped))
    for i, ch in enumerate(text):
        if not (" " <= ch <= "~" or ch == "\t"):
            what = "a line break" if ch in "\r\n" else f"the character {ch!r}"
            raise src.error(f"{what} is not allowed (only printable ASCII)", i - src.lead)
    if not stripped.strip():
        raise ParseError("the expression is empty")
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
            if depth > MAX_PARENS:
                raise src.error(f"brackets nested more than {MAX_PARENS} deep", i - src.lead)
        elif ch in ")]}":
            depth -= 1
    return src


def _syntax_tree(src: _Source) -> ast.AST:
    code = src.text[src.lead :]
    try:
        return ast.parse(code, mode="eval").body
    except SyntaxError as exc:
        if not exc.offset or exc.offset - 1 >= len(code.rstrip()):
            # CPython gives offset 0 (or one past the end) when the text ends too early: "x+"
            raise src.error("invalid syntax: the expression ends where more was expected", len(code.rstrip())) from None
        col = min(max(exc.offset - 1, 0), max(len(code) - 1, 0))
        end = exc.end_offset - 1 if exc.end_offset and exc.end_lineno == exc.lineno and exc.end_offset - 1 > col else None
        detail = "" if exc.msg == "invalid syntax" else f" ({exc.msg})"
        raise src.error(f"invalid syntax{detail}", col, end) from None
    except (RecursionError, MemoryError, ValueError, OverflowError):
        raise ParseError(f"the expression {src.text[:60]!r} is too complex to parse") from None


def _check_shape(tree: ast.AST, src: _Source):
    """Bound the nesting and the size of the tree before building anything (iteratively)."""
    count = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise src.at(tree, f"the expression has more than {MAX_NODES} parts")
        if depth > MAX_DEPTH:
            raise src.at(node, f"the expression is nested more than {MAX_DEPTH} deep")
        here = _CHAIN.get(type(node.op)) if isinstance(node, ast.BinOp) else None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.expr_context, ast.operator, ast.unaryop)):
                continue
            # The left operand of a chain of the same level (a + b + c) adds no depth.
            same = here is not None and child is node.left and isinstance(child, ast.BinOp) and _CHAIN.get(type(child.op)) == here
            stack.append((child, depth if same else depth + 1))


class _Builder:
    """Builds SymPy objects from an already bounded tree; refuses any node not whitelisted."""

    def __init__(self, src: _Source, symbols: dict):
        self.src = src
        self.symbols = symbols
        self.minmax_args = 0

    def build(self, node):
        method = self._DISPATCH.get(type(node))
        if method is None:
            what = _REFUSED.get(type(node), f"this construct ({type(node).__name__})")
            raise self.src.at(node, f"not allowed: {what}")
        out = method(self, node)
        if out is sp.zoo or out is sp.nan or out is sp.oo or out is sp.S.NegativeInfinity:
            raise self.src.at(node, f"this part evaluates to {out} (a division by zero or an undefined value)")
        return out

    # -- atoms ---------------------------------------------------------------------------
    def _build_Constant(self, node):
        v = node.value
        if isinstance(v, bool) or v is None or v is Ellipsis:
            raise self.src.at(node, f"not allowed: {v!r} (only numbers and names)")
        if isinstance(v, int):
            if abs(v) >= 10**MAX_INT_DIGITS:
                raise self.src.at(node, f"integer literal too large (more than {MAX_INT_DIGITS} digits)")
            return sp.Integer(v)
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                raise self.src.at(node, "number out of the range of a float")
            return sp.Float(v)
        if isinstance(v, complex):
            raise self.src.at(node, "not allowed: complex numbers (calcml expressions are real)")
        raise self.src.at(node, "not allowed: strings (only numbers and names)")

    def _build_Name(self, node):
        name = node.id
        if not _NAME.match(name):  # non-ASCII names are refused earlier; kept for safety
            raise self.src.at(node, f"not allowed: the name {name!r}")
        if "__" in name:
            raise self.src.at(node, "not allowed: names with a double underscore")
        if name in self.symbols:
            return self.symbols[name]
        if name in CONSTANTS:
            return CONSTANTS[name]
        if name in FUNCTIONS:
            raise self.src.at(node, f"{name!r} is a function; call it, as in {name}(x)")
        return sp.Symbol(name, real=True)

    # -- arithmetic ----------------------------------------------------------------------
    def _build_UnaryOp(self, node):
        if type(node.op) in _REFUSED_UNARY:
            raise self.src.at(node, f"not allowed: {_REFUSED_UNARY[type(node.op)]}")
        operand = self.build(node.operand)
        return -operand if isinstance(node.op, ast.USub) else operand

    def _chain(self, node, level: str) -> list:
        """[(op, operand node), ...] of a left-nested chain a op b op c of one level, flat."""
        items = []
        while isinstance(node, ast.BinOp) and _CHAIN.get(type(node.op)) == level:
            items.append((type(node.op), node.right))
            node = node.left
        items.append((None, node))
        items.reverse()
        return items

    def _build_BinOp(self, node):
        op = type(node.op)
        if op in _REFUSED_BINOPS:
            raise self.src.at(node, f"not allowed: {_REFUSED_BINOPS[op]}")
        if op not in _BINOPS:
            raise self.src.at(node, f"not allowed: the operator {op.__name__}")
        if op is ast.Pow:
            return self._power(node)
        level = _CHAIN[op]
        parts = []
        for kind, operand in self._chain(node, level):
            value = self.build(operand)
            if kind is ast.Sub:
                value = -value
            elif kind is ast.Div:
                if value.is_zero:
                    raise self.src.at(operand, "division by zero")
                value = sp.Pow(value, -1)
            parts.append(value)
        if level == "sum":
            out = sp.Add(*parts)
        elif len(parts) <= _PAIRWISE_MAX:
            # left to right, pair by pair, as Python evaluates a * b * c: SymPy distributes a
            # number over a sum only in a two-factor product, so ((x + y) * 2) * x is
            # x*(2*x + 2*y) while Mul(x + y, 2, x) is 2*x*(x + y) (equal, not the same tree)
            out = parts[0]
            for p in parts[1:]:
                out = sp.Mul(out, p)
        else:  # long products in one flattening (a pairwise fold would cost n**2)
            out = sp.Mul(*parts)
        self._check_number(out, node)
        return out

    def _power(self, node):
        base = self.build(node.left)
        exp = self.build(node.right)
        if exp.is_Number:
            if abs(exp) > MAX_EXPONENT:
                raise self.src.at(node.right, f"exponent {exp} too large (a numeric exponent must be at most {MAX_EXPONENT} in size)")
            if exp.is_Rational and exp.q > MAX_EXPONENT:
                raise self.src.at(node.right, f"exponent {exp} has a denominator larger than {MAX_EXPONENT}")
            if base.is_Rational:
                bits = max(abs(base.p).bit_length(), base.q.bit_length()) * abs(exp)
                if bits > MAX_BITS:
                    raise self.src.at(node, f"this power is an exact number of about {int(bits)} bits; at most {MAX_BITS} are allowed")
            if base.is_zero and exp.is_negative:
                raise self.src.at(node, "division by zero (zero to a negative power)")
        out = sp.Pow(base, exp)
        self._check_number(out, node)
        return out

    def _check_number(self, value, node):
        if value.is_Rational and max(abs(value.p).bit_length(), value.q.bit_length()) > MAX_BITS:
            raise self.src.at(node, f"this part is an exact number of more than {MAX_BITS} bits")

    # -- calls ---------------------------------------------------------------------------
    def _build_Call(self, node):
        func = node.func
        if not isinstance(func, ast.Name):
            what = _REFUSED.get(type(func), "calling anything but a named function")
            raise self.src.at(func, f"not allowed: {what}")
        name = func.id
        if "__" in name:
            raise self.src.at(func, "not allowed: names with a double underscore")
        if name not in FUNCTIONS:
            known = ", ".join(sorted(FUNCTIONS, key=str.lower))
            raise self.src.at(func, f"unknown function {name!r} (known: {known})")
        if node.keywords:
            kw = node.keywords[0]
            raise self.src.at(kw.value if kw.arg is None else kw, "not allowed: keyword arguments")
        for a in node.args:
            if isinstance(a, ast.Starred):
                raise self.src.at(a, "not allowed: starred arguments")
        builder, lo, hi = FUNCTIONS[name]
        n = len(node.args)
        if n < lo or hi is not None and n > hi:
            want = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} or {hi}")
            raise self.src.at(node, f"{name} takes {want} argument{'s' if (hi or 2) > 1 else ''}, got {n}")
        if builder in (sp.Max, sp.Min):
            self.minmax_args += n
            if self.minmax_args > MAX_MINMAX_ARGS:
                raise self.src.at(node, f"too many max/min arguments: at most {MAX_MINMAX_ARGS} in one expression")
        args = [self.build(a) for a in node.args]
        return builder(*args)

    # The whitelist: the only node types that build anything.
    _DISPATCH = {
        ast.Constant: _build_Constant,
        ast.Name: _build_Name,
        ast.UnaryOp: _build_UnaryOp,
        ast.BinOp: _build_BinOp,
        ast.Call: _build_Call,
    }


def _check_symbols(symbols) -> dict:
    if symbols is None:
        return {}
    if not isinstance(symbols, dict):
        raise TypeError(f"symbols must be a dict name -> sympy.Symbol, got {type(symbols).__name__}")
    out = {}
    for name, sym in symbols.items():
        check_name(name, "symbols key")
        if name in FUNCTIONS or name in CONSTANTS:
            raise ParseError(f"symbols key {name!r} is the name of a {'function' if name in FUNCTIONS else 'constant'} "
                             "and cannot name a symbol in an expression")
        if not isinstance(sym, sp.Symbol):
            raise TypeError(f"symbols[{name!r}] must be a sympy.Symbol, got {type(sym).__name__}")
        out[name] = sym
    return out


def names_in(text: str) -> set:
    """The names ``text`` (an expression :func:`parse` accepts) uses, constants and functions
    included: ``"e**(-x)"`` gives ``{"e", "x"}``. Nothing in the text is executed."""
    return {n.id for n in ast.walk(_syntax_tree(_check_text(text))) if isinstance(n, ast.Name)}


def parse(text: str, symbols: dict | None = None) -> sp.Expr:
    """Parse an expression string into a SymPy expression, safely.

    Parameters
    ----------
    text : str
        The expression, in Python syntax: numbers, names, ``+ - * / **``, unary minus,
        parentheses and calls of the functions in :data:`calcml.parse.FUNCTIONS`
        (``exp``, ``log``, ``sqrt``, trigonometric and hyperbolic functions, ``abs``,
        ``sign``, ``max``, ``min``, ``erf``, ``Heaviside``, ``sigmoid``, ``softplus``,
        ``relu``, ``log1p``, ``expm1`` ...). ``pi`` and ``e`` (or ``E``) are constants.
    symbols : dict, optional
        ``{name: sympy.Symbol}``: the symbols to use for those names (for instance the
        parameters from :func:`calcml.params`). Other names become
        ``sympy.Symbol(name, real=True)``.

    Returns
    -------
    sympy.Expr

    Raises
    ------
    calcml.ParseError
        For anything else, with the offending part and its column. Nothing in the text is
        ever executed.

    Examples
    --------
    >>> import calcml as cm
    >>> cm.parse("(w*x + b - y)**2")
    (b + w*x - y)**2
    >>> cm.parse("x.__class__")
    Traceback (most recent call last):
    ...
    calcml.errors.ParseError: not allowed: attribute access, at column 1: 'x.__class__' in 'x.__class__'
    """
    syms = _check_symbols(symbols)
    src = _check_text(text)
    tree = _syntax_tree(src)
    _check_shape(tree, src)
    return _Builder(src, syms).build(tree)
