"""What the coordinator's connections to the broker say when they open: only what the URL asks
for (``AUTH`` for its password), not redis-py 8's own handshake (``HELLO 3``, ``CLIENT SETINFO``
twice, maintenance notifications), which costs a round trip apiece on every connection and
made a backup with the broker 50 ms away half a second slower (``tasks.redistransport``).

A private ``redis-server`` with a password, so that every connection it sees is this test's,
and the results and staged payloads one unit leaves are deleted in one round trip.
"""

from __future__ import annotations

from pathlib import Path

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
    assert errors == errors_before, (errors, commands)
    assert {client["resp"] for client in clients} == {"2"}, clients


def test_only_plain_redis_urls_get_the_quiet_transport() -> None:
    """``rediss://`` keeps kombu's own transport: kombu sets up TLS from the scheme's name."""
    assert make_app("redis://127.0.0.1:1/0").conf.broker_transport == (
        "tasks.redistransport:Transport"
    )
    assert make_app("rediss://127.0.0.1:1/0").conf.broker_transport is None
