"""``cloud-dump cleanup`` against a real backup: alive (its stream held, its heartbeats going on)
it is left alone with ``--older-than 0``; SIGKILLed, its claim, uploads and objects are removed
once its heartbeats stop, and the name can be used again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from coordinator.ops.cleanup import parse_age
from coordinator.wait import wait_until
from devrig.moto import local_target
from devrig.postgres import PgFactory
from devrig.services import VENV_BIN, run_cli
from devrig.tcpproxy import TcpProxy
from storage.errors import ConfigError

HEARTBEAT_S = "0.2"  # cleanup calls a claim dead after three missed: 0.6 s


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800),
                          ("0", 0), ("1.5h", 5400)],
)  # fmt: skip
def test_ages(text: str, seconds: float) -> None:
    assert parse_age(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "h", "24 hours", "-1h", "1w", "14", "90"])
def test_a_bad_age_is_refused(text: str) -> None:
    """A bare number too: '--recovery-window 14' read as seconds would expire nearly all."""
    with pytest.raises(ConfigError, match=r"--recovery-window '.*' is not an age"):
        parse_age(text, "--recovery-window")


def test_an_age_beyond_a_century_is_refused() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        parse_age("99999999999d")


def uploads(store: Path) -> list[str]:
    root = store / ".cloud-dump-uploads"
    return [p.name for p in root.iterdir() if not p.name.startswith(".")] if root.exists() else []


def cleanup(store: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    done = run_cli("cleanup", "--older-than", "0", *flags,
                   env={"CLOUD_DUMP_STORAGE": f"file://{store}"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def heartbeat_of(claim: Path) -> str | None:
    try:
        return str(json.loads(claim.read_text())["heartbeat_at"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def test_a_running_backup_is_left_alone_and_a_killed_one_is_cleaned_up(
    pg_factory: PgFactory, tmp_path: Path
) -> None:
    cluster = pg_factory(15)
    # ~70 MB uncompressed in 5 MiB parts: still streaming when the proxy holds it.
    cluster.sql(
        "CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 1000000) g"
    )
    store = tmp_path / "store"
    store.mkdir()
    target = local_target(store)
    proxy = TcpProxy(cluster.port)
    url = cluster.replication_url().replace(f":{cluster.port}/", f":{proxy.port}/")
    backup = subprocess.Popen(
        [str(VENV_BIN / "cloud-dump"), "backup", "--name", "b1", "--db-url", url,
         "--compression", "none", "--part-size-mib", "5", "--no-progress"],
        env={**os.environ, **target.env, "CLOUD_DUMP_HEARTBEAT_S": HEARTBEAT_S},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    claim = store / "b1" / "backup.claim"
    try:
        assert wait_until(lambda: uploads(store), timeout_s=60, first_s=0.01), "no upload opened"
        proxy.hold()  # the backup waits for its stream: alive, beating, going nowhere
        first = heartbeat_of(claim)
        if not wait_until(lambda: heartbeat_of(claim) != first, timeout_s=10, first_s=0.05):
            backup.kill()
            pytest.fail(f"no heartbeat: {claim.read_text()} {backup.communicate()}")

        done = cleanup(store)
        assert "nothing to clean up" in done.stdout, done.stdout
        assert claim.exists() and uploads(store)
        beat = heartbeat_of(claim)  # and it is still beating after cleanup looked
        assert wait_until(lambda: heartbeat_of(claim) != beat, timeout_s=30, first_s=0.05)

        backup.send_signal(signal.SIGKILL)
        backup.wait(timeout=30)
        dry = cleanup(store, "--dry-run")  # may still see it alive: only the next lines count

        def cleaned() -> bool:
            return "removed the claim" in cleanup(store).stdout

        assert wait_until(cleaned, timeout_s=30, first_s=0.2), "the dead backup stayed"
        assert "(dry run)" in dry.stdout or "nothing to clean up" in dry.stdout
        assert not (store / "b1").exists() and uploads(store) == []
        assert "nothing to clean up" in cleanup(store).stdout
    finally:
        proxy.release()
        proxy.close()
        if backup.poll() is None:
            backup.kill()
            backup.wait()
    # The name is free again.
    again = run_cli("backup", "--name", "b1", "--db-url", cluster.replication_url(),
                    "--no-progress", env=target.env)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert (store / "b1" / "manifest.json").exists() and not claim.exists()


def test_leftovers_without_a_claim_are_removed_and_foreign_objects_are_not(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    (store / "b2").mkdir(parents=True)
    (store / "b2" / "base.tar.zst").write_bytes(b"half an archive")
    (store / "mine").mkdir()
    (store / "mine" / "notes.txt").write_text("not a backup's")
    done = cleanup(store)
    assert "unclaimed, incomplete backup 'b2'" in done.stdout
    assert not (store / "b2").exists() and (store / "mine" / "notes.txt").exists()


def test_a_pinned_prefix_without_its_manifest_stays_until_released(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "b3").mkdir(parents=True)
    (store / "b3" / "base.tar.zst").write_bytes(b"an archive whose manifest went missing")
    (store / "b3" / "keep.json").write_text('{"until": null}')
    done = cleanup(store)
    assert (store / "b3" / "base.tar.zst").exists()
    assert "'b3/' is pinned" in done.stderr and "keep b3 --release" in done.stderr
    env = {"CLOUD_DUMP_STORAGE": f"file://{store}"}
    released = run_cli("keep", "b3", "--release", env=env)
    assert released.returncode == 0, released.stderr
    cleanup(store)
    assert not (store / "b3").exists()
    # Without a pin or a manifest there is nothing to release: no such backup.
    assert run_cli("keep", "b3", "--release", env=env).returncode == int(ExitCode.BACKUP_NOT_FOUND)


def test_a_bad_age_exits_3(tmp_path: Path) -> None:
    done = run_cli("cleanup", "--older-than", "soon",
                   env={"CLOUD_DUMP_STORAGE": f"file://{tmp_path}"})  # fmt: skip
    assert done.returncode == int(ExitCode.CONFIG) and done.stderr.count("\n") == 1, done.stderr
