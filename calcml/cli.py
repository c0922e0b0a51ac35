"""The command line: ``calcml demo`` (more subcommands arrive with the ecosystem issue)."""

from __future__ import annotations

import argparse
import sys

from ._version import __version__
from .errors import CalcmlError


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calcml",
        description="Exact symbolic gradients of ML costs, verified and compiled with Numba.",
        epilog="example:\n  calcml demo        the seed tutorial (fit y = w*x + b), done right",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"calcml {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "demo",
        help="run the built-in example",
        description="State the linear-regression cost, derive its exact gradient, compile it and check it.",
        epilog="example:\n  calcml demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            from .demo import run

            run()
            return 0
    except CalcmlError as exc:
        print(f"calcml: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("calcml: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
