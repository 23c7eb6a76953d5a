"""Run a training command with torchrun on this machine: the local stand-in for a PyTorchJob.

    from soho_core.launch.local import run_torchrun
    run_torchrun(soho_args("pretrain", "tiny", SHARDS, RUN), procs=2, timeout_s=3600)

The same ``python -m torch.distributed.run ... -m soho_core <args>`` a PyTorchJob runs,
with ``--standalone`` instead of a rendezvous at a Master. Output streams to this
process's stdout (the step's log); a non-zero exit or the timeout raises, and on timeout
or interruption the whole process group is killed so no trainer is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Sequence


class LocalRunError(RuntimeError):
    """torchrun exited with an error or ran past its timeout; the message says which."""


def torchrun_argv(soho_args: Sequence[str], procs: int = 1, max_restarts: int = 0) -> list[str]:
    """torchrun's elastic launcher on this machine: ``procs`` workers, and when one fails, the whole
    group restarted up to ``max_restarts`` times (training resumes from its latest checkpoint)."""
    if procs < 1:
        raise ValueError(f"procs={procs} must be >= 1")
    if max_restarts < 0:
        raise ValueError(f"max_restarts={max_restarts} must be >= 0")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
            f"--max-restarts={max_restarts}", "-m", "soho_core", *soho_args]


def run_torchrun(soho_args: Sequence[str], procs: int = 1, timeout_s: float | None = None,
                 env: dict[str, str] | None = None, max_restarts: int = 0) -> None:
    """Run ``soho <soho_args>`` under torchrun with ``procs`` processes; raise :class:`LocalRunError`
    on failure. ``env`` adds plain settings (wandb project and group) to this process's environment."""
    argv = torchrun_argv(soho_args, procs, max_restarts)
    full_env = {**os.environ, **(env or {})}
    # Processes share the cores: one OpenMP thread pool each, sized so they do not oversubscribe.
    full_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    print("running: " + " ".join(argv[1:]), flush=True)
    proc = subprocess.Popen(argv, env=full_env, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise LocalRunError(f"torchrun ({' '.join(soho_args[:1])}) did not finish within {timeout_s:.0f} s; killed")
    except BaseException:
        _kill_group(proc)
        raise
    if code != 0:
        raise LocalRunError(f"torchrun ({' '.join(soho_args)}) exited with code {code}")


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop torchrun and its workers (they share the new session's process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
