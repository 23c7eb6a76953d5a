"""Image-text retrieval at the tiny preset on CPU: the ITC + ITM step, hard negatives, one CNN
pass per image in evaluation, two-stage against exact ranking, and a fine-tune end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from soho_core.config import load_config
from soho_core.data.loader import SkipCounter
from soho_core.data.tokenizer import build_tokenizer
from soho_core.tasks import retrieval
from soho_core.tasks.catalog import get_task
from soho_core.tasks.retrieval import RetrievalCollator, hard_negatives, rank_images
from soho_core.train.engine import evaluate, load_task_model, train

RECALLS = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from soho_core.data.shards import shard_synthetic
    from soho_core.data.synthetic import synthesize

    src, out = tmp_path_factory.mktemp("retrieval-synthetic"), tmp_path_factory.mktemp("retrieval-shards")
    synthesize(str(src), num_images=60, seed=0, image_size=64, min_objects=1, max_objects=2)
    shard_synthetic(str(src), str(out), tasks=["retrieval"], max_count=20)
    return str(out)


@pytest.fixture(scope="module")
def finetuned(shards, tmp_path_factory):
    """A 10-step fine-tune from scratch; returns its run folder."""
    out = str(tmp_path_factory.mktemp("retrieval-run"))
    cfg = load_config("tiny", ["finetune.max_steps=10", "train.log_every=5", "train.ckpt_every=10"])
    result = train(get_task("retrieval"), cfg, shards, out)
    assert {"loss_itc", "loss_itm", "acc_itm"} <= set(result.last_metrics)
    return out


def _model(cfg):
    cfg.model.dictionary.enabled = False  # as fine-tuning builds it (finetune.keep_dictionary=False)
    torch.manual_seed(0)
    return get_task("retrieval").build_model(cfg, len(build_tokenizer("synthetic")), {})


def test_step_trains_every_part(shards):
    cfg = load_config("tiny")
    model = _model(cfg).train()
    batch = next(iter(get_task("retrieval").loader(shards, "train", cfg, build_tokenizer("synthetic"), 0, True)))
    assert batch.targets.shape == (batch.num_texts, batch.images.shape[0])
    out = model(**batch.model_inputs())
    for name in ("loss_itc", "loss_itm", "acc_itm"):
        assert math.isfinite(float(out.stats[name][0])), name
    out.loss.backward()
    # DDP needs a gradient on every trainable parameter, every step.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    # the tiny preset pre-trains an ITC head, which retrieval fine-tunes rather than adding one
    assert model.new_itc is None and model.itc is model.trunk.itc_head and not model.head_parameters()
    for part in (model.trunk.backbone, model.trunk.itm_head, model.itc.image_proj, model.itc.text_proj):
        assert sum(float(p.grad.abs().sum()) for p in part.parameters() if p.requires_grad) > 0


def test_a_trunk_without_itc_gets_a_new_head():
    model = _model(load_config("tiny", ["model.itc_dim=0"]))
    assert model.trunk.itc_head is None and model.itc is model.new_itc
    assert model.head_parameters() == list(model.new_itc.parameters())


def _sample(image_id: str, captions: list[str]) -> dict:
    return {"key": image_id, "record": {"image_id": image_id, "captions": captions},
            "images": [torch.full((3, 64, 64), len(captions) * 40, dtype=torch.uint8)]}


def test_hard_negatives_skip_true_matches_even_across_images(monkeypatch):
    cfg = load_config("tiny")
    shared = "a red circle"
    samples = [_sample("a", [shared, "a blue square"]), _sample("b", ["a green cross", shared]),
               _sample("c", ["a yellow star", "a red square"])]
    batch = RetrievalCollator(build_tokenizer("synthetic"), cfg, 0, False)(samples, SkipCounter())
    captions = [e["caption"] for e in batch.entries]
    owned = [set(s["record"]["captions"]) for s in samples]
    assert batch.targets.tolist() == [[c in own for own in owned] for c in captions]
    # Rig the similarity so the identical caption of the other image is by far the hardest.
    match = batch.targets.t()
    logits = torch.zeros(match.shape)
    logits[:, [t for t, c in enumerate(captions) if c == shared]] = 50.0
    logits[0, captions.index("a green cross")] = logits[2, captions.index("a red square")] = 10.0
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        neg_text, has_text, neg_image, has_image = hard_negatives(logits, match, batch.image_index, g)
        assert has_text.all() and has_image.all()
        assert not match[batch.image_index, neg_text].any()
        assert not match[neg_image, torch.arange(len(captions))].any()

    # And inside the training step: every ITM negative it builds is a real mismatch.
    seen = []

    def spy(*args, **kwargs):
        seen.append(hard_negatives(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(retrieval, "hard_negatives", spy)
    _model(cfg).train()(**batch.model_inputs())
    neg_text, _, neg_image, _ = seen[0]
    for t, (nt, ni) in enumerate(zip(neg_text.tolist(), neg_image.tolist())):
        assert captions[nt] not in owned[int(batch.image_index[t])]
        assert captions[t] not in owned[ni]


def test_hard_negatives_are_drawn_in_proportion_to_the_similarity():
    # One image, four texts: text 0 is its caption; the others have logits 2, 1, 0.
    logits = torch.tensor([[9.0, 2.0, 1.0, 0.0]])
    match = torch.tensor([[True, False, False, False]])
    image_index = torch.zeros(4000, dtype=torch.long)
    big_logits, big_match = logits.repeat(1, 1000), match.repeat(1, 1000)
    neg_text, has_text, _, _ = hard_negatives(big_logits, big_match, image_index, torch.Generator().manual_seed(0))
    assert has_text.all()
    counts = torch.bincount(neg_text % 4, minlength=4).float() / len(neg_text)
    assert counts[0] == 0
    expected = torch.tensor([2.0, 1.0, 0.0]).softmax(0)  # 0.665, 0.245, 0.090
    assert torch.allclose(counts[1:], expected, atol=0.03), counts
    # A text whose only candidate image is its own has no negative.
    _, _, _, has_image = hard_negatives(logits, match, torch.zeros(4, dtype=torch.long))
    assert has_image.tolist() == [False, True, True, True]


def test_evaluation_runs_the_cnn_once_per_image(finetuned, shards):
    model, cfg, tok = load_task_model(get_task("retrieval"), finetuned)
    seen = []
    model.trunk.backbone.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    for limit, images, blind in ((0, 6, False), (4, 4, False), (4, 4, True)):
        seen.clear()
        cfg.finetune.eval_max_images, cfg.finetune.eval_blind = limit, blind
        result = get_task("retrieval").evaluate(model, shards, "val", cfg, tok, torch.device("cpu"))
        # the blind pass adds one constant image per distinct image size (one size here)
        assert sum(seen) == images + blind and images == result.metrics["num_images"]
        assert result.num_examples == 5 * images
        assert result.metrics["pairs_scored_exact"] == images * 5 * images


def test_two_stage_equals_exact_when_the_shortlist_holds_everything(finetuned, shards):
    model, cfg, tok = load_task_model(get_task("retrieval"), finetuned)
    task = get_task("retrieval")

    def run(k: int) -> dict:
        cfg.finetune.shortlist_k = k
        return task.evaluate(model, shards, "val", cfg, tok, torch.device("cpu")).metrics

    full = run(30)  # >= the 30 texts (and the 6 images): every query keeps every candidate
    assert {k: full[f"two_stage_{k}"] for k in RECALLS} == {k: full[k] for k in RECALLS}
    per_text = run(6)  # >= the images: image retrieval (per text) is exact
    assert all(per_text[f"two_stage_{k}"] == per_text[k] for k in ("img_r1", "img_r5", "img_r10"))
    small = run(2)
    assert small["pairs_scored_two_stage"] <= 2 * (6 + 30) < small["pairs_scored_exact"] == 180
    cfg.finetune.retrieval_exact = False  # the exact mode skipped: the two-stage recalls under the plain names
    alone = run(2)
    assert {k: alone[k] for k in RECALLS} == {k: small[f"two_stage_{k}"] for k in RECALLS}
    assert alone["pairs_scored_exact"] == 0 and [k for k in alone if k.startswith("two_stage_")] == ["two_stage_seconds"]


def test_rank_images_matches_exact_itm_order_with_a_wide_shortlist(finetuned, shards):
    model, cfg, tok = load_task_model(get_task("retrieval"), finetuned)
    batch = next(iter(get_task("retrieval").loader(shards, "val", cfg, tok, 0, False)))
    # The loader's batches are uint8 (the model normalises them): each image, cut to its own size.
    images = [im[:, :h, :w] for im, (h, w) in zip(batch.images, batch.image_sizes.tolist())]
    text = batch.entries[0]["caption"]
    cfg.finetune.shortlist_k = len(images)
    ranked = rank_images(model, images, text, tok, cfg, top_k=3)
    with torch.no_grad():
        feats = model.encode_images(batch.images, batch.image_sizes)
        enc = tok([text] * len(images), return_tensors="pt")
        probs = model.match_logits(enc["input_ids"], enc["attention_mask"], feats.tokens, feats.mask).softmax(1)[:, 1]
    assert [i for i, _ in ranked] == probs.argsort(descending=True)[:3].tolist()
    assert [s for _, s in ranked] == pytest.approx(probs.sort(descending=True).values[:3].tolist(), abs=1e-5)
    cfg.finetune.shortlist_k = 1  # only the ITC-nearest image gets an ITM score
    ranked = rank_images(model, images, text, tok, cfg, top_k=len(images))
    assert 0 <= ranked[0][1] <= 1 and all(s < -1 for _, s in ranked[1:])


def test_finetune_then_evaluate_writes_every_metric(finetuned, shards):
    report = evaluate(get_task("retrieval"), finetuned, shards, finetuned + "/metrics.json", split="val")
    written = json.load(open(finetuned + "/metrics.json"))
    assert written["num_examples"] == report["num_examples"] == 30
    keys = RECALLS + [f"two_stage_{k}" for k in RECALLS] + [
        "exact_seconds", "two_stage_seconds", "pairs_scored_exact", "pairs_scored_two_stage"]
    assert set(keys) <= set(written["metrics"])
    assert all(0 <= written["metrics"][k] <= 1 for k in RECALLS)
    assert len(written["samples"]) == 3 and all(len(s["top_images"]) == 3 for s in written["samples"])


def test_match_logits_run_the_last_layer_at_cls_alone_with_the_same_result():
    model = _model(load_config("tiny")).eval()
    ids = torch.randint(5, 50, (6, 9))
    attn = torch.ones_like(ids)
    attn[:, 7:] = 0
    tokens, mask = torch.randn(6, 16, model.trunk.dim), torch.ones(6, 16, dtype=torch.bool)
    full = model.trunk.itm_head(model.trunk.fusion(ids, attn, tokens, mask)[:, 0]).float()
    torch.testing.assert_close(model.match_logits(ids, attn, tokens, mask), full, rtol=1e-4, atol=1e-5)
