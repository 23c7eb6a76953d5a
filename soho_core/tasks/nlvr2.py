"""NLVR2: is a statement true of a pair of images? Each (image, statement) pair is fused
separately, the two [CLS] outputs are concatenated (left first) and a 2-way MLP reads them;
cross-entropy; evaluated with ``accuracy``, against the per-type majority label of the
training split and the model with both images constant (:mod:`soho_core.tasks.baselines`).

    soho finetune --task nlvr2 --init PRETRAIN_RUN --data SHARDS --out RUN
    soho evaluate --task nlvr2 --checkpoint RUN --data SHARDS --out metrics.json

A shard sample is one image pair (``left.png``, ``right.png``) with all its statements. A
batch holds ``images_per_batch // 2`` pairs, so the CNN sees as many images as in the other
tasks, and runs once per image: statements point at their two images by row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from soho_core.config import SohoConfig
from soho_core.data.loader import SkipCounter, WorkerRandom, stream
from soho_core.data.pretrain_data import sample_distinct
from soho_core.data.tokenizer import encode_texts
from soho_core.data.transforms import pad_batch
from soho_core.tasks.base import (EvalResult, StepOutput, Task, TaskModel, TensorBatch, classification_output,
                                  evaluate_classifier)
from soho_core.tasks.baselines import train_prior
from soho_core.tasks.single_image import classifier_head, task_trunk

IMAGE_KEYS = ("left.png", "right.png")


def label_of(entry: dict[str, Any]) -> int:
    """1 = the statement holds of the pair, 0 = it does not."""
    label = entry["label"]
    if not isinstance(label, bool):
        raise ValueError(f"NLVR2 label {label!r} is not a boolean")
    return int(label)


def statement_of(entry: dict[str, Any]) -> str:
    text = entry["statement"]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"NLVR2 statement {text!r} is not a non-empty string")
    return text


@dataclass
class PairBatch(TensorBatch):
    images: torch.Tensor  # (2P, 3, H, W) uint8, padded (the model normalises): pair p's left at 2p, right at 2p + 1
    image_sizes: torch.Tensor  # (2P, 2) long valid (height, width)
    input_ids: torch.Tensor  # (S, L) long
    attention_mask: torch.Tensor  # (S, L) long
    left_index: torch.Tensor  # (S,) long: row of each statement's left image in ``images``
    right_index: torch.Tensor  # (S,) long: row of its right image
    targets: torch.Tensor  # (S,) long, 1 = true
    ids: list[str] = field(default_factory=list)  # (S,) statement ids
    entries: list[dict[str, Any]] = field(default_factory=list)  # (S,) the raw statements
    pair_ids: list[str] = field(default_factory=list)  # (P,)
    image_ids: list[str] = field(default_factory=list)  # (2P,) in the order of ``images``
    skipped: int = 0

    _TENSORS = ("images", "image_sizes", "input_ids", "attention_mask", "left_index", "right_index", "targets")


class PairCollator:
    """Training takes up to ``sentence_group`` distinct statements per pair, evaluation all of them."""

    def __init__(self, tokenizer, cfg: SohoConfig, seed: int, train: bool):
        self.tok, self.cfg, self.train, self.random = tokenizer, cfg, train, WorkerRandom(seed)

    def __call__(self, samples: list[dict[str, Any]], counter: SkipCounter) -> PairBatch:
        images, image_sizes = pad_batch([im for s in samples for im in s["images"]], self.cfg.data.size_divisor)
        entries, left, image_ids = [], [], []
        for p, s in enumerate(samples):
            items = s["record"]["statements"]
            if self.train:
                items = sample_distinct(items, self.cfg.data.sentence_group, self.random.rng)
            entries += items
            left += [2 * p] * len(items)
            image_ids += [s["record"].get("left_image_id", ""), s["record"].get("right_image_id", "")]
        ids, attention_mask = encode_texts(self.tok, [statement_of(e) for e in entries],
                                           self.cfg.model.fusion.max_text_len)
        left_index = torch.tensor(left, dtype=torch.long)
        return PairBatch(images, image_sizes, ids, attention_mask, left_index, left_index + 1,
                         torch.tensor([label_of(e) for e in entries], dtype=torch.long),
                         ids=[str(e.get("id", "")) for e in entries], entries=entries,
                         pair_ids=[str(s["record"].get("id", s["key"])) for s in samples], image_ids=image_ids,
                         skipped=counter.take())


def check_sample(sample: dict[str, Any]) -> None:
    """Raise on a malformed pair so the loader skips and counts it instead of failing mid-batch."""
    statements = sample["record"].get("statements")
    if not statements:
        raise ValueError("no statements")
    for e in statements:
        statement_of(e), label_of(e)


class NLVR2Model(TaskModel):
    """Trunk + a 2-way MLP on [CLS(left image, statement); CLS(right image, statement)]."""

    def __init__(self, cfg: SohoConfig, vocab_size: int):
        super().__init__()
        self.trunk = task_trunk(cfg, vocab_size)
        self.head = classifier_head(2 * self.trunk.dim, 2)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def logits(self, images, image_sizes, input_ids, attention_mask, left_index, right_index) -> torch.Tensor:
        """(S, 2): index 1 = the statement is true. The order of the concatenation is kept, so
        "the left image ..." can differ from "the right image ...".
        """
        visual = self.trunk.encode_images(images, image_sizes)
        left = self.trunk.fuse_cls(input_ids, attention_mask, visual, left_index)
        right = self.trunk.fuse_cls(input_ids, attention_mask, visual, right_index)
        return self.head(torch.cat([left, right], dim=1)).float()

    def forward(self, images, image_sizes, input_ids, attention_mask, left_index, right_index,
                targets) -> StepOutput:
        """targets (S,) long, 1 = true."""
        logits = self.logits(images, image_sizes, input_ids, attention_mask, left_index, right_index)
        return classification_output(logits, targets, "loss_nlvr2")


class NLVR2Task(Task):
    name = "nlvr2"

    def build_model(self, cfg, vocab_size, meta) -> NLVR2Model:
        return NLVR2Model(cfg, vocab_size)

    def loader(self, data_uri, split, cfg, tokenizer, seed, train):
        return stream(data_uri, self.name, split, cfg, seed, train, PairCollator(tokenizer, cfg, seed, train),
                      image_keys=IMAGE_KEYS, check=check_sample,
                      batch_size=max(1, cfg.data.images_per_batch // 2))

    def evaluate(self, model, data_uri, split, cfg, tokenizer, device) -> EvalResult:
        def describe(batch, row, pred, prob):
            entry = batch.entries[row]
            return {"left_image_id": batch.image_ids[int(batch.left_index[row])],
                    "right_image_id": batch.image_ids[int(batch.right_index[row])],
                    "statement": entry["statement"], "prediction": bool(pred), "probability": prob,
                    "label": entry["label"]}

        batches = self.loader(data_uri, split, cfg, tokenizer, cfg.train.seed, train=False)
        return evaluate_classifier(model, batches, device, describe, task=self.name,
                                   prior=train_prior(data_uri, self.name, "statements", label_of),
                                   blind=cfg.finetune.eval_blind)
