"""Blind baselines and per-type breakdowns of every downstream evaluation (soho_core.tasks.baselines)."""

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from soho_core.config import load_config
from soho_core.data.loader import read_records
from soho_core.data.shards import ShardSink, write_index
from soho_core.data.tokenizer import build_tokenizer
from soho_core.data.transforms import pad_batch
from soho_core.pipeline.runner import format_summary
from soho_core.report import write_report
from soho_core.tasks.base import evaluate_classifier
from soho_core.tasks.baselines import GREY, MajorityPrior, constant_images, majority_answer, text_type, train_prior
from soho_core.tasks.catalog import get_task
from soho_core.tasks.metrics import chance_recall, vqa_score
from soho_core.tasks.ve import label_index
from soho_core.train.engine import evaluate, model_config_for, train

SYNTHETIC_VQA_TYPES = {"color", "shape", "size", "count", "exists", "relation", "relation_yesno"}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _write_vqa_shards(root: Path, splits: dict[str, list[list[dict]]]) -> str:
    """Hand-made VQA shards: per split, a list of images, each a list of question entries."""
    task_uri = str(root / "vqa")
    index = {}
    for split, images in splits.items():
        sink = ShardSink(task_uri, split, max_count=2)  # several shards, so reading crosses them
        for i, questions in enumerate(images):
            record = {"image_id": f"{split}-{i}", "questions": questions}
            sink.write({"__key__": f"{split}-{i}", "png": _png(), "json": json.dumps(record).encode()})
        sink.close()
        index[split] = {"shards": sink.shards, "num_samples": len(images), "num_texts": sum(map(len, images))}
    write_index(task_uri, "vqa", "hand", index, answer_vocab=["red", "blue", "2", "3", "no"])
    return str(root)


def test_vqa_text_prior_on_a_hand_made_set_gives_the_hand_computed_score(tmp_path):
    q = lambda kind, answers: {"question": "q?", "question_type": kind, "answers": answers}  # noqa: E731
    data = _write_vqa_shards(tmp_path, {
        "train": [[q("what color is the", ["red"] * 7 + ["blue"] * 3), q("how many", ["2"] * 10)],
                  [q("what color is the", ["red"] * 6 + ["blue"] * 4), q("how many", ["3"] * 10)],
                  [q("what color is the", ["blue"] * 9 + ["red"])]],
        "test": [[q("what color is the", ["red"] * 2 + ["blue"] * 8)]]})
    assert [r["image_id"] for r in read_records(data, "vqa", "train")] == ["train-0", "train-1", "train-2"]
    prior = train_prior(data, "vqa", "questions", lambda e: majority_answer(e["answers"]))
    # colour: "red" is the majority of 2 of the 3 questions; count: "2" and "3" tie -> "2" (a-z);
    # a type the training split lacks: the majority over all 5 questions (red 2, blue 1, 2 1, 3 1).
    assert prior.by_type == {"what color is the": "red", "how many": "2"}
    assert prior("is the") == prior.overall == "red"
    answers = [["red"] * 2 + ["blue"] * 8, ["2"] * 10, ["no"] * 10]
    kinds = ["what color is the", "how many", "is the"]
    assert vqa_score([prior(k) for k in kinds], answers) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_classification_prior_is_the_per_type_majority_label():
    prior = MajorityPrior.fit([("exists", 0), ("exists", 0), ("exists", 2), ("none", 1), ("none", 2), ("none", 2)])
    assert prior.by_type == {"exists": 0, "none": 2}
    assert prior("every") == 2  # overall: 2 three times, 0 twice, 1 once
    assert MajorityPrior.fit([]) is None


def test_text_type_of_synthetic_and_official_style_records(synthetic_dir, task_shards):
    lines = lambda name: [json.loads(l) for l in (synthetic_dir / name).read_text().splitlines()]  # noqa: E731
    vqa = lines("vqa.jsonl")
    assert {text_type(r, "vqa") for r in vqa} == {r["question_type"] for r in vqa} == SYNTHETIC_VQA_TYPES
    assert all(text_type(r, "vqa") == "color" for r in vqa if r["question"].startswith("what color"))
    assert {text_type(r, "nlvr2") for r in lines("nlvr2.jsonl")} <= {"more", "both", "total", "one_image", "side"}
    assert {text_type(r, "ve") for r in lines("ve.jsonl")} == {"exists", "none", "at_least", "exactly", "every"}
    # the shards keep the type (NLVR2's statements are rebuilt there)
    statement = next(iter(read_records(str(task_shards), "nlvr2", "train")))["statements"][0]
    assert statement["template"] in {"more", "both", "total", "one_image", "side"}

    # official records: VQA v2's own question_type, else the first words of the text
    assert text_type({"question": "What color is the cat?", "question_type": "what color is the"}, "vqa") == \
        "what color is the"
    assert text_type({"question": "What's on the TABLE?"}, "vqa") == "what's on the"
    assert text_type({"statement": "The left image has two dogs.", "label": True}, "nlvr2") == "the left"
    assert text_type({"hypothesis": "A man is sleeping", "label": "neutral"}, "ve") == "a man"
    with pytest.raises(ValueError, match="valid: vqa, ve, nlvr2"):
        text_type({"caption": "x"}, "retrieval")


def test_constant_images_keep_sizes_and_padding_and_drop_content():
    a = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 32, 16), dtype=torch.uint8)
    images, sizes = pad_batch([a, b], 16)
    blind = constant_images(images, sizes)
    assert blind.shape == images.shape == (2, 3, 32, 32) and blind.dtype == torch.uint8
    for i, (h, w) in enumerate(sizes.tolist()):
        assert (blind[i, :, :h, :w] == torch.tensor(GREY, dtype=torch.uint8).view(3, 1, 1)).all()
        assert blind[i, :, h:].sum() == 0 and blind[i, :, :, w:].sum() == 0  # padding stays 0


class ColourModel(torch.nn.Module):
    """Logits that depend only on the image: class = the channel with the largest mean over the
    text's image's valid pixels. Records whether each call saw constant images."""

    def __init__(self):
        super().__init__()
        self.calls = []  # (saw constant images, predicted classes)

    def logits(self, images, image_sizes, input_ids, attention_mask, image_index):
        means = torch.stack([im[:, :h, :w].float().mean((1, 2)) for im, (h, w) in zip(images, image_sizes.tolist())])
        logits = torch.nn.functional.one_hot(means.argmax(1), 3).float()[image_index]
        grey = torch.tensor(GREY, dtype=images.dtype).view(3, 1, 1)
        constant = all((im[:, :h, :w] == grey).all() for im, (h, w) in zip(images, image_sizes.tolist()))
        self.calls.append((constant, logits.argmax(1).tolist()))
        return logits


def test_the_blind_pass_replaces_every_image(task_shards):
    cfg = load_config("tiny", ["data.images_per_batch=4"])
    task = get_task("ve")
    batches = list(task.loader(str(task_shards), "val", cfg, build_tokenizer("synthetic"), 0, False))
    model = ColourModel()
    result = evaluate_classifier(model, batches, torch.device("cpu"), lambda *a: {}, task="ve", blind=True)
    real = [p for constant, preds in model.calls if not constant for p in preds]
    blind = [p for constant, preds in model.calls if constant for p in preds]
    assert len(real) == len(blind) == result.num_examples and len(model.calls) == 2 * len(batches)
    assert len(set(real)) > 1  # real scenes: red, green or blue objects win
    assert set(blind) == {0}  # the grey image: its red channel (124) is the largest, for every example
    gold = [label_index(e) for b in batches for e in b.entries]
    assert result.baselines["blind_model"]["accuracy"] == pytest.approx(gold.count(0) / len(gold))
    assert set(result.baselines) == {"blind_model"}  # no prior given
    assert sum(row["n"] for row in result.breakdown.values()) == result.num_examples


def test_chance_recall_by_hand():
    got = chance_recall([0, 0, 1], num_images=2)  # image 0 has 2 of the 3 captions
    assert got["img_r1"] == 0.5 and got["img_r5"] == got["img_r10"] == 1.0
    # image 0 misses at k=1 with C(1,1)/C(3,1) = 1/3, image 1 with C(2,1)/C(3,1) = 2/3
    assert got["txt_r1"] == pytest.approx(((1 - 1 / 3) + (1 - 2 / 3)) / 2)
    assert got["txt_r5"] == 1.0
    assert got["r_mean"] == pytest.approx(sum(got[k] for k in got if k != "r_mean") / 6)
    with pytest.raises(ValueError, match="at least one text"):
        chance_recall([0, 0], num_images=2)


@pytest.mark.parametrize("task_name", ["vqa", "ve", "nlvr2", "retrieval"])
def test_metrics_json_carries_baselines_gain_and_breakdown(task_name, task_shards, tmp_path):
    task = get_task(task_name)
    run = str(tmp_path / task_name)
    train(task, load_config("tiny", ["finetune.max_steps=1", "data.images_per_batch=4"]), str(task_shards), run)
    report = evaluate(task, run, str(task_shards), str(tmp_path / "metrics.json"), split="val")
    written = json.loads((tmp_path / "metrics.json").read_text())
    primary = {"vqa": "vqa_score", "ve": "accuracy", "nlvr2": "accuracy", "retrieval": "r_mean"}[task_name]
    assert written["metrics"] == report["metrics"] and primary in written["metrics"]
    base = written["baselines"]
    assert set(base) == {"prior", "blind_model"}
    assert all(0.0 <= b[primary] <= 1.0 for b in base.values())
    assert written["gain"] == pytest.approx(written["metrics"][primary] - max(b[primary] for b in base.values()))
    rows = written["breakdown"]
    assert all(set(row) == {"n", "metric", "prior", "blind_model"} for row in rows.values())
    if task_name == "retrieval":
        assert set(rows) == {"image->text", "text->image"}
        assert rows["text->image"]["n"] == written["num_examples"]
        assert base["prior"]["img_r1"] == pytest.approx(1 / written["metrics"]["num_images"])
        # a constant image gives every image the same scores: ties rank the right image below the rest
        assert base["blind_model"]["img_r1"] == 0.0
    else:
        assert sum(row["n"] for row in rows.values()) == written["num_examples"]
        if task_name == "vqa":
            assert set(rows) <= SYNTHETIC_VQA_TYPES and len(rows) >= 5
        n = sum(row["n"] for row in rows.values())  # the breakdown averages back to the totals
        for key, total in (("metric", written["metrics"][primary]), ("prior", base["prior"][primary]),
                           ("blind_model", base["blind_model"][primary])):
            assert sum(row[key] * row["n"] for row in rows.values()) / n == pytest.approx(total)


def test_the_blind_pass_can_be_turned_off(task_shards, tmp_path):
    task = get_task("ve")
    cfg = model_config_for(task, load_config("tiny", ["data.images_per_batch=4"]), init_state=None)
    tok = build_tokenizer(cfg.model.fusion.tokenizer)
    model = task.build_model(cfg, len(tok), {}).eval()
    cfg.finetune.eval_blind = False
    calls = []
    model.trunk.backbone.register_forward_hook(lambda m, i, o: calls.append(1))
    result = task.evaluate(model, str(task_shards), "val", cfg, tok, torch.device("cpu"))
    assert set(result.baselines) == {"prior"} and "blind_model" not in next(iter(result.breakdown.values()))
    batches = list(task.loader(str(task_shards), "val", cfg, tok, 0, False))
    assert len(calls) == len(batches)  # one CNN pass per batch: no blind pass
    m = result.measurement()
    assert m["gain"] == pytest.approx(result.metrics["accuracy"] - result.baselines["prior"]["accuracy"])


def _metrics_file(folder: Path, task: str, metrics: dict, **extra) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"task": task, "split": "test", "num_examples": 30,
                                                     "metrics": metrics, **extra}))
    return str(folder / "metrics.json")


def test_report_shows_each_metric_against_its_blind_baselines(tmp_path):
    pre = tmp_path / "pretrain"
    pre.mkdir()
    vqa = _metrics_file(tmp_path / "vqa", "vqa", {"vqa_score": 0.6},
                        baselines={"prior": {"vqa_score": 0.45}, "blind_model": {"vqa_score": 0.5}}, gain=0.1,
                        breakdown={"color": {"n": 20, "metric": 0.9, "prior": 0.2, "blind_model": 0.25},
                                   "exists": {"n": 10, "metric": 0.5, "prior": 0.55, "blind_model": 0.5}})
    old = _metrics_file(tmp_path / "ve", "ve", {"accuracy": 0.4})  # from before the baselines
    md = write_report(str(tmp_path / "r"), str(pre), [vqa, old]).markdown
    assert "## Against blind baselines" in md
    assert "| vqa | vqa_score | 0.6000 | 0.4500 | 0.5000 | +0.1000 |" in md
    assert "| ve | accuracy |" not in md  # no baselines, no row
    assert "### vqa: vqa_score by type" in md
    assert "| color | 20 | 0.9000 | 0.2000 | 0.2500 | +0.6500 |" in md
    assert "| exists | 10 | 0.5000 | 0.5500 | 0.5000 | -0.0500 |" in md
    assert md.index("| color |") < md.index("| exists |")  # most frequent type first
    assert (tmp_path / "r" / "baselines.png").read_bytes()[:4] == b"\x89PNG" and "](baselines.png)" in md
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["metrics"]["vqa"]["baselines"]["blind_model"]["vqa_score"] == 0.5
    # What `make demo` prints at the end carries the same row.
    printed = format_summary(summary)
    assert "against blind baselines" in printed and "| vqa | vqa_score | 0.6000 | 0.4500 | 0.5000 | +0.1000 |" in printed

    md = write_report(str(tmp_path / "r2"), str(pre), [old]).markdown
    assert "blind baselines" not in md and not (tmp_path / "r2" / "baselines.png").exists()
    assert "blind" not in format_summary(json.loads((tmp_path / "r2" / "summary.json").read_text()))


def test_the_prior_reads_train_records_from_s3_as_from_a_local_store(s3_server, synthetic_dir, task_shards):
    from soho_core.data.shards import shard_synthetic

    shard_synthetic(str(synthetic_dir), "s3://soho/shards", tasks=["ve"], max_count=40)
    remote = list(read_records("s3://soho/shards", "ve", "train"))
    assert remote == list(read_records(str(task_shards), "ve", "train")) and len(remote) > 10
    assert train_prior("s3://soho/shards", "ve", "hypotheses", label_index) == \
        train_prior(str(task_shards), "ve", "hypotheses", label_index)
