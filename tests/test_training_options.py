"""Engine options: gradient accumulation, bf16 autocast on CPU, precision checks, S3 buckets, the
cores shared among a local run's processes."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from soho_core.config import ConfigError, load_config
from soho_core.tasks.catalog import get_task
from soho_core.train.checkpoint import load_checkpoint
from soho_core.train.engine import resolve_precision, train
from soho_core.train.tracking import read_metrics


def _tiny(*overrides: str):
    return load_config("tiny", ["data.images_per_batch=2", "train.log_every=2", "train.ckpt_every=100", *overrides])


def test_gradient_accumulation_takes_k_micro_batches_per_optimizer_step(shard_root, tmp_path):
    train(get_task("pretrain"), _tiny("train.max_steps=4", "train.grad_accum=3"), str(shard_root), str(tmp_path))
    state = load_checkpoint(str(tmp_path))
    assert {int(s["step"]) for s in state["optimizers"][0]["state"].values()} == {4}
    assert state["data"]["images_seen"] == 4 * 3 * 2
    rows = read_metrics(str(tmp_path))
    assert [r["images_seen"] for r in rows] == [2 * 3 * 2, 4 * 3 * 2]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_a_task_can_fine_tune_with_its_own_batch_size(task_shards, tiny_pretrained, tmp_path):
    """finetune.task_images_per_batch replaces data.images_per_batch for that task only."""
    per_task = ["finetune.max_steps=2", "finetune.task_images_per_batch.nlvr2=6"]
    for task, images in (("nlvr2", 6), ("vqa", 2)):
        out = tmp_path / task
        train(get_task(task), _tiny(*per_task), str(task_shards), str(out), init=str(tiny_pretrained))
        assert load_checkpoint(str(out))["config"]["data"]["images_per_batch"] == images
        assert read_metrics(str(out))[-1]["images_seen"] == 2 * images
    with pytest.raises(ConfigError, match="finetune.task_images_per_batch.ve"):
        load_config("tiny", ["finetune.task_images_per_batch.ve=0"])


def test_bf16_autocast_on_cpu_trains(shard_root, tmp_path):
    result = train(get_task("pretrain"), _tiny("train.max_steps=2", "train.precision=bf16"), str(shard_root),
                   str(tmp_path))
    assert math.isfinite(result.last_metrics["loss"])
    # Weights stay fp32 (autocast computes in bf16, the optimizer updates fp32 masters).
    weights = load_checkpoint(str(tmp_path))["model"].values()
    assert {v.dtype for v in weights if v.is_floating_point()} == {torch.float32}


def test_precision_is_resolved_per_device_and_fp16_needs_cuda():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="train.precision='fp16' needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.grad_accum"):
        load_config("tiny", ["train.grad_accum=0"])


def test_training_into_a_missing_bucket_is_an_error_naming_it(shard_root, s3_server):
    with pytest.raises(FileNotFoundError, match="'no-such-bucket' does not exist"):
        train(get_task("pretrain"), _tiny("train.max_steps=1"), str(shard_root), "s3://no-such-bucket/run")


def test_torch_compile_trains(shard_root, tmp_path):
    """torch.compile through the real engine (about a minute of compiling on this CPU)."""
    result = train(get_task("pretrain"), _tiny("train.max_steps=2", "train.compile=true"), str(shard_root),
                   str(tmp_path))
    assert math.isfinite(result.last_metrics["loss"])
    assert load_checkpoint(str(tmp_path))["step"] == 2


def test_cpu_share_gives_the_cores_to_the_processes_still_alive(tmp_path):
    from soho_core.train.cpushare import CpuShare

    before = torch.get_num_threads()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        CpuShare(str(tmp_path), cores=4, pid=other.pid)  # another process registered alongside
        (tmp_path / "not-a-process").write_text("")  # ignored
        me = CpuShare(str(tmp_path), cores=4, every_s=3600)
        assert me.rebalance(force=True) == 2 and torch.get_num_threads() == 2
        other.kill()
        other.wait()
        assert me.rebalance() == 2  # rebalanced at most every every_s ...
        assert me.rebalance(force=True) == 4 and torch.get_num_threads() == 4  # ... then the last one gets all
        assert not (tmp_path / str(other.pid)).exists()  # a dead process's file is removed
        me.close()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-process"]
    finally:
        other.kill()
        torch.set_num_threads(before)


def test_training_and_evaluation_register_in_the_cpu_share_while_they_run(shard_root, tmp_path, monkeypatch):
    from soho_core.env import CPU_SHARE
    from soho_core.train import cpushare
    from soho_core.train.engine import evaluate

    folder = tmp_path / "share"
    monkeypatch.setenv(CPU_SHARE, str(folder))
    seen = []
    real = cpushare.CpuShare.rebalance

    def spy(self, force=False):
        seen.append(sorted(p.name for p in folder.iterdir()))
        return real(self, force)

    monkeypatch.setattr(cpushare.CpuShare, "rebalance", spy)
    before = torch.get_num_threads()
    try:
        train(get_task("pretrain"), _tiny("train.max_steps=2"), str(shard_root), str(tmp_path / "run"))
        evaluate(get_task("pretrain"), str(tmp_path / "run"), str(shard_root), None, split="val")
        assert torch.get_num_threads() == (os.cpu_count() or 1)  # alone: every core
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 3 and all(s == [str(os.getpid())] for s in seen), seen  # 2 steps + the evaluation
    assert list(folder.iterdir()) == []  # each removed its file when it ended
