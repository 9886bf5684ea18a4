"""``StorageOptions``: how to reach a store (endpoint, addressing style, part count, retries)."""

from __future__ import annotations

from dataclasses import dataclass

from storage.base import MIN_CONFIGURABLE_PART_COUNT, S3_MAX_PART_COUNT
from storage.errors import ConfigError


@dataclass(frozen=True)
class StorageOptions:
    """How to reach a store. Credentials are never here: boto3's standard chain supplies them."""

    s3_endpoint: str | None = None
    s3_region: str | None = None
    # None means: path-style when a custom endpoint is given (MinIO, moto, most gateways),
    # virtual-hosted style on AWS.
    s3_path_style: bool | None = None
    max_part_count: int = S3_MAX_PART_COUNT
    max_attempts: int = 5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not MIN_CONFIGURABLE_PART_COUNT <= self.max_part_count <= S3_MAX_PART_COUNT:
            raise ConfigError(
                f"max part count {self.max_part_count} is outside "
                f"{MIN_CONFIGURABLE_PART_COUNT}..{S3_MAX_PART_COUNT}"
            )
        if self.max_attempts < 1:
            raise ConfigError("storage max attempts must be at least 1")
