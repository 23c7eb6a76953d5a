"""The SOHO pipeline: data -> shard (per task), CNN warm start -> pretrain -> fine-tune per task (fan-out)
-> evaluate per task -> report.

    soho pipeline compile --out pipeline.yaml       # upload in the Kubeflow UI
    soho pipeline compile --out pipelines/soho.yaml  # the reviewed copy (a test compares the two)
    soho pipeline run --local --preset demo          # the same DAG on this machine (kfp.local)

Its defaults run anywhere (the synthetic world, the ``demo`` preset, one CPU node); a
cluster run sets ``store_root`` to an ``s3://`` URI, a bigger ``preset``, ``nodes`` and
``gpus_per_node``. Credentials never pass through parameters: every step that touches the
store gets the S3 Secret (``s3_secret``: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``) as environment variables, training steps also the wandb Secret
(``WANDB_API_KEY``). Data preparation is cached (its outputs depend only on its
inputs); training, evaluation and the report are not.

Every step retries (I/O steps 3 times, training and evaluation twice, with growing back-off), and
a retry is safe: data and shards already complete are kept, a retried training resumes from the
latest checkpoint in its run folder, and a retried pre-training watcher follows the job it
created. An exit handler (``finish``) runs once everything else has ended, however it ended:
unless the run succeeded it deletes a pre-training job still running (its watcher may have died
without deleting it), then it writes the final state to ``runs/<run id>/status.json``. (Whether
a backend runs exit handlers when a run is cancelled is its own affair; the cancelled watcher
deletes its job itself, on the SIGTERM.)

Every pod requests what it needs and is limited: I/O steps and the report by the sizes below,
a pod that only watches a training job by a small size, and every training or evaluation pod
(and each node of the pre-training job) by ``cpu_per_node`` and ``memory_per_node``, requested
and limited alike so that a training pod is never the first evicted. Pods that ask for GPUs also
get ``gpu_tolerations`` and ``gpu_node_selector``; training and evaluation pods get a
memory-backed ``/dev/shm`` of a bounded size for the data loader workers.

Every pod, the training jobs' included, runs one image, chosen when the pipeline is compiled
(:func:`build_pipeline`: by tag or by digest, with a pull policy and an optional pull Secret
named, never its contents).

Shards, checkpoints and metrics pass between the steps as typed artifacts (``Dataset``, ``Model``,
``Metrics``; the report also as ``Markdown`` and ``HTML``), so the UI draws the lineage from the
shards to the report. Each is a small pointer to its location in the store, written under the
pipeline root (by default ``<store_root>/pipeline-root``, also chosen when compiling or submitting);
the data stays where the steps wrote it (:func:`soho_core.pipeline.steps.publish`).
"""

from dataclasses import dataclass
from typing import List

from kfp import dsl, kubernetes
from kfp.dsl import Input, Model

from components import IMAGE
from components.backbone import backbone
from components.data import data
from components.evaluate import evaluate
from components.finetune import finetune
from components.finish import finish
from components.pretrain import pretrain
from components.report import report
from components.shard import shard
from soho_core.launch.pytorchjob import JobSpec, check_image
from soho_core.pipeline.runner import default_pipeline_root

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
STORE_ROOT = "s3://soho"  # the default store_root
GPU = "nvidia.com/gpu"
# The taint GKE puts on GPU nodes, a common convention elsewhere; tolerating it only permits GPU nodes.
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
SHM_TRAIN = JobSpec.shm_size  # the same /dev/shm as each node of the pre-training job
SHM_EVALUATE = "2Gi"


@dataclass(frozen=True)
class Size:
    """A pod's CPU and memory: what the scheduler reserves (request) and the most it may use (limit)."""

    cpu: str
    memory: str
    cpu_limit: str
    memory_limit: str


IO_POD = Size("1", "2Gi", "2", "8Gi")  # data and shard: render, decode, pack images; bursts of CPU
REPORT_POD = Size("500m", "1Gi", "1", "4Gi")  # reads metrics, draws plots
WATCHER_POD = Size("100m", "256Mi", "500m", "512Mi")  # creates a job and polls it (about 100 MiB)


def _size(task: dsl.PipelineTask, size: Size) -> dsl.PipelineTask:
    return (task.set_cpu_request(size.cpu).set_cpu_limit(size.cpu_limit)
            .set_memory_request(size.memory).set_memory_limit(size.memory_limit))


def _node_size(task: dsl.PipelineTask, cpu, memory, shm: str) -> dsl.PipelineTask:
    """A training or evaluation pod: a whole node's share, requested and limited alike, and /dev/shm
    (the default 64 MiB is too small for data loader workers passing image batches)."""
    # kfp 2.17 declares a parameter used only in resources as an input of a ParallelFor's graph only
    # when the task registers it; without, the loop lacks it (kfp.local: "parent input not found").
    task.register_pipeline_channels([cpu, memory])
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    return kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                      size_limit=shm)


def _gpus(task: dsl.PipelineTask, gpus, tolerations, node_selector) -> dsl.PipelineTask:
    task.set_accelerator_type(GPU).set_accelerator_limit(gpus)
    kubernetes.add_toleration_json(task, tolerations)
    return kubernetes.add_node_selector_json(task, node_selector)


def _image(task: dsl.PipelineTask, image: str, pull_policy: str, pull_secret: str) -> dsl.PipelineTask:
    task.set_container_image(image)
    kubernetes.set_image_pull_policy(task, pull_policy)
    return kubernetes.set_image_pull_secrets(task, [pull_secret]) if pull_secret else task


def _store_access(task: dsl.PipelineTask, s3_secret) -> dsl.PipelineTask:
    # Optional: a store on a mounted volume or a local run needs no S3 keys.
    return kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env={k: k for k in S3_KEYS},
                                        optional=True)


def _wandb_access(task: dsl.PipelineTask, wandb_secret) -> dsl.PipelineTask:
    return kubernetes.use_secret_as_env(task, secret_name=wandb_secret,
                                        secret_key_to_env={"WANDB_API_KEY": "WANDB_API_KEY"}, optional=True)


def _retry(task: dsl.PipelineTask, times: int, backoff: str) -> dsl.PipelineTask:
    return task.set_retry(num_retries=times, backoff_duration=backoff, backoff_factor=2.0)


def _io_step(task: dsl.PipelineTask, s3_secret, cache: bool, backoff: str, size: Size = IO_POD) -> dsl.PipelineTask:
    _store_access(task, s3_secret)
    _retry(task, 3, backoff).set_caching_options(cache)
    return _size(task, size)


def build_pipeline(parallelism: int = 0, image: str = IMAGE, image_pull_policy: str = "IfNotPresent",
                   image_pull_secret: str = "", retry_backoff: str = "30s",
                   pipeline_root: str = default_pipeline_root(STORE_ROOT)):
    """The pipeline, with at most ``parallelism`` downstream tasks at a time (0: all at once, as on
    a cluster; a local run on a few cores takes 1). Everything else is the same DAG. Every pod runs
    ``image`` (``registry/name:tag`` or ``registry/name@sha256:<digest>``), pulled with
    ``image_pull_policy`` and, when named, the Secret ``image_pull_secret``. A failed step is
    retried after ``retry_backoff``, doubled at each further try (a local run has no node to wait
    for: ``"0s"``). KFP keeps the run's artifacts under ``pipeline_root`` unless the run names another."""
    check_image(image, image_pull_policy, image_pull_secret)
    pulled = (image, image_pull_policy, image_pull_secret)

    @dsl.pipeline(name="soho-downstream", description="per task: shard, fine-tune, evaluate; then the report")
    def downstream(dataset: str, pretrain_run: Input[Model], store_root: str, run_id: str, preset: str,
                   tasks: List[str], overrides: List[str], gpus_per_node: int, cpu_per_node: str, memory_per_node: str,
                   gpu_tolerations: list, gpu_node_selector: dict, wandb_project: str, s3_secret: str,
                   wandb_secret: str):
        # A sub-pipeline so the loop's inputs are this graph's inputs: kfp.local (2.17) replaces an
        # upstream task's output passed straight into a ParallelFor with the loop item.
        with dsl.ParallelFor(tasks, parallelism=parallelism, name="tasks") as task:
            shard_task = shard(dataset=dataset, store_root=store_root, task=task)
            _io_step(shard_task, s3_secret, cache=True, backoff=retry_backoff).set_display_name("shard")
            _image(shard_task, *pulled)

            ft = finetune(task=task, preset=preset, shards=shard_task.outputs["shards"], init=pretrain_run,
                          store_root=store_root, run_id=run_id, overrides=overrides, procs=gpus_per_node,
                          wandb_project=wandb_project)
            _store_access(ft, s3_secret).set_caching_options(False).set_display_name("finetune")
            _retry(ft, 2, retry_backoff)  # resumes from the task's latest checkpoint in runs/<run id>/<task>
            _image(ft, *pulled)
            _wandb_access(ft, wandb_secret)
            _node_size(ft, cpu_per_node, memory_per_node, SHM_TRAIN)
            _gpus(ft, gpus_per_node, gpu_tolerations, gpu_node_selector)

            ev = evaluate(task=task, checkpoint=ft.outputs["model"], shards=shard_task.outputs["shards"],
                          overrides=overrides)
            _store_access(ev, s3_secret).set_caching_options(False).set_display_name("evaluate")
            _image(ev, *pulled)
            _retry(ev, 2, retry_backoff)
            _node_size(ev, cpu_per_node, memory_per_node, SHM_EVALUATE)  # on CPU: no GPU, no GPU tolerations

        report_task = report(pretrain=pretrain_run, evaluations=dsl.Collected(ev.outputs["metrics"]),
                             dataset=dataset, store_root=store_root, run_id=run_id)
        _io_step(report_task, s3_secret, cache=False, backoff=retry_backoff, size=REPORT_POD).set_display_name("report")
        _image(report_task, *pulled)

    @dsl.pipeline(name="soho", description="SOHO vision-language pre-training, fine-tuning on every task, report",
                  pipeline_root=pipeline_root)
    def soho_pipeline(
        data_source: str = "synthetic",
        store_root: str = STORE_ROOT,
        preset: str = "demo",
        tasks: List[str] = ["vqa", "nlvr2", "retrieval", "ve"],
        nodes: int = 1,
        procs_per_node: int = 1,
        gpus_per_node: int = 0,
        cpu_per_node: str = "8",
        memory_per_node: str = "32Gi",
        gpu_tolerations: list = [GPU_TOLERATION],
        gpu_node_selector: dict = {},
        wandb_project: str = "soho",
        overrides: List[str] = [],
        num_images: int = 2000,
        image_size: int = 128,
        min_objects: int = 2,
        max_objects: int = 4,
        questions_per_image: int = 16,
        seed: int = 0,
        backbone_steps: int = 500,
        launcher: str = "pytorchjob",
        training_runtime: str = "torch-distributed",
        namespace: str = "",
        s3_secret: str = "soho-s3",
        wandb_secret: str = "soho-wandb",
        pretrain_timeout_s: int = 604800,
    ):
        """Writes the report to ``runs/<run id>/report/report.md`` and the run's final state to
        ``runs/<run id>/status.json`` under ``store_root``. ``data_source`` is ``synthetic`` (the built-in
        world; ``num_images``, ``image_size``, ``min_objects``, ``max_objects``, ``questions_per_image`` and
        ``seed`` size it),
        ``official`` (download COCO, VG, VQA v2, Karpathy, NLVR2, SNLI-VE as the tasks need into
        ``store_root``; NLVR2 and Flickr30K images are user-provided) or the URI of a dataset already
        in place. ``backbone_steps`` > 0 first trains the preset's CNN that many steps on the objects' shape,
        colour and size in a second synthetic world (the next ``seed``; with synthetic data only) and starts
        pre-training from it, as the release starts from ImageNet. ``tasks`` are any of vqa, nlvr2, retrieval, ve;
        ``overrides`` are ``a.b=c`` config settings for every training (e.g. ``train.max_steps=100``);
        ``launcher`` is ``pytorchjob`` (Kubeflow training operator v1) or ``trainjob`` (Kubeflow Trainer v2,
        on the ClusterTrainingRuntime ``training_runtime``) on a cluster, ``torchrun`` on one machine.
        ``cpu_per_node`` and ``memory_per_node`` size every training node and evaluation pod (Kubernetes
        quantities); ``gpu_tolerations`` (a list of tolerations) and ``gpu_node_selector`` (labels) go
        to the pods that ask for GPUs."""
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # the run's id: its folder in the store and its wandb group

        done = finish(store_root=store_root, run_id=run_id, launcher=launcher, namespace=namespace)
        _io_step(done, s3_secret, cache=False, backoff=retry_backoff, size=WATCHER_POD).set_display_name("finish")
        _image(done, *pulled)
        with dsl.ExitHandler(done, name="run"):
            data_task = data(source=data_source, store_root=store_root, num_images=num_images, seed=seed,
                             image_size=image_size, min_objects=min_objects, max_objects=max_objects, tasks=tasks,
                             questions_per_image=questions_per_image)
            _io_step(data_task, s3_secret, cache=True, backoff=retry_backoff).set_display_name("data")
            _image(data_task, *pulled)

            shard_pretrain = shard(dataset=data_task.output, store_root=store_root, task="pretrain")
            _io_step(shard_pretrain, s3_secret, cache=True, backoff=retry_backoff).set_display_name("shard pretrain")
            _image(shard_pretrain, *pulled)

            cnn = backbone(dataset=data_task.output, store_root=store_root, preset=preset, steps=backbone_steps,
                           overrides=overrides)
            _store_access(cnn, s3_secret).set_caching_options(True).set_display_name("backbone")
            _retry(cnn, 2, retry_backoff)
            _image(cnn, *pulled)
            _node_size(cnn, cpu_per_node, memory_per_node, SHM_TRAIN)
            _gpus(cnn, gpus_per_node, gpu_tolerations, gpu_node_selector)

            pretrain_args = dict(preset=preset, backbone=cnn.outputs["cnn"], shards=shard_pretrain.outputs["shards"],
                                 store_root=store_root, run_id=run_id, overrides=overrides, launcher=launcher, nodes=nodes,
                                 procs_per_node=procs_per_node, gpus_per_node=gpus_per_node, cpu_per_node=cpu_per_node,
                                 memory_per_node=memory_per_node, namespace=namespace, wandb_project=wandb_project,
                                 s3_secret=s3_secret, wandb_secret=wandb_secret, image=image,
                                 image_pull_policy=image_pull_policy, image_pull_secret=image_pull_secret,
                                 timeout_s=pretrain_timeout_s, training_runtime=training_runtime)

            def then_downstream(task: dsl.PipelineTask, name: str) -> None:
                """The pre-training step's settings, and the downstream tasks from its Model. They follow it
                in each branch, because an artifact does not leave branches reliably through dsl.OneOf:
                kfp.local 2.17 refuses it, KFP's backend 2.16 failed at run time (kubeflow/pipelines#13436)."""
                _store_access(task, s3_secret).set_caching_options(False).set_display_name(name)
                _retry(task, 2, retry_backoff)  # resumes from runs/<run id>/pretrain, or follows the job it created
                _wandb_access(task, wandb_secret)
                _image(task, *pulled)
                rest = downstream(dataset=data_task.output, pretrain_run=task.outputs["model"], store_root=store_root,
                                  run_id=run_id, preset=preset, tasks=tasks, overrides=overrides,
                                  gpus_per_node=gpus_per_node, cpu_per_node=cpu_per_node,
                                  memory_per_node=memory_per_node, gpu_tolerations=gpu_tolerations,
                                  gpu_node_selector=gpu_node_selector, wandb_project=wandb_project,
                                  s3_secret=s3_secret, wandb_secret=wandb_secret)
                rest.set_display_name("downstream tasks")

            # With launcher=torchrun the step's own pod trains: a training node's size, GPUs and /dev/shm.
            # Otherwise the pod only creates and watches the job (the job's nodes get the size, GPUs,
            # tolerations and node selector): a small pod.
            with dsl.If(launcher == "torchrun", name="pretrain-here"):
                here = pretrain(**pretrain_args)
                _node_size(here, cpu_per_node, memory_per_node, SHM_TRAIN)
                _gpus(here, gpus_per_node, gpu_tolerations, gpu_node_selector)
                then_downstream(here, "pretrain")
            with dsl.Else(name="pretrain-job"):
                job = pretrain(**pretrain_args, tolerations=gpu_tolerations, node_selector=gpu_node_selector)
                _size(job, WATCHER_POD)
                then_downstream(job, "pretrain (job)")

    return soho_pipeline


soho_pipeline = build_pipeline()
