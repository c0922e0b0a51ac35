"""The on-disk kernel cache: hits across processes, atomic writes, corruption, privacy."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import calcml as cm
from calcml import native

ROOT = Path(__file__).resolve().parents[1]

# A child process: states W1-like linear regression, compiles it, evaluates the gradient and
# reports whether SymPy differentiated, whether codegen ran, and which kernels it compiled
# (rather than loaded from the machine code kept in the cache).
CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import calcml as cm
    import calcml.codegen as codegen

    calls = []
    original = codegen.kernel_module_source
    def spy(*a, **k):
        calls.append(1)
        return original(*a, **k)
    codegen.kernel_module_source = spy

    w = cm.params("w", 3); b = cm.params("b"); x = cm.data("x", 3); y = cm.data("y")
    cost = cm.Cost((cm.dot(w, x) + b - y)**2, params=[*w, b], data=[*x, y])
    k = cm.compile(cost)
    rng = np.random.default_rng(0)
    data = {n: rng.normal(size=100) for n in cost.data_names}
    f, g = k.value_and_grad(np.arange(4.0), data)
    print(json.dumps({
        "value": f, "grad": list(g), "codegen_calls": len(calls),
        "differentiated": "gradient" in cost.__dict__,
        "compiled": k.compiled, "numba_imported_module": k._module is not None,
        "path": str(k.path),
    }))
    """
)


def run_child(cache: Path, script: str = CHILD) -> dict:
    env = {**os.environ, "CALCML_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_skips_sympy_and_numba(fresh_cache):
    cold = run_child(fresh_cache)
    assert cold["codegen_calls"] == 1 and cold["differentiated"]
    assert cold["compiled"] == ["value_and_grad_rows"]  # only the kernel asked for
    objects = sorted(f.name for f in fresh_cache.glob("*.o"))
    assert len(objects) == 1 and ".value_and_grad_rows." in objects[0]
    warm = run_child(fresh_cache)
    assert warm["codegen_calls"] == 0, "the second process regenerated the source"
    assert not warm["differentiated"], "the second process differentiated the cost"
    assert warm["compiled"] == [], "Numba recompiled"
    assert not warm["numba_imported_module"], "the second process imported the generated module"
    assert warm["value"] == cold["value"] and warm["grad"] == cold["grad"]


def test_cache_folder_is_private(fresh_cache):
    w = cm.params("w")
    cm.compile(cm.Cost((w - 3) ** 2, params=[w]))
    mode = stat.S_IMODE(fresh_cache.stat().st_mode)
    assert mode == 0o700, oct(mode)


def test_source_is_the_module_file_with_checksum(fresh_cache):
    w = cm.params("w")
    k = cm.compile(cm.Cost((w - 3) ** 2, params=[w]))
    assert k.path.parent == fresh_cache
    assert k.source == k.path.read_text()
    assert k.source.rstrip().splitlines()[-1].startswith("# calcml-sha256: ")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edit"])
def test_corrupt_module_is_rebuilt(fresh_cache, damage):
    first = run_child(fresh_cache)
    path = Path(first["path"])
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff not python \x80")
    else:  # a plausible, syntactically valid edit that changes the numbers
        path.write_text(text.replace("/= n", "/= 2*n", 1))
    again = run_child(fresh_cache)
    assert again["codegen_calls"] == 1
    assert again["value"] == first["value"] and again["grad"] == first["grad"]
    assert path.read_text() == text


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_corrupt_machine_code_is_recompiled(fresh_cache, damage):
    first = run_child(fresh_cache)
    (obj,) = fresh_cache.glob("*.o")
    data = obj.read_bytes()
    if damage == "truncate":
        obj.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        obj.write_bytes(b"\x7fELF" + bytes(range(256)) * 4)
    else:  # one bit of the machine code flipped: the checksum catches it
        i = len(data) - 100
        obj.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
    again = run_child(fresh_cache)
    assert again["compiled"] == ["value_and_grad_rows"]
    assert again["value"] == first["value"] and again["grad"] == first["grad"]
    # rewritten whole, for the same entry symbol (its bytes may differ from the first
    # compile's: the order of Numba's symbols follows each process's string hashes)
    first_copy = fresh_cache / "first.o.bak"
    first_copy.write_bytes(data)
    rewritten, original = native._read(obj), native._read(first_copy)
    assert rewritten is not None and rewritten[0] == original[0] and rewritten[1] == original[1]
    assert run_child(fresh_cache)["compiled"] == []


def test_machine_code_needing_an_unknown_symbol_is_recompiled(fresh_cache):
    """An intact object file that names a symbol this process cannot supply is never
    handed to LLVM (which would abort the process): it is compiled again."""
    from calcml import native

    first = run_child(fresh_cache)
    (obj,) = fresh_cache.glob("*.o")
    symbol, undefined, code = native._read(obj)
    native.save(obj, symbol, undefined + ["calcml_no_such_symbol"], code)
    again = run_child(fresh_cache)
    assert again["compiled"] == ["value_and_grad_rows"]
    assert again["value"] == first["value"] and again["grad"] == first["grad"]


def test_unwritable_machine_code_still_computes(fresh_cache):
    """The machine code cannot be kept (here a folder squats on its file name, which stops
    root too): the kernel compiles, runs and gives the same answer; nothing breaks."""
    first = run_child(fresh_cache)
    (obj,) = fresh_cache.glob("*.o")
    obj.unlink()
    obj.mkdir()
    again = run_child(fresh_cache)
    assert again["compiled"] == ["value_and_grad_rows"]
    assert again["value"] == first["value"] and again["grad"] == first["grad"]
    assert obj.is_dir()


def test_two_processes_compiling_at_once_both_succeed(fresh_cache):
    env = {**os.environ, "CALCML_CACHE_DIR": str(fresh_cache), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["value"] == results[1]["value"] and results[0]["grad"] == results[1]["grad"]
    leftovers = [f.name for f in fresh_cache.iterdir() if f.name.startswith(".tmp-")]
    assert not leftovers
    assert run_child(fresh_cache)["codegen_calls"] == 0


def test_same_cost_same_kernels_in_process(fresh_cache):
    w = cm.params("w")
    a = cm.compile(cm.Cost((w - 3) ** 2, params=[w]))
    b = cm.compile(cm.Cost((w - 3) ** 2, params=[w]))
    assert a is b
    assert a.value(np.array([3.0])) == 0.0


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        monkeypatch.setenv("CALCML_CACHE_DIR", str(blocker / "sub"))
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        monkeypatch.setenv("CALCML_CACHE_DIR", str(locked / "sub"))
    w = cm.params("w")
    with pytest.raises(cm.CacheError, match="cannot create the kernel cache folder"):
        cm.compile(cm.Cost((w - 4) ** 2, params=[w]))


# Numba internals that calcml.native reads, made to disappear in a child process, as a Numba
# release could: the kernels still compile and compute, and calcml warns once.
_NO_SAVE = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("always")
    import numba
    _cfunc = numba.cfunc
    class _Moved:  # a CFunc of a Numba whose _library moved
        def __init__(self, cf):
            self.address, self.native_name, self._keep = cf.address, cf.native_name, cf
    numba.cfunc = lambda sig, **kw: (lambda f: _Moved(_cfunc(sig, **kw)(f)))
    """
)
_NO_LOAD = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("always")
    from calcml import native
    def _moved():
        raise ImportError("cannot import name '_helperlib' from 'numba'")
    native._register_runtime_symbols = _moved
    """
)
_WARNINGS = textwrap.dedent(
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k.value_and_grad(np.arange(4.0), data)
        k.value(np.arange(4.0), data)
    print(json.dumps([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]))
    """
)


def test_machine_code_unsavable_when_numba_internals_move(fresh_cache):
    script = _NO_SAVE + CHILD
    first = run_child(fresh_cache, script)
    assert first["compiled"] == ["value_and_grad_rows"]
    assert not list(fresh_cache.glob("*.o"))  # nothing saved, nothing half-written
    reference = run_child(fresh_cache / "plain")
    assert first["value"] == reference["value"] and first["grad"] == reference["grad"]
    env = {**os.environ, "CALCML_CACHE_DIR": str(fresh_cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script + _WARNINGS], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    messages = json.loads(out.stdout.strip().splitlines()[-1])
    # warned at the first kernel's compile, not again at the second's (value_rows)
    assert out.stderr.count("cannot save kernel machine code") == 1
    assert not [m for m in messages if "cannot save" in m]


def test_machine_code_unloadable_when_numba_internals_move(fresh_cache):
    first = run_child(fresh_cache)
    assert len(list(fresh_cache.glob("*.o"))) == 1
    env = {**os.environ, "CALCML_CACHE_DIR": str(fresh_cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _NO_LOAD + CHILD], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    again = json.loads(out.stdout.strip().splitlines()[-1])
    assert again["compiled"] == ["value_and_grad_rows"]  # compiled afresh, not loaded
    assert again["value"] == first["value"] and again["grad"] == first["grad"]
    assert out.stderr.count("cannot load kernel machine code") == 1


def test_a_change_to_any_file_of_the_package_changes_the_cache_key(tmp_path):
    """One key for everything that can shape generated code: every module of the package
    (a hand-kept list once left out backprop.py and cost.py)."""
    import shutil

    from calcml.compile import _PACKAGE, _generator_fingerprint

    pkg = tmp_path / "calcml"
    shutil.copytree(_PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    base = _generator_fingerprint(pkg)
    assert base == _generator_fingerprint(_PACKAGE)
    files = sorted(pkg.rglob("*.py"))
    assert {"backprop.py", "cost.py", "loop.py", "optim.py", "tensor/codegen.py", "tensor/search.py"} <= \
        {f.relative_to(pkg).as_posix() for f in files}
    for f in files:
        text = f.read_bytes()
        f.write_bytes(text + b"\n# changed\n")
        assert _generator_fingerprint(pkg) != base, f
        f.write_bytes(text)
    assert _generator_fingerprint(pkg) == base
    (pkg / "tensor" / "new_part.py").write_text("X = 1\n")  # a file added is a change too
    assert _generator_fingerprint(pkg) != base
