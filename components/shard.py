"""The shard step: one task's webdataset shards + index.json under the store."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def shard(dataset: str, store_root: str, task: str, shards: Output[Dataset], shard_max_count: int = 10000):
    """``shards`` stands for the shard root (``<root>/<task>/index.json`` is written last). ``dataset``
    is the data step's output: the synthetic world, or the official datasets (sharded with the
    task's readers: COCO and VG for pretrain, VQA v2, Karpathy COCO, NLVR2, SNLI-VE)."""
    from soho_core.pipeline.steps import publish, shard_task

    publish(shards, shard_task(dataset, store_root, task, shard_max_count=shard_max_count), task=task)
