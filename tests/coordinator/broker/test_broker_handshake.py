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
from tasks.config import PARTS_QUEUE, make_app
from tests.coordinator.broker.test_broker_faults import PASSWORD, OwnRedis
from workers.staging import stage_key


def test_every_connection_of_the_coordinator_opens_without_redis_py_handshakes(
    tmp_path: Path,
) -> None:
    server = OwnRedis(tmp_path)
    try:
        checker = redis.Redis(port=server.port, password=PASSWORD, protocol=2)
        errors_before = checker.info("errorstats")  # the start-up's own probes
        broker = open_broker(server.url, queues=(PARTS_QUEUE,))
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
    # Opened: our Redis clients, kombu's connections (its channel's PING, the queue declared,
    # the task sent), the checker's. No HELLO, and no command refused (a Redis 7.0 refuses
    # CLIENT SETINFO and CLIENT MAINT_NOTIFICATIONS: each is an error counted here).
    assert len(clients) >= 3, clients
    assert "cmdstat_hello" not in commands, sorted(commands)
    # One PING: kombu's channel checks its connection once; redis-py's health check before a
    # connection's first command is left out (ClientTransport).
    assert commands["cmdstat_ping"]["calls"] == 1, commands["cmdstat_ping"]
    assert errors == errors_before, (errors, commands)
    assert {client["resp"] for client in clients} == {"2"}, clients


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
        broker = open_broker(server.url, queues=(PARTS_QUEUE,))
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
        assert identity == broker.identity() == broker.identity_at_connect

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
