"""`soho pretrain`, `soho finetune` and `soho evaluate` read shards from and write runs to S3
end to end: the real CLI against a real S3 server (moto) on loopback, nothing local in between."""

import json

import pytest

from soho_core.cli import main
from soho_core.data.shards import shard_synthetic


@pytest.mark.slow
def test_pretrain_finetune_evaluate_on_s3(s3_server, synthetic_dir, capsys):
    import fsspec

    shard_synthetic(str(synthetic_dir), "s3://soho/shards", tasks=["pretrain", "vqa"], max_count=40)
    assert main(["pretrain", "--config", "tiny", "--data", "s3://soho/shards", "--out", "s3://soho/runs/pre",
                 "--max-steps", "2", "--set", "train.log_every=1", "--set", "train.ckpt_every=2",
                 "--set", "data.num_workers=2"]) == 0  # shards read from S3 in dataloader worker processes
    assert main(["finetune", "--task", "vqa", "--init", "s3://soho/runs/pre", "--data", "s3://soho/shards",
                 "--out", "s3://soho/runs/vqa", "--max-steps", "2", "--set", "train.log_every=1"]) == 0
    assert main(["evaluate", "--task", "vqa", "--checkpoint", "s3://soho/runs/vqa", "--data", "s3://soho/shards",
                 "--out", "s3://soho/runs/vqa/metrics.json", "--set", "finetune.eval_max_images=8"]) == 0
    capsys.readouterr()

    fs = fsspec.filesystem("s3")
    for run in ("pre", "vqa"):
        latest = json.loads(fs.cat(f"soho/runs/{run}/checkpoints/latest.json"))
        assert latest["step"] == 2 and fs.size(f"soho/runs/{run}/checkpoints/{latest['file']}") > 10_000
        assert json.loads(fs.cat(f"soho/runs/{run}/config.json"))["preset"] == "tiny"
    steps = [json.loads(line)["step"] for line in fs.cat("soho/runs/pre/metrics.jsonl").decode().splitlines()]
    assert steps == [1, 2]
    assert fs.cat("soho/runs/vqa/metrics.jsonl").strip()
    metrics = json.loads(fs.cat("soho/runs/vqa/metrics.json"))
    assert metrics["task"] == "vqa" and metrics["split"] == "test" and 0 < metrics["num_examples"]
    assert 0.0 <= metrics["metrics"]["vqa_score"] <= 1.0
