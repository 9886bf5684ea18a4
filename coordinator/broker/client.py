"""The coordinator's side of Celery: every call it makes to the broker goes through here.

The only coordinator module that imports Celery, kombu or redis (besides the Redis stage of
``workers.staging``). Three kinds of traffic, all to Redis:

- task messages, sent with Celery (``Broker.send``), and control broadcasts asking which
  workers are alive and what they run (``Broker.workers``, ``Broker.running``);
- task results, read with MGET and forgotten here with a plain Redis client. The coordinator's
  Celery app has no result backend: Celery's would subscribe to every task's result channel,
  and when Redis goes away its reconnect loop blocks for ~20 s and logs a line per attempt;
- staged payloads, through ``Broker.stage``.

Every call's connection failure leaves as ``BrokerUnreachable`` naming the broker (password
hidden), through the one translation, ``workers.brokerfaults``. ``Broker.identity`` tells one
Redis server run from the next (``INFO server``'s run_id): a restarted or failed-over Redis has
lost the messages, payloads and results it held even when no call failed
(``coordinator.broker.flights`` acts on it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.backends.base import KeyValueStoreBackend

from coordinator.wait import Backoff
from storage.errors import BrokerUnreachable, ConfigError, NoWorkerAvailable
from storage.redact import redact_url
from tasks.config import PARTS_QUEUE, WAL_QUEUE, make_app
from tasks.stagedmessage import staged_with_message
from workers.brokerfaults import broker_faults, broker_unreachable, is_broker_fault
from workers.staging import RedisStage, redis_client, stage_key

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

__all__ = [
    "START_WORKER_HINT",
    "Broker",
    "ResultWatch",
    "TaskState",
    "connect_broker",
    "live_workers",
    "open_broker",
    "require_queue_consumers",
]
REDIS_SCHEMES = ("redis", "rediss", "unix")
# Whatever a library does by default, a call to a Redis that is down must come back in seconds.
_CONNECT_TIMEOUT_S = 5
_READ_TIMEOUT_S = 30
_DONE = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
# Waiting messages read to tell a queued task from a lost one; a longer queue is not read.
QUEUE_SCAN_MAX = 1000
# The result watch: how long one wait for a message lasts (so that ``close`` is seen within
# it), and the pauses before subscribing again after a lost connection (doubling).
_WATCH_POLL_S = 1.0
_WATCH_RETRY_S = 0.5
_WATCH_RETRY_MAX_S = 30.0


@dataclass(frozen=True)
class TaskState:
    """What the result backend says about one task."""

    status: str  # PENDING (or unknown), STARTED, RETRY, SUCCESS, FAILURE, REVOKED
    result: Any  # SUCCESS: the return value; FAILURE: the exception Celery re-created
    worker: str | None = None  # STARTED: the node running it

    @property
    def done(self) -> bool:
        return self.status in _DONE


class Broker:
    """Task messages, results, control broadcasts and staged payloads, on one broker."""

    def __init__(self, broker_url: str, result_url: str, staging_url: str) -> None:
        for url in {result_url, staging_url}:
            _require_redis(url)
        self.url = broker_url
        # Sends only: no result backend, so Celery opens no result subscription (see above).
        self.app = make_app(broker_url, "disabled", client=True)
        self.stage = RedisStage(staging_url)
        self._result_url = result_url
        # Used offline only: the key a result is stored under, and decoding it (the worker's
        # own error re-created from its JSON form). Both are the key-value base class's, which
        # the workers' RedisBackend inherits; that class would import redis.asyncio (50 ms of
        # every command's start) for a connection it never opens here.
        self._decoder = KeyValueStoreBackend(app=self.app)
        urls = list(dict.fromkeys([broker_url, result_url, staging_url]))
        self._servers = {u: _client(u) for u in urls if _scheme(u) in REDIS_SCHEMES}
        # ``identity()`` as ``connect`` asked it (answered beside the first send): the flights'
        # first reference. None: not asked.
        self._identity_at_connect: concurrent.futures.Future[tuple[str, ...]] | None = None
        self._watches: list[ResultWatch] = []
        # Payloads go in the round trip of the message that refers to them when both live in
        # one Redis database and the coordinator's own transport delivers it
        # (``tasks.redistransport.ClientChannel``): the usual set-up.
        self._stage_with_message = _scheme(broker_url) == "redis" and staging_url == broker_url

    @classmethod
    def connect(
        cls,
        broker_url: str,
        result_backend: str | None = None,
        staging_url: str | None = None,
    ) -> Broker:
        """A broker that took a connection; ``BrokerUnreachable`` (exit 6) at once otherwise.

        Returns once the connection the first send will use is open. Every Redis in use is
        asked who it is (``identity``) on a thread meanwhile, and the first send does not wait
        for the answer (``identity_at_connect``): with the broker 50 ms away, each wait before
        the first send was a round trip more for every command.
        """
        broker = cls(broker_url, result_backend or broker_url, staging_url or broker_url)
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="broker-identity")
        broker._identity_at_connect = pool.submit(broker.identity)
        pool.shutdown(wait=False)
        try:
            broker._warm_producer()
        except BaseException:
            with contextlib.suppress(BaseException):
                broker._identity_at_connect.result()  # not left running past a failed connect
            raise
        return broker

    @property
    def asked_identity_at_connect(self) -> bool:
        """Whether ``connect`` asked the identity (``identity_at_connect`` then answers it)."""
        return self._identity_at_connect is not None

    def identity_at_connect(self) -> tuple[str, ...] | None:
        """``identity()`` as ``connect`` asked it, waited for (raises its error); None when
        this broker was not made by ``connect``.

        Asked beside the first send, not before it: a Redis replaced between the two answers
        (a window of a round trip at most, at the start of a command) goes unseen as such, and
        the flight sent to the server that went away is found lost by the flights' probe
        (``coordinator.broker.flights``: neither queued nor held) and sent again.
        """
        return None if self._identity_at_connect is None else self._identity_at_connect.result()

    def _warm_producer(self) -> None:
        """Open the connection of a producer of the app's pool (no command is sent:
        ``tasks.redistransport.ClientChannel``)."""
        with broker_faults(self.url), self.app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(
                max_retries=1, interval_start=0, timeout=_CONNECT_TIMEOUT_S
            )

    def send(
        self,
        task: str,
        argument: Any,
        queue: Any,
        *,
        label: str,
        expires_s: float | None = None,
        payloads: Mapping[str, bytes] | None = None,
        payload_ttl_s: int = 3600,
        task_id: str | None = None,
    ) -> str:
        """Send ``task(argument)`` (no argument if None) to ``queue`` (a name, or a kombu
        ``Queue`` such as a worker's direct queue), ``payloads`` (ref → bytes, expiring after
        ``payload_ttl_s``) staged before any worker can take it; return its task id
        (``task_id``, or a new one).

        ``label`` is what Flower and the workers' logs show as its arguments (Celery's
        ``argsrepr``, e.g. ``wal=000000010000000000000003 bytes=1234``): facts a person reads,
        in place of the JSON request. Keyword arguments are never sent (``kwargsrepr`` empty).

        A queue named by a string is not declared: the message goes to Redis's list of that
        name (kombu's default exchange), which the workers consume and declare themselves.
        Celery would declare it on every new connection, two round trips each.
        """
        task_id = task_id or uuid.uuid4().hex
        if payloads and not self._stage_with_message:
            self.stage.put_many(payloads, payload_ttl_s)
            payloads = None
        try:
            keyed = {stage_key(ref): data for ref, data in (payloads or {}).items()}
            with broker_faults(self.url), staged_with_message(keyed, payload_ttl_s) as staged:
                self.app.send_task(
                    task,
                    args=[] if argument is None else [argument],
                    queue=queue,
                    task_id=task_id,
                    expires=expires_s,
                    argsrepr=label,
                    kwargsrepr="",
                    **({"declare": []} if isinstance(queue, str) else {}),
                )
        except AttributeError as exc:
            if not _raised_in_kombu(exc):
                raise
            # kombu 5 may publish on a channel that a failed publish of another thread's
            # closed meanwhile (its Redis transport then reads the closed channel's
            # ``connection``: None). Seen after a broker restart, 2 runs in 12 of
            # tests/coordinator/broker/test_broker_faults.py: a lost connection like any
            # other, which the flights wait out and send again.
            lost = ConnectionError("its connection was closed while in use")
            raise broker_unreachable(self.url, lost) from exc
        if payloads and not staged.delivered:
            # Published without them (a transport that does not take them): staged now, and a
            # worker that was quicker fails the copy with StagedPayloadMissing, which the
            # flights send again.
            log.debug("task %s published apart from its payloads", task_id)
            self.stage.put_many(payloads, payload_ttl_s)
        return task_id

    def states(self, task_ids: list[str]) -> list[TaskState]:
        """The state of each task, in order, in one round trip."""
        if not task_ids:
            return []
        with broker_faults(self._result_url):
            raws = self._servers[self._result_url].mget(self._result_keys(task_ids))
        return [self.decode_state(raw) for raw in raws]

    def states_and_identity(
        self, task_ids: list[str]
    ) -> tuple[list[TaskState], tuple[str, ...]]:
        """``states`` and ``identity`` together: in one round trip when results, payloads and
        messages share one Redis (the usual set-up). With the broker 50 ms away the flights'
        once-a-second identity check otherwise cost the backup's stream a round trip apiece."""
        if len(self._servers) != 1 or not task_ids:
            return self.states(task_ids), self.identity()
        ((url, client),) = self._servers.items()
        with broker_faults(url):
            with client.pipeline(transaction=False) as pipe:
                pipe.mget(self._result_keys(task_ids))
                pipe.info("server")
                raws, info = pipe.execute(raise_on_error=False)
            if isinstance(raws, BaseException):
                raise raws
            run_id = _run_id(info)
        return [self.decode_state(raw) for raw in raws], (run_id,)

    def discard(
        self, task_ids: Sequence[str], refs: Sequence[str], *, sent: threading.Event | None = None
    ) -> None:
        """Delete the results of these tasks and the payloads staged under these refs; best
        effort, as both expire anyway. One round trip when results and payloads share a
        Redis (the usual set-up).

        ``sent`` is set once that delete is on its way to Redis, before its answer: a command
        that exits then need not wait for it (``flights.CeleryRunner.close``), as Redis
        carries out what it received from a client that has since closed its connection.
        """
        keys = self._result_keys(task_ids)
        if refs and self.stage.url == self._result_url:
            keys.extend(stage_key(ref) for ref in refs)
            refs = []
        if keys:
            with contextlib.suppress(Exception), broker_faults(self._result_url):
                _delete(self._servers[self._result_url], keys, None if refs else sent)
        if refs:
            try:
                self.stage.delete(*refs)
            except BrokerUnreachable as exc:
                log.debug("staged payloads left to expire: %s", exc)

    def watch_results(self, on_result: Callable[[str, bytes], None]) -> ResultWatch:
        """Results pushed to ``on_result(task_id, raw)`` as they are stored (``ResultWatch``);
        ``decode_state`` reads ``raw``. Stops when this broker is closed."""
        # The result client's pool: the subscription takes a connection of its own from it.
        # A result's key, hence its channel, is this prefix and the task id (bytes here, as
        # the key-value backend's keys: ``_result_keys``).
        prefix = self._decoder.task_keyprefix
        prefix = prefix if isinstance(prefix, bytes) else str(prefix).encode()
        watch = ResultWatch(self._servers[self._result_url], prefix, on_result)
        self._watches.append(watch)
        return watch

    def ping(self) -> None:
        """Raise ``BrokerUnreachable`` unless every Redis in use answers."""
        for url, client in self._servers.items():
            with broker_faults(url):
                client.ping()

    def identity(self) -> tuple[str, ...]:
        """Which Redis server runs answer (one run id per Redis in use)."""
        from redis.exceptions import ResponseError

        ids = []
        for url, client in self._servers.items():
            with broker_faults(url):
                try:
                    info: Any = client.info("server")
                except ResponseError as exc:
                    info = exc
                ids.append(_run_id(info))
        return tuple(ids)

    def workers(self, timeout_s: float = 2.0) -> dict[str, list[str]]:
        """Workers answering a broadcast, each with the queues it consumes."""
        with broker_faults(self.url):
            replies = self.app.control.inspect(timeout=timeout_s).active_queues() or {}
        return {
            worker: sorted(q["name"] for q in queues if not q["name"].endswith(".dq2"))
            for worker, queues in replies.items()
        }

    def holders(self, task_ids: list[str], timeout_s: float = 1.0) -> dict[str, set[str]]:
        """Workers answering a broadcast, each with those of ``task_ids`` it holds (running,
        received or scheduled for a retry)."""
        with broker_faults(self.url):
            replies = self.app.control.inspect(timeout=timeout_s).query_task(*task_ids) or {}
        return {worker: set(found or ()) for worker, found in replies.items()}

    def queued(self, queues: list[str]) -> set[str] | None:
        """The ids of the tasks waiting in these queues (no worker took them yet); None when
        that cannot be told (not a Redis broker, or a queue too long to read)."""
        client = self._servers.get(self.url)
        if client is None:
            return None
        ids: set[str] = set()
        with broker_faults(self.url):
            for queue in queues:
                # kombu's Redis transport: one list per queue, a JSON message per entry.
                messages = client.lrange(queue, 0, QUEUE_SCAN_MAX)
                if len(messages) > QUEUE_SCAN_MAX:
                    return None
                ids.update(_task_id(m) for m in messages)
        return ids

    def close(self) -> None:
        for watch in self._watches:
            watch.close()
        for client in self._servers.values():
            with contextlib.suppress(Exception):
                client.close()
        self.stage.close()

    def _result_keys(self, task_ids: Sequence[str]) -> list[Any]:
        """The keys these tasks' results are stored under."""
        return [self._decoder.get_key_for_task(i) for i in task_ids]

    def decode_state(self, raw: bytes | str | None) -> TaskState:
        """A task's state from what its result key holds (or what was published for it)."""
        if not raw:
            return TaskState("PENDING", None)
        meta = self._decoder.decode_result(raw)
        status, result = str(meta.get("status")), meta.get("result")
        started = status == "STARTED" and isinstance(result, dict)
        return TaskState(status, result, result.get("hostname") if started else None)


class ResultWatch:
    """Task results as the workers store them, pushed to this process as they land.

    Celery's Redis result backend publishes every state it stores on a channel named as the
    result's key (``celery.backends.redis.RedisBackend._set``: SET and PUBLISH in one
    pipeline). A pattern subscription to those channels hands each to ``on_result(task_id,
    raw)`` on a thread of its own: an answer is known half a round trip after a worker stored
    it, where polling with MGET took a whole one on average (the poll that sees it must reach
    Redis after the answer did, then come back; 50 ms with the broker 50 ms away, for each
    unit a command waits on).

    Polling stays the source of truth: a result stored before the subscription was in place,
    or while its connection was down, is not pushed. ``covers(publishing_at)`` says whether a
    task whose message was published after ``publishing_at`` (``time.monotonic()``) has its
    results pushed: the latest subscription was confirmed before then (redis-py subscribes
    again on a connection it re-opens, and that confirmation is the new reference). A Redis
    that refuses the subscription (an ACL user without channel permissions) leaves polling
    alone.
    """

    def __init__(
        self, client: Redis, key_prefix: bytes, on_result: Callable[[str, bytes], None]
    ) -> None:
        self._client = client
        self._key_prefix = key_prefix
        self._on_result = on_result
        self._subscribed_at: float | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._listen, name="broker-results", daemon=True).start()

    def covers(self, publishing_at: float) -> bool:
        subscribed_at = self._subscribed_at
        return subscribed_at is not None and publishing_at > subscribed_at

    def close(self) -> None:
        """Stop listening (at once when the client's connections are closed next, as
        ``Broker.close`` does; else within a second. The thread is a daemon: nothing waits
        for it)."""
        self._stop.set()

    def _listen(self) -> None:
        from redis.exceptions import ResponseError

        backoff = Backoff(_WATCH_RETRY_S, max_s=_WATCH_RETRY_MAX_S, factor=2, interrupt=self._stop)
        while not self._stop.is_set():
            try:
                self._listen_once()
            except ResponseError as exc:
                log.debug("results are not pushed (%s): polled alone", exc)
                return
            except Exception as exc:
                log.debug("result subscription lost (%r): polled until it is back", exc)
            finally:
                self._subscribed_at = None
            if not backoff.pause():
                return

    def _listen_once(self) -> None:
        pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.psubscribe(self._key_prefix + b"*")
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=_WATCH_POLL_S)
                if message is None:
                    continue
                if message["type"] == "psubscribe":
                    self._subscribed_at = time.monotonic()
                elif message["type"] == "pmessage":
                    channel = bytes(message["channel"])
                    task_id = channel[len(self._key_prefix) :].decode(errors="replace")
                    self._on_result(task_id, message["data"])
        finally:
            pubsub.close()


def _delete(client: Redis, keys: Sequence[Any], sent: threading.Event | None) -> None:
    """``DEL keys`` on a connection of ``client``'s pool; ``sent`` set once it is written."""
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_command("DEL", *keys)  # type: ignore[no-untyped-call]
        if sent is not None:
            sent.set()
        connection.read_response()
    except BaseException:
        # An answer half read must not meet the connection's next command.
        connection.disconnect()  # type: ignore[no-untyped-call]
        raise
    finally:
        pool.release(connection)


def _run_id(info: Any) -> str:
    """The run id in what ``INFO server`` answered (a dict, or the ``ResponseError`` it raised):
    "" when INFO is not allowed to this user (a restart then goes unseen); a broker fault (a
    failover in progress) or any other error is raised."""
    from redis.exceptions import ResponseError

    if isinstance(info, ResponseError) and not is_broker_fault(info):
        return ""
    if isinstance(info, BaseException):
        raise info
    return str(info.get("run_id", ""))


def _raised_in_kombu(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is kombu's code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "/kombu/" in tb.tb_frame.f_code.co_filename.replace("\\", "/")


def _task_id(message: bytes | str) -> str:
    try:
        return str(json.loads(message)["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return ""


def open_broker(
    broker_url: str,
    result_backend: str | None = None,
    staging_url: str | None = None,
) -> Broker:
    """``Broker.connect``: a broker that took a connection, ready to send."""
    return Broker.connect(broker_url, result_backend, staging_url)


def connect_broker(broker_url: str, result_backend: str | None = None) -> Celery:
    """A Celery client app whose broker answered; raise ``BrokerUnreachable`` otherwise.

    For callers that want Celery's own API (tests); cloud-dump's commands use ``open_broker``.
    """
    app = make_app(broker_url, result_backend)
    with broker_faults(broker_url), app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=_CONNECT_TIMEOUT_S)
    return app


def live_workers(broker: Broker | Celery, timeout_s: float = 2.0) -> dict[str, list[str]]:
    """Workers answering a broadcast ping, each with the queues it consumes."""
    return _as_broker(broker).workers(timeout_s)


def require_queue_consumers(workers: dict[str, list[str]]) -> None:
    """Raise unless at least one worker consumes each of the ``parts`` and ``wal`` queues."""
    if not workers:
        raise NoWorkerAvailable(f"no worker answered on the broker: {START_WORKER_HINT}")
    for queue in (PARTS_QUEUE, WAL_QUEUE):
        if not any(queue in queues for queues in workers.values()):
            raise NoWorkerAvailable(f"no worker consumes queue '{queue}': {START_WORKER_HINT}")


def _as_broker(target: Broker | Celery) -> Broker:
    if isinstance(target, Broker):
        return target
    conf = target.conf
    return Broker(str(conf.broker_url), str(conf.result_backend or conf.broker_url),
                  str(conf.broker_url))  # fmt: skip


def _require_redis(url: str) -> None:
    if _scheme(url) not in REDIS_SCHEMES:
        raise ConfigError(
            f"'{redact_url(url)}' is not a Redis URL: results and staged payloads need Redis "
            "(redis://, rediss:// or unix://)"
        )


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def _client(url: str) -> Redis:
    return redis_client(url, connect_timeout_s=_CONNECT_TIMEOUT_S, read_timeout_s=_READ_TIMEOUT_S)

START_WORKER_HINT = "start one with 'celery -A tasks.app worker -Q parts,wal'"
