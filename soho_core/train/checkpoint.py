"""Checkpoints at any URI, published atomically.

    OUT/checkpoints/step-00000100.pt   the state (written whole, then published)
    OUT/checkpoints/latest.json        {"step", "file", "bytes"}: the marker, written last

A checkpoint file is written under a temporary name and renamed (locally), or as one
all-or-nothing object upload (S3); only then is ``latest.json`` rewritten to name it.
Readers go through ``latest.json`` only, so a checkpoint whose write was cut off is
never read, and its size is checked against the marker. Every storage call is retried
with back-off on transient errors (:func:`soho_core.storage.retrying`). Loading uses
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import torch

from soho_core import storage

log = logging.getLogger(__name__)
_NAME = re.compile(r"step-(\d{8})\.pt$")
MARKER = "latest.json"


def checkpoint_dir(out_uri: str) -> str:
    return storage.join(out_uri, "checkpoints")


def save_checkpoint(out_uri: str, step: int, state: dict[str, Any], keep: int = 2,
                    pause_halfway_s: float = 0.0) -> str:
    """Write ``state`` as step ``step``'s checkpoint, publish it, and keep the newest ``keep``."""
    folder = checkpoint_dir(out_uri)
    name = f"step-{step:08d}.pt"
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    uri = storage.join(folder, name)
    storage.retrying(lambda: storage.write_bytes_atomic(uri, data, pause_halfway_s=pause_halfway_s),
                     f"writing checkpoint {uri}")
    marker = {"step": step, "file": name, "bytes": len(data)}
    storage.retrying(lambda: storage.write_json_atomic(storage.join(folder, MARKER), marker),
                     f"publishing checkpoint {uri}")
    try:
        prune(out_uri, step, keep)
    except Exception as err:  # noqa: BLE001 (a failed clean-up must not fail the run)
        log.warning("could not prune old checkpoints under %s: %s", folder, err)
    return uri


def prune(out_uri: str, published_step: int, keep: int) -> list[str]:
    """Delete checkpoints older than the newest ``keep`` published ones, any written after the
    published step by an attempt that died before publishing, and leftover temporary files."""
    fs, path = storage.fs_and_path(checkpoint_dir(out_uri))
    if not fs.exists(path):
        return []
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True)]
    steps = sorted(int(m.group(1)) for n in names if (m := _NAME.match(n)))
    published = [s for s in steps if s <= published_step]
    doomed = [f"step-{s:08d}.pt" for s in published[:-keep] + [s for s in steps if s > published_step]]
    doomed += [n for n in names if storage.TMP_MARK in n]
    for name in doomed:
        fs.rm(f"{path}/{name}")
    return doomed


def clean_unpublished(out_uri: str) -> list[str]:
    """Remove what a writer killed mid-checkpoint left behind (temporary files, checkpoints
    never published); called by rank 0 before a (re)started run writes anything."""
    marker = storage.join(checkpoint_dir(out_uri), MARKER)
    if not storage.exists(storage.join(checkpoint_dir(out_uri))):
        return []
    step = storage.read_json(marker)["step"] if storage.exists(marker) else -1
    return prune(out_uri, step, keep=1 << 30)


def latest_checkpoint(out_uri: str) -> str | None:
    """URI of the newest published checkpoint under OUT, or None."""
    marker = storage.join(checkpoint_dir(out_uri), MARKER)
    if not storage.retrying(lambda: storage.exists(marker), f"looking for {marker}"):
        return None
    return storage.join(checkpoint_dir(out_uri), storage.retrying(lambda: storage.read_json(marker),
                                                                  f"reading {marker}")["file"])


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the latest one published under a run folder."""
    expected = None
    if not uri.endswith(".pt"):
        marker = storage.join(checkpoint_dir(uri), MARKER)
        found = latest_checkpoint(uri)
        if found is None:
            raise FileNotFoundError(f"no published checkpoint under {uri!r} (checkpoints/{MARKER} missing)")
        expected = storage.read_json(marker).get("bytes")
        uri = found
    if not storage.exists(uri):
        raise FileNotFoundError(f"checkpoint {uri!r} does not exist")
    data = storage.retrying(lambda: storage.read_bytes(uri), f"reading checkpoint {uri}")
    if expected is not None and len(data) != expected:
        raise ValueError(f"checkpoint {uri!r} has {len(data)} bytes but {MARKER} published {expected}: "
                         f"it was overwritten or damaged after publishing")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
