"""The ``soho`` command: the user's contract, and what the pipeline components call.

    soho data synth --out DIR --num-images 2000 --seed 0
    soho data shard --source synthetic --input DIR --out SHARDS
    soho pretrain --config demo --data SHARDS --out RUN [--set optim.lr=3e-4] [--max-steps N]
    torchrun --nproc-per-node 2 -m soho_core pretrain --config tiny --data SHARDS --out RUN
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from soho_core.config import PRESETS, ConfigError, load_config


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

    sh = data.add_parser("shard", help="write webdataset shards + index.json")
    sh.add_argument("--source", required=True, choices=["synthetic"])
    sh.add_argument("--input", required=True, help="the source dataset folder or URI")
    sh.add_argument("--out", required=True, help="shard root folder or URI")
    sh.add_argument("--tasks", default="pretrain", help="comma-separated tasks to shard (default: pretrain)")
    sh.add_argument("--shard-max-count", type=int, default=10_000, help="samples per shard at most")
    sh.add_argument("--shard-max-mb", type=int, default=256, help="megabytes per shard at most")

    pt = sub.add_parser("pretrain", help="pre-train with MLM + MVM + ITM (single process or under torchrun)")
    _add_config_args(pt)
    pt.add_argument("--data", required=True, help="shard root written by `soho data shard`")
    pt.add_argument("--out", required=True, help="run folder or URI: checkpoints/, metrics.jsonl, config.json")
    pt.add_argument("--max-steps", type=int, help="shortcut for --set train.max_steps=N")
    return p


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help=f"a preset ({', '.join(PRESETS)}) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"soho: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "data" and args.data_command == "synth":
        from soho_core.data.synthetic import synthesize

        manifest = synthesize(args.out, num_images=args.num_images, seed=args.seed, image_size=args.image_size,
                              min_objects=args.min_objects, max_objects=args.max_objects)
        print(json.dumps({"out": args.out, "counts": manifest["counts"]}))
        return 0
    if args.command == "data" and args.data_command == "shard":
        from soho_core.data.shards import shard_synthetic

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        indexes = shard_synthetic(args.input, args.out, tasks, max_count=args.shard_max_count,
                                  max_bytes=args.shard_max_mb << 20)
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
    raise AssertionError(args)


def _is_main() -> bool:
    from soho_core.env import runtime_env

    return runtime_env().rank == 0


if __name__ == "__main__":
    sys.exit(main())
