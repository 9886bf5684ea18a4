"""``keep --until`` takes what its help promises: a date (midnight UTC) or a time with a zone,
spelled as restore's ``--recovery-target-time`` takes it (an offset, ``Z``, or a full zone name
such as ``Europe/Helsinki``); the pin records the instant in UTC. Anything else is refused
(exit 3) naming the value, before the store is touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import StorageTarget, local_target
from devrig.services import error_line, run_cli
from tests.coordinator.test_catalog_manifests import VALID


@pytest.fixture
def store(tmp_path: Path) -> StorageTarget:
    """A local store holding backup 'b1' (its manifest.json: all keep reads of it)."""
    target = local_target(tmp_path / "store")
    (tmp_path / "store" / "b1").mkdir()
    (tmp_path / "store" / "b1" / "manifest.json").write_text(json.dumps(VALID))
    return target


@pytest.mark.parametrize(
    ("until", "recorded"),
    [
        ("2099-01-31T04:22:00 Europe/Helsinki", "2099-01-31T02:22:00+00:00"),
        ("2099-07-31 04:22 europe/helsinki", "2099-07-31T01:22:00+00:00"),  # summer time
        ("2099-01-31T04:22:00+05:30", "2099-01-30T22:52:00+00:00"),
        ("2099-01-31 04:22:00Z", "2099-01-31T04:22:00+00:00"),
        ("2099-01-31", "2099-01-31T00:00:00+00:00"),
    ],
)
def test_keep_until_takes_a_date_or_a_time_with_an_offset_or_a_zone_name(
    store: StorageTarget, tmp_path: Path, until: str, recorded: str
) -> None:
    done = run_cli("keep", "b1", "--until", until, env=store.env)
    assert done.returncode == 0, done.stderr
    assert f"backup 'b1' is pinned until {recorded}" in done.stdout
    pin = json.loads((tmp_path / "store" / "b1" / "keep.json").read_text())
    assert pin["until"] == recorded


@pytest.mark.parametrize(
    ("until", "said"),
    [
        ("2099-01-31T04:22:00", "has no time zone"),
        ("2099-01-31T04:22:00 CET", "'CET' is a time-zone abbreviation"),
        ("2099-01-31T04:22:00 Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("2099-03-29 03:30 Europe/Helsinki", "does not exist in Europe/Helsinki"),
        ("next friday", "use 'YYYY-MM-DD HH:MM:SS"),
    ],
)
def test_keep_until_refuses_what_does_not_name_one_instant(
    store: StorageTarget, tmp_path: Path, until: str, said: str
) -> None:
    done = run_cli("keep", "b1", "--until", until, env=store.env)
    assert done.returncode == int(ExitCode.CONFIG), done.stderr
    line = error_line(done.stderr)
    assert f"invalid --until '{until}': " in line and said in line, line
    assert not (tmp_path / "store" / "b1" / "keep.json").exists()
