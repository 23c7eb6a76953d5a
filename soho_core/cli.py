"""The ``soho`` command: the user's contract, and what the pipeline components call.

    soho data synth --out DIR --num-images 2000 --seed 0
    soho data shard --source synthetic --input DIR --out SHARDS
    soho data download --dataset vqa2 --out /data/vqa2
    soho data shard --source vqa2 --input /data/vqa2 --images /data/coco --out s3://bucket/shards
    soho pretrain --config demo --data SHARDS --out RUN [--set optim.lr=3e-4] [--max-steps N]
    soho pretrain --config tiny --data SHARDS --out RUN --nproc-per-node 2   # torchrun, elastic restarts
    soho pipeline compile --out pipeline.yaml | run --local --preset demo | submit --host URL
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from soho_core import storage
from soho_core.config import PRESETS, ConfigError, load_config
from soho_core.data.download import DATASETS as DOWNLOADABLE, USER_PROVIDED
from soho_core.data.readers import SOURCES as OFFICIAL_SOURCES
from soho_core.data.shards import TASKS
from soho_core.tasks.catalog import DOWNSTREAM


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soho", description="SOHO vision-language pre-training and fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make, download and shard datasets").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="render the built-in synthetic world (images + every task's annotations)")
    s.add_argument("--out", required=True, help="output folder or URI")
    s.add_argument("--num-images", type=int, default=2000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=128)
    s.add_argument("--min-objects", type=int, default=2)
    s.add_argument("--max-objects", type=int, default=4)
    s.add_argument("--questions-per-image", type=int, default=4,
                   help="distinct VQA questions per image (fewer where a scene allows fewer)")

    sh = data.add_parser("shard", help="write webdataset shards + index.json")
    sh.add_argument("--source", required=True, choices=["synthetic", *OFFICIAL_SOURCES])
    sh.add_argument("--input", required=True, help="the source dataset folder or URI (karpathy: its dataset_*.json)")
    sh.add_argument("--out", required=True, help="shard root folder or URI")
    sh.add_argument("--tasks", help=f"comma-separated tasks to shard (default: synthetic: all: {','.join(TASKS)}; "
                                    "coco, vg: pretrain; vqa2: vqa; nlvr2: nlvr2; snli-ve: ve; karpathy: retrieval)")
    sh.add_argument("--shard-max-count", type=int, default=10_000, help="samples per shard at most")
    sh.add_argument("--shard-max-mb", type=int, default=256, help="megabytes per shard at most")
    sh.add_argument("--images", help="official sources: the image root (default: --input)")
    sh.add_argument("--image-pattern", action="append", default=[], metavar="PATTERN",
                    help="official sources: image path under --images, e.g. '{split}/COCO_{split}_{id:012d}.jpg' "
                         "(repeatable, tried in order; fields per source in soho_core/data/readers.py)")
    sh.add_argument("--splits", help="official sources: OUT=SOURCE[+SOURCE],... e.g. train=train2014,val=val2014")
    sh.add_argument("--max-missing", type=float, default=0.0,
                    help="official sources: fraction of samples that may lack an image file (skipped, counted)")
    sh.add_argument("--answer-vocab-size", type=int, default=3129, help="vqa: answers kept, most frequent first")
    sh.add_argument("--workers", type=int, default=1, help="official sources: processes writing shards")

    dl = data.add_parser("download", help="fetch an official dataset (resumable, size-checked, safe extraction)")
    dl.add_argument("--dataset", required=True, choices=[*DOWNLOADABLE, *USER_PROVIDED])
    dl.add_argument("--out", required=True, help="folder or URI (a remote one is staged locally, then uploaded)")
    dl.add_argument("--retries", type=int, default=5)
    dl.add_argument("--keep-archives", action="store_true", help="keep the zip files after extracting them")

    ft = sub.add_parser("finetune", help="fine-tune on a downstream task (single process or under torchrun)")
    ft.add_argument("--task", required=True, choices=DOWNSTREAM)
    _add_config_args(ft, default=None)
    ft.add_argument("--init", help="pre-training run folder or checkpoint file (omit to start from scratch)")
    ft.add_argument("--data", required=True, help="shard root written by `soho data shard`")
    ft.add_argument("--out", required=True, help="run folder or URI")
    ft.add_argument("--max-steps", type=int, help="shortcut for --set finetune.max_steps=N")
    _add_launch_args(ft)

    ev = sub.add_parser("evaluate", help="evaluate a fine-tuned checkpoint; writes metrics.json")
    ev.add_argument("--task", required=True, choices=("pretrain", *DOWNSTREAM))
    ev.add_argument("--checkpoint", required=True, help="run folder (its latest checkpoint) or checkpoint file")
    ev.add_argument("--data", required=True, help="shard root")
    ev.add_argument("--out", help="metrics file to write (JSON)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="evaluation settings (data.* and finetune.* only), e.g. --set finetune.eval_max_images=100")

    pr = sub.add_parser("predict", help="ask a fine-tuned model about image files")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--text", required=True, help="question (vqa), statement (nlvr2), hypothesis (ve) or query")
    pr.add_argument("--image", help="image file (vqa, ve; the left image for nlvr2)")
    pr.add_argument("--image2", help="the right image (nlvr2)")
    pr.add_argument("--images", help="folder of images to rank (retrieval)")
    pr.add_argument("--top-k", type=int, default=5)

    ab = sub.add_parser("ablate", help="no pre-training vs no visual dictionary vs full SOHO, every task")
    _add_config_args(ab, default="demo")
    ab.add_argument("--data", required=True, help="shard root with every task's shards")
    ab.add_argument("--out", required=True, help="folder for the runs and ablation.json")
    ab.add_argument("--tasks", default=",".join(DOWNSTREAM))
    ab.add_argument("--variants", default="scratch,no_vd,soho")
    ab.add_argument("--seeds", default="0", help="comma-separated train.seed values, one repeat of every run each "
                    "(runs in OUT/seed-N; default 0)")

    pb = sub.add_parser("probe", help="the image path's ceiling: the preset's CNN trained on each object's attributes")
    _add_config_args(pb, default="demo")
    pb.add_argument("--data", required=True, help="synthetic world written by `soho data synth` (needs scenes.jsonl)")
    pb.add_argument("--steps", type=int, default=300)
    pb.add_argument("--eval-every", type=int, default=50)
    pb.add_argument("--out", help="also write the learning curve here as JSON")
    pb.add_argument("--save-backbone", metavar="URI",
                    help="also write the trained CNN here, for model.backbone.weights (a labelled warm start, "
                         "as ImageNet weights are for real images)")

    pt = sub.add_parser("pretrain", help="pre-train with MLM + MVM + ITM (single process or under torchrun)")
    _add_config_args(pt)
    pt.add_argument("--data", required=True, help="shard root written by `soho data shard`")
    pt.add_argument("--out", required=True, help="run folder or URI: checkpoints/, metrics.jsonl, config.json")
    pt.add_argument("--max-steps", type=int, help="shortcut for --set train.max_steps=N")
    _add_launch_args(pt)

    _add_pipeline_args(sub)
    return p


def _add_pipeline_args(sub) -> None:
    pl = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, submit").add_subparsers(
        dest="pipeline_command", required=True)
    c = pl.add_parser("compile", help="write the pipeline YAML to upload in the Kubeflow UI")
    c.add_argument("--out", default="pipeline.yaml")
    _add_image_args(c)
    c.add_argument("--pipeline-root", default="", metavar="URI",
                   help="where KFP keeps the runs' artifacts (s3://, gs:// or minio://; a run may name another); "
                        "default: s3://soho/pipeline-root, under the default store_root")
    r = pl.add_parser("run", help="run the whole DAG on this machine (kfp.local, synthetic data, torchrun)")
    r.add_argument("--local", action="store_true", required=True, help="run here (the only mode; use submit for a cluster)")
    r.add_argument("--preset", default="demo", help=f"config preset ({', '.join(PRESETS)})")
    r.add_argument("--work-dir", default="pipeline-out", help="folder for the store (data, runs, report) and KFP outputs")
    r.add_argument("--tasks", help=f"comma-separated downstream tasks (default: all: {','.join(DOWNSTREAM)})")
    r.add_argument("--procs", type=int, default=1, help="torchrun processes for pre-training")
    r.add_argument("--parallelism", type=int, default=2, choices=(1, 2),
                   help="downstream tasks trained at a time, the longest first, each on its share of the cores "
                        "among those still running (default 2)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every training, after the local defaults (repeatable)")
    r.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline parameter, e.g. --param num_images=500 (repeatable)")
    s = pl.add_parser("submit", help="submit a run to a Kubeflow Pipelines endpoint")
    s.add_argument("--host", required=True, help="URL of the KFP API, e.g. https://kubeflow.example.com/pipeline")
    s.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline parameter, e.g. --param store_root=s3://soho --param nodes=2 (repeatable)")
    s.add_argument("--experiment", default="soho")
    s.add_argument("--run-name", default="")
    s.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
    s.add_argument("--service-account", default="",
                   help="Kubernetes service account the run's pods use (default: the installation's runner)")
    s.add_argument("--package", help="a compiled pipeline YAML to submit instead of compiling now")
    _add_image_args(s)
    s.add_argument("--pipeline-root", default="", metavar="URI",
                   help="where KFP keeps this run's artifacts (s3://, gs:// or minio://); default: "
                        "<store_root>/pipeline-root with --param store_root, else the compiled pipeline's")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default="", metavar="REF",
                   help="the image every pod runs, by tag or by digest (registry/name@sha256:...); "
                        "default: ghcr.io/soho-kubeflow/soho:<package version>")
    p.add_argument("--image-pull-policy", default="IfNotPresent", choices=("Always", "IfNotPresent", "Never"))
    p.add_argument("--image-pull-secret", default="", metavar="NAME",
                   help="the Secret (kubernetes.io/dockerconfigjson) every pod pulls the image with")


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="start N training processes here with torchrun's elastic launcher (gloo on CPU, one "
                        "GPU each); a failed process restarts the group, which resumes from the latest checkpoint")
    p.add_argument("--max-restarts", type=int, default=3, metavar="R",
                   help="with --nproc-per-node: restarts of the process group before giving up (default 3)")


def _add_config_args(p: argparse.ArgumentParser, default: str | None = "tiny") -> None:
    where = f"default {default}" if default else "default: the --init run's own config, else tiny"
    p.add_argument("--config", default=default, help=f"a preset ({', '.join(PRESETS)}) or a YAML file ({where})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")


# The arguments that name locations a command reads; ``--out`` is the one it writes.
_READ_ARGS = ("data", "input", "images", "init", "checkpoint", "image", "image2")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # no "Found credentials in ..." above an error
    try:
        # S3 credentials, endpoint and buckets, before any work; under torchrun by rank 0 alone
        # (its launcher checked them already; N processes need not probe the store N times).
        for name in (*_READ_ARGS, "out") if os.environ.get("RANK", "0") == "0" else ():
            if getattr(args, name, None):
                storage.check_access(getattr(args, name), write=name == "out")
        if getattr(args, "nproc_per_node", None) is not None:
            return _launch(argv, args.nproc_per_node, args.max_restarts)
        return _run(args)
    except (ConfigError, storage.StorageError, FileNotFoundError, PermissionError, ValueError) as err:  # bad input
        print(f"soho: error: {err}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:  # the store or the data failed mid-way: rerun to resume
        from soho_core.data.loader import DataUnavailableError
        from soho_core.data.shards import ShardWriteError

        if not isinstance(err, (ShardWriteError, DataUnavailableError)):
            raise
        print(f"soho: error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "data" and args.data_command == "synth":
        from soho_core.data.synthetic import synthesize

        manifest = synthesize(args.out, num_images=args.num_images, seed=args.seed, image_size=args.image_size,
                              min_objects=args.min_objects, max_objects=args.max_objects,
                              questions_per_image=args.questions_per_image)
        print(json.dumps({"out": args.out, "counts": manifest["counts"]}))
        return 0
    if args.command == "data" and args.data_command == "download":
        from soho_core.data.download import DownloadError, download

        try:
            print(json.dumps(download(args.dataset, args.out, retries=args.retries, keep_archives=args.keep_archives)))
        except DownloadError as err:  # network or check failure: rerun to resume
            print(f"soho: download failed: {err}", file=sys.stderr)
            return 1
        return 0
    if args.command == "data" and args.data_command == "shard":
        from soho_core.data.shards import shard_source, shard_synthetic

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
        if args.source == "synthetic":
            indexes = shard_synthetic(args.input, args.out, tasks or TASKS, max_count=args.shard_max_count,
                                      max_bytes=args.shard_max_mb << 20)
        else:
            from soho_core.data.readers import ReaderOptions, parse_splits

            options = ReaderOptions(args.input, images=args.images, image_pattern=tuple(args.image_pattern),
                                    splits=parse_splits(args.splits) if args.splits else None,
                                    max_missing=args.max_missing)
            indexes = shard_source(args.source, options, args.out, tasks, max_count=args.shard_max_count,
                                   max_bytes=args.shard_max_mb << 20, answer_vocab_size=args.answer_vocab_size,
                                   workers=args.workers)
        for task, index in indexes.items():
            counts = {s: v["num_samples"] for s, v in index["splits"].items()}
            print(json.dumps({"task": task, "out": f"{args.out.rstrip('/')}/{task}", "num_samples": counts}))
        return 0
    if args.command == "pretrain":
        overrides = list(args.set)
        if args.max_steps is not None:
            overrides.append(f"train.max_steps={args.max_steps}")
        cfg = load_config(args.config, overrides)
        from soho_core.tasks.catalog import get_task
        from soho_core.train.engine import train

        result = train(get_task("pretrain"), cfg, args.data, args.out)
        if _is_main():
            print(json.dumps({"out": args.out, "final": result.last_metrics}))
        return 0
    if args.command == "finetune":
        overrides = list(args.set) + ([f"finetune.max_steps={args.max_steps}"] if args.max_steps else [])
        from soho_core.tasks.catalog import get_task
        from soho_core.train.engine import run_config, train

        if args.config is None and args.init:
            # Fine-tune with the settings the model was pre-trained with (its image size above all).
            cfg = run_config(args.init, overrides)
        else:
            cfg = load_config(args.config or "tiny", overrides)

        result = train(get_task(args.task), cfg, args.data, args.out, init=args.init)
        if _is_main():
            print(json.dumps({"out": args.out, "final": result.last_metrics}))
        return 0
    if args.command == "evaluate":
        from soho_core.tasks.catalog import get_task
        from soho_core.train.engine import evaluate

        report = evaluate(get_task(args.task), args.checkpoint, args.data, args.out, split=args.split,
                          overrides=args.set)
        print(json.dumps(report))
        return 0
    if args.command == "predict":
        from soho_core.predict import predict

        print(json.dumps(predict(args.checkpoint, args.text, image=args.image, image2=args.image2,
                                 images_dir=args.images, top_k=args.top_k), indent=1))
        return 0
    if args.command == "ablate":
        from soho_core.ablate import ablate, format_table, parse_seeds

        summary = ablate(args.data, args.out, args.config, list(args.set),
                         tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                         variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
                         seeds=parse_seeds(args.seeds))
        print(format_table(summary))
        return 0
    if args.command == "probe":
        from soho_core.probe import format_curve, probe

        if args.steps < 1 or args.eval_every < 1:
            raise ValueError(f"--steps ({args.steps}) and --eval-every ({args.eval_every}) must be >= 1")
        result = probe(args.data, load_config(args.config, list(args.set)), args.steps, args.eval_every,
                       save_backbone=args.save_backbone)
        if args.out:
            storage.write_json_atomic(args.out, result)
        print(format_curve(result))
        return 0
    if args.command == "pipeline":
        return _run_pipeline(args)
    raise AssertionError(args)


def _run_pipeline(args: argparse.Namespace) -> int:
    from soho_core.pipeline import runner

    if args.pipeline_command == "compile":
        image = runner.PodImage(args.image, args.image_pull_policy, args.image_pull_secret)
        print(json.dumps({"out": runner.compile_pipeline(args.out, image, args.pipeline_root)}))
        return 0
    if args.pipeline_command == "run":
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
        result = runner.run_local(args.work_dir, preset=args.preset, overrides=args.set, tasks=tasks,
                                  procs=args.procs, params=runner.parse_params(args.param),
                                  parallelism=args.parallelism)
        print(f"\npipeline finished in {result.seconds / 60:.1f} min; report: {result.report_uri}\n")
        print(runner.format_summary(result.summary))
        return 0
    if args.pipeline_command == "submit":
        run_id = runner.submit(args.host, runner.parse_params(args.param), experiment=args.experiment,
                               run_name=args.run_name, namespace=args.namespace, package=args.package,
                               service_account=args.service_account,
                               image=runner.PodImage(args.image, args.image_pull_policy, args.image_pull_secret),
                               pipeline_root=args.pipeline_root)
        print(json.dumps({"host": args.host, "run_id": run_id}))
        return 0
    raise AssertionError(args)


def _launch(argv: list[str], procs: int, max_restarts: int) -> int:
    """Re-run this command under torchrun with ``procs`` workers and elastic restarts."""
    from soho_core.launch.local import LocalRunError, run_torchrun

    if procs < 1:
        raise ValueError(f"--nproc-per-node {procs}: must be >= 1")
    inner: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--nproc-per-node", "--max-restarts"):
            skip = True
        elif not arg.startswith(("--nproc-per-node=", "--max-restarts=")):
            inner.append(arg)
    try:
        run_torchrun(inner, procs=procs, max_restarts=max_restarts)
    except LocalRunError as err:
        print(f"soho: error: {err}", file=sys.stderr)
        return 1
    return 0


def _is_main() -> bool:
    from soho_core.env import runtime_env

    return runtime_env().rank == 0


if __name__ == "__main__":
    sys.exit(main())
