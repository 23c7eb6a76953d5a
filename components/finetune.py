"""The fine-tuning step of one downstream task, initialised from the pre-training run."""

from typing import List

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finetune(task: str, preset: str, shards: str, init: str, store_root: str, run_id: str,
             overrides: List[str] = [], procs: int = 1, wandb_project: str = "", timeout_s: int = 604800) -> str:
    """Returns the fine-tuning run URI (``runs/<run_id>/<task>``)."""
    from soho_core.pipeline.steps import finetune as run

    return run(task, preset, shards, init, store_root, run_id, overrides, procs=procs,
               wandb_project=wandb_project, timeout_s=timeout_s)
