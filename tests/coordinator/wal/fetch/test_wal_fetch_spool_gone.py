"""A prefetcher that outlives its data directory does not bring it back.

Found by an operator: the server stopped and PGDATA removed, the detached prefetcher still
wrote its next segment, re-creating ``PGDATA/pg_wal/cloud-dump/prefetch``, and the next restore
into that path was refused ("not empty"). The prefetcher is held inside a GET (a proxy in front
of the S3 server holds its traffic) while the directory goes, so the order is certain.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from coordinator.wait import wait_until
from devrig.moto import MotoServer, s3_target
from devrig.services import VENV_BIN
from devrig.tcpproxy import TcpProxy
from devrig.walarchive import archive_wal, prefetcher_pids, segment_name
from devrig.walfiles import SYSID_A, make_segment
from storage.layout import Layout

WAIT_S = 60


def _wait(condition: Callable[[], object], what: str) -> None:
    assert wait_until(condition, timeout_s=WAIT_S, first_s=0.05), what


def test_prefetcher_does_not_recreate_a_removed_data_directory(
    moto_server: MotoServer, aws_env: dict[str, str], s3_bucket: str, s3_proxy: TcpProxy,
    tmp_path: Path,
) -> None:
    direct = s3_target(moto_server.endpoint, s3_bucket, aws_env).open()
    for number in range(1, 5):
        name = segment_name(number)
        archive_wal(direct, Layout(), name, make_segment(SYSID_A, number, name))
    pgdata = tmp_path / "pgdata"
    (pgdata / "pg_wal").mkdir(parents=True)
    env = {**os.environ, **aws_env, "CLOUD_DUMP_STORAGE": f"s3://{s3_bucket}",
           "CLOUD_DUMP_S3_ENDPOINT": s3_proxy.endpoint, "CLOUD_DUMP_WAL_FETCH_RETRIES": "1"}
    s3_proxy.hold()
    call = subprocess.Popen(
        [str(VENV_BIN / "cloud-dump"), "wal-fetch", segment_name(1), "pg_wal/RECOVERYXLOG"],
        cwd=pgdata, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait(lambda: prefetcher_pids(pgdata), "no prefetcher started")
        prefetchers = prefetcher_pids(pgdata)
        shutil.rmtree(pgdata)  # the server stopped, the operator removes the copy
        s3_proxy.release()
        call.communicate(timeout=WAIT_S)
        _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in prefetchers),
              "the prefetcher did not stop")
    finally:
        s3_proxy.release()
        if call.poll() is None:
            call.kill()
    assert not pgdata.exists(), sorted(str(p) for p in pgdata.rglob("*"))
