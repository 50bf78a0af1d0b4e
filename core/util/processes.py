"""Linux process controls (``prctl``): a signal on the parent's death, and adopting orphaned descendants.
Elsewhere they do nothing and say so."""

from __future__ import annotations

import ctypes
import sys

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
