"""Storage behind URIs: a local path, ``file://``, ``s3://`` or any other fsspec URI.

S3 endpoint and credentials come only from the standard AWS environment
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
...), which botocore reads itself; nothing here takes them as arguments, so they
never reach logs or compiled pipeline YAML.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
import uuid
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that retrying cannot fix: a missing object or bucket, refused access, a bad argument.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
                    TypeError, KeyError)


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


S3_SECRET = "soho-s3"  # the Secret whose keys become a cluster pod's AWS_* variables (manifests/secrets)
_ON_CLUSTER = f"(on a cluster: in the Secret {S3_SECRET})"
_KEYS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
# Why a 403 happened, by S3 error code (AWS, MinIO and Ceph use the same codes).
_DENIED = {"InvalidAccessKeyId": f"this S3 service does not know AWS_ACCESS_KEY_ID: set {_KEYS} to its keys",
           "SignatureDoesNotMatch": "AWS_SECRET_ACCESS_KEY is not the secret of AWS_ACCESS_KEY_ID: set the pair "
                                    "that belongs together"}


class StorageError(OSError):
    """An S3 location cannot be used: no credentials, no answer from the endpoint, access denied
    or no such bucket. The message is one line naming the URI and what to set."""


class BucketMissingError(StorageError, FileNotFoundError):
    """The URI's bucket does not exist at the endpoint."""


class AccessDeniedError(StorageError, PermissionError):
    """The S3 service refused these credentials (403)."""


def check_access(uri: str, write: bool = False) -> None:
    """Raise a :class:`StorageError` when ``uri`` is on S3 and cannot be read (listed), or with
    ``write`` written; nothing for other URIs. Call it before work starts. The write check puts
    and deletes an empty object ``<uri>/.soho-write-check``: S3 cannot be asked about write access
    without writing. Few retries and short timeouts, so a wrong endpoint fails in seconds."""
    parts = urlsplit(uri)
    if parts.scheme not in ("s3", "s3a"):
        return
    import botocore.session
    from botocore import exceptions as bx
    from botocore.config import Config

    bucket, key = parts.netloc, parts.path.strip("/")
    config = Config(connect_timeout=5, read_timeout=15, retries={"mode": "standard", "max_attempts": 2})
    action = "list"
    try:
        client = botocore.session.Session().create_client("s3", config=config)
        client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        if write:
            action = "write to"
            probe = f"{key}/.soho-write-check" if key else ".soho-write-check"
            client.put_object(Bucket=bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=bucket, Key=probe)  # checkpoint pruning deletes too
    except ValueError as err:  # create_client: "Invalid endpoint: ..."
        raise StorageError(f"cannot use {uri}: {err}: set AWS_ENDPOINT_URL to the S3 service's http(s) URL, "
                           f"or unset it for AWS S3 {_ON_CLUSTER}") from None
    except (bx.NoCredentialsError, bx.PartialCredentialsError):
        raise StorageError(f"no S3 credentials for {uri}: set {_KEYS} {_ON_CLUSTER}") from None
    except (bx.ConnectionError, bx.HTTPClientError) as err:
        reason = ("TLS failed" if isinstance(err, bx.SSLError) else "timed out"
                  if isinstance(err, (bx.ConnectTimeoutError, bx.ReadTimeoutError)) else "connection refused or "
                  "unknown host")
        raise StorageError(f"cannot reach the S3 endpoint {client.meta.endpoint_url} ({reason}) for {uri}: set "
                           f"AWS_ENDPOINT_URL to the S3 service's URL, or unset it for AWS S3 {_ON_CLUSTER}") from None
    except bx.ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or status == 404:
            raise BucketMissingError(f"S3 bucket {bucket!r} does not exist at {client.meta.endpoint_url} (in {uri}): "
                                     f"create it, or fix the URI or AWS_ENDPOINT_URL {_ON_CLUSTER}") from None
        if status == 403:
            why = _DENIED.get(code, f"these keys may not {action} it ({code or 403}): let them in the bucket's or "
                                    f"the user's policy, or set {_KEYS} to keys that may")
            raise AccessDeniedError(f"S3 access to {uri} denied: {why} {_ON_CLUSTER}") from None
        raise StorageError(f"S3 refused {uri} at {client.meta.endpoint_url}: {code or status}") from None


def check_bucket(uri: str) -> None:
    """:func:`check_access` for reading. s3fs would create a missing bucket on the first write,
    so a typo makes a new bucket: library functions that write call this first."""
    check_access(uri)


def open_uri(uri: str, mode: str = "rb"):
    fs, path = fs_and_path(uri)
    if "w" in mode:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
    return fs.open(path, mode)


def read_bytes(uri: str) -> bytes:
    with open_uri(uri, "rb") as f:
        return f.read()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


TMP_MARK = ".tmp-"  # local temporary files are named <name>.tmp-<random>


def write_bytes_atomic(uri: str, data: bytes, pause_halfway_s: float = 0.0) -> None:
    """Write so that no reader ever sees a partial file.

    Locally: a temporary file in the same folder, then ``os.replace``. On object
    stores a single PUT (or a multipart upload, completed last) is already
    all-or-nothing, so the object is written directly. ``pause_halfway_s`` stops
    halfway through the write, for fault tests that kill a writer mid-write.
    """
    half = len(data) // 2 if pause_halfway_s > 0 else len(data)
    if is_local(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data[:half])
            if half < len(data):
                f.flush()
                time.sleep(pause_halfway_s)
                f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with open_uri(uri, "wb") as f:
            f.write(data[:half])
            if half < len(data):
                time.sleep(pause_halfway_s)
                f.write(data[half:])


def retrying(fn: Callable[[], T], what: str, attempts: int = 7, first_delay_s: float = 0.5,
             max_delay_s: float = 15.0) -> T:
    """``fn()``, tried again with exponential back-off (0.5, 1, 2, ... s, jittered; about 30 s in
    all by default) while it fails with a transient error: a connection refused or reset, a
    timeout, a 5xx. A permanent error (:data:`PERMANENT_ERRORS`) or the last failure is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except PERMANENT_ERRORS:
            raise
        except Exception as err:  # noqa: BLE001 (botocore, aiohttp and OS errors alike)
            if attempt == attempts:
                raise
            delay = min(max_delay_s, first_delay_s * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(err).__name__, err, attempt,
                        attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    return open_uri(url, mode)


def register_webdataset_openers() -> None:
    """Let webdataset read and write shards at any fsspec URI (it has no s3:// opener)."""
    gopen = sys.modules.get("webdataset.gopen")
    if gopen is None:
        import webdataset  # noqa: F401  (imports webdataset.gopen)

        gopen = sys.modules["webdataset.gopen"]
    for scheme in ("s3", "memory", "file", "gcs", "az", "abfs"):
        gopen.gopen_schemes[scheme] = _fsspec_gopen
