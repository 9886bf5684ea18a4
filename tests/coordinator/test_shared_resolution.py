"""What the commands resolve the same way, in one place each: encryption (backup and wal-push),
a passphrase-wrapped identity (restore and wal-fetch), storage options (commands and workers),
the requests a Celery runner sends (backup and wal-push), and the waits that pause first."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

from coordinator.backup.run import BackupKeys
from coordinator.broker.flights import CeleryRunner
from coordinator.crypto import generate_identity, passphrase_identity, wrap_identity
from coordinator.rangedread import RangedReader
from coordinator.settings import (
    BackupSettings,
    CommonSettings,
    Encryption,
    WalPushSettings,
    encryption_of,
)
from coordinator.wait import retry
from storage.errors import ConfigError, IntegrityError, StorageUnreachable
from storage.options import StorageOptions
from tasks.settings import WorkerSettings
from workers.backup import OpenArchiveRequest

# --- encryption: one resolution for backup and wal-push ------------------------------------------


def _both(**values: object) -> list[BackupSettings | WalPushSettings]:
    return [
        BackupSettings(command="backup", **values),  # type: ignore[arg-type]
        WalPushSettings(command="wal-push", path="p", file_name="f", **values),  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize("args", _both())
def test_no_encryption_asked_is_none(args: BackupSettings | WalPushSettings) -> None:
    assert encryption_of(args) is None


@pytest.mark.parametrize("args", _both(passphrase="secret"))
def test_a_passphrase_is_kept_out_of_the_repr(args: BackupSettings | WalPushSettings) -> None:
    chosen = encryption_of(args)
    assert chosen == Encryption(passphrase="secret")
    assert "secret" not in repr(chosen)


def test_recipient_keys_are_read_from_their_files(tmp_path: Path) -> None:
    _, public = generate_identity()
    (tmp_path / "key.txt").write_text(f"# a comment\n{public}\n")
    for args in _both(recipient_key=(str(tmp_path / "key.txt"),)):
        assert encryption_of(args) == Encryption(recipients=[public])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"recipient_key": ("k",), "passphrase": "s"},
         "give either --recipient-key or a passphrase, not both"),
        ({"encrypt": True}, "--encrypt needs --recipient-key FILE or --passphrase-file FILE"),
    ],
)  # fmt: skip
def test_both_commands_refuse_the_same_way(values: dict[str, object], message: str) -> None:
    for args in _both(**values):
        with pytest.raises(ConfigError) as caught:
            encryption_of(args)
        assert str(caught.value) == message


def test_a_backup_encrypts_to_a_fresh_identity_of_its_own_with_a_passphrase() -> None:
    assert BackupKeys.of(Encryption(recipients=["age1x"])) == BackupKeys(["age1x"])
    keys = BackupKeys.of(Encryption(passphrase="secret"))
    assert keys.wrapped_identity is not None and keys.passphrase == "secret"
    assert len(keys.recipients) == 1 and keys.recipients[0].startswith("age1")


# --- a passphrase-wrapped identity: one resolution for restore and wal-fetch ----------------------


def test_the_wrapped_identity_is_unwrapped_with_the_passphrase() -> None:
    secret, _ = generate_identity()
    stored = {"k": wrap_identity(secret, "pw")}
    assert passphrase_identity("the WAL archive", "passphrase", "k", lambda: "pw",
                               stored.__getitem__) == secret  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "key", "error", "message"),
    [
        ("recipients", None, ConfigError,
         "backup 'b1' is encrypted to age recipients: give --identity-key FILE"),
        (None, None, ConfigError,
         "backup 'b1' is encrypted to age recipients: give --identity-key FILE"),
        ("passphrase", "k", ConfigError, "backup 'b1' is encrypted with a passphrase: none given"),
    ],
)  # fmt: skip
def test_what_is_missing_is_named(
    mode: str | None, key: str | None, error: type[Exception], message: str
) -> None:
    asked: list[bool] = []

    def passphrase() -> str | None:
        asked.append(True)
        return None

    with pytest.raises(error, match=message):
        passphrase_identity("backup 'b1'", mode, key, passphrase, lambda k: b"")
    assert asked == ([True] if mode == "passphrase" else [])  # read only when needed


def test_no_wrapped_key_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError, match="the WAL archive records no wrapped key"):
        passphrase_identity("the WAL archive", "passphrase", None, lambda: "pw", lambda k: b"")


# --- storage options: one builder for commands and workers --------------------------------------


def test_commands_and_workers_build_the_same_storage_options() -> None:
    values = {"s3_endpoint": "http://minio:9000", "s3_region": "eu-west-1",
              "s3_path_style": True, "s3_max_parts": 5000, "storage_max_attempts": 3}  # fmt: skip
    command = StorageOptions.from_settings(CommonSettings(command="list", **values))  # type: ignore[arg-type]
    worker = StorageOptions.from_settings(WorkerSettings(**values))  # type: ignore[arg-type]
    assert command == worker == StorageOptions(
        s3_endpoint="http://minio:9000", s3_region="eu-west-1", s3_path_style=True,
        max_part_count=5000, max_attempts=3,
    )  # fmt: skip


def test_out_of_range_settings_are_refused_for_both() -> None:
    with pytest.raises(ConfigError, match="storage max attempts"):
        StorageOptions.from_settings(CommonSettings(command="list", storage_max_attempts=0))


# --- the requests a Celery runner sends -----------------------------------------------------------


class _NoBroker:
    url = "redis://nowhere"
    asked_identity_at_connect = False  # as a Broker made without connecting

    def identity_at_connect(self) -> None:
        return None

    def watch_results(self, on_result: object) -> None:  # nothing is pushed
        return None

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("location", [None, "file:///srv/store"])
def test_a_request_carries_the_storage_the_command_was_told(location: str | None) -> None:
    runner = CeleryRunner(_NoBroker(), "parts", storage_url=location,  # type: ignore[arg-type]
                          grace_s=1, payload_ttl_s=60, resend_after_s=5)  # fmt: skip
    runner.flights.start = lambda flight: flight  # type: ignore[method-assign]  # not sent
    handle = runner.start("cloud_dump.open_archive", OpenArchiveRequest(key="k"), "'k'",
                          {"ref": b"x"}, timeout_s=9)  # fmt: skip
    flight = handle.flight  # type: ignore[attr-defined]
    assert flight.argument == {"storage_url": location, "key": "k"}
    assert (flight.queue, flight.payloads, flight.resend_after_s, flight.timeout_s) == (
        "parts", {"ref": b"x"}, 5, 9,
    )  # fmt: skip


# --- waits that pause first -----------------------------------------------------------------------


def test_retry_can_pause_before_its_first_attempt() -> None:
    sleeps: list[float] = []
    calls: list[float] = []

    def action() -> str:
        calls.append(sum(sleeps))
        if len(calls) < 2:
            raise LookupError
        return "found"

    got = retry(action, attempts=2, retry_on=LookupError, first_s=2, factor=3, pause_first=True,
                sleep=sleeps.append)  # fmt: skip
    assert got == "found" and sleeps == [2, 6] and calls == [2, 8]


class _Flaky:
    """A store whose ranged reads fail ``failures`` times, then answer."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.lock = threading.Lock()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        with self.lock:
            self.calls += 1
            if self.calls <= self.failures:
                raise StorageUnreachable(f"store away (call {self.calls})")
        return b"x" * length

    def open_range_stream(self, key: str, start: int, length: int) -> _Body:
        return _Body(self.get_range(key, start, length))


class _Body(io.BytesIO):
    object_size = None  # the store says nothing of the object's size


def test_a_range_is_read_again_after_a_transient_failure() -> None:
    store = _Flaky(failures=1)
    with RangedReader(store, "k", 10, range_bytes=10, parallel=1) as reader:  # type: ignore[arg-type]
        assert reader.read() == b"x" * 10
    assert store.calls == 2


def test_a_range_gives_up_with_the_last_error_after_its_budget() -> None:
    store = _Flaky(failures=100)
    reader = RangedReader(store, "k", 10, range_bytes=10, parallel=1,  # type: ignore[arg-type]
                          retry_budget_s=0.6)  # fmt: skip
    with reader, pytest.raises(StorageUnreachable, match=r"call [2-9]\)"):
        reader.read()
    assert store.calls >= 2
