"""Processes of a test's runs and clusters, found and ended through ``/proc`` (Linux).

A Ray node is a tree of processes (``ray start``, its raylet and agents, the workers the raylet
starts, which open sessions of their own), so signalling one process group does not end it:
:func:`kill_tree` takes the tree as it stands and kills every process in it. :func:`marked`
finds the processes that inherited an environment variable, which is how a test tells the
processes a run started (a local Ray cluster's included) from everything else on the machine."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def _parents() -> dict[int, int]:
    """Parent pid of every running process, by pid."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Pids of the processes below *pid* (children, their children …)."""
    parents, found, frontier = _parents(), [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL *process* and every process below it, as a machine that dies would end them."""
    for pid in [process.pid, *descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(60)


def alive(pid: int) -> bool:
    """Whether process *pid* exists and has not ended (a zombie, ended but not reaped, has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def marked(variable: str, value: str) -> list[int]:
    """Pids of the live processes whose environment holds ``variable=value``."""
    wanted = f"{variable}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if wanted in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                    found.append(int(entry.name))
    return found


def command_line(pid: int) -> str:
    """The command line of process *pid* (a Ray worker shows ``ray::Class.method`` while it runs a method)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class KillsItsWorker:
    """Digits as a map-style dataset (``layerscope.run(spec, data=...)``) that SIGKILLs the worker process
    reading it, as the machine's out-of-memory killer would: *times* times in all (counted by the files
    in *tally*, a folder), never in the process that made it (the run's driver)."""

    def __init__(self, x, y, tally: Path, times: int):
        self.x, self.y, self.tally, self.times = x, y, tally, times
        self.driver = os.getpid()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        if os.getpid() != self.driver:
            for kill in range(self.times):
                try:
                    (self.tally / f"kill-{kill}").open("x").close()  # claimed by one worker only
                except FileExistsError:
                    continue
                os.kill(os.getpid(), signal.SIGKILL)
        return self.x[index], self.y[index]


def as_foreground() -> None:
    """``preexec_fn`` for a run a test interrupts as Ctrl-C does: SIGINT at its default in the child, as a
    terminal's foreground command has it. A job started in the background of a non-interactive shell (as CI
    may start the tests) inherits SIGINT ignored, and so would the run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
