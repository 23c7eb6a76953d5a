"""Pre-training batches streamed from shards: images grouped with several of their captions.

Each shard sample is one image with all its captions. A batch holds B images and,
for each, ``sentence_group`` texts (T = B x group), so the CNN runs once per image.
About ``itm_neg_prob`` of the texts are swapped for a caption of another image in
the batch (ITM negatives); MLM targets are drawn on the matched texts only.
A sample that cannot be read or decoded is skipped and counted in ``skipped``.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch
import webdataset as wds

from soho_core import storage
from soho_core.config import SohoConfig
from soho_core.data.masking import mask_tokens
from soho_core.data.shards import load_index, shard_urls
from soho_core.data.transforms import decode_image, pad_batch

log = logging.getLogger(__name__)


@dataclass
class PretrainBatch:
    images: torch.Tensor  # (B, 3, H, W) float, normalised, zero-padded to a multiple of size_divisor
    image_sizes: torch.Tensor  # (B, 2) long: valid (height, width) in pixels
    input_ids: torch.Tensor  # (T, L) long, MLM-masked word pieces, T = B * sentence_group
    attention_mask: torch.Tensor  # (T, L) long, 1 = real token
    mlm_labels: torch.Tensor  # (T, L) long, original id at MLM targets, -100 elsewhere
    image_index: torch.Tensor  # (T,) long: the image (row of ``images``) each text is paired with
    itm_labels: torch.Tensor  # (T,) long: 1 = caption of that image, 0 = another image's caption
    skipped: int = 0  # unreadable samples dropped by this worker since its previous batch

    def to(self, device: torch.device) -> "PretrainBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return PretrainBatch(**moved)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "skipped"}


class _SkipCounter:
    """Per-worker count of dropped samples; read and reset by each batch."""

    def __init__(self) -> None:
        self.n = 0

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


class PretrainCollator:
    def __init__(self, tokenizer, cfg: SohoConfig, seed: int, train: bool, counter: _SkipCounter):
        self.tok, self.cfg, self.seed, self.train, self.counter = tokenizer, cfg, seed, train, counter
        self.rng: random.Random | None = None
        self.gen: torch.Generator | None = None

    def _seed_once(self) -> None:
        # Seeded lazily so each dataloader worker of each rank draws its own stream.
        if self.rng is None:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            s = self.seed * 1_000_003 + rank * 1000 + worker
            self.rng = random.Random(s)
            self.gen = torch.Generator().manual_seed(s)

    def __call__(self, samples: list[dict[str, Any]]) -> PretrainBatch:
        self._seed_once()
        rng, group = self.rng, self.cfg.data.sentence_group
        images, image_sizes = pad_batch([s["image"] for s in samples], self.cfg.data.size_divisor)
        texts, image_index, itm = [], [], []
        for i, s in enumerate(samples):
            caps = s["captions"]
            chosen = rng.sample(caps, group) if len(caps) >= group else [rng.choice(caps) for _ in range(group)]
            for text in chosen:
                label = 1
                if len(samples) > 1 and rng.random() < self.cfg.pretrain.itm_neg_prob:
                    other = samples[rng.choice([j for j in range(len(samples)) if j != i])]["captions"]
                    candidate = rng.choice(other)
                    if candidate not in caps:  # another scene may share an identical caption
                        text, label = candidate, 0
                texts.append(text)
                image_index.append(i)
                itm.append(label)
        enc = self.tok(texts, padding="longest", truncation=True,
                       max_length=self.cfg.model.fusion.max_text_len, return_tensors="pt")
        ids = enc["input_ids"]
        special = torch.isin(ids, torch.tensor(self.tok.all_special_ids))
        itm_labels = torch.tensor(itm, dtype=torch.long)
        ids, mlm_labels = mask_tokens(
            ids, special, itm_labels == 1, self.cfg.pretrain.mlm_prob, self.tok.mask_token_id,
            first_word_id=max(self.tok.all_special_ids) + 1, vocab_size=len(self.tok), generator=self.gen)
        return PretrainBatch(images, image_sizes, ids, enc["attention_mask"], mlm_labels,
                             torch.tensor(image_index, dtype=torch.long), itm_labels,
                             skipped=self.counter.take())


def _decode_samples(cfg: SohoConfig, counter: _SkipCounter):
    def stage(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            try:
                record = json.loads(sample["json"])
                captions = [c for c in record["captions"] if isinstance(c, str) and c.strip()]
                if not captions:
                    raise ValueError("no captions")
                image = decode_image(sample["png"], cfg.data.image_min, cfg.data.image_max)
            except Exception as err:  # a corrupt sample must not stop a long job
                counter.n += 1
                log.warning("skipping sample %s: %s", sample.get("__key__"), err)
                continue
            yield {"key": sample["__key__"], "image": image, "captions": captions}
    return stage


def pretrain_loader(data_uri: str, split: str, cfg: SohoConfig, tokenizer, seed: int,
                    train: bool = True) -> wds.WebLoader:
    """An iterable of :class:`PretrainBatch`. Training resamples shards forever (each rank and
    worker with its own seed); evaluation reads every shard once, split by node and worker."""
    task_uri, index = load_index(data_uri, "pretrain")
    urls = shard_urls(task_uri, index, split)
    storage.register_webdataset_openers()
    counter = _SkipCounter()

    def count_and_continue(err: Exception) -> bool:
        counter.n += 1
        log.warning("skipping unreadable shard data: %s", err)
        return True

    if train:
        source = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        source = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    stages = source + [wds.tarfile_to_samples(handler=count_and_continue)]
    if train:
        stages.append(wds.shuffle(cfg.data.shuffle_buffer, initial=cfg.data.shuffle_buffer // 2,
                                  rng=random.Random(seed)))
    stages += [
        _decode_samples(cfg, counter),
        wds.batched(cfg.data.images_per_batch, partial=not train,
                    collation_fn=PretrainCollator(tokenizer, cfg, seed, train, counter)),
    ]
    pipeline = wds.DataPipeline(*stages)
    workers = cfg.data.num_workers if train else min(cfg.data.num_workers, len(urls))
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers,
                         persistent_workers=workers > 0)
