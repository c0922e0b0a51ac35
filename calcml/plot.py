"""Plots (matplotlib, the optional extra ``plot``): the descent path over a cost's contours."""

from __future__ import annotations

from .errors import CalcmlError

__all__ = ["plot_path", "require_matplotlib"]


class MissingDependencyError(CalcmlError, ImportError):
    """An optional dependency (matplotlib) is not installed."""


def require_matplotlib(what: str = "plotting"):
    """Import matplotlib or raise an error that says how to install it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            f"{what} needs matplotlib, which is not installed: pip install 'calcml[plot]' (or pip install matplotlib)"
        ) from None
