"""``StorageOptions``: how to reach a store (endpoint, addressing style, part count, retries)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from storage.base import MIN_CONFIGURABLE_PART_COUNT, S3_MAX_PART_COUNT
from storage.errors import ConfigError


class StorageSettings(Protocol):
    """The storage settings of a command (``coordinator.settings.CommonSettings``) or a worker
    (``tasks.settings.WorkerSettings``), named as ``options.declared`` names them."""

    @property
    def s3_endpoint(self) -> str | None: ...

    @property
    def s3_region(self) -> str | None: ...

    @property
    def s3_path_style(self) -> bool | None: ...

    @property
    def s3_max_parts(self) -> int: ...

    @property
    def storage_max_attempts(self) -> int: ...


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

    @classmethod
    def from_settings(cls, settings: StorageSettings) -> StorageOptions:
        """The options a command's or a worker's settings give (the one place their names,
        ``--s3-max-parts`` and ``--storage-max-attempts``, meet this class's fields)."""
        return cls(
            s3_endpoint=settings.s3_endpoint,
            s3_region=settings.s3_region,
            s3_path_style=settings.s3_path_style,
            max_part_count=settings.s3_max_parts,
            max_attempts=settings.storage_max_attempts,
        )
