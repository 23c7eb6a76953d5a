"""What a run reports: one JSON object per logged step in ``metrics.jsonl``, and the same
figures in wandb. Both from rank 0 only.

metrics.jsonl also holds one ``{"event": "resume", "step": S, ...}`` line each time a run
resumes from its checkpoint at step S; logged steps after S that the interrupted attempt
had already written appear again after that line, and the later line of a step is the
one that counts (:func:`read_metrics` keeps it).

wandb runs offline (a run folder under OUT/wandb when OUT is local, else under
``WANDB_DIR`` or the temporary folder; upload it later with ``wandb sync``) unless
``WANDB_API_KEY`` is set or ``WANDB_MODE`` says otherwise; ``WANDB_MODE=disabled`` turns it
off. The run id lives in every checkpoint (and in OUT/tracking.json from the first step
on), so a resumed job logs into the same run. A wandb failure is logged and tracking
stops; training never does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import uuid
from typing import Any

from soho_core import storage
from soho_core.env import runtime_env

log = logging.getLogger(__name__)
TRACKING_FILE = "tracking.json"


class MetricsLog:
    """Appends JSON lines to OUT/metrics.jsonl. Object stores cannot append, so there the
    whole (small) file is rewritten on each write; locally lines are appended. A failed
    write (the store unreachable) is retried, then left for the next write: no line is lost."""

    def __init__(self, out_uri: str, enabled: bool = True):
        self.uri = storage.join(out_uri, "metrics.jsonl")
        self.enabled = enabled
        self.local = storage.is_local(out_uri)
        self.lines: list[str] = []
        self.pending: list[str] = []
        if enabled and not self.local and storage.retrying(lambda: storage.exists(self.uri), f"reading {self.uri}"):
            self.lines = storage.retrying(lambda: storage.read_bytes(self.uri), f"reading {self.uri}").decode().splitlines()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.pending.append(json.dumps(clean, sort_keys=False))
        try:
            if self.local:
                with storage.open_uri(self.uri, "ab") as f:
                    f.write(("\n".join(self.pending) + "\n").encode())
            else:
                body = ("\n".join(self.lines + self.pending) + "\n").encode()
                storage.retrying(lambda: storage.write_bytes_atomic(self.uri, body), f"writing {self.uri}",
                                 attempts=3)
                self.lines += self.pending
        except Exception as err:  # noqa: BLE001 (keep training; the lines go out with the next write)
            log.warning("could not write %s (%s); %d line(s) kept for the next write", self.uri, err,
                        len(self.pending))
            return
        self.pending = []


def read_metrics(out_uri: str, events: bool = False) -> list[dict[str, Any]]:
    """The logged steps of a run, in step order, the last line of each step winning (a resumed
    run logs again the steps after its checkpoint). ``events=True``: every line as written."""
    uri = storage.join(out_uri, "metrics.jsonl")
    rows = [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
    if events:
        return rows
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        if "event" not in row:
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def tracking_run_id(out_uri: str, from_checkpoint: str | None) -> str:
    """The wandb run id of the run at OUT: the checkpoint's, else the one OUT/tracking.json
    recorded when the run first started, else a new one (recorded now, by rank 0)."""
    if from_checkpoint:
        return from_checkpoint
    uri = storage.join(out_uri, TRACKING_FILE)
    if storage.retrying(lambda: storage.exists(uri), f"reading {uri}"):
        found = storage.read_json(uri).get("wandb_run_id")
        if found:
            return found
    run_id = uuid.uuid4().hex[:12]
    if runtime_env().rank == 0:
        storage.retrying(lambda: storage.write_json_atomic(uri, {"wandb_run_id": run_id}), f"writing {uri}")
    return run_id


class WandbRun:
    """A wandb run that can never stop training: every call is guarded, and after the first
    failure tracking is off (with one warning)."""

    def __init__(self, enabled: bool, run_id: str, out_uri: str, job_type: str, config: dict[str, Any],
                 resumed: bool):
        self.run = None
        env = runtime_env()
        if not enabled or env.rank != 0 or env.wandb_mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.info("wandb is not installed; metrics go to metrics.jsonl only")
            return
        mode = env.wandb_mode or ("online" if env.wandb_api_key_set else "offline")
        if storage.is_local(out_uri):
            folder = out_uri[len("file://"):] if out_uri.startswith("file://") else out_uri
        else:
            folder = os.environ.get("WANDB_DIR") or tempfile.gettempdir()
        try:
            os.makedirs(folder, exist_ok=True)
            self.run = wandb.init(
                id=run_id, resume="allow", mode=mode, dir=folder, job_type=job_type,
                project=env.wandb_project or "soho", group=env.wandb_group or env.pipeline_run_id or None,
                name=f"{job_type}-{env.pipeline_run_id}" if env.pipeline_run_id else None,
                config=config, settings=wandb.Settings(console="off", silent=True))
            # Steps logged again after a resume are kept: the x axis is the trainer's step.
            self.run.define_metric("trainer/step")
            self.run.define_metric("*", step_metric="trainer/step")
            if resumed:
                self.run.summary["resumes"] = (self.run.summary.get("resumes") or 0) + 1
            print(f"wandb run {run_id} ({mode}) in {self.run.dir}", flush=True)
        except Exception as err:  # noqa: BLE001
            self._fail("start", err)

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        data = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        data["trainer/step"] = record["step"]
        try:
            self.run.log(data)
        except Exception as err:  # noqa: BLE001
            self._fail("log", err)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as err:  # noqa: BLE001
            self._fail("finish", err)
        self.run = None

    def _fail(self, what: str, err: Exception) -> None:
        log.warning("wandb %s failed (%s: %s); tracking continues in metrics.jsonl only", what,
                    type(err).__name__, err)
        self.run = None
