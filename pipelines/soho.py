"""The SOHO pipeline: data -> shard (per task) -> pretrain -> fine-tune per task (fan-out)
-> evaluate per task -> report.

    soho pipeline compile --out pipeline.yaml       # upload in the Kubeflow UI
    soho pipeline run --local --preset demo          # the same DAG on this machine (kfp.local)

Its defaults run anywhere (the synthetic world, the ``demo`` preset, one CPU node); a
cluster run sets ``store_root`` to an ``s3://`` URI, a bigger ``preset``, ``nodes`` and
``gpus_per_node``. Credentials never pass through parameters: every step that touches the
store gets the S3 Secret (``s3_secret``: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``) as environment variables, training steps also the wandb Secret
(``WANDB_API_KEY``). Data preparation is cached (its outputs depend only on its
inputs); training, evaluation and the report are not. The I/O steps retry.
"""

from typing import List

from kfp import dsl, kubernetes

from components import IMAGE
from components.data import data
from components.evaluate import evaluate
from components.finetune import finetune
from components.pretrain import pretrain
from components.report import report
from components.shard import shard

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
GPU = "nvidia.com/gpu"


def _store_access(task: dsl.PipelineTask, s3_secret) -> dsl.PipelineTask:
    # Optional: a store on a mounted volume or a local run needs no S3 keys.
    return kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env={k: k for k in S3_KEYS},
                                        optional=True)


def _io_step(task: dsl.PipelineTask, s3_secret, cache: bool) -> dsl.PipelineTask:
    _store_access(task, s3_secret)
    task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)
    task.set_caching_options(cache)
    task.set_cpu_limit("2").set_memory_limit("8Gi")
    return task


def build_pipeline(parallelism: int = 0):
    """The pipeline, with at most ``parallelism`` downstream tasks at a time (0: all at once, as on
    a cluster; a local run on a few cores takes 1). Everything else is the same DAG."""

    @dsl.pipeline(name="soho-downstream", description="per task: shard, fine-tune, evaluate; then the report")
    def downstream(dataset: str, pretrain_run: str, store_root: str, run_id: str, preset: str, tasks: List[str],
                   overrides: List[str], gpus_per_node: int, wandb_project: str, s3_secret: str,
                   wandb_secret: str) -> str:
        # A sub-pipeline so the loop's inputs are this graph's inputs: kfp.local (2.17) replaces an
        # upstream task's output passed straight into a ParallelFor with the loop item.
        with dsl.ParallelFor(tasks, parallelism=parallelism, name="tasks") as task:
            shard_task = shard(dataset=dataset, store_root=store_root, task=task)
            _io_step(shard_task, s3_secret, cache=True).set_display_name("shard")

            ft = finetune(task=task, preset=preset, shards=shard_task.output, init=pretrain_run,
                          store_root=store_root, run_id=run_id, overrides=overrides, procs=gpus_per_node,
                          wandb_project=wandb_project)
            _store_access(ft, s3_secret).set_caching_options(False).set_display_name("finetune")
            kubernetes.use_secret_as_env(ft, secret_name=wandb_secret,
                                         secret_key_to_env={"WANDB_API_KEY": "WANDB_API_KEY"}, optional=True)
            ft.set_accelerator_type(GPU).set_accelerator_limit(gpus_per_node)
            ft.set_cpu_limit("8").set_memory_limit("32Gi")
            kubernetes.empty_dir_mount(ft, volume_name="dshm", mount_path="/dev/shm", medium="Memory")

            ev = evaluate(task=task, checkpoint=ft.output, shards=shard_task.output, overrides=overrides)
            _store_access(ev, s3_secret).set_caching_options(False).set_display_name("evaluate")
            ev.set_retry(num_retries=2, backoff_duration="30s")
            # Evaluation runs on CPU: a GPU limit set from a pipeline parameter used only in resources
            # is not resolved inside a ParallelFor by kfp.local 2.17 ("parent input not found").
            ev.set_cpu_limit("4").set_memory_limit("16Gi")

        report_task = report(pretrain_run=pretrain_run, metrics_uris=dsl.Collected(ev.outputs["metrics_uri"]),
                             dataset=dataset, store_root=store_root, run_id=run_id)
        _io_step(report_task, s3_secret, cache=False).set_display_name("report")
        return report_task.outputs["Output"]

    @dsl.pipeline(name="soho", description="SOHO vision-language pre-training, fine-tuning on every task, report")
    def soho_pipeline(
        data_source: str = "synthetic",
        store_root: str = "s3://soho",
        preset: str = "demo",
        tasks: List[str] = ["vqa", "nlvr2", "retrieval", "ve"],
        nodes: int = 1,
        procs_per_node: int = 1,
        gpus_per_node: int = 0,
        wandb_project: str = "soho",
        overrides: List[str] = [],
        num_images: int = 2000,
        image_size: int = 128,
        min_objects: int = 2,
        max_objects: int = 4,
        seed: int = 0,
        launcher: str = "pytorchjob",
        training_runtime: str = "torch-distributed",
        namespace: str = "",
        s3_secret: str = "soho-s3",
        wandb_secret: str = "soho-wandb",
        pretrain_timeout_s: int = 604800,
    ) -> str:
        """Returns the URI of the run's report.md. ``data_source`` is ``synthetic`` (the built-in
        world; ``num_images``, ``image_size``, ``min_objects``, ``max_objects`` and ``seed`` size it),
        ``official`` (download COCO, VG, VQA v2, Karpathy, NLVR2, SNLI-VE as the tasks need into
        ``store_root``; NLVR2 and Flickr30K images are user-provided) or the URI of a dataset already
        in place. ``tasks`` are any of vqa, nlvr2, retrieval, ve;
        ``overrides`` are ``a.b=c`` config settings for every training (e.g. ``train.max_steps=100``);
        ``launcher`` is ``pytorchjob`` (Kubeflow training operator v1) or ``trainjob`` (Kubeflow Trainer v2,
        on the ClusterTrainingRuntime ``training_runtime``) on a cluster, ``torchrun`` on one machine."""
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # the run's id: its folder in the store and its wandb group

        data_task = data(source=data_source, store_root=store_root, num_images=num_images, seed=seed,
                         image_size=image_size, min_objects=min_objects, max_objects=max_objects, tasks=tasks)
        _io_step(data_task, s3_secret, cache=True).set_display_name("data")

        shard_pretrain = shard(dataset=data_task.output, store_root=store_root, task="pretrain")
        _io_step(shard_pretrain, s3_secret, cache=True).set_display_name("shard pretrain")

        pretrain_task = pretrain(preset=preset, shards=shard_pretrain.output, store_root=store_root, run_id=run_id,
                                 overrides=overrides, launcher=launcher, nodes=nodes, procs_per_node=procs_per_node,
                                 gpus_per_node=gpus_per_node, namespace=namespace, wandb_project=wandb_project,
                                 s3_secret=s3_secret, wandb_secret=wandb_secret, image=IMAGE,
                                 timeout_s=pretrain_timeout_s, training_runtime=training_runtime)
        # With launcher=pytorchjob or trainjob this pod only creates and watches the job (the GPUs are
        # the job's); with launcher=torchrun it trains itself.
        _store_access(pretrain_task, s3_secret).set_caching_options(False).set_display_name("pretrain")
        pretrain_task.set_cpu_limit("2").set_memory_limit("8Gi")
        kubernetes.use_secret_as_env(pretrain_task, secret_name=wandb_secret,
                                     secret_key_to_env={"WANDB_API_KEY": "WANDB_API_KEY"}, optional=True)

        rest = downstream(dataset=data_task.output, pretrain_run=pretrain_task.output, store_root=store_root,
                          run_id=run_id, preset=preset, tasks=tasks, overrides=overrides, gpus_per_node=gpus_per_node,
                          wandb_project=wandb_project, s3_secret=s3_secret,
                          wandb_secret=wandb_secret)
        rest.set_display_name("downstream tasks")
        return rest.output

    return soho_pipeline


soho_pipeline = build_pipeline()
