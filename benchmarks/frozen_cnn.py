"""A pre-training step with the CNN frozen (optim.backbone_lr=0, the demo's recipe), with and
without its features cached per image (train.feature_cache_mb).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/frozen_cnn.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/frozen_cnn.py --smoke    # seconds, for tests

The batch is the demo's: 8 images at 128x128 (uint8, as the loaders give them), 4 captions of 16
tokens each per image (word pieces of BERT's 30,522-word vocabulary, as benchmarks/train_step.py
makes them: the demo's own vocabulary is a few hundred words, so its MLM head costs less and the
real ratio is higher than this one). The cached step finds every image in the cache, as training does once each
image has been seen (pre-training the demo sees each image about 6 times, a 600-step VQA
fine-tune about 3). Both steps share one model and one batch and are timed in alternating rounds.

Figures (the JSON line):
  step_s_uncached   median seconds of a step that runs the frozen CNN
  step_s_cached     median seconds of a step that reads the CNN's features from the cache
  cache_speedup     step_s_uncached / step_s_cached
  loss_equal        both steps computed the same loss on the same batch (within 1e-5)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_options, emit, interleaved, say, setup  # noqa: E402
from train_step import build, make_batch, make_step  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="captions per image")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--text-len", type=int, default=16)
    add_run_options(p, warmup=1)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.images, args.group, args.size, args.text_len = "tiny", 2, 2, 64, 8
        args.iters, args.warmup = 1, 0

    facts = setup(args.threads)
    cfg, model = build(args.preset, ["optim.backbone_lr=0"])
    model.trunk.backbone.freeze()
    model.train()
    batch = make_batch(cfg, args.images, args.group, args.size, args.size, args.text_len)
    batch["images"] = torch.randint(0, 256, batch["images"].shape, dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(1))
    say(f"frozen_cnn: {facts['machine']}, {facts['threads']} threads, torch {facts['torch']}, "
        f"load average {facts['load_avg_1m']}",
        f"  preset {args.preset} (random weights, CNN frozen), fp32, {args.images} images at {args.size}x{args.size}, "
        f"{args.group} captions of {args.text_len} tokens per image")
    step = make_step(model, cfg, batch)
    cache = model.trunk.cache_features(2 ** 30)
    model.trunk.feature_cache = None
    torch.manual_seed(0)
    model.eval()  # the same loss twice: no dropout, no MVM draw, the dictionary still
    with torch.no_grad():
        plain = model(**batch).loss
        model.trunk.feature_cache = cache
        model(**batch)  # fills the cache
        cached = model(**batch).loss
    model.train()

    def run(with_cache: bool):
        def go() -> Any:
            model.trunk.feature_cache = cache if with_cache else None
            return step()
        return go

    times = interleaved({"uncached": run(False), "cached": run(True)}, args.iters, args.warmup)
    figures: dict[str, Any] = {
        "benchmark": "frozen_cnn", "preset": args.preset, **facts, "precision": "fp32", "images": args.images,
        "image_hw": [args.size, args.size], "texts": args.images * args.group, "iters": args.iters,
        "step_s_uncached": round(times["uncached"], 4), "step_s_cached": round(times["cached"], 4),
        "cache_speedup": round(times["uncached"] / times["cached"], 2),
        "loss_equal": bool(abs(float(plain) - float(cached)) <= 1e-5),
        "cache_hits": cache.hits, "cache_misses": cache.misses,
    }
    say(f"  step {times['uncached']:.3f} s running the CNN, {times['cached']:.3f} s from the cache: "
        f"{figures['cache_speedup']:.2f}x; same loss: {figures['loss_equal']}")
    emit(figures, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
