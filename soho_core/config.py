"""Typed configuration: nested dataclasses, named presets, YAML and ``--set`` overrides.

    from soho_core.config import load_config
    cfg = load_config("tiny", overrides=["optim.lr=3e-4", "train.max_steps=20"])

A preset is a plain function returning a :class:`SohoConfig`. A YAML file given
instead of a preset name may start with ``preset: NAME`` and then override any
field with nested mappings. Every key and value is checked before work starts;
an error names the dotted field (``model.dictionary.size``) and, for an unknown
key, lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the field."""


# --------------------------------------------------------------------------- parts


@dataclass
class BackboneConfig:
    depth: int = 18  # torchvision ResNet depth: 18, 34, 50 or 101
    pretrained: bool = False  # torchvision ImageNet weights (needs them cached locally)
    # A CNN trained elsewhere (file or URI), e.g. `soho probe --save-backbone`: a run that starts
    # from scratch (no --init, no resume) loads it into the backbone, as the release starts from
    # ImageNet weights. Its depth and out_stage must match these.
    weights: str = ""
    frozen_stages: int = 1  # stem + this many residual stages get no gradient (release: 1); -1: none
    out_stage: int = 5  # last ResNet stage used: 5 -> stride 32 (release), 4 -> stride 16, 3 -> 8
    channels_last: bool = False


POOL_MODES = ("max", "concat")  # model.visual.pool_mode


@dataclass
class VisualConfig:
    pool: int = 2  # pooling kernel = stride on the last feature map (release: 2, stride 64 overall)
    # How a pool x pool window becomes one token: "max" (the release: the window's strongest response per
    # channel) or "concat" (the window's features side by side, then the same 1x1 projection: what
    # sits where inside the window, and how much of it, survives the pooling).
    pool_mode: str = "max"  # one of POOL_MODES


@dataclass
class DictionaryConfig:
    enabled: bool = True  # False: no quantiser and no MVM (the "no VD" ablation, fine-tuning)
    size: int = 2048  # K, number of visual words
    decay_start: float = 0.4  # EMA decay at the first update ...
    decay_max: float = 0.99  # ... ramped linearly to this ...
    decay_ramp_steps: int = 1000  # ... over this many updates
    laplace_eps: float = 1e-5  # Laplace smoothing of the EMA counts
    dead_threshold: float = 1e-3  # EMA count under which an entry is re-seeded from current features
    gate: bool = True  # learned 2-way softmax gate mixing quantised and raw features (release)


@dataclass
class FusionConfig:
    # A BERT checkpoint (directory or hub name) loaded with from_pretrained, or "" for random init.
    bert: str = ""
    # Tokenizer directory or hub name; "synthetic" builds the word-level vocabulary of the
    # built-in synthetic world (no download needed).
    tokenizer: str = "synthetic"
    # Used when ``bert`` is "" (random init). With a checkpoint, its own width/heads win,
    # and ``num_layers`` keeps the first layers (the release keeps 3 of BERT-base's 12).
    hidden_size: int = 768
    num_layers: int = 3
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    max_text_len: int = 32
    # Std of the random init (BERT's 0.02 suits width 768; a narrow model needs more, see _from_scratch).
    init_range: float = 0.02


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    visual: VisualConfig = field(default_factory=VisualConfig)
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # > 0: an image-text contrastive head of this width, trained in pre-training with weight
    # pretrain.loss_weights.itc (ALBEF's "align before fuse"; SOHO has none, so the res presets keep 0).
    itc_dim: int = 0
    itc_pool: str = "mean"  # how ITC pools an image's visual tokens: "mean" or "max" (channel-wise)


@dataclass
class DataConfig:
    image_min: int = 600  # short side fits this ...
    image_max: int = 1000  # ... and the long side this (aspect kept); then padded
    size_divisor: int = 32  # pad height and width up to a multiple of this
    images_per_batch: int = 4  # per process
    sentence_group: int = 4  # captions paired with each image in a batch (release: 4)
    num_workers: int = 2
    shuffle_buffer: int = 500
    # Unreadable shards in a row are retried with back-off; after this long without one readable
    # sample the stream fails (the store is gone or every shard is broken) instead of spinning.
    unreadable_timeout_s: float = 600.0


LOSSES = frozenset({"mlm", "mvm", "itm", "itc"})


@dataclass
class PretrainConfig:
    mlm_prob: float = 0.15  # fraction of word pieces masked (80% [MASK], 10% random, 10% kept)
    mvm_image_prob: float = 0.5  # chance an image gets one visual word masked, in training only
    itm_neg_prob: float = 0.5  # chance a caption is swapped for another image's caption
    # itc counts only with model.itc_dim > 0
    loss_weights: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "mvm": 1.0, "itm": 1.0, "itc": 1.0})
    itc_temperature: float = 0.07  # softmax temperature of the ITC similarities


@dataclass
class FinetuneConfig:
    max_steps: int = 5000  # optimizer steps of one fine-tuning run (train.max_steps is pre-training's)
    # Fine-tuning has its own schedule: linear warm-up over this fraction of max_steps, then linear
    # decay to zero (optim.warmup_steps and optim.decay_steps are pre-training's).
    warmup_fraction: float = 0.1
    # Per-task step counts that replace max_steps, e.g. {"retrieval": 150} (its steps cost ~3x a VQA step).
    task_steps: dict[str, int] = field(default_factory=dict)
    # Per-task batch sizes that replace data.images_per_batch in that task's fine-tune, e.g. {"nlvr2": 16}
    # (8 images are 4 NLVR2 pairs: 8 statements a step in a world with 2 statements a pair).
    task_images_per_batch: dict[str, int] = field(default_factory=dict)
    keep_dictionary: bool = False  # the release drops the quantiser when fine-tuning
    head_lr_mult: float = 10.0  # new task heads start from scratch: their rate is optim.lr x this
    answer_vocab_size: int = 3129  # VQA: the most frequent answers of the training split
    itc_temperature: float = 0.07  # retrieval: softmax temperature of the pooled-feature similarity
    shortlist_k: int = 16  # retrieval two-stage mode: candidates kept by the cheap similarity
    # Retrieval evaluation also scores every image-caption pair with ITM (the spec's metric); false:
    # the two-stage ranking alone, reported under the plain names (r_mean, ...).
    retrieval_exact: bool = True
    eval_max_images: int = 0  # retrieval evaluation: use the first N images of the split (0 = all)
    eval_blind: bool = True  # evaluation also scores the model with constant images (its text prior)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # AdamW, transformer and heads
    weight_decay: float = 0.01
    backbone_optimizer: str = "sgd"  # "sgd" (release, momentum 0.9) or "adamw"
    backbone_lr: float = 1e-2  # release: 100x the transformer's
    backbone_weight_decay: float = 1e-4  # the CNN's own (release: 1e-4 with SGD; weight_decay is AdamW's)
    momentum: float = 0.9
    warmup_steps: int = 500
    decay_steps: list[int] = field(default_factory=list)  # step milestones ...
    decay_gamma: float = 0.1  # ... each multiplies the learning rates by this
    clip_grad: float = 10.0  # max gradient norm; 0 disables


@dataclass
class TrainConfig:
    max_steps: int = 1000
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    # "auto": bf16 autocast on a GPU that has it, else fp16 with a gradient scaler; fp32 on CPU
    # (bf16 on CPU is faster on AVX512-BF16/AMX machines but changes what the small presets learn:
    # set it explicitly). Or "fp32", "bf16", "fp16" (CUDA only).
    precision: str = "auto"
    device: str = "auto"  # "auto", "cpu", "cuda"
    grad_accum: int = 1  # micro-batches of data.images_per_batch per optimizer step
    compile: bool = False  # torch.compile the model (first steps are slow while it compiles)
    # With the CNN frozen (optim.backbone_lr=0), each image's CNN features are kept, up to this many MB
    # per process, and reused when the image comes again (exact: the CNN cannot change). 0: off.
    feature_cache_mb: int = 1024
    # Where those features outlive the process (a folder or s3:// prefix; "" = nowhere): one file per
    # CNN (named by its weights' digest), read when a run or an evaluation starts and written when it
    # ends, so the next step of a pipeline that keeps the same CNN does not run it again.
    feature_cache_dir: str = ""
    wandb: bool = True  # log to wandb from rank 0 (offline without WANDB_API_KEY; WANDB_MODE=disabled: off)


@dataclass
class SohoConfig:
    preset: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "SohoConfig":
        _validate(self)
        return self


# --------------------------------------------------------------------------- presets


def _from_scratch(preset: str, image: int, width: int, heads: int, dict_size: int) -> SohoConfig:
    """Small presets for a CPU: random-init CNN and BERT, the synthetic vocabulary, and
    stride-16 features (ResNet to stage 4, no pooling) so a scene is several tokens wide."""
    c = SohoConfig(preset=preset)
    c.model.backbone.out_stage = 4
    c.model.visual.pool = 1
    c.model.dictionary.size = dict_size
    f = c.model.fusion
    f.hidden_size, f.num_layers, f.num_heads, f.intermediate_size = width, 2, heads, 4 * width
    # BERT's init std of 0.02 is tuned for width 768; at width 64 it leaves attention uniform and
    # the image a ~0.5% change in [CLS], and ITM stayed at chance for 1,400 steps. 1/sqrt(width)
    # gives the dot products of a unit-variance layer.
    f.init_range = width ** -0.5
    # With a CNN trained from scratch, ITM alone gets no signal that depends on the text until the
    # CNN's features say something (chicken and egg: with the raw pixels as features it learned).
    # An ITC loss on pooled features gives the CNN that signal from the first step.
    c.model.itc_dim = width
    # ImageNet weights are frozen in the release's first stage; frozen random filters only lose
    # detail, so nothing is frozen (0 would still freeze the stem).
    c.model.backbone.frozen_stages = -1
    c.data.image_min = c.data.image_max = image
    c.data.images_per_batch = 8
    # A CNN trained from scratch can satisfy MVM by making its visual words uninformative: at
    # MVM weight 1 on the tiny preset, dictionary perplexity fell from 29 to 8-13 within 300
    # steps (masking 15% of images instead of 50% did not help); at 0.1 it stayed near 30.
    # The res presets start from ImageNet weights, as the release does, and keep weight 1.
    c.pretrain.loss_weights["mvm"] = 0.1
    # A CNN trained from scratch learns shapes several times faster with AdamW at 1e-3 than with the
    # release's SGD at 1e-2 (a shape classifier on 128-px scenes: 0.75 against 0.27 after 500 steps),
    # and pre-trained with it, the demo's VQA fine-tune reads colours (0.56 against 0.15-0.24).
    c.optim.backbone_optimizer, c.optim.backbone_lr = "adamw", 1e-3
    return c


def tiny() -> SohoConfig:
    """Seconds on a CPU: for tests. 64-px images (a 4x4 grid), width 64, K=64."""
    c = _from_scratch("tiny", image=64, width=64, heads=2, dict_size=64)
    c.model.dictionary.decay_ramp_steps = 50
    c.model.fusion.intermediate_size, c.model.fusion.dropout, c.model.fusion.max_text_len = 128, 0.0, 24
    c.data.num_workers, c.data.shuffle_buffer = 0, 100
    c.optim.lr, c.optim.warmup_steps = 1e-3, 10
    c.train.max_steps, c.train.log_every, c.train.ckpt_every = 100, 10, 50
    c.finetune.max_steps = 60
    return c


def demo() -> SohoConfig:
    """The local main job: minutes on 2 CPU cores. 128-px images, ResNet to stride 16 then the
    release's 2x2 pooling (a 4x4 grid of visual tokens), width 256, K=256."""
    c = _from_scratch("demo", image=128, width=256, heads=4, dict_size=256)
    # The fusion, not the CNN, sets the pace: given perfect object features (one-hot attributes at each
    # object's token), a 300-step VQA fine-tune reached 0.55 at an 8x8 grid and 0.60 at 4x4, at half
    # the time per step; dropout 0 instead of 0.1 gave 0.62. Pre-training at 4x4 runs at 42 images/s
    # against 31.
    c.model.visual.pool = 2
    c.model.fusion.dropout = 0.0
    c.model.dictionary.decay_ramp_steps = 200
    c.data.num_workers = 1
    # A lower rate on the transformer than on the CNN keeps it from locking onto text priors; with
    # the ITC head, 3e-4 beat 1e-4 (600 steps: ITM accuracy 0.69 vs 0.61, MLM loss 1.27 vs 1.73).
    c.optim.lr, c.optim.warmup_steps = 3e-4, 50
    c.train.max_steps, c.train.log_every, c.train.ckpt_every = 600, 20, 200
    c.finetune.max_steps = 300
    return c


def res18() -> SohoConfig:
    """The reference release: ResNet-18, K=2048, 3 BERT-base layers, images fit to 600x1000."""
    c = SohoConfig(preset="res18")
    c.model.backbone.pretrained = True
    c.model.fusion.bert = "bert-base-uncased"
    c.model.fusion.tokenizer = "bert-base-uncased"
    c.model.fusion.num_layers = 3
    c.optim.warmup_steps = 500
    c.optim.decay_steps = [100_000, 140_000]
    c.train.max_steps = 160_000
    c.train.ckpt_every = 2000
    c.train.log_every = 50
    return c


def res101() -> SohoConfig:
    """The paper: ResNet-101 and all 12 BERT-base layers."""
    c = res18()
    c.preset = "res101"
    c.model.backbone.depth = 101
    c.model.fusion.num_layers = 12
    return c


PRESETS = {"tiny": tiny, "demo": demo, "res18": res18, "res101": res101}


# --------------------------------------------------------------------------- loading


def load_config(preset_or_file: str = "tiny", overrides: list[str] | None = None) -> SohoConfig:
    """Build a config from a preset name or a YAML file, then apply ``a.b=c`` overrides."""
    if preset_or_file in PRESETS:
        cfg = PRESETS[preset_or_file]()
    elif preset_or_file.endswith((".yaml", ".yml")) or Path(preset_or_file).is_file():
        path = Path(preset_or_file)
        if not path.is_file():
            raise ConfigError(f"config file {preset_or_file!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {preset_or_file!r} must hold a mapping")
        base = data.pop("preset", "tiny")
        if base not in PRESETS:
            raise ConfigError(f"{preset_or_file}: preset {base!r} is unknown; valid: {sorted(PRESETS)}")
        cfg = PRESETS[base]()
        _merge(cfg, data, prefix="")
    else:
        raise ConfigError(f"config {preset_or_file!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: SohoConfig, overrides: list[str] | None) -> SohoConfig:
    """Apply ``a.b=value`` overrides (values parsed as YAML) in place, validate, return ``cfg``."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like a.b=value")
        set_value(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else raw)
    return cfg.validate()


def config_from_dict(data: dict[str, Any]) -> SohoConfig:
    """Rebuild a config saved with ``to_dict`` (for instance inside a checkpoint)."""
    cfg = SohoConfig()
    _merge(cfg, dict(data), prefix="")
    return cfg.validate()


def set_value(cfg: SohoConfig, dotted: str, value: Any) -> None:
    obj: Any = cfg
    parts = dotted.split(".")
    for i, name in enumerate(parts):
        prefix = ".".join(parts[:i])
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            where = f"in {prefix!r} " if prefix else ""
            raise ConfigError(f"unknown config key {dotted!r}: no field {name!r} {where}(valid: {', '.join(names)})")
        hint = typing.get_type_hints(type(obj))[name]
        if i == len(parts) - 2 and typing.get_origin(hint) is dict:  # one entry: pretrain.loss_weights.itc=0
            setattr(obj, name, {**getattr(obj, name), **_coerce(dotted, {parts[-1]: value}, hint)})
            return
        if i == len(parts) - 1:
            value = _coerce(dotted, value, hint)
            current = getattr(obj, name)
            setattr(obj, name, {**current, **value} if isinstance(current, dict) else value)
        else:
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is a value, not a section")


def _merge(obj: Any, data: dict[str, Any], prefix: str) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        names = [f.name for f in dataclasses.fields(obj)]
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r} (valid here: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} is a section and needs a mapping, got {value!r}")
            _merge(current, value, prefix=dotted + ".")
        else:
            hint = typing.get_type_hints(type(obj))[key]
            value = _coerce(dotted, value, hint)
            # A mapping updates the preset's (giving one loss weight keeps the others).
            setattr(obj, key, {**current, **value} if isinstance(current, dict) else value)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # yaml reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    elif origin is dict:
        _, item = typing.get_args(hint)
        if isinstance(value, dict):
            return {str(k): _coerce(f"{name}.{k}", v, item) for k, v in value.items()}
    expected = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"config key {name!r} needs a {expected}, got {value!r}")


def _validate(c: SohoConfig) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r} {why}, got {_get(c, key)!r}")

    m = c.model
    need(m.backbone.depth in (18, 34, 50, 101, 152), "model.backbone.depth", "must be one of 18, 34, 50, 101, 152")
    need(-1 <= m.backbone.frozen_stages <= 4, "model.backbone.frozen_stages", "must be in -1..4 (-1: nothing frozen)")
    need(m.backbone.out_stage in (3, 4, 5), "model.backbone.out_stage", "must be 3, 4 or 5")
    need(m.backbone.frozen_stages < m.backbone.out_stage - 1, "model.backbone.frozen_stages",
         "must leave at least one trainable stage before model.backbone.out_stage")
    need(m.visual.pool >= 1, "model.visual.pool", "must be >= 1")
    need(m.visual.pool_mode in POOL_MODES, "model.visual.pool_mode", f"must be one of {', '.join(POOL_MODES)}")
    d = m.dictionary
    need(d.size >= 2, "model.dictionary.size", "must be >= 2")
    need(0.0 <= d.decay_start <= d.decay_max < 1.0, "model.dictionary.decay_start",
         "must satisfy 0 <= decay_start <= decay_max < 1")
    need(d.decay_ramp_steps >= 1, "model.dictionary.decay_ramp_steps", "must be >= 1")
    need(d.laplace_eps > 0, "model.dictionary.laplace_eps", "must be > 0")
    f = m.fusion
    need(f.hidden_size > 0 and f.hidden_size % f.num_heads == 0, "model.fusion.hidden_size",
         "must be positive and divisible by model.fusion.num_heads")
    need(f.num_layers >= 1, "model.fusion.num_layers", "must be >= 1")
    need(0.0 <= f.dropout < 1.0, "model.fusion.dropout", "must be in [0, 1)")
    need(f.max_text_len >= 4, "model.fusion.max_text_len", "must be >= 4")
    need(f.init_range > 0, "model.fusion.init_range", "must be > 0")
    need(m.itc_dim >= 0, "model.itc_dim", "must be >= 0 (0 = no contrastive head)")
    need(m.itc_pool in ("mean", "max"), "model.itc_pool", "must be 'mean' or 'max'")
    need(bool(f.tokenizer), "model.fusion.tokenizer", "must name a tokenizer directory, a hub name or 'synthetic'")
    dc = c.data
    need(0 < dc.image_min <= dc.image_max, "data.image_min", "must be positive and <= data.image_max")
    need(dc.size_divisor >= 1, "data.size_divisor", "must be >= 1")
    need(dc.images_per_batch >= 1, "data.images_per_batch", "must be >= 1")
    need(dc.sentence_group >= 1, "data.sentence_group", "must be >= 1")
    need(dc.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(dc.unreadable_timeout_s > 0, "data.unreadable_timeout_s", "must be > 0")
    p = c.pretrain
    for key in ("mlm_prob", "mvm_image_prob", "itm_neg_prob"):
        need(0.0 <= getattr(p, key) <= 1.0, f"pretrain.{key}", "must be in [0, 1]")
    unknown = set(p.loss_weights) - LOSSES
    if unknown:
        raise ConfigError(f"config key 'pretrain.loss_weights' has unknown losses {sorted(unknown)}; "
                          f"valid: {', '.join(sorted(LOSSES))}")
    for key, w in p.loss_weights.items():
        need(w >= 0, f"pretrain.loss_weights.{key}", "must be >= 0")
    need(p.itc_temperature > 0, "pretrain.itc_temperature", "must be > 0")
    ft = c.finetune
    need(ft.max_steps >= 1, "finetune.max_steps", "must be >= 1")
    need(0.0 <= ft.warmup_fraction < 1.0, "finetune.warmup_fraction", "must be in [0, 1)")
    for name in ("task_steps", "task_images_per_batch"):
        per_task = getattr(ft, name)
        bad = sorted(set(per_task) - {"vqa", "nlvr2", "retrieval", "ve"})
        if bad:
            raise ConfigError(f"config key 'finetune.{name}' has unknown tasks {bad}; valid: nlvr2, retrieval, ve, vqa")
        for key, n in per_task.items():
            if n < 1:
                raise ConfigError(f"config key 'finetune.{name}.{key}' must be >= 1, got {n!r}")
    need(ft.head_lr_mult > 0, "finetune.head_lr_mult", "must be > 0")
    need(ft.answer_vocab_size >= 2, "finetune.answer_vocab_size", "must be >= 2")
    need(ft.itc_temperature > 0, "finetune.itc_temperature", "must be > 0")
    need(ft.shortlist_k >= 1, "finetune.shortlist_k", "must be >= 1")
    need(ft.eval_max_images >= 0, "finetune.eval_max_images", "must be >= 0")
    o = c.optim
    need(o.lr > 0, "optim.lr", "must be > 0")
    need(o.backbone_lr >= 0, "optim.backbone_lr", "must be >= 0")
    need(o.backbone_weight_decay >= 0, "optim.backbone_weight_decay", "must be >= 0")
    need(o.backbone_optimizer in ("sgd", "adamw"), "optim.backbone_optimizer", "must be 'sgd' or 'adamw'")
    need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(o.decay_steps == sorted(o.decay_steps), "optim.decay_steps", "must be increasing")
    need(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0")
    t = c.train
    need(t.max_steps >= 1, "train.max_steps", "must be >= 1")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    need(t.ckpt_every >= 1, "train.ckpt_every", "must be >= 1")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(t.precision in ("auto", "bf16", "fp16", "fp32"), "train.precision", "must be 'auto', 'bf16', 'fp16' or 'fp32'")
    need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(t.feature_cache_mb >= 0, "train.feature_cache_mb", "must be >= 0 (0 turns the cache off)")
    need(t.device in ("auto", "cpu", "cuda"), "train.device", "must be 'auto', 'cpu' or 'cuda'")


def _get(c: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        c = getattr(c, part)
    return c
