"""Pre-training batches: images grouped with several of their captions.

Each shard sample is one image with all its captions. A batch holds B images and,
for each, ``sentence_group`` texts (T = B x group), so the CNN runs once per image.
About ``itm_neg_prob`` of the texts are swapped for a caption of another image in
the batch (ITM negatives). All texts are MLM-masked alike (so a [MASK] says nothing about
the pairing) and only the matched ones are scored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from soho_core.config import SohoConfig
from soho_core.data.loader import SkipCounter, WorkerRandom, stream
from soho_core.data.masking import IGNORE, mask_tokens
from soho_core.data.tokenizer import encode_texts
from soho_core.data.transforms import pad_batch


@dataclass
class PretrainBatch:
    images: torch.Tensor  # (B, 3, H, W) uint8, zero-padded to a multiple of size_divisor (the model normalises)
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

    @property
    def num_texts(self) -> int:
        return self.input_ids.shape[0]


def sample_group(items: list[Any], group: int, rng) -> list[Any]:
    """``group`` items without replacement, or with replacement when there are fewer (pre-training
    pairs a fixed number of captions with each image)."""
    return rng.sample(items, group) if len(items) >= group else [rng.choice(items) for _ in range(group)]


def sample_distinct(items: list[Any], group: int, rng) -> list[Any]:
    """At most ``group`` distinct items. Task batches take a variable number of texts per image: an
    image with 2 statements and a group of 4 gives 2 texts, not the same 2 twice (which made up to
    half of an NLVR2 or VE batch duplicates)."""
    return rng.sample(items, min(group, len(items)))


class PretrainCollator:
    def __init__(self, tokenizer, cfg: SohoConfig, seed: int):
        self.tok, self.cfg, self.random = tokenizer, cfg, WorkerRandom(seed)

    def __call__(self, samples: list[dict[str, Any]], counter: SkipCounter) -> PretrainBatch:
        rng, group = self.random.rng, self.cfg.data.sentence_group
        images, image_sizes = pad_batch([s["images"][0] for s in samples], self.cfg.data.size_divisor)
        texts, image_index, itm = [], [], []
        for i, s in enumerate(samples):
            caps = s["record"]["captions"]
            for text in sample_group(caps, group, rng):
                label = 1
                if len(samples) > 1 and rng.random() < self.cfg.pretrain.itm_neg_prob:
                    other = samples[rng.choice([j for j in range(len(samples)) if j != i])]
                    candidate = rng.choice(other["record"]["captions"])
                    if candidate not in caps:  # another scene may share an identical caption
                        text, label = candidate, 0
                texts.append(text)
                image_index.append(i)
                itm.append(label)
        ids, attention_mask = encode_texts(self.tok, texts, self.cfg.model.fusion.max_text_len)
        special = torch.isin(ids, torch.tensor(self.tok.all_special_ids))
        itm_labels = torch.tensor(itm, dtype=torch.long)
        # Every text is masked alike, and only matched ones are scored: were mismatched captions
        # left unmasked, "has a [MASK]" would give the ITM answer away without the image.
        ids, mlm_labels = mask_tokens(
            ids, special, torch.ones_like(itm_labels, dtype=torch.bool), self.cfg.pretrain.mlm_prob,
            self.tok.mask_token_id, first_word_id=max(self.tok.all_special_ids) + 1, vocab_size=len(self.tok),
            generator=self.random.gen)
        mlm_labels[itm_labels == 0] = IGNORE
        return PretrainBatch(images, image_sizes, ids, attention_mask, mlm_labels,
                             torch.tensor(image_index, dtype=torch.long), itm_labels, skipped=counter.take())


def _check_captions(sample: dict[str, Any]) -> None:
    caps = [c for c in sample["record"].get("captions", []) if isinstance(c, str) and c.strip()]
    if not caps:
        raise ValueError("no captions")
    sample["record"]["captions"] = caps


def pretrain_loader(data_uri: str, split: str, cfg: SohoConfig, tokenizer, seed: int, train: bool = True):
    """An iterable of :class:`PretrainBatch` from the ``pretrain`` shards under ``data_uri``."""
    return stream(data_uri, "pretrain", split, cfg, seed, train, PretrainCollator(tokenizer, cfg, seed),
                  check=_check_captions)
