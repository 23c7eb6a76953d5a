"""torchrun semantics in one function: single process, ``torchrun --nproc-per-node N``, or a
multi-node PyTorchJob all go through :func:`init_distributed`. gloo on CPU, nccl on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from soho_core.env import runtime_env


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    env = runtime_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device='cuda' but no CUDA device is visible")
        torch.cuda.set_device(env.local_rank)
        dev = torch.device("cuda", env.local_rank)
    else:
        dev = torch.device("cpu")
    if env.world_size > 1 and not dist.is_initialized():
        backend, timeout = ("nccl" if dev.type == "cuda" else "gloo"), timedelta(minutes=10)
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend, store=_attempt_store(env.rank, env.world_size, env.torchelastic_restart,
                                                                 timeout),
                                    rank=env.rank, world_size=env.world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return DistInfo(env.rank, env.local_rank, env.world_size, dev)


def _attempt_store(rank: int, world_size: int, attempt: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store of this torchrun attempt, under a prefix of its own.

    torchrun keeps one TCP store for the whole job (the agent's, shared with the workers) and
    every restarted worker group finds the keys the previous group wrote there. Without a
    prefix per attempt, a restarted worker can read the address a dead peer published and fail
    with "Gloo connectFullMesh failed ... Connection refused", which costs a restart each time.

    The attempt count is the node's own, so it agrees across nodes only while they restart
    together. A replaced pod starts counting at 0 while the others are at 1 or more; with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (set in every training pod, see
    :data:`soho_core.launch.pytorchjob.NODE_ENV`) rank 0 hosts a new store on a new port in
    every round, which holds no old keys, so no prefix is needed and none is used.
    """
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"soho/attempt-{attempt}" if agent_hosts else "soho/round", store)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
