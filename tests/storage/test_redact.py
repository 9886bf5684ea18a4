"""Credentials in URLs never reach output."""

from __future__ import annotations

import pytest

from storage.redact import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:hunter2@host/1", "redis://user:***@host/1"),
        ("rediss://token@host:6380", "rediss://:***@host:6380"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
    ],
)
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_url_hides_unparseable_input_entirely() -> None:
    assert redact_url("redis://:pw@[::1") == "<unparseable url>"
