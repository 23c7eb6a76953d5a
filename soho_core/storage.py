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


def check_bucket(uri: str) -> None:
    """Raise an error naming the bucket when ``uri`` is on S3 and its bucket does not exist or
    cannot be accessed; nothing for other URIs. Call it before work starts: s3fs would
    otherwise create a missing bucket on the first write, so a typo makes a new bucket."""
    if is_local(uri):
        return
    fs, path = fs_and_path(uri)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "s3" not in protocols:
        return
    bucket = path.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)  # s3fs turns 404 / 403 into the errors below
    except FileNotFoundError:
        raise FileNotFoundError(f"S3 bucket {bucket!r} does not exist (in {uri}): create it, or fix the URI") from None
    except PermissionError:
        raise PermissionError(f"S3 bucket {bucket!r} (in {uri}) exists but these credentials may not use it "
                              f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from None


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
