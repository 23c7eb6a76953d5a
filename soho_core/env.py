"""Every environment variable the package reads, read here and nowhere else.

torchrun and the PyTorchJob operator set RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT; the AWS variables are read by botocore itself (see storage.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Set by the pipeline for its training processes (soho_core.pipeline.steps.tracking_env): the
# pipeline run id, which is also the wandb group of every training of that run.
PIPELINE_RUN_ID = "SOHO_PIPELINE_RUN_ID"
WANDB_GROUP = "WANDB_RUN_GROUP"  # wandb's own variable: wandb.init() reads it too
WANDB_PROJECT = "WANDB_PROJECT"
WANDB_MODE = "WANDB_MODE"  # wandb's own: "offline", "online", "disabled"
# Set by a local run that trains several downstream tasks at once (soho pipeline run --local
# --parallelism N): the CPU threads each of their fine-tunes and evaluations may use, so that
# together they do not oversubscribe the machine's cores.
TASK_THREADS = "SOHO_TASK_THREADS"
# Set with it: a local folder where those processes register while they run, so that each one
# takes its share of the cores among the live ones (soho_core.train.cpushare).
CPU_SHARE = "SOHO_CPU_SHARE"
# Fault tests only: "STEP:SECONDS" pauses halfway through writing step STEP's checkpoint, so a
# test can kill the writer mid-write.
FAULT_CHECKPOINT_PAUSE = "SOHO_FAULT_CHECKPOINT_PAUSE"


@dataclass(frozen=True)
class RuntimeEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    torchelastic_restart: int = 0  # how many times torchrun restarted this worker group
    wandb_api_key_set: bool = False  # the key itself is never kept
    pipeline_run_id: str = ""
    wandb_group: str = ""
    wandb_project: str = ""
    wandb_mode: str = ""
    fault_checkpoint_pause: tuple[int, float] | None = None
    task_threads: int = 0  # 0: as many as the process would use anyway
    cpu_share: str = ""  # "": no sharing


def runtime_env() -> RuntimeEnv:
    e = os.environ
    return RuntimeEnv(
        rank=int(e.get("RANK", "0")),
        world_size=int(e.get("WORLD_SIZE", "1")),
        local_rank=int(e.get("LOCAL_RANK", "0")),
        torchelastic_restart=int(e.get("TORCHELASTIC_RESTART_COUNT", "0")),
        wandb_api_key_set=bool(e.get("WANDB_API_KEY")),
        pipeline_run_id=e.get(PIPELINE_RUN_ID, ""),
        wandb_group=e.get(WANDB_GROUP, ""),
        wandb_project=e.get(WANDB_PROJECT, ""),
        wandb_mode=e.get(WANDB_MODE, ""),
        fault_checkpoint_pause=_step_and_seconds(e.get(FAULT_CHECKPOINT_PAUSE, "")),
        task_threads=_threads(e.get(TASK_THREADS, "")),
        cpu_share=e.get(CPU_SHARE, ""),
    )


def _threads(value: str) -> int:
    if not value:
        return 0
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{TASK_THREADS}={value!r}: expected a whole number >= 1")
    return n


def _step_and_seconds(value: str) -> tuple[int, float] | None:
    if not value:
        return None
    try:
        step, seconds = value.split(":")
        return int(step), float(seconds)
    except ValueError:
        raise ValueError(f"{FAULT_CHECKPOINT_PAUSE}={value!r}: expected STEP:SECONDS, e.g. 8:30") from None
