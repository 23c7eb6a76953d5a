"""Issue 14, "SOHO sees": a fine-tuned model answers from the image, not from the question's text.

The easy world: one object per image, questions only about its colour and its shape. A VQA
fine-tune with no vision-language pre-training, on the demo preset (the smallest that reads
shape: the tiny preset's 64-px CNN stays near chance on shape), starts its CNN where the pipeline's
backbone step does: trained on the objects of another world (3-4 objects per image, a different
seed), then kept still while the fusion and the answer head learn at one rate.
"""

import json
from pathlib import Path

import pytest

from soho_core.config import load_config
from soho_core.data.shards import shard_synthetic
from soho_core.data.synthetic import synthesize
from soho_core.probe import probe
from soho_core.tasks.catalog import get_task
from soho_core.train.engine import evaluate, train

EASY_TYPES = ("color", "shape")


def _easy_world(out: Path) -> None:
    synthesize(str(out), num_images=1000, seed=0, image_size=128, min_objects=1, max_objects=1)
    questions = out / "vqa.jsonl"
    kept = [line for line in questions.read_text().splitlines(keepends=True)
            if json.loads(line)["question_type"] in EASY_TYPES]
    questions.write_text("".join(kept))


@pytest.mark.slow
def test_a_vqa_fine_tune_from_scratch_reads_colour_and_shape_from_the_image(tmp_path):
    easy, cnn_world = tmp_path / "easy", tmp_path / "cnn-world"
    _easy_world(easy)
    shard_synthetic(str(easy), str(tmp_path / "shards"), ["vqa"])
    synthesize(str(cnn_world), num_images=1000, seed=1, image_size=128, min_objects=3, max_objects=4)
    cnn = tmp_path / "cnn.pt"
    curve = probe(str(cnn_world), load_config("demo"), steps=300, eval_every=300, save_backbone=str(cnn))["curve"]
    assert curve[-1]["shape"] > 0.7, curve  # the CNN itself reads shape on its own world's held-out scenes

    cfg = load_config("demo", ["finetune.max_steps=300", f"model.backbone.weights={cnn}", "optim.backbone_lr=0",
                               "finetune.head_lr_mult=1"])
    run = tmp_path / "vqa"
    train(get_task("vqa"), cfg, str(tmp_path / "shards"), str(run))
    report = evaluate(get_task("vqa"), str(run), str(tmp_path / "shards"), str(run / "metrics.json"))
    score, blind = report["metrics"]["vqa_score"], report["baselines"]["blind_model"]["vqa_score"]
    assert score >= 0.95, report["breakdown"]
    assert score - max(blind, report["baselines"]["prior"]["vqa_score"]) >= 0.5, report["baselines"]
    for kind in EASY_TYPES:  # each type from the image: a grey image leaves it near its text prior
        row = report["breakdown"][kind]
        assert row["metric"] >= 0.9 and row["metric"] - row["blind_model"] >= 0.5, (kind, row)
