"""Optimisers and schedule of the release: AdamW for the transformer and heads, SGD with
momentum and a larger rate for the CNN; linear warm-up, then step decay."""

from __future__ import annotations

import torch
from torch import nn

from typing import Callable

from soho_core.config import OptimConfig


def build_optimizers(model: nn.Module, cfg: OptimConfig, head_lr_mult: float = 1.0) -> list[torch.optim.Optimizer]:
    """[AdamW for the transformer and heads, SGD (or AdamW) for the CNN]. Heads that start from
    scratch in fine-tuning (``model.head_parameters()``) get ``head_lr_mult`` x the rate."""
    backbone = {id(p) for p in model.backbone_parameters()}
    heads = {id(p) for p in model.head_parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad or id(p) in backbone:
            continue
        # Biases and norm scales are not weight-decayed (standard for BERT).
        groups.setdefault((id(p) in heads, p.ndim > 1), []).append(p)
    # The fused kernels update every tensor in one pass: on a 2-core CPU, AdamW over the res18
    # model (58M parameters, half of them the tied word embedding) took 0.17 s per step with the
    # default per-tensor loop and 0.04 s fused; SGD 0.11 s -> 0.03 s.
    fused = {"fused": True} if next(model.parameters()).device.type in ("cpu", "cuda") else {}
    opts = [torch.optim.AdamW([{"params": ps, "weight_decay": cfg.weight_decay if decayed else 0.0,
                                "lr": cfg.lr * (head_lr_mult if head else 1.0)}
                               for (head, decayed), ps in sorted(groups.items())], lr=cfg.lr, **fused)]
    cnn = [p for p in model.backbone_parameters() if p.requires_grad]
    if cnn and cfg.backbone_lr > 0:
        opts.append(cnn_optimizer(cnn, cfg))
    return opts


def cnn_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The CNN's optimizer: SGD with momentum (the release) or AdamW, at ``backbone_lr``."""
    fused = {"fused": True} if params[0].device.type in ("cpu", "cuda") else {}
    if cfg.backbone_optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.backbone_lr, momentum=cfg.momentum,
                               weight_decay=cfg.backbone_weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.backbone_lr, weight_decay=cfg.backbone_weight_decay, **fused)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Pre-training: multiplier of every base learning rate at optimizer step ``step`` (0-based)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    passed = sum(1 for m in cfg.decay_steps if step >= m)
    return warm * cfg.decay_gamma ** passed


def finetune_lr_factor(step: int, max_steps: int, warmup_fraction: float) -> float:
    """Fine-tuning: linear warm-up over ``warmup_fraction`` of the run, then linear decay to zero
    at ``max_steps`` (BERT's fine-tuning schedule). Pre-training's warm-up and step milestones are
    counted in its own, much longer run: reused here, the demo's 80-step fine-tunes spent 50 steps
    warming up."""
    warmup = round(warmup_fraction * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup))


def build_schedulers(opts: list[torch.optim.Optimizer], factor: Callable[[int], float]
                     ) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One LambdaLR per optimizer; ``factor(step)`` multiplies every base rate."""
    return [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in opts]
