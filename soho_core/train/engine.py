"""The pre-training loop, top to bottom.

    soho pretrain --config tiny --data SHARDS --out RUN [--max-steps N]
    torchrun --nproc-per-node 2 -m soho_core pretrain --config tiny --data SHARDS --out RUN

Single process, torchrun and PyTorchJob all run this same function. It resumes from
the latest published checkpoint under OUT, logs one JSON line per ``log_every``
steps to OUT/metrics.jsonl (rank 0), and checkpoints every ``ckpt_every`` steps.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from soho_core import storage
from soho_core.config import SohoConfig
from soho_core.data.pretrain_data import pretrain_loader
from soho_core.data.shards import load_index, shard_urls
from soho_core.data.tokenizer import build_tokenizer
from soho_core.models import SohoModel
from soho_core.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from soho_core.train.distributed import all_reduce_sum, barrier, init_distributed
from soho_core.train.optim import build_optimizers, build_schedulers
from soho_core.train.tracking import MetricsLog

log = logging.getLogger(__name__)

# Per-step statistics summed over a logging window, in this order.
_STATS = ("loss", "loss_mlm", "loss_mvm", "loss_itm", "acc_itm", "acc_mlm", "mvm_correct", "num_mvm")


@dataclass
class PretrainResult:
    model: SohoModel  # unwrapped, on its device
    last_metrics: dict[str, Any]
    out: str


class _Objective(nn.Module):
    """DDP wraps ``forward``; this routes it to the model's pre-training objective."""

    def __init__(self, model: SohoModel):
        super().__init__()
        self.model = model

    def forward(self, **kw: Any):
        return self.model.pretrain_forward(**kw)


def _rng_state() -> dict[str, Any]:
    # Plain integer lists: they travel through all_gather_object and load with weights_only=True.
    return {"torch": torch.get_rng_state().tolist(), "numpy": np.random.get_state()[1].tolist(),
            "python": list(random.getstate()[1])}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def pretrain(cfg: SohoConfig, data_uri: str, out_uri: str, split: str = "train") -> PretrainResult:
    info = init_distributed(cfg.train.device)
    device = info.device
    tc = cfg.train
    # Fail on bad input before any work: the shards must exist and be readable.
    task_uri, index = load_index(data_uri, "pretrain")
    shard_urls(task_uri, index, split)
    tokenizer = build_tokenizer(cfg.model.fusion.tokenizer)

    # Same seed on every rank: identical initial weights and dictionaries.
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    model = SohoModel(cfg.model, vocab_size=len(tokenizer)).to(device)
    if cfg.model.backbone.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizers = build_optimizers(model, cfg.optim)
    schedulers = build_schedulers(optimizers, cfg.optim)

    start = 0
    resume_uri = latest_checkpoint(out_uri)
    if resume_uri:
        state = load_checkpoint(resume_uri, map_location=device)
        model.load_state_dict(state["model"])
        for opt, saved in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(saved)
        for sch, saved in zip(schedulers, state["schedulers"]):
            sch.load_state_dict(saved)
        start = int(state["step"])
        _set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
        if info.is_main:
            print(f"resuming from {resume_uri} at step {start}", flush=True)
    if info.is_main:
        storage.write_json_atomic(storage.join(out_uri, "config.json"), cfg.to_dict())

    objective: nn.Module = _Objective(model)
    if info.world_size > 1:
        # Buffers are not broadcast: the dictionary keeps ranks identical by itself
        # (its statistics are all-reduced), and a test checks that it does.
        objective = DistributedDataParallel(objective, broadcast_buffers=False,
                                            device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = tc.precision == "bf16" or (
        tc.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    # A new data seed per (re)start so a resumed run does not replay the same samples.
    loader = pretrain_loader(data_uri, split, cfg, tokenizer, seed=tc.seed * 7919 + start, train=True)
    batches = iter(loader)
    metrics = MetricsLog(out_uri, enabled=info.is_main)
    params = [p for p in model.parameters() if p.requires_grad]
    window = torch.zeros(len(_STATS), device=device)
    texts = skipped = 0
    steps_in_window = 0
    last: dict[str, Any] = {}
    t_window = time.perf_counter()
    model.train()
    for step in range(start, tc.max_steps):
        batch = next(batches)
        skipped += batch.skipped
        texts += batch.input_ids.shape[0]
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = objective(**batch.model_inputs(), mvm_prob=cfg.pretrain.mvm_image_prob,
                            loss_weights=cfg.pretrain.loss_weights)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        for opt in optimizers:
            opt.step()
        for sch in schedulers:
            sch.step()
        num_mvm = torch.as_tensor(out.num_mvm, device=device, dtype=torch.float32)
        window += torch.stack([out.loss.detach().float(), out.loss_mlm.detach().float(),
                               out.loss_mvm.detach().float(), out.loss_itm.detach().float(),
                               out.acc_itm.detach().float(), out.acc_mlm.detach().float(),
                               out.acc_mvm.detach().float() * num_mvm, num_mvm])
        steps_in_window += 1
        done = step + 1 == tc.max_steps
        if (step + 1) % tc.log_every == 0 or done:
            # Statistics leave the device once per logging window, not every step.
            counts = torch.tensor([steps_in_window, texts, skipped], device=device, dtype=torch.float64)
            all_reduce_sum(window)
            all_reduce_sum(counts)
            n_steps = float(counts[0])
            w = window.tolist()
            seconds = time.perf_counter() - t_window
            last = {"step": step + 1}
            for name, value in zip(_STATS[:6], w[:6]):
                last[name] = value / n_steps
            last["acc_mvm"] = w[6] / w[7] if w[7] > 0 else None
            last["mvm_positions"] = w[7] / n_steps
            last.update(model.dictionary_stats())
            last["lr"] = schedulers[0].get_last_lr()[0]
            if len(schedulers) > 1:
                last["lr_backbone"] = schedulers[1].get_last_lr()[0]
            last["samples_per_s"] = float(counts[1]) / seconds
            last["skipped_samples"] = int(counts[2])
            last["time"] = time.time()
            metrics.write(last)
            if info.is_main:
                print(_format(last), flush=True)
            window.zero_()
            texts = skipped = steps_in_window = 0
            t_window = time.perf_counter()
        if (step + 1) % tc.ckpt_every == 0 or done:
            _checkpoint(cfg, out_uri, step + 1, model, optimizers, schedulers, info)
    return PretrainResult(model=model, last_metrics=last, out=out_uri)


def _checkpoint(cfg, out_uri, step, model, optimizers, schedulers, info) -> None:
    # Every rank's RNG state is gathered so that a resumed run draws the same numbers.
    rng = _rng_state()
    if info.world_size > 1:
        gathered: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    if info.is_main:
        state = {"step": step, "model": model.state_dict(),
                 "optimizers": [o.state_dict() for o in optimizers],
                 "schedulers": [s.state_dict() for s in schedulers],
                 "rng": gathered, "config": cfg.to_dict(), "kind": "pretrain"}
        save_checkpoint(out_uri, step, state, keep=cfg.train.keep_checkpoints)
    barrier()


def _format(m: dict[str, Any]) -> str:
    keys = ("loss", "loss_mlm", "loss_mvm", "loss_itm", "acc_itm", "vd_usage", "vd_perplexity", "samples_per_s")
    parts = [f"step {m['step']}"]
    for k in keys:
        v = m.get(k)
        if isinstance(v, float):
            parts.append(f"{k} {v:.3f}")
    return "  ".join(parts)


