"""What the coordinator's connections to the broker say when they open: only what the URL asks
for (``AUTH`` for its password), not redis-py 8's own handshake (``HELLO 3``, ``CLIENT SETINFO``
twice, maintenance notifications), which costs a round trip apiece on every connection and
made a backup with the broker 50 ms away half a second slower (``tasks.redistransport``).

A private ``redis-server`` with a password, so that every connection it sees is this test's,
and the results and staged payloads one unit leaves are deleted in one round trip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from coordinator.broker.client import open_broker
from coordinator.broker.flights import CeleryRunner, _FlightHandle
from coordinator.wait import wait_until
from tasks.config import PARTS_QUEUE, make_app
from tests.coordinator.broker.test_broker_faults import PASSWORD, OwnRedis
from workers.backup import OpenArchiveRequest
from workers.staging import stage_key


def test_every_connection_of_the_coordinator_opens_without_redis_py_handshakes(
    tmp_path: Path,
) -> None:
    server = OwnRedis(tmp_path)
    try:
        checker = redis.Redis(port=server.port, password=PASSWORD, protocol=2)
        errors_before = checker.info("errorstats")  # the start-up's own probes
        broker = open_broker(server.url)
        broker.send("cloud_dump.no_such_task", None, PARTS_QUEUE, label="handshake test")
        broker.stage.put_many({"r1": b"one", "r2": b"two"}, 60)
        staged = checker.mget([stage_key("r1"), stage_key("r2")])
        broker.discard([], ["r1", "r2"])
        left = checker.exists(stage_key("r1"), stage_key("r2"))
        commands = checker.info("commandstats")
        errors = checker.info("errorstats")
        clients = checker.client_list()
        broker.close()
        checker.close()
    finally:
        server.stop()

    assert staged == [b"one", b"two"] and left == 0
    # Opened: our Redis clients, kombu's connections (its channel's PING, the task sent), the
    # checker's. No HELLO, and no command refused (a Redis 7.0 refuses
    # CLIENT SETINFO and CLIENT MAINT_NOTIFICATIONS: each is an error counted here).
    assert len(clients) >= 3, clients
    assert "cmdstat_hello" not in commands, sorted(commands)
    # No PING: kombu's channel opens its connection without one, and redis-py's health check
    # before a connection's first command is left out (ClientTransport).
    assert "cmdstat_ping" not in commands, commands["cmdstat_ping"]
    assert errors == errors_before, (errors, commands)
    assert {client["resp"] for client in clients} == {"2"}, clients


def test_a_message_and_its_payloads_go_in_one_transaction_and_no_queue_is_declared(
    tmp_path: Path,
) -> None:
    """With payloads and messages in one Redis database, a unit's payloads are staged in the
    ``MULTI``/``EXEC`` that delivers its message: a worker cannot take the message before
    them, and it costs one round trip, not two. Nothing is declared: the workers declare the
    queues they consume, and the message goes to the list of the queue's name."""
    server = OwnRedis(tmp_path)
    try:
        checker = redis.Redis(port=server.port, password=PASSWORD, protocol=2)
        broker = open_broker(server.url)
        before = checker.info("commandstats")
        task_id = broker.send("cloud_dump.no_such_task", None, PARTS_QUEUE, label="one trip",
                              payloads={"p1": b"x" * 3_000_000, "p2": b"y"},
                              payload_ttl_s=60)  # fmt: skip
        after = checker.info("commandstats")
        staged = checker.mget([stage_key("p1"), stage_key("p2")])
        ttl = checker.ttl(stage_key("p1"))
        queued = checker.lrange(PARTS_QUEUE, 0, -1)
        keys = checker.keys("*")
        broker.close()
        checker.close()
    finally:
        server.stop()

    def calls(command: str) -> int:
        return int(after.get(f"cmdstat_{command}", {}).get("calls", 0)) - int(
            before.get(f"cmdstat_{command}", {}).get("calls", 0)
        )

    assert staged == [b"x" * 3_000_000, b"y"] and 0 < ttl <= 60
    assert [json.loads(m)["headers"]["id"] for m in queued] == [task_id]
    assert (calls("multi"), calls("exec"), calls("set"), calls("lpush")) == (1, 1, 2, 1), after
    assert calls("sadd") == 0 and not [k for k in keys if "_kombu.binding" in str(k)], keys


def test_payloads_in_another_redis_database_are_staged_before_the_message(
    tmp_path: Path,
) -> None:
    """A staging URL other than the broker's: the payloads are staged first, on their own."""
    server = OwnRedis(tmp_path)
    try:
        staging = server.url.rsplit("/", 1)[0] + "/3"
        checker = redis.Redis(port=server.port, password=PASSWORD, protocol=2, db=3)
        broker = open_broker(server.url, staging_url=staging)
        broker.send("cloud_dump.no_such_task", None, PARTS_QUEUE, label="two trips",
                    payloads={"p1": b"z"}, payload_ttl_s=60)  # fmt: skip
        staged = checker.get(stage_key("p1"))
        broker.close()
        checker.close()
    finally:
        server.stop()
    assert staged == b"z"


def test_a_closed_runner_has_deleted_the_payloads_and_results_of_its_last_units(
    tmp_path: Path,
) -> None:
    """``CeleryRunner.close`` waits for the last clean-up to be written, not answered (a round
    trip less at every command's exit with the broker far away): Redis still carries it out,
    though the connection it came on is closed by then."""
    server = OwnRedis(tmp_path)
    try:
        checker = redis.Redis(port=server.port, password=PASSWORD, protocol=2)
        runner = CeleryRunner(open_broker(server.url), PARTS_QUEUE, storage_url=None,
                              grace_s=5, payload_ttl_s=600, resend_after_s=600)  # fmt: skip
        handle = runner.start("cloud_dump.no_such_task", OpenArchiveRequest(key="b1/base.tar"),
                              "a unit", {"p1": b"payload"})  # fmt: skip
        assert isinstance(handle, _FlightHandle)
        (task_id,) = handle.flight.task_ids
        result_key = f"celery-task-meta-{task_id}"
        checker.set(result_key, json.dumps({"status": "SUCCESS", "result": None,
                                            "task_id": task_id}))  # fmt: skip
        assert checker.exists(stage_key("p1"), result_key) == 2
        runner.release([handle])
        runner.close()
        assert wait_until(lambda: checker.exists(stage_key("p1"), result_key) == 0,
                          timeout_s=30, first_s=0.001)  # fmt: skip
        checker.close()
    finally:
        server.stop()


def test_only_plain_redis_urls_get_the_quiet_transport() -> None:
    """``rediss://`` keeps kombu's own transport: kombu sets up TLS from the scheme's name."""
    assert make_app("redis://127.0.0.1:1/0").conf.broker_transport == (
        "tasks.redistransport:Transport"
    )
    assert make_app("redis://127.0.0.1:1/0", client=True).conf.broker_transport == (
        "tasks.redistransport:ClientTransport"
    )
    assert make_app("rediss://127.0.0.1:1/0").conf.broker_transport is None
    assert make_app("rediss://127.0.0.1:1/0", client=True).conf.broker_transport is None


def test_states_and_identity_read_together_see_a_restarted_redis(tmp_path: Path) -> None:
    """The flights' once-a-second identity check rides on their MGET (one round trip): it
    answers what ``states`` and ``identity`` answer apart, and a restarted Redis shows."""
    server = OwnRedis(tmp_path)
    try:
        broker = open_broker(server.url)
        task_id = broker.send("cloud_dump.no_such_task", None, PARTS_QUEUE, label="states test")
        checker = redis.Redis(port=server.port, password=PASSWORD, protocol=2)
        checker.set(
            f"celery-task-meta-{task_id}",
            json.dumps({"status": "SUCCESS", "result": "done", "traceback": None,
                        "children": [], "date_done": None, "task_id": task_id}),
        )  # fmt: skip
        before = checker.info("commandstats")
        states, identity = broker.states_and_identity([task_id, "unknown"])
        after = checker.info("commandstats")
        assert [(s.status, s.result) for s in states] == [("SUCCESS", "done"), ("PENDING", None)]
        assert identity == broker.identity() == broker.identity_at_connect()

        def calls(stats: dict[str, Any], command: str) -> int:
            return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

        assert calls(after, "mget") == calls(before, "mget") + 1
        assert calls(after, "info") == calls(before, "info") + 2  # its INFO, and mine
        checker.close()

        server.kill()
        server.start()
        _, restarted = broker.states_and_identity([task_id])
        assert restarted != identity
        broker.close()
    finally:
        server.stop()
