"""The last outcome of ``cloud-dump verify``, as it records it in the store.

One JSON object at ``Layout.verify_result_key()`` (beside the backups), rewritten by each run
of verify and read by ``cloud-dump info`` (the ``cloud_dump_verify_*`` metrics). Absent until
verify first records one. Unknown fields are ignored, so that a newer verify may add some.
"""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from storage.errors import PermanentStorageError


class VerifyResult(BaseModel):
    """``finished``: when the run ended (UTC); ``ok``: it found nothing wrong; ``deep``: it ran
    with ``--deep``; ``backups_checked``: how many backups it read; ``problems``: how many
    problems it reported."""

    model_config = ConfigDict(frozen=True)

    finished: AwareDatetime
    ok: bool
    deep: bool
    backups_checked: int = Field(ge=0)
    problems: int = Field(ge=0)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes, key: str) -> VerifyResult:
        """``PermanentStorageError`` naming ``key`` when it is not such an object."""
        try:
            return cls.model_validate_json(data)
        except ValueError as exc:
            raise PermanentStorageError(
                f"verify result '{key}' is not a valid cloud-dump verify result: "
                f"{str(exc).splitlines()[-1].strip()}"
            ) from exc

