"""The single-stream fusion encoder: one BERT over [text tokens ; visual tokens]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from soho_core.config import FusionConfig

# Token type ids: 0 = text (BERT's sentence A), 1 = visual token (BERT's sentence B row,
# which a pre-trained checkpoint already has, so no new embedding row is needed).
TEXT_TYPE, VISUAL_TYPE = 0, 1


def build_bert(cfg: FusionConfig, vocab_size: int) -> BertModel:
    """A BertModel without pooler: from ``cfg.bert`` (first ``num_layers`` layers) or random."""
    if cfg.bert:
        # The checkpoint's width, heads and vocabulary win; layers past num_layers are dropped
        # (transformers lists them as UNEXPECTED in its load report).
        bert = BertModel.from_pretrained(
            cfg.bert,
            add_pooling_layer=False,
            attn_implementation="sdpa",
            num_hidden_layers=cfg.num_layers,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
        )
        # Train in fp32 whatever the checkpoint is stored in (autocast handles lower precision).
        bert = bert.float()
        c = bert.config
        if c.num_hidden_layers != cfg.num_layers or len(bert.encoder.layer) != cfg.num_layers:
            raise ValueError(f"model.fusion.num_layers={cfg.num_layers} but {cfg.bert!r} gave "
                             f"{len(bert.encoder.layer)} layers")
        if vocab_size > c.vocab_size:
            raise ValueError(f"the tokenizer has {vocab_size} ids but the checkpoint {cfg.bert!r} embeds only "
                             f"{c.vocab_size}: model.fusion.tokenizer must match model.fusion.bert")
        if c.max_position_embeddings < cfg.max_text_len:
            raise ValueError(f"model.fusion.max_text_len={cfg.max_text_len} exceeds the "
                             f"{c.max_position_embeddings} positions of {cfg.bert!r}")
        if c.type_vocab_size < 2:
            raise ValueError(f"{cfg.bert!r} has {c.type_vocab_size} token types; visual tokens need type 1")
        return bert
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_text_len,
        type_vocab_size=2,
        initializer_range=cfg.init_range,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )
    config._attn_implementation = "sdpa"
    return BertModel(config, add_pooling_layer=False)


class FusionEncoder(nn.Module):
    """BERT embeddings for text, then BERT layers over the joint sequence.

    ``hidden_size`` is the width of the whole model: the visual path projects to it.
    """

    def __init__(self, cfg: FusionConfig, vocab_size: int):
        super().__init__()
        self.bert = build_bert(cfg, vocab_size)
        self.bert.config._attn_implementation = "sdpa"
        self.hidden_size: int = self.bert.config.hidden_size
        self.num_layers: int = len(self.bert.encoder.layer)
        self.vocab_size: int = self.bert.config.vocab_size

    @property
    def word_embedding_weight(self) -> nn.Parameter:
        """(vocab, d): the weight the MLM decoder is tied to."""
        return self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                visual_tokens: torch.Tensor, visual_mask: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Encode [text ; visual] as one sequence.

        input_ids (T, L) long, attention_mask (T, L) (1 / True = real token), visual_tokens
        (T, N, d) already position-encoded and normalised, visual_mask (T, N) bool (True = valid).
        Returns hidden states (T, L + N, d): text positions first, then visual positions; zero at
        padding positions.

        rows (T, L + N) bool, optional: the positions whose output the caller reads (the [CLS]
        of each text, the masked words, ...). The last layer then runs only there, and the
        result is (R, d), equal to the full output indexed by ``rows`` (row-major order). Every
        layer but the last needs all positions (they are the last layer's keys and values), but
        the last layer's query, output projection and feed-forward at the other positions would
        be thrown away: in pre-training that is ~80% of the last layer's work.
        """
        emb = self.bert.embeddings
        text = emb(input_ids=input_ids)  # word + position + token type 0, LayerNorm, dropout
        # Visual tokens already carry their own 2-D position and LayerNorm; the type-1 embedding
        # tells the text stream apart from them (BERT's positions are text-only).
        visual = emb.dropout(visual_tokens.to(text.dtype) + emb.token_type_embeddings.weight[VISUAL_TYPE])
        x = torch.cat([text, visual], 1)
        joint = torch.cat([attention_mask.bool(), visual_mask.bool()], 1)
        # An additive (T, 1, 1, L + N) key mask: padding of either part is never attended to.
        # Built here rather than through transformers' mask helpers, whose API moves between
        # releases; an additive mask means the same to the SDPA and the eager attention.
        bias = (~joint)[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
        # Every linear map of a layer (query, key, value, output, feed-forward) runs on the real
        # tokens alone, packed as (tokens, d); only attention sees the padded (T, L + N) layout.
        # Texts padded to the batch's longest leave a fifth of a VQA batch padding, more on
        # official data (questions of 4 to 20 words; images of several shapes).
        packing = Packing(joint)
        xp = packing.pack(x)
        *first, last = self.bert.encoder.layer
        for layer in first if rows is not None else [*first, last]:
            xp = _packed_layer(layer, xp, bias, packing)
        if rows is None:
            return packing.unpack(xp)  # padding positions are zero
        return _layer_at_rows(last, xp, bias, rows, packing)


class Packing:
    """The real tokens of a (T, S) layout: ``pack`` (T, S, ...) -> (tokens, ...) in row-major order,
    ``unpack`` back, with zeros at padding. With no padding both are reshapes."""

    def __init__(self, real: torch.Tensor):
        self.real, (self.t, self.s) = real, real.shape
        self.index = None if bool(real.all()) else real.reshape(-1).nonzero().squeeze(1)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(self.t * self.s, *x.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, xp: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return xp.reshape(self.t, self.s, *xp.shape[1:])
        out = xp.new_zeros(self.t * self.s, *xp.shape[1:]).index_copy(0, self.index, xp)
        return out.view(self.t, self.s, *xp.shape[1:])


def _projection(att: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    """Several of a BertSelfAttention's linear maps in one matrix product: (..., len(names) * d)."""
    maps = [getattr(att, n) for n in names]
    return F.linear(x, torch.cat([m.weight for m in maps]), torch.cat([m.bias for m in maps]))


def _attend(att: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            bias: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of (T, Q, d) queries over (T, S, d) keys and values -> (T, Q, d)."""
    t, d = query.shape[0], query.shape[-1]
    heads, head_dim = att.num_attention_heads, att.attention_head_size

    def split(z: torch.Tensor) -> torch.Tensor:  # (T, len, d) -> (T, heads, len, head_dim)
        return z.view(t, z.shape[1], heads, head_dim).transpose(1, 2)

    context = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=bias,
                                             dropout_p=att.dropout.p if att.training else 0.0,
                                             scale=head_dim ** -0.5)
    return context.transpose(1, 2).reshape(t, query.shape[1], d)


def _packed_layer(layer: nn.Module, xp: torch.Tensor, bias: torch.Tensor, packing: Packing) -> torch.Tensor:
    """A BertLayer on packed tokens (tokens, d) with its own weights: what it computes at the real
    positions of the padded layout (BERT's maps act on each token alone; the key mask hides padding)."""
    att = layer.attention.self
    qkv = packing.unpack(_projection(att, ("query", "key", "value"), xp))
    query, key, value = qkv.chunk(3, dim=-1)
    context = packing.pack(_attend(att, query, key, value, bias))
    hidden = layer.attention.output(context, xp)  # output projection, dropout, residual, LayerNorm
    return layer.output(layer.intermediate(hidden), hidden)  # feed-forward, dropout, residual, LayerNorm


def _layer_at_rows(layer: nn.Module, xp: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor,
                   packing: Packing) -> torch.Tensor:
    """A BertLayer's output at the ``rows`` positions only, with the layer's own weights.

    xp (tokens, d) the layer's packed input, bias (T, 1, 1, S) additive key mask, rows (T, S) bool.
    Keys and values come from every real position; queries from the R selected ones, laid out as
    (T, Q, d) with Q the most any text has (shorter texts padded; padding outputs dropped).
    Returns (R, d) in row-major order of ``rows``.
    """
    att = layer.attention.self
    t, d = packing.t, xp.shape[-1]
    rows = rows.bool()
    counts = rows.sum(1)
    q_len = int(counts.max()) if t else 0
    # slot (T, Q): True where the padded query layout holds a real row. Filling it row-major
    # follows the order of x[rows], since each text's selected positions are in ascending order.
    slot = torch.arange(q_len, device=xp.device)[None, :] < counts[:, None]
    xq = packing.unpack(xp)[rows]  # (R, d)
    q = att.query(xq)  # under autocast, of the autocast type
    query = q.new_zeros(t, q_len, d).masked_scatter(slot[..., None], q)
    key, value = packing.unpack(_projection(att, ("key", "value"), xp)).chunk(2, dim=-1)
    context = _attend(att, query, key, value, bias)[slot]  # (R, d)
    hidden = layer.attention.output(context, xq)  # output projection, dropout, residual, LayerNorm
    out = layer.output(layer.intermediate(hidden), hidden)  # feed-forward, dropout, residual, LayerNorm
    # A padding position's output is zero, as in the full output (none of the heads reads one).
    return out if packing.index is None else out * packing.real[rows].unsqueeze(1).to(out.dtype)
