"""The cores of one machine shared among the training processes of a local run.

A local run that trains two tasks at once gives each one core (``SOHO_TASK_THREADS``); when one
of them ends first, the other would go on with one core while the second one idles. With
``SOHO_CPU_SHARE`` naming a folder, each training or evaluation process keeps a file there named
by its process id while it runs, and every few seconds sets its threads to the machine's cores
divided by the processes that are still alive, so the last one running gets every core.
A process that dies without removing its file is recognised by its id and no longer counted.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from soho_core.env import runtime_env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class CpuShare:
    """This process's share of ``cores`` among the live processes registered in ``folder``."""

    def __init__(self, folder: str, cores: int | None = None, every_s: float = 5.0, pid: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cores = cores or os.cpu_count() or 1
        self.every_s = every_s
        self.pid = pid or os.getpid()
        self.entry = self.folder / str(self.pid)
        self.entry.write_text("")
        self.threads = 0
        self._next = 0.0

    @classmethod
    def from_env(cls) -> "CpuShare | None":
        folder = runtime_env().cpu_share
        return cls(folder) if folder else None

    def sharers(self) -> int:
        """The live processes registered here, this one included; files of dead ones are removed."""
        live = 0
        for entry in self.folder.iterdir():
            if not entry.name.isdigit():
                continue
            if int(entry.name) == self.pid or _alive(int(entry.name)):
                live += 1
            else:
                entry.unlink(missing_ok=True)
        return max(1, live)

    def rebalance(self, force: bool = False) -> int:
        """At most every ``every_s`` seconds (always with ``force``): this process's threads set to
        its share of the cores; returns them."""
        now = time.monotonic()
        if force or now >= self._next:
            self._next = now + self.every_s
            threads = max(1, self.cores // self.sharers())
            if threads != self.threads:
                torch.set_num_threads(threads)
                self.threads = threads
        return self.threads

    def close(self) -> None:
        self.entry.unlink(missing_ok=True)

    def __enter__(self) -> "CpuShare":
        self.rebalance(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
