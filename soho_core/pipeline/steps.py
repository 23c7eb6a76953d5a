"""What each pipeline step does; the KFP components in ``components/`` only call these.

    data      prepare_data(source, store_root, ..., tasks)   -> dataset URI (synthetic | official | URI)
    backbone  warm_backbone(dataset, store_root, preset, steps) -> CNN weights URI ("" for none)
    shard     shard_task(dataset, store_root, task)          -> shard root URI
    pretrain  pretrain(preset, shards, store_root, run_id, launcher="torchrun"|"pytorchjob"|"trainjob", ...)
    finetune  finetune(task, preset, shards, init, store_root, run_id, ...)
    evaluate  evaluate(task, checkpoint, shards, overrides)  -> metrics.json contents (+ its URI)
    report    report(pretrain_run, metrics_uris, dataset, store_root, run_id) -> soho_core.report.Report
    finish    finish_run(store_root, run_id, state, ...)     -> runs/<run id>/status.json (the exit handler)

Every location is a URI under ``store_root`` (a local folder or ``s3://...``): datasets and
shards by their content (same source and size, same place: cacheable and shared between
runs), training runs by pipeline run id (``runs/<run id>/<step>``). Steps are idempotent
so a retried step is safe: data and shards already complete are kept (``manifest.json``
and ``index.json`` are written last), training resumes from its latest checkpoint, and a
retried pre-training step follows the job it created (the same name, :data:`PRETRAIN_JOB`).

Each step first checks the store (:func:`soho_core.storage.check_access`): without S3 credentials,
with a wrong endpoint, refused access or a missing bucket it ends with one ``soho: error: ...``
line in its log, not a traceback.

Shards, checkpoints and metrics travel between the components as typed KFP artifacts (``Dataset``,
``Model``, ``Metrics``) so the Kubeflow UI draws their lineage; the data never moves. Each artifact is
a pointer (:func:`publish`, :func:`location`): KFP's own small file under the pipeline root naming the
location in the store.

The run id is also the wandb group (``WANDB_RUN_GROUP``, with ``WANDB_PROJECT`` and
``SOHO_PIPELINE_RUN_ID``), set in the training processes' environment.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from soho_core import storage
from soho_core.env import runtime_env

if TYPE_CHECKING:
    from soho_core.report import Report

LAUNCHERS = ("torchrun", "pytorchjob", "trainjob")
PRETRAIN_JOB = "soho-pretrain"  # the pre-training job is named PRETRAIN_JOB-<run id>
SOURCES = ("synthetic", "official")
F = TypeVar("F", bound=Callable[..., Any])


def _storage_errors_in_one_line(step: F) -> F:
    """The step with a storage error ending the process with its one line (exit status 1), so the
    step's log says what to set instead of showing a traceback."""

    @functools.wraps(step)
    def run(*args, **kwargs):
        try:
            return step(*args, **kwargs)
        except storage.StorageError as err:
            raise SystemExit(f"soho: error: {err}") from None

    return run  # type: ignore[return-value]


def _check_store(reads: Sequence[str], writes: Sequence[str]) -> None:
    for uri in reads:
        storage.check_access(uri)
    for uri in writes:
        storage.check_access(uri, write=True)


def _check_task(task: str, valid: Sequence[str]) -> None:
    if task not in valid:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(valid)}")


def publish(artifact: Any, uri: str, **facts: str) -> None:
    """Make a KFP output artifact stand for ``uri`` in the store, copying nothing: its file holds
    ``{"uri": uri, **facts}``, and a Dataset's or Model's metadata too, for the UI (a Metrics
    artifact's metadata is its table of metrics).

    The artifact keeps the URI KFP gave it (under the pipeline root) rather than taking ``uri``:
    KFP's launcher (2.x) fails a step whose output artifact left the run's folder under the
    pipeline root ("does not have expected bucket prefix"), and it copies every input artifact
    into the consuming pod, which for shards or checkpoints would be the whole dataset or run.
    ``kfp.local`` would accept either; this way both run the same code."""
    record = {"uri": uri, **facts}
    os.makedirs(os.path.dirname(artifact.path), exist_ok=True)
    with open(artifact.path, "w") as f:
        json.dump(record, f)
    if artifact.schema_title != "system.Metrics":
        artifact.metadata.update(record)


def location(artifact: Any) -> str:
    """The store location an input artifact written by :func:`publish` stands for."""
    try:
        with open(artifact.path) as f:
            return json.load(f)["uri"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"artifact {artifact.name!r} ({artifact.uri}) names no location in the store: {err}") from None


def dataset_uri(store_root: str, num_images: int, seed: int, image_size: int, min_objects: int | None = None,
                max_objects: int | None = None, questions_per_image: int | None = None) -> str:
    """Where the synthetic world of these options lives: named by every option that is not the
    generator's default (None: the default), so two worlds never share a folder."""
    import inspect

    from soho_core.data.synthetic import synthesize

    default = {k: p.default for k, p in inspect.signature(synthesize).parameters.items()}
    lo = default["min_objects"] if min_objects is None else min_objects
    hi = default["max_objects"] if max_objects is None else max_objects
    questions = default["questions_per_image"] if questions_per_image is None else questions_per_image
    name = f"synthetic-n{num_images}-s{seed}-px{image_size}"
    if (lo, hi) != (default["min_objects"], default["max_objects"]):
        name += f"-obj{lo}to{hi}"
    if questions != default["questions_per_image"]:
        name += f"-q{questions}"
    return storage.join(store_root, "datasets", name)


def official_uri(store_root: str) -> str:
    return storage.join(store_root, "datasets", "official")


def _is_synthetic(dataset: str) -> bool:
    return storage.exists(storage.join(dataset, "manifest.json"))


@_storage_errors_in_one_line
def prepare_data(source: str, store_root: str, num_images: int = 2000, seed: int = 0, image_size: int = 128,
                 min_objects: int = 2, max_objects: int = 4, tasks: Sequence[str] = (),
                 download_sources=None, questions_per_image: int = 4) -> str:
    """The data step; returns the dataset URI the shard steps read.

    ``source``: ``"synthetic"`` renders the synthetic world under ``store_root/datasets/``;
    ``"official"`` downloads the official datasets that pre-training and ``tasks`` need into
    ``store_root/datasets/official`` (layout: :mod:`soho_core.data.official`); a URI names a
    dataset already in place: one written by ``soho data synth`` (it has ``manifest.json``) or a
    folder in the official layout (checked for the folders ``tasks`` need). ``download_sources``
    replaces the URL table (tests).
    """
    _check_store([source], [store_root])  # a source that is no URI is no S3 location either
    if source == "synthetic":
        from soho_core.data.synthetic import VERSION, synthesize

        out = dataset_uri(store_root, num_images, seed, image_size, min_objects, max_objects, questions_per_image)
        wanted = {"version": VERSION, "seed": seed, "num_images": num_images, "image_size": image_size,
                  "min_objects": min_objects, "max_objects": max_objects, "questions_per_image": questions_per_image}
        if storage.exists(storage.join(out, "manifest.json")):
            old = storage.read_json(storage.join(out, "manifest.json"))
            found = {k: old.get(k, old.get("options", {}).get(k)) for k in wanted}
            if found == wanted:
                print(f"dataset already complete at {out}", flush=True)
                return out
            print(f"{out} holds another world ({', '.join(f'{k}={found[k]}' for k in wanted if found[k] != wanted[k])}):"
                  f" rendering it again", flush=True)
        manifest = synthesize(out, num_images=num_images, seed=seed, image_size=image_size,
                              min_objects=min_objects, max_objects=max_objects,
                              questions_per_image=questions_per_image)
        print(json.dumps({"out": out, "counts": manifest["counts"]}), flush=True)
        return out
    if source == "official":
        from soho_core.data import official

        out = official_uri(store_root)
        datasets = official.download_for(out, tasks, sources=download_sources)
        print(json.dumps({"out": out, "datasets": datasets}), flush=True)
        return out
    if "://" in source or source.startswith("/"):
        if _is_synthetic(source):
            return source
        from soho_core.data import official

        try:
            official.check_layout(source, tasks)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"data source {source!r} is neither a dataset written by `soho data synth` "
                                    f"(no manifest.json) nor the official layout: {err}") from None
        return source
    raise ValueError(f"data source {source!r} is neither one of {', '.join(SOURCES)} nor a dataset URI")


def backbone_world(dataset: str) -> dict[str, Any] | None:
    """The synthetic world the CNN warm start trains on, for the synthetic ``dataset`` (None for
    any other): the same generator and size, the next seed, so none of its images is in ``dataset``."""
    if not _is_synthetic(dataset):
        return None
    manifest = storage.read_json(storage.join(dataset, "manifest.json"))
    options = manifest.get("options", {})
    return {"num_images": int(manifest["num_images"]), "seed": int(manifest["seed"]) + 1,
            "image_size": int(manifest["image_size"]), "min_objects": int(options.get("min_objects", 2)),
            "max_objects": int(options.get("max_objects", 4))}


@_storage_errors_in_one_line
def warm_backbone(dataset: str, store_root: str, preset: str, steps: int, overrides: Sequence[str] = ()) -> str:
    """The CNN warm-start step: the preset's CNN trained on the objects' shape, colour and size
    (:func:`soho_core.probe.probe`) in a second synthetic world, kept as a ``model.backbone.weights``
    file under ``store_root/backbones/``; returns its URI, or "" with nothing to do (``steps`` 0, or
    data without object labels, such as the official datasets: the preset's own CNN weights stand).

    This is what ImageNet weights are to the release, on a world of its own: the model is never
    evaluated on an image the CNN saw. The CNN's settings, image sizes, seed and device come from
    ``model.backbone.*``, ``data.*``, ``train.seed`` and ``train.device`` of ``overrides``; it trains
    with the preset's CNN optimizer (overrides often stop the CNN in pre-training:
    ``optim.backbone_lr=0``). The file is named by everything that decides it,
    so a rerun with the same inputs reuses it."""
    import hashlib

    from soho_core.config import load_config

    if steps < 0:
        raise ValueError(f"backbone_steps={steps}: must be >= 0 (0: no warm start)")
    cnn_overrides = [o for o in overrides if o.startswith(("model.backbone.", "data.", "train.seed=", "train.device="))
                     and not o.startswith("model.backbone.weights=")]  # the weights are what this step makes
    cfg = load_config(preset, cnn_overrides)
    _check_store([dataset], [store_root])
    if steps == 0:
        print("backbone_steps=0: the CNN starts as the preset says", flush=True)
        return ""
    world = backbone_world(dataset)
    if world is None:
        print(f"{dataset} has no object labels (not a synthetic world): the CNN starts as the preset says",
              flush=True)
        return ""
    world_uri = dataset_uri(store_root, world["num_images"], world["seed"], world["image_size"],
                            world["min_objects"], world["max_objects"])
    settings = cfg.to_dict()
    decided = json.dumps({"world": world, "steps": steps, "backbone": settings["model"]["backbone"],
                          "data": settings["data"], "optim": settings["optim"], "seed": cfg.train.seed}, sort_keys=True)
    out = storage.join(store_root, "backbones",
                       f"{world_uri.rstrip('/').rsplit('/', 1)[-1]}-{preset}-{steps}-"
                       f"{hashlib.sha256(decided.encode()).hexdigest()[:12]}.pt")
    if storage.exists(out):
        print(f"CNN already trained at {out}", flush=True)
        return out
    if not storage.exists(storage.join(world_uri, "manifest.json")):
        from soho_core.data.synthetic import synthesize

        synthesize(world_uri, **world)
    from soho_core.probe import format_curve, probe

    result = probe(world_uri, cfg, steps=steps, eval_every=max(1, steps // 5), save_backbone=out)
    print(format_curve(result), flush=True)
    print(json.dumps({"out": out, "world": world_uri, "held_out": result["curve"][-1]}), flush=True)
    return out


@_storage_errors_in_one_line
def shard_task(dataset: str, store_root: str, task: str, shard_max_count: int = 10_000) -> str:
    """The shard step for one task: shards under ``<store_root>/shards/<dataset name>/<task>``,
    from the synthetic world or, for the official layout, with the task's readers (pre-training:
    COCO and VG); returns the shard root (the folder holding every task's folder)."""
    from soho_core.data.shards import TASKS  # torch: kept out of the steps that only watch a job

    _check_task(task, TASKS)
    _check_store([dataset], [store_root])
    root = storage.join(store_root, "shards", dataset.rstrip("/").rsplit("/", 1)[-1])
    index_uri = storage.join(root, task, "index.json")
    synthetic = _is_synthetic(dataset)
    if storage.exists(index_uri):
        from soho_core.data.official import sources_of

        # An official task folder is complete once every one of its sources is merged in.
        if synthetic or sources_of(task) <= set(storage.read_json(index_uri).get("sources", {})):
            print(f"shards of {task} already complete under {root}", flush=True)
            return root
    if synthetic:
        from soho_core.data.shards import shard_synthetic

        index = shard_synthetic(dataset, root, [task], max_count=shard_max_count)[task]
    else:
        from soho_core.data import official

        index = official.shard_task(dataset, root, task, max_count=shard_max_count)
    print(json.dumps({"task": task, "out": storage.join(root, task),
                      "num_samples": {s: v["num_samples"] for s, v in index["splits"].items()}}), flush=True)
    return root


def run_uri(store_root: str, run_id: str, step: str) -> str:
    if not run_id:
        raise ValueError("run_id is empty: every training run is stored under runs/<run id>/")
    return storage.join(store_root, "runs", run_id, step)


def tracking_env(run_id: str, wandb_project: str) -> dict[str, str]:
    """Plain (non-secret) settings handed to the training processes: the pipeline run id is the
    wandb group, so all of a run's trainings appear together. The engine writes metrics.jsonl;
    wandb picks these up once the tracking code reads them."""
    from soho_core import env as names

    env = {names.PIPELINE_RUN_ID: run_id, names.WANDB_GROUP: run_id}
    if wandb_project:
        env[names.WANDB_PROJECT] = wandb_project
    return env


@_storage_errors_in_one_line
def pretrain(preset: str, shards: str, store_root: str, run_id: str, overrides: Sequence[str] = (),
             launcher: str = "torchrun", nodes: int = 1, procs_per_node: int = 1, gpus_per_node: int = 0,
             image: str = "", namespace: str = "", wandb_project: str = "", timeout_s: float = 7 * 86400,
             cpu_per_node: str = "8", memory_per_node: str = "32Gi", s3_secret: str = storage.S3_SECRET,
             wandb_secret: str = "soho-wandb", training_runtime: str = "torch-distributed",
             tolerations: Sequence[dict[str, Any]] = (), node_selector: dict[str, str] | None = None,
             image_pull_policy: str = "IfNotPresent", image_pull_secret: str = "",
             backbone_weights: str = "") -> str:
    """The pre-training step: the same ``soho pretrain`` command, under torchrun here, or on the
    cluster as a PyTorchJob (training operator v1) or a TrainJob on the ClusterTrainingRuntime
    ``training_runtime`` (Kubeflow Trainer v2) of ``nodes`` x ``procs_per_node``. Returns the run's URI.
    ``tolerations`` and ``node_selector`` reach the job's pods only when they ask for GPUs; the pods
    pull ``image`` with ``image_pull_policy`` (not a TrainJob's: its runtime sets it) and the Secret
    ``image_pull_secret``. ``backbone_weights`` (from :func:`warm_backbone`; "" for none) starts the CNN
    from that file (``model.backbone.weights``)."""
    from soho_core.config import load_config
    from soho_core.launch import soho_args

    if backbone_weights:
        overrides = [*overrides, f"model.backbone.weights={backbone_weights}"]
    load_config(preset, list(overrides))  # a bad preset or override fails here, before any launch
    _check_store([shards], [store_root])
    out = run_uri(store_root, run_id, "pretrain")
    args = soho_args("pretrain", preset, shards, out, overrides)
    env = tracking_env(run_id, wandb_project)
    if launcher == "torchrun":
        if nodes != 1:
            raise ValueError(f"nodes={nodes}: the torchrun launcher runs on this machine only (nodes=1)")
        from soho_core.launch.local import run_torchrun

        run_torchrun(args, procs=procs_per_node, timeout_s=timeout_s, env=env)
    elif launcher in ("pytorchjob", "trainjob"):
        if not image:
            raise ValueError(f"launcher={launcher!r} needs the image the job's pods run")
        from soho_core.launch.pytorchjob import JobSpec, build_pytorchjob, job_name
        from soho_core.launch.trainjob import build_trainjob
        from soho_core.launch.watch import run_job

        spec = JobSpec(name=job_name(PRETRAIN_JOB, run_id), namespace=namespace or current_namespace(),
                       image=image, soho_args=args, nodes=nodes, procs_per_node=procs_per_node,
                       gpus_per_node=gpus_per_node, cpu_per_node=cpu_per_node, memory_per_node=memory_per_node,
                       s3_secret=s3_secret, wandb_secret=wandb_secret, env=env,
                       labels={"soho/pipeline-run": job_name("r", run_id)[2:]},
                       tolerations=list(tolerations) if gpus_per_node else [],
                       node_selector=dict(node_selector or {}) if gpus_per_node else {},
                       image_pull_policy=image_pull_policy, image_pull_secret=image_pull_secret)
        body = build_pytorchjob(spec) if launcher == "pytorchjob" else build_trainjob(spec, training_runtime)
        run_job(kubernetes_api(), body, timeout_s=timeout_s, core_api=kubernetes_core_api())
    else:
        raise ValueError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    return out


def kubernetes_api():
    """``CustomObjectsApi`` with the pod's service account, or ~/.kube/config outside a cluster."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def kubernetes_core_api():
    """``CoreV1Api`` (for pod logs), configured as :func:`kubernetes_api` configured the client."""
    from kubernetes import client

    return client.CoreV1Api()


_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def current_namespace() -> str:
    """The namespace this pod runs in (the pipeline's profile namespace)."""
    try:
        with open(_NAMESPACE_FILE) as f:
            return f.read().strip()
    except FileNotFoundError:
        raise ValueError(f"no namespace given and {_NAMESPACE_FILE} is missing (not in a pod): "
                         f"pass the namespace explicitly") from None


@_storage_errors_in_one_line
def finetune(task: str, preset: str, shards: str, init: str, store_root: str, run_id: str,
             overrides: Sequence[str] = (), procs: int = 1, wandb_project: str = "",
             timeout_s: float = 7 * 86400) -> str:
    """The fine-tuning step of one task, under torchrun in the step's own pod (or here).
    Returns the run's URI."""
    from soho_core.config import load_config
    from soho_core.launch import soho_args
    from soho_core.launch.local import run_torchrun
    from soho_core.tasks.catalog import DOWNSTREAM

    _check_task(task, DOWNSTREAM)
    load_config(preset, list(overrides))
    _check_store([shards, init], [store_root])
    out = run_uri(store_root, run_id, task)
    env = tracking_env(run_id, wandb_project)
    threads = runtime_env().task_threads  # a local run training several tasks at once shares the cores
    if threads:
        env["OMP_NUM_THREADS"] = str(max(1, threads // max(1, procs)))
    run_torchrun(soho_args("finetune", preset, shards, out, overrides, init=init, task=task),
                 procs=max(1, procs), timeout_s=timeout_s, env=env)
    return out


def evaluation_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides evaluation accepts (``data.*``, ``finetune.*``); the model is the checkpoint's."""
    return [o for o in overrides if o.startswith(("data.", "finetune."))]


@_storage_errors_in_one_line
def evaluate(task: str, checkpoint: str, shards: str, overrides: Sequence[str] = (),
             split: str = "test") -> tuple[str, dict[str, Any]]:
    """The evaluation step: writes ``<checkpoint run>/metrics.json``; returns (its URI, its contents)."""
    from soho_core.tasks.catalog import DOWNSTREAM, get_task
    from soho_core.train.engine import evaluate as run_evaluation

    _check_task(task, DOWNSTREAM)
    _check_store([shards], [checkpoint])
    threads = runtime_env().task_threads  # a local run evaluating several tasks at once shares the cores
    if threads:
        import torch

        torch.set_num_threads(threads)
    out = storage.join(checkpoint, "metrics.json")
    report = run_evaluation(get_task(task), checkpoint, shards, out, split=split,
                            overrides=evaluation_overrides(overrides))
    print(json.dumps(report), flush=True)
    return out, report


@_storage_errors_in_one_line
def report(pretrain_run: str, metrics_uris: Sequence[str], dataset: str, store_root: str, run_id: str) -> Report:
    """The report step: ``runs/<run_id>/report/`` (report.md, its plots, summary.json), compared with
    the previous run recorded at ``store_root/reports/latest.json``, which then records this one.
    Returns the report (with the Markdown and HTML the UI shows)."""
    from soho_core.report import write_report

    _check_store([pretrain_run, *metrics_uris, *([dataset] if dataset else [])], [store_root])
    return write_report(run_uri(store_root, run_id, "report"), pretrain_run, metrics_uris, dataset=dataset,
                        run_id=run_id, history_uri=storage.join(store_root, "reports", "latest.json"))


def status_uri(store_root: str, run_id: str) -> str:
    return run_uri(store_root, run_id, "status.json")


def finish_run(store_root: str, run_id: str, state: str, error: str = "", launcher: str = "torchrun",
               namespace: str = "") -> str:
    """The exit handler, run however the run ended (``state``: KFP's ``SUCCEEDED``, ``FAILED``, ...).
    Unless the run succeeded, a pre-training job still running is deleted: its step may have died
    without deleting it (an evicted or killed watcher pod). Then ``runs/<run_id>/status.json`` gets
    the final state: ``state``, ``error``, ``finished_at``, ``report`` (the report's URI, when
    written) and ``deleted_jobs``. Returns that file's URI; a failed clean-up is recorded, then raised."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    deleted: list[str] = []
    cleanup_error = ""
    if launcher != "torchrun" and state != "SUCCEEDED":  # torchrun's trainers ended with their step's pod
        from soho_core.launch import pytorchjob, trainjob
        from soho_core.launch.watch import delete_if_running

        kind = pytorchjob.KIND if launcher == "pytorchjob" else trainjob.KIND
        name = pytorchjob.job_name(PRETRAIN_JOB, run_id)
        try:
            namespace = namespace or current_namespace()
            if delete_if_running(kubernetes_api(), namespace, name, kind=kind):
                deleted.append(f"{kind} {namespace}/{name}")
        except Exception as err:  # noqa: BLE001 (the API's or the config's: recorded, then raised)
            cleanup_error = (f"could not delete {kind} {namespace or '?'}/{name} ({err}); delete it by hand: "
                             f"kubectl -n {namespace or '<namespace>'} delete {kind.lower()} {name}")
    report = storage.join(run_uri(store_root, run_id, "report"), "report.md")
    status = {"run_id": run_id, "state": state, "error": error,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "report": report if storage.exists(report) else "", "deleted_jobs": deleted}
    if cleanup_error:
        status["cleanup_error"] = cleanup_error
    out = status_uri(store_root, run_id)
    storage.write_json_atomic(out, status)
    print(json.dumps(status), flush=True)
    if cleanup_error:
        raise RuntimeError(cleanup_error)
    return out
