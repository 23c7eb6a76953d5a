"""Readers of the official formats -> shards -> the task loaders, on small files the tests write."""

import io
import json
import os
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from soho_core.config import load_config
from soho_core.data.readers import ReaderOptions, official_answer_scores, parse_splits, read_source
from soho_core.data.shards import load_index, shard_source
from soho_core.data.tokenizer import build_tokenizer
from soho_core.tasks.catalog import get_task
from soho_core.tasks.metrics import vqa_score


def jpeg(path: Path, color=(200, 30, 30), size=(48, 36)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


COCO_IDS = {"train2014": [9, 25, 30, 34], "val2014": [42, 73]}


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco"
    for split, ids in COCO_IDS.items():
        images = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg", "width": 48, "height": 36} for i in ids]
        anns = [{"id": 100 * i + k, "image_id": i, "caption": f" a photo {k} of thing {i} "} for i in ids for k in range(3)]
        anns.append({"id": 1, "image_id": ids[0], "caption": "   "})  # empty: dropped and counted
        write_json(root / "annotations" / f"captions_{split}.json", {"images": images, "annotations": anns})
        for i in ids:
            jpeg(root / split / f"COCO_{split}_{i:012d}.jpg", color=(i * 5 % 255, 80, 120))
    return root


@pytest.fixture
def vqa(tmp_path):
    root = tmp_path / "vqa2"
    for split, ids in COCO_IDS.items():
        questions, annotations = [], []
        for i in ids:
            for k, (text, answers) in enumerate([
                    ("what color is it?", ["red"] * 6 + ["Red."] * 2 + ["dark red", "maroon"]),
                    ("is it a cat?", ["yes"] * 9 + ["no"]),
                    ("how many?", ["two", "2", "2", "3", "2", "2", "2", "two", "2", "2"])]):
                qid = i * 10 + k
                questions.append({"image_id": i, "question": text, "question_id": qid})
                annotations.append({"question_id": qid, "image_id": i, "question_type": "what",
                                    "answer_type": "other", "multiple_choice_answer": answers[0],
                                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                                for j, a in enumerate(answers)]})
        write_json(root / f"v2_OpenEnded_mscoco_{split}_questions.json",
                   {"data_subtype": split, "questions": questions})
        write_json(root / f"v2_mscoco_{split}_annotations.json", {"data_subtype": split, "annotations": annotations})
    return root


@pytest.fixture
def nlvr2(tmp_path):
    root = tmp_path / "nlvr2"
    rows = {"train": [], "dev": []}
    for split in rows:
        for s in range(3):
            pair = f"{split}-{s}-0"
            for k in range(2):
                row = {"identifier": f"{pair}-{k}", "sentence": f"there are {k + 1} dogs", "label": "True" if k else "False",
                       "left_url": "http://x/l.jpg", "right_url": "http://x/r.jpg", "writer": "w", "synset": "dog"}
                if split == "train":
                    row["directory"] = s % 2
                rows[split].append(row)
            folder = root / "images" / "train" / str(s % 2) if split == "train" else root / "dev"
            jpeg(folder / f"{pair}-img0.png")  # NLVR2 images keep .png names whatever their format
            jpeg(folder / f"{pair}-img1.png", color=(0, 0, 200))
        write_jsonl(root / f"{split}.json", rows[split])
    return root


@pytest.fixture
def snli_ve(tmp_path):
    root = tmp_path / "snli_ve"
    labels = ["entailment", "neutral", "contradiction", "-"]
    for split, ids in {"train": ["1000", "1001", "1002"], "dev": ["2000"], "test": ["3000", "3001"]}.items():
        rows = [{"Flickr30K_ID": i, "gold_label": labels[k], "sentence1": "a caption", "sentence2": f"hyp {k} {i}",
                 "pairID": f"{i}.jpg#{k}r1e", "captionID": f"{i}.jpg#{k}"} for i in ids for k in range(4)]
        write_jsonl(root / f"snli_ve_{split}.jsonl", rows)
        for i in ids:
            jpeg(tmp_path / "flickr" / "flickr30k-images" / f"{i}.jpg")
    return root


def _cfg(*extra):
    return load_config("tiny", ["data.images_per_batch=2", *extra])


def _batches(task, root, split, **kw):
    tok = build_tokenizer("synthetic")
    return list(get_task(task).loader(str(root), split, _cfg(), tok, seed=0, train=False, **kw))


def test_coco_captions_to_pretrain_batches(coco, tmp_path):
    samples, stats = read_source("coco", ReaderOptions(str(coco)))
    assert [s.record["image_id"] for s in samples if s.split == "val"] == ["coco-42", "coco-73"]
    assert samples[0].record["captions"] == ["a photo 0 of thing 9", "a photo 1 of thing 9", "a photo 2 of thing 9"]
    assert stats.dropped["empty or non-text captions"] == 2
    out = tmp_path / "shards"
    index = shard_source("coco", ReaderOptions(str(coco)), str(out), tasks=["pretrain", "retrieval"], max_count=3)
    assert index["pretrain"]["splits"]["train"]["num_samples"] == 4
    assert index["pretrain"]["splits"]["train"]["shards"] == ["train-coco-00000.tar", "train-coco-00001.tar"]
    assert index["retrieval"]["splits"]["val"]["num_texts"] == 6
    tok = build_tokenizer("synthetic")
    batch = next(iter(get_task("pretrain").loader(str(out), "train", _cfg(), tok, seed=0, train=True)))
    assert batch.images.shape[0] == 2 and batch.skipped == 0
    val = _batches("retrieval", out, "val")
    assert sum(b.images.shape[0] for b in val) == 2


def test_vqa2_becomes_vqa_shards_the_vqa_loader_reads(vqa, coco, tmp_path):
    opts = ReaderOptions(str(vqa), images=str(coco))
    samples, _ = read_source("vqa2", opts)
    q = samples[0].record["questions"][0]
    assert q["answers"][:1] == ["red"] and len(q["answers"]) == 10 and q["question_id"] == "90"
    assert q["question_type"] == "what"  # the annotation's type: the evaluation's breakdown key
    # the official metric: accuracy of predicting each answer, over the 10 leave-one-out subsets
    for answer, score in q["scores"].items():
        assert score == pytest.approx(vqa_score([answer], [q["answers"]], official=True))
    assert q["scores"]["red"] == 1.0 and q["scores"]["dark red"] == pytest.approx(0.3)
    count = samples[0].record["questions"][2]["scores"]
    assert set(count) == {"2", "3"}  # "two" normalises to "2"

    out = tmp_path / "shards"
    index = shard_source("vqa2", opts, str(out), answer_vocab_size=4)["vqa"]
    assert index["answer_vocab"] == ["2", "yes", "red", "3"]  # most frequent human answers (ties: a-z)
    assert {s: v["num_samples"] for s, v in index["splits"].items()} == {"train": 4, "val": 2}
    assert index["splits"]["val"]["num_texts"] == 6
    batches = _batches("vqa", out, "val")
    assert sum(b.num_texts for b in batches) == 6
    b = batches[0]
    assert b.targets.shape == (b.num_texts, 4)
    assert b.targets[0].tolist() == [0.0, 0.0, 1.0, 0.0]  # "what color": red (8 of 10 after normalisation)


def test_nlvr2_pairs_become_nlvr2_batches(nlvr2, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nlvr2/test1\.json"):  # the default splits include test1
        read_source("nlvr2", ReaderOptions(str(nlvr2)))
    opts = ReaderOptions(str(nlvr2), splits=parse_splits("train=train,val=dev"))
    samples, _ = read_source("nlvr2", opts)
    first = samples[0]
    assert first.record["left_image_id"] == "train-0-0-img0"
    assert [st["label"] for st in first.record["statements"]] == [False, True]
    assert first.images["left.png"][0] == "images/train/0/train-0-0-img0.png"
    out = tmp_path / "shards"
    index = shard_source("nlvr2", opts, str(out))["nlvr2"]
    assert {s: v["num_texts"] for s, v in index["splits"].items()} == {"train": 6, "val": 6}
    batches = _batches("nlvr2", out, "val")
    assert sum(b.num_texts for b in batches) == 6
    assert batches[0].targets.tolist()[:2] == [0, 1]


def test_snli_ve_drops_unlabelled_pairs_and_feeds_the_ve_loader(snli_ve, tmp_path):
    opts = ReaderOptions(str(snli_ve), images=str(tmp_path / "flickr"))
    samples, stats = read_source("snli-ve", opts)
    assert stats.dropped["pairs with gold_label '-'"] == 6
    assert samples[0].record == {"image_id": "flickr-1000", "hypotheses": [
        {"id": "1000.jpg#0r1e", "hypothesis": "hyp 0 1000", "label": "entailment"},
        {"id": "1000.jpg#1r1e", "hypothesis": "hyp 1 1000", "label": "neutral"},
        {"id": "1000.jpg#2r1e", "hypothesis": "hyp 2 1000", "label": "contradiction"}]}
    out = tmp_path / "shards"
    shard_source("snli-ve", opts, str(out))
    batches = _batches("ve", out, "test")
    assert sum(b.num_texts for b in batches) == 6 and batches[0].targets.tolist()[:3] == [0, 1, 2]


def test_karpathy_coco_and_flickr30k(coco, tmp_path):
    images = [{"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "imgid": 0, "split": "test",
               "cocoid": 42, "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"], "imgid": 0, "sentid": 0}]},
              {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "imgid": 1, "split": "restval",
               "cocoid": 9, "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"], "imgid": 1, "sentid": 1}]},
              {"filepath": "train2014", "filename": "COCO_train2014_000000000025.jpg", "imgid": 2, "split": "train",
               "cocoid": 25, "sentences": [{"raw": "", "tokens": [], "imgid": 2, "sentid": 2}]}]
    write_json(tmp_path / "karpathy" / "dataset_coco.json", {"dataset": "coco", "images": images})
    samples, stats = read_source("karpathy", ReaderOptions(str(tmp_path / "karpathy"), images=str(coco)))
    assert [(s.split, s.record["image_id"]) for s in samples] == [("test", "coco-42"), ("train", "coco-9")]
    assert stats.dropped["images without sentences"] == 1
    out = tmp_path / "shards"
    shard_source("karpathy", ReaderOptions(str(tmp_path / "karpathy" / "dataset_coco.json"), images=str(coco)), str(out))
    assert load_index(str(out), "retrieval")[1]["splits"]["test"]["num_samples"] == 1

    jpeg(tmp_path / "f30k" / "flickr30k-images" / "1000092795.jpg")
    write_json(tmp_path / "f30k" / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "val", "sentences": [{"raw": "Two men.", "sentid": 0}]}]})
    samples, _ = read_source("karpathy", ReaderOptions(str(tmp_path / "f30k" / "dataset_flickr30k.json")))
    assert samples[0].record == {"image_id": "flickr-1000092795", "captions": ["Two men."]}
    assert samples[0].images["png"][0] == "flickr30k-images/1000092795.jpg"


def test_coco_and_vg_share_the_pretrain_folder(coco, tmp_path):
    vg = tmp_path / "vg"
    write_json(vg / "region_descriptions.json", [
        {"id": 1, "regions": [{"region_id": 1, "image_id": 1, "phrase": "a tree", "x": 0, "y": 0, "width": 5, "height": 5},
                              {"region_id": 2, "image_id": 1, "phrase": "a tree", "x": 1, "y": 0, "width": 5, "height": 5},
                              {"region_id": 3, "image_id": 1, "phrase": "blue sky", "x": 0, "y": 0, "width": 9, "height": 3}]},
        {"id": 2, "regions": [{"region_id": 4, "image_id": 2, "phrase": "a red car", "x": 0, "y": 0, "width": 5, "height": 5}]}])
    jpeg(vg / "VG_100K" / "1.jpg")
    jpeg(vg / "VG_100K_2" / "2.jpg")
    out = tmp_path / "shards"
    shard_source("coco", ReaderOptions(str(coco)), str(out))
    index = shard_source("vg", ReaderOptions(str(vg)), str(out))["pretrain"]
    assert index["source"] == "coco+vg"
    assert index["splits"]["train"]["num_samples"] == 4 + 2
    assert index["splits"]["train"]["shards"] == ["train-coco-00000.tar", "train-vg-00000.tar"]
    records = [json.loads(s["json"]) for s in wds.WebDataset(str(out / "pretrain" / "train-vg-00000.tar"),
                                                              shardshuffle=False)]
    assert records[0] == {"image_id": "vg-1", "captions": ["a tree", "blue sky"]}


def test_missing_image_is_an_error_naming_it_unless_tolerated(coco, tmp_path):
    os.remove(coco / "train2014" / "COCO_train2014_000000000030.jpg")
    out = tmp_path / "shards"
    with pytest.raises(FileNotFoundError, match=r"1 of 6 samples.*train2014/COCO_train2014_000000000030\.jpg.*--max-missing"):
        shard_source("coco", ReaderOptions(str(coco)), str(out))
    assert not out.exists()  # nothing written before the check
    index = shard_source("coco", ReaderOptions(str(coco), max_missing=0.2), str(out))["pretrain"]
    assert index["splits"]["train"]["num_samples"] == 3
    assert index["sources"]["coco"]["missing_images"] == 1


def test_a_users_own_layout_through_the_image_pattern(coco, tmp_path):
    own = tmp_path / "own"
    for split, ids in COCO_IDS.items():
        for i in ids:
            jpeg(own / "pics" / f"{i}.jpg")
    opts = ReaderOptions(str(coco), images=str(own), image_pattern=("pics/{id}.jpg",),
                         splits=parse_splits("train=train2014+val2014"))
    index = shard_source("coco", opts, str(tmp_path / "shards"))["pretrain"]
    assert list(index["splits"]) == ["train"] and index["splits"]["train"]["num_samples"] == 6


def test_corrupt_image_is_skipped_and_counted(coco, tmp_path):
    path = coco / "train2014" / "COCO_train2014_000000000025.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated JPEG
    (coco / "train2014" / "COCO_train2014_000000000034.jpg").write_bytes(b"")  # zero bytes
    index = shard_source("coco", ReaderOptions(str(coco)), str(tmp_path / "shards"))["pretrain"]
    assert index["splits"]["train"]["num_samples"] == 2 and index["splits"]["train"]["num_skipped"] == 2


def test_bad_annotations_name_the_file_and_field(coco, vqa, tmp_path):
    path = coco / "annotations" / "captions_val2014.json"
    data = json.loads(path.read_text())
    del data["annotations"][1]["caption"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"captions_val2014\.json annotations\[1\]: missing field 'caption'"):
        read_source("coco", ReaderOptions(str(coco)))
    (vqa / "v2_mscoco_val2014_annotations.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(ValueError, match=r"v2_mscoco_val2014_annotations\.json is not UTF-8 JSON"):
        read_source("vqa2", ReaderOptions(str(vqa), images=str(coco)))
    os.remove(vqa / "v2_mscoco_val2014_annotations.json")
    with pytest.raises(FileNotFoundError, match=r"v2_mscoco_val2014_annotations\.json"):
        read_source("vqa2", ReaderOptions(str(vqa), images=str(coco)))
    with pytest.raises(ValueError, match="source 'nlvr2' cannot make 'vqa' shards"):
        shard_source("nlvr2", ReaderOptions(str(vqa)), str(tmp_path), tasks=["vqa"])
    with pytest.raises(ValueError, match="--splits: 'train' is not OUT=SOURCE"):
        parse_splits("train")


def test_complete_shards_are_skipped_on_rerun(coco, tmp_path):
    out = tmp_path / "shards"
    opts = ReaderOptions(str(coco))
    shard_source("coco", opts, str(out), max_count=2)
    task = out / "pretrain"
    first = {p.name: p.stat().st_mtime_ns for p in task.glob("*.tar")}
    os.remove(task / "train-coco-00001.tar.json")  # as if the run died before this shard's sidecar
    index = shard_source("coco", opts, str(out), max_count=2)["pretrain"]
    again = {p.name: p.stat().st_mtime_ns for p in task.glob("*.tar")}
    assert [n for n in first if first[n] != again[n]] == ["train-coco-00001.tar"]
    assert index["splits"]["train"]["num_samples"] == 4
    jpeg(coco / "train2014" / "COCO_train2014_000000000009.jpg", size=(64, 64))  # the content changed
    shard_source("coco", opts, str(out), max_count=2)
    third = {p.name: p.stat().st_mtime_ns for p in task.glob("*.tar")}
    assert [n for n in first if third[n] != again[n]] == ["train-coco-00000.tar"]


def test_parallel_workers_write_the_same_shards(coco, tmp_path):
    one = shard_source("coco", ReaderOptions(str(coco)), str(tmp_path / "one"), max_count=1)["pretrain"]
    two = shard_source("coco", ReaderOptions(str(coco)), str(tmp_path / "two"), max_count=1, workers=2)["pretrain"]
    assert one["splits"] == two["splits"] and len(one["splits"]["train"]["shards"]) == 4
    for name in one["splits"]["train"]["shards"]:
        assert (tmp_path / "one" / "pretrain" / name).read_bytes() == (tmp_path / "two" / "pretrain" / name).read_bytes()


def test_vqa2_shards_on_s3_and_the_cli(vqa, coco, s3_server, tmp_path):
    from soho_core.cli import main

    rc = main(["data", "shard", "--source", "vqa2", "--input", str(vqa), "--images", str(coco),
               "--out", "s3://soho/shards", "--answer-vocab-size", "10", "--splits", "train=train2014,test=val2014"])
    assert rc == 0
    _, index = load_index("s3://soho/shards", "vqa")
    assert sorted(index["splits"]) == ["test", "train"] and len(index["answer_vocab"]) >= 4
    batches = _batches("vqa", "s3://soho/shards", "test")
    assert sum(b.num_texts for b in batches) == 6
    assert main(["data", "shard", "--source", "vqa2", "--input", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2


def test_official_answer_scores_match_the_metric():
    answers = ["yes"] * 3 + ["no"] * 7
    assert official_answer_scores(answers) == {"yes": 0.9, "no": 1.0}
    assert official_answer_scores(["a"] + ["blue"] * 9) == {"blue": 1.0}  # "a" normalises to nothing


def test_image_members_keep_their_own_extension():
    """A JPEG is stored as ``jpg`` (not under a ``png`` name) and the loader finds any extension."""
    from soho_core.data.loader import image_member
    from soho_core.data.shards import member_for

    assert member_for("png", "/data/coco/COCO_val2014_000000000042.jpg") == "jpg"
    assert member_for("left.png", "s3://b/nlvr2/dev-850-0-img0.JPEG") == "left.jpeg"
    assert member_for("png", "/data/x/image_without_extension") == "png"
    assert image_member({"jpg": b"a", "json": b"{}"}, "png") == b"a"
    assert image_member({"right.webp": b"b"}, "right.png") == b"b"
    with pytest.raises(KeyError, match="left.png"):
        image_member({"right.png": b"c"}, "left.png")


def test_vg_regions_are_streamed_not_read_whole(tmp_path):
    """region_descriptions.json is 1.5 GB: the reader yields images while the file is still being
    read, in memory bounded by a chunk and an item; a file that goes bad later fails there,
    naming the file."""
    import tracemalloc

    from soho_core.data.readers import CHUNK_BYTES, ReadStats, read_vg

    vg = tmp_path / "vg"
    vg.mkdir()
    item = lambda i: {"id": i, "regions": [{"region_id": 10 * i + k, "image_id": i, "phrase": f"thing {k} of image {i}",
                                             "x": 0, "y": 0, "width": 5, "height": 5} for k in range(20)]}  # noqa: E731
    with open(vg / "region_descriptions.json", "w") as f:
        f.write("[" + ", ".join(json.dumps(item(i)) for i in range(4000)) + ", {oops")  # ~7 MB, then broken
    size = (vg / "region_descriptions.json").stat().st_size
    assert size > 6 * CHUNK_BYTES
    samples = read_vg(ReaderOptions(str(vg)), ("VG_100K/{id}.jpg",), {"train": ("all",)}, ReadStats())
    tracemalloc.start()
    first = next(samples)  # before the broken end is ever read
    assert first.record == {"image_id": "vg-0", "captions": [f"thing {k} of image 0" for k in range(20)]}
    count = 1
    with pytest.raises(ValueError, match=r"region_descriptions\.json is not valid JSON: .* at character"):
        for _ in samples:
            count += 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 4000
    assert peak < size / 2, f"peak {peak} bytes while streaming a {size}-byte file"
