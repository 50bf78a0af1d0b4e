"""Error types that decide the command line's exit code.

A :class:`UserError` is something the user can fix (a bad spec, a missing file, bad
data); the CLI prints its message and exits 2. Anything else is an internal error
(exit 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's spec, files, model or data (exit code 2)."""


class SpecError(UserError):
    """One or more spec problems, each already formatted as ``file:line:col: path: message``."""

    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return `` Did you mean 'x'?`` for the closest choice, or ``""`` when none is close."""
    matches = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{matches[0]}'?" if matches else ""
