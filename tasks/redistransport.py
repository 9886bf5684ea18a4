"""kombu's Redis transport, its connections opened without redis-py 8's extra handshake.

Every connection kombu opens to a ``redis://`` broker (the coordinator's producers, the
workers' consumers) gets ``workers.staging.quiet_connection_kwargs``: RESP2, no ``CLIENT
SETINFO``, no maintenance notifications. Three to four round trips fewer per connection, which
a broker 50 ms away turns into 150-200 ms before a backup's first task is sent. Nothing else
of the transport changes. ``tasks.config.make_app`` selects it for ``redis://`` URLs only:
``rediss://`` keeps kombu's own transport, whose TLS set-up depends on the scheme's name.

``ClientTransport``, for the coordinator's commands, also leaves out redis-py's health-check
``PING`` before a connection's first command (``health_check_interval`` 0 on its connections
only). A command's connections are fresh and busy; the check found nothing kombu's own error
handling would not (kombu's connections have no redis-py retry, so a failed check raises as
the command would), and cost a round trip on each of the two connections a first send opens.
The workers keep it: kombu's periodic checks of their long-lived pub/sub connection use it.
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


class ClientChannel(Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params = super()._connparams(asynchronous=asynchronous)
        if "health_check_interval" in params:  # kombu drops it for classes without it
            params["health_check_interval"] = 0
        return params


class ClientTransport(Transport):
    Channel = ClientChannel
