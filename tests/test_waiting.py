"""tests/waiting.py: wait_until returns as soon as its condition holds and fails by name at the deadline."""

from __future__ import annotations

import time

import pytest

from .waiting import WaitTimeout, wait_until


def test_returns_the_first_true_value_without_waiting():
    started = time.monotonic()
    assert wait_until(lambda: [3], timeout=60, what="a list") == [3]
    assert time.monotonic() - started < 1


def test_polls_until_the_condition_holds():
    calls = []
    assert wait_until(lambda: calls.append(1) or len(calls) >= 3 and "done", timeout=60, interval=0.01, what="x")
    assert len(calls) == 3


def test_fails_naming_what_did_not_happen_after_a_last_look_at_the_deadline():
    calls = []
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"waited 0\.2 s for the file to appear; it did not happen"):
        wait_until(lambda: calls.append(time.monotonic()), timeout=0.2, interval=0.05, what="the file to appear")
    assert calls[-1] - started >= 0.2 and len(calls) >= 3
    assert issubclass(WaitTimeout, AssertionError)  # a failed test, not an error


def test_an_exception_in_the_condition_ends_the_wait():
    def condition():
        raise AssertionError("the process ended")

    started = time.monotonic()
    with pytest.raises(AssertionError, match="the process ended"):
        wait_until(condition, timeout=60, what="x")
    assert time.monotonic() - started < 1
