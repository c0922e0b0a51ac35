"""The pool of worker processes that run the checks: forked from a fork server, each check
under a time budget that holds even when SymPy never returns (an overrunning worker is
killed), idle workers kept between checks."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from multiprocessing.connection import wait as _wait_for
from multiprocessing.reduction import ForkingPickler

from .checks import _check
from .report import Verdict


_POOL_LOCK = threading.Lock()
_IDLE: list = []


_CONTEXT = None


def _context():
    """Workers start from a fork server where there is one (Linux, macOS): a single-threaded
    process that imported calcml.verify (so SymPy) once and forks each worker. A fork of this
    process itself would copy it mid-flight: the kernels' thread pool, Numba's and the BLAS's
    threads may hold locks that no thread of the child would ever release (a hang). Elsewhere:
    spawn."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["calcml.verify"])
        else:
            ctx = multiprocessing.get_context("spawn")
        _CONTEXT = ctx
    return _CONTEXT


def _default_jobs() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


@contextmanager
def _main_unseen():
    """The parent's ``__main__`` hidden from multiprocessing while a worker starts. A spawned
    or fork-server child imports the parent's main module first (to find what was pickled
    there): a user's script without an ``if __name__ == "__main__":`` guard would run again
    in every worker, fits and prints included, and its call of ``cm.verify`` would fail there
    (the child is still starting). Checks of calcml's and SymPy's own objects need nothing
    from it."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    names = main.__dict__
    saved = {k: names[k] for k in ("__file__", "__spec__") if k in names}
    names.pop("__file__", None)
    names["__spec__"] = None
    try:
        yield
    finally:
        names.pop("__spec__", None)
        names.update(saved)


class _Worker:
    def __init__(self, main: bool = False):
        ctx = _context()
        self.main = main  # whether this worker imported the parent's __main__
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, None), daemon=True)
        if main:
            self.proc.start()
        else:
            with _main_unseen():
                self.proc.start()
        child.close()

    def alive(self) -> bool:
        return self.proc.is_alive() and not self.conn.closed

    def stop(self):
        try:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=2)
        finally:
            self.conn.close()


def _worker_main(conn, job):
    """The loop of a worker process: run a check, send its messages, wait for the next."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    except ValueError:
        pass
    while True:
        if job is None:
            try:
                job = conn.recv()
            except EOFError:
                os._exit(0)
            except Exception as exc:  # cannot unpickle: the parent forks a fresh worker
                conn.send(("reject", None, repr(exc)))
                os._exit(0)
        tid, spec = job
        job = None

        def emit(kind, payload, _tid=tid):
            try:
                try:
                    conn.send((kind, _tid, payload))
                except (pickle.PicklingError, TypeError, AttributeError):
                    conn.send((kind, _tid, _plain(payload)))
            except OSError:  # the parent is gone
                os._exit(0)

        try:
            emit("final", _check(spec, emit))
        except BaseException as exc:  # any failure is an inconclusive verdict, never a crash
            emit("error", f"{type(exc).__name__}: {exc}")


def _plain(payload):
    """A payload that pickles for certain (exact values become strings)."""
    if isinstance(payload, Verdict):
        return Verdict(payload.name, payload.status, payload.method, payload.detail,
                       None if payload.point is None else {k: str(v) for k, v in payload.point.items()},
                       None if payload.expected is None else str(payload.expected),
                       None if payload.actual is None else str(payload.actual))
    if isinstance(payload, dict):
        return {k: _plain(v) for k, v in payload.items()}
    return payload if isinstance(payload, (str, float, int, type(None))) else str(payload)


def _shutdown_pool():
    while _IDLE:
        _IDLE.pop().stop()


atexit.register(_shutdown_pool)


def _run_specs(specs, timeout: float, jobs: int | None = None) -> list:
    """Run checks concurrently in worker processes; each gets ``timeout`` seconds."""
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    jobs = jobs or _default_jobs()
    results: list = [None] * len(specs)
    evidence: list = [None] * len(specs)
    with _POOL_LOCK:
        queue = deque(range(len(specs)))
        active: dict = {}  # conn -> [worker, tid, deadline]
        try:
            _schedule(specs, timeout, jobs, queue, active, results, evidence)
        finally:  # Ctrl-C or an error here: no worker is left computing
            for w, _, _ in active.values():
                w.stop()
    return results


def _schedule(specs, timeout, jobs, queue, active, results, evidence):
    """Hand checks to workers, collect their messages, stop the ones past their deadline."""
    while queue or active:
        while queue and len(active) < jobs:
            tid = queue.popleft()
            try:
                w = _dispatch(tid, specs[tid])
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                results[tid] = Verdict(specs[tid].name, "inconclusive", "error",
                                       f"the check could not be handed to a worker process: it does not pickle ({exc})")
                continue
            active[w.conn] = [w, tid, time.monotonic() + timeout]
        if not active:
            continue
        next_deadline = min(entry[2] for entry in active.values())
        ready = _wait_for(list(active), timeout=max(0.0, next_deadline - time.monotonic()))
        for conn in ready:
            w, tid, _ = active[conn]
            done, retry = _drain(w, tid, specs[tid], results, evidence)
            if retry:  # the worker could not read the check (it arrives pickled): say so
                del active[conn]
                w.stop()
                results[tid] = Verdict(specs[tid].name, "inconclusive", "error",
                                       "the check could not be handed to a worker process (it did not unpickle)")
            elif done:
                del active[conn]
                if w.alive() and len(_IDLE) < jobs:
                    _IDLE.append(w)
                else:
                    w.stop()
        now = time.monotonic()
        for conn, (w, tid, deadline) in list(active.items()):
            if now >= deadline:
                del active[conn]
                w.stop()
                results[tid] = _timeout_verdict(specs[tid], timeout, evidence[tid])


def _dispatch(tid, spec) -> _Worker:
    """A worker holding check ``tid``: an idle one, else a fresh one. The check is pickled
    once, here (what ``conn.send`` would do); a check whose pickle names the parent's
    ``__main__`` (a SymPy function class of the user's script, say) goes to a worker that
    imported it, every other one to a worker that did not (:func:`_main_unseen`)."""
    message = bytes(ForkingPickler.dumps((tid, spec)))  # (a buffer); a pickling error: the caller says so
    main = b"__main__" in message
    for w in [w for w in reversed(_IDLE) if w.main == main]:
        _IDLE.remove(w)
        if not w.alive():
            w.stop()
            continue
        try:
            w.conn.send_bytes(message)
            return w
        except OSError:  # the worker is gone: a fresh one
            w.stop()
            break
    w = _Worker(main)
    try:
        w.conn.send_bytes(message)
    except BaseException:
        w.stop()
        raise
    return w


def _drain(w: _Worker, tid, spec, results, evidence):
    """Read what a worker sent. Returns (finished, needs_a_fresh_worker)."""
    try:
        while w.conn.poll():
            kind, mtid, payload = w.conn.recv()
            if kind == "reject":
                return False, True
            if mtid != tid:
                continue
            if kind == "evidence":
                evidence[tid] = payload
            elif kind == "final":
                results[tid] = payload
                return True, False
            elif kind == "error":  # a step of the check raised: what the numbers said before it, if anything
                found = evidence.get(tid) or {}
                if found.get("refutation") is not None:
                    results[tid] = found["refutation"]
                else:
                    detail = f"the symbolic check could not handle this expression (it raised {payload})"
                    if found.get("summary"):
                        detail += f"; numeric evidence: {found['summary']}"
                    results[tid] = Verdict(spec.name, "inconclusive", "error", detail)
                return True, False
    except (EOFError, OSError, pickle.UnpicklingError) as exc:
        w.stop()
        results[tid] = Verdict(spec.name, "inconclusive", "error", f"the worker process ended unexpectedly ({exc!r})")
        return True, False
    return False, False


def _timeout_verdict(spec, timeout, evidence) -> Verdict:
    detail = f"no exact proof within the time budget of {timeout:g} s"
    if evidence:
        refutation = evidence.get("refutation")
        if refutation is not None:
            return refutation
        if evidence.get("summary"):
            detail += f"; numeric evidence: {evidence['summary']}"
    return Verdict(spec.name, "inconclusive", "time budget", detail)
