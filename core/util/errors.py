"""Error types that decide the command line's exit code.

A :class:`UserError` is something the user can fix (a bad spec, a missing file, bad
data); the CLI prints its message and exits 2. An :class:`InfrastructureError` is a
failure of the machines a run used (workers lost more often than ``runtime.retries``
allows, a Ray cluster's head gone); the CLI prints its message and exits 3. Anything
else is an internal error (exit 1).
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sysconfig
import traceback
from collections.abc import Iterable
from pathlib import Path

#: Terminal control sequences (colours) that libraries put in exception messages.
ANSI_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def first_line(error: BaseException) -> str:
    """The first line of *error*'s message, or its type's name when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class UserError(Exception):
    """A problem with the user's spec, files, model or data (exit code 2)."""


class InfrastructureError(Exception):
    """The machines a run used failed it: its workers were lost more often than it may retry, or its Ray
    cluster went away (exit code 3). The message names what failed; the checkpoints finished before
    were saved for ``--resume``."""


class SpecError(UserError):
    """One or more spec problems, each already formatted as ``file:line:col: path: message``."""

    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


def exception_summary(error: BaseException) -> str:
    """``Type: first line of the message (file:line)`` for an exception raised by the user's code, the
    location being the innermost frame of its traceback outside Python's own library and
    layerscope; terminal colour codes removed."""
    lines = [line.strip() for line in ANSI_ESCAPES.sub("", str(error)).splitlines() if line.strip()]
    summary = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    ours = (sysconfig.get_paths()["stdlib"], *_package_folders())
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if not f.filename.startswith("<") and not str(Path(f.filename).resolve()).startswith(ours)
    ]
    return f"{summary} ({frames[-1].filename}:{frames[-1].lineno})" if frames else summary


def _package_folders() -> tuple[str, ...]:
    """The folders layerscope's code lies in (``core``, ``adapters`` and ``plugins`` in a source tree)."""
    specs = [importlib.util.find_spec(name) for name in ("layerscope", "layerscope.adapters", "layerscope.plugins")]
    return tuple(
        str(Path(folder).resolve()) for spec in specs if spec for folder in spec.submodule_search_locations or ()
    )


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return `` Did you mean 'x'?`` for the closest choice, or ``""`` when none is close."""
    matches = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{matches[0]}'?" if matches else ""
