"""Pre-training end to end: the CLI, checkpoints and resume, real torchrun processes,
and a tiny run that must actually learn."""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from soho_core.cli import main
from soho_core.config import load_config
from soho_core.data.tokenizer import build_tokenizer
from soho_core.train.checkpoint import load_checkpoint
from soho_core.tasks.catalog import get_task
from soho_core.train.engine import evaluate, train
from soho_core.train.tracking import read_metrics

REQUIRED = {"step", "loss_mlm", "loss_mvm", "loss_itm", "acc_itm", "vd_usage", "vd_perplexity"}


def test_cli_pretrain_writes_metrics_and_checkpoint_then_resumes(shard_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--config", "tiny", "--data", str(shard_root), "--out", str(out),
            "--set", "train.log_every=2", "--set", "train.ckpt_every=2", "--set", "data.images_per_batch=4"]
    assert main(args + ["--max-steps", "4"]) == 0
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == [2, 4]
    assert REQUIRED <= set(rows[0])
    ckpt = load_checkpoint(str(out))
    assert ckpt["step"] == 4 and ckpt["config"]["preset"] == "tiny"
    assert any("dictionary" in k for k in ckpt["model"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest.json", "step-00000002.pt", "step-00000004.pt"]

    assert main(args + ["--max-steps", "6"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(str(out))] == [2, 4, 6]
    assert load_checkpoint(str(out))["step"] == 6
    # keep_checkpoints=2: the oldest is pruned
    assert not (out / "checkpoints" / "step-00000002.pt").exists()


def test_cli_bad_input_is_a_clear_error_before_work(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["pretrain", "--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"{missing}/pretrain/index.json" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(missing), "--out", str(tmp_path / "o"), "--set", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_torchrun_processes_keep_bit_identical_dictionaries(shard_root, tmp_path):
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).parent / "scripts" / "dist_pretrain.py"), str(shard_root), str(out), "6"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(out / "dictionary-rank0.pt", weights_only=True)
    r1 = torch.load(out / "dictionary-rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # the dictionary really moved away from its (identical) initial state
    init = load_config("tiny")
    torch.manual_seed(init.train.seed)
    from soho_core.models import SohoModel

    fresh = {k: v for k, v in SohoModel(init.model, len(build_tokenizer("synthetic"))).state_dict().items()
             if "dictionary" in k}
    emb = next(k for k in r0 if k.endswith("embedding"))
    assert not torch.equal(fresh[emb], r0[emb])
    assert [r["step"] for r in read_metrics(str(out))] == [2, 4, 6]  # rank 0 alone logs


@pytest.fixture(scope="module")
def tiny_learning_run(shard_root, tmp_path_factory):
    """600 steps at the tiny preset (about a minute on 2 cores): the training metrics, and ITM
    accuracy on the held-out images (val + test splits, never trained on)."""
    out = tmp_path_factory.mktemp("learn")
    cfg = load_config("tiny", ["train.max_steps=600", "train.log_every=50"])
    train(get_task("pretrain"), cfg, str(shard_root), str(out))
    rows = read_metrics(str(out))
    print(json.dumps(rows, indent=0))
    held = [evaluate(get_task("pretrain"), str(out), str(shard_root), None, split=s) for s in ("val", "test")]
    return rows, held


@pytest.mark.slow
def test_tiny_pretraining_learns_language_and_visual_words(tiny_learning_run):
    rows, _ = tiny_learning_run
    first, last = rows[0], rows[-1]
    chance_mlm = math.log(len(build_tokenizer("synthetic")))
    assert last["loss_mlm"] < min(first["loss_mlm"], 0.7 * chance_mlm), (first, last)
    assert last["loss_mvm"] < first["loss_mvm"], (first, last)
    assert last["vd_usage"] > 0.3 and last["vd_perplexity"] > 10, last  # no collapse onto a few words


@pytest.mark.slow
def test_tiny_pretraining_grounds_itm_in_the_image(tiny_learning_run):
    """Chance is 0.5: negatives are other images' captions, and every caption is MLM-masked alike,
    so only the image can tell a pair apart. It took an ITC loss and a width-scaled init
    (see presets._from_scratch) to get here from a CNN trained from scratch."""
    rows, held = tiny_learning_run
    assert rows[0]["acc_itm"] < 0.56, rows[0]  # it starts at chance ...
    late = [r["acc_itm"] for r in rows[-2:]]
    assert min(late) > 0.62, late  # ... and ends well above it, on the training images
    assert rows[-1]["acc_itc"] > 0.3, rows[-1]  # 8 images a batch: chance is 0.125
    # ... and on the images it never saw, val and test pooled: each split holds 13-16 images and about
    # 20 pairs, where one pair moves the score by 0.05 (on the world of version 2 the test split alone
    # scored 0.560 in a fresh-clone CI run, and above 0.57 in a run here on one thread).
    pairs = sum(r["num_examples"] for r in held)
    pooled = sum(r["metrics"]["acc_itm"] * r["num_examples"] for r in held) / pairs
    assert pooled > 0.57, held
    for result in held:
        # Grey images: on these 13-16 images the blind model scored 0.56-0.60, not 0.5 (the split's
        # matched/mismatched counts are uneven), so the image's own share is the gain, measured here.
        assert result["gain"] > 0, result


def test_cli_data_synth_and_shard(tmp_path, capsys):
    syn, shards = tmp_path / "syn", tmp_path / "shards"
    assert main(["data", "synth", "--out", str(syn), "--num-images", "20", "--seed", "3", "--image-size", "64"]) == 0
    assert main(["data", "shard", "--source", "synthetic", "--input", str(syn), "--out", str(shards),
                 "--shard-max-count", "8"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by_task = {p["task"]: p for p in printed if "task" in p}
    assert set(by_task) == {"pretrain", "retrieval", "vqa", "ve", "nlvr2"}
    assert sum(by_task["pretrain"]["num_samples"].values()) == 20
    assert (shards / "pretrain" / "index.json").exists()
    assert main(["data", "synth", "--out", str(syn), "--num-images", "0"]) == 2
    assert "num_images" in capsys.readouterr().err
    more = tmp_path / "more"
    assert main(["data", "synth", "--out", str(more), "--num-images", "20", "--seed", "3", "--image-size", "64",
                 "--questions-per-image", "8"]) == 0
    per_image = Counter(json.loads(line)["image_id"] for line in (more / "vqa.jsonl").read_text().splitlines())
    assert len(per_image) == 20 and max(per_image.values()) == 8 and sum(per_image.values()) > 4 * 20
    for name in ("scenes", "captions", "ve", "nlvr2"):  # the same scenes, captions and hypotheses
        assert (more / f"{name}.jsonl").read_text() == (syn / f"{name}.jsonl").read_text(), name
    assert main(["data", "synth", "--out", str(more), "--num-images", "20", "--questions-per-image", "0"]) == 2
    assert "questions_per_image" in capsys.readouterr().err


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "soho_core", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "pretrain" in proc.stdout and "data" in proc.stdout
