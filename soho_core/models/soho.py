"""SOHO: a CNN, a visual dictionary and a single-stream BERT, trained with MLM, MVM and ITM.

    model = SohoModel(cfg.model, vocab_size=len(tokenizer))
    out = model.pretrain_forward(**batch.model_inputs(), mvm_prob=0.5, loss_weights={...})
    out.loss.backward()

Shapes: B images, T texts (T = B x sentence group), L text length, N = h*w visual tokens,
d the fusion width (the visual width follows it), K dictionary entries, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from soho_core.config import ModelConfig
from soho_core.data.transforms import normalize_padded
from soho_core.models.backbone import Backbone, FeatureCache
from soho_core.models.fusion import FusionEncoder
from soho_core.models.heads import ITCHead, ITMHead, MLMHead, MVMHead
from soho_core.models.visual_dictionary import DictionaryGate, VisualDictionary
from soho_core.models.visual_embedding import VisualEmbedding

IGNORE = -100


@dataclass
class VisualOutput:
    """The visual path's result, once per image.

    tokens: (B, N, d) position-encoded and LayerNorm-ed visual tokens (MVM-masked ones replaced).
    mask: (B, N) bool, True = valid (not padding).
    grid: (h, w) with N = h * w, tokens in row-major order.
    indices: (B, N) long dictionary index per token, -1 at padding; None without a dictionary.
    mvm_labels: (B, N) long, the masked index at MVM-masked tokens, -100 elsewhere.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    grid: tuple[int, int]
    indices: torch.Tensor | None
    mvm_labels: torch.Tensor


@dataclass
class PretrainOutput:
    """Losses (0-dim tensors with graph) and detached metrics (0-dim tensors) of one step.

    loss: weighted sum of the three (four with an ITC head). acc_*: accuracy over the scored rows, 0 when there are
    none. num_mvm: how many visual positions the MVM loss scored (masked AND in a matched pair).
    """

    loss: torch.Tensor
    loss_mlm: torch.Tensor
    loss_mvm: torch.Tensor
    loss_itm: torch.Tensor
    acc_itm: torch.Tensor
    acc_mlm: torch.Tensor
    acc_mvm: torch.Tensor
    num_mvm: int
    loss_itc: torch.Tensor | None = None  # None without an ITC head
    acc_itc: torch.Tensor | None = None


def cls_rows(num_texts: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(num_texts, length) bool, True at position 0 of each text: the ``rows`` argument of
    ``FusionEncoder.forward`` that runs its last layer at [CLS] only."""
    rows = torch.zeros(num_texts, length, dtype=torch.bool, device=device)
    rows[:, 0] = True
    return rows


def _scored_ce(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy and accuracy over (M, C) logits; M may be 0.

    With no rows the loss is 0 * logits.sum(): still a graph through the head's parameters
    (their gradients are zeros), so DDP sees every parameter used in every step.
    """
    if targets.numel() == 0:
        return logits.float().sum() * 0.0, logits.new_zeros((), dtype=torch.float32)
    loss = F.cross_entropy(logits.float(), targets)
    acc = (logits.detach().argmax(-1) == targets).float().mean()
    return loss, acc


class SohoModel(nn.Module):
    """Backbone -> visual embedding -> visual dictionary (+gate, MVM mask) -> position ->
    fusion BERT over [text ; visual] -> MLM / MVM / ITM heads."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.fusion = FusionEncoder(cfg.fusion, vocab_size)
        dim = self.fusion.hidden_size
        self.backbone = Backbone(cfg.backbone)
        self.visual = VisualEmbedding(self.backbone.out_channels, dim, cfg.visual.pool, self.backbone.stride,
                                      cfg.visual.pool_mode)
        self.dictionary: VisualDictionary | None = None
        self.gate: DictionaryGate | None = None
        self.mvm_mask_embedding: nn.Parameter | None = None
        self.mvm_head: MVMHead | None = None
        if cfg.dictionary.enabled:
            self.dictionary = VisualDictionary(cfg.dictionary, dim)
            if cfg.dictionary.gate:
                self.gate = DictionaryGate(dim)
            self.mvm_mask_embedding = nn.Parameter(torch.randn(dim) * 0.02)
            self.mvm_head = MVMHead(dim)
        self.mlm_head = MLMHead(self.fusion.word_embedding_weight)
        self.itm_head = ITMHead(dim)
        self.itc_head: ITCHead | None = ITCHead(dim, cfg.itc_dim) if cfg.itc_dim > 0 else None
        self.feature_cache: FeatureCache | None = None  # see cache_features

    def cache_features(self, max_bytes: int) -> FeatureCache:
        """From now on keep each image's CNN features and reuse them when the image comes again
        (up to ``max_bytes``). The CNN must be frozen first (``backbone.freeze()``), and its weights
        not loaded again afterwards: the cached features would be those of the old weights."""
        if not self.backbone.all_frozen:
            raise ValueError("caching CNN features needs a frozen CNN (backbone.freeze()): a CNN that "
                             "trains, or whose batch norms update, gives an image other features each time")
        self.feature_cache = FeatureCache(max_bytes)
        return self.feature_cache

    @property
    def dim(self) -> int:
        return self.fusion.hidden_size

    # ------------------------------------------------------------------ visual path

    def encode_images(self, images: torch.Tensor, image_sizes: torch.Tensor,
                      mvm_prob: float = 0.0) -> VisualOutput:
        """Run the visual path once per image.

        images (B, 3, H, W) normalised and zero-padded, or uint8 padded (as the loaders give
        them: normalised here, on the model's device); image_sizes (B, 2) long valid
        (height, width) in pixels. mvm_prob: chance each image gets one visual word masked
        (training mode with a dictionary only; evaluation never masks).
        """
        if self.feature_cache is not None and images.dtype == torch.uint8:
            feats = self.feature_cache(
                images, image_sizes, lambda rows: self.backbone(normalize_padded(images[rows], image_sizes[rows])))
        else:
            if images.dtype == torch.uint8:
                images = normalize_padded(images, image_sizes)
            feats = self.backbone(images)
        v, mask, grid = self.visual.project(feats, image_sizes)
        labels = torch.full(mask.shape, IGNORE, dtype=torch.long, device=v.device)
        indices = None
        x = v
        if self.dictionary is not None:
            q, indices = self.dictionary(v, mask)
            x = self.gate(q, v) if self.gate is not None else q
            masked = torch.zeros_like(mask)
            if self.training and mvm_prob > 0:
                masked = self._mvm_positions(indices, mask, mvm_prob)
                labels = torch.where(masked, indices, labels)
            # Always through torch.where so the mask embedding is in every graph (DDP); a
            # fine-tuning trunk that keeps the dictionary has no mask embedding.
            if self.mvm_mask_embedding is not None:
                x = torch.where(masked[..., None], self.mvm_mask_embedding.to(x.dtype), x)
        tokens = self.visual.add_position(x, mask, grid)
        return VisualOutput(tokens=tokens, mask=mask, grid=grid, indices=indices, mvm_labels=labels)

    def _mvm_positions(self, indices: torch.Tensor, mask: torch.Tensor, prob: float) -> torch.Tensor:
        """(B, N) bool: for each image picked with probability ``prob``, every valid position
        assigned to ONE dictionary index drawn uniformly among the indices present in it.

        Works on a (B, K) presence table (never N x K) and without host syncs.
        """
        b, k = indices.shape[0], self.dictionary.size
        slot = torch.where(mask, indices, torch.full_like(indices, k))  # padding -> spare column k
        present = torch.zeros(b, k + 1, dtype=torch.bool, device=indices.device)
        present.scatter_(1, slot, True)
        present = present[:, :k]
        # Uniform among present entries: the argmax of i.i.d. uniforms restricted to them.
        score = torch.rand(b, k, device=indices.device).masked_fill(~present, -1.0)
        chosen = score.argmax(1)
        picked = torch.rand(b, device=indices.device) < prob
        return mask & (indices == chosen[:, None]) & picked[:, None]

    # ------------------------------------------------------------------ fusion

    def fuse(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: VisualOutput,
             image_index: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (T, L); image_index (T,) long row of ``visual`` per text.

        Each image's tokens are gathered for its texts; the CNN is not run again.
        Returns hidden states (T, L + N, d); with ``rows`` (T, L + N) bool, only those
        positions' (R, d), the last layer run there alone (see ``FusionEncoder.forward``).
        """
        tokens = visual.tokens.index_select(0, image_index)
        vmask = visual.mask.index_select(0, image_index)
        return self.fusion(input_ids, attention_mask, tokens, vmask, rows=rows)

    def fuse_cls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: VisualOutput,
                 image_index: torch.Tensor) -> torch.Tensor:
        """(T, d) fused [CLS] outputs, what the task heads read: ``fuse(...)[:, 0]`` without the
        last layer's work at every other position."""
        rows = cls_rows(input_ids.shape[0], input_ids.shape[1] + visual.mask.shape[1], input_ids.device)
        return self.fuse(input_ids, attention_mask, visual, image_index, rows=rows)

    def pool(self, visual: VisualOutput) -> torch.Tensor:
        """(B, d) each image's valid visual tokens pooled for ITC: their mean, or their channel-wise
        max (``model.itc_pool``)."""
        if self.cfg.itc_pool == "max":
            return visual.tokens.masked_fill(~visual.mask.unsqueeze(-1), float("-inf")).amax(1)
        valid = visual.mask.unsqueeze(-1).to(visual.tokens.dtype)
        return (visual.tokens * valid).sum(1) / valid.sum(1).clamp(min=1)

    def text_cls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(T, d) [CLS] of a text-only pass: the fusion encoder given zero visual tokens, so the
        text stream goes through the same code (embeddings, key mask) and weights as when fused."""
        none = self.fusion.word_embedding_weight.new_zeros(input_ids.shape[0], 0, self.dim)
        empty = torch.zeros(input_ids.shape[0], 0, dtype=torch.bool, device=input_ids.device)
        return self.fusion(input_ids, attention_mask, none, empty,
                           rows=cls_rows(*input_ids.shape, device=input_ids.device))

    # ------------------------------------------------------------------ pre-training

    def pretrain_forward(self, images: torch.Tensor, image_sizes: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, mlm_labels: torch.Tensor, image_index: torch.Tensor,
                         itm_labels: torch.Tensor, mvm_prob: float = 0.0,
                         loss_weights: dict[str, float] | None = None,
                         itc_temperature: float = 0.07) -> PretrainOutput:
        """One pre-training step's losses.

        images (B, 3, H, W), image_sizes (B, 2) long; input_ids, attention_mask, mlm_labels
        (T, L) with mlm_labels = -100 where not an MLM target; image_index (T,) long;
        itm_labels (T,) long, 1 = matched pair, 0 = mismatched. loss_weights: keys mlm, mvm,
        itm, itc (missing ones weigh 1; itc counts only with an ITC head).
        """
        weights = {"mlm": 1.0, "mvm": 1.0, "itm": 1.0, "itc": 1.0, **(loss_weights or {})}
        visual = self.encode_images(images, image_sizes, mvm_prob)
        text_len = input_ids.shape[1]

        # A masked visual word can be the very object a caption names, which makes "does
        # this caption match?" unanswerable: ITM is scored only on texts whose image was
        # shown whole. (The release masks 1.5% of images, so it rarely meets this.)
        image_whole = (visual.mvm_labels == IGNORE).all(1).index_select(0, image_index)
        mlm_rows = mlm_labels != IGNORE
        mvm_rows = None
        if self.dictionary is not None:
            # A mismatched caption says nothing about the masked region, so only matched
            # pairs are asked to recover it.
            vis_labels = visual.mvm_labels.index_select(0, image_index)
            mvm_rows = (vis_labels != IGNORE) & (itm_labels[:, None] == 1)

        # The heads read three kinds of rows: every [CLS] (ITM), the masked words (MLM) and the
        # masked visual words of matched pairs (MVM). The fusion encoder's last layer runs only
        # there, and each head gets its rows of the (R, d) result: never (T, L + N, d) through
        # a head, nor the last layer's feed-forward at positions no loss reads.
        rows = cls_rows(input_ids.shape[0], text_len + visual.mask.shape[1], input_ids.device)
        rows[:, :text_len] |= mlm_rows
        if mvm_rows is not None:
            rows[:, text_len:] |= mvm_rows
        hidden = self.fuse(input_ids, attention_mask, visual, image_index, rows=rows)  # (R, d)
        where = rows.flatten().cumsum(0).view(rows.shape) - 1  # row of ``hidden`` for each position

        cls = hidden.index_select(0, where[:, 0][image_whole])
        loss_itm, acc_itm = _scored_ce(self.itm_head(cls), itm_labels[image_whole])
        words = hidden.index_select(0, where[:, :text_len][mlm_rows])
        loss_mlm, acc_mlm = _scored_ce(self.mlm_head(words), mlm_labels[mlm_rows])

        if mvm_rows is not None:
            masked = hidden.index_select(0, where[:, text_len:][mvm_rows])
            logits = self.mvm_head(masked, self.dictionary.embedding)
            loss_mvm, acc_mvm = _scored_ce(logits, vis_labels[mvm_rows])
            num_mvm = int(mvm_rows.sum())
        else:
            loss_mvm, acc_mvm, num_mvm = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros(()), 0

        loss = weights["mlm"] * loss_mlm + weights["mvm"] * loss_mvm + weights["itm"] * loss_itm
        loss_itc = acc_itc = None
        if self.itc_head is not None:
            # Matched captions against every image of the batch (a mismatched one's own image is
            # not in the batch record). The text pass sees the same MLM-masked words.
            pos = (itm_labels == 1).nonzero().squeeze(1)
            if pos.numel():
                texts = self.itc_head.embed_text(self.text_cls(input_ids[pos], attention_mask[pos]))
                images_e = self.itc_head.embed_image(self.pool(visual))
                match = image_index[pos][None, :] == torch.arange(images.shape[0], device=images.device)[:, None]
                loss_itc, acc_itc, _ = self.itc_head.loss(images_e, texts, match, itc_temperature)
            else:  # no matched caption in the batch: a zero loss that still reaches every ITC weight (DDP)
                loss_itc = sum(p.sum() for p in self.itc_head.parameters()) * 0.0
                acc_itc = loss_itc.detach()
            loss = loss + weights["itc"] * loss_itc
        return PretrainOutput(loss=loss, loss_mlm=loss_mlm, loss_mvm=loss_mvm, loss_itm=loss_itm,
                              acc_itm=acc_itm, acc_mlm=acc_mlm, acc_mvm=acc_mvm.float(), num_mvm=num_mvm,
                              loss_itc=loss_itc, acc_itc=acc_itc)

    def forward(self, *args, **kwargs) -> PretrainOutput:
        """Same as :meth:`pretrain_forward`, so DDP's wrapper can call the model directly."""
        return self.pretrain_forward(*args, **kwargs)

    # ------------------------------------------------------------------ training helpers

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable CNN parameters (the release trains them with SGD at a larger rate)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def other_parameters(self) -> list[nn.Parameter]:
        """Every other trainable parameter (AdamW), each once (the tied MLM weight included)."""
        cnn = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in cnn]

    def dictionary_stats(self) -> dict[str, float]:
        """Visual-dictionary usage since the last call (empty without a dictionary)."""
        return self.dictionary.usage_stats() if self.dictionary is not None else {}
