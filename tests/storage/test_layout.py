"""Key layout: the seed's flat and --cluster layouts (DESIGN.md §5, the seed README's layout)."""

from __future__ import annotations

import pytest

from storage.errors import ConfigError
from storage.layout import Layout, compression_suffix, validate_name

SEGMENT = "000000010000000000000001"


def test_flat_layout_puts_backup_files_under_the_backup_name() -> None:
    flat = Layout()

    assert flat.backup_prefix("prod-2026-03-22") == "prod-2026-03-22/"
    assert flat.manifest_key("prod-2026-03-22") == "prod-2026-03-22/manifest.json"
    assert (
        flat.archive_key("prod-2026-03-22", "base", "gzip", encrypted=False)
        == "prod-2026-03-22/base.tar.gz"
    )
    assert (
        flat.archive_key("prod-2026-03-22", "base", "gzip", encrypted=True)
        == "prod-2026-03-22/base.tar.gz.age"
    )
    assert flat.archive_key("b1", "base", "zstd", encrypted=False) == "b1/base.tar.zst"
    assert flat.archive_key("b1", "16384", "zstd", encrypted=True) == "b1/16384.tar.zst.age"
    assert flat.archive_key("b1", "base", "lz4", encrypted=False) == "b1/base.tar.lz4"
    assert flat.archive_key("b1", "base", "none", encrypted=False) == "b1/base.tar"
    assert flat.backup_manifest_key("b1", encrypted=False) == "b1/backup_manifest"
    assert flat.backup_manifest_key("b1", encrypted=True) == "b1/backup_manifest.age"


def test_flat_layout_archives_wal_under_the_wal_prefix() -> None:
    assert Layout().wal_root == "wal_archive/"
    assert Layout().backups_root == ""
    assert Layout().wal_key(SEGMENT, "gzip", encrypted=False) == f"wal_archive/{SEGMENT}.gz"
    assert Layout().wal_key(SEGMENT, "zstd", encrypted=True) == f"wal_archive/{SEGMENT}.zst.age"
    custom = Layout(wal_prefix="/pg/wal/")
    assert custom.wal_key("00000002.history", "none", encrypted=False) == "pg/wal/00000002.history"


def test_cluster_layout_groups_backups_and_wal_under_the_cluster() -> None:
    cluster = Layout(cluster="prod-pg17")

    assert cluster.backups_root == "prod-pg17/backup/"
    assert cluster.manifest_key("2026-03-22") == "prod-pg17/backup/2026-03-22/manifest.json"
    assert (
        cluster.archive_key("2026-03-22", "base", "gzip", encrypted=False)
        == "prod-pg17/backup/2026-03-22/base.tar.gz"
    )
    assert cluster.wal_root == "prod-pg17/wal_archive/"
    assert (
        cluster.wal_key(SEGMENT, "gzip", encrypted=False) == f"prod-pg17/wal_archive/{SEGMENT}.gz"
    )


@pytest.mark.parametrize("prefix", ["elsewhere", "pg/wal", "/wal_archive/x"])
def test_cluster_layout_refuses_a_flat_wal_prefix_naming_both(prefix: str) -> None:
    # The seed: --wal-prefix is "flat layout only"; ignored, it would send WAL elsewhere.
    refused = f"WAL prefix '{prefix}' cannot be used with cluster 'c1'"
    with pytest.raises(ConfigError, match=refused):
        Layout(cluster="c1", wal_prefix=prefix)


@pytest.mark.parametrize("prefix", ["wal_archive", "/wal_archive/"])
def test_cluster_layout_accepts_the_default_wal_prefix_spelt_out(prefix: str) -> None:
    assert Layout(cluster="c1", wal_prefix=prefix).wal_root == "c1/wal_archive/"


@pytest.mark.parametrize(
    "name",
    ["", "a/b", "..", "a..b", "../etc", "/abs", ".hidden", "-flag", "x" * 129, "sp ace", "é"],
)
def test_invalid_backup_names_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid backup name"):
        Layout().manifest_key(name)


@pytest.mark.parametrize("name", ["a/b", "..", "", "x" * 129])
def test_invalid_cluster_names_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid cluster name"):
        Layout(cluster=name)


@pytest.mark.parametrize("name", ["x" * 128, "2026-03-22", "prod_db.v1", "A1"])
def test_valid_names_are_accepted(name: str) -> None:
    assert validate_name("backup", name) == name
    assert Layout(cluster=name).backup_prefix(name) == f"{name}/backup/{name}/"


def test_wal_archive_is_reserved_as_a_backup_name_in_the_flat_layout() -> None:
    with pytest.raises(ConfigError, match="reserved for the WAL archive"):
        Layout().backup_prefix("wal_archive")
    with pytest.raises(ConfigError, match="reserved"):
        Layout(wal_prefix="pg/wal").backup_prefix("pg")


def test_wal_archive_is_an_ordinary_backup_name_in_the_cluster_layout() -> None:
    assert Layout(cluster="c1").backup_prefix("wal_archive") == "c1/backup/wal_archive/"


@pytest.mark.parametrize("prefix", ["", "/", "a//b", "../up", "a/./b"])
def test_invalid_wal_prefixes_are_rejected(prefix: str) -> None:
    with pytest.raises(ConfigError, match="invalid WAL prefix"):
        Layout(wal_prefix=prefix)


def test_unknown_compression_is_a_config_error() -> None:
    assert compression_suffix("zstd") == ".zst"
    with pytest.raises(ConfigError, match="unknown compression 'brotli'"):
        Layout().archive_key("b1", "base", "brotli", encrypted=False)


@pytest.mark.parametrize("archive", ["base2", "../x", "", "16384/..", "pg_tblspc"])
def test_archive_must_be_base_or_a_tablespace_oid(archive: str) -> None:
    with pytest.raises(ValueError, match="invalid archive name"):
        Layout().archive_key("b1", archive, "zstd", encrypted=False)
