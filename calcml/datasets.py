"""Small datasets shipped with calcml, for the demo, the docs and the tests."""

from __future__ import annotations

import csv
from importlib import resources

import numpy as np

__all__ = ["load_linear"]


def _load_csv(name: str) -> dict:
    text = resources.files("calcml").joinpath("_data", name).read_text(encoding="utf-8")
    rows = list(csv.reader(text.splitlines()))
    header, body = rows[0], rows[1:]
    values = np.array(body, dtype=np.float64)
    return {h: np.ascontiguousarray(values[:, j]) for j, h in enumerate(header)}


def load_linear() -> dict:
    """120 rows ``{"x": ..., "y": ...}`` with ``y ≈ 2.5 x + 4`` plus Gaussian noise (sd 1.5).

    The seed tutorial's data: fit ``y = w*x + b`` by least squares.
    """
    return _load_csv("linear.csv")
