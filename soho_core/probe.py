"""The image path's ceiling: the preset's CNN trained directly on each object's attributes.

    soho probe --data SYNTH_DIR [--config demo] [--steps 300] [--out probe.json] [--save-backbone cnn.pt]

What can this CNN learn about the scenes in this budget at all? The probe answers it without
the fusion, the text or the visual dictionary: the preset's backbone (same depth, stride, image
size, optimizer and batch size as in training) reads each object of a synthetic scene at the
feature cells its box covers (channel-wise max), and one linear head per attribute (shape,
colour, size) is trained with cross-entropy on it. Every ``eval_every`` steps it scores the
held-out split, beside each attribute's chance (the training split's most frequent value).

A fine-tuned model that stays far below these numbers on the same world is limited by how the
answer's gradient reaches the CNN, not by the CNN (issue 14: the demo CNN reads shape at 0.97
after 300 steps here, while VQA fine-tuning left shape at its text prior). Needs the synthetic
world's ``scenes.jsonl`` (object boxes): ``soho data synth --out DIR``.

``--save-backbone`` keeps the trained CNN for ``model.backbone.weights``: a supervised warm start
of the CNN, which is what ImageNet weights are to the release (train it on a world other than the
one the model is evaluated on).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from soho_core import storage
from soho_core.config import SohoConfig
from soho_core.data.transforms import decode_image, normalize_padded, pad_batch
from soho_core.models.backbone import Backbone, save_backbone_weights
from soho_core.train.distributed import init_distributed
from soho_core.train.optim import cnn_optimizer

ATTRIBUTES = ("shape", "color", "size")


def load_objects(data_uri: str, short_max: int, long_max: int, splits: tuple[str, ...] = ("train", "val", "test"),
                 limit: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The images of ``splits`` that hold objects, decoded at the model's size (``data.image_min`` /
    ``image_max``), each with its objects' attributes and boxes scaled to that size:
    {split: [{"image": uint8 (3, h, w), "objects": [{shape, color, size, box}]}]}; at most ``limit``
    images a split (0: all). scenes.jsonl is read once."""
    scenes_uri = storage.join(data_uri, "scenes.jsonl")
    if not storage.exists(scenes_uri):
        raise FileNotFoundError(f"{scenes_uri} does not exist: the probe needs a synthetic world with object boxes "
                                f"(soho data synth --out DIR), not shards")
    out: dict[str, list[dict[str, Any]]] = {split: [] for split in splits}
    with storage.open_uri(scenes_uri, "r") as f:
        for line in f:
            scene = json.loads(line)
            items = out.get(scene["split"])
            if items is None or not scene["objects"] or (limit and len(items) >= limit):
                continue
            image = decode_image(storage.read_bytes(storage.join(data_uri, "images", f"{scene['image_id']}.png")),
                                 short_max, long_max)
            scale_y, scale_x = image.shape[1] / scene["height"], image.shape[2] / scene["width"]
            objects = [{**{a: o[a] for a in ATTRIBUTES},
                        "box": (o["bbox"][0] * scale_x, o["bbox"][1] * scale_y, o["bbox"][2] * scale_x,
                                o["bbox"][3] * scale_y)} for o in scene["objects"]]
            items.append({"image": image, "objects": objects})
    return out


def object_features(feats: torch.Tensor, items: list[dict[str, Any]], stride: int) -> torch.Tensor:
    """(O, C): for every object of every image, the channel-wise max of ``feats`` (B, C, H', W')
    over the cells its box touches."""
    rows = []
    for i, item in enumerate(items):
        for o in item["objects"]:
            x0, y0, x1, y1 = o["box"]
            r0, c0 = int(y0 // stride), int(x0 // stride)
            r1 = min(feats.shape[2] - 1, max(r0, int((y1 - 1) // stride)))
            c1 = min(feats.shape[3] - 1, max(c0, int((x1 - 1) // stride)))
            rows.append(feats[i, :, r0:r1 + 1, c0:c1 + 1].amax((1, 2)))
    return torch.stack(rows)


def probe(data_uri: str, cfg: SohoConfig, steps: int = 300, eval_every: int = 50,
          max_eval_images: int = 200, save_backbone: str | None = None) -> dict[str, Any]:
    """Train the backbone of ``cfg`` on per-object attributes; returns the learning curve:
    {"curve": [{"step", "seconds", <attribute>: held-out accuracy}], "chance": {...}, ...}."""
    torch.manual_seed(cfg.train.seed)
    rng = random.Random(cfg.train.seed)
    world = load_objects(data_uri, cfg.data.image_min, cfg.data.image_max, ("train", "test"))
    test = world["test"] or load_objects(data_uri, cfg.data.image_min, cfg.data.image_max, ("val",))["val"]
    train, test = world["train"], test[:max_eval_images]
    if not train or not test:
        raise ValueError(f"{data_uri}: the probe needs images with objects in the train split and in test (or val)")
    classes = {a: sorted({o[a] for item in train + test for o in item["objects"]}) for a in ATTRIBUTES}
    majority = {a: Counter(o[a] for item in train for o in item["objects"]).most_common(1)[0][0] for a in ATTRIBUTES}
    test_objects = [o for item in test for o in item["objects"]]
    chance = {a: sum(o[a] == majority[a] for o in test_objects) / len(test_objects) for a in ATTRIBUTES}

    device = init_distributed(cfg.train.device).device  # "auto", "cpu" or "cuda", as training resolves it
    backbone = Backbone(cfg.model.backbone).to(device)
    heads = nn.ModuleDict({a: nn.Linear(backbone.out_channels, len(classes[a])) for a in ATTRIBUTES}).to(device)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(heads.parameters())
    opt = cnn_optimizer(params, cfg.optim)  # the heads learn at the CNN's rate: nothing else trains

    def run(items: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        images, sizes = pad_batch([it["image"] for it in items], cfg.data.size_divisor)
        feats = backbone(normalize_padded(images.to(device), sizes.to(device)))
        pooled = object_features(feats, items, backbone.stride)
        labels = {a: torch.tensor([classes[a].index(ob[a]) for it in items for ob in it["objects"]], device=device)
                  for a in ATTRIBUTES}
        return {a: heads[a](pooled) for a in ATTRIBUTES}, labels

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        backbone.eval()
        hits: Counter[str] = Counter()
        for k in range(0, len(test), 32):
            logits, labels = run(test[k:k + 32])
            for a in ATTRIBUTES:
                hits[a] += int((logits[a].argmax(1) == labels[a]).sum())
        backbone.train()
        return {a: round(hits[a] / len(test_objects), 4) for a in ATTRIBUTES}

    curve = []
    batch = min(cfg.data.images_per_batch, len(train))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        logits, labels = run(rng.sample(train, batch))
        loss = sum(F.cross_entropy(logits[a], labels[a]) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            seconds = time.perf_counter() - start
            curve.append({"step": step, "seconds": round(seconds, 1), **evaluate()})
    if save_backbone:
        save_backbone_weights(backbone, cfg.model.backbone, save_backbone)
    return {"data": data_uri, "preset": cfg.preset, "steps": steps, "images_per_batch": batch,
            "train_images": len(train), "test_objects": len(test_objects), "chance": chance, "curve": curve}


def format_curve(result: dict[str, Any]) -> str:
    """The learning curve as a plain table, chance in the first row."""
    lines = ["step  seconds  " + "  ".join(f"{a:>6}" for a in ATTRIBUTES),
             "chance         " + "  ".join(f"{result['chance'][a]:6.3f}" for a in ATTRIBUTES)]
    for row in result["curve"]:
        lines.append(f"{row['step']:>4}  {row['seconds']:7.1f}  " + "  ".join(f"{row[a]:6.3f}" for a in ATTRIBUTES))
    return "\n".join(lines)
