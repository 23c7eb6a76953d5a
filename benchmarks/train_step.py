"""Pre-training step time at the release's batch shape, its useful FLOPs, and the MFU.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_step.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_step.py --profile   # + per-op table
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_step.py --smoke     # seconds, for tests

One step is what the engine does per batch: forward of the pre-training model
(``SohoModel.pretrain_forward`` through ``PretrainModel``: MLM + MVM + ITM with the visual
dictionary), backward, gradient clipping, and the optimizers of ``build_optimizers`` (AdamW for
the transformer and heads, SGD for the CNN). The batch has the release's shape: 4 images at
384x640, 4 captions of 16 tokens each per image (T = 16 texts), fp32, 2 threads. Weights are
random (the res18 preset's ImageNet and BERT-base checkpoints are not needed for timing): the
architecture is the preset's, with BERT-base's width, 3 layers and 30,522-word vocabulary.

Figures (the JSON line):
  step_s            median seconds of one step
  flops_per_step    matmul/conv/attention FLOPs of forward + backward (FlopCounterMode)
  peak_gflops       this machine's fp32 matmul rate, a 4096^3 product timed in the same rounds
  mfu               flops_per_step / step_s / peak
  conv_peak_gflops  a large 3x3 convolution's rate (oneDNN), timed in the same rounds: on this
                    AMD CPU it beats MKL's matmul, so ``mfu_vs_best_peak`` divides by the larger
  vd_share          share of the step spent in the visual dictionary's forward (assign + EMA update)
  speedup_vs_reference  reference_step_s / step_s, with reference_step_s = 5.9 s: the reference
                    release's step at this batch shape on this kind of machine, measured
                    outside this run (its visual path runs once per caption and its MLM decoder
                    projects every position onto the vocabulary)
  release_like_*    the same model made to do the release's extra work (the visual path after
                    the CNN repeated for each caption, the vocabulary projection over every
                    position), measured in this run: an in-run check of the external figure
Steps and matmuls are timed in alternating rounds so that load from other processes hits both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_run_options, conv_peak_fn, count_flops, emit, interleaved, matmul_peak_fn,  # noqa: E402
                     op_profile, say, setup)

from soho_core.config import load_config  # noqa: E402
from soho_core.data.masking import mask_tokens  # noqa: E402
from soho_core.tasks.pretrain import PretrainModel  # noqa: E402
from soho_core.train.optim import build_optimizers  # noqa: E402

REFERENCE_STEP_S = 5.9  # the reference release, this batch shape, this kind of machine (external)
BERT_VOCAB, CLS, SEP, MASK, FIRST_WORD = 30522, 101, 102, 103, 999  # bert-base-uncased ids


def build(preset: str, overrides: list[str]) -> tuple[Any, PretrainModel]:
    """The preset's architecture with random weights (no checkpoint is read)."""
    cfg = load_config(preset, ["model.backbone.pretrained=false", "model.fusion.bert=", *overrides])
    model = PretrainModel(cfg, BERT_VOCAB)
    if cfg.model.backbone.channels_last:  # as the engine does
        model = model.to(memory_format=torch.channels_last)
    return cfg, model


def make_batch(cfg, images: int, group: int, height: int, width: int, text_len: int,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """A pre-training batch as the collator makes it: ``group`` captions per image, about half of
    them swapped for another image's (ITM negatives), 15% of word pieces MLM-masked on matched ones."""
    g = torch.Generator().manual_seed(seed)
    t = images * group
    ids = torch.randint(FIRST_WORD + 1, BERT_VOCAB, (t, text_len), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    itm = (torch.arange(t) % 2 == 0).long()  # half matched, half negatives
    # Every text is masked alike; only matched ones are scored (as the collator does).
    ids, mlm = mask_tokens(ids, special, torch.ones(t, dtype=torch.bool), cfg.pretrain.mlm_prob, MASK,
                           FIRST_WORD + 1, BERT_VOCAB, g)
    mlm[itm == 0] = -100
    return {"images": torch.randn(images, 3, height, width, generator=g),
            "image_sizes": torch.tensor([[height, width]] * images),
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "mlm_labels": mlm,
            "image_index": torch.arange(images).repeat_interleave(group), "itm_labels": itm}


def release_like(model: PretrainModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's visual work: the CNN once per image, then everything after it (pooling,
    projection, dictionary, gate) once per caption on copies of the image's features. A forward
    hook repeats the backbone's output; the batch then pairs text t with visual row t."""
    index = batch["image_index"]
    model.trunk.backbone.register_forward_hook(lambda m, i, out: out.index_select(0, index))
    b = dict(batch)
    b["image_sizes"] = batch["image_sizes"].index_select(0, index)
    b["image_index"] = torch.arange(index.shape[0])
    return b


def make_step(model: PretrainModel, cfg, batch: dict[str, torch.Tensor],
              full_vocab: bool = False) -> Callable[[], torch.Tensor]:
    """One optimizer step as the engine runs it. ``full_vocab``: the release's way instead: the
    fusion encoder's last layer at every position, and every output position projected onto the
    vocabulary (the release's MLM decoder; its result enters the loss multiplied by 0)."""
    opts = build_optimizers(model, cfg.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    captured: list[torch.Tensor] = []
    if full_vocab:
        plain = model.trunk.fusion.forward

        def every_position(*args: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
            hidden = plain(*args)  # (T, L + N, d)
            captured.append(hidden)
            return hidden if rows is None else hidden[rows]

        model.trunk.fusion.forward = every_position

    def step() -> torch.Tensor:
        out = model(**batch)
        loss = out.loss
        if full_vocab:
            loss = loss + 0.0 * model.trunk.mlm_head(captured.pop()).sum()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        for opt in opts:
            opt.step()
        return loss.detach()

    return step


class Stopwatch:
    """Seconds spent inside a module's forward, summed over calls (forward pre/post hooks)."""

    def __init__(self, module: torch.nn.Module):
        self.clock, self.total, self.started = time.perf_counter, 0.0, 0.0
        module.register_forward_pre_hook(lambda *a: setattr(self, "started", self.clock()))
        module.register_forward_hook(lambda *a: setattr(self, "total", self.total + self.clock() - self.started))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="res18")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.backbone.channels_last=true (repeatable)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--group", type=int, default=4, help="captions per image")
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--text-len", type=int, default=16)
    add_run_options(p, warmup=2)
    p.add_argument("--release-iters", type=int, default=2, help="timed steps of the release-like variant (0: skip)")
    p.add_argument("--peak-size", type=int, default=4096)
    p.add_argument("--profile", action="store_true", help="add the ops with most self time to the JSON")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.images, args.group, args.height, args.width, args.text_len = "tiny", 2, 2, 64, 64, 8
        args.iters, args.warmup, args.release_iters, args.peak_size = 1, 0, 1, 256

    facts = setup(args.threads)
    cfg, model = build(args.preset, args.overrides)
    model.train()
    batch = make_batch(cfg, args.images, args.group, args.height, args.width, args.text_len)
    say(f"train_step: {facts['machine']}, {facts['threads']} threads, torch {facts['torch']}, "
        f"load average {facts['load_avg_1m']}",
        f"  preset {args.preset} (random weights), fp32, {args.images} images at {args.height}x{args.width}, "
        f"{args.group} captions of {args.text_len} tokens per image, "
        f"channels_last={cfg.model.backbone.channels_last}")

    step = make_step(model, cfg, batch)
    watch = Stopwatch(model.trunk.dictionary) if model.trunk.dictionary is not None else None
    flops, per_op = count_flops(step)
    peak_fn, peak_flops = matmul_peak_fn(args.peak_size)
    conv_fn, conv_flops = conv_peak_fn(*((32, 16, 2) if args.smoke else ()))
    vd_before = watch.total if watch else 0.0
    times = interleaved({"step": step, "peak": peak_fn, "conv": conv_fn}, args.iters, args.warmup)
    # The dictionary's time over the timed steps (and the warm-up ones, alike), per step.
    vd_s = (watch.total - vd_before) / (args.iters + args.warmup) if watch else 0.0
    step_s, peak, conv_peak = times["step"], peak_flops / times["peak"], conv_flops / times["conv"]
    figures: dict[str, Any] = {
        "benchmark": "train_step", "preset": args.preset, **facts, "precision": "fp32",
        "images": args.images, "image_hw": [args.height, args.width], "texts": args.images * args.group,
        "text_len": args.text_len, "channels_last": cfg.model.backbone.channels_last,
        "iters": args.iters, "step_s": round(step_s, 4), "flops_per_step": flops,
        "achieved_gflops": round(flops / step_s / 1e9, 1), "peak_gflops": round(peak / 1e9, 1),
        "mfu": round(flops / step_s / peak, 3), "conv_peak_gflops": round(conv_peak / 1e9, 1),
        "mfu_vs_best_peak": round(flops / step_s / max(peak, conv_peak), 3),
        "vd_s": round(vd_s, 5), "vd_share": round(vd_s / step_s, 4),
        "reference_step_s": REFERENCE_STEP_S, "speedup_vs_reference": round(REFERENCE_STEP_S / step_s, 2),
        "flops_by_op": {k: round(v / flops, 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
    }
    if args.release_iters > 0:
        say("  timing the release-like variant (visual path per caption, vocabulary over every position)")
        _, slow = build(args.preset, [*args.overrides, "model.itc_dim=0"])  # the release has no ITC
        slow.load_state_dict(model.state_dict(), strict=False)
        slow.train()
        slow_step = make_step(slow, cfg, release_like(slow, batch), full_vocab=True)
        slow_flops, _ = count_flops(slow_step)
        slow_times = interleaved({"step": step, "slow": slow_step}, args.release_iters, 1)
        figures.update({"release_like_step_s": round(slow_times["slow"], 4),
                        "release_like_flops_per_step": slow_flops,
                        "speedup_vs_release_like": round(slow_times["slow"] / slow_times["step"], 2)})
        del slow, slow_step
    if args.profile:
        figures["profile"] = op_profile(step, top=15)
    say(f"  step {step_s:.3f} s, {flops / 1e9:.1f} GFLOP -> {flops / step_s / 1e9:.1f} GFLOP/s; "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s (conv {conv_peak / 1e9:.1f}); mfu {flops / step_s / peak:.2f}; "
        f"dictionary {vd_s * 1e3:.1f} ms ({vd_s / step_s:.1%}); "
        f"{REFERENCE_STEP_S} s (reference release, measured elsewhere) / step = {REFERENCE_STEP_S / step_s:.2f}")
    emit(figures, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
