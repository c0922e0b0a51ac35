"""What `pip install .` installs: every module of the source tree, its data, the command."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_install_holds_every_module_and_the_data(tmp_path):
    """The tests import calcml from the source tree, which hides a module left out of the
    install (calcml.tensor once was: tensor costs failed for anyone who ran `pip install .`)."""
    import shutil

    # a copy of the tree without what a local install leaves (an egg-info's file list would
    # put back a module the configuration leaves out)
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "*.egg-info", "build", "dist", "__pycache__", ".bench-cache", ".pytest_cache", "*.o"))
    target = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",  # built as users build it: isolated
         "--target", str(target), str(tree)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "calcml").rglob("*.py") if "__pycache__" not in p.parts}
    installed = {p.relative_to(target).as_posix() for p in (target / "calcml").rglob("*.py")
                 if "__pycache__" not in p.parts}
    assert source - installed == set()
    assert (target / "calcml" / "_data" / "linear.csv").exists()
    check = subprocess.run([sys.executable, "-c", "import calcml.tensor.model, calcml.tensor.kernels; print('ok')"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert check.stdout.strip() == "ok", check.stderr
