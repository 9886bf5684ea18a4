"""age encryption for backups and WAL: keys, small objects, and streams in constant memory.

Two modes, both readable with the standard ``age`` CLI:

- recipients: data is encrypted to X25519 public keys (``age1...``) read from files; restore needs
  a matching identity (``AGE-SECRET-KEY-1...``): ``age -d -i key.txt base.tar.zst.age``.
- passphrase: scrypt costs ~1.7 s per call and pyrage's passphrase API is bytes-only, so data is
  encrypted to a fresh X25519 identity, and that identity is stored passphrase-encrypted beside
  the backup (a wrapped key): ``age -d backup_key.age > key.txt`` asks for the passphrase, then
  ``age -d -i key.txt ...`` reads the data.

pyrage's stream functions pull from a reader and push to a writer on the calling thread, holding
the GIL between callbacks; ``StreamEncryptor`` turns that into a push interface (``write``)
and ``decrypting_reader`` into a pull interface (``read``), each with a helper thread and a
bounded queue, so memory stays flat whatever the size of the stream.

A failed decryption is one of two things, told apart by what age reports (``age_failure``):
no identity given opens the header's stanzas ("No matching keys found": ``DecryptionFailed``,
exit 14), or the bytes are not what was encrypted (``IntegrityError``, exit 15): a header that
does not parse or whose MAC does not match, a stream cut short, or a payload chunk whose
ChaCha20-Poly1305 tag fails ("decryption error", which pyrage's stream functions raise as a
bare ``OSError``). A damaged stanza of the recipient's own reads as "No matching keys found"
too: only the callers that proved the key on another object of the same backup can call that
damage (``coordinator.codecs``). See https://age-encryption.org/v1 for the format.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import pyrage

from storage.errors import CloudDumpError, ConfigError, DecryptionFailed, IntegrityError

_QUEUE_DEPTH = 16  # chunks in flight between the caller and the age thread
_EOF = b""
# What pyrage (age 0.x) says when no identity opens a header: the one failure that is the key's.
_NO_MATCHING_KEYS = "no matching keys"
# What it says when the bytes end inside the header (``header_opens`` then needs more of them).
_INCOMPLETE_HEADER = "incomplete header"


def read_recipients(paths: Sequence[Path]) -> list[str]:
    """Public keys (``age1...``) from files: one per line, ``#`` comments and blanks ignored.

    An identity file is accepted too (``age-keygen`` output): its public key is derived, so the
    same file works for both ``--recipient-key`` and ``--identity-key`` in tests and demos.
    """
    keys: list[str] = []
    for path in paths:
        for line in _key_lines(path):
            if line.startswith("AGE-SECRET-KEY-1"):
                keys.append(str(_parse_identity(line, path).to_public()))
            else:
                _parse_recipient(line, path)
                keys.append(line)
    if not keys:
        raise ConfigError("no recipient public key found in " + ", ".join(map(str, paths)))
    return keys


def read_identities(paths: Sequence[Path]) -> list[str]:
    """Secret keys (``AGE-SECRET-KEY-1...``) from files, validated."""
    identities = [
        line
        for path in paths
        for line in _key_lines(path)
        if line.startswith("AGE-SECRET-KEY-1") and _parse_identity(line, path)
    ]
    if not identities:
        raise ConfigError(
            "no age identity (AGE-SECRET-KEY-1...) found in " + ", ".join(map(str, paths))
        )
    return identities


def public_keys(paths: Sequence[Path]) -> list[str]:
    """The public keys (``age1...``) of the identities in ``paths`` (``read_identities``)."""
    return [str(pyrage.x25519.Identity.from_str(k).to_public()) for k in read_identities(paths)]


def read_passphrase_file(path: str) -> str:
    """The passphrase a ``--passphrase-file`` (or ``CLOUD_DUMP_PASSPHRASE_FILE``) holds: its
    first line, "" for an empty file (the caller says what that means). ``ConfigError`` naming
    the file when it cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read passphrase file '{path}': {exc.strerror}") from exc
    return text.splitlines()[0] if text else ""


def generate_identity() -> tuple[str, str]:
    """A fresh X25519 identity: (secret key, public key)."""
    identity = pyrage.x25519.Identity.generate()
    return str(identity), str(identity.to_public())


def wrap_identity(identity: str, passphrase: str) -> bytes:
    """The identity encrypted with ``passphrase`` (age scrypt), as ``age -d`` reads it."""
    return bytes(pyrage.passphrase.encrypt((identity + "\n").encode(), passphrase))


def unwrap_identity(wrapped: bytes, passphrase: str, key: str | None = None) -> str:
    """The identity in ``wrapped`` (the object stored at ``key``, named in the error)."""
    what = f"the key '{key}'" if key else "the wrapped key"
    try:
        plain = pyrage.passphrase.decrypt(wrapped, passphrase)
    except pyrage.DecryptError as exc:
        if str(exc).lower().startswith("decryption error"):  # the scrypt stanza opened
            raise IntegrityError(f"{what} is damaged: {_damage(exc)}") from exc
        raise DecryptionFailed(f"wrong passphrase: it does not decrypt {what}") from exc
    return bytes(plain).decode().strip()


def passphrase_identity(
    subject: str,
    mode: str | None,
    wrapped_key: str | None,
    passphrase: Callable[[], str | None],
    read_wrapped: Callable[[str], bytes],
) -> str:
    """The identity that decrypts ``subject`` ("backup 'b1'", "the WAL archive") for an
    operator who gave no identity file: its wrapped key, unwrapped with the passphrase.

    ``mode`` and ``wrapped_key``: what ``subject`` records of its encryption (a backup's
    manifest, the WAL archive's description). ``passphrase`` is called only in passphrase
    mode, so that a passphrase file is not read for nothing; ``read_wrapped(key)`` fetches the
    wrapped key. ``ConfigError`` when the identity files or the passphrase it needs were not
    given, ``IntegrityError`` when it records no wrapped key, ``DecryptionFailed`` for a wrong
    passphrase.
    """
    if mode != "passphrase":
        raise ConfigError(
            f"{subject} is encrypted to age recipients: give --identity-key FILE "
            "(env CLOUD_DUMP_IDENTITY_KEY) with an identity that matches one of them"
        )
    given = passphrase()
    if given is None:
        raise ConfigError(f"{subject} is encrypted with a passphrase: none given "
                          "(--passphrase-file or CLOUD_DUMP_PASSPHRASE)")  # fmt: skip
    if not wrapped_key:
        raise IntegrityError(f"{subject} records no wrapped key for its passphrase")
    return unwrap_identity(read_wrapped(wrapped_key), given, wrapped_key)


def encrypt_bytes(data: bytes, recipients: Sequence[str]) -> bytes:
    return bytes(pyrage.encrypt(data, _recipients(recipients)))


def decrypt_bytes(data: bytes, identities: Sequence[str], what: str) -> bytes:
    """The plaintext of the age file ``data``; ``DecryptionFailed`` when no identity opens it,
    ``IntegrityError`` when its bytes are damaged (``age_failure``), both naming ``what``."""
    try:
        return bytes(pyrage.decrypt(data, _identities(identities)))
    except pyrage.DecryptError as exc:
        raise age_failure(exc, what) from exc


def header_opens(data: bytes, identities: Sequence[str], what: str) -> bool:
    """Whether one of ``identities`` opens the age header at the start of ``data`` (the first
    bytes of an age file, or all of them): True once the header's MAC checks, whatever follows;
    False when ``data`` ends inside the header. ``DecryptionFailed`` when no identity opens it,
    ``IntegrityError`` for a damaged header, naming ``what``.

    Proves a key on an object's first few KiB instead of the whole object: age checks the
    header (and with it the file key) before the first payload chunk.
    """
    try:
        pyrage.decrypt_io(io.BytesIO(data), _Discard(), _identities(identities))
    except pyrage.DecryptError as exc:
        if str(exc).lower().startswith(_INCOMPLETE_HEADER):
            return False
        raise age_failure(exc, what) from exc
    except OSError:
        pass  # the payload, cut where ``data`` ends: the header before it opened
    return True


def age_failure(exc: BaseException, what: str) -> CloudDumpError:
    """The error for age's failure ``exc`` on ``what``: ``DecryptionFailed`` when no identity
    opened the header, ``IntegrityError`` for anything else age reports (damaged bytes)."""
    text = str(exc).lower()
    if _NO_MATCHING_KEYS in text:
        return DecryptionFailed(
            f"cannot decrypt {what}: no identity given matches its recipients (wrong key?)"
        )
    return IntegrityError(f"{what} is damaged: {_damage(exc)}")


class StreamEncryptor:
    """Push plaintext with ``write``; ciphertext (one age stream) goes to ``out``.

    ``out`` is called from the encryptor's thread, in order. ``close`` finishes the stream,
    waits for the thread and re-raises anything it raised (including from ``out``).
    """

    def __init__(self, recipients: Sequence[str], out: Callable[[bytes], None]) -> None:
        self._chunks: queue.Queue[bytes] = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._error: BaseException | None = None
        reader = _QueueReader(self._chunks)
        writer = _CallbackWriter(out)
        parsed = _recipients(recipients)
        self._thread = threading.Thread(
            target=self._run, args=(reader, writer, parsed), name="age-encrypt", daemon=True
        )
        self._thread.start()

    def _run(self, reader: _QueueReader, writer: _CallbackWriter, recipients: list[object]) -> None:
        try:
            pyrage.encrypt_io(reader, writer, recipients)
        except BaseException as exc:  # handed to the caller in close()
            self._error = exc
            reader.drain()

    def write(self, data: bytes | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if data:
            self._chunks.put(bytes(data))

    def close(self) -> None:
        self._chunks.put(_EOF)
        self._thread.join()
        if self._error is not None:
            raise self._error


def decrypting_reader(
    source: BinaryIO, identities: Sequence[str], what: str
) -> io.BufferedReader:
    """A readable file of the plaintext of the age stream read from ``source``.

    A wrong identity raises ``DecryptionFailed`` from the first read.
    """
    return io.BufferedReader(_DecryptingReader(source, _identities(identities), what), 1 << 20)


class _DecryptingReader(io.RawIOBase):
    def __init__(self, source: BinaryIO, identities: list[object], what: str) -> None:
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._buffer = memoryview(b"")
        self._done = False
        self._what = what
        self._cancelled = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(source, identities), name="age-decrypt", daemon=True
        )
        self._thread.start()

    def _run(self, source: BinaryIO, identities: list[object]) -> None:
        reader = _WatchedReader(source)
        writer = _QueueWriter(self._chunks, self._cancelled)
        try:
            pyrage.decrypt_io(reader, writer, identities)
            writer.put(_EOF)
        except BaseException as exc:
            error = exc
            if reader.raised is not None:
                # What the source raised is why age stopped, whatever age made of it: pyrage
                # passes it through from the payload but wraps it in a DecryptError ("<class>:
                # <message>") while it reads the header. A short or unreadable object is the
                # source's to name (exit 15 or 4), not damaged age encryption.
                error = reader.raised
            elif exc is not writer.raised and isinstance(exc, (pyrage.DecryptError, OSError)):
                # age's own verdict on the bytes (a payload chunk that fails: a bare OSError).
                error = age_failure(exc, self._what)
                error.__cause__ = exc
            with contextlib.suppress(OSError):  # nobody is reading any more
                writer.put(error)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """Stop the decrypting thread too, even if the stream was not read to its end."""
        self._cancelled.set()
        super().close()

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer and not self._done:
            item = self._chunks.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if item == _EOF:
                self._done = True
            self._buffer = memoryview(item)
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


class _QueueReader:
    """What pyrage reads plaintext from: chunks handed over by ``StreamEncryptor.write``."""

    def __init__(self, chunks: queue.Queue[bytes]) -> None:
        self._chunks = chunks
        self._buffer = memoryview(b"")
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        while not self._buffer and not self._eof:
            chunk = self._chunks.get()
            self._eof = chunk == _EOF
            self._buffer = memoryview(chunk)
        n = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        out = bytes(self._buffer[:n])
        self._buffer = self._buffer[n:]
        return out

    def drain(self) -> None:
        """After a failure, keep consuming so that a producer blocked on put() is released."""
        while not self._eof:
            self._eof = self._chunks.get() == _EOF


class _WatchedReader:
    """``source`` as pyrage reads it, remembering what its ``read`` raised."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.raised: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            return self._source.read(size)
        except BaseException as exc:
            self.raised = exc
            raise


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


class _CallbackWriter:
    def __init__(self, out: Callable[[bytes], None]) -> None:
        self._out = out

    def write(self, data: bytes) -> int:
        self._out(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


class _QueueWriter:
    """Where pyrage writes plaintext; gives up once the reader is closed."""

    def __init__(self, chunks: queue.Queue[bytes | BaseException], cancelled: threading.Event):
        self._chunks = chunks
        self._cancelled = cancelled
        self.raised: OSError | None = None

    def write(self, data: bytes) -> int:
        if data:
            self.put(bytes(data))
        return len(data)

    def put(self, item: bytes | BaseException) -> None:
        while not self._cancelled.is_set():
            try:
                self._chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        self.raised = OSError("decryption abandoned: the reader was closed")
        raise self.raised

    def flush(self) -> None:
        pass


def _key_lines(path: Path) -> Iterable[str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read key file '{path}': {exc.strerror}") from exc
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _parse_recipient(line: str, path: Path) -> object:
    try:
        return pyrage.x25519.Recipient.from_str(line)
    except Exception as exc:  # pyrage raises RecipientError; keep the key text out of it
        raise ConfigError(f"'{path}' holds something that is not an age public key") from exc


def _parse_identity(line: str, path: Path) -> pyrage.x25519.Identity:
    try:
        return pyrage.x25519.Identity.from_str(line)
    except Exception as exc:  # never echo a secret key in a message
        raise ConfigError(f"'{path}' holds an invalid age identity") from exc


def _recipients(keys: Sequence[str]) -> list[object]:
    return [pyrage.x25519.Recipient.from_str(k) for k in keys]


def _identities(keys: Sequence[str]) -> list[object]:
    return [pyrage.x25519.Identity.from_str(k) for k in keys]


def _damage(exc: BaseException) -> str:
    """What age's failure says of the bytes, for an ``IntegrityError``."""
    # age's messages may run on ("unknown age format.\nHave you tried upgrading to the latest
    # version?"): the first line says what is wrong, and the error is one line.
    lines = str(exc).strip().splitlines()
    text = (lines[0] if lines else "").strip().rstrip(".")
    if text.lower() == "decryption error":
        return "a chunk of its age payload fails authentication (its bytes changed)"
    if text.lower() in ("failed to fill whole buffer", _INCOMPLETE_HEADER):
        return "it ends inside its age header"
    return f"its age encryption does not check ({text[:1].lower() + text[1:] or 'no reason'})"
