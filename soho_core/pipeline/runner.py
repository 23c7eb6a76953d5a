"""Compile, run locally, and submit the pipeline (``soho pipeline compile|run|submit``).

    soho pipeline compile --out pipeline.yaml [--image REF] [--image-pull-policy P] [--image-pull-secret NAME]
                          [--pipeline-root URI]
    soho pipeline run --local --preset demo --work-dir demo-out [--set train.max_steps=100]
    soho pipeline submit --host https://kubeflow.example.com/pipeline --param store_root=s3://soho

The compiled pipeline in ``pipelines/soho.yaml`` is what ``soho pipeline compile --out
pipelines/soho.yaml`` writes with no other option (a test keeps the two equal).

The DAG itself is :func:`pipelines.soho.soho_pipeline` (its components in ``components/``).
This is the one place the library reaches up to them, and only when a ``pipeline``
command runs: the rest of ``soho_core`` never imports kfp.

A local run is the cluster's DAG under ``kfp.local`` (each step a subprocess of this
Python): the synthetic world, a store under the work dir, and torchrun in place of the
PyTorchJob. Its sizes come from :data:`LOCAL_DEFAULTS` for the preset.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

from soho_core import storage

# What a local run uses for each preset: the synthetic world's size and the training budget.
# demo: the whole DAG in about 15 minutes on 2 CPU cores (issue 14's target is 12). Retrieval's steps cost
# about 3x a VQA step (hard negatives), so it gets fewer: 250 (with 150, train.seed=1 gave r_mean
# 0.685, with 250 0.720, grey images 0.022 and 0.025; the 100 more steps make VE start after VQA's lane is
# free and end alone on one core: 19.1 minutes against 17.0); its exact evaluation grows with
# images x captions (100 test images x 500 captions: 60 s, against 9 s for the two-stage ranking,
# which the demo reports: r_mean 0.741 against 0.737 exact).
# The demo warm-starts its CNN on a second world (backbone_steps, the backbone step) and keeps it still
# from then on (optim.backbone_lr=0), with each task's new head at the trunk's rate (head_lr_mult=1):
# pre-training at the CNN's 1e-3 erased what it knew of shapes, and a head at 10x fits the question's
# text prior before the image (issue 14: VQA 0.51 -> 0.63 on this world, grey images 0.42 -> 0.43).
# Pre-training's 1,000 steps against 600 take 2 more minutes and are worth them: VE 0.72 against 0.64,
# retrieval 0.68 against 0.64 (VQA 0.62 and 0.60). NLVR2 sees about 8 statements a step and stays at
# chance for its first 300 (0.49; 0.56 after 600). VQA is still climbing at 300 steps: 0.62 there,
# 0.72 after 600 (shape 0.68 -> 0.86, grey images 0.40-0.43), for 1.6 more minutes.
# The fine-tunes learn faster per step from 16 images than from 8, and the frozen CNN's cached
# features make the extra images cheap (issue 14, from the same pre-training): VQA 0.794 against
# 0.734 (grey images 0.39 and 0.41), VE 0.786 against 0.721 (0.33 both), NLVR2 0.662 against 0.557
# (0.47 and 0.50). From the demo's own pre-training NLVR2 is still climbing at 600 steps (0.746; 900:
# 0.808, grey images 0.50 both), VQA is not (600: 0.791, 900: 0.789, grey images 0.40 and 0.41; its
# training batches at 0.90: more steps only fit them). VQA is held by how few distinct questions an
# image has, so the demo's world asks 16 per image (questions_per_image) and VQA trains 1,200 steps:
# 0.853 against 0.829 with 8 per image and 0.795 after 600 steps (grey images 0.42-0.44; a rate of
# 1e-3 instead of 3e-4: 0.660, grey images 0.45).
LOCAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"num_images": 160, "image_size": 64, "min_objects": 1, "max_objects": 2, "questions_per_image": 4,
             "backbone_steps": 4,
             "overrides": ["train.max_steps=20", "finetune.max_steps=10", "finetune.eval_max_images=40"]},
    "demo": {"num_images": 2000, "image_size": 128, "min_objects": 2, "max_objects": 4, "questions_per_image": 16,
             "backbone_steps": 500,
             "overrides": ["train.max_steps=1000", "finetune.max_steps=300", "finetune.task_steps.retrieval=250",
                           "finetune.task_steps.nlvr2=900", "finetune.task_steps.vqa=1200", "finetune.task_steps.ve=600",
                           "finetune.task_images_per_batch.vqa=16", "finetune.task_images_per_batch.ve=16",
                           "finetune.task_images_per_batch.nlvr2=16",
                           "finetune.eval_max_images=100", "finetune.retrieval_exact=false",
                           "optim.backbone_lr=0", "finetune.head_lr_mult=1"]},
}


FEATURE_CACHE = "feature-cache"  # the folder of a local run's store where still CNNs' features are kept
PIPELINE_ROOT = "pipeline-root"  # the folder of the store where KFP keeps its artifacts by default
# The schemes KFP's launcher reads and writes artifacts in (v2 backend: LocalPathForURI).
PIPELINE_ROOT_SCHEMES = ("s3://", "gs://", "minio://")


def default_pipeline_root(store_root: str) -> str:
    """Where KFP keeps a run's artifacts (small pointers into the store) unless told otherwise."""
    return storage.join(store_root, PIPELINE_ROOT)


def check_pipeline_root(root: str) -> str:
    """``root`` if KFP's launcher can keep artifacts there, else a ValueError that says what to pass."""
    if not root.startswith(PIPELINE_ROOT_SCHEMES):
        raise ValueError(f"pipeline root {root!r}: KFP keeps artifacts only under "
                         f"{', '.join(PIPELINE_ROOT_SCHEMES)} URIs; pass --pipeline-root "
                         f"(e.g. s3://bucket/pipeline-root)")
    return root


@dataclass(frozen=True)
class PodImage:
    """The image every pod of a compiled pipeline runs: ``ref`` by tag or by digest (empty: the
    package version's, ``components.IMAGE``), how nodes pull it, and the name of a pull Secret."""

    ref: str = ""
    pull_policy: str = "IfNotPresent"
    pull_secret: str = ""


def _pipeline_func(parallelism: int = 0, image: PodImage = PodImage(), retry_backoff: str = "30s",
                   pipeline_root: str = ""):
    try:
        from pipelines.soho import build_pipeline
    except ImportError as err:
        raise ImportError(f"the pipeline needs the `pipeline` extra and the packaged pipelines/ and components/ "
                          f"(pip install 'soho-kubeflow[pipeline]'): {err}") from err
    chosen = {"image": image.ref} if image.ref else {}
    if pipeline_root:
        chosen["pipeline_root"] = check_pipeline_root(pipeline_root)
    return build_pipeline(parallelism, image_pull_policy=image.pull_policy, image_pull_secret=image.pull_secret,
                          retry_backoff=retry_backoff, **chosen)


def pipeline_parameters() -> dict[str, Any]:
    """The pipeline's parameters and their defaults, read from the DAG's signature."""
    import inspect

    func = _pipeline_func()
    func = getattr(func, "pipeline_func", func)
    return {name: p.default for name, p in inspect.signature(func).parameters.items()}


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``name=value`` pairs into pipeline arguments, typed by each parameter's default (a list is
    comma-separated or JSON, a dict JSON); an unknown name lists the valid ones."""
    defaults = pipeline_parameters()
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"pipeline parameter {item!r} is not of the form name=value")
        if name not in defaults:
            raise ValueError(f"unknown pipeline parameter {name!r}; valid: {', '.join(sorted(defaults))}")
        default = defaults[name]
        try:
            if isinstance(default, bool):
                value: Any = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                value = int(raw)
            elif isinstance(default, dict) or (isinstance(default, list) and raw.lstrip().startswith("[")):
                value = json.loads(raw)  # e.g. gpu_node_selector={"gpu": "h100"}
                if type(value) is not type(default):
                    raise ValueError(raw)
            elif isinstance(default, list):
                value = [v.strip() for v in raw.split(",") if v.strip()]
            else:
                value = raw
        except ValueError:
            raise ValueError(f"pipeline parameter {name}={raw!r}: expected {type(default).__name__}") from None
        out[name] = value
    return out


def compile_pipeline(out: str, image: PodImage = PodImage(), pipeline_root: str = "") -> str:
    """Write the pipeline YAML users upload in the Kubeflow UI, its pods running ``image``, its
    artifacts under ``pipeline_root`` (default: :func:`default_pipeline_root` of the default
    ``store_root``); returns its path. The same code and options write the same bytes."""
    from kfp import compiler

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    compiler.Compiler().compile(_pipeline_func(image=image, pipeline_root=pipeline_root), out)
    with open(out) as f:
        text = f.read()
    with open(out, "w") as f:
        f.write(_sorted_header_defaults(text))
    return out


def _sorted_header_defaults(text: str) -> str:
    """The compiled YAML with the dict defaults of its header comment in sorted key order. kfp
    prints them in protobuf map order, which follows Python's hash seed, so the same pipeline would
    compile to different bytes from one process to the next (the YAML body is sorted already)."""
    import ast
    import re

    def ordered(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ordered(value[k]) for k in sorted(value)}
        return [ordered(v) for v in value] if isinstance(value, list) else value

    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        default = re.fullmatch(r"(#\s+\w+: \w+ \[Default: )([\[{].*)\]", line)
        if default:
            lines[i] = default.group(1) + repr(ordered(ast.literal_eval(default.group(2)))) + "]"
    return "\n".join(lines)


@dataclass
class LocalRun:
    report_uri: str
    summary: dict[str, Any]
    seconds: float
    arguments: dict[str, Any] = field(default_factory=dict)


# The order a local run starts its fine-tunes in: the longest first (demo, minutes on one core each at
# 5600464: VQA 6.4, NLVR2 4.4, VE 2.4, retrieval 1.5). In the pipeline's own order (vqa, nlvr2,
# retrieval, ve) VE came last and ran alone for its last 2 minutes.
LOCAL_TASK_ORDER = ("vqa", "nlvr2", "ve", "retrieval")


def local_arguments(preset: str, store_root: str, overrides: Sequence[str] = (),
                    tasks: Sequence[str] | None = None, procs: int = 1) -> dict[str, Any]:
    """The pipeline arguments of a local run: the preset's :data:`LOCAL_DEFAULTS`, then ``overrides``;
    ``tasks`` (default: all) once each, in :data:`LOCAL_TASK_ORDER`."""
    from soho_core.config import PRESETS, load_config

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    local = LOCAL_DEFAULTS.get(preset, LOCAL_DEFAULTS["demo"])
    # Every step of a local run keeps a still CNN's features in the store, so that the next step
    # with the same CNN (pre-training, each fine-tune, each evaluation) reads them instead of running it.
    merged = [*local["overrides"], f"train.feature_cache_dir={storage.join(store_root, FEATURE_CACHE)}", *overrides]
    load_config(preset, merged)  # a bad override fails here, before the DAG starts
    args = {"data_source": "synthetic", "store_root": store_root, "preset": preset, "launcher": "torchrun",
            "nodes": 1, "procs_per_node": procs, "gpus_per_node": 0, "overrides": merged,
            **{k: local[k] for k in ("num_images", "image_size", "min_objects", "max_objects", "questions_per_image",
                                          "backbone_steps")}}
    from soho_core.tasks.catalog import DOWNSTREAM

    for t in tasks or ():
        if t not in DOWNSTREAM:
            raise ValueError(f"unknown task {t!r}; valid: {', '.join(DOWNSTREAM)}")
    # With two at a time the short ones fill in at the end, where the last one running has both cores.
    args["tasks"] = sorted(dict.fromkeys(tasks or DOWNSTREAM), key=LOCAL_TASK_ORDER.index)
    return args



LOCAL_PARALLELISM = (1, 2)  # kfp.local runs at most 2 iterations of a ParallelFor at once


def run_local(work_dir: str, preset: str = "demo", overrides: Sequence[str] = (),
              tasks: Sequence[str] | None = None, procs: int = 1, params: dict[str, Any] | None = None,
              parallelism: int = 2) -> LocalRun:
    """Run the whole DAG on this machine with kfp.local; the store is ``work_dir/store`` and
    KFP's artifacts go to ``work_dir/kfp``. ``parallelism`` downstream tasks (1 or 2) train at a
    time, each on its share of the cores (one of two), and the last one running on all of them
    (``SOHO_CPU_SHARE``: :mod:`soho_core.train.cpushare`): two demo VQA fine-tunes on one thread each
    trained at 50 and 46 images/s, one alone on two threads at 86. A failed step is retried as on a cluster, but at once (no node to wait for).
    Raises when the run fails, after the exit handler has recorded its final state."""
    import kfp.local

    from soho_core.env import CPU_SHARE, TASK_THREADS
    from soho_core.pipeline.steps import status_uri

    if parallelism not in LOCAL_PARALLELISM:
        raise ValueError(f"parallelism={parallelism}: a local run trains 1 or 2 downstream tasks at a time")
    work_dir = os.path.abspath(work_dir)
    args = local_arguments(preset, os.path.join(work_dir, "store"), overrides, tasks, procs)
    args.update(params or {})
    os.makedirs(work_dir, exist_ok=True)
    # Cached steps (data preparation) are reused by the next run in the same work dir.
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=os.path.join(work_dir, "kfp"),
                   raise_on_error=True, enable_caching=True, cache_root=os.path.join(work_dir, "kfp-cache"))
    finished = _finished_runs(args["store_root"])
    start = time.perf_counter()
    with warnings.catch_warnings():
        # The components name the cluster image; locally they run in this Python on purpose.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        # Resources, retries' pod settings and Secrets are the cluster's; kfp.local says so per task.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        kept = {name: os.environ.get(name) for name in (TASK_THREADS, CPU_SHARE)}
        if parallelism > 1:
            # Each task starts on its share of the cores and takes more when the others end.
            os.environ[TASK_THREADS] = str(max(1, (os.cpu_count() or 1) // parallelism))
            os.environ[CPU_SHARE] = os.path.join(work_dir, "cpu-share")
        try:
            with process_globals_kept():
                _pipeline_func(parallelism, retry_backoff="0s")(**args)
        finally:
            for name, value in kept.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    (run_id,) = _finished_runs(args["store_root"]) - finished
    report_uri = storage.read_json(status_uri(args["store_root"], run_id))["report"]
    summary = storage.read_json(storage.join(report_uri.rsplit("/", 1)[0], "summary.json"))
    return LocalRun(report_uri=report_uri, summary=summary, seconds=time.perf_counter() - start, arguments=args)


@contextlib.contextmanager
def process_globals_kept():
    """Put back ``builtins.print`` and the root logger's handlers and level when the block ends.

    kfp.local swaps both around every task (an indenting ``print``, a handler on ``sys.stdout``)
    and restores what it saw on entry. Two tasks of a ParallelFor run in threads: when their swaps
    interleave, the second restores the first's, and the process is left printing every line
    indented and logging to a stream that may be closed by then (seen as lost output and "Logging
    error" in the tests that ran after a local pipeline)."""
    root = logging.getLogger()
    saved_print, handlers, level = builtins.print, root.handlers[:], root.level
    try:
        yield
    finally:
        builtins.print = saved_print
        root.handlers[:] = handlers
        root.setLevel(level)


def _finished_runs(store_root: str) -> set[str]:
    """The ids of the runs under ``store_root`` whose exit handler has written ``status.json``."""
    fs, path = storage.fs_and_path(storage.join(store_root, "runs"))
    return {found.rstrip("/").split("/")[-2] for found in fs.glob(f"{path}/*/status.json")}


def submit(host: str, params: dict[str, Any] | None = None, experiment: str = "soho", run_name: str = "",
           namespace: str | None = None, package: str | None = None, client=None,
           service_account: str | None = None, image: PodImage = PodImage(), pipeline_root: str = "") -> str:
    """Submit a run through ``kfp.Client`` (the pipeline compiled on the fly with ``image``, or
    ``package``); returns the run id. Credentials for the KFP API come from kfp's own configuration.

    The run keeps its artifacts under ``pipeline_root``; without one, under the ``store_root``
    parameter's :func:`default_pipeline_root` when ``params`` name it, else where the pipeline
    (or ``package``) was compiled to.

    ``namespace`` is the Kubeflow profile namespace the run goes to (multi-user installs);
    ``service_account`` the Kubernetes account its pods run as (else the installation's
    default runner), e.g. one bound to the Role in ``manifests/base/rbac.yaml``."""
    import kfp

    if not host.startswith(("http://", "https://")):
        raise ValueError(f"--host {host!r} is not an http(s) URL of the Kubeflow Pipelines API")
    if package and image != PodImage():
        raise ValueError(f"the image settings apply when the pipeline is compiled, not to the compiled {package}")
    arguments = dict(params or {})
    if not pipeline_root and "store_root" in arguments:
        pipeline_root = default_pipeline_root(arguments["store_root"])
    if pipeline_root:
        check_pipeline_root(pipeline_root)
    client = client or kfp.Client(host=host, **({"namespace": namespace} if namespace else {}))
    name = run_name or f"soho-{time.strftime('%Y%m%d-%H%M%S')}"
    common = dict(arguments=arguments, run_name=name, experiment_name=experiment, namespace=namespace,
                  service_account=service_account or None, pipeline_root=pipeline_root or None)
    if package:
        run = client.create_run_from_pipeline_package(package, **common)
    else:
        run = client.create_run_from_pipeline_func(_pipeline_func(image=image, pipeline_root=pipeline_root), **common)
    return run.run_id


def format_summary(summary: dict[str, Any]) -> str:
    """What `make demo` prints at the end: one line per task with its primary metric, then each
    task's metric next to its blind baselines (the same test split answered without the image)
    and the gain, so the share that comes from the image shows at once."""
    from soho_core.report import baselines_table, metrics_table

    baselines = baselines_table(summary)
    if not baselines:
        return metrics_table(summary)
    return f"{metrics_table(summary)}\n\nagainst blind baselines (the test split without the image):\n{baselines}"

