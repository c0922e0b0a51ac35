"""The command line's diff, verify and fit: answers against SymPy and NumPy, errors as one line."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import calcml as cm
from calcml.cli import main

ROOT = Path(__file__).resolve().parents[1]
x, y = sp.Symbol("x", real=True), sp.Symbol("y", real=True)


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def linear_csv(tmp_path_factory):
    rng = np.random.default_rng(3)
    xs = rng.uniform(-2, 3, size=60)
    ys = 2.5 * xs - 0.75 + 0.2 * rng.normal(size=60)
    path = tmp_path_factory.mktemp("data") / "data.csv"
    path.write_text("x,y,unused_col\n" + "".join(f"{float(a)!r},{float(b)!r},1\n" for a, b in zip(xs, ys)))
    return path, xs, ys


def table_values(out) -> dict:
    """The ``name  value`` rows of a fit table."""
    rows = {}
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            rows[parts[0]] = parts[1].strip()
    return rows


# -- diff ------------------------------------------------------------------------------------------
def test_diff_prints_the_exact_derivative(capsys):
    rc, out, err = run(capsys, "diff", "x*sin(x)", "--wrt", "x")
    assert rc == 0 and err == ""
    assert cm.parse(out.strip()) == x * sp.cos(x) + sp.sin(x)


def test_diff_defaults_to_the_only_name_and_takes_several(capsys):
    rc, out, _ = run(capsys, "diff", "log(1 + exp(x))")
    assert rc == 0 and cm.parse(out.strip()) == sp.exp(x) / (sp.exp(x) + 1)
    rc, out, _ = run(capsys, "diff", "x**2*y", "--wrt", "x,y")
    lines = out.strip().splitlines()
    assert rc == 0 and lines[0].startswith("d/dx: ") and lines[1].startswith("d/dy: ")
    assert cm.parse(lines[0][6:]) == 2 * x * y and cm.parse(lines[1][6:]) == x**2


def test_diff_latex(capsys):
    rc, out, _ = run(capsys, "diff", "sin(x)**2", "--latex")
    assert rc == 0 and out.strip() == sp.latex(2 * sp.sin(x) * sp.cos(x))


@pytest.mark.parametrize("argv, words", [
    (["diff", "x.__class__"], ["attribute access", "column 1"]),
    (["diff", "__import__('os').system('touch pwned')"], ["attribute access"]),
    (["diff", "__import__('os')"], ["double underscore"]),
    (["diff", "x*y"], ["--wrt", "x, y"]),
    (["diff", "x*y", "--wrt", "z"], ["'z' does not appear"]),
    (["diff", "x", "--wrt", "x.y"], ["not a valid name"]),
    (["diff", "x**1000"], ["exponent 1000 too large"]),
    (["verify", "x", "--at", "y"], ["not a number"]),
    (["verify", "x*y", "--wrt", "x", "--at", "z=1"], ["'z' does not appear"]),
    (["verify", "x", "--timeout", "-1"], ["--timeout"]),
])
def test_errors_are_one_line(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, *argv)
    assert rc == 1 and out == ""
    one_error_line(err, f"calcml {argv[0]}: error:", *words)
    assert list(tmp_path.iterdir()) == []


# -- verify ----------------------------------------------------------------------------------------
def test_verify_prints_the_table(capsys):
    rc, out, _ = run(capsys, "verify", "log(1 + exp(x))", "--wrt", "x")
    assert rc == 0
    assert "verified" in out and "-> OK" in out and "d/dx" in out


def test_verify_at_points(capsys):
    rc, out, _ = run(capsys, "verify", "abs(x)", "--wrt", "x", "--at", "0")
    assert rc == 3 and "not differentiable" in out
    rc, out, _ = run(capsys, "verify", "x*y**2", "--wrt", "x", "--at", "x=1/3,y=pi/6")
    assert rc == 0 and "verified" in out and "pi**2/36" in out


# -- fit -------------------------------------------------------------------------------------------
def test_fit_lbfgs_matches_lstsq(capsys, linear_csv):
    path, xs, ys = linear_csv
    rc, out, err = run(capsys, "fit", "(w*x + b - y)**2", "--params", "w,b", "--data", str(path), "--method", "lbfgs")
    assert rc == 0, err
    sol = np.linalg.lstsq(np.column_stack([xs, np.ones_like(xs)]), ys, rcond=None)[0]
    rows = table_values(out)
    np.testing.assert_allclose([float(rows["w"]), float(rows["b"])], sol, rtol=1e-7)
    assert float(rows["value"]) == pytest.approx(np.mean((sol[0] * xs + sol[1] - ys) ** 2), rel=1e-9)
    assert rows["success"] == "True" and "60 rows" in out


def test_fit_adam_history_and_export(capsys, linear_csv, tmp_path):
    path, xs, ys = linear_csv
    hist, export = tmp_path / "h.csv", tmp_path / "fit_model.py"
    rc, out, err = run(capsys, "fit", "(w*x + b - y)**2", "--params", "w b", "--data", str(path), "--method", "adam",
                       "--lr", "0.05", "--maxiter", "300", "--x0", "w=0.5,b=0", "--history", str(hist),
                       "--export", str(export))
    # 300 Adam steps do not reach tol=1e-8, but the gradient is within its sampling noise over
    # the 60 rows (NumPy, from every row's exact gradient): the minimum, to the data's precision
    rows = table_values(out)
    w, b = float(rows["w"]), float(rows["b"])
    r = w * xs + b - ys
    G = np.column_stack([2 * r * xs, 2 * r])
    noise = np.sqrt(np.sum(np.var(G, axis=0, ddof=1)) / len(xs))
    assert np.linalg.norm(G.mean(axis=0)) <= noise
    assert rc == 0 and rows["success"] == "True" and "within its sampling noise" in out, out
    assert f"{noise:.3g}" in out
    lines = hist.read_text().splitlines()
    assert lines[0] == "iteration,cost"
    first = float(lines[1].split(",")[1])
    assert first == pytest.approx(np.mean((0.5 * xs - ys) ** 2), rel=1e-12)  # the cost at x0
    costs = np.array([float(ln.split(",")[1]) for ln in lines[1:]])
    assert costs[-1] < costs[0] / 10
    ast.parse(export.read_text())
    assert "import sympy" not in export.read_text() and "import calcml" not in export.read_text()


def test_fit_minibatch_with_schedule_is_reproducible(capsys, linear_csv):
    path, _, _ = linear_csv
    argv = ["fit", "(w*x + b - y)**2", "--params", "w,b", "--data", str(path), "--method", "adam",
            "--batch-size", "8", "--epochs", "5", "--schedule", "warmup(exponential(lr=0.05, decay=0.99), 4)",
            "--seed", "7"]
    rc1, out1, _ = run(capsys, *argv)
    rc2, out2, _ = run(capsys, *argv)
    assert rc1 == rc2 and out1 == out2 and "warmup(exponential" in out1
    assert "5 epochs" in out1 or "within its sampling noise" in out1
    assert rc1 == (0 if table_values(out1)["success"] == "True" else 3)


def test_fit_short_of_the_minimum_exits_3(capsys, linear_csv, tmp_path):
    """20 Adam steps from 0 are far from the minimum: no success, exit 3, and the message says
    the gradient is above tol and its noise (a minibatch run: its epochs done, no success)."""
    path, xs, ys = linear_csv
    rc, out, _ = run(capsys, "fit", "(w*x + b - y)**2", "--params", "w,b", "--data", str(path), "--method", "adam",
                     "--lr", "0.05", "--maxiter", "20")
    assert rc == 3 and table_values(out)["success"] == "False" and "not yet at a minimum" in out
    rc, out, _ = run(capsys, "fit", "(w*x + b - y)**2", "--params", "w,b", "--data", str(path), "--method", "sgd",
                     "--lr", "0.001", "--batch-size", "10", "--epochs", "2", "--history", str(tmp_path / "h.csv"))
    assert rc == 3 and "Completed 2 epochs" in out and "above its sampling noise" in out
    assert (tmp_path / "h.csv").read_text().splitlines()[0] == "epoch,cost"  # one mean cost per epoch
    rc, out, _ = run(capsys, "fit", "(w*x + b - y)**2", "--params", "w,b", "--data", str(path), "--method", "sgd",
                     "--lr", "0.01", "--batch-size", "10", "--epochs", "50", "--tol", "10", "--history",
                     str(tmp_path / "h2.csv"))
    assert rc == 0 and "Converged" in out  # at the first epoch's end; its history is still per epoch
    assert (tmp_path / "h2.csv").read_text().splitlines() == ["epoch,cost", (tmp_path / "h2.csv").read_text().splitlines()[1]]


def test_fit_notes_a_column_named_like_a_parameter(capsys, tmp_path):
    data = _csv(tmp_path, "x,y,b\n0,1,9\n1,3,9\n2,5,9\n")
    rc, out, _ = run(capsys, "fit", "(w*x + b - y)**2", "--params", "w,b", "--data", data, "--method", "lbfgs")
    rows = table_values(out)
    assert rc == 0 and float(rows["w"]) == pytest.approx(2) and float(rows["b"]) == pytest.approx(1)
    assert "column 'b' of" in out and "not used: a parameter" in out


def test_fit_with_an_unused_column_named_as_a_constant(capsys, tmp_path):
    data = _csv(tmp_path, "x,y,E\n0,1,9\n1,3,9\n2,5,9\n")
    rc, out, _ = run(capsys, "fit", "(w*x + b - y)**2", "--params", "w,b", "--data", data, "--method", "lbfgs")
    rows = table_values(out)
    assert rc == 0 and float(rows["w"]) == pytest.approx(2) and float(rows["b"]) == pytest.approx(1)


def test_fit_without_data(capsys):
    rc, out, _ = run(capsys, "fit", "(1 - a)**2 + 100*(b - a**2)**2", "--params", "a,b", "--method", "lbfgs",
                     "--x0=-1.2,1")
    rows = table_values(out)
    assert rc == 0 and abs(float(rows["a"]) - 1) < 1e-6 and abs(float(rows["b"]) - 1) < 1e-6


def test_fit_divergence_is_a_result(capsys, linear_csv):
    path, _, _ = linear_csv
    rc, out, err = run(capsys, "fit", "(w*x + b - y)**2", "--params", "w,b", "--data", str(path), "--lr", "5")
    assert rc == 3 and err == ""
    assert "Diverged" in out and "smaller learning rate" in out


def _csv(tmp_path, text, name="d.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("csv_text, extra, words", [
    ("x,y\n1,2\n", ["--params", "w,b", "--expr", "(w*z + b - y)**2"], ["'z'", "neither a parameter", "columns: x, y"]),
    ("x,y-1\n1,2\n", [], ["column 2 of the header", "'y-1'", "not a valid name"]),
    ("x,__class__\n1,2\n", [], ["double underscore"]),
    ("x,lambda\n1,2\n", [], ["keyword"]),
    ("x,y,x\n1,2,3\n", [], ["'x' twice"]),
    ("x,y\n1,2\n3,abc\n", [], ["line 3", "'y'", "'abc' is not a number"]),
    ("x,y\n1,2\n3\n", [], ["line 3", "1 fields"]),
    ("x,y\n", [], ["no data rows"]),
    ("", [], ["empty"]),
    ("x,y\n1,2\n", ["--params", "w,b,c"], ["'c'", "not in the expression"]),
    ("x,y\n1,2\n", ["--params", "w,exp"], ["'exp' names a function"]),
    ("x,y\n1,2\n", ["--params", "w,w"], ["twice"]),
    ("x,y\n1,2\n", ["--method", "newtonn"], ["unknown method 'newtonn'"]),
    ("x,y\n1,2\n", ["--lr", "fast"], ["--lr"]),
    ("x,y\n1,2\n", ["--lr", "-1"], ["lr"]),
    ("x,y\n1,2\n", ["--x0", "1"], ["1 values for 2 parameters"]),
    ("x,y\n1,2\n", ["--x0", "w=1,q=2"], ["'q' is not one of the parameters"]),
    ("x,y\n1,2\n", ["--x0", "w=1,b=nan"], ["finite"]),
    ("x,y\n1,2\n", ["--schedule", "__import__('os').system('touch pwned')"], ["neither a number nor one of"]),
    ("x,y\n1,2\n", ["--schedule", "exponential(0.1)"], ["exponential"]),
    ("x,y\n1,2\n", ["--schedule", "cosine(0.1, steps=-3)"], ["steps"]),
    ("x,y\n1,2\n", ["--method", "sgd", "--batch-size", "0"], ["batch_size"]),
    ("x,y\n1,2\n3,4\n5,nan\n", [], ["line 4", "'y'", "'nan' is not finite"]),  # the file's line, as above
    ("x,y\n1,2\n-inf,4\n", [], ["line 3", "'x'", "'-inf' is not finite"]),
    # a column named as a constant: the expression would read the constant (b = 2.718... fitted)
    ("x,e\n1,2\n2,3\n", ["--expr", "(w*x + b - e)**2"], ["'e'", "both a column", "constant (e = 2.71828)"]),
    ("x,pi,y\n1,2,3\n", ["--expr", "(w*x + b - y)**2 + pi"], ["'pi'", "rename the column"]),
])
def test_fit_errors_are_one_line(capsys, tmp_path, monkeypatch, csv_text, extra, words):
    monkeypatch.chdir(tmp_path)
    data = _csv(tmp_path, csv_text)
    expr = "(w*x + b - y)**2"
    if "--expr" in extra:
        i = extra.index("--expr")
        expr = extra[i + 1]
        extra = extra[:i] + extra[i + 2:]
    params = [] if "--params" in extra else ["--params", "w,b"]
    rc, out, err = run(capsys, "fit", expr, *params, "--data", data, *extra)
    assert rc == 1, (out, err)
    one_error_line(err, "calcml fit: error:", *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv"]  # nothing else was written


def test_fit_missing_file_and_unwritable_history(capsys, tmp_path, linear_csv):
    rc, _, err = run(capsys, "fit", "(w*x + b - y)**2", "--params", "w,b", "--data", str(tmp_path / "no.csv"))
    assert rc == 1 and "no such data file" in one_error_line(err)
    path = linear_csv[0]
    rc, _, err = run(capsys, "fit", "(w*x + b - y)**2", "--params", "w,b", "--data", str(path), "--method", "lbfgs",
                     "--history", str(tmp_path / "missing-folder" / "h.csv"))
    assert rc == 1 and "cannot write" in one_error_line(err)


# -- help and usage ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["demo"], ["diff"], ["verify"], ["fit"]])
def test_help_everywhere_with_examples(capsys, command):
    """Each help has examples, and every example is a command line the parser accepts."""
    import shlex

    from calcml.cli import _build_parser

    rc, out, _ = run(capsys, *command, "--help")
    assert rc == 0
    block = out.split("examples:", 1)[1].replace("\\\n", " ")  # a shell line continued with a backslash
    examples = [line.strip() for line in block.splitlines() if line.strip().startswith("calcml ")]
    assert examples, out
    for text in examples:
        argv = shlex.split(text)[1:]
        args = _build_parser().parse_args(argv)  # a usage error would exit here
        assert args.command == argv[0], text


@pytest.mark.parametrize("argv", [["fit", "x"], ["diff"], ["frobnicate"], ["fit", "x", "--params", "w", "--epochs", "two"]])
def test_usage_errors_are_one_line(capsys, argv):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    one_error_line(err, "error:", "--help")


def test_fit_in_a_fresh_process(tmp_path, linear_csv):
    path, xs, ys = linear_csv
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "calcml", "fit", "(w*x + b - y)**2", "--params", "w,b", "--data", str(path),
           "--method", "lbfgs"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    sol = np.linalg.lstsq(np.column_stack([xs, np.ones_like(xs)]), ys, rcond=None)[0]
    rows = table_values(done.stdout)
    np.testing.assert_allclose([float(rows["w"]), float(rows["b"])], sol, rtol=1e-7)
    bad = subprocess.run([sys.executable, "-m", "calcml", "diff", "x.__class__"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    one_error_line(bad.stderr, "attribute access")
    assert list(tmp_path.iterdir()) == []


def test_fit_a_csv_column_the_expression_does_not_use_may_hold_text(capsys, tmp_path):
    """As in files read by Dask (docs/dask.md: other columns of any type): one CSV file read
    into memory with a column of labels that no term reads fits; the same text in a column the
    expression reads is named, with its line."""
    data = _csv(tmp_path, "x,y,tag\n1,3,u\n2,5,v\n3,7,w\n")
    rc, out, _ = run(capsys, "fit", "(w*x + c - y)**2", "--params", "w,c", "--data", data, "--method", "lbfgs")
    rows = table_values(out)
    assert rc == 0 and abs(float(rows["w"]) - 2) < 1e-6 and abs(float(rows["c"]) - 1) < 1e-6
    rc, out, err = run(capsys, "fit", "(w*x + c - tag)**2", "--params", "w,c", "--data", data, "--method", "lbfgs")
    assert rc != 0 and "line 2, column 'tag': 'u' is not a number" in err
