"""`soho ablate` over seeds: parsing, the per-seed layout, mean and spread, resuming, the table."""

import json
import math

import pytest
import torch

from soho_core.ablate import format_table, parse_seeds, summarize
from soho_core.cli import main


def test_seeds_parse_and_bad_values_name_themselves(tmp_path, capsys):
    assert parse_seeds("0") == (0,)
    assert parse_seeds(" 2, 0 ,1") == (2, 0, 1)
    for bad, named in [("0,x", "'x'"), ("1.5", "'1.5'"), ("0,,1", "''"), ("", "give one or more"),
                       ("-1", "seed -1"), ("1,2,1", "seed 1 is given twice"), (str(2**32), f"seed {2**32}")]:
        with pytest.raises(ValueError, match="--seeds") as err:
            parse_seeds(bad)
        assert named in str(err.value), (bad, str(err.value))
    # From the CLI: exit 2 and the value named, before any training (no shards needed, nothing written).
    out = tmp_path / "ab"
    assert main(["ablate", "--config", "tiny", "--data", str(tmp_path / "no-shards"), "--out", str(out),
                 "--seeds", "0,one"]) == 2
    assert "--seeds '0,one': 'one' is not a whole number" in capsys.readouterr().err
    assert main(["ablate", "--config", "tiny", "--data", str(tmp_path / "no-shards"), "--out", str(out),
                 "--set", "train.seed=3"]) == 2
    assert "use --seeds 3" in capsys.readouterr().err
    assert not out.exists()


def _report(metric, blind=None, prior=None):
    baselines = {k: {"accuracy": v} for k, v in (("prior", prior), ("blind_model", blind)) if v is not None}
    gain = {"gain": metric - max(b["accuracy"] for b in baselines.values())} if baselines else {}
    return {"metrics": {"accuracy": metric}, "baselines": baselines, **gain}


def test_summary_and_table_by_hand():
    results = {"scratch": {"ve": [_report(0.50, 0.40, 0.30), _report(0.60, 0.50, 0.30)]},
               "no_vd": {"ve": [_report(0.70), _report(0.55)]},
               "soho": {"ve": [_report(0.65, 0.45, 0.30), _report(0.55, 0.45, 0.30)]}}
    s = summarize(results)
    cell = s["table"]["scratch"]["ve"]
    assert cell["values"] == [0.50, 0.60] and cell["n"] == 2
    assert cell["mean"] == pytest.approx(0.55) and cell["std"] == pytest.approx(math.sqrt(0.005))
    assert (cell["min"], cell["max"]) == (0.50, 0.60)
    assert cell["blind_model"] == pytest.approx(0.45) and cell["prior"] == pytest.approx(0.30)
    assert cell["gain"] == pytest.approx(((0.50 - 0.40) + (0.60 - 0.50)) / 2)
    no_vd = s["table"]["no_vd"]["ve"]
    assert no_vd["blind_model"] is None and no_vd["gain"] is None  # not measured: not invented
    # Paired by seed: soho - scratch = (+0.15, -0.05); soho - no_vd = (-0.05, 0.00).
    pre = s["effects"]["pretraining"]
    assert pre["of"] == "soho - scratch"
    assert pre["tasks"]["ve"]["values"] == pytest.approx([0.15, -0.05])
    assert pre["tasks"]["ve"]["mean"] == pytest.approx(0.05)
    assert pre["tasks"]["ve"]["std"] == pytest.approx(math.sqrt(0.02))
    assert pre["tasks"]["ve"]["positive"] == 1
    dic = s["effects"]["dictionary"]["tasks"]["ve"]
    assert dic["mean"] == pytest.approx(-0.025) and dic["positive"] == 0

    text = format_table(s)
    lines = text.splitlines()
    assert lines[0] == "| pre-training (2 seeds: mean ± std) | ve (accuracy) |"
    assert lines[2] == "| scratch | 0.550 ± 0.071 |"
    assert lines[3] == "| no_vd | 0.625 ± 0.106 |"
    assert lines[5] == "| pretraining effect: soho - scratch | +0.050 ± 0.141 (1/2 > 0) |"
    assert lines[6] == "| dictionary effect: soho - no_vd | -0.025 ± 0.035 (0/2 > 0) |"  # a loss reads as one
    # One seed: no spread to show; an effect needs both of its variants.
    one = summarize({"soho": {"ve": [_report(0.6)]}, "scratch": {"ve": [_report(0.5)]}})
    assert one["table"]["soho"]["ve"]["std"] is None and "dictionary" not in one["effects"]
    assert format_table(one).splitlines()[2:] == ["| soho | 0.600 |", "| scratch | 0.500 |",
                                                  "| pretraining effect: soho - scratch | +0.100 (1/1 > 0) |"]


def test_ablate_two_seeds_per_seed_folders_and_resume(task_shards, tmp_path, capsys):
    out = tmp_path / "ablation"
    argv = ["ablate", "--config", "tiny", "--data", str(task_shards), "--out", str(out), "--tasks", "ve",
            "--seeds", "0,1", "--set", "train.max_steps=2", "--set", "finetune.max_steps=2",
            "--set", "train.log_every=1", "--set", "data.images_per_batch=4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| pre-training (2 seeds: mean ± std) | ve (accuracy) |" in printed
    assert "| pretraining effect: soho - scratch |" in printed and "| dictionary effect: soho - no_vd |" in printed

    runs = [f"seed-{s}/{name}" for s in (0, 1) for name in ("pretrain-no_vd", "pretrain-soho",
                                                              "scratch-ve", "no_vd-ve", "soho-ve")]
    for run in runs:
        assert (out / run / "checkpoints").is_dir(), run
    for s in (0, 1):
        assert json.loads((out / f"seed-{s}/soho-ve/config.json").read_text())["train"]["seed"] == s
        assert json.loads((out / f"seed-{s}/pretrain-soho/config.json").read_text())["train"]["seed"] == s

    summary = json.loads((out / "ablation.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["runs"] == {"0": str(out / "seed-0"), "1": str(out / "seed-1")}
    for variant in ("scratch", "no_vd", "soho"):
        cell = summary["table"][variant]["ve"]
        reports = [json.loads((out / f"seed-{s}/{variant}-ve/metrics-test.json").read_text()) for s in (0, 1)]
        values = [r["metrics"]["accuracy"] for r in reports]
        assert cell["values"] == values and cell["n"] == 2
        mean = (values[0] + values[1]) / 2
        assert cell["mean"] == pytest.approx(mean)
        assert cell["std"] == pytest.approx(math.sqrt(((values[0] - mean) ** 2 + (values[1] - mean) ** 2) / 1))
        assert cell["blind_model"] == pytest.approx(sum(r["baselines"]["blind_model"]["accuracy"] for r in reports) / 2)
        assert cell["gain"] == pytest.approx(sum(r["gain"] for r in reports) / 2)
    soho, scratch = summary["table"]["soho"]["ve"]["values"], summary["table"]["scratch"]["ve"]["values"]
    assert summary["effects"]["pretraining"]["tasks"]["ve"]["values"] == pytest.approx(
        [soho[0] - scratch[0], soho[1] - scratch[1]])

    # The seed reaches the weights, not only config.json: the two scratch fine-tunes start apart.
    from soho_core.train.checkpoint import load_checkpoint

    w0, w1 = (load_checkpoint(str(out / f"seed-{s}/scratch-ve"))["model"] for s in (0, 1))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if w0[k].is_floating_point())

    # Interrupted: one evaluation is missing. A re-run redoes only that one and touches nothing else
    # (the pre-trainings whose fine-tunes are all evaluated are not even resumed); a kept evaluation
    # is read as it stands (here made to differ by seed, which two training steps do not).
    lost = out / "seed-1/scratch-ve/metrics-test.json"
    lost.unlink()
    kept = out / "seed-1/soho-ve/metrics-test.json"
    report = json.loads(kept.read_text())
    kept.write_text(json.dumps({**report, "metrics": {**report["metrics"], "accuracy": 0.9}}))
    watched = [p for p in out.rglob("*") if p.is_file() and p.name != "ablation.json"
               and not p.is_relative_to(out / "seed-1/scratch-ve")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    assert main(argv) == 0
    assert lost.exists()
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    again = json.loads((out / "ablation.json").read_text())
    v0 = soho[0]
    cell = again["table"]["soho"]["ve"]
    assert cell["values"] == [v0, 0.9]
    assert cell["mean"] == pytest.approx((v0 + 0.9) / 2) and cell["std"] == pytest.approx(abs(0.9 - v0) / math.sqrt(2))
    scratch = again["table"]["scratch"]["ve"]["values"]
    effect = again["effects"]["pretraining"]["tasks"]["ve"]
    diffs = [v0 - scratch[0], 0.9 - scratch[1]]
    assert effect["values"] == pytest.approx(diffs) and effect["mean"] == pytest.approx(sum(diffs) / 2)
    assert effect["std"] == pytest.approx(abs(diffs[0] - diffs[1]) / math.sqrt(2))
    assert f"| soho | {(v0 + 0.9) / 2:.3f} ± {abs(0.9 - v0) / math.sqrt(2):.3f} |" in capsys.readouterr().out

def test_seed_folders_and_an_ablation_from_before_seeds(tmp_path):
    from soho_core.ablate import seed_dir

    out = str(tmp_path)
    assert seed_dir(out, 0) == str(tmp_path / "seed-0") and seed_dir(out, 1) == str(tmp_path / "seed-1")
    (tmp_path / "soho-ve").mkdir()  # runs directly in DIR: written before seeds; they are seed 0
    assert seed_dir(out, 0) == out and seed_dir(out, 1) == str(tmp_path / "seed-1")
    (tmp_path / "seed-0").mkdir()
    assert seed_dir(out, 0) == str(tmp_path / "seed-0")
