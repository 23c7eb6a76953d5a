"""The pre-training step: a PyTorchJob (``launcher="pytorchjob"``) or a Trainer v2 TrainJob
(``launcher="trainjob"``) on the cluster, torchrun here."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretrain(preset: str, shards: Input[Dataset], store_root: str, run_id: str, model: Output[Model],
             overrides: List[str] = [], launcher: str = "pytorchjob", nodes: int = 1, procs_per_node: int = 1,
             gpus_per_node: int = 0, cpu_per_node: str = "8", memory_per_node: str = "32Gi", namespace: str = "",
             wandb_project: str = "", s3_secret: str = "soho-s3", wandb_secret: str = "soho-wandb",
             image: str = "", timeout_s: int = 604800, training_runtime: str = "torch-distributed",
             tolerations: list = [], node_selector: dict = {}, image_pull_policy: str = "IfNotPresent",
             image_pull_secret: str = "", backbone: Input[Model] = None):
    """``model`` stands for the pre-training run (``runs/<run_id>/pretrain``: checkpoints/, metrics.jsonl).
    The job (a PyTorchJob, or a TrainJob on the ClusterTrainingRuntime ``training_runtime``) is
    watched to its end: failure, timeout or a vanished job fail this step, and cancel or timeout
    delete the job. ``image`` is the job pods' image (the pipeline passes the one this step runs),
    pulled with ``image_pull_policy`` and ``image_pull_secret``. ``cpu_per_node`` and
    ``memory_per_node`` size each node (requested and limited); with GPUs, the nodes also get
    ``tolerations`` and ``node_selector``. ``backbone`` (the backbone step's CNN; none, or an empty URI:
    the preset's) is the CNN the run starts from."""
    from soho_core.pipeline.steps import location, publish
    from soho_core.pipeline.steps import pretrain as run

    publish(model, run(preset, location(shards), store_root, run_id, overrides, launcher=launcher, nodes=nodes,
                       procs_per_node=procs_per_node, gpus_per_node=gpus_per_node, image=image, namespace=namespace,
                       wandb_project=wandb_project, timeout_s=timeout_s, cpu_per_node=cpu_per_node,
                       memory_per_node=memory_per_node, s3_secret=s3_secret, wandb_secret=wandb_secret,
                       training_runtime=training_runtime, tolerations=tolerations, node_selector=node_selector,
                       image_pull_policy=image_pull_policy, image_pull_secret=image_pull_secret,
                       backbone_weights=location(backbone) if backbone is not None else ""))
