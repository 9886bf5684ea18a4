"""Where units of work run: the interface every command sends its work through, and the runner
that does the work in threads of this process when no broker is configured.

A unit of work is a function of ``workers/`` named by its Celery task name (``workers.backup.
UNITS``, ``workers.wal.UNITS``): it takes the storage, the stage its payloads wait in, and one
request model. A command hands a ``Runner`` the task name, the request and the payloads the
request refers to, and gets back a ``Handle``; it never knows where the work runs.

- ``coordinator.broker.flights.CeleryRunner`` sends the unit to the workers, follows it, and
  sends again what a worker or the broker lost.
- ``EmbeddedRunner`` (here) calls the same function in a daemon thread of this process, with an
  in-memory stage. Its answer goes through the same JSON form as a worker's (``model_dump(mode=
  "json")``), so the caller validates both the same way and the embedded path cannot hide a
  request or result that would not survive the broker.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any, Protocol

from coordinator.wait import wait_until

if TYPE_CHECKING:
    from pydantic import BaseModel

    from storage.base import Storage
    from workers.location import StorageBound
    from workers.staging import MemoryStage, Stage

# A unit of work: ``(storage, stage, request) -> answer`` (a model, a str, or None).
Unit = Callable[["Storage", "Stage", Any], Any]

# Between two looks at a handle ``Runner.run`` waits for: a unit's round trip takes
# milliseconds at best; ``CeleryRunner`` reads the broker at most every 5 ms anyway.
WAIT_PAUSE_S = 0.01


class Handle(Protocol):
    """A unit of work in flight."""

    what: str  # for messages: "part 3 of 'b1/base.tar.zst'"

    def done(self) -> bool:
        """Whether it is answered, or overdue (``result`` then raises)."""
        ...

    def result(self) -> Any:
        """The answer in JSON form; raises the unit's error, or the runner's when overdue."""
        ...

    def shorten(self, seconds: float) -> None:
        """Give up on it if still unanswered ``seconds`` from now (never lengthens)."""
        ...


class Runner(Protocol):
    """Runs units of work; ``EmbeddedRunner`` and ``broker.flights.CeleryRunner``."""

    @property
    def resent(self) -> int:
        """Units sent again because they looked lost (0 in this process)."""
        ...

    def start(
        self,
        task: str,
        request: StorageBound,
        what: str,
        payloads: Mapping[str, bytes] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Handle:
        """Start ``task`` with ``request``, ``payloads`` staged under the refs it names;
        ``timeout_s`` unanswered in all: overdue (None: the runner's own bound)."""
        ...

    def release(self, handles: Iterable[Handle], *, wait: bool = False) -> None:
        """Forget these units: answered, or given up. Their staged payloads are dropped,
        before this returns when ``wait`` (else perhaps a little later)."""
        ...

    def interrupt(self) -> None:
        """Stop waiting for the broker, now and from now on: the work is being given up."""
        ...

    def revive(self, grace_s: float) -> None:
        """Wait for the broker again, up to ``grace_s`` (cleaning up after a failure)."""
        ...

    def close(self) -> None: ...


def run(
    runner: Runner,
    task: str,
    request: StorageBound,
    what: str,
    payloads: Mapping[str, bytes] | None = None,
    *,
    timeout_s: float | None = None,
) -> Any:
    """Start one unit, wait for its answer, release it; raises its error."""
    return answer(runner, runner.start(task, request, what, payloads, timeout_s=timeout_s))


def answer(runner: Runner, handle: Handle) -> Any:
    """Wait for the answer of a unit ``runner`` started, release it; raises its error."""
    try:
        # No bound here: every handle is answered, overdue or failed in bounded time (its
        # timeout, the broker's grace period).
        wait_until(handle.done, timeout_s=math.inf, first_s=WAIT_PAUSE_S)
        return handle.result()
    finally:
        runner.release([handle])


def as_json(answer: Any) -> Any:
    """A unit's answer as a worker returns it through Celery's JSON serializer."""
    from pydantic import BaseModel

    return answer.model_dump(mode="json") if isinstance(answer, BaseModel) else answer


class _ThreadHandle:
    def __init__(self, what: str, deadline: float, overdue: Callable[[str], BaseException]):
        self.what = what
        self.future: Future[Any] = Future()
        self.refs: list[str] = []
        self._deadline = deadline
        self._overdue = overdue

    def done(self) -> bool:
        return self.future.done() or time.monotonic() >= self._deadline

    def result(self) -> Any:
        if not self.future.done():
            raise self._overdue(self.what)
        return self.future.result()

    def shorten(self, seconds: float) -> None:
        self._deadline = min(self._deadline, time.monotonic() + seconds)


class EmbeddedRunner:
    """Runs units in daemon threads of this process, at most ``threads`` at once, payloads in
    memory, none past ``deadline`` (``time.monotonic()`` seconds; default none).

    Daemon threads: one stuck in a storage call cannot keep the process from exiting once the
    command has given up on it. ``overdue(what)`` is the error a unit unanswered in time is
    reported with (it names the flag that set the bound). Owns ``storage``: closes it.
    """

    resent = 0

    def __init__(
        self,
        storage: Storage,
        units: Mapping[str, Unit],
        *,
        threads: int,
        overdue: Callable[[str], BaseException],
        deadline: float = math.inf,
    ) -> None:
        from workers.staging import MemoryStage

        self._storage = storage
        self._units = units
        self.stage: MemoryStage = MemoryStage()
        self._gate = threading.BoundedSemaphore(threads)
        self._overdue = overdue
        self._deadline = deadline
        self._closed = threading.Event()
        self._running: set[Future[Any]] = set()
        self._lock = threading.Lock()

    def start(
        self,
        task: str,
        request: BaseModel,
        what: str,
        payloads: Mapping[str, bytes] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Handle:
        unit = self._units[task]
        deadline = self._deadline
        if timeout_s is not None:
            deadline = min(deadline, time.monotonic() + timeout_s)
        handle = _ThreadHandle(what, deadline, self._overdue)
        for ref, data in (payloads or {}).items():
            self.stage.put(ref, data, 0)
            handle.refs.append(ref)

        def work() -> None:
            with self._gate:
                # Given up (released, or the runner closed) while it waited for a thread.
                if self._closed.is_set() or not handle.future.set_running_or_notify_cancel():
                    return
                with self._lock:
                    self._running.add(handle.future)
                try:
                    handle.future.set_result(as_json(unit(self._storage, self.stage, request)))
                except BaseException as exc:  # handed to whoever waits on the handle
                    handle.future.set_exception(exc)
                finally:
                    with self._lock:
                        self._running.discard(handle.future)

        threading.Thread(target=work, name=task, daemon=True).start()
        return handle

    def release(self, handles: Iterable[Handle], *, wait: bool = False) -> None:
        for handle in handles:
            assert isinstance(handle, _ThreadHandle)
            handle.future.cancel()  # not started yet: never will
            self.stage.delete(*handle.refs)

    def interrupt(self) -> None:
        pass  # no broker to wait for

    def revive(self, grace_s: float) -> None:
        pass

    def close(self) -> None:
        """Start nothing more; wait for the units running now (up to the deadline), then close
        the storage they use."""
        self._closed.set()
        with self._lock:
            running = list(self._running)
        wait_futures(running, timeout=max(0.0, self._deadline - time.monotonic())
                     if self._deadline != math.inf else None)  # fmt: skip
        self._storage.close()
