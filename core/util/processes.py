"""Process controls: a signal on the parent's death and adopting orphaned descendants (Linux ``prctl``;
elsewhere they do nothing and say so), Ctrl-C held back from the processes a block starts, and SIGTERM and
SIGHUP ending a command as an interrupt does."""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None).prctl(option, value, 0, 0, 0) == 0


def signal_on_parent_death(signum: int) -> bool:
    """Have the kernel send *signum* to this process when the thread that started it ends (the process that
    started it, for one started from its main thread); False where that is not available."""
    return _prctl(_PR_SET_PDEATHSIG, signum)


def adopt_orphans() -> bool:
    """Make this process the parent of the descendants whose own parents end (``PR_SET_CHILD_SUBREAPER``),
    instead of init: it can then find and end them. False where that is not available."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


#: The signals that stop a command: Ctrl-C, termination (``timeout``, a batch scheduler), a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP held back for the block. They are blocked in this thread: the processes
    started in the block inherit the block (through ``exec`` too) and never see a terminal's Ctrl-C, which
    reaches every process of the foreground group; the process that started them ends them. In the main
    thread, a signal that came before or during the block (Python acts on it at its next step, which could be
    midway through starting a process) is raised again when the block ends, for its handler to act on."""
    held: list[int] = []
    main = threading.current_thread() is threading.main_thread()

    def hold(signum: int, _frame) -> None:
        held.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in STOP_SIGNALS} if main else {}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if held:
        signal.raise_signal(held[0])


class Terminated(BaseException):
    """SIGTERM or SIGHUP reached the process (``timeout``, a batch scheduler, a closed terminal): raised where it
    runs, as Ctrl-C raises ``KeyboardInterrupt``, so that the run stops its workers and says so."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def terminated_by_exception() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` in this process (Python's default ends it
    at once, without a word); the previous handlers come back after it."""

    def terminate(signum: int, _frame) -> None:
        raise Terminated(signum)

    previous = {signum: signal.signal(signum, terminate) for signum in STOP_SIGNALS[1:]}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ignore_late_signals() -> None:
    """Block SIGINT, SIGTERM and SIGHUP for the rest of this process: its work is done (a run's results are
    written) and a late Ctrl-C would otherwise report an interrupted run, or kill the process by signal while
    the interpreter shuts down, when the results are complete."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
