"""Training that survives: exact resume, a worker killed by SIGKILL, a writer killed mid-checkpoint,
and the storage server going away. Real processes throughout (torchrun with gloo, the `soho` CLI,
a moto S3 server on loopback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port
from soho_core.train.checkpoint import latest_checkpoint, load_checkpoint
from soho_core.train.tracking import read_metrics

TINY = ["--config", "tiny", "--set", "data.images_per_batch=4", "--set", "train.log_every=2"]


def soho(*args: str) -> list[str]:
    return [sys.executable, "-m", "soho_core", *args]


def child_env(**extra: str) -> dict[str, str]:
    # One thread per process: two workers share the two cores, and results do not depend on
    # how many threads a run happened to get.
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **extra}


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(soho(*args), env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def final_state(run: Path) -> dict:
    return load_checkpoint(str(run), map_location="cpu")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def adam_steps(state: dict) -> set[int]:
    return {int(s["step"]) for s in state["optimizers"][0]["state"].values()}


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{out[-3000:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def published_step(run: Path) -> int:
    marker = run / "checkpoints" / "latest.json"
    try:
        return json.loads(marker.read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: the torchrun agent and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def worker_with_rank(root: int, rank: int) -> int | None:
    """The trainer process of ``rank`` (not one of its data-loader workers, which inherit its
    environment: the trainer is the one whose parent is not of that rank)."""
    def is_rank(pid: int) -> bool:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        return f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID=" in b"\0".join(env)

    for pid in descendants(root):
        if is_rank(pid):
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if not is_rank(parent):
                return pid
    return None


def test_resumed_run_matches_an_uninterrupted_one_bit_for_bit(shard_root, tmp_path):
    """Stop at a checkpoint, start again with a longer --max-steps: the same weights as one run."""
    common = ["pretrain", *TINY, "--set", "train.ckpt_every=4", "--data", str(shard_root)]
    run_cli([*common, "--out", str(tmp_path / "whole"), "--max-steps", "12"])
    run_cli([*common, "--out", str(tmp_path / "split"), "--max-steps", "8"])
    proc = run_cli([*common, "--out", str(tmp_path / "split"), "--max-steps", "12"])
    assert "resuming from" in proc.stdout and "at step 8" in proc.stdout
    whole, split = final_state(tmp_path / "whole"), final_state(tmp_path / "split")
    assert_same_weights(whole, split)
    assert adam_steps(split) == {12}
    # The data position travels with the checkpoint.
    assert split["data"]["images_seen"] == whole["data"]["images_seen"] == 12 * 4
    events = [r for r in read_metrics(str(tmp_path / "split"), events=True) if r.get("event") == "resume"]
    assert [e["step"] for e in events] == [8]
    assert [r["step"] for r in read_metrics(str(tmp_path / "split"))] == list(range(2, 13, 2))


def test_sigkill_of_a_torchrun_worker_restarts_and_ends_as_if_never_killed(shard_root, tmp_path):
    steps = 32
    common = ["pretrain", *TINY, "--set", "train.ckpt_every=8", "--data", str(shard_root),
              "--max-steps", str(steps), "--nproc-per-node", "2"]
    killed_run = tmp_path / "killed"
    proc = subprocess.Popen(soho(*common, "--out", str(killed_run), "--max-restarts", "2"), env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: published_step(killed_run) >= 8, 240, "the first checkpoint", proc)
        victim = worker_with_rank(proc.pid, 1)
        assert victim is not None, "no rank-1 worker found under torchrun"
        step_at_kill = published_step(killed_run)
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert step_at_kill < steps, "the run finished before the kill: nothing was tested"
    assert "resuming from" in out

    reference = tmp_path / "reference"
    run_cli([*common, "--out", str(reference)])
    killed, ref = final_state(killed_run), final_state(reference)
    assert_same_weights(ref, killed)
    assert adam_steps(killed) == {steps}

    events = [r for r in read_metrics(str(killed_run), events=True) if r.get("event") == "resume"]
    assert len(events) == 1 and events[0]["restart"] == 1 and events[0]["step"] % 8 == 0, (events, out[-6000:])
    logged = read_metrics(str(killed_run))
    assert [r["step"] for r in logged] == list(range(2, steps + 1, 2))
    assert logged == [{**r, "time": logged[i]["time"], "samples_per_s": logged[i]["samples_per_s"],
                       "images_per_s": logged[i]["images_per_s"]}
                      for i, r in enumerate(read_metrics(str(reference)))]


def test_a_writer_killed_mid_checkpoint_leaves_the_previous_one_in_use(shard_root, tmp_path):
    run = tmp_path / "run"
    common = ["pretrain", *TINY, "--set", "train.ckpt_every=4", "--data", str(shard_root), "--out", str(run),
              "--max-steps", "12"]
    proc = subprocess.Popen(soho(*common), env=child_env(SOHO_FAULT_CHECKPOINT_PAUSE="8:120"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    folder = run / "checkpoints"
    try:
        wait_for(lambda: folder.exists() and any(p.name.startswith("step-00000008.pt.tmp-") for p in folder.iterdir()),
                 240, "the step-8 checkpoint write", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = [p for p in folder.iterdir() if ".tmp-" in p.name]
    assert [p.name[:21] for p in partial] == ["step-00000008.pt.tmp-"]
    assert published_step(run) == 4 and latest_checkpoint(str(run)).endswith("step-00000004.pt")
    assert load_checkpoint(str(run))["step"] == 4  # the partial file is never read

    proc2 = run_cli(common)
    assert "removed what an interrupted checkpoint write left" in proc2.stdout
    assert "at step 4" in proc2.stdout
    assert final_state(run)["step"] == 12
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_training_rides_out_a_storage_outage(shard_root, tmp_path):
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    s3.create_bucket(Bucket="soho")
    steps = 30
    proc = subprocess.Popen(
        soho("pretrain", *TINY, "--set", "train.ckpt_every=4", "--data", str(shard_root), "--out", "s3://soho/run",
             "--max-steps", str(steps)),
        env=child_env(**aws), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def published() -> int:
        try:
            return json.loads(s3.get_object(Bucket="soho", Key="run/checkpoints/latest.json")["Body"].read())["step"]
        except s3.exceptions.NoSuchKey:
            return -1

    try:
        wait_for(lambda: published() >= 4, 240, "the first checkpoint on S3", proc)
        step_at_outage = published()
        # The store goes away for a few seconds, then comes back with its data.
        server.stop()
        time.sleep(6)
        assert proc.poll() is None, "the run failed or finished during the outage"
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
        assert step_at_outage < steps
        assert published() == steps
        lines = s3.get_object(Bucket="soho", Key="run/metrics.jsonl")["Body"].read().decode().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(2, steps + 1, 2))  # no line lost
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.stop()


def test_retrying_rides_out_transient_errors_and_not_permanent_ones():
    from soho_core.storage import retrying

    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("connection refused")
        return "ok"

    assert retrying(flaky, "reading x", first_delay_s=0.01) == "ok" and len(calls) == 3
    with pytest.raises(ConnectionError):
        retrying(lambda: (_ for _ in ()).throw(ConnectionError("down")), "reading y", attempts=2, first_delay_s=0.01)
    missing = []
    with pytest.raises(FileNotFoundError):
        retrying(lambda: missing.append(1) or open("/nonexistent/file"), "reading z", first_delay_s=0.01)
    assert missing == [1]  # a missing file is not retried


def test_wandb_offline_run_continues_across_a_resume_and_its_failure_never_stops_training(shard_root, tmp_path):
    run = tmp_path / "run"
    common = ["pretrain", *TINY, "--set", "train.ckpt_every=4", "--data", str(shard_root), "--out", str(run)]
    offline = child_env(WANDB_MODE="offline", WANDB_RUN_GROUP="pipeline-run-7", WANDB_PROJECT="soho-test")
    offline.pop("WANDB_API_KEY", None)
    run_cli([*common, "--max-steps", "4"], env=offline)
    run_cli([*common, "--max-steps", "8"], env=offline)
    run_id = final_state(run)["tracking"]["wandb_run_id"]
    assert json.loads((run / "tracking.json").read_text())["wandb_run_id"] == run_id
    # Each start writes an offline run folder; both carry the one run id (`wandb sync` merges them).
    folders = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.endswith(f"-{run_id}") for f in folders), folders

    online_without_key = child_env(WANDB_MODE="online")
    online_without_key.pop("WANDB_API_KEY", None)
    proc = run_cli([*common[:-1], str(tmp_path / "run2"), "--max-steps", "4"], env=online_without_key)
    assert "wandb start failed" in proc.stderr and "metrics.jsonl only" in proc.stderr
    assert final_state(tmp_path / "run2")["step"] == 4


def test_a_training_stream_whose_shards_all_vanish_fails_instead_of_spinning(shard_root, tmp_path):
    import shutil

    from soho_core.config import load_config
    from soho_core.data.loader import DataUnavailableError
    from soho_core.data.pretrain_data import pretrain_loader
    from soho_core.data.tokenizer import build_tokenizer

    shards = tmp_path / "shards"
    shutil.copytree(shard_root, shards)
    cfg = load_config("tiny", ["data.unreadable_timeout_s=3", "data.images_per_batch=4"])
    batches = iter(pretrain_loader(str(shards), "train", cfg, build_tokenizer(cfg.model.fusion.tokenizer), seed=0))
    assert next(batches).images.shape[0] == 4
    for tar in (shards / "pretrain").glob("*.tar"):
        tar.unlink()  # the store loses the data mid-run
    started = time.monotonic()
    with pytest.raises(DataUnavailableError, match="no shard readable for 3 s"):
        for _ in range(10_000):
            next(batches)
    assert time.monotonic() - started < 30


def test_a_replaced_node_meets_the_others_in_the_trainers_store(monkeypatch):
    """With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (every training pod's setting) rank 0's trainer
    hosts a fresh store each round. A replaced pod counts its restarts from 0 while the others are
    at 1: their keys must still meet (tests/image/test_pods.py runs this with real pods). Under
    the agent's shared store (local torchrun) each attempt keeps its own prefix."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timedelta

    import torch.distributed as dist

    from conftest import free_port
    from soho_core.train.distributed import _attempt_store

    timeout = timedelta(seconds=3)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with ThreadPoolExecutor(1) as pool:  # the host waits for both ranks to connect
        hosting = pool.submit(_attempt_store, 0, 2, attempt=1, timeout=timeout)
        replaced = _attempt_store(1, 2, attempt=0, timeout=timeout)
        survivor = hosting.result()
    survivor.set("gloo/rank0", "here")
    assert replaced.get("gloo/rank0") == b"here"

    agent = dist.TCPStore("127.0.0.1", free_port(), 2, is_master=True, timeout=timeout, multi_tenant=True,
                          wait_for_workers=False)
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    _attempt_store(0, 2, attempt=2, timeout=timeout).set("gloo/rank0", "attempt 2")
    assert agent.get("soho/attempt-2/gloo/rank0") == b"attempt 2"
