"""Reading compressed and encrypted archives back: decoders by compression name, with every
decoder failure reported as damaged bytes (``IntegrityError``) naming the archive."""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from typing import Any, BinaryIO, cast

from storage.errors import DecryptionFailed, IntegrityError


class _ArchiveStream(io.RawIOBase):
    """The plaintext of one archive; decoder failures become ``IntegrityError`` naming it.

    The key was already proven on backup_manifest when an archive fails to decrypt, so that
    failure too means damaged bytes, not a wrong key.
    """

    def __init__(
        self, inner: BinaryIO, what: str, decoder_errors: tuple[type[BaseException], ...]
    ) -> None:
        super().__init__()
        self._inner = inner
        self._what = what
        self._errors: tuple[type[BaseException], ...] = (
            DecryptionFailed,
            EOFError,
            zlib.error,
            *decoder_errors,
        )

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        try:
            return self._inner.read(-1 if size is None else size)
        except self._errors as exc:
            raise IntegrityError(f"{self._what} is damaged: {exc}") from exc

    def readinto(self, target: Any) -> int:
        data = self.read(len(memoryview(target)))
        memoryview(target).cast("B")[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read to the end: trailing tar padding, and the last bytes the decoders check."""
        while self.read(1024 * 1024):
            pass


def open_plaintext(
    source: BinaryIO,
    compression: str,
    *,
    identities: Sequence[str] | None,
    what: str,
) -> _ArchiveStream:
    """``source`` (one stored archive) decrypted when ``identities`` is given, then decompressed."""
    stream: BinaryIO = source
    errors: tuple[type[BaseException], ...] = ()
    if identities is not None:
        from coordinator.crypto import decrypting_reader

        stream = cast(BinaryIO, decrypting_reader(source, identities, what))
    if compression == "zstd":
        import zstandard

        # Across frames: a stream may be several zstd frames concatenated.
        stream = cast(
            BinaryIO,
            zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True),
        )
        errors = (zstandard.ZstdError,)
    elif compression == "gzip":
        import gzip

        stream = cast(BinaryIO, gzip.GzipFile(fileobj=stream, mode="rb"))
        errors = (gzip.BadGzipFile,)
    elif compression == "lz4":
        import lz4.frame

        stream = cast(BinaryIO, lz4.frame.LZ4FrameFile(stream, mode="rb"))
        errors = (RuntimeError,)  # what lz4.frame raises for a damaged frame
    elif compression != "none":
        raise IntegrityError(f"{what} has unknown compression '{compression}'")
    return _ArchiveStream(stream, what, errors)
