"""Timing helpers shared by the benchmark scripts.

Every figure is a median of repeated runs (the machines are 2-core, shared and noisy), and
every ratio is taken against a reference measured in the same process and run.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Timing:
    name: str
    times: list = field(default_factory=list)
    nbytes: int | None = None  # bytes of data read per call, for GB/s
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def gbps(self) -> float | None:
        if not self.nbytes:
            return None
        return self.nbytes / self.median / 1e9


def measure(fn, name: str, *, repeat: int = 15, budget: float = 2.0, warmup: int = 1,
            min_repeat: int = 3, nbytes: int | None = None, note: str = "") -> Timing:
    """Time ``fn()`` ``repeat`` times, stopping early once ``budget`` seconds are spent
    (but never before ``min_repeat`` runs). Warm-up calls (compilation, page faults) are
    not timed. The garbage collector is off while timing."""
    for _ in range(warmup):
        fn()
    t = Timing(name, nbytes=nbytes, note=note)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for i in range(repeat):
            t0 = time.perf_counter()
            fn()
            t.times.append(time.perf_counter() - t0)
            if i + 1 >= min_repeat and time.perf_counter() - start > budget:
                break
    finally:
        if gc_was:
            gc.enable()
    return t


def fmt_time(s: float) -> str:
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def table(title: str, rows: list, ref: Timing | None = None, *, ratio_label: str = "ratio to ref") -> str:
    """A Markdown table: implementation, median, min–max, runs, ratio to ``ref`` (time of the
    row divided by time of the reference: above 1 is slower), GB/s where it applies."""
    lines = [f"### {title}", ""]
    lines.append(f"| implementation | median | min–max | runs | {ratio_label} | GB/s |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r.median / ref.median:.2f}×" if ref is not None else ""
        g = r.gbps
        gb = f"{g:.1f}" if g is not None else ""
        name = r.name + (f" ({r.note})" if r.note else "")
        if ref is not None and r is ref:
            name = f"**{name}** (ref)"
        lines.append(
            f"| {name} | {fmt_time(r.median)} | {fmt_time(r.min)}–{fmt_time(r.max)} | "
            f"{len(r.times)} | {ratio} | {gb} |"
        )
    lines.append("")
    return "\n".join(lines)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba
    import numpy
    import sympy

    return (
        f"{time.strftime('%Y-%m-%d %H:%M')} | {cpu}, {os.cpu_count()} CPUs | "
        f"Python {platform.python_version()}, numba {numba.__version__}, "
        f"numpy {numpy.__version__}, sympy {sympy.__version__} | "
        f"numba threading layer: {_threading_layer()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}"
    )


def _threading_layer() -> str:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # not initialised until a parallel function has run
        return "(not yet initialised)"


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def measure_interleaved(fns: dict, *, rounds: int = 15, budget: float = 10.0, min_rounds: int = 3,
                        nbytes=None, setup=None, warm: bool = False) -> dict:
    """Time several callables round-robin: each round calls every one once, so a burst of
    load from a colleague's process hits all of them alike, in an order shuffled anew each
    round (a fixed seed): what runs just before a call matters (after ~50 ms with one core
    idle, the next two-thread call of any kernel here ran 30-40% slower, hand-written or
    calcml), so no callable may always follow the same one; ``warm=True`` times each call
    right after an untimed one of the same callable (steady state: what a fit's repeated
    calls see). ``fns`` maps name -> callable;
    ``nbytes`` is an int or a dict name -> int; ``setup(name)``, if given, runs untimed
    before each call (e.g. numba.set_num_threads). Each callable is called once untimed
    first (compilation). Returns name -> Timing, in the order of ``fns``."""
    out = {}
    for name, fn in fns.items():
        if setup is not None:
            setup(name)
        fn()
        nb = nbytes.get(name) if isinstance(nbytes, dict) else nbytes
        out[name] = Timing(name, nbytes=nb)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        order = list(fns.items())
        shuffle = random.Random(0).shuffle
        for r in range(rounds):
            shuffle(order)
            for name, fn in order:
                if setup is not None:
                    setup(name)
                if warm:
                    fn()
                t0 = time.perf_counter()
                fn()
                out[name].times.append(time.perf_counter() - t0)
            if r + 1 >= min_rounds and time.perf_counter() - start > budget:
                break
    finally:
        if gc_was:
            gc.enable()
    return out


# -- cold and warm builds in fresh processes (W7, W10) ----------------------------------------
def run_child(src: str, env_extra: dict, timeout: float, cwd: str) -> dict:
    """Run ``src`` in a fresh Python; its last stdout line is a JSON dict of timings."""
    import json
    import subprocess
    import sys
    import textwrap

    env = dict(os.environ)
    env.update(env_extra)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(src)], env=env, capture_output=True,
                       text=True, timeout=timeout, cwd=cwd)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"child failed ({p.returncode}): {last}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def cold_warm_builds(src: str, repeat: int, timeout: float, cwd: str, prefix: str):
    """[(label, {timing: [values]}, error or None)] for "cold" (a new empty calcml and Numba
    cache each run) and "warm" (the first cold run's caches, in new processes)."""
    import shutil
    import tempfile

    out = []
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        for label in ("cold", "warm"):
            vals: dict = {}
            error = None
            for i in range(repeat):
                cache = os.path.join(tmp, f"cold{i}" if label == "cold" else "cold0")
                os.makedirs(cache, exist_ok=True)
                env = {"CALCML_CACHE_DIR": cache, "NUMBA_CACHE_DIR": os.path.join(cache, "numba")}
                try:
                    found = run_child(src, env, timeout, cwd)
                except Exception as exc:  # noqa: BLE001 - reported in the table's notes
                    error = exc
                    break
                for key, val in found.items():
                    vals.setdefault(key, []).append(val)
            out.append((label, vals, error))
            if label == "cold" and not vals:
                break
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_table_rows(src: str, repeat: int, timeout: float, cwd: str, prefix: str, lead: list, keys: list,
                     where: str = "") -> tuple:
    """(table rows, notes) of :func:`cold_warm_builds`: one row per cache state with the cells
    ``lead`` (text before the label) and the medians (min–max) of ``keys``; a failed run
    becomes a note (``where`` names it)."""
    rows, notes = [], []
    for label, vals, error in cold_warm_builds(src, repeat, timeout, cwd, prefix):
        if error is not None:
            notes.append(f"- {where}{label}: {error}")
        if vals:
            rows.append("| " + " | ".join([*lead, label, *(fmt_spread(vals[k]) for k in keys)]) + " |")
    return rows, notes


def fmt_spread(vals) -> str:
    """median (min–max) of a list of seconds, or '' for none."""
    return f"{fmt_time(statistics.median(vals))} ({fmt_time(min(vals))}–{fmt_time(max(vals))})" if vals else ""


# W10's network as a user states it (64-128-10, tanh; 9,610 parameters): source text for the fresh
# processes of w10_network.py and first_fit.py (needs numpy as np, sympy as sp, calcml as cm, d, H, K)
W10_STATEMENT = """\
W1 = cm.params("W1", shape=(H, d)); b1 = cm.params("b1", shape=(H,))
W2 = cm.params("W2", shape=(K, H)); b2 = cm.params("b2", shape=(K,))
x = cm.data("x", shape=(d,)); c = cm.data("c", classes=K)
j, h, k = cm.index("j", d), cm.index("h", H), cm.index("k", K)
hidden = sp.tanh(cm.sum(W1[h, j] * x[j], j) + b1[h])
logits = cm.sum(W2[k, h] * hidden, h) + b2[k]
cost = cm.Cost(cm.logsumexp(logits, k) - cm.sum(cm.onehot(c, k) * logits, k), params=[W1, b1, W2, b2], data=[x, c])
"""
