"""wal-push: what is stored (unchanged, compressed, encrypted to a passphrase or a key pair)
and that a second push stores nothing, on both backends, through the installed command.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import zstandard

from coordinator.cli.exitcodes import ExitCode
from coordinator.crypto import decrypt_bytes, generate_identity, unwrap_identity
from devrig.moto import StorageTarget
from devrig.walfiles import SEG1, SEG2, SEG3, SYSID_A, WalDir, make_segment
from tests.coordinator.wal.push.helpers import stored
from workers.wal import ARCHIVE_INFO_NAME, ARCHIVE_KEY_NAME, RAW_SHA256, WalArchiveInfo

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def test_wal_push_uncompressed_stores_the_file_unchanged(
    wal_dir: WalDir, storage_target: StorageTarget
) -> None:
    segment = make_segment(SYSID_A, 1, SEG1)
    wal_dir.add(SEG1, segment)
    result = wal_dir.push(SEG1, "--compression", "none", env=storage_target.env)
    assert result.returncode == 0, result.stderr
    storage = storage_target.open()
    assert storage.get(f"wal_archive/{SEG1}") == segment
    assert storage.head(f"wal_archive/{SEG1}").metadata == {
        RAW_SHA256: hashlib.sha256(segment).hexdigest(),
        "system-identifier": str(SYSID_A),
    }
    info = WalArchiveInfo.model_validate_json(storage.get(f"wal_archive/{ARCHIVE_INFO_NAME}"))
    assert info.system_identifier == str(SYSID_A) and info.encryption is None
    assert wal_dir.marker(SEG1).exists()


def test_wal_push_compressed_is_readable_with_zstd(
    wal_dir: WalDir, storage_target: StorageTarget, tmp_path: Path
) -> None:
    segment = make_segment(SYSID_A, 2, SEG1)
    wal_dir.add(SEG1, segment)
    result = wal_dir.push(SEG1, "--compress", env=storage_target.env)
    assert result.returncode == 0, result.stderr
    blob = storage_target.open().get(f"wal_archive/{SEG1}.zst")
    assert len(blob) < len(segment) // 10
    (tmp_path / "seg.zst").write_bytes(blob)
    unpacked = subprocess.run(
        ["zstd", "-dc", str(tmp_path / "seg.zst")], capture_output=True, check=True
    ).stdout
    assert unpacked == segment


def test_wal_push_passphrase_encrypted_uses_one_archive_key(
    wal_dir: WalDir, storage_target: StorageTarget, tmp_path: Path
) -> None:
    passphrase_file = tmp_path / "pass"
    passphrase_file.write_text("correct horse\n")
    flags = ("--encrypt", "--passphrase-file", str(passphrase_file))
    first, second = make_segment(SYSID_A, 3, SEG1), make_segment(SYSID_A, 4, SEG2)
    wal_dir.add(SEG1, first)
    wal_dir.add(SEG2, second)
    debug = ("--log-level", "debug")
    result = wal_dir.push(SEG1, *flags, *debug, env=storage_target.env)
    assert result.returncode == 0, result.stderr
    assert "one scrypt" in result.stderr
    result = wal_dir.push(SEG2, *flags, *debug, env=storage_target.env)
    assert result.returncode == 0, result.stderr
    # The archive key is read from the spool's cache: no scrypt (~1.7 s) for later segments.
    assert "one scrypt" not in result.stderr

    storage = storage_target.open()
    blob = storage.get(f"wal_archive/{SEG2}.zst.age")
    assert not blob.startswith(ZSTD_MAGIC)
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(blob)
    info = WalArchiveInfo.model_validate_json(storage.get(f"wal_archive/{ARCHIVE_INFO_NAME}"))
    assert info.encryption is not None
    assert info.encryption.wrapped_identity_key == f"wal_archive/{ARCHIVE_KEY_NAME}"
    identity = unwrap_identity(storage.get(info.encryption.wrapped_identity_key), "correct horse")
    for name, segment in ((SEG1, first), (SEG2, second)):
        plain = decrypt_bytes(storage.get(f"wal_archive/{name}.zst.age"), [identity], name)
        assert zstandard.ZstdDecompressor().decompress(plain) == segment

    # Another host with the wrong passphrase is refused before it encrypts anything.
    wal_dir.add(SEG3, make_segment(SYSID_A, 5, SEG3))
    passphrase_file.write_text("wrong\n")
    result = wal_dir.push(
        SEG3, *flags, "--spool-dir", str(tmp_path / "other-spool"), env=storage_target.env
    )
    assert result.returncode == ExitCode.DECRYPTION_FAILED, result.stderr
    assert f"wal_archive/{SEG3}.zst.age" not in stored(storage)


def test_wal_push_key_pair_encrypted_is_readable_with_age(
    wal_dir: WalDir, storage_target: StorageTarget, tmp_path: Path
) -> None:
    identity, recipient = generate_identity()
    (tmp_path / "key.txt").write_text(identity + "\n")
    (tmp_path / "key.pub").write_text(recipient + "\n")
    segment = make_segment(SYSID_A, 6, SEG1)
    wal_dir.add(SEG1, segment)
    result = wal_dir.push(
        SEG1, "--recipient-key", str(tmp_path / "key.pub"), env=storage_target.env
    )
    assert result.returncode == 0, result.stderr
    (tmp_path / "seg.zst.age").write_bytes(storage_target.open().get(f"wal_archive/{SEG1}.zst.age"))
    compressed = subprocess.run(
        ["age", "-d", "-i", str(tmp_path / "key.txt"), str(tmp_path / "seg.zst.age")],
        capture_output=True,
        check=True,
    ).stdout
    plain = subprocess.run(
        ["zstd", "-dc"], input=compressed, capture_output=True, check=True
    ).stdout
    assert plain == segment


def test_wal_push_twice_is_a_noop_whatever_the_settings(
    wal_dir: WalDir, storage_target: StorageTarget
) -> None:
    wal_dir.add(SEG1, make_segment(SYSID_A, 7, SEG1))
    assert wal_dir.push(SEG1, env=storage_target.env).returncode == 0
    storage = storage_target.open()
    before = stored(storage)
    assert wal_dir.push(SEG1, env=storage_target.env).returncode == 0  # spool marker
    wal_dir.marker(SEG1).unlink()
    # Without the marker the archive answers, and other settings do not make a second copy.
    result = wal_dir.push(SEG1, "--compression", "gzip", env=storage_target.env)
    assert result.returncode == 0, result.stderr
    assert "already archived" in result.stderr
    assert stored(storage) == before
    assert wal_dir.marker(SEG1).exists()
