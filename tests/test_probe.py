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
