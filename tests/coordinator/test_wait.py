"""coordinator.wait: bounds, backoff and interrupts, on a clock the tests move (no real sleep)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pytest

from coordinator.wait import Backoff, retry, wait_until


class FakeTime:
    """A monotonic clock that moves only when something sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 9))
        self.now += seconds


def after(calls: int, value: object = "done") -> Callable[[], object]:
    """A condition that holds from its ``calls``-th call on."""
    seen = 0

    def condition() -> object:
        nonlocal seen
        seen += 1
        return value if seen >= calls else None

    return condition


def test_returns_the_conditions_value_without_pausing_when_it_holds_at_once() -> None:
    t = FakeTime()
    assert wait_until(after(1, 42), timeout_s=1, first_s=0.1, clock=t.clock, sleep=t.sleep) == 42
    assert t.sleeps == []


def test_pauses_grow_by_the_factor_up_to_the_maximum() -> None:
    t = FakeTime()
    got = wait_until(after(7), timeout_s=math.inf, first_s=1, max_s=5, factor=2,
                     clock=t.clock, sleep=t.sleep)  # fmt: skip
    assert got == "done"
    assert t.sleeps == [1, 2, 4, 5, 5, 5]


def test_a_fixed_pause_by_default() -> None:
    t = FakeTime()
    wait_until(after(4), timeout_s=math.inf, first_s=0.01, clock=t.clock, sleep=t.sleep)
    assert t.sleeps == [0.01, 0.01, 0.01]


def test_none_at_the_deadline_after_one_last_look_there() -> None:
    t = FakeTime()
    looks: list[float] = []

    def never() -> bool:
        looks.append(t.now)
        return False

    assert wait_until(never, timeout_s=10, first_s=3, clock=t.clock, sleep=t.sleep) is None
    assert t.sleeps == [3, 3, 3, 1]  # the last pause cut short at the deadline
    assert looks == [100, 103, 106, 109, 110]


def test_pause_first_waits_before_the_first_look() -> None:
    t = FakeTime()
    looks: list[float] = []

    def once() -> bool:
        looks.append(t.now)
        return True

    assert wait_until(once, timeout_s=1, first_s=0.25, pause_first=True,
                      clock=t.clock, sleep=t.sleep)  # fmt: skip
    assert looks == [100.25]


def test_no_look_at_all_with_pause_first_and_no_time() -> None:
    t = FakeTime()
    called: list[bool] = []
    got = wait_until(lambda: called.append(True), timeout_s=0, first_s=1, pause_first=True,
                     clock=t.clock, sleep=t.sleep)  # fmt: skip
    assert got is None and called == [] and t.sleeps == []


def test_an_interrupt_during_a_pause_ends_the_wait() -> None:
    t = FakeTime()
    stop = threading.Event()
    calls: list[float] = []

    def sleep_then_interrupted(seconds: float) -> None:
        t.sleep(seconds)
        stop.set()

    def never() -> bool:
        calls.append(t.now)
        return False

    got = wait_until(never, timeout_s=60, first_s=0.5, interrupt=stop, clock=t.clock,
                     sleep=sleep_then_interrupted)  # fmt: skip
    assert got is None and calls == [100] and t.sleeps == [0.5]


def test_an_interrupt_set_before_means_no_look_and_no_sleep() -> None:
    stop = threading.Event()
    stop.set()
    called: list[bool] = []
    # No sleep injected: the pause would be the event's wait, which returns at once anyway.
    assert wait_until(lambda: called.append(True), timeout_s=60, first_s=30,
                      interrupt=stop) is None  # fmt: skip
    assert called == []


def test_what_the_condition_raises_propagates() -> None:
    def broken() -> bool:
        raise KeyError("x")

    with pytest.raises(KeyError):
        wait_until(broken, timeout_s=1, first_s=0.1)


def test_backoff_pause_limit_and_reset() -> None:
    t = FakeTime()
    backoff = Backoff(1, max_s=3, factor=2, sleep=t.sleep)
    assert backoff.upcoming_s == 1
    assert backoff.pause() and backoff.pause(limit_s=0.5) and backoff.pause()
    assert t.sleeps == [1, 0.5, 3]
    backoff.reset()
    assert backoff.upcoming_s == 1


@pytest.mark.parametrize(
    ("first_s", "max_s", "factor"), [(-1, None, 1), (1, 0.5, 1), (1, None, 0.5)]
)
def test_backoff_refuses_pauses_that_make_no_sense(
    first_s: float, max_s: float | None, factor: float
) -> None:
    with pytest.raises(ValueError, match="pauses from"):
        Backoff(first_s, max_s=max_s, factor=factor)


class Flaky(Exception):
    pass


def test_retry_pauses_on_its_schedule_and_reports_each_retry() -> None:
    t = FakeTime()
    failures = iter([Flaky("one"), Flaky("two")])
    reported: list[tuple[str, float, int]] = []

    def action() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "ok"

    got = retry(action, attempts=3, retry_on=Flaky, first_s=2, factor=3, sleep=t.sleep,
                before_retry=lambda exc, pause_s, n: reported.append((str(exc), pause_s, n)))
    assert got == "ok"
    assert t.sleeps == [2, 6]
    assert reported == [("one", 2, 1), ("two", 6, 2)]


def test_retry_raises_the_last_error_after_the_last_attempt() -> None:
    t = FakeTime()
    calls: list[int] = []

    def always() -> None:
        calls.append(1)
        raise Flaky(f"attempt {len(calls)}")

    with pytest.raises(Flaky, match="attempt 3"):
        retry(always, attempts=3, retry_on=Flaky, first_s=1, sleep=t.sleep)
    assert len(calls) == 3 and t.sleeps == [1, 1]


def test_retry_does_not_retry_other_errors() -> None:
    t = FakeTime()
    calls: list[int] = []

    def other() -> None:
        calls.append(1)
        raise KeyError("no")

    with pytest.raises(KeyError):
        retry(other, attempts=3, retry_on=Flaky, first_s=1, sleep=t.sleep)
    assert calls == [1] and t.sleeps == []


def test_retry_needs_one_attempt() -> None:
    with pytest.raises(ValueError, match="at least one"):
        retry(lambda: None, attempts=0, retry_on=Flaky, first_s=1)
