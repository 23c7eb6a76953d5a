"""Checkpoints at any URI, published atomically.

    OUT/checkpoints/step-00000100.pt   the state (written whole, then published)
    OUT/checkpoints/latest.json        {"step", "file"}: the marker, written last

Readers go through ``latest.json`` only, so a checkpoint whose write was cut off
is never read. Loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch

from soho_core import storage

_NAME = re.compile(r"step-(\d{8})\.pt$")


def checkpoint_dir(out_uri: str) -> str:
    return storage.join(out_uri, "checkpoints")


def save_checkpoint(out_uri: str, step: int, state: dict[str, Any], keep: int = 2) -> str:
    folder = checkpoint_dir(out_uri)
    name = f"step-{step:08d}.pt"
    buf = io.BytesIO()
    torch.save(state, buf)
    uri = storage.join(folder, name)
    storage.write_bytes_atomic(uri, buf.getvalue())
    storage.write_json_atomic(storage.join(folder, "latest.json"), {"step": step, "file": name})
    _prune(folder, keep)
    return uri


def _prune(folder: str, keep: int) -> None:
    fs, path = storage.fs_and_path(folder)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    steps = sorted(int(m.group(1)) for n in names if (m := _NAME.match(n)))
    for step in steps[:-keep]:
        fs.rm(f"{path}/step-{step:08d}.pt")


def latest_checkpoint(out_uri: str) -> str | None:
    """URI of the newest published checkpoint under OUT, or None."""
    marker = storage.join(checkpoint_dir(out_uri), "latest.json")
    if not storage.exists(marker):
        return None
    return storage.join(checkpoint_dir(out_uri), storage.read_json(marker)["file"])


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the latest one published under a run folder."""
    if not uri.endswith(".pt"):
        found = latest_checkpoint(uri)
        if found is None:
            raise FileNotFoundError(f"no published checkpoint under {uri!r} (checkpoints/latest.json missing)")
        uri = found
    if not storage.exists(uri):
        raise FileNotFoundError(f"checkpoint {uri!r} does not exist")
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location=map_location, weights_only=True)
