"""The fine-tuning step of one downstream task, initialised from the pre-training run."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finetune(task: str, preset: str, shards: Input[Dataset], init: Input[Model], store_root: str, run_id: str,
             model: Output[Model], overrides: List[str] = [], procs: int = 1, wandb_project: str = "",
             timeout_s: int = 604800):
    """``model`` stands for the fine-tuning run (``runs/<run_id>/<task>``: checkpoints/, metrics.jsonl)."""
    from soho_core.pipeline.steps import finetune as run
    from soho_core.pipeline.steps import location, publish

    publish(model, run(task, preset, location(shards), location(init), store_root, run_id, overrides, procs=procs,
                       wandb_project=wandb_project, timeout_s=timeout_s), task=task)
