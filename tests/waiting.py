"""Waiting in tests for something to happen: poll its condition, never sleep a fixed time.

A fixed ``time.sleep`` is too short on a loaded machine and wasted time on an idle one;
:func:`wait_until` returns as soon as the condition holds and fails with a message naming what
did not happen once a (generous) deadline has passed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition waited for did not hold by the deadline (a test failure, not an error)."""


def wait_until(condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.1) -> T:
    """Call *condition* every *interval* seconds until it returns a true value, and return that value.

    Raise :class:`WaitTimeout` naming *what* (what was waited for) if it is still false *timeout*
    seconds after the first call; it is called once more at the deadline, so a slow poll never
    fails a condition that holds by then. An exception (an assertion that the process being
    watched is still running, say) propagates at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(f"waited {timeout:g} s for {what}; it did not happen")
        time.sleep(min(interval, remaining))
