"""Test configuration: the kernel cache lives in a temporary folder for the whole session."""

import os
import shutil
import tempfile

import pytest

# Set before any test compiles a kernel: never touch the user's ~/.cache/calcml.
_SESSION_CACHE = tempfile.mkdtemp(prefix="calcml-test-cache-")
os.environ["CALCML_CACHE_DIR"] = _SESSION_CACHE


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker per core, at most four. Each worker
    compiles its own kernels into its own cache folder, and a Dask test file starts a
    two-process cluster: more workers cost memory and gain little over the files' spread."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def pytest_unconfigure(config):
    """The session's kernel cache goes with the session."""
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache folder for one test."""
    folder = tmp_path / "kernel-cache"
    monkeypatch.setenv("CALCML_CACHE_DIR", str(folder))
    return folder
