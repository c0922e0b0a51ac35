"""Test configuration: the kernel cache lives in a temporary folder for the whole session."""

import os
import shutil
import tempfile

import pytest

# Set before any test compiles a kernel: never touch the user's ~/.cache/calcml.
_SESSION_CACHE = tempfile.mkdtemp(prefix="calcml-test-cache-")
os.environ["CALCML_CACHE_DIR"] = _SESSION_CACHE


def pytest_unconfigure(config):
    """The session's kernel cache goes with the session."""
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache folder for one test."""
    folder = tmp_path / "kernel-cache"
    monkeypatch.setenv("CALCML_CACHE_DIR", str(folder))
    return folder
