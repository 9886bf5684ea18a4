"""age helpers: streams in constant memory, clear errors, no secret in a message."""

from __future__ import annotations

import io
import os
import subprocess
import threading
from pathlib import Path

import pytest

from coordinator import crypto
from coordinator.wait import wait_until
from storage.errors import ConfigError, DecryptionFailed


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
