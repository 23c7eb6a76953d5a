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

import contextlib
import copy
import logging
import random
import time
from dataclasses import asdict, dataclass
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
from soho_core.env import runtime_env
from soho_core.models.backbone import FeatureCache, cnn_digest, load_backbone_weights
from soho_core.train.cpushare import CpuShare
from soho_core.train.checkpoint import clean_unpublished, latest_checkpoint, load_checkpoint, save_checkpoint
from soho_core.train.distributed import all_reduce_sum, barrier, init_distributed
from soho_core.train.optim import build_optimizers, build_schedulers
from soho_core.train.tracking import TRACKING_FILE, MetricsLog, WandbRun, tracking_run_id

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
    (it must match its weights), and for fine-tuning the dictionary kept or dropped. The fusion's
    dropout is a training setting, not architecture: the run's own value stands (a fine-tune may
    regularise where pre-training did not)."""
    cfg = copy.deepcopy(cfg)
    if init_state is not None:
        dropout = cfg.model.fusion.dropout
        given = cfg.model
        cfg.model = config_from_dict(init_state["config"]).model
        cfg.model.fusion.dropout = dropout
        ignored = _differences(asdict(given), asdict(cfg.model), "model")
        if ignored:  # a --set model.* that cannot apply: say so, rather than drop it unseen
            log.info("the model is the initialising checkpoint's; these settings of this run do not apply: %s",
                     ", ".join(f"{k}={mine!r} (checkpoint: {theirs!r})" for k, mine, theirs in ignored))
    if task.name != "pretrain":
        cfg.model.dictionary.enabled = cfg.model.dictionary.enabled and cfg.finetune.keep_dictionary
    return cfg.validate()


def _differences(mine: Any, theirs: Any, key: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, mine, theirs) for every leaf where two nested config dicts differ."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        return [d for k in sorted(mine.keys() | theirs.keys())
                for d in _differences(mine.get(k), theirs.get(k), f"{key}.{k}")]
    return [] if mine == theirs else [(key, mine, theirs)]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` for ``device``: "fp32", "bf16" or "fp16"."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision='fp16' needs a CUDA device; use 'bf16' or 'fp32' on a CPU")
    return precision


def data_seed(seed: int, step: int) -> int:
    """The seed of the training stream that starts at ``step``. The stream restarts at every
    checkpoint step, so a run resumed from step S reads exactly the batches that a run never
    interrupted read after S: no sample is repeated or skipped by a resume."""
    return seed * 7919 + step


def train(task: Task, cfg: SohoConfig, data_uri: str, out_uri: str, init: str | None = None,
          split: str = "train") -> TrainResult:
    info = init_distributed(cfg.train.device)
    env = runtime_env()
    device, tc = info.device, cfg.train
    precision = resolve_precision(tc.precision, device)
    # Fail on bad input before any work: shards, the initial checkpoint, the tokenizer.
    task_uri, index = load_index(data_uri, task.name)
    shard_urls(task_uri, index, split)
    storage.check_bucket(out_uri)  # s3fs would create a misspelt bucket on the first write
    if info.is_main:
        removed = clean_unpublished(out_uri)
        if removed:
            print(f"removed what an interrupted checkpoint write left: {', '.join(removed)}", flush=True)
    barrier()
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
    # cfg is this run's copy in both branches.
    cfg.data.images_per_batch = cfg.finetune.task_images_per_batch.get(task.name, cfg.data.images_per_batch)
    tokenizer = build_tokenizer(cfg.model.fusion.tokenizer)

    # Same seed on every rank: identical initial weights and dictionaries.
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    from_scratch = init_state is None and resume_state is None
    bb = cfg.model.backbone
    if from_scratch and cfg.optim.backbone_lr == 0 and not (bb.weights or bb.pretrained):
        raise ConfigError("optim.backbone_lr=0 keeps the CNN as it starts, and this run starts it random: "
                          "set model.backbone.weights (a CNN from `soho probe --save-backbone`), "
                          "model.backbone.pretrained=true, or a positive optim.backbone_lr")
    model = task.build_model(cfg, len(tokenizer), meta).to(device)
    if from_scratch and bb.weights:
        load_backbone_weights(model.trunk.backbone, bb)
        if info.is_main:
            print(f"backbone initialised from {bb.weights}", flush=True)
    if cfg.optim.backbone_lr == 0:
        # A CNN with no optimizer needs no gradient: the backward pass stops at its output. Its batch
        # norms keep their statistics too, so its features can be cached (train.feature_cache_mb).
        model.trunk.backbone.freeze()
    if cfg.model.backbone.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if init_state is not None:
        missing, unexpected = model.load_trunk(init_state["model"])
        if info.is_main:
            print(f"initialised from {init}: {len(missing)} trunk tensors new, "
                  f"{len(unexpected)} dropped ({', '.join(sorted({k.split('.')[0] for k in unexpected})) or '-'})",
                  flush=True)
    optimizers = build_optimizers(model, cfg.optim, cfg.finetune.head_lr_mult)
    schedulers = build_schedulers(optimizers, task.lr_schedule(cfg))
    # fp16 needs its gradients scaled; with bf16 or fp32 the scaler is a no-op.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    max_steps = task.max_steps(cfg)

    start, images_seen, wandb_id = 0, 0, None
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        for opt, saved in zip(optimizers, resume_state["optimizers"]):
            opt.load_state_dict(saved)
        for sch, saved in zip(schedulers, resume_state["schedulers"]):
            sch.load_state_dict(saved)
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start = int(resume_state["step"])
        images_seen = int(resume_state.get("data", {}).get("images_seen", 0))
        wandb_id = resume_state.get("tracking", {}).get("wandb_run_id")
        _set_rng_state(resume_state["rng"][min(info.rank, len(resume_state["rng"]) - 1)])
        if info.is_main:
            print(f"resuming from {resume_uri} at step {start} (restart {env.torchelastic_restart}; "
                  f"{images_seen} images seen)", flush=True)
    del init_state, resume_state
    cache = cache_uri = None
    if cfg.optim.backbone_lr == 0 and tc.feature_cache_mb > 0:
        # After every load: the cached features must be those of the weights that train.
        cache, cache_uri = _feature_cache(model, cfg, device, precision, info.is_main)
    metrics = MetricsLog(out_uri, enabled=info.is_main)
    wandb_run = WandbRun(tc.wandb and info.is_main, tracking_run_id(out_uri, wandb_id) if info.is_main else "",
                         out_uri, job_type="pretrain" if task.name == "pretrain" else f"finetune-{task.name}",
                         config=cfg.to_dict(), resumed=start > 0)
    if info.is_main:
        storage.retrying(lambda: storage.write_json_atomic(storage.join(out_uri, "config.json"), cfg.to_dict()),
                         f"writing {out_uri}/config.json")
        if start > 0:
            event = {"event": "resume", "step": start, "checkpoint": resume_uri,
                     "restart": env.torchelastic_restart, "images_seen": images_seen, "time": time.time()}
            metrics.write(event)
            wandb_run.log({"step": start, "resumes": 1})

    objective: nn.Module = model
    if info.world_size > 1:
        # Buffers are not broadcast: the dictionary keeps ranks identical by itself
        # (its statistics are all-reduced), and a test checks that it does.
        objective = DistributedDataParallel(model, broadcast_buffers=False,
                                            device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(objective) if tc.compile else objective
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    params = [p for p in model.parameters() if p.requires_grad]
    names: list[str] = []
    window: torch.Tensor | None = None
    texts = images = skipped = 0
    last: dict[str, Any] = {}
    loader = batches = None
    t_window = time.perf_counter()
    model.train()
    share = CpuShare.from_env()  # a local run's cores, shared with the tasks training alongside
    try:
        for step in range(start, max_steps):
            if share is not None:
                share.rebalance()
            if batches is None or step % tc.ckpt_every == 0:
                # A fresh stream at the start and after every checkpoint (see data_seed).
                del loader, batches
                loader = task.loader(data_uri, split, cfg, tokenizer, seed=data_seed(tc.seed, step), train=True)
                batches = iter(loader)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            for micro in range(tc.grad_accum):
                batch = next(batches)
                skipped += batch.skipped
                texts += batch.num_texts
                images += batch.images.shape[0]
                batch = batch.to(device)
                # Gradients are all-reduced once per optimizer step, on the last micro-batch.
                sync = micro == tc.grad_accum - 1 or not isinstance(objective, DistributedDataParallel)
                with contextlib.nullcontext() if sync else objective.no_sync():
                    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                        enabled=autocast_dtype is not None):
                        out = forward(**batch.model_inputs())
                    scaler.scale(out.loss / tc.grad_accum).backward()
                if window is None:
                    names = ["loss", *out.stats]
                    window = torch.zeros(2 * len(names), device=device, dtype=torch.float64)
                pairs = [(out.loss.detach().float(), torch.ones((), device=device))] + [out.stats[n] for n in names[1:]]
                window += torch.stack([x.double() for pair in pairs for x in pair])
            if cfg.optim.clip_grad > 0:
                for opt in optimizers:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
            for sch in schedulers:
                sch.step()
            done = step + 1 == max_steps
            if (step + 1) % tc.log_every == 0 or done:
                # Statistics leave the device once per logging window, not every step.
                counts = torch.tensor([texts, skipped, images], device=device, dtype=torch.float64)
                all_reduce_sum(window)
                all_reduce_sum(counts)
                w = window.tolist()
                seconds = time.perf_counter() - t_window
                images_seen += int(counts[2])
                last = {"step": step + 1}
                for i, name in enumerate(names):
                    last[name] = w[2 * i] / w[2 * i + 1] if w[2 * i + 1] > 0 else None
                if hasattr(model, "dictionary_stats"):
                    last.update(model.dictionary_stats())
                last["lr"] = schedulers[0].get_last_lr()[0]
                if len(schedulers) > 1:
                    last["lr_backbone"] = schedulers[1].get_last_lr()[0]
                last["samples_per_s"] = float(counts[0]) / seconds
                last["images_per_s"] = float(counts[2]) / seconds
                last["images_seen"] = images_seen
                last["skipped_samples"] = int(counts[1])
                if cache is not None:  # the share of images whose CNN features came from the cache so far
                    last["cnn_cached"] = cache.hits / max(1, cache.hits + cache.misses)
                if device.type == "cuda":
                    last["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    torch.cuda.reset_peak_memory_stats(device)
                last["time"] = time.time()
                metrics.write(last)
                wandb_run.log(last)
                if info.is_main:
                    print(_format(last), flush=True)
                window.zero_()
                texts = images = skipped = 0
                t_window = time.perf_counter()
            if (step + 1) % tc.ckpt_every == 0 or done:
                extra = {"scaler": scaler.state_dict(), "tracking": {"wandb_run_id": wandb_run_id(wandb_run, out_uri)},
                         "data": {"images_seen": images_seen + images * info.world_size,
                                  "stream_seed": data_seed(tc.seed, step + 1)}}
                pause = env.fault_checkpoint_pause
                _checkpoint(task, cfg, meta, out_uri, step + 1, model, optimizers, schedulers, info, extra,
                            pause_s=pause[1] if pause and pause[0] == step + 1 else 0.0)
    finally:
        wandb_run.finish()
        if share is not None:
            share.close()
    if cache_uri and info.is_main:
        cache.save(cache_uri)
    return TrainResult(model=model, last_metrics=last, out=out_uri)


def _feature_cache(model: nn.Module, cfg: SohoConfig, device: torch.device, precision: str,
                   is_main: bool) -> tuple[FeatureCache, str | None]:
    """Cache the frozen CNN's features (``train.feature_cache_mb``), filled from the file that
    ``train.feature_cache_dir`` keeps for this very CNN, if any: (the cache, that file or None)."""
    tc = cfg.train
    cache = model.trunk.cache_features(tc.feature_cache_mb * 2 ** 20)
    if not tc.feature_cache_dir:
        return cache, None
    how = f"device={device.type} precision={precision} channels_last={cfg.model.backbone.channels_last}"
    uri = storage.join(tc.feature_cache_dir, cnn_digest(model.trunk.backbone, how) + ".pt")
    loaded = cache.load(uri)
    if is_main:
        print(f"feature cache {uri}: {loaded} images' CNN features", flush=True)
    return cache, uri


def wandb_run_id(run: WandbRun, out_uri: str) -> str | None:
    """The id to keep in the checkpoint: the live run's, else the one recorded for OUT."""
    if run.active:
        return run.run.id
    uri = storage.join(out_uri, TRACKING_FILE)
    return storage.read_json(uri).get("wandb_run_id") if storage.exists(uri) else None


def _checkpoint(task, cfg, meta, out_uri, step, model, optimizers, schedulers, info, extra,
                pause_s: float = 0.0) -> None:
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
                 "schedulers": [s.state_dict() for s in schedulers], "rng": gathered, **extra}
        save_checkpoint(out_uri, step, state, keep=cfg.train.keep_checkpoints, pause_halfway_s=pause_s)
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
    """Evaluate a checkpoint on one split and write ``{"task", "split", "num_examples", "metrics"}``,
    for a downstream task also ``"baselines"``, ``"gain"`` and ``"breakdown"``
    (:mod:`soho_core.tasks.baselines`), plus up to a few ``samples`` of predictions, for reports.
    ``overrides`` (``a.b=c``) may
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
    cache_uri = None
    if cfg.train.feature_cache_dir and cfg.train.feature_cache_mb > 0:
        # In evaluation every CNN is still (no gradients, batch norms on their running statistics),
        # so its features may come from, and go to, the run's feature cache.
        model.trunk.backbone.freeze()
        cache, cache_uri = _feature_cache(model, cfg, info.device, "fp32", info.is_main)  # evaluation runs in fp32
    with CpuShare.from_env() or contextlib.nullcontext():  # counted among a local run's processes
        result = task.evaluate(model, data_uri, split, cfg, tokenizer, info.device)
    if cache_uri and info.is_main:
        cache.save(cache_uri)
    report = {"task": task.name, "split": split, "num_examples": result.num_examples, "metrics": result.metrics,
              **result.measurement()}
    if out_file:
        storage.write_json_atomic(out_file, {**report, "samples": result.samples} if result.samples else report)
    return report


def _format(m: dict[str, Any]) -> str:
    parts = [f"step {m['step']}"]
    for k, v in m.items():
        if isinstance(v, float) and k not in ("time", "lr", "lr_backbone") and not k.startswith("skipped"):
            parts.append(f"{k} {v:.3f}")
    return "  ".join(parts)
