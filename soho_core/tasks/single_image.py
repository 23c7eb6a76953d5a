"""What VQA and visual entailment share: one image, several texts about it, a classifier on [CLS].

Shard samples hold one image with all its texts (questions or hypotheses). A training batch
takes ``sentence_group`` of them per image, an evaluation batch all of them; either way the
CNN runs once per image and the texts are paired with it by ``image_index``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from soho_core.config import SohoConfig
from soho_core.data.loader import SkipCounter, WorkerRandom, stream
from soho_core.data.pretrain_data import sample_distinct
from soho_core.data.tokenizer import encode_texts
from soho_core.data.transforms import pad_batch
from soho_core.models import SohoModel
from soho_core.tasks.base import TaskModel, TensorBatch


@dataclass
class GroupedBatch(TensorBatch):
    images: torch.Tensor  # (B, 3, H, W) uint8, padded (the model normalises)
    image_sizes: torch.Tensor  # (B, 2) long valid (height, width)
    input_ids: torch.Tensor  # (T, L) long
    attention_mask: torch.Tensor  # (T, L) long
    image_index: torch.Tensor  # (T,) long: the image of each text
    targets: torch.Tensor  # (T,) long class, or (T, A) float soft scores (VQA)
    ids: list[str] = field(default_factory=list)  # (T,) example ids
    entries: list[dict[str, Any]] = field(default_factory=list)  # (T,) the raw records, for metrics
    image_ids: list[str] = field(default_factory=list)  # (B,)
    skipped: int = 0

    _TENSORS = ("images", "image_sizes", "input_ids", "attention_mask", "image_index", "targets")


class GroupedCollator:
    """``items_key``: the record's list of texts; ``text_of`` / ``target_of`` read one entry;
    ``stack`` turns the list of targets into the batch's target tensor."""

    def __init__(self, tokenizer, cfg: SohoConfig, seed: int, train: bool, items_key: str,
                 text_of: Callable[[dict], str], target_of: Callable[[dict], Any],
                 stack: Callable[[list[Any]], torch.Tensor]):
        self.tok, self.cfg, self.train, self.random = tokenizer, cfg, train, WorkerRandom(seed)
        self.items_key, self.text_of, self.target_of, self.stack = items_key, text_of, target_of, stack

    def __call__(self, samples: list[dict[str, Any]], counter: SkipCounter) -> GroupedBatch:
        images, image_sizes = pad_batch([s["images"][0] for s in samples], self.cfg.data.size_divisor)
        entries, image_index = [], []
        for i, s in enumerate(samples):
            items = s["record"][self.items_key]
            if self.train:
                items = sample_distinct(items, self.cfg.data.sentence_group, self.random.rng)
            entries += items
            image_index += [i] * len(items)
        ids, attention_mask = encode_texts(self.tok, [self.text_of(e) for e in entries],
                                           self.cfg.model.fusion.max_text_len)
        return GroupedBatch(images, image_sizes, ids, attention_mask,
                            torch.tensor(image_index, dtype=torch.long),
                            self.stack([self.target_of(e) for e in entries]),
                            ids=[str(e.get("id", e.get("question_id", ""))) for e in entries], entries=entries,
                            image_ids=[s["record"].get("image_id", s["key"]) for s in samples],
                            skipped=counter.take())


def grouped_loader(task: str, data_uri: str, split: str, cfg: SohoConfig, seed: int, train: bool,
                   collator: GroupedCollator):
    def check(sample: dict[str, Any]) -> None:
        items = sample["record"].get(collator.items_key)
        if not items:
            raise ValueError(f"no {collator.items_key}")
        for e in items:
            collator.text_of(e), collator.target_of(e)  # a malformed entry fails here, not mid-batch

    return stream(data_uri, task, split, cfg, seed, train, collator, check=check)


def classifier_head(dim: int, num_outputs: int) -> nn.Sequential:
    """The release's task MLP on [CLS]: d -> 2d, GELU, LayerNorm, -> outputs."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.LayerNorm(2 * dim), nn.Linear(2 * dim, num_outputs))


def task_trunk(cfg: SohoConfig, vocab_size: int, keep_itm: bool = False, keep_itc: bool = False) -> SohoModel:
    """The shared trunk without the pre-training heads a task does not use (DDP requires every
    parameter to get a gradient)."""
    trunk = SohoModel(cfg.model, vocab_size)
    trunk.mlm_head = None
    trunk.mvm_head = None
    trunk.mvm_mask_embedding = None
    if not keep_itm:
        trunk.itm_head = None
    if not keep_itc:
        trunk.itc_head = None
    return trunk


class SingleImageClassifier(TaskModel):
    """Trunk + an MLP on the [CLS] output of each (image, text) pair."""

    def __init__(self, cfg: SohoConfig, vocab_size: int, num_outputs: int):
        super().__init__()
        self.trunk = task_trunk(cfg, vocab_size)
        self.head = classifier_head(self.trunk.dim, num_outputs)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def logits(self, images, image_sizes, input_ids, attention_mask, image_index) -> torch.Tensor:
        """(T, num_outputs) from the fused [CLS] of each text with its image."""
        visual = self.trunk.encode_images(images, image_sizes)
        return self.head(self.trunk.fuse_cls(input_ids, attention_mask, visual, image_index)).float()
