"""Input files addressed by URI: ``s3://bucket/key`` beside local paths, so that a task on a
remote Dask worker reads its images itself instead of being handed a path on the flow's
machine. Endpoint, region and credentials come from the standard AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...); botocore's ``standard`` retry mode is the
only retry layer here, as in the artifact store. A missing object reads as a missing file
(``FileNotFoundError``), a refused one as ``PermissionError``; an endpoint still failing after
the retries raises :class:`InputUnavailableError`, which the flows' tasks retry later."""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path
from typing import Any

from vitsem.errors import DatasetError, TransientServiceError

__all__ = ["InputUnavailableError", "is_remote", "list_keys", "read_bytes", "split_uri"]

_SCHEME = "s3://"
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
_REFUSED = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


class InputUnavailableError(DatasetError, TransientServiceError):
    """The input's S3 endpoint failed after botocore's retries (down, timing out, 5xx)."""


def is_remote(source: str | os.PathLike[str]) -> bool:
    """True for an ``s3://`` URI."""
    return str(source).startswith(_SCHEME)


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; the key without leading or trailing slashes."""
    bucket, _, key = uri[len(_SCHEME):].partition("/")
    if not bucket:
        raise DatasetError(f"{uri}: no bucket; address S3 inputs as s3://bucket/prefix")
    return bucket, key.strip("/")


@functools.lru_cache(maxsize=4)
def _client(endpoint: str | None) -> Any:
    import boto3
    from botocore.config import Config

    attempts = os.environ.get("AWS_MAX_ATTEMPTS", "")
    mode = os.environ.get("AWS_RETRY_MODE", "standard")
    retries = {"mode": mode if mode in ("standard", "adaptive") else "standard",
               "total_max_attempts": int(attempts) if attempts.isdigit() else 4}
    return boto3.session.Session().client("s3", config=Config(
        retries=retries, connect_timeout=3, read_timeout=30, max_pool_connections=32))


def _s3() -> Any:
    """One client per process and endpoint (tasks of a worker share it)."""
    return _client(os.environ.get("AWS_ENDPOINT_URL"))


def _fault(uri: str, e: Exception) -> Exception:
    """``e`` (a botocore error) as the error the caller should see."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if code in _NOT_FOUND:
            return FileNotFoundError(errno.ENOENT, "no such object", uri)
        if code in _REFUSED:
            return PermissionError(errno.EACCES, f"access refused ({code})", uri)
        if code == "NoSuchBucket":
            return DatasetError(f"{uri}: the bucket does not exist; check the data URI")
        if 400 <= status < 500 and status != 429:
            return DatasetError(f"{uri}: S3 refused the request ({code or status})")
    elif isinstance(e, NoCredentialsError):
        return DatasetError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or an AWS profile)")
    elif not isinstance(e, BotoCoreError):
        return e
    return InputUnavailableError(f"{uri}: S3 failed after botocore's retries "
                                 f"({type(e).__name__}); is AWS_ENDPOINT_URL up? The task is "
                                 "retried later")


def read_bytes(source: str | os.PathLike[str]) -> bytes:
    """The bytes of a local file or an ``s3://`` object."""
    if not is_remote(source):
        return Path(source).read_bytes()
    uri = str(source)
    bucket, key = split_uri(uri)
    try:
        return bytes(_s3().get_object(Bucket=bucket, Key=key)["Body"].read())
    except Exception as e:
        raise _fault(uri, e) from None


def list_keys(uri: str) -> list[str]:
    """Every object key under the folder ``uri`` (``s3://bucket/prefix``), sorted, as
    paths relative to it; folder markers (keys ending in ``/``) left out."""
    bucket, prefix = split_uri(uri)
    head = f"{prefix}/" if prefix else ""
    keys: list[str] = []
    try:
        for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=head):
            keys += [o["Key"][len(head):] for o in page.get("Contents", [])
                     if not o["Key"].endswith("/")]
    except Exception as e:
        raise _fault(uri, e) from None
    return sorted(keys)
