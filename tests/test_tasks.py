"""VQA and visual entailment on the shared trunk; fine-tune, evaluate and predict from the CLI."""

import json
from pathlib import Path

import pytest
import torch

from soho_core.cli import main
from soho_core.config import load_config
from soho_core.data.shards import load_index
from soho_core.data.tokenizer import build_tokenizer
from soho_core.tasks.catalog import get_task
from soho_core.train.checkpoint import load_checkpoint
from soho_core.train.engine import model_config_for

TINY = ["finetune.max_steps=6", "train.log_every=3", "train.ckpt_every=100", "data.images_per_batch=4"]


def _first_batch(task_name, shards, cfg):
    task = get_task(task_name)
    tok = build_tokenizer("synthetic")
    return task, tok, next(iter(task.loader(str(shards), "train", cfg, tok, seed=0, train=True)))


def test_a_fine_tune_keeps_the_checkpoint_s_architecture_but_its_own_dropout(caplog):
    """The model config comes from the initialising checkpoint (the weights must fit), except the
    fusion's dropout: a training setting the fine-tune's --set must reach (it was silently dropped).
    A model setting that cannot apply is named in the log."""
    init = load_config("tiny", ["model.fusion.dropout=0.0"])
    task = get_task("vqa")
    with caplog.at_level("INFO", logger="soho_core.train.engine"):
        cfg = model_config_for(task, load_config("tiny", [*TINY, "model.fusion.dropout=0.3",
                                                          "model.fusion.hidden_size=96"]),
                               init_state={"config": init.to_dict()})
    assert cfg.model.fusion.dropout == 0.3
    assert cfg.model.fusion.hidden_size == init.model.fusion.hidden_size == 64
    (line,) = [r.getMessage() for r in caplog.records if "do not apply" in r.getMessage()]
    assert "model.fusion.hidden_size=96 (checkpoint: 64)" in line and "dropout" not in line
    model = task.build_model(cfg, len(build_tokenizer("synthetic")), {"answer_vocab": ["yes", "no"]})
    probs = {m.p for m in model.trunk.fusion.modules() if isinstance(m, torch.nn.Dropout)}
    assert probs == {0.3}


@pytest.mark.parametrize("task_name", ["vqa", "ve"])
def test_head_forward_backward_and_cnn_once_per_image(task_name, task_shards):
    task, tok, batch = _first_batch(task_name, task_shards, load_config("tiny", TINY))
    cfg = model_config_for(task, load_config("tiny", TINY), init_state=None)
    model = task.build_model(cfg, len(tok), task.metadata(str(task_shards), cfg))
    seen = []
    model.trunk.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    out = model(**batch.model_inputs())
    out.loss.backward()
    assert seen == [batch.images.shape[0]]
    # Up to sentence_group distinct texts per image (VE scenes have 3 hypotheses): never a duplicate.
    per_image = [[e for e, i in zip(batch.entries, batch.image_index.tolist()) if i == k] for k in range(4)]
    assert all(0 < len(texts) <= cfg.data.sentence_group for texts in per_image)
    assert all(len({json.dumps(e, sort_keys=True) for e in texts}) == len(texts) for texts in per_image)
    assert batch.num_texts == sum(len(texts) for texts in per_image)
    assert torch.isfinite(out.loss)
    for p in (model.head[0].weight, model.trunk.backbone.stages[-1][0].conv1.weight,
              model.trunk.fusion.word_embedding_weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.trunk.dictionary is None  # fine-tuning drops the quantiser by default


def test_vqa_targets_are_soft_scores_over_the_answer_vocab(task_shards):
    cfg = load_config("tiny", TINY)
    task, _, batch = _first_batch("vqa", task_shards, cfg)
    vocab = task.metadata(str(task_shards), cfg)["answer_vocab"]
    assert batch.targets.shape == (batch.num_texts, len(vocab))
    for row, entry in zip(batch.targets, batch.entries):
        best = vocab.index(max(set(entry["answers"]), key=entry["answers"].count))
        assert row[best] == 1.0  # the majority answer (>= 3 of 10) scores 1
        assert ((row == 0) | (row >= 1 / 3 - 1e-6)).all()


def test_finetune_initialises_trunk_from_pretraining_and_keeps_dictionary_on_request(tiny_pretrained, task_shards):
    from soho_core.train.engine import train

    pre = load_checkpoint(str(tiny_pretrained))["model"]
    cfg = load_config("tiny", ["finetune.max_steps=1", "finetune.keep_dictionary=true", "optim.lr=1e-12",
                               "optim.backbone_lr=0", "finetune.head_lr_mult=1"])
    result = train(get_task("ve"), cfg, str(task_shards), str(Path(tiny_pretrained).parent / "ve-keep"),
                   init=str(tiny_pretrained))
    state = result.model.state_dict()
    key = "trunk.fusion.bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(state[key], pre[key], atol=1e-6, rtol=0)
    assert torch.equal(state["trunk.backbone.stages.2.0.conv1.weight"], pre["trunk.backbone.stages.2.0.conv1.weight"])
    assert result.model.trunk.dictionary is not None


@pytest.mark.parametrize("task_name,metric", [("vqa", "vqa_score"), ("ve", "accuracy")])
def test_cli_finetune_evaluate_end_to_end(task_name, metric, tiny_pretrained, task_shards, tmp_path, capsys):
    out = tmp_path / task_name
    args = ["finetune", "--task", task_name, "--init", str(tiny_pretrained), "--data", str(task_shards),
            "--out", str(out)] + [x for s in TINY for x in ("--set", s)]
    assert main(args) == 0
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [3, 6]
    assert main(["evaluate", "--task", task_name, "--checkpoint", str(out), "--data", str(task_shards),
                 "--out", str(out / "metrics.json"), "--split", "val"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    _, index = load_index(str(task_shards), task_name)
    assert report["task"] == task_name and report["split"] == "val"
    assert report["num_examples"] == index["splits"]["val"]["num_texts"]
    assert 0.0 <= report["metrics"][metric] <= 1.0
    # evaluation may change data.* / finetune.* settings, never the model
    assert main(["evaluate", "--task", task_name, "--checkpoint", str(out), "--data", str(task_shards),
                 "--split", "val", "--set", "data.images_per_batch=2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["num_examples"] == report["num_examples"]
    assert main(["evaluate", "--task", task_name, "--checkpoint", str(out), "--data", str(task_shards),
                 "--set", "model.fusion.num_layers=1"]) == 2
    assert "only data.* and finetune.*" in capsys.readouterr().err
    # a checkpoint of another task is refused, naming both
    assert main(["evaluate", "--task", "nlvr2", "--checkpoint", str(out), "--data", str(task_shards)]) == 2
    assert f"'{task_name}' checkpoint, not 'nlvr2'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def vqa_run(tiny_pretrained, task_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa_run")
    assert main(["finetune", "--task", "vqa", "--init", str(tiny_pretrained), "--data", str(task_shards),
                 "--out", str(out), "--max-steps", "2"]) == 0
    return out


def test_finetune_without_config_keeps_the_pretraining_runs_settings(vqa_run, tiny_pretrained):
    """--init without --config: the pre-training run's settings (image size, ...) are the base, so
    a model pre-trained at one resolution is not fine-tuned at another."""
    pre = json.loads((Path(tiny_pretrained) / "config.json").read_text())
    ft = json.loads((Path(vqa_run) / "config.json").read_text())
    assert pre["train"]["log_every"] == 2 != load_config("tiny").train.log_every  # set by the fixture
    assert ft["train"]["log_every"] == 2 and ft["data"] == pre["data"]
    assert ft["finetune"]["max_steps"] == 2  # --max-steps still applies


def test_predict_answers_a_question_about_an_image_file(vqa_run, synthetic_dir, capsys):
    image = next((Path(synthetic_dir) / "images").iterdir())
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(vqa_run), "--image", str(image),
                 "--text", "what color is the circle"]) == 0
    answer = json.loads(capsys.readouterr().out)
    vocab = load_checkpoint(str(vqa_run))["meta"]["answer_vocab"]
    assert answer["task"] == "vqa" and answer["answer"] in vocab and 0 < answer["probability"] <= 1


def test_predict_errors_name_the_problem(vqa_run, tiny_pretrained, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    cases = [
        (["--checkpoint", str(vqa_run), "--image", str(tmp_path / "missing.png"), "--text", "q"], "does not exist"),
        (["--checkpoint", str(vqa_run), "--image", str(bad), "--text", "q"], "cannot be read as an image"),
        (["--checkpoint", str(tiny_pretrained), "--image", str(bad), "--text", "q"], "'pretrain' checkpoint"),
        (["--checkpoint", str(vqa_run), "--image", str(bad), "--image2", str(bad), "--text", "q"], "only for nlvr2"),
        (["--checkpoint", str(tmp_path), "--image", str(bad), "--text", "q"], "no published checkpoint"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["predict", *args]) == 2, args
        assert message in capsys.readouterr().err, (args, message)


def test_evaluate_pretraining_reports_itm_and_mlm_accuracy(tiny_pretrained, task_shards, tmp_path, capsys):
    out = tmp_path / "pretrain-val.json"
    assert main(["evaluate", "--task", "pretrain", "--checkpoint", str(tiny_pretrained), "--data", str(task_shards),
                 "--out", str(out), "--split", "val"]) == 0
    report = json.loads(out.read_text())
    _, index = load_index(str(task_shards), "pretrain")
    assert report["task"] == "pretrain" and report["num_examples"] == index["splits"]["val"]["num_samples"]
    assert set(report["metrics"]) == {"acc_itm", "acc_mlm"}
    assert all(0.0 <= v <= 1.0 for v in report["metrics"].values())
