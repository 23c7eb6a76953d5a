"""The training loop, top to bottom, for pre-training and every downstream task.

    soho pretrain --config tiny --data SHARDS --out RUN [--max-steps N]
    soho finetune --task vqa --init RUN --data SHARDS --out FT
    torchrun --nproc-per-node 2 -m soho_core pretrain --config tiny --data SHARDS --out RUN

Single process, torchrun and PyTorchJob all run :func:`train`. It resumes from the
latest published checkpoint under OUT (else initialises the trunk from ``init``), logs
one JSON line per ``log_every`` steps to OUT/metrics.jsonl (rank 0) and checkpoints
every ``ckpt_every`` steps and at the end.
"""

from __future__ import annotations

import copy
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
from soho_core.config import ConfigError, SohoConfig, apply_overrides, config_from_dict
from soho_core.data.shards import load_index, shard_urls
from soho_core.data.tokenizer import build_tokenizer
from soho_core.tasks.base import Task, TaskModel
from soho_core.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from soho_core.train.distributed import all_reduce_sum, barrier, init_distributed
from soho_core.train.optim import build_optimizers, build_schedulers
from soho_core.train.tracking import MetricsLog

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: TaskModel  # unwrapped, on its device
    last_metrics: dict[str, Any]
    out: str


def _rng_state() -> dict[str, Any]:
    # Plain integer lists: they travel through all_gather_object and load with weights_only=True.
    return {"torch": torch.get_rng_state().tolist(), "numpy": np.random.get_state()[1].tolist(),
            "python": list(random.getstate()[1])}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def run_config(checkpoint: str, overrides: list[str] | None = None) -> SohoConfig:
    """The config a run folder or checkpoint file was trained with, ``overrides`` applied."""
    state = load_checkpoint(checkpoint, map_location="cpu")
    return apply_overrides(config_from_dict(state["config"]), overrides)


def model_config_for(task: Task, cfg: SohoConfig, init_state: dict[str, Any] | None) -> SohoConfig:
    """The config a task model is built with: the architecture of the initialising checkpoint
    (it must match its weights), and for fine-tuning the dictionary kept or dropped."""
    cfg = copy.deepcopy(cfg)
    if init_state is not None:
        cfg.model = config_from_dict(init_state["config"]).model
    if task.name != "pretrain":
        cfg.model.dictionary.enabled = cfg.model.dictionary.enabled and cfg.finetune.keep_dictionary
    return cfg.validate()


def train(task: Task, cfg: SohoConfig, data_uri: str, out_uri: str, init: str | None = None,
          split: str = "train") -> TrainResult:
    info = init_distributed(cfg.train.device)
    device, tc = info.device, cfg.train
    # Fail on bad input before any work: shards, the initial checkpoint, the tokenizer.
    task_uri, index = load_index(data_uri, task.name)
    shard_urls(task_uri, index, split)
    resume_uri = latest_checkpoint(out_uri)
    init_state = load_checkpoint(init, map_location="cpu") if init and not resume_uri else None
    resume_state = load_checkpoint(resume_uri, map_location="cpu") if resume_uri else None
    if resume_state is not None:
        # The architecture is the checkpoint's; schedule and length may change (e.g. extending
        # a run with a larger --max-steps).
        cfg = copy.deepcopy(cfg)
        cfg.model = config_from_dict(resume_state["config"]).model
        meta = resume_state["meta"]
    else:
        cfg = model_config_for(task, cfg, init_state)
        meta = task.metadata(data_uri, cfg)
    tokenizer = build_tokenizer(cfg.model.fusion.tokenizer)

    # Same seed on every rank: identical initial weights and dictionaries.
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    model = task.build_model(cfg, len(tokenizer), meta).to(device)
    if cfg.model.backbone.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if init_state is not None:
        missing, unexpected = model.load_trunk(init_state["model"])
        if info.is_main:
            print(f"initialised from {init}: {len(missing)} trunk tensors new, "
                  f"{len(unexpected)} dropped ({', '.join(sorted({k.split('.')[0] for k in unexpected})) or '-'})",
                  flush=True)
    optimizers = build_optimizers(model, cfg.optim, cfg.finetune.head_lr_mult)
    schedulers = build_schedulers(optimizers, cfg.optim)
    max_steps = task.max_steps(cfg)

    start = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        for opt, saved in zip(optimizers, resume_state["optimizers"]):
            opt.load_state_dict(saved)
        for sch, saved in zip(schedulers, resume_state["schedulers"]):
            sch.load_state_dict(saved)
        start = int(resume_state["step"])
        _set_rng_state(resume_state["rng"][min(info.rank, len(resume_state["rng"]) - 1)])
        if info.is_main:
            print(f"resuming from {resume_uri} at step {start}", flush=True)
    del init_state, resume_state
    if info.is_main:
        storage.write_json_atomic(storage.join(out_uri, "config.json"), cfg.to_dict())

    objective: nn.Module = model
    if info.world_size > 1:
        # Buffers are not broadcast: the dictionary keeps ranks identical by itself
        # (its statistics are all-reduced), and a test checks that it does.
        objective = DistributedDataParallel(model, broadcast_buffers=False,
                                            device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = tc.precision == "bf16" or (
        tc.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    # A new data seed per (re)start so a resumed run does not replay the same samples.
    batches = iter(task.loader(data_uri, split, cfg, tokenizer, seed=tc.seed * 7919 + start, train=True))
    metrics = MetricsLog(out_uri, enabled=info.is_main)
    params = [p for p in model.parameters() if p.requires_grad]
    names: list[str] = []
    window: torch.Tensor | None = None
    texts = skipped = steps_in_window = 0
    last: dict[str, Any] = {}
    t_window = time.perf_counter()
    model.train()
    for step in range(start, max_steps):
        batch = next(batches)
        skipped += batch.skipped
        texts += batch.num_texts
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = objective(**batch.model_inputs())
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        for opt in optimizers:
            opt.step()
        for sch in schedulers:
            sch.step()
        if window is None:
            names = ["loss", *out.stats]
            window = torch.zeros(2 * len(names), device=device, dtype=torch.float64)
        pairs = [(out.loss.detach().float(), torch.ones((), device=device))] + [out.stats[n] for n in names[1:]]
        window += torch.stack([x.double() for pair in pairs for x in pair])
        steps_in_window += 1
        done = step + 1 == max_steps
        if (step + 1) % tc.log_every == 0 or done:
            # Statistics leave the device once per logging window, not every step.
            counts = torch.tensor([texts, skipped], device=device, dtype=torch.float64)
            all_reduce_sum(window)
            all_reduce_sum(counts)
            w = window.tolist()
            seconds = time.perf_counter() - t_window
            last = {"step": step + 1}
            for i, name in enumerate(names):
                last[name] = w[2 * i] / w[2 * i + 1] if w[2 * i + 1] > 0 else None
            if hasattr(model, "dictionary_stats"):
                last.update(model.dictionary_stats())
            last["lr"] = schedulers[0].get_last_lr()[0]
            if len(schedulers) > 1:
                last["lr_backbone"] = schedulers[1].get_last_lr()[0]
            last["samples_per_s"] = float(counts[0]) / seconds
            last["skipped_samples"] = int(counts[1])
            last["time"] = time.time()
            metrics.write(last)
            if info.is_main:
                print(_format(last), flush=True)
            window.zero_()
            texts = skipped = steps_in_window = 0
            t_window = time.perf_counter()
        if (step + 1) % tc.ckpt_every == 0 or done:
            _checkpoint(task, cfg, meta, out_uri, step + 1, model, optimizers, schedulers, info)
    return TrainResult(model=model, last_metrics=last, out=out_uri)


def _checkpoint(task, cfg, meta, out_uri, step, model, optimizers, schedulers, info) -> None:
    # Every rank's RNG state is gathered so that a resumed run draws the same numbers.
    rng = _rng_state()
    if info.world_size > 1:
        gathered: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    if info.is_main:
        state = {"step": step, "kind": task.name, "meta": meta, "config": cfg.to_dict(),
                 "model": model.state_dict(),
                 "optimizers": [o.state_dict() for o in optimizers],
                 "schedulers": [s.state_dict() for s in schedulers], "rng": gathered}
        save_checkpoint(out_uri, step, state, keep=cfg.train.keep_checkpoints)
    barrier()


def load_task_model(task: Task, checkpoint: str, device: torch.device | str = "cpu"):
    """(model in eval mode, its config, tokenizer) from a checkpoint of ``task``; a checkpoint of
    another task is a clear error."""
    state = load_checkpoint(checkpoint, map_location="cpu")
    if state.get("kind") != task.name:
        raise ValueError(f"checkpoint {checkpoint!r} is a {state.get('kind')!r} checkpoint, not {task.name!r}")
    cfg = config_from_dict(state["config"])
    tokenizer = build_tokenizer(cfg.model.fusion.tokenizer)
    model = task.build_model(cfg, len(tokenizer), state["meta"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, tokenizer


def evaluate(task: Task, checkpoint: str, data_uri: str, out_file: str | None, split: str = "test",
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on one split and write ``{"task", "split", "num_examples", "metrics"}``
    (plus up to a few ``samples`` of predictions, for reports). ``overrides`` (``a.b=c``) may
    change evaluation settings only: ``data.*`` and ``finetune.*``, never the model."""
    for item in overrides or []:
        if not item.startswith(("data.", "finetune.")):
            raise ConfigError(f"evaluation override {item!r}: only data.* and finetune.* keys can change "
                              f"at evaluation (the model is the checkpoint's)")
    task_uri, index = load_index(data_uri, task.name)
    shard_urls(task_uri, index, split)
    info = init_distributed("auto")
    model, cfg, tokenizer = load_task_model(task, checkpoint, info.device)
    apply_overrides(cfg, overrides)
    result = task.evaluate(model, data_uri, split, cfg, tokenizer, info.device)
    report = {"task": task.name, "split": split, "num_examples": result.num_examples, "metrics": result.metrics}
    if out_file:
        storage.write_json_atomic(out_file, {**report, "samples": result.samples} if result.samples else report)
    return report


def _format(m: dict[str, Any]) -> str:
    parts = [f"step {m['step']}"]
    for k, v in m.items():
        if isinstance(v, float) and k not in ("time", "lr", "lr_backbone") and not k.startswith("skipped"):
            parts.append(f"{k} {v:.3f}")
    return "  ".join(parts)
