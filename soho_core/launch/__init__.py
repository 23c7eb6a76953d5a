"""Launching a distributed training command: as a Kubeflow PyTorchJob on a cluster
(:mod:`soho_core.launch.pytorchjob`, :mod:`soho_core.launch.watch`) or with torchrun on
this machine (:mod:`soho_core.launch.local`). Both run the same ``soho`` arguments under
``torch.distributed.run``; only how the processes are started differs."""

from __future__ import annotations


def soho_args(command: str, preset: str, data: str, out: str, overrides: list[str] | tuple[str, ...] = (),
              init: str | None = None, task: str | None = None) -> list[str]:
    """The ``soho`` arguments of one training run, shared by every launcher.

    ``command`` is ``pretrain`` or ``finetune``; ``overrides`` are ``a.b=c`` config settings.
    """
    if command not in ("pretrain", "finetune"):
        raise ValueError(f"unknown training command {command!r}; valid: pretrain, finetune")
    args = [command]
    if task:
        args += ["--task", task]
    args += ["--config", preset, "--data", data, "--out", out]
    if init:
        args += ["--init", init]
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not of the form key=value")
        args += ["--set", item]
    return args
