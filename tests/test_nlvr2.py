"""NLVR2 at the tiny preset on CPU: batches of image pairs, the head forward and backward, one
CNN pass per image, an order-aware pair encoding, malformed statements skipped and counted,
and a tiny fine-tune then evaluation through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds

from soho_core.config import load_config
from soho_core.data.shards import ShardSink, load_index, shard_urls, write_index
from soho_core.data.synthetic import NLVR2_PER_PAIR
from soho_core.data.tokenizer import build_tokenizer
from soho_core.data.transforms import decode_image, pad_batch
from soho_core.tasks.catalog import get_task
from soho_core.tasks.nlvr2 import NLVR2Model, PairBatch
from soho_core.train.engine import evaluate, train
from soho_core.train.tracking import read_metrics


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(synthetic dir, shard root) with NLVR2 shards only: 60 images at 64 px."""
    from soho_core.data.shards import shard_synthetic
    from soho_core.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("nlvr2")
    synth, shards = root / "synth", root / "shards"
    synthesize(str(synth), num_images=60, seed=0, image_size=64, min_objects=1, max_objects=2)
    shard_synthetic(str(synth), str(shards), tasks=["nlvr2"], max_count=20)
    return synth, shards


def _cfg(*overrides: str):
    return load_config("tiny", ["train.device=cpu", *overrides])


def _first_batch(shards, train: bool, cfg=None) -> PairBatch:
    cfg = cfg or _cfg()
    tok = build_tokenizer(cfg.model.fusion.tokenizer)
    return next(iter(get_task("nlvr2").loader(str(shards), "train", cfg, tok, seed=0, train=train)))


def _model(cfg=None) -> NLVR2Model:
    cfg = cfg or _cfg()
    torch.manual_seed(0)
    return get_task("nlvr2").build_model(cfg, len(build_tokenizer(cfg.model.fusion.tokenizer)), {})


def test_batch_pairs_each_statement_with_its_own_left_and_right_images(world):
    synth, shards = world
    cfg = _cfg()
    batch = _first_batch(shards, train=False, cfg=cfg)
    pairs, statements = len(batch.pair_ids), batch.num_texts
    assert batch.images.shape[0] == len(batch.image_ids) == 2 * pairs == cfg.data.images_per_batch
    assert torch.equal(batch.right_index, batch.left_index + 1)
    assert batch.targets.dtype == torch.long and batch.targets.shape == (statements,)
    for s, entry in enumerate(batch.entries):
        left, right = batch.image_ids[batch.left_index[s]], batch.image_ids[batch.right_index[s]]
        assert batch.pair_ids[int(batch.left_index[s]) // 2] == f"{left}+{right}"
        assert batch.ids[s].startswith(f"{left}-s")  # synthetic statement ids name the left image
        assert int(batch.targets[s]) == int(entry["label"])
    # Row 0 is the first pair's left.png, row 1 its right.png, pixel for pixel.
    for row in (0, 1):
        png = (synth / "images" / f"{batch.image_ids[row]}.png").read_bytes()
        expect, _ = pad_batch([decode_image(png, cfg.data.image_min, cfg.data.image_max)], cfg.data.size_divisor)
        assert torch.equal(batch.images[row], expect[0])
    # Training takes up to sentence_group distinct statements per pair: with more asked for than a
    # synthetic pair has, each of them once (drawn with replacement, half of them were duplicates).
    train = _first_batch(shards, train=True, cfg=_cfg(f"data.sentence_group={NLVR2_PER_PAIR + 2}"))
    assert train.num_texts == NLVR2_PER_PAIR * len(train.pair_ids)
    assert len(set(train.ids)) == train.num_texts
    train = _first_batch(shards, train=True, cfg=_cfg("data.sentence_group=2"))
    assert train.num_texts == 2 * len(train.pair_ids) and len(set(train.ids)) == train.num_texts


def test_head_forward_and_backward_reach_backbone_and_head(world):
    _, shards = world
    model = _model().train()
    out = model(**_first_batch(shards, train=True).model_inputs())
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert {"loss_nlvr2", "accuracy"} <= set(out.stats)
    out.loss.backward()
    for name, params in (("backbone", model.trunk.backbone.parameters()), ("head", model.head_parameters())):
        grads = [p.grad for p in params if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert {id(p) for p in model.head_parameters()} == {id(p) for p in model.head.parameters()}


def test_cnn_runs_once_per_image_for_all_statements(world):
    _, shards = world
    model = _model().eval()
    batch = _first_batch(shards, train=True)
    seen: list[int] = []
    model.trunk.backbone.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    with torch.no_grad():
        logits = model.logits(**{k: v for k, v in batch.model_inputs().items() if k != "targets"})
    pairs = len(batch.pair_ids)
    assert batch.num_texts > pairs
    assert seen == [2 * pairs]
    assert logits.shape == (batch.num_texts, 2)


def test_swapping_left_and_right_changes_the_logits(world):
    _, shards = world
    model = _model().eval()
    inputs = _first_batch(shards, train=False).model_inputs()
    inputs.pop("targets")
    with torch.no_grad():
        forward = model.logits(**inputs)
        swapped = model.logits(**{**inputs, "left_index": inputs["right_index"], "right_index": inputs["left_index"]})
        again = model.logits(**inputs)
    torch.testing.assert_close(forward, again)  # deterministic in eval mode, so the difference is the order
    assert (forward - swapped).abs().max() > 1e-3


def test_malformed_statement_is_skipped_and_counted(world, tmp_path):
    _, shards = world
    task_uri, index = load_index(str(shards), "nlvr2")
    samples = list(wds.DataPipeline(wds.SimpleShardList(shard_urls(task_uri, index, "val")), wds.tarfile_to_samples()))
    records = [json.loads(s["json"]) for s in samples]
    del records[0]["statements"][0]["label"]
    records[1]["statements"][-1]["statement"] = None
    sink = ShardSink(str(tmp_path / "nlvr2"), "val")
    for s, rec in zip(samples, records):
        sink.write({"__key__": s["__key__"], "left.png": s["left.png"], "right.png": s["right.png"],
                    "json": json.dumps(rec).encode()})
    sink.close()
    total = sum(len(r["statements"]) for r in records)
    write_index(str(tmp_path / "nlvr2"), "nlvr2", "test", {"val": {"shards": sink.shards, "num_samples": len(samples),
                                                                  "num_texts": total}})
    cfg = _cfg()
    tok = build_tokenizer(cfg.model.fusion.tokenizer)
    batches = list(get_task("nlvr2").loader(str(tmp_path), "val", cfg, tok, seed=0, train=False))
    assert sum(b.skipped for b in batches) == 2
    kept = total - len(records[0]["statements"]) - len(records[1]["statements"])
    assert sum(b.num_texts for b in batches) == kept
    result = get_task("nlvr2").evaluate(_model(cfg).eval(), str(tmp_path), "val", cfg, tok, torch.device("cpu"))
    assert result.num_examples == kept


def test_tiny_finetune_then_evaluate_writes_metrics(world, tmp_path):
    _, shards = world
    out = str(tmp_path / "ft")
    cfg = _cfg("finetune.max_steps=10", "train.log_every=5", "train.ckpt_every=10")
    result = train(get_task("nlvr2"), cfg, str(shards), out)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [5, 10]
    assert all(r["loss_nlvr2"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert result.last_metrics["step"] == 10

    metrics_file = Path(out) / "metrics.json"
    report = evaluate(get_task("nlvr2"), out, str(shards), str(metrics_file), split="val")
    written = json.loads(metrics_file.read_text())
    _, index = load_index(str(shards), "nlvr2")
    assert {k: written[k] for k in ("task", "split", "num_examples")} == {
        "task": "nlvr2", "split": "val", "num_examples": index["splits"]["val"]["num_texts"]}
    assert set(written["metrics"]) == {"accuracy"} and 0 <= written["metrics"]["accuracy"] <= 1
    assert written["metrics"] == report["metrics"]
    assert 1 <= len(written["samples"]) <= 8
    sample = written["samples"][0]
    assert set(sample) == {"left_image_id", "right_image_id", "statement", "prediction", "probability", "label"}
    assert isinstance(sample["prediction"], bool) and isinstance(sample["label"], bool)
    assert 0.5 <= sample["probability"] <= 1
