"""Pre-training heads. Each takes only the rows it scores, never the whole (T, L+N, d) output."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Transform(nn.Sequential):
    """dense + GELU + LayerNorm, BERT's prediction-head transform. (M, d) -> (M, d)."""

    def __init__(self, dim: int, eps: float = 1e-12):
        super().__init__(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=eps))


class MLMHead(nn.Module):
    """Masked language modeling: (M, d) hidden states at masked text positions -> (M, vocab) logits.

    The decoder's weight IS the word-embedding matrix (``decoder.weight is word_weight``); only
    the bias is the head's own. Running it on the M masked rows instead of every position
    avoids the release's projection of all T x (L+N) outputs onto the vocabulary.
    """

    def __init__(self, word_weight: nn.Parameter):
        super().__init__()
        vocab, dim = word_weight.shape
        self.transform = _Transform(dim)
        self.decoder = nn.Linear(dim, vocab, bias=True)
        self.decoder.weight = word_weight
        nn.init.zeros_(self.decoder.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class MVMHead(nn.Module):
    """Masked visual modeling: (M, d) fused outputs at masked visual positions, (K, d) dictionary
    -> (M, K) logits = scale * cosine(transform(h), e_k).

    The scale (an inverse temperature) is learned in log space, starting at 1/0.07 as in CLIP:
    cosines live in [-1, 1], far too flat for a K-way softmax without it.
    """

    def __init__(self, dim: int, init_scale: float = 1 / 0.07, max_scale: float = 100.0):
        super().__init__()
        self.transform = _Transform(dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.max_log_scale = math.log(max_scale)

    def forward(self, hidden: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        h = F.normalize(self.transform(hidden), dim=-1)
        e = F.normalize(codebook.detach().to(h.dtype), dim=-1)
        return self.log_scale.clamp(max=self.max_log_scale).exp() * (h @ e.t())


class ITMHead(nn.Module):
    """Image-text matching: (T, d) [CLS] outputs -> (T, 2) logits (index 1 = matched)."""

    def __init__(self, dim: int):
        super().__init__()
        self.pooler = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.classifier = nn.Linear(dim, 2)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(cls))
