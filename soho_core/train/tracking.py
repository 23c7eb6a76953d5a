"""What a run reports: one JSON object per logged step in ``metrics.jsonl`` (rank 0 only)."""

from __future__ import annotations

import json
import math
from typing import Any

from soho_core import storage


class MetricsLog:
    """Appends JSON lines to OUT/metrics.jsonl. Object stores cannot append, so there the
    whole (small) file is rewritten on each write; locally lines are appended."""

    def __init__(self, out_uri: str, enabled: bool = True):
        self.uri = storage.join(out_uri, "metrics.jsonl")
        self.enabled = enabled
        self.local = storage.is_local(out_uri)
        self.lines: list[str] = []
        if enabled and not self.local and storage.exists(self.uri):
            self.lines = storage.read_bytes(self.uri).decode().splitlines()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = json.dumps(clean, sort_keys=False)
        if self.local:
            with storage.open_uri(self.uri, "ab") as f:
                f.write((line + "\n").encode())
        else:
            self.lines.append(line)
            storage.write_bytes_atomic(self.uri, ("\n".join(self.lines) + "\n").encode())


def read_metrics(out_uri: str) -> list[dict[str, Any]]:
    uri = storage.join(out_uri, "metrics.jsonl")
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
