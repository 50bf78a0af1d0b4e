"""``layerscope run`` of a Ray spec, watched by a parent process that outlives Ray's ways of ending it.

Ray ends a driver process at once, from C++, when the Ray node it is connected to stops (its raylet killed,
its head lost): exit status 1, no Python handler runs, and nothing says what happened. A terminal's Ctrl-C
also reaches every process of the foreground process group, Ray's own among them. So ``layerscope run``
of a spec with ``runtime.engine: ray`` runs the run in a child process, in a session of its own, and:

- passes SIGINT, SIGTERM and SIGHUP on to it as SIGINT (Ctrl-C reaches the run once, never Ray's
  processes; Ray's own handler of SIGTERM would end the child before it stops its cluster), and the child
  gets SIGINT when the supervisor itself is killed: either way it stops its cluster and exits;
- reads the exit status the child reports just before it exits (:func:`report_exit`); a child that ended
  without reporting one was ended from outside Python: by Ray (exit 3, one message naming the lost Ray
  node) or by a signal (exit 130 after an interrupt, else 128 + the signal, one message);
- adopts the processes the run leaves behind (``PR_SET_CHILD_SUBREAPER``: Ray's agents and workers whose
  parents died are handed to this process, not to init) and kills them when the run has ended, so a run
  leaves no process of its own whatever ended it.

Linux only (the sub-reaper is a Linux feature), with psutil (the ``ray`` extra): elsewhere the run goes on
in the process itself.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from layerscope.util.processes import STOP_SIGNALS, adopt_orphans, signal_on_parent_death

#: Set in the child's environment: the file it writes its exit status to (a file, not an inherited descriptor:
#: libraries the run loads may close or reuse low descriptors).
STATUS_FILE = "LAYERSCOPE_STATUS_FILE"
#: What a user can do about a run that ended before writing its results.
RESUME_HINT = "a multi-checkpoint run continues from its finished checkpoints with: layerscope run SPEC --resume"
#: The message of a run that an interrupt stopped.
INTERRUPTED = f"layerscope: interrupted; no results.json was written ({RESUME_HINT})"


def wanted(spec: str) -> bool:
    """Whether a run of the spec file *spec* is supervised: a readable YAML mapping with ``runtime.engine:
    ray``, on Linux, in a process that is not already the supervised child. Anything else (a spec that does
    not parse included) runs in this process, which reports its problems."""
    if os.environ.get(STATUS_FILE) is not None or not sys.platform.startswith("linux"):
        return False
    if importlib.util.find_spec("psutil") is None:  # the ray extra installs it
        return False
    from layerscope.spec.schema import read_document
    from layerscope.util.errors import UserError

    try:
        document = read_document(spec)[0].data
    except UserError:  # the run reports it
        return False
    runtime = document.get("runtime") if isinstance(document, dict) else None
    return isinstance(runtime, dict) and runtime.get("engine") == "ray"


def report_exit(code: int) -> None:
    """Tell the supervising parent (when there is one) that this process ends with *code*."""
    path = os.environ.get(STATUS_FILE)
    if path is not None:
        try:
            Path(path).write_text(str(code))
        except OSError:  # the parent reads no status: it says what it knows
            pass


def supervise(argv: list[str]) -> int:
    """Run ``layerscope`` with *argv* in a supervised child (module docstring); its exit status."""
    adopt_orphans()
    descriptor, status_path = tempfile.mkstemp(prefix="layerscope-status-")
    os.close(descriptor)
    try:
        return _watch(argv, Path(status_path))
    finally:
        Path(status_path).unlink(missing_ok=True)


def _watch(argv: list[str], status_path: Path) -> int:
    """:func:`supervise` with the child's status file at *status_path*."""

    def dies_with_parent() -> None:  # in the child, before exec: a killed supervisor interrupts the run
        signal_on_parent_death(signal.SIGINT)

    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum: int, _frame) -> None:  # os.kill, not Popen.send_signal: that may reap the child
        received.append(signum)
        if child is not None:
            os.kill(child.pid, signal.SIGINT)  # not reaped yet: it exists

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    child = subprocess.Popen(
        [sys.executable, "-m", "layerscope", *argv],
        env={**os.environ, STATUS_FILE: str(status_path)},
        start_new_session=True,
        preexec_fn=dies_with_parent,
    )
    if received:  # a signal came while the child was starting
        os.kill(child.pid, signal.SIGINT)  # not reaped yet: it exists
    try:
        status = _wait_for(child.pid)
        child.returncode = os.waitstatus_to_exitcode(status)
    finally:
        _end_left_behind()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    reported = status_path.read_text()
    if reported.isdigit():
        code = int(reported)
        return 128 + received[-1] if code == 130 and received else code
    return _unreported(status, received)


def _wait_for(pid: int) -> int:
    """Wait for process *pid*, reaping the orphans handed to this process meanwhile; its wait status."""
    while True:
        ended, status = os.waitpid(-1, 0)
        if ended == pid:
            return status


def _unreported(status: int, received: list[int]) -> int:
    """The exit status, and one message, of a run whose process ended without reporting its own."""
    if received:
        print(INTERRUPTED, file=sys.stderr)
        return 128 + received[-1]
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        print(
            f"layerscope: the run's process was killed by {signal.Signals(signum).name} (another process, or the "
            f"system running out of memory); no results.json was written ({RESUME_HINT})",
            file=sys.stderr,
        )
        return 128 + signum
    print(
        f"layerscope: infrastructure failure: runtime.engine: Ray ended the run's process (exit status "
        f"{os.waitstatus_to_exitcode(status)}): the Ray node it was connected to stopped (its raylet or the "
        f"cluster's head ended); no results.json was written ({RESUME_HINT})",
        file=sys.stderr,
    )
    return 3


def _end_left_behind() -> None:
    """Kill the processes the run left behind (handed to this process as their parents ended) and reap them."""
    import psutil

    left = psutil.Process().children(recursive=True)
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
