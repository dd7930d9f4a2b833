"""SIGTERM and SIGINT in the commands other than `train` (which stops at a step boundary, see
diffctl.callbacks.StepCheckpoint): stop at once, stop and reap child processes, keep what is
finished, and end with one line saying what was kept and how to continue.

Exit code: 1, as for every one-line diffctl error and as `diffctl train` exits when stopped by a
signal (not 128 + signal number: the line says which signal it was).

- `stop_on_signals(kept)` (or the decorator `interruptible`) wraps a command's work: the first SIGTERM/SIGINT raises `Interrupted` in
  the main thread wherever it is; leaving the block turns it into `CommandInterrupted` (a DiffctlError,
  printed as one line by diffctl.reporting.user_errors) with the text `kept()` returns then. Later
  signals are ignored while the command cleans up. Outputs must be written atomically (temporary
  file, then rename), so an interrupted write leaves no file that looks finished.
- `deferred()` holds a signal back while a block runs that must not be cut (starting processes
  whose handles would otherwise be lost) and acts on it when the block ends.
- `die_on_signals()` is for worker processes: SIGTERM/SIGINT end them at once, also while they wait
  inside a C++ collective where no Python handler would run; their parent reports.
- `stop_processes(procs)` terminates, then kills after a grace period, and reaps child processes.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable

from diffctl.errors import DiffctlError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def install(signums: Iterable[int], handler) -> dict[int, object]:
    """Set `handler` for `signums`; returns the previous handlers for `restore`. Signal handlers can
    only be set from the main thread: elsewhere nothing is installed ({} returned)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in signums:
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)
    return previous


def restore(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        if handler is not None:  # None: set from C, cannot be put back from Python
            signal.signal(signum, handler)


class Interrupted(BaseException):
    """Raised by the handler of `stop_on_signals`. A BaseException, like KeyboardInterrupt, so that
    the `except Exception` blocks the work passes through (download errors, metric fallbacks) let it by."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


class CommandInterrupted(DiffctlError):
    """A command stopped by SIGTERM/SIGINT; the message says what was kept and how to continue."""


class _Guard:
    def __init__(self):
        self.received: int | None = None
        self.deferring = 0
        self.pending: int | None = None

    def handler(self, signum, frame) -> None:
        # No printing here: the main thread may be inside a write to the same stream.
        if self.received is not None or self.pending is not None:
            return  # already stopping: let the cleanup finish
        if self.deferring:
            self.pending = signum
            return
        self.received = signum
        raise Interrupted(signum)


_active: list[_Guard] = []


@contextmanager
def stop_on_signals(kept: Callable[[], str]):
    """Run the block; on SIGTERM/SIGINT raise CommandInterrupted('stopped by SIG...; ' + kept())."""
    guard = _Guard()
    previous = install(SIGNALS, guard.handler)
    _active.append(guard)
    try:
        yield guard
    except Interrupted as stop:
        if int(os.environ.get("RANK", "0") or 0) > 0:  # ranks of torchrun/SLURM: rank 0 says it once
            raise SystemExit(1) from None
        raise CommandInterrupted(f"stopped by {signal_name(stop.signum)}; {kept()}") from None
    finally:
        _active.remove(guard)
        restore(previous)


def interruptible(kept: Callable[[Any], str]):
    """Decorator for a command's entry function `fn(cfg)`: it runs inside stop_on_signals, and the
    line that ends an interrupted run says `kept(cfg)` (what is kept, how to continue)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(cfg, *args, **kwargs):
            with stop_on_signals(lambda: kept(cfg)):
                return fn(cfg, *args, **kwargs)

        return wrapper

    return decorate


@contextmanager
def deferred():
    """A signal received inside the block is acted on when the block ends (outside stop_on_signals:
    nothing changes)."""
    guard = _active[-1] if _active else None
    if guard is None:
        yield
        return
    guard.deferring += 1
    try:
        yield
    finally:
        guard.deferring -= 1
        if not guard.deferring and guard.pending is not None:
            signum, guard.pending = guard.pending, None
            guard.received = signum
            raise Interrupted(signum)


def die_on_signals() -> None:
    """In a worker process: SIGTERM and SIGINT terminate it at once (the default action); also
    unblocks them, in case the parent started it with them blocked."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def stop_processes(processes, grace_s: float = 5.0) -> None:
    """Stop and reap multiprocessing.Process objects: SIGTERM to those alive, SIGKILL to those still
    alive after `grace_s` seconds, then join all (no zombie or orphan is left)."""
    import time

    processes = [p for p in processes if p is not None]
    with deferred():  # a second signal must not cut the cleanup short
        for p in processes:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + grace_s
        for p in processes:
            p.join(max(deadline - time.monotonic(), 0))
        for p in processes:
            if p.is_alive():
                p.kill()
            p.join()
