"""The tasks by name, for the CLI and the pipeline. An unknown name lists the valid ones."""

from __future__ import annotations

from soho_core.tasks.base import Task

DOWNSTREAM = ("vqa", "nlvr2", "retrieval", "ve")


def get_task(name: str) -> Task:
    if name == "pretrain":
        from soho_core.tasks.pretrain import PretrainTask

        return PretrainTask()
    if name == "vqa":
        from soho_core.tasks.vqa import VQATask

        return VQATask()
    if name == "ve":
        from soho_core.tasks.ve import VETask

        return VETask()
    if name == "nlvr2":
        from soho_core.tasks.nlvr2 import NLVR2Task

        return NLVR2Task()
    if name == "retrieval":
        from soho_core.tasks.retrieval import RetrievalTask

        return RetrievalTask()
    raise ValueError(f"unknown task {name!r}; valid: pretrain, {', '.join(DOWNSTREAM)}")
