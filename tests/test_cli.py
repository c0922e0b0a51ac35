"""The README's first command: `calcml demo`, and the command line's basics."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from calcml import demo
from calcml.cli import main
from calcml.datasets import load_linear

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_in_a_fresh_process(fresh_cache):
    env = {**os.environ, "CALCML_CACHE_DIR": str(fresh_cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "calcml", "demo"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "2*x*(b + w*x - y)" in out.stdout  # the exact gradient, with the target y
    assert "least-squares" in out.stdout


def test_demo_figures_against_numpy():
    figures = demo.run(out=lambda *_: None)
    D = load_linear()
    X = np.column_stack([D["x"], np.ones_like(D["x"])])
    sol = np.linalg.lstsq(X, D["y"], rcond=None)[0]
    np.testing.assert_allclose(figures["solution"], sol, rtol=1e-12)
    assert np.linalg.norm(figures["grad_at_solution"]) < 1e-9
    r = -D["y"]
    assert abs(figures["value0"] - np.mean(r**2)) <= 1e-12 * np.mean(r**2)


def test_dataset_is_shipped():
    D = load_linear()
    assert set(D) == {"x", "y"} and D["x"].shape == (120,) and np.all(np.isfinite(D["y"]))


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
