"""age helpers: streams in constant memory, clear errors (a wrong key is not damage), no secret in
a message."""

from __future__ import annotations

import io
import os
import subprocess
import threading
from pathlib import Path

import pytest

from coordinator import crypto
from coordinator.wait import wait_until
from storage.errors import ConfigError, DecryptionFailed, IntegrityError, StorageUnreachable


def encrypt_stream(data: bytes, recipients: list[str], chunk: int = 70_000) -> bytes:
    out: list[bytes] = []
    encryptor = crypto.StreamEncryptor(recipients, out.append)
    for start in range(0, len(data), chunk):
        encryptor.write(memoryview(data)[start:start + chunk])
    encryptor.close()
    return b"".join(out)


def test_stream_round_trip_and_age_cli_agree(tmp_path: Path) -> None:
    secret, public = crypto.generate_identity()
    data = os.urandom(3_000_000)
    sealed = encrypt_stream(data, [public])
    assert crypto.decrypting_reader(io.BytesIO(sealed), [secret], "x").read() == data
    (tmp_path / "key").write_text(secret)
    (tmp_path / "sealed").write_bytes(sealed)
    cli = subprocess.run(["age", "-d", "-i", str(tmp_path / "key"), str(tmp_path / "sealed")],
                         capture_output=True, check=True)
    assert cli.stdout == data


def test_wrong_identity_is_decryption_failed() -> None:
    _, public = crypto.generate_identity()
    other, _ = crypto.generate_identity()
    sealed = encrypt_stream(b"payload" * 1000, [public])
    with pytest.raises(DecryptionFailed, match="no identity given matches"):
        crypto.decrypting_reader(io.BytesIO(sealed), [other], "base.tar.zst.age").read()
    with pytest.raises(DecryptionFailed):
        crypto.decrypt_bytes(sealed, [other], "backup_manifest.age")


def test_wrapped_identity_needs_the_right_passphrase() -> None:
    secret, _ = crypto.generate_identity()
    wrapped = crypto.wrap_identity(secret, "right")
    assert crypto.unwrap_identity(wrapped, "right") == secret
    with pytest.raises(DecryptionFailed, match="wrong passphrase"):
        crypto.unwrap_identity(wrapped, "wrong")


def test_closing_a_reader_mid_stream_stops_its_thread() -> None:
    secret, public = crypto.generate_identity()
    sealed = crypto.encrypt_bytes(os.urandom(20_000_000), [public])
    before = threading.active_count()
    reader = crypto.decrypting_reader(io.BytesIO(sealed), [secret], "x")
    reader.read(1000)
    reader.close()
    wait_until(lambda: threading.active_count() <= before, timeout_s=5, first_s=0.05)
    assert threading.active_count() == before


def test_recipients_from_public_or_identity_files(tmp_path: Path) -> None:
    secret, public = crypto.generate_identity()
    (tmp_path / "pub").write_text(f"# comment\n{public}\n")
    (tmp_path / "key").write_text(f"# created: today\n# public key: {public}\n{secret}\n")
    assert crypto.read_recipients([tmp_path / "pub"]) == [public]
    assert crypto.read_recipients([tmp_path / "key"]) == [public]
    assert crypto.read_identities([tmp_path / "key"]) == [secret]


def test_invalid_key_file_error_does_not_echo_the_key(tmp_path: Path) -> None:
    bogus = "AGE-SECRET-KEY-1NOTAREALKEYATALL"
    (tmp_path / "key").write_text(bogus + "\n")
    with pytest.raises(ConfigError) as caught:
        crypto.read_identities([tmp_path / "key"])
    assert bogus not in str(caught.value)
    (tmp_path / "empty").write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match="no recipient"):
        crypto.read_recipients([tmp_path / "empty"])


def _changed(sealed: bytes, where: str) -> bytes:
    """``sealed`` with one byte changed: in a payload chunk, in the header's MAC, in its
    version line, or cut inside the header."""
    if where == "cut":
        return sealed[:60]
    at = {"payload": len(sealed) // 2, "mac": sealed.index(b"\n--- ") + 10, "version": 5}[where]
    changed = bytearray(sealed)
    if where == "mac":
        # Another base64 letter: the MAC still parses and fails to verify (flipping a bit
        # could make a character base64 does not have, which age reports as a bad format).
        changed[at] = ord("A") if changed[at] != ord("A") else ord("B")
    else:
        changed[at] ^= 0x01
    return bytes(changed)


@pytest.mark.parametrize("where", ["payload", "mac", "version", "cut"])
def test_damaged_ciphertext_is_integrity_error_naming_it_in_both_apis(where: str) -> None:
    """A wrong key is DecryptionFailed (exit 14); bytes changed after encryption are
    IntegrityError (exit 15) naming the object, streamed (restore, verify --deep) or whole
    (wal-fetch, backup_manifest), never a bare OSError."""
    secret, public = crypto.generate_identity()
    damaged = _changed(encrypt_stream(os.urandom(300_000), [public]), where)
    what = "archive 'b1/base.tar.zst.age'"
    with pytest.raises(IntegrityError, match=f"^{what} is damaged: ") as streamed:
        crypto.decrypting_reader(io.BytesIO(damaged), [secret], what).read()
    with pytest.raises(IntegrityError, match=f"^{what} is damaged: ") as whole:
        crypto.decrypt_bytes(damaged, [secret], what)
    assert "\n" not in str(streamed.value) + str(whole.value)  # one line on stderr


@pytest.mark.parametrize(
    "failure",
    [OSError(5, "Input/output error", "/srv/store/b1/base.tar.zst.age"),
     IntegrityError("object 'b1/base.tar.zst.age' is shorter than the backup manifest says"),
     StorageUnreachable("storage 's3://bucket' cannot be reached")],
    ids=["local-io", "short-object", "outage"],
)
@pytest.mark.parametrize("after", [0, 100_000], ids=["in-header", "in-payload"])
def test_errors_of_the_source_pass_through_the_decrypting_reader_unchanged(
    failure: Exception, after: int
) -> None:
    """A local read error stays the OSError it is (exit 16, naming its file), a short object
    the IntegrityError the ranged reader names it with, an outage exit 4, whether age was
    reading its header (where pyrage wraps them in a DecryptError) or its payload: only age's
    own failures are classified. (A stub source: the failures are the storage layer's, tested
    there; here only how they cross age.)"""
    secret, public = crypto.generate_identity()
    sealed = io.BytesIO(crypto.encrypt_bytes(os.urandom(300_000), [public]))

    class FailingSource(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
            if sealed.tell() >= after:
                raise failure
            return sealed.readinto(target)

    with pytest.raises(type(failure)) as caught:
        crypto.decrypting_reader(FailingSource(), [secret], "x").read()  # type: ignore[arg-type]
    assert caught.value is failure


def test_header_opens_proves_a_key_on_the_first_bytes_only() -> None:
    secret, public = crypto.generate_identity()
    other, _ = crypto.generate_identity()
    sealed = crypto.encrypt_bytes(os.urandom(300_000), [public])
    assert crypto.header_opens(sealed[:16 * 1024], [secret], "x") is True
    assert crypto.header_opens(sealed[:40], [secret], "x") is False  # more bytes needed
    with pytest.raises(DecryptionFailed, match="no identity given matches"):
        crypto.header_opens(sealed[:16 * 1024], [other], "x")
    with pytest.raises(IntegrityError, match="header MAC is invalid"):
        crypto.header_opens(_changed(sealed, "mac")[:16 * 1024], [secret], "x")
