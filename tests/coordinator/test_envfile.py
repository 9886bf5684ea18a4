"""coordinator.envfile: the one KEY=VALUE parser, strict for ``--config`` and tolerant for the
config file a restored copy's archive_command names (``coordinator.restore.archiving``)."""

from __future__ import annotations

from pathlib import Path

from coordinator.envfile import assignments, decode, is_malformed, values
from coordinator.restore.archiving import archive_of

TEXT = """\
# a comment
export CLOUD_DUMP_STORAGE = "s3://bucket/prefix"
CLOUD_DUMP_CLUSTER='c1'

not a line
CLOUD_DUMP_CLUSTER=c2
"""


def test_lines_are_numbered_as_editors_number_them_and_unquoted() -> None:
    got = assignments(TEXT)
    assert got == [
        (2, "CLOUD_DUMP_STORAGE", "=", "s3://bucket/prefix"),
        (3, "CLOUD_DUMP_CLUSTER", "=", "c1"),
        (5, "not a line", "", ""),
        (6, "CLOUD_DUMP_CLUSTER", "=", "c2"),
    ]
    assert [is_malformed(key, sep) for _, key, sep, _ in got] == [False, False, True, False]


def test_values_skip_malformed_lines_and_the_last_line_wins() -> None:
    assert values(TEXT) == {"CLOUD_DUMP_STORAGE": "s3://bucket/prefix", "CLOUD_DUMP_CLUSTER": "c2"}


def test_a_byte_order_mark_is_not_part_of_the_first_key() -> None:
    assert values(decode(b"\xef\xbb\xbfKEY=v\r\n")) == {"KEY": "v"}


def test_a_key_that_is_not_a_variable_name_is_malformed() -> None:
    assert [is_malformed(k, s) for _, k, s, _ in assignments("A-B=1\n=2\nA B=3\nA_1=4")] == [
        True, True, True, False,
    ]  # fmt: skip


def test_restore_reads_the_archive_from_a_config_file_with_a_malformed_line(
    tmp_path: Path,
) -> None:
    config = tmp_path / "cloud-dump.env"
    config.write_text("CLOUD_DUMP_STORAGE=s3://bucket/p\nAGE-SECRET-KEY-1QQQ\n"
                      "CLOUD_DUMP_CLUSTER=c1\n")  # fmt: skip
    command = f"cloud-dump wal-push %p %f --config {config}"
    assert archive_of(command) == "s3://bucket/p/c1/wal_archive"


def test_restore_ignores_a_config_file_it_cannot_read_as_text(tmp_path: Path) -> None:
    config = tmp_path / "cloud-dump.env"
    config.write_bytes(b"CLOUD_DUMP_STORAGE=s3://bucket/\xff\n")
    assert archive_of(f"cloud-dump wal-push %p %f --config {config}") is None
    assert archive_of(f"cloud-dump wal-push %p %f --config {tmp_path / 'missing'}") is None
