"""Work the coordinator waits for: sent as Celery tasks, followed until answered, sent again
when what is observed says it was lost.

A ``Flight`` is one unit of work (a part upload, a claim, a finalize, a WAL push) with the
payloads it needs staged in Redis (in the same transaction as its message). Its answer is
read from the result backend: pushed as the worker stores it where the flights watch results
(``Broker.watch_results``; the runners do), else by a poll, one MGET for every live flight,
which also stays the fallback for a push that was lost, at a slower pace.

Re-running any task is harmless (DESIGN.md §3, invariant 5), so a flight may have several
copies in the queue: it is answered by the first copy that succeeds, and fails only when every
copy failed. ``Flights`` sends a copy again, its payloads staged again, when

- **the broker went away and came back.** A call failing with ``BrokerUnreachable`` makes the
  caller wait for the broker, up to ``grace_s``, and then fail with that one error. A broker
  that comes back, or that is a different Redis server run than before (restarted, failed
  over: checked every ``IDENTITY_EVERY_S``), has lost the messages, payloads and results it
  held: every unanswered flight is sent again. The coordinator keeps each unanswered flight's
  large payloads for that in a temporary file (``KeptPayload``), not in its memory.
- **its worker is gone.** A flight unanswered for longer than its peers take
  (``SUSPECT_FACTOR`` times their median, at least ``SUSPECT_FLOOR_S``) is a suspect; at most
  every ``PROBE_EVERY_S`` its queue is read and one control broadcast asks the live workers
  which of the suspects they hold. A suspect that no live worker holds was lost with a worker
  if that worker reported it STARTED and no longer answers, or if it is not waiting in its
  queue either: Redis would redeliver its message only after the visibility timeout, an hour
  (invariant 5). Where the queue cannot be read, one that no live worker holds although
  workers answer, after ``STRAY_FACTOR`` times its peers' time, is sent again too.
- **a copy failed because its payload or the broker vanished under the worker**
  (``StagedPayloadMissing``, ``BrokerUnreachable`` from the worker): the same outage, seen from
  the other side.
- **it is unanswered after ``resend_after_s``** (``--part-timeout``), whatever the reason.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Celery
from celery.utils.nodenames import worker_direct

from coordinator.broker.client import START_WORKER_HINT, _as_broker
from coordinator.wait import wait_until
from storage.errors import (
    BrokerUnreachable,
    CloudDumpError,
    NoWorkerAvailable,
    RemoteTaskFailed,
)
from storage.redact import redact_url
from workers.brokerfaults import is_library_broker_fault
from workers.staging import StagedPayloadMissing

if TYPE_CHECKING:
    from coordinator.broker.client import Broker, TaskState
    from coordinator.runner import Handle
    from workers.location import StorageBound

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# One MGET reads the state of every flight: a caller polling many flights in a row pays once.
REFRESH_EVERY_S = 0.005
# The same when every unanswered flight has its answer pushed (``Broker.watch_results``): the
# MGET is then the fallback, for an answer the push lost, and the clock of the checks below.
PUSHED_REFRESH_EVERY_S = 0.25
IDENTITY_EVERY_S = 1.0
PROBE_EVERY_S = 5.0
PROBE_TIMEOUT_S = 1.0
SUSPECT_FLOOR_S = 5.0
SUSPECT_FACTOR = 4.0
STRAY_FLOOR_S = 30.0
STRAY_FACTOR = 10.0
# Copies lost to an outage under the worker before that error counts as the answer.
MAX_LOST_COPIES = 5
# Between two pings of a broker that went away: a Redis restart or failover takes seconds, so
# it is noticed within half a second, without hammering a server that is starting.
BROKER_POLL_S = 0.5
# Between two looks at a flight ``wait`` follows: a task's round trip takes milliseconds at
# best, and ``refresh`` reads the broker at most every REFRESH_EVERY_S anyway.
WAIT_PAUSE_S = 0.01


@dataclass(eq=False)
class Flight:
    """One unit of work and every copy of it sent so far."""

    task: str
    argument: Any  # the task's one argument (JSON-able); None for none
    queue: Any  # a queue name, or a kombu Queue (a worker's direct queue)
    what: str  # for messages: "part 3 of 'b1/base.tar.zst'"
    # Staged under these refs; kept to stage them again (large ones in a file: KeptPayload).
    payloads: dict[str, bytes | KeptPayload] = field(default_factory=dict)
    # What Flower shows as the task's arguments, e.g. "backup=b1 archive=base.tar.zst part=3".
    label: str = ""
    resend_after_s: float = math.inf
    timeout_s: float | None = None  # unanswered this long in all: NoWorkerAvailable
    expires_s: float | None = None  # a copy no worker took this long is dropped by Celery
    task_ids: list[str] = field(default_factory=list)
    first_sent_at: float = 0.0
    sent_at: float = 0.0
    epoch: int = -1
    worker: str | None = None  # the node a copy last reported STARTED on
    answered: bool = False
    outcome: Any = None  # the return value, or the error every copy failed with
    failed_ids: set[str] = field(default_factory=set)
    lost_copies: int = 0
    # When its first copy was about to be published (``time.monotonic()``): a result
    # subscription confirmed before that sees every state its copies store.
    publishing_at: float = 0.0

    def result(self) -> Any:
        """The answer; raises the flight's error."""
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class Flights:
    """Sends flights, follows them, and sends again those the broker or a worker lost.

    Thread-safe: every operation holds one lock, also while waiting for the broker to come
    back, so that one thread waits for it and the others wait for that thread.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        grace_s: float,
        payload_ttl_s: int = 3600,
        watch_results: bool = False,
    ) -> None:
        self.broker = broker
        self.grace_s = grace_s
        self._ttl_s = payload_ttl_s
        self._lock = threading.RLock()
        self._live: list[Flight] = []
        self._epoch = 0
        # The server run the first flight goes to: as connecting asked it (read at the first
        # refresh, ``Broker.identity_at_connect``), else read before the first send.
        self._identity: tuple[str, ...] | None = None
        self._identity_at = time.monotonic()
        self._refreshed_at = 0.0
        self._probed_at = 0.0
        self._durations: dict[str, deque[float]] = {}
        # Set once the broker stayed away for grace_s: later calls fail at once.
        self._gone: BrokerUnreachable | None = None
        self._interrupted = threading.Event()
        self.resent = 0
        # Answers pushed as workers store them (``watch_results``), kept for the task ids of
        # live flights until a poll takes them in. Their own lock: the watch's thread never
        # waits for one that holds the flights' lock while it waits for the broker.
        self._pushed: dict[str, bytes] = {}
        self._awaited: set[str] = set()
        self._pushed_lock = threading.Lock()
        self._watch = broker.watch_results(self._take_pushed) if watch_results else None

    def start(self, flight: Flight) -> Flight:
        """Stage the flight's payloads and send it.

        Safe to call from several threads at once, and meant to be: staging and sending run
        without the lock, so that with the broker far away (tens of milliseconds a round trip)
        several flights are on their way at once. Only when that fails with the broker away is
        the flight sent under the lock, waiting for the broker like every other operation.
        """
        with self._lock:
            if self._identity is None and not self.broker.asked_identity_at_connect:
                # The server run the first flight goes to, read before it is sent.
                self._identity = self._guarded(self.broker.identity)
                self._identity_at = time.monotonic()
            epoch = self._epoch
            direct = self._gone is None and not self._interrupted.is_set()
        task_id = None
        if direct:
            with contextlib.suppress(BrokerUnreachable):  # waited for below, under the lock
                task_id = self._stage_and_publish(flight, restage=True)
        _keep(flight)
        with self._lock:
            if task_id is None and self._identity is None:
                # A broker that never answered since it was connected to (a URL that reaches
                # no Redis) fails the first send now, not after the grace period.
                self._identity = self.broker.identity_at_connect()
            if task_id is not None:
                # Stamped with the epoch it was sent in: if the broker was lost meanwhile, the
                # next refresh sends it again, staged again.
                self._sent(flight, task_id, first=True, epoch=epoch)
            else:
                self._guarded(lambda: self._send(flight, first=True))
            self._live.append(flight)
        return flight

    def poll(self, flight: Flight) -> bool:
        """Whether ``flight`` is answered (every live flight is brought up to date)."""
        if not flight.answered:
            self.refresh()
        return flight.answered

    def refresh(self) -> None:
        """Take in the answers of every live flight; send again those that were lost."""
        with self._lock:
            if self._pushed:
                self._guarded(self._settle_pushed)
            every_s = PUSHED_REFRESH_EVERY_S if self._all_pushed() else REFRESH_EVERY_S
            if time.monotonic() - self._refreshed_at < every_s:
                return
            self._guarded(self._refresh)
            self._refreshed_at = time.monotonic()

    def wait(self, flight: Flight) -> Any:
        """The flight's answer, once there is one; raises its error."""
        # No bound here: a flight with a ``timeout_s`` is answered NoWorkerAvailable past it,
        # and a broker that stays away past ``grace_s`` raises from ``poll``.
        wait_until(lambda: self.poll(flight), timeout_s=math.inf, first_s=WAIT_PAUSE_S)
        return flight.result()

    def run(self, flight: Flight) -> Any:
        """Send, wait for the answer, clean up."""
        self.start(flight)
        try:
            return self.wait(flight)
        finally:
            self.finish(flight)

    def finish(self, *flights: Flight, sent: threading.Event | None = None) -> None:
        """Forget these flights: their results and staged payloads are deleted (best effort:
        a broker that is away lets them expire); ``sent`` is set once the delete is on its way
        (``Broker.discard``)."""
        refs: list[str] = []
        with self._lock:
            for flight in flights:
                with contextlib.suppress(ValueError):
                    self._live.remove(flight)
                refs.extend(flight.payloads)
                for kept in flight.payloads.values():
                    if isinstance(kept, KeptPayload):
                        kept.close()
                flight.payloads = {}
                with self._pushed_lock:
                    for task_id in flight.task_ids:
                        self._awaited.discard(task_id)
                        self._pushed.pop(task_id, None)
        self.broker.discard([task_id for f in flights for task_id in f.task_ids], refs,
                            sent=sent)  # fmt: skip

    def interrupt(self) -> None:
        """Stop waiting for the broker, now and from now on: the work is being given up."""
        self._interrupted.set()

    def revive(self, grace_s: float) -> None:
        """Wait for the broker again, up to ``grace_s`` (cleaning up after a failure)."""
        with self._lock:
            self._interrupted.clear()
            self._gone = None
            self.grace_s = min(self.grace_s, grace_s)

    # --- following flights ------------------------------------------------------------------

    def _take_pushed(self, task_id: str, raw: bytes) -> None:
        """A state a worker stored (``Broker.watch_results``'s thread): kept if it is one of
        ours, for the next poll."""
        with self._pushed_lock:
            if task_id in self._awaited:
                self._pushed[task_id] = raw

    def _settle_pushed(self) -> None:
        """Take in the states pushed since the last look (no round trip to the broker)."""
        with self._pushed_lock:
            pushed, self._pushed = self._pushed, {}
        for flight in self._live:
            if not flight.answered:
                states = [(i, self.broker.decode_state(pushed[i]))
                          for i in flight.task_ids if i in pushed]  # fmt: skip
                if states:
                    self._settle(flight, states)

    def _all_pushed(self) -> bool:
        """Whether every unanswered flight has its answers pushed (its first copy published
        after the result subscription was confirmed)."""
        watch = self._watch
        return watch is not None and all(
            f.answered or watch.covers(f.publishing_at) for f in self._live
        )

    def _refresh(self) -> None:
        if self._identity is None:
            # Asked as the broker connected, answered by now (a broker fault is waited out by
            # the caller, ``_guarded``, which reads the identity afresh).
            self._identity = self.broker.identity_at_connect() or self.broker.identity()
            self._identity_at = time.monotonic()
        now = time.monotonic()
        pending = [f for f in self._live if not f.answered]
        for flight in pending:
            if flight.epoch != self._epoch:
                self._send(flight, first=False)
        ids = [task_id for f in pending for task_id in f.task_ids]
        if now - self._identity_at >= IDENTITY_EVERY_S:
            # Read with the states (one round trip where the broker allows): a restart seen
            # here sends the unconfirmed flights again at the next refresh.
            found, identity = self.broker.states_and_identity(ids)
            self._take_identity(identity, now)
        else:
            found = self.broker.states(ids)
        states = dict(zip(ids, found, strict=True))
        suspects = []
        for flight in pending:
            self._settle(flight, [(i, states[i]) for i in flight.task_ids if i in states])
            if flight.answered:
                continue
            age = now - flight.sent_at
            if flight.timeout_s is not None and now - flight.first_sent_at > flight.timeout_s:
                self._answer(flight, NoWorkerAvailable(
                    f"no worker finished {flight.what} within {flight.timeout_s:.0f} s: "
                    f"{START_WORKER_HINT}"
                ))  # fmt: skip
            elif age > flight.resend_after_s:
                self._resend(flight, f"not confirmed after {age:.0f} s")
            elif age > self._after(flight.task, SUSPECT_FLOOR_S, SUSPECT_FACTOR):
                suspects.append(flight)
        if suspects and now - self._probed_at >= PROBE_EVERY_S:
            self._probe(suspects)

    def _settle(self, flight: Flight, states: list[tuple[str, TaskState]]) -> None:
        error: BaseException | None = None
        for task_id, state in states:
            if state.status == "SUCCESS":
                self._record(flight)
                self._answer(flight, state.result)
                return
            if state.status == "STARTED":
                flight.worker = state.worker
            if state.done and task_id not in flight.failed_ids:
                flight.failed_ids.add(task_id)
                error = _error_of(state, flight.what)
                if isinstance(error, StagedPayloadMissing | BrokerUnreachable) and (
                    flight.lost_copies < MAX_LOST_COPIES
                ):
                    flight.lost_copies += 1
                    self._resend(flight, f"lost by its worker ({error})", restage=True)
                    return
        if error is not None and flight.failed_ids >= set(flight.task_ids):
            self._answer(flight, error)

    def _probe(self, suspects: list[Flight]) -> None:
        """Find out whether the suspects are still held by a live worker or waiting in their
        queue; send again those that are neither (lost with a worker)."""
        self._probed_at = time.monotonic()
        queues = sorted({f.queue for f in suspects if isinstance(f.queue, str)})
        # The queue first: a task taken from it in between shows up with its worker next.
        waiting = self.broker.queued(queues)
        holders = self.broker.holders([i for f in suspects for i in f.task_ids], PROBE_TIMEOUT_S)
        held = set().union(*holders.values()) if holders else set()
        now = time.monotonic()
        for flight in suspects:
            if held.intersection(flight.task_ids):
                continue
            age = now - flight.sent_at
            if flight.worker is not None and flight.worker not in holders:
                self._resend(flight, f"lost with worker '{flight.worker}', gone from the broker")
            elif waiting is not None and isinstance(flight.queue, str):
                if not waiting.intersection(flight.task_ids):
                    self._resend(flight, "neither queued nor held by a live worker")
            elif holders and age > self._after(flight.task, STRAY_FLOOR_S, STRAY_FACTOR):
                self._resend(flight, f"held by no live worker for {age:.0f} s")

    def _take_identity(self, identity: tuple[str, ...], now: float) -> None:
        self._identity_at = now
        if self._identity is not None and identity != self._identity:
            self._new_epoch(f"broker '{_shown(self.broker.url)}' was restarted or replaced")
        self._identity = identity

    # --- sending ------------------------------------------------------------------------------

    def _send(self, flight: Flight, *, first: bool, restage: bool = True) -> None:
        task_id = self._stage_and_publish(flight, restage=restage)
        self._sent(flight, task_id, first=first, epoch=self._epoch)

    def _stage_and_publish(self, flight: Flight, *, restage: bool) -> str:
        """Send one copy, the flight's payloads staged with it (``restage``): its task id. No
        bookkeeping: callers record the copy with ``_sent``."""
        payloads = None
        if restage and flight.payloads:
            payloads = {ref: _payload_bytes(kept) for ref, kept in flight.payloads.items()}
        if not flight.publishing_at:
            flight.publishing_at = time.monotonic()
        # Awaited before it is published: a worker may store its answer before the publish
        # returns, and a pushed answer for an id not awaited is dropped.
        task_id = uuid.uuid4().hex
        with self._pushed_lock:
            self._awaited.add(task_id)
        try:
            return self.broker.send(
                flight.task, flight.argument, flight.queue, label=flight.label,
                expires_s=_expiry(flight), payloads=payloads, payload_ttl_s=self._ttl_s,
                task_id=task_id,
            )  # fmt: skip
        except BaseException:
            with self._pushed_lock:
                self._awaited.discard(task_id)
            raise

    def _sent(self, flight: Flight, task_id: str, *, first: bool, epoch: int) -> None:
        now = time.monotonic()
        flight.task_ids.append(task_id)
        flight.sent_at = now
        if first:
            flight.first_sent_at = now
        flight.epoch = epoch
        flight.worker = None

    def _resend(self, flight: Flight, why: str, *, restage: bool = False) -> None:
        log.warning("%s %s (attempt %d): sending it again", flight.what, why,
                    len(flight.task_ids))  # fmt: skip
        self._send(flight, first=False, restage=restage)
        self.resent += 1

    def _answer(self, flight: Flight, outcome: Any) -> None:
        flight.answered, flight.outcome = True, outcome

    # --- the broker going away ----------------------------------------------------------------

    def _guarded(self, action: Callable[[], _T]) -> _T:
        """Run ``action``; while the broker is away, wait for it (``grace_s``) and run it again."""
        while True:
            epoch = self._epoch
            try:
                return action()
            except BrokerUnreachable as exc:
                if self._gone is not None or self._interrupted.is_set():
                    raise
                if self._epoch == epoch:
                    self._await_broker(exc)

    def _await_broker(self, error: BrokerUnreachable) -> None:
        """Return once the broker answers again; raise ``error`` after ``grace_s``."""
        if self.grace_s > 0:
            log.warning("%s: waiting up to %.0f s for it to come back", error, self.grace_s)

        def answers() -> bool:
            nonlocal error
            try:
                self.broker.ping()
                self._identity = self.broker.identity()
            except BrokerUnreachable as exc:
                error = exc
                return False
            return True

        # Paused first: the call that failed has just tried. BROKER_POLL_S between pings.
        if wait_until(answers, timeout_s=self.grace_s, first_s=BROKER_POLL_S, pause_first=True,
                      interrupt=self._interrupted):  # fmt: skip
            self._identity_at = time.monotonic()
            self._new_epoch(f"broker '{_shown(self.broker.url)}' answers again")
            return
        self._gone = error
        raise error

    def _new_epoch(self, why: str) -> None:
        self._epoch += 1
        unanswered = sum(1 for f in self._live if not f.answered)
        if unanswered:
            log.warning("%s: sending %d unconfirmed task(s) again", why, unanswered)
            self.resent += unanswered
        else:
            log.info("%s", why)

    # --- what is usual ------------------------------------------------------------------------

    def _record(self, flight: Flight) -> None:
        took = time.monotonic() - flight.sent_at
        self._durations.setdefault(flight.task, deque(maxlen=32)).append(took)

    def _after(self, task: str, floor_s: float, factor: float) -> float:
        durations = self._durations.get(task)
        return max(floor_s, factor * statistics.median(durations)) if durations else floor_s


class CeleryRunner:
    """Runs units of work on the Celery workers (``coordinator.runner.Runner``): ``Flights``
    over ``broker``, each unit to ``queue``, sent again after ``resend_after_s`` unanswered,
    its request stamped with the storage location the command was told (``storage_url``,
    ``storage.urls.storage_url`` form; None: the workers' own), so that a worker storing
    elsewhere refuses it (``workers.location``).

    A broker that goes away is waited for up to ``grace_s``; staged payloads nobody deleted
    expire after ``payload_ttl_s``. Each command says why its values are what they are.
    """

    def __init__(
        self,
        broker: Broker,
        queue: str,
        *,
        storage_url: str | None,
        grace_s: float,
        payload_ttl_s: int,
        resend_after_s: float,
    ) -> None:
        self.broker = broker
        self.flights = Flights(broker, grace_s=grace_s, payload_ttl_s=payload_ttl_s,
                               watch_results=True)  # fmt: skip
        self.queue = queue
        self.storage_url = storage_url
        self.resend_after_s = resend_after_s
        self._cleanup: ThreadPoolExecutor | None = None
        self._cleanup_lock = threading.Lock()
        # One per clean-up handed to ``_cleanup``: set once its deletes are on their way.
        self._cleanups_sent: list[threading.Event] = []

    @property
    def resent(self) -> int:
        return self.flights.resent

    def start(
        self,
        task: str,
        request: StorageBound,
        what: str,
        payloads: Mapping[str, bytes] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Handle:
        bound = self.bound(request)
        flight = Flight(
            task, bound.model_dump(), self.queue, what, dict(payloads or {}),
            label=bound.summary(), resend_after_s=self.resend_after_s, timeout_s=timeout_s,
        )  # fmt: skip
        return _FlightHandle(self.flights, self.flights.start(flight))

    def release(self, handles: Iterable[Handle], *, wait: bool = False) -> None:
        """Forget these units, on a thread of their own unless ``wait``: deleting their results
        and payloads is a round trip to the broker that nothing waits for (they expire
        anyway), and with the broker 50 ms away each unit waited for in turn (claim, open,
        finalize) paid it. Units given up on are released with ``wait``: their payloads
        are gone before the abort that follows is sent, so no worker uploads one after it."""
        flights = [h.flight for h in handles if isinstance(h, _FlightHandle)]
        if not flights:
            return
        if wait:
            self._finish(flights)
            return
        sent = threading.Event()
        with self._cleanup_lock:
            if self._cleanup is None:
                self._cleanup = ThreadPoolExecutor(1, thread_name_prefix="broker-cleanup")
            self._cleanups_sent = [e for e in self._cleanups_sent if not e.is_set()] + [sent]
            self._cleanup.submit(self._finish, flights, sent)

    def _finish(self, flights: list[Flight], sent: threading.Event | None = None) -> None:
        try:
            self.flights.finish(*flights, sent=sent)
        except Exception:
            log.debug("forgetting finished units failed", exc_info=True)
        finally:
            if sent is not None:
                sent.set()

    def interrupt(self) -> None:
        self.flights.interrupt()

    def revive(self, grace_s: float) -> None:
        self.flights.revive(grace_s)

    def bound(self, request: StorageBound) -> StorageBound:
        """The request as sent: with the storage location this command was told, if any."""
        if self.storage_url is not None:
            request = request.model_copy(update={"storage_url": self.storage_url})
        return request

    def close(self) -> None:
        """Send the clean-up of released units, then close the broker's connections.

        The deletes are waited for until they are written, not until Redis answers them:
        with the broker 50 ms away, the answer to the last one (the finalize's result and
        payloads) held every backup's exit for a round trip. Closing the connections ends the
        wait of the clean-up thread for those answers.
        """
        with self._cleanup_lock:
            cleanup, self._cleanup = self._cleanup, None
            sent, self._cleanups_sent = self._cleanups_sent, []
        for event in sent:
            event.wait()
        self.broker.close()
        if cleanup is not None:
            cleanup.shutdown(wait=True)


class _FlightHandle:
    """A unit sent to the workers (``coordinator.runner.Handle``)."""

    def __init__(self, flights: Flights, flight: Flight) -> None:
        self.flights = flights
        self.flight = flight
        self.what = flight.what

    def done(self) -> bool:
        return self.flights.poll(self.flight)

    def result(self) -> Any:
        return self.flight.result()

    def shorten(self, seconds: float) -> None:
        flight = self.flight
        limit = time.monotonic() - flight.first_sent_at + seconds
        flight.timeout_s = limit if flight.timeout_s is None else min(flight.timeout_s, limit)


class KeptPayload:
    """The copy of a staged payload that the coordinator keeps until its flight is answered,
    to stage it again should the broker lose it: in an unnamed temporary file, not in memory.

    Without it the coordinator held every unconfirmed part twice over with Redis (8 parts of
    16 MiB: 128 MB of its 227 MB peak on the prod backup). The file is unlinked at creation
    and closed when the flight is finished; its pages are the page cache's, written to disk
    only if a part stays unconfirmed longer than the kernel's dirty expiry (30 s by default),
    and dropped unwritten otherwise. Read back only to stage the payload again, which is rare.
    """

    def __init__(self, data: bytes) -> None:
        self.size = len(data)
        self._file = tempfile.TemporaryFile(prefix="cloud-dump-payload-")  # noqa: SIM115
        try:
            self._file.write(data)
            self._file.flush()  # a write error shows here, where _keep can fall back
        except BaseException:
            self._file.close()
            raise

    def read(self) -> bytes:
        self._file.seek(0)
        data = self._file.read()
        if len(data) != self.size:  # the worker checks the SHA-256 too
            raise OSError(f"kept payload is {len(data)} bytes, not {self.size}")
        return data

    def close(self) -> None:
        self._file.close()


# Payloads smaller than this stay in memory (claims, manifests): a file per small payload
# would cost more than it saves.
KEEP_IN_FILE_BYTES = 1024 * 1024
_kept_in_memory_warned = False


def _keep(flight: Flight) -> None:
    """Move the flight's large payloads into files (``KeptPayload``); in memory as before when
    no temporary file can be written (warned once)."""
    global _kept_in_memory_warned
    for ref, data in list(flight.payloads.items()):
        if isinstance(data, bytes) and len(data) >= KEEP_IN_FILE_BYTES:
            try:
                flight.payloads[ref] = KeptPayload(data)
            except OSError as exc:
                if not _kept_in_memory_warned:
                    log.warning("keeping unconfirmed parts in memory: no temporary file (%s)", exc)
                    _kept_in_memory_warned = True


def _expiry(flight: Flight) -> float | None:
    """How long a copy may wait for a worker: at most until the flight is given up on.

    A flight with a ``timeout_s`` is answered ``NoWorkerAvailable`` once that has passed; a copy
    still queued then must not run later, when a worker comes up: a claim that ran after its
    backup gave up held the name until ``cleanup`` removed it. Celery drops a copy a worker
    receives past its expiry (a time by the coordinator's clock, compared with the worker's).
    """
    if flight.timeout_s is None:
        return flight.expires_s
    waited_s = time.monotonic() - flight.first_sent_at if flight.task_ids else 0.0
    remaining_s = max(1.0, flight.timeout_s - waited_s)
    return remaining_s if flight.expires_s is None else min(flight.expires_s, remaining_s)


def _payload_bytes(kept: bytes | KeptPayload) -> bytes:
    return kept.read() if isinstance(kept, KeptPayload) else kept


def _error_of(state: TaskState, what: str) -> BaseException:
    """A failed copy's error as a project error: the worker's own, re-created by Celery."""
    if state.status == "REVOKED":
        return NoWorkerAvailable(f"no worker took {what} in time: {START_WORKER_HINT}")
    if isinstance(state.result, CloudDumpError):
        return state.result
    if isinstance(state.result, BaseException) and is_library_broker_fault(state.result):
        # The worker lost the broker (Redis restarted under it): a copy lost, sent again.
        return BrokerUnreachable(f"{what}: its worker lost the broker: {state.result}")
    return RemoteTaskFailed(f"{what} failed on a worker: {state.result}")


def _shown(url: str) -> str:
    return redact_url(url)


def run_on_worker(
    broker: Broker | Celery, worker: str, task_name: str, timeout_s: float, argument: Any = None
) -> Any:
    """Run ``task_name`` on one named worker and return its result; ``argument`` (JSON-able) is
    its one argument, None for none."""
    flights = Flights(_as_broker(broker), grace_s=timeout_s)
    flight = Flight(
        task_name,
        argument,
        worker_direct(worker),
        f"'{task_name}' on '{worker}'",
        label=f"worker={worker}",
        timeout_s=timeout_s,
        expires_s=timeout_s,
    )
    return flights.run(flight)
