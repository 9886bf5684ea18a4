"""kombu's Redis transport, its connections opened without redis-py 8's extra handshake.

Every connection kombu opens to a ``redis://`` broker (the coordinator's producers, the
workers' consumers) gets ``workers.staging.quiet_connection_kwargs``: RESP2, no ``CLIENT
SETINFO``, no maintenance notifications. Three to four round trips fewer per connection, which
a broker 50 ms away turns into 150-200 ms before a backup's first task is sent. Nothing else
of the transport changes. ``tasks.config.make_app`` selects it for ``redis://`` URLs only:
``rediss://`` keeps kombu's own transport, whose TLS set-up depends on the scheme's name.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

from workers.staging import quiet_connection_kwargs


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]
        params.update(quiet_connection_kwargs())
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel
