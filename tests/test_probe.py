"""`soho probe`: the CNN trained directly on each object's attributes (the image path's ceiling)."""

import json

import pytest
import torch

from soho_core.cli import main
from soho_core.config import load_config
from soho_core.probe import load_objects, object_features, probe


def test_object_features_read_the_cells_of_each_box():
    feats = torch.zeros(2, 1, 4, 4)
    feats[0, 0, 1, 2] = 5.0  # inside image 0's box (cells rows 0-1, cols 2-3)
    feats[0, 0, 3, 0] = 9.0  # outside it
    feats[1, 0, 3, 3] = 7.0  # image 1's box: the last cell only
    items = [{"objects": [{"box": (32, 0, 64, 32)}]}, {"objects": [{"box": (49, 49, 64, 64)}]}]
    assert object_features(feats, items, stride=16).flatten().tolist() == [5.0, 7.0]


def test_objects_scale_to_the_model_size(synthetic_dir):
    small = load_objects(str(synthetic_dir), 32, 32, splits=("test",), limit=3)["test"]
    full = load_objects(str(synthetic_dir), 64, 64, splits=("test",), limit=3)["test"]
    assert [it["image"].shape[1:] for it in small] == [(32, 32)] * 3
    assert small[0]["objects"][0]["box"] == pytest.approx([v / 2 for v in full[0]["objects"][0]["box"]])


def test_the_tiny_cnn_learns_colour_far_above_chance(synthetic_dir, tmp_path, capsys):
    """A ceiling that cannot fail would be no ceiling: colour, the easiest attribute, must be
    read from the CNN within 60 steps (it is, at 0.9+), far above the majority colour."""
    cfg = load_config("tiny", ["train.device=cpu"])
    result = probe(str(synthetic_dir), cfg, steps=60, eval_every=30)
    assert [row["step"] for row in result["curve"]] == [30, 60]
    last = result["curve"][-1]
    assert last["color"] >= 0.8 and result["chance"]["color"] < 0.35, result
    # From the CLI: the table printed and the same curve written as JSON.
    out = tmp_path / "probe.json"
    assert main(["probe", "--config", "tiny", "--data", str(synthetic_dir), "--steps", "2", "--eval-every", "1",
                 "--out", str(out)]) == 0
    assert "chance" in capsys.readouterr().out
    assert [row["step"] for row in json.loads(out.read_text())["curve"]] == [1, 2]


def test_shards_instead_of_a_world_are_named(task_shards, capsys):
    assert main(["probe", "--config", "tiny", "--data", str(task_shards), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "scenes.jsonl does not exist" in err and "soho data synth" in err


def test_the_probe_cnn_warm_starts_training(synthetic_dir, task_shards, tmp_path):
    """`soho probe --save-backbone` writes the trained CNN; a run with model.backbone.weights starts
    from exactly those weights (the CNN's rate at 0 keeps them), and a fine-tune from that run's
    checkpoint takes the checkpoint's CNN, not the file (which may be gone by then)."""
    from soho_core.tasks.catalog import get_task
    from soho_core.train.checkpoint import load_checkpoint
    from soho_core.train.engine import train

    cnn = tmp_path / "cnn.pt"
    assert main(["probe", "--config", "tiny", "--data", str(synthetic_dir), "--steps", "3", "--eval-every", "3",
                 "--save-backbone", str(cnn)]) == 0
    saved = torch.load(cnn, weights_only=True)["state"]
    run = tmp_path / "pre"
    result = train(get_task("pretrain"), load_config("tiny", ["train.max_steps=1", f"model.backbone.weights={cnn}",
                                                               "optim.backbone_lr=0"]), str(task_shards), str(run))
    # A CNN with no optimizer takes no gradient either: the backward pass stops at its output.
    cnn_params = list(result.model.trunk.backbone.parameters())
    assert all(p.grad is None and not p.requires_grad for p in cnn_params)
    assert any(p.grad is not None for p in result.model.trunk.fusion.parameters())
    state = load_checkpoint(str(run))["model"]
    conv = "trunk.backbone.stem.0.weight"
    assert torch.equal(state[conv], saved["stem.0.weight"])
    # Its batch norms keep the statistics they came with (features do not drift with the batch).
    assert torch.equal(state["trunk.backbone.stem.1.running_mean"], saved["stem.1.running_mean"])
    cnn.unlink()
    tuned = tmp_path / "vqa"
    train(get_task("vqa"), load_config("tiny", ["finetune.max_steps=1", "optim.backbone_lr=0"]),
          str(task_shards), str(tuned), init=str(run))
    assert torch.equal(load_checkpoint(str(tuned))["model"][conv], saved["stem.0.weight"])


def test_bad_backbone_weights_are_named_before_work_starts(task_shards, tmp_path, capsys):
    from soho_core.config import BackboneConfig
    from soho_core.models.backbone import Backbone, save_backbone_weights

    missing = tmp_path / "nope.pt"
    args = ["pretrain", "--config", "tiny", "--data", str(task_shards), "--out", str(tmp_path / "o"),
            "--max-steps", "1", "--set"]
    assert main([*args, f"model.backbone.weights={missing}"]) == 2
    assert "model.backbone.weights" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main([*args, f"model.backbone.weights={junk}"]) == 2
    assert "not a readable weights file" in capsys.readouterr().err
    # The CNN's rate at 0 from scratch, with nothing to start it from, would keep it random.
    assert main([*args[:-1], "--set", "optim.backbone_lr=0"]) == 2
    err = capsys.readouterr().err
    assert "optim.backbone_lr=0" in err and "model.backbone.weights" in err
    other = tmp_path / "stage3.pt"
    cfg = BackboneConfig(out_stage=3)
    save_backbone_weights(Backbone(cfg), cfg, str(other))
    assert main([*args, f"model.backbone.weights={other}"]) == 2
    err = capsys.readouterr().err
    assert "model.backbone.weights" in err and "to stage 3" in err and "to stage 4" in err
