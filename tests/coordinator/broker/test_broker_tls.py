"""A ``rediss://`` broker's certificate is verified, by kombu's connections as by the result
backend's and our own Redis clients: the broker's password never goes to a server that could
not prove who it is. A private CA is trusted the standard OpenSSL way, ``SSL_CERT_FILE``.

Against a real TLS-only ``redis-server`` whose certificate a private CA signed
(``devrig.tlsredis``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import redis

from devrig.services import VENV_BIN, error_line, run_cli, start_worker_pool
from devrig.tlsredis import TlsRedis
from tasks.config import make_app
from workers.staging import quiet_connection_kwargs


def _connect_everything(url: str, client: bool) -> None:
    app = make_app(url, client=client)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=0)
        connection.default_channel.client.ping()
    app.backend.client.ping()
    redis.Redis.from_url(url, **quiet_connection_kwargs()).ping()


@pytest.mark.parametrize("client", [True, False], ids=["command", "worker"])
def test_a_trusted_certificate_connects(
    tls_redis: TlsRedis, monkeypatch: pytest.MonkeyPatch, client: bool
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_redis.ca_file))
    _connect_everything(tls_redis.url, client)


@pytest.mark.parametrize("client", [True, False], ids=["command", "worker"])
def test_an_unverifiable_certificate_is_refused_by_every_connection(
    tls_redis: TlsRedis, monkeypatch: pytest.MonkeyPatch, client: bool
) -> None:
    # The system's CAs do not include the test CA: no connection may go on regardless.
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    app = make_app(tls_redis.url, client=client)
    with pytest.raises(Exception) as raised, app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=0)
    assert "certificate verify failed" in _chain(raised.value)
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        app.backend.client.ping()
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(tls_redis.url, **quiet_connection_kwargs()).ping()


def _chain(exc: BaseException) -> str:
    """Every message of an exception and its causes (kombu wraps redis-py's error)."""
    messages = []
    current: BaseException | None = exc
    while current is not None:
        messages.append(str(current))
        current = current.__cause__ or current.__context__
    return " | ".join(messages)



def test_the_command_says_the_certificate_did_not_verify_and_exits_6(
    tls_redis: TlsRedis, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUD_DUMP_", "SSL_CERT"))}
    (tmp_path / "store").mkdir()
    store = f"file://{tmp_path}/store"
    done = subprocess.run(
        [str(VENV_BIN / "cloud-dump"), "check", "--storage", store, "--broker", tls_redis.url,
         "--timeout", "10"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 6, done.stderr
    assert "certificate verify failed" in error_line(done.stderr)


def test_workers_and_a_command_work_over_a_verified_tls_broker(
    tls_redis: TlsRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a worker's result backend refused a rediss:// URL outright, and kombu went on
    # unverified. Here every worker proves its path to storage through the TLS broker.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_redis.ca_file))
    (tmp_path / "store").mkdir()
    store = f"file://{tmp_path}/store"
    pool = start_worker_pool(tls_redis.url, {"CLOUD_DUMP_STORAGE": store, "SSL_CERT_FILE":
                             str(tls_redis.ca_file)}, count=1, queues="parts,wal",
                             log_dir=tmp_path)  # fmt: skip
    try:
        done = run_cli("check", "--storage", store, "--broker", tls_redis.url, "--timeout", "60")
    finally:
        pool.stop()
    assert done.returncode == 0, done.stderr
