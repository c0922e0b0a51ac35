"""The README's first command: `calcml demo`, and the command line's basics."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calcml import demo
from calcml.cli import main
from calcml.datasets import load_linear

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A kernel cache folder that the fresh process's demo fills from empty (the cold path, as
    on a newcomer's machine) and the in-process demo then reads (its numbers are checked there
    without compiling everything a second time)."""
    return tmp_path_factory.mktemp("demo") / "kernel-cache"


def test_demo_runs_in_a_fresh_process(demo_cache):
    env = {**os.environ, "CALCML_CACHE_DIR": str(demo_cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "calcml", "demo"], env=env, capture_output=True, text=True,
                         timeout=300, cwd=demo_cache.parent)
    assert out.returncode == 0, out.stderr
    assert "2*x*(b + w*x - y)" in out.stdout  # the exact gradient, with the target y
    assert "least-squares" in out.stdout
    assert "d/dw: verified" in out.stdout and "d/db: refuted" in out.stdout
    for method in ("gd", "momentum", "nesterov", "adam"):
        assert f"     {method} " in out.stdout


def test_demo_figures_against_numpy(tmp_path, demo_cache, monkeypatch):
    monkeypatch.setenv("CALCML_CACHE_DIR", str(demo_cache))
    figures = demo.run(out=lambda *_: None, plot_path=tmp_path / "demo.png")
    D = load_linear()
    X = np.column_stack([D["x"], np.ones_like(D["x"])])
    sol = np.linalg.lstsq(X, D["y"], rcond=None)[0]
    np.testing.assert_allclose(figures["solution"], sol, rtol=1e-12)
    assert np.linalg.norm(figures["grad_at_solution"]) < 1e-9
    r = -D["y"]
    assert abs(figures["value0"] - np.mean(r**2)) <= 1e-12 * np.mean(r**2)
    # the exact gradient is verified; the tutorial's gradient (no target y) is refuted
    assert figures["verify"].ok
    assert [v.status for v in figures["tutorial_check"]] == ["refuted", "refuted"]
    # every compiled fit reaches the closed-form solution
    for name, res in figures["fits"].items():
        np.testing.assert_allclose(res.x, sol, rtol=1e-6, err_msg=name)
    if figures["plot"] is not None:
        assert (tmp_path / "demo.png").stat().st_size > 1000


def test_dataset_is_shipped():
    D = load_linear()
    assert set(D) == {"x", "y"} and D["x"].shape == (120,) and np.all(np.isfinite(D["y"]))


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
