"""The S3 backend: the Storage protocol over any S3-compatible endpoint, with boto3.

This is the only module in cloud-dump that imports boto3 or botocore. It owns:

- building the boto3 client, lazily and once per process (a client must never cross a fork), from
  a fresh boto3 Session so that credentials come from boto3's standard chain only;
- mapping relative keys onto ``<prefix>/<key>`` in the bucket and back;
- translating every botocore exception, once, in ``_translate``, into ``storage.errors``.

Checksums: every ``put`` and ``upload_part`` carries ``x-amz-checksum-sha256`` so that the store
verifies the bytes it received. botocore is told to add checksums only "when required", otherwise
it would compute its own CRC on top of ours on every request.

Retries: botocore's "standard" retry mode retries throttling, 5xx, timeouts and connection errors
up to ``options.max_attempts``; what reaches the caller is final for this call. Such a failure
that outlasted the retries is ``StorageUnreachable``, whatever form it took (refused connection,
timeout, SlowDown, 5xx): the store is not usable right now, which is not the caller's fault and
may pass (exit 4, not 5); callers with a budget of their own (restore's ranged reads, the
workers' uploads) retry it again. One consequence
for ``put(if_absent=True)``: if the response to a successful write is lost, the retry finds the
key taken and raises ``ObjectExists``; callers that must be idempotent (WAL pushes) compare the
stored bytes before calling it a conflict. Stores that ignore ``If-None-Match`` (some older
S3-compatible servers) silently overwrite instead.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)

from storage.base import (
    S3_MAX_PART_SIZE_BYTES,
    S3_MIN_PART_SIZE_BYTES,
    Capabilities,
    MultipartUpload,
    ObjectInfo,
    PartBody,
    UploadedPart,
    validate_key,
    validate_metadata,
)
from storage.errors import (
    ChecksumMismatch,
    ConfigError,
    ObjectExists,
    ObjectNotFound,
    PartTooSmall,
    PermanentStorageError,
    StorageError,
    StorageUnreachable,
    UploadNotFound,
)

if TYPE_CHECKING:
    # Only for annotations: storage/__init__ imports this module lazily, at run time.
    from storage.options import StorageOptions

# botocore's own client-side rule; stricter AWS naming rules are the server's business, and some
# S3-compatible gateways accept names AWS would not.
_BUCKET_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")
_SHA256_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")
_MAX_BACKOFF_S = 20.0  # botocore's own cap for its standard retry mode
# Keys in one DeleteObjects request, at most
# (https://docs.aws.amazon.com/AmazonS3/latest/API/API_DeleteObjects.html).
DELETE_BATCH_KEYS = 1000

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_CHECKSUM_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
_ACCESS_CODES = {
    "AccessDenied": "access denied",
    "403": "access denied",
    "InvalidAccessKeyId": "the access key id is not known to the store",
    "SignatureDoesNotMatch": "the secret key does not match the access key id",
}
_THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        "RequestLimitExceeded",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "ConditionalRequestConflict",
    }
)
NO_CREDENTIALS_MESSAGE = (
    "no storage credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "or an AWS profile"
)


class S3Storage:
    """Objects under ``s3://<bucket>/<prefix>``; see ``storage.base`` for the contract."""

    def __init__(self, bucket: str, prefix: str, options: StorageOptions) -> None:
        if not _BUCKET_RE.fullmatch(bucket):
            raise ConfigError(f"invalid bucket name '{bucket}'")
        prefix = prefix.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except ValueError:
                raise ConfigError(f"invalid storage prefix '{prefix}'") from None
        endpoint = options.s3_endpoint
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"invalid S3 endpoint '{endpoint}': expected http:// or https://")
        self._bucket = bucket
        self._prefix = prefix
        self._options = options
        self._client_obj: Any = None
        self._client_pid: int | None = None

    # -- protocol: identity ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            min_part_size_bytes=S3_MIN_PART_SIZE_BYTES,
            max_part_size_bytes=S3_MAX_PART_SIZE_BYTES,
            max_part_count=self._options.max_part_count,
        )

    # -- protocol: objects ----------------------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        meta = dict(validate_metadata(metadata or {}))
        digest = hashlib.sha256(data).digest() if sha256 is None else bytes.fromhex(sha256)
        args: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": self._full_key(key),
            "Body": data,
            # The algorithm header makes the store record the checksum (head can return it).
            "ChecksumAlgorithm": "SHA256",
            "ChecksumSHA256": base64.b64encode(digest).decode(),
        }
        if if_absent:
            args["IfNoneMatch"] = "*"
        if meta:
            args["Metadata"] = meta
        with self._translated(key):
            response = self._client().put_object(**args)
        return ObjectInfo(key, len(data), _strip_etag(response["ETag"]), digest.hex(), meta)

    def get(self, key: str) -> bytes:
        full_key = self._full_key(key)
        with self._translated(key):
            return self._get_object_bytes(Key=full_key)

    def open_stream(self, key: str) -> S3ObjectStream:
        with self._translated(key):
            response = self._client().get_object(Bucket=self._bucket, Key=self._full_key(key))
        metadata = {str(k).lower(): str(v) for k, v in response.get("Metadata", {}).items()}
        size = response.get("ContentLength")
        return S3ObjectStream(response["Body"], metadata, self._translated, key,
                              size if isinstance(size, int) else None)  # fmt: skip

    def open_range_stream(self, key: str, start: int, length: int) -> S3ObjectStream:
        if start < 0 or length <= 0:  # S3 has no empty range: get_range answers those
            raise ValueError(f"invalid range start={start} length={length}")
        with self._translated(key):
            try:
                response = self._client().get_object(
                    Bucket=self._bucket, Key=self._full_key(key),
                    Range=f"bytes={start}-{start + length - 1}",
                )  # fmt: skip
            except ClientError as exc:
                if _error_code(exc) != "InvalidRange":  # 416: starts at or past the end
                    raise
                return S3ObjectStream(_EmptyBody(), {}, self._translated, key, None)
        total = _content_range_total(response.get("ContentRange"))
        return S3ObjectStream(response["Body"], {}, self._translated, key, total)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"invalid range start={start} length={length}")
        if length == 0:
            self.head(key)  # a missing key still raises ObjectNotFound
            return b""
        full_key = self._full_key(key)
        with self._translated(key):
            try:
                return self._get_object_bytes(
                    Key=full_key, Range=f"bytes={start}-{start + length - 1}"
                )
            except ClientError as exc:
                # 416: the range starts at or past the end (also: any range of a 0-byte object).
                if _error_code(exc) == "InvalidRange":
                    return b""
                raise

    def _get_object_bytes(self, **args: str) -> bytes:
        """GET an object (or a range of it) and read the body.

        botocore retries the request, but not a body that breaks off while it is being read
        (connection reset, read timeout mid-stream): that is retried here, with the same budget.
        """
        attempts = self._options.max_attempts
        for attempt in range(1, attempts + 1):
            response = self._client().get_object(Bucket=self._bucket, **args)
            try:
                return bytes(response["Body"].read())
            except (HTTPClientError, IncompleteReadError):
                if attempt == attempts:
                    raise
                # Jitter spreads out retries of many workers; it needs no cryptographic quality.
                time.sleep(random.uniform(0, min(_MAX_BACKOFF_S, 2.0 ** (attempt - 1))))  # noqa: S311
        raise AssertionError("unreachable: the loop returns or raises")

    def head(self, key: str) -> ObjectInfo:
        with self._translated(key):
            response = self._client().head_object(
                Bucket=self._bucket, Key=self._full_key(key), ChecksumMode="ENABLED"
            )
        etag = _strip_etag(response["ETag"])
        return ObjectInfo(
            key,
            int(response["ContentLength"]),
            etag,
            _whole_object_sha256(response, etag),
            {str(k).lower(): str(v) for k, v in response.get("Metadata", {}).items()},
            _timestamp(response.get("LastModified")),
        )

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client().get_paginator("list_objects_v2")
        with self._translated(None):
            for page in paginator.paginate(Bucket=self._bucket, Prefix=self._full_prefix(prefix)):
                for item in page.get("Contents", []):
                    key = self._relative_key(item["Key"])
                    yield ObjectInfo(
                        key,
                        int(item["Size"]),
                        _strip_etag(item["ETag"]),
                        modified_s=_timestamp(item.get("LastModified")),
                    )

    def delete(self, key: str) -> None:
        with self._translated(key):
            self._client().delete_object(Bucket=self._bucket, Key=self._full_key(key))

    def delete_many(self, keys: Sequence[str]) -> None:
        # Every key is checked before the first request; dict: duplicates once, order kept.
        full_keys = list(dict.fromkeys(self._full_key(key) for key in keys))
        failed: dict[str, str] = {}
        for start in range(0, len(full_keys), DELETE_BATCH_KEYS):
            failed.update(self._delete_batch(full_keys[start : start + DELETE_BATCH_KEYS]))
        if failed:
            raise self._delete_failure(failed, len(full_keys))

    def _delete_batch(self, full_keys: builtins.list[str]) -> dict[str, str]:
        """One DeleteObjects request (Quiet: the answer lists only the keys it could not
        delete); keys that failed with a code that may pass are sent again, with backoff, within
        the request budget. The error code of each key still not deleted, by full key.

        botocore retries a request that failed as a whole, but not the keys a successful (200)
        answer lists as failed: that is done here.
        """
        failed: dict[str, str] = {}
        pending = full_keys
        attempts = self._options.max_attempts
        for attempt in range(1, attempts + 1):
            with self._translated(None):
                response = self._client().delete_objects(
                    Bucket=self._bucket,
                    Delete={"Objects": [{"Key": key} for key in pending], "Quiet": True},
                )
            errors = {
                str(error.get("Key")): str(error.get("Code", "unknown"))
                for error in response.get("Errors", [])
                # A store that reports a missing key: deleted already, as the contract says.
                if str(error.get("Code")) not in _NOT_FOUND_CODES
            }
            for key in pending:
                failed.pop(key, None)
            failed.update(errors)
            pending = [key for key, code in errors.items() if _may_pass(code)]
            if not pending or attempt == attempts:
                break
            time.sleep(random.uniform(0, min(_MAX_BACKOFF_S, 2.0 ** (attempt - 1))))  # noqa: S311
        return failed

    def _delete_failure(self, failed: dict[str, str], total: int) -> StorageError:
        """The error naming the first key not deleted (a permanent failure first, if any)."""
        permanent = {key: code for key, code in failed.items() if not _may_pass(code)}
        key, code = next(iter((permanent or failed).items()))
        what = (f"could not delete {len(failed)} of {total} object(s), the first "
                f"'{self._relative_key(key)}': {code}")  # fmt: skip
        if not permanent:
            return StorageUnreachable(f"storage at '{self._endpoint()}' kept failing: {what}")
        reason = _ACCESS_CODES.get(code)
        return PermanentStorageError(f"{what} ({reason})" if reason else what)

    # -- protocol: multipart --------------------------------------------------------------------

    def create_multipart(self, key: str) -> str:
        with self._translated(key):
            response = self._client().create_multipart_upload(
                Bucket=self._bucket, Key=self._full_key(key), ChecksumAlgorithm="SHA256"
            )
        return str(response["UploadId"])

    def upload_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        data: bytes | PartBody,
        *,
        sha256: str,
        offset: int | None = None,  # S3 places parts itself, at completion
    ) -> UploadedPart:
        self._check_part_number(part_number)
        size = len(data)
        # A PartBody is read as botocore sends it (and, over plain HTTP, once more before, to
        # sign the payload); what it raises while read is not retried and leaves unchanged.
        try:
            with self._translated(key, upload_id):
                response = self._client().upload_part(
                    Bucket=self._bucket,
                    Key=self._full_key(key),
                    UploadId=upload_id,
                    PartNumber=part_number,
                    Body=data,
                    ContentLength=size,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=_sha256_b64(sha256),
                )
        except Exception as exc:
            failure = getattr(data, "failure", None)
            if failure is not None and failure is not exc:
                raise failure from exc
            raise
        return UploadedPart(part_number, _strip_etag(response["ETag"]), size, sha256.lower())

    def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[UploadedPart]
    ) -> ObjectInfo:
        listed = [
            {
                "PartNumber": p.part_number,
                "ETag": f'"{p.etag}"',
                "ChecksumSHA256": _sha256_b64(p.sha256),
            }
            for p in parts
        ]
        with self._translated(key, upload_id):
            response = self._client().complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._full_key(key),
                UploadId=upload_id,
                MultipartUpload={"Parts": listed},
            )
        # S3 keeps only a checksum of the part checksums: no whole-object SHA-256 to report.
        return ObjectInfo(key, sum(p.size for p in parts), _strip_etag(response["ETag"]))

    def abort_multipart(self, key: str, upload_id: str) -> None:
        with self._translated(key, upload_id):
            self._client().abort_multipart_upload(
                Bucket=self._bucket, Key=self._full_key(key), UploadId=upload_id
            )

    def list_multipart_uploads(self, prefix: str) -> builtins.list[MultipartUpload]:
        paginator = self._client().get_paginator("list_multipart_uploads")
        uploads: list[MultipartUpload] = []
        with self._translated(None):
            for page in paginator.paginate(Bucket=self._bucket, Prefix=self._full_prefix(prefix)):
                uploads.extend(
                    MultipartUpload(self._relative_key(u["Key"]), str(u["UploadId"]))
                    for u in page.get("Uploads", [])
                )
        # S3 answers in key order; some compatible servers (moto) in creation order. The sort is
        # stable, so uploads of one key keep the server's (initiation) order.
        return sorted(uploads, key=lambda upload: upload.key)

    def uploaded_bytes(self, key: str, upload_id: str) -> int:
        paginator = self._client().get_paginator("list_parts")
        total = 0
        with self._translated(key, upload_id):
            pages = paginator.paginate(Bucket=self._bucket, Key=self._full_key(key),
                                       UploadId=upload_id)  # fmt: skip
            for page in pages:
                total += sum(int(part["Size"]) for part in page.get("Parts", []))
        return total

    def close(self) -> None:
        if self._client_obj is not None and self._client_pid == os.getpid():
            self._client_obj.close()
        self._client_obj = None
        self._client_pid = None

    # -- keys -----------------------------------------------------------------------------------

    def _full_key(self, key: str) -> str:
        validate_key(key)
        return f"{self._prefix}/{key}" if self._prefix else key

    def _full_prefix(self, prefix: str) -> str:
        if prefix:
            # A listing prefix may end in "/" or in the middle of a segment; the rest must be a
            # well-formed key so that both backends accept the same prefixes.
            validate_key(prefix.removesuffix("/"))
        return f"{self._prefix}/{prefix}" if self._prefix else prefix

    def _relative_key(self, full_key: str) -> str:
        return full_key[len(self._prefix) + 1 :] if self._prefix else full_key

    def _check_part_number(self, part_number: int) -> None:
        if not 1 <= part_number <= self._options.max_part_count:
            raise ValueError(
                f"part number {part_number} is outside 1..{self._options.max_part_count}"
            )

    # -- client ---------------------------------------------------------------------------------

    def _client(self) -> Any:
        """The boto3 client of this process, built on first use and again after a fork.

        No lock: two threads racing here build two clients and one is dropped, which is harmless.
        The parent's client is dropped, not closed, in a child: its sockets belong to the parent.
        """
        pid = os.getpid()
        if self._client_obj is None or self._client_pid != pid:
            self._client_obj = self._build_client()
            self._client_pid = pid
        return self._client_obj

    def _build_client(self) -> Any:
        options = self._options
        path_style = options.s3_path_style
        if path_style is None:
            path_style = options.s3_endpoint is not None
        s3_config: dict[str, object] = {"addressing_style": "path" if path_style else "virtual"}
        if not (options.s3_endpoint or "https:").startswith("http:"):
            # Over TLS, no SHA-256 of the payload in the signature: every write already carries
            # its x-amz-checksum-sha256 for the store to check. botocore would hash each body
            # once more (S3SigV4Auth._should_sha256_sign_payload looks for Content-MD5 only),
            # and read a streamed part twice (bench-peers: a pass over every byte a worker
            # sends). Plain HTTP keeps the signed payload: nothing else protects it in transit.
            s3_config["payload_signing_enabled"] = False
        config = Config(
            region_name=options.s3_region,
            connect_timeout=options.connect_timeout_s,
            read_timeout=options.read_timeout_s,
            retries={"max_attempts": options.max_attempts, "mode": "standard"},
            s3=s3_config,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.session.Session().client("s3", endpoint_url=options.s3_endpoint, config=config)

    def _endpoint(self) -> str:
        if self._options.s3_endpoint:
            return self._options.s3_endpoint
        if self._client_obj is not None:
            return str(self._client_obj.meta.endpoint_url)
        return "https://s3.amazonaws.com"

    # -- errors ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _translated(self, key: str | None, upload_id: str | None = None) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            self._raise_translated(exc, key, upload_id)

    def _raise_translated(self, exc: Exception, key: str | None, upload_id: str | None) -> NoReturn:
        raise _translate(
            exc, bucket=self._bucket, endpoint=self._endpoint(), key=key, upload_id=upload_id
        ) from exc


class _EmptyBody:
    """The body of a range past the end: nothing."""

    def read(self, size: int | None = None) -> bytes:
        return b""

    def close(self) -> None:
        pass


class S3ObjectStream:
    """A GET's body, read in chunks (``Storage.open_stream``).

    A body that breaks off is not retried here (``get`` retries whole reads): botocore's error
    is translated as for any request, and the caller starts again.
    """

    def __init__(
        self, body: Any, metadata: dict[str, str],
        translated: Callable[[str], contextlib.AbstractContextManager[None]], key: str,
        object_size: int | None,
    ) -> None:  # fmt: skip
        self.metadata = metadata
        self.object_size = object_size
        self._body = body
        self._translated = translated
        self._key = key

    def read(self, size: int = -1, /) -> bytes:
        with self._translated(self._key):
            return bytes(self._body.read(None if size < 0 else size))

    def close(self) -> None:
        self._body.close()


def _content_range_total(content_range: object) -> int | None:
    """The object's size from a ranged GET's ``Content-Range: bytes 0-99/1234`` (RFC 9110
    §14.4), None when absent or unknown (``*``)."""
    if not isinstance(content_range, str):
        return None
    total = content_range.rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _translate(
    exc: Exception, *, bucket: str, endpoint: str, key: str | None, upload_id: str | None
) -> StorageError:
    """The one place where botocore's exceptions become cloud-dump's.

    Messages never quote the store's own error text for credential failures: some of those
    responses echo the access key id.
    """
    if isinstance(exc, ClientError):
        return _translate_client_error(
            exc, bucket=bucket, endpoint=endpoint, key=key, upload_id=upload_id
        )
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
        return StorageUnreachable(
            f"cannot reach storage endpoint '{endpoint}': {_connection_reason(exc)}"
        )
    if isinstance(exc, NoCredentialsError):
        return PermanentStorageError(NO_CREDENTIALS_MESSAGE)
    if isinstance(exc, PartialCredentialsError | CredentialRetrievalError):
        return PermanentStorageError("storage credentials are incomplete or could not be loaded")
    if isinstance(exc, HTTPClientError | IncompleteReadError):
        # Read timeouts and responses cut short: the request may well succeed next time.
        return StorageUnreachable(f"storage request to '{endpoint}' failed: {type(exc).__name__}")
    return PermanentStorageError(f"storage request to '{endpoint}' failed: {type(exc).__name__}")


def _translate_client_error(
    exc: ClientError, *, bucket: str, endpoint: str, key: str | None, upload_id: str | None
) -> StorageError:
    code = _error_code(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    what = f"'{key}'" if key else f"bucket '{bucket}'"
    if code == "NoSuchBucket":
        return PermanentStorageError(f"bucket '{bucket}' does not exist")
    if code in _NOT_FOUND_CODES and key is not None:
        return ObjectNotFound(key)
    if code == "NoSuchUpload":
        return UploadNotFound(f"multipart upload '{upload_id}' of {what} not found")
    if code == "EntityTooSmall":
        return PartTooSmall(
            f"multipart upload '{upload_id}' of {what} has a part other than the last "
            f"under the store's minimum of {S3_MIN_PART_SIZE_BYTES} bytes"
        )
    if code in _CHECKSUM_CODES:
        return ChecksumMismatch(f"bytes sent for {what} do not match their checksum ({code})")
    if code == "PreconditionFailed" and key is not None:
        return ObjectExists(key)
    if code in _ACCESS_CODES:
        return PermanentStorageError(f"cannot use bucket '{bucket}': {_ACCESS_CODES[code]}")
    if code in _THROTTLING_CODES:
        return StorageUnreachable(
            f"storage at '{endpoint}' kept throttling the request for {what}: {code} "
            f"(http {status}); retry later"
        )
    if code in _TRANSIENT_CODES or status >= 500:
        return StorageUnreachable(
            f"storage at '{endpoint}' kept failing the request for {what}: {code} (http {status})"
        )
    return PermanentStorageError(f"storage request for {what} failed: {code} (http {status})")


def _may_pass(code: str) -> bool:
    """Whether a failure with this S3 error code may succeed when sent again."""
    return code in _THROTTLING_CODES or code in _TRANSIENT_CODES


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))


def _connection_reason(exc: BotoCoreError) -> str:
    if isinstance(exc, ConnectTimeoutError):
        return "connection timed out"
    if isinstance(exc, ConnectionClosedError):
        return "connection closed by the server"
    text = str(getattr(exc, "kwargs", {}).get("error", exc)).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "name resolution" in text or "nodename" in text:
        return "host name could not be resolved"
    if "timed out" in text:
        return "connection timed out"
    return "connection failed"


def _timestamp(modified: object) -> float | None:
    """An S3 ``LastModified`` (botocore gives a ``datetime``) as seconds since the epoch."""
    return modified.timestamp() if isinstance(modified, datetime) else None


def _strip_etag(etag: str) -> str:
    return etag.strip('"')


def static_credentials_found() -> bool:
    """Whether boto3's standard chain finds credentials without asking a container or
    instance metadata service: the environment, profiles, config and credential files, SSO,
    credential processes. For gateways that take only keys they issued (Storj's), where a role
    would not do and a host off the cloud would wait on the metadata service's timeouts.
    Incomplete credentials count as none.
    """
    session = botocore.session.Session()
    resolver = session.get_component("credential_provider")
    for role in ("container-role", "iam-role"):
        resolver.remove(role)
    try:
        return session.get_credentials() is not None
    except BotoCoreError:
        return False


def _sha256_b64(sha256_hex: str) -> str:
    if not _SHA256_HEX_RE.fullmatch(sha256_hex):
        raise ValueError(f"invalid sha256 '{sha256_hex}': expected 64 hex digits")
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def _whole_object_sha256(response: dict[str, Any], etag: str) -> str | None:
    """Hex SHA-256 of the whole object, or None when the store only has a composite one.

    A multipart object's checksum is a checksum of part checksums, marked by a "-<parts>" suffix,
    ``ChecksumType: COMPOSITE``, or (on servers that omit both) the multipart ETag's "-<parts>".
    """
    value = response.get("ChecksumSHA256")
    if not value or "-" in value or "-" in etag:
        return None
    if response.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    return base64.b64decode(value).hex()
