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


class ITCHead(nn.Module):
    """Image-text contrastive alignment (ALBEF's "align before fuse"; not in SOHO's paper):
    pooled visual tokens and the [CLS] of a text-only pass, each projected to ``embed_dim`` and
    L2-normalised; their dot products are the similarities.

    Optional in pre-training (``model.itc_dim``), always present in retrieval fine-tuning, where it
    is the cheap first stage.
    """

    def __init__(self, dim: int, embed_dim: int):
        super().__init__()
        self.image_proj = nn.Linear(dim, embed_dim)
        self.text_proj = nn.Linear(dim, embed_dim)

    def embed_image(self, pooled: torch.Tensor) -> torch.Tensor:
        """(I, d) mean of an image's valid visual tokens -> (I, E) unit vectors."""
        return F.normalize(self.image_proj(pooled).float(), dim=-1)

    def embed_text(self, cls: torch.Tensor) -> torch.Tensor:
        """(T, d) [CLS] of a text-only pass -> (T, E) unit vectors."""
        return F.normalize(self.text_proj(cls).float(), dim=-1)

    @staticmethod
    def loss(images: torch.Tensor, texts: torch.Tensor, match: torch.Tensor, temperature: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """InfoNCE both ways. images (I, E), texts (T, E) unit; match (I, T) bool, True where text t
        describes image i (an image has several captions). Returns (loss, text->image accuracy,
        the (I, T) logits)."""
        logits = images @ texts.t() / temperature
        loss = (multi_positive_nce(logits, match) + multi_positive_nce(logits.t(), match.t())) / 2
        acc = match.t().gather(1, logits.detach().t().argmax(1, keepdim=True)).float().mean()
        return loss, acc, logits


def multi_positive_nce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """InfoNCE of (Q, C) logits whose rows may have several positives (an image's captions): the
    cross-entropy against the uniform distribution over each row's positives."""
    target = positive.float() / positive.sum(1, keepdim=True).clamp(min=1)
    return -(logits.float().log_softmax(1) * target).sum(1).mean()
