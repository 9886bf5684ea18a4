"""Storage failing under a restore: a 5-second outage mid-download is ridden out (as a backup
rides out one), and a store that keeps throttling ends in exit 4 (try again later), not 5.

The outage is real: moto behind a TCP proxy (``devrig.tcpproxy``) that resets every connection
in the middle of the base archive's download and refuses new ones for 5 seconds. The throttling
store is a stub HTTP server answering every request with S3's ``503 SlowDown``, a failure moto
cannot be made to produce.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from coordinator.rangedread import RangedReader
from devrig import sample
from devrig.moto import MotoServer, s3_target
from devrig.postgres import PgFactory, make_postgres_dir
from devrig.procs import free_port
from devrig.restored import started
from devrig.roundtrip import backup_cli
from devrig.services import run_cli
from devrig.tcpproxy import TcpProxy
from storage.errors import StorageUnreachable
from storage.factory import open_storage
from storage.options import StorageOptions

OUTAGE_S = 5.0
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


def test_restore_rides_out_a_five_second_storage_outage_mid_download(
    pg_factory: PgFactory, moto_server: MotoServer, aws_env: dict[str, str], s3_bucket: str,
    s3_proxy: TcpProxy,
) -> None:
    cluster = pg_factory(15)
    tablespace = sample.populate(cluster, rows=500)
    expected = sample.digest(cluster.sql)
    backup_cli(cluster, s3_target(moto_server.endpoint, s3_bucket, aws_env), "b")

    through_proxy = s3_target(s3_proxy.endpoint, s3_bucket, aws_env)
    s3_proxy.cut_once(b"/b/base.tar", after_bytes=256 * 1024, outage_s=OUTAGE_S)
    pgdata = make_postgres_dir("cloud-dump-outage-") / "data"
    new_tablespace = make_postgres_dir("cloud-dump-outage-ts-")
    done = run_cli(
        "restore", "--name", "b", "--pgdata", str(pgdata),
        "--tablespace-mapping", f"{tablespace}={new_tablespace}",
        # Few attempts per request, as in a quick-failing setup: the restore's own retries
        # must be what carries it over the outage.
        env={**through_proxy.env, "CLOUD_DUMP_STORAGE_MAX_ATTEMPTS": "2"},
    )  # fmt: skip
    assert s3_proxy.cuts == 1, "the outage did not happen mid-restore"
    assert done.returncode == 0, done.stderr
    assert s3_proxy.outage_over.is_set()  # the restore outlasted the outage
    assert "retrying" in done.stderr
    with started(15, pgdata, new_tablespace) as restored:
        assert sample.digest(restored.sql) == expected


class _SlowDownHandler(http.server.BaseHTTPRequestHandler):
    def _slow_down(self) -> None:
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(SLOW_DOWN)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(SLOW_DOWN)

    do_GET = do_HEAD = do_PUT = do_POST = _slow_down

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def throttling_store() -> Iterator[str]:
    """An endpoint answering every request with 503 SlowDown."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _SlowDownHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_restore_from_a_store_that_keeps_throttling_exits_4_naming_slowdown(
    throttling_store: str, aws_env: dict[str, str], tmp_path: Path
) -> None:
    done = run_cli("restore", "--name", "b", "--pgdata", str(tmp_path / "data"),
                   "--storage", "s3://bucket/prefix", "--s3-endpoint", throttling_store,
                   "--storage-max-attempts", "2")  # fmt: skip
    assert done.returncode == ExitCode.STORAGE_UNREACHABLE, done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "SlowDown" in errors[0] and throttling_store in errors[0], errors
    assert not (tmp_path / "data").exists()


def test_ranged_read_retries_throttling_for_its_budget_then_gives_up(
    throttling_store: str, aws_env: dict[str, str]
) -> None:
    store = open_storage("s3://bucket/prefix",
                         StorageOptions(s3_endpoint=throttling_store, max_attempts=1))
    reader = RangedReader(store, "b/base.tar.zst", 1000, range_bytes=500, parallel=2,
                          retry_budget_s=1.5)
    with reader, pytest.raises(StorageUnreachable, match="SlowDown"):
        reader.read()
    store.close()
