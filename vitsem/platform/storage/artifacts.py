"""Artifact store: one small interface over a local folder and S3-compatible storage.

Keys are content-addressed (``content_key``): the same input and parameters always map to
the same key, so finished work is found instead of recomputed, and a key is never
overwritten with different bytes (:class:`ArtifactConflictError`).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlparse

from vitsem.digests import sha256_bytes
from vitsem.errors import TransientServiceError, VitsemError
from vitsem.platform.settings import redact

T = TypeVar("T")

log = logging.getLogger("vitsem.platform.storage")

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,511}$")


class ArtifactStoreError(VitsemError):
    """The artifact store cannot be used (bad configuration, permanent fault)."""


class ArtifactConflictError(ArtifactStoreError):
    """A key already holds different bytes: content-addressed keys never change meaning."""


class ArtifactNotFoundError(ArtifactStoreError):
    """No artifact under that key."""


class ArtifactStoreUnavailableError(ArtifactStoreError, TransientServiceError):
    """The store's endpoint failed in a way that may pass (unreachable, timeouts, throttling,
    5xx) after the client's own retries: the flows' tasks retry it later."""


def validate_key(key: str) -> str:
    """Keys are relative paths of safe characters, without ``..`` or empty segments."""
    if not _KEY.match(key) or any(part in ("", ".", "..") for part in key.split("/")):
        raise ArtifactStoreError(
            f"invalid artifact key {key!r}: use letters, digits, '.', '_', '-' and '/' "
            "separated segments, no '..'"
        )
    return key


def content_key(kind: str, content_sha256: str, params_digest: str, suffix: str) -> str:
    """``kind/params/ab/abcdef....suffix``: one key per (content, parameters)."""
    return validate_key(
        f"{kind}/{params_digest}/{content_sha256[:2]}/{content_sha256}.{suffix.lstrip('.')}")


class ArtifactStore(Protocol):
    uri: str

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` unless the same bytes are there; return its URI."""

    def replace(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key``, atomically replacing what is there (for mutable
        keys: resume pointers, checkpoints a resumed run writes again)."""

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def uri_for(self, key: str) -> str: ...


class LocalArtifactStore:
    """A folder; writes are atomic (temp file + rename in the same folder)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def uri_for(self, key: str) -> str:
        return self._path(key).as_uri()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"no artifact {key!r} in {self.uri}") from None

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        if path.is_file():
            if sha256_bytes(path.read_bytes()) != sha256_bytes(data):
                raise ArtifactConflictError(f"{key!r} already holds different content")
            return path.as_uri()
        return self.replace(key, data)

    def replace(self, key: str, data: bytes) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path.as_uri()


DEFAULT_S3_CONNECTIONS = 10
"""botocore's own default pool size."""

DEFAULT_S3_ATTEMPTS = 4
"""Attempts per S3 call, the first included (``AWS_MAX_ATTEMPTS`` overrides it)."""

_PERMANENT_S3_ADVICE = {
    "NoSuchBucket": "the bucket does not exist: check the bucket name in VITSEM_ARTIFACT_URI "
                    "or create the bucket",
    "InvalidBucketName": "check the bucket name in VITSEM_ARTIFACT_URI",
    "AccessDenied": "the credentials may not use this bucket: grant them s3:GetObject, "
                    "s3:PutObject and s3:ListBucket on it, or check the bucket name",
    "AllAccessDisabled": "access to the bucket is disabled: check the bucket name",
    "InvalidAccessKeyId": "the access key is unknown to the endpoint: check AWS_ACCESS_KEY_ID "
                          "and AWS_ENDPOINT_URL",
    "SignatureDoesNotMatch": "the secret key is wrong: check AWS_SECRET_ACCESS_KEY",
    "403": "the credentials are refused or may not read this bucket: check "
           "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket's policy",
}
_NOT_FOUND_CODES = ("404", "NoSuchKey", "NotFound")


def _retry_config() -> dict[str, object]:
    """botocore's retries, the only low-level retry layer: ``standard`` mode (exponential
    backoff with jitter on connection errors, timeouts, throttling and 5xx) or ``adaptive``
    (the same plus client-side rate limiting), from ``AWS_RETRY_MODE``; ``legacy`` is not
    used. Faults that outlast them surface as :class:`ArtifactStoreUnavailableError`."""
    mode = os.environ.get("AWS_RETRY_MODE", "standard")
    attempts = os.environ.get("AWS_MAX_ATTEMPTS", "")
    return {"mode": mode if mode in ("standard", "adaptive") else "standard",
            "total_max_attempts": int(attempts) if attempts.isdigit() and int(attempts) > 0
            else DEFAULT_S3_ATTEMPTS}


class S3ArtifactStore:
    """S3 or any S3-compatible server (MinIO, moto). Endpoint, region and credentials come
    from the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).

    botocore retries transient faults (connection refused, timeouts, throttling, 5xx) in
    its ``standard`` mode and nothing else does here: a fault that outlasts them raises
    :class:`ArtifactStoreUnavailableError` (retryable: the flows' tasks retry it with
    backoff), a permanent one (bad credentials, missing bucket) :class:`ArtifactStoreError`
    at once, saying what to fix. One client serves every thread of the process: its
    connection pool holds ``max_connections`` (size it to the task concurrency, or urllib3
    drops connections with "Connection pool is full").
    """

    def __init__(self, uri: str, *, max_connections: int = DEFAULT_S3_CONNECTIONS) -> None:
        import boto3
        from botocore.config import Config

        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ArtifactStoreError(f"not an s3:// URI: {uri!r}; use s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.max_connections = max(1, int(max_connections))
        self.retries = _retry_config()
        # Its own session: credentials are resolved for this store, not cached process-wide.
        self._client = boto3.session.Session().client("s3", config=Config(
            retries=self.retries, connect_timeout=3, read_timeout=30,
            max_pool_connections=self.max_connections))
        self.endpoint = self._client.meta.endpoint_url

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` once (botocore retries inside it); its faults as typed errors."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import ConnectionError as S3ConnectionError

        try:
            return fn()
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code in _NOT_FOUND_CODES:
                raise
            if code in _PERMANENT_S3_ADVICE or (400 <= status < 500 and status != 429):
                advice = _PERMANENT_S3_ADVICE.get(
                    code, "check the bucket name, the key and the credentials")
                raise ArtifactStoreError(
                    f"S3 {what} failed permanently on {self.uri} ({code or status}): "
                    f"{advice}") from None
            err = f"{code or status}"
        except (NoCredentialsError, PartialCredentialsError):
            raise ArtifactStoreError(
                f"S3 {what} on {self.uri} has no usable credentials: set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY (or an AWS profile)") from None
        except (S3ConnectionError, HTTPClientError) as e:  # refused, timeouts, resets
            err = type(e).__name__
        except BotoCoreError as e:
            raise ArtifactStoreError(
                f"S3 {what} on {self.uri} cannot be made ({type(e).__name__}: "
                f"{redact(str(e))}); check AWS_ENDPOINT_URL and AWS_DEFAULT_REGION") from None
        log.warning("S3 %s on %s failed after %s attempts (%s); the task will be retried",
                    what, self.uri, self.retries["total_max_attempts"], err)
        raise ArtifactStoreUnavailableError(
            f"S3 {what} on {self.uri} failed after {self.retries['total_max_attempts']} "
            f"attempts ({err}); is the endpoint {self.endpoint} up? The task is retried "
            "later; rerun the flow once the endpoint is back") from None

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        def head() -> dict | None:
            try:
                return self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES:
                    return None
                raise

        return self._call("head", head)

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            obj = self._call("get", lambda: self._client.get_object(Bucket=self.bucket,
                                                                     Key=self._key(key)))
        except ClientError:
            raise ArtifactNotFoundError(f"no artifact {key!r} in {self.uri}") from None
        return obj["Body"].read()

    def _already_stored(self, key: str, digest: str) -> bool:
        """True when ``key`` holds content of ``digest``; raises if it holds other content."""
        head = self._head(key)
        if head is None:
            return False
        if head.get("Metadata", {}).get("sha256") != digest:
            raise ArtifactConflictError(f"{key!r} already holds different content")
        return True

    def put(self, key: str, data: bytes) -> str:
        if self._already_stored(key, sha256_bytes(data)):
            return self.uri_for(key)
        return self.replace(key, data)

    def replace(self, key: str, data: bytes) -> str:
        digest = sha256_bytes(data)
        self._call("put", lambda: self._client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={"sha256": digest}))
        return self.uri_for(key)


STORES: dict[str, Callable[[str, int], ArtifactStore]] = {
    "file": lambda uri, _n: LocalArtifactStore(Path(urlparse(uri).path)),
    "": lambda uri, _n: LocalArtifactStore(Path(uri)),
    "s3": lambda uri, n: S3ArtifactStore(uri, max_connections=n),
}
"""Store factories by URI scheme: (uri, connections for concurrent callers) -> store."""


def open_store(uri: str, concurrency: int = DEFAULT_S3_CONNECTIONS) -> ArtifactStore:
    """The store for ``uri``: ``file:///folder``, a plain path, or ``s3://bucket/prefix``;
    ``concurrency`` is how many threads may call it at once (an S3 client's pool size)."""
    scheme = urlparse(uri).scheme
    factory = STORES.get(scheme)
    if factory is None:
        raise ArtifactStoreError(
            f"unsupported artifact URI scheme {scheme!r} in {uri!r}; use file:// or s3://")
    return factory(uri, concurrency)
