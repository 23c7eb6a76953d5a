"""Masked language modeling labels: 15% of word pieces, 80% [MASK] / 10% random / 10% kept."""

from __future__ import annotations

import torch

IGNORE = -100


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, rows: torch.Tensor, prob: float,
                mask_id: int, first_word_id: int, vocab_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose MLM targets.

    input_ids (T, L) long; special (T, L) bool marks [CLS]/[SEP]/[PAD] (never masked);
    rows (T,) bool marks the texts that get MLM at all (matched image-text pairs).
    Every eligible row gets at least one target, so short captions still teach.
    Returns (masked input ids (T, L), labels (T, L) with IGNORE where not a target).
    """
    eligible = ~special & rows[:, None]
    chosen = (torch.rand(input_ids.shape, generator=generator) < prob) & eligible
    needs_one = eligible.any(1) & ~chosen.any(1)
    if needs_one.any():
        pick = (torch.rand(input_ids.shape, generator=generator) * eligible).argmax(1)
        chosen[needs_one, pick[needs_one]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, generator=generator)
    ids = input_ids.clone()
    ids[chosen & (roll < 0.8)] = mask_id
    random_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[random_pos] = torch.randint(first_word_id, vocab_size, (int(random_pos.sum()),), generator=generator)
    return ids, labels
