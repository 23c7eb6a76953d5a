"""Exact vs two-stage image-text retrieval on the same images: recall, time and pairs scored.

    .venv/bin/python benchmarks/retrieval.py --images 200 --shortlist-k 16
    .venv/bin/python benchmarks/retrieval.py --init PRETRAIN_RUN --steps 100 --images 100 --threads 1
    .venv/bin/python benchmarks/retrieval.py --checkpoint RUN --data SHARDS --images 1000

Without ``--checkpoint`` it renders a synthetic world into a temporary folder (enough scenes
for ``--images`` test images), fine-tunes a retrieval model at ``--preset`` (demo) for
``--steps`` optimizer steps, from scratch or from the pre-training run ``--init`` (same
preset), and evaluates that. The exact mode is only as good as the ITM head: trained from
scratch against hard negatives it stayed at its class prior for 1,500 tiny steps, while the
ITC similarity learned within a few hundred; so judge recall on a model whose ITM works.
Exact mode scores every
(image, caption) pair with the ITM head; two-stage ranks by the ITC similarity and re-scores
only the top ``--shortlist-k`` per query. Both share the reading of the split and one visual
pass per image, timed apart (``encode_seconds``). Progress goes to stderr; one JSON line to
stdout. On a 2-core CPU the exact mode scored about 100-200 pairs a second at the demo preset,
so 200 images (200 x 1000 pairs) take tens of minutes there; use a GPU or fewer ``--images``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from soho_core.config import load_config
from soho_core.tasks.catalog import get_task
from soho_core.train.engine import load_task_model, train

TEST_FRACTION = 0.1  # the synthetic world's default test split


def finetune(work: Path, preset: str, steps: int, test_images: int, init: str | None) -> tuple[str, str, float]:
    """(shard root, run folder, seconds spent training) of a fresh synthetic world and model."""
    from soho_core.data.shards import shard_synthetic
    from soho_core.data.synthetic import synthesize

    cfg = load_config(preset, [f"finetune.max_steps={steps}", "train.log_every=50", f"train.ckpt_every={steps}"])
    # The split is drawn per scene, so ask for a margin over the expected test count.
    scenes = math.ceil(test_images / TEST_FRACTION * 1.2) + 50
    print(f"rendering {scenes} scenes at {cfg.data.image_min} px into {work}", file=sys.stderr, flush=True)
    synthesize(str(work / "synthetic"), num_images=scenes, seed=0, image_size=cfg.data.image_min)
    shard_synthetic(str(work / "synthetic"), str(work / "shards"), tasks=["retrieval"])
    print(f"fine-tuning {preset} for {steps} steps", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the training log; stdout holds the one JSON line
        train(get_task("retrieval"), cfg, str(work / "shards"), str(work / "run"), init=init)
    return str(work / "shards"), str(work / "run"), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a retrieval run or checkpoint; without it, fine-tune one from scratch")
    p.add_argument("--data", help="shard root holding retrieval/ (required with --checkpoint)")
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=200, help="evaluate the first N images of the split")
    p.add_argument("--shortlist-k", type=int, help="candidates per query kept for ITM (default: the config's)")
    p.add_argument("--init", help="pre-training run to fine-tune from (default: from scratch)")
    p.add_argument("--preset", default="demo", help="preset of the fine-tuned model")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    # On a CPU shared with other jobs, 1 thread was 3-10x faster than 2 here (OpenMP spinning).
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--workdir", help="keep the synthetic world and run here instead of a temporary folder")
    args = p.parse_args(argv)
    if args.checkpoint and not args.data:
        p.error("--checkpoint needs --data")
    if args.checkpoint and args.init:
        p.error("--init fine-tunes a new model; it does not go with --checkpoint")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = get_task("retrieval")

    with tempfile.TemporaryDirectory() as tmp:
        train_seconds = None
        if args.checkpoint:
            data, checkpoint = args.data, args.checkpoint
        else:
            work = Path(args.workdir or tmp)
            data, checkpoint, train_seconds = finetune(work, args.preset, args.steps, args.images, args.init)
        model, cfg, tokenizer = load_task_model(task, checkpoint, device)
        cfg.finetune.eval_max_images = args.images
        if args.shortlist_k is not None:
            cfg.finetune.shortlist_k = args.shortlist_k
        print(f"evaluating {args.images} {args.split} images, exact and two-stage (k={cfg.finetune.shortlist_k})",
              file=sys.stderr, flush=True)
        result = task.evaluate(model, data, args.split, cfg, tokenizer, device)

    m = result.metrics
    recall = {k: round(m[k], 4) for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")}
    report = {
        "machine": machine(), "device": device.type, "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2), "preset": cfg.preset,
        "checkpoint": args.checkpoint or f"fine-tuned {args.steps} steps from {args.init or 'scratch'}",
        "train_seconds": train_seconds and round(train_seconds, 1),
        "images": int(m["num_images"]), "texts": result.num_examples, "shortlist_k": cfg.finetune.shortlist_k,
        "exact": recall, "two_stage": {k: round(m[f"two_stage_{k}"], 4) for k in recall},
        "encode_seconds": round(m["encode_seconds"], 3),
        "exact_seconds": round(m["exact_seconds"], 3), "two_stage_seconds": round(m["two_stage_seconds"], 3),
        "speedup": round(m["exact_seconds"] / m["two_stage_seconds"], 2),
        "speedup_with_encoding": round((m["exact_seconds"] + m["encode_seconds"])
                                       / (m["two_stage_seconds"] + m["encode_seconds"]), 2),
        "recall_ratio": round(m["two_stage_r_mean"] / m["r_mean"], 4) if m["r_mean"] > 0 else None,
        "pairs_scored_exact": int(m["pairs_scored_exact"]), "pairs_scored_two_stage": int(m["pairs_scored_two_stage"]),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
