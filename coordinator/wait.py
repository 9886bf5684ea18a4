"""Waiting for something to happen: the one deadline-and-backoff wait of the coordinator.

- ``Backoff``: the pauses between two looks, ``first_s`` growing by ``factor`` up to
  ``max_s``; ``pause()`` sleeps the next one (on an interrupt ``Event`` when given). Loops that
  do real work each round use it for their sleep.
- ``wait_until``: look at a condition until it holds, the deadline passes or the wait is
  interrupted.
- ``retry``: run an action again after the errors it names, on a growing schedule.

Every caller passes its own interval and bound and says why they are what they are. Clock and
sleep can be injected (tests drive them without real time).

Standard library only, and only modules the CLI has loaded anyway: wal-fetch's served path may
import this module while it waits for the prefetcher.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

Clock = Callable[[], float]  # seconds, monotonic
Sleep = Callable[[float], object]  # sleeps that many seconds (an Event's ``wait`` fits)


class Backoff:
    """Pauses of ``first_s`` seconds, each ``factor`` times the last, at most ``max_s`` (None:
    no maximum).

    ``factor`` 1 (the default) gives a fixed pause. ``interrupt``: pauses end early when it is
    set (``pause()`` then returns False). ``sleep``: what sleeps (default ``time.sleep``, or the
    interrupt's ``wait``). Raises ``ValueError`` for a negative pause or a factor below 1.
    """

    def __init__(
        self,
        first_s: float,
        *,
        max_s: float | None = None,
        factor: float = 1.0,
        interrupt: threading.Event | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        if first_s < 0 or factor < 1 or (max_s is not None and max_s < first_s):
            raise ValueError(
                f"pauses from {first_s} s by {factor} up to {max_s} s: none may be negative, "
                "shrink, or start above their maximum"
            )
        self.first_s = first_s
        self.max_s = math.inf if max_s is None else max_s
        self.factor = factor
        self.interrupt = interrupt
        if sleep is None:
            sleep = time.sleep if interrupt is None else interrupt.wait
        self._sleep = sleep
        self._next_s = first_s

    @property
    def interrupted(self) -> bool:
        return self.interrupt is not None and self.interrupt.is_set()

    @property
    def upcoming_s(self) -> float:
        """The next pause, in seconds."""
        return self._next_s

    def pause(self, limit_s: float = math.inf) -> bool:
        """Sleep the next pause, at most ``limit_s`` seconds, and make the one after it longer;
        False when interrupted (before or during the pause), else True."""
        if self.interrupted:
            return False
        pause_s, self._next_s = self._next_s, min(self._next_s * self.factor, self.max_s)
        self._sleep(max(0.0, min(pause_s, limit_s)))
        return not self.interrupted

    def reset(self) -> None:
        """Start again from ``first_s``."""
        self._next_s = self.first_s


def wait_until(
    condition: Callable[[], _T],
    *,
    timeout_s: float,
    first_s: float,
    max_s: float | None = None,
    factor: float = 1.0,
    pause_first: bool = False,
    interrupt: threading.Event | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep | None = None,
) -> _T | None:
    """Call ``condition`` until it returns a truthy value, and return that value; None once
    ``timeout_s`` seconds have passed (``math.inf``: no bound) or ``interrupt`` is set.

    Between two calls it pauses as ``Backoff(first_s, max_s=max_s, factor=factor)`` says, the
    last pause cut short at the deadline, where the condition is called one last time.
    ``pause_first``: pause before the first call too (the caller has just looked). Whatever
    ``condition`` raises propagates at once.
    """
    deadline = clock() + timeout_s
    backoff = Backoff(first_s, max_s=max_s, factor=factor, interrupt=interrupt, sleep=sleep)
    if not pause_first and not backoff.interrupted:
        value = condition()
        if value:
            return value
    while True:
        remaining_s = deadline - clock()
        if remaining_s <= 0 or not backoff.pause(remaining_s):
            return None
        value = condition()
        if value:
            return value


def retry(
    action: Callable[[], _T],
    *,
    attempts: int,
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    first_s: float,
    factor: float = 1.0,
    max_s: float | None = None,
    before_retry: Callable[[BaseException, float, int], None] | None = None,
    pause_first: bool = False,
    sleep: Sleep | None = None,
) -> _T:
    """``action()``, called up to ``attempts`` times while it raises one of ``retry_on``.

    Between attempts it pauses as ``Backoff(first_s, max_s=max_s, factor=factor)`` says, after
    calling ``before_retry(error, pause_s, attempt)`` (attempt counts from 1: the one that
    failed), e.g. to log it. ``pause_first``: pause before the first attempt too (the caller
    has just made one of its own). The last attempt's error propagates, as does any other error
    at once. Raises ``ValueError`` for ``attempts`` below 1.
    """
    if attempts < 1:
        raise ValueError(f"{attempts} attempts: at least one is needed")
    backoff = Backoff(first_s, max_s=max_s, factor=factor, sleep=sleep)
    if pause_first:
        backoff.pause()
    for attempt in range(1, attempts):
        try:
            return action()
        except retry_on as exc:
            if before_retry is not None:
                before_retry(exc, backoff.upcoming_s, attempt)
            backoff.pause()
    return action()
