"""Storage behind URIs: a local path, ``file://``, ``s3://`` or any other fsspec URI.

S3 endpoint and credentials come only from the standard AWS environment
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
...), which botocore reads itself; nothing here takes them as arguments, so they
never reach logs or compiled pipeline YAML.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Any

import fsspec


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


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write so that no reader ever sees a partial file.

    Locally: a temporary file in the same folder, then ``os.replace``. On object
    stores a single PUT is already all-or-nothing, so the object is written directly.
    """
    if is_local(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with open_uri(uri, "wb") as f:
            f.write(data)


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
