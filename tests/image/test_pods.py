"""The pre-training job's pods, for real: each replica of a PyTorchJob runs as a container of the
built image (kubelet.py says what is taken from the job and what is added as the operator
would), on its own loopback address and host name, reading shards from and publishing
checkpoints to an S3 server on loopback. The Worker is killed mid-run and restarted as the
operator restarts it; the job must still end at exactly its planned step.

Two jobs: the one the launcher builds (the very dict it would send), and manifests/pretrain as
kustomize renders it, with its arguments cut to a test's budget (the one change, named below).
"""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from kube_helpers import kustomize
from kubelet import PyTorchJobRunner
from podman_helpers import ROOT, free_port, podman

MAX_STEPS, CKPT_EVERY = 16, 4
BUDGET = ["--set", "data.images_per_batch=4", "--set", "train.log_every=2",
          "--set", f"train.ckpt_every={CKPT_EVERY}"]


@pytest.fixture(scope="module")
def store(synthetic_dir, tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with bucket soho and the small world's pre-training shards
    at s3://soho/shards; yields (endpoint, boto3 client, the soho-s3 Secret's data)."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from soho_core.data.shards import shard_synthetic

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    secret = {"AWS_ACCESS_KEY_ID": "pods-test", "AWS_SECRET_ACCESS_KEY": "pods-test-secret", "AWS_ENDPOINT_URL": endpoint}
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**secret, "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="soho")
        shard_synthetic(str(synthetic_dir), "s3://soho/shards", tasks=["pretrain"], max_count=40)
        yield endpoint, client, secret
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def read_json(client, key: str) -> dict | None:
    try:
        return json.loads(client.get_object(Bucket="soho", Key=key)["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def run_with_a_killed_worker(runner: PyTorchJobRunner, client, run_prefix: str, timeout: float) -> int:
    """Run the job; once a checkpoint is published, SIGKILL the Worker's container. Returns the
    published step at the kill."""
    killed: list[int] = []

    def tick(job: PyTorchJobRunner) -> None:
        latest = read_json(client, f"{run_prefix}/checkpoints/latest.json")
        if not killed and latest and latest["step"] >= CKPT_EVERY:
            killed.append(latest["step"])
            job.kill(job.pods[1])

    start = time.monotonic()
    try:
        runner.run(timeout=timeout, on_tick=tick)
    finally:
        print(f"{runner.name}: {time.monotonic() - start:.0f} s, exit codes "
              f"{ {p.name: p.exit_codes for p in runner.pods} }\n{runner.logs(tail=15)}")
        runner.delete()
    assert killed, "the job ended before its first checkpoint: nothing was killed"
    return killed[0]


def assert_ended_at_the_planned_step(client, run_prefix: str, step_at_kill: int, nodes: int, procs: int) -> None:
    import torch

    latest = read_json(client, f"{run_prefix}/checkpoints/latest.json")
    assert latest["step"] == MAX_STEPS, latest
    assert step_at_kill < MAX_STEPS, "the kill came after the last step: nothing was tested"
    body = client.get_object(Bucket="soho", Key=f"{run_prefix}/checkpoints/{latest['file']}")["Body"].read()
    state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=False)
    assert state["step"] == MAX_STEPS
    assert len(state["rng"]) == nodes * procs, "every process of every replica trained to the end"
    lines = client.get_object(Bucket="soho", Key=f"{run_prefix}/metrics.jsonl")["Body"].read().decode().splitlines()
    records = [json.loads(line) for line in lines]
    resumes = [r for r in records if r.get("event") == "resume"]
    assert resumes and resumes[0]["step"] >= step_at_kill - CKPT_EVERY, records[-5:]
    assert max(r["step"] for r in records if "loss" in r) == MAX_STEPS


@pytest.mark.slow
def test_launcher_pytorchjob_trains_across_two_containers_and_survives_a_killed_worker(image, store, tmp_path):
    from soho_core.launch import soho_args
    from soho_core.launch.pytorchjob import JobSpec, build_pytorchjob

    endpoint, client, secret = store
    args = soho_args("pretrain", "tiny", "s3://soho/shards", "s3://soho/runs/launcher",
                     ["data.images_per_batch=4", "train.log_every=2", f"train.ckpt_every={CKPT_EVERY}",
                      f"train.max_steps={MAX_STEPS}"])
    job = build_pytorchjob(JobSpec(name="soho-pretrain-pods", namespace="soho", image=image, soho_args=args,
                                   nodes=2, procs_per_node=1, cpu_per_node="1", memory_per_node="4Gi",
                                   shm_size="512Mi"))
    runner = PyTorchJobRunner(job, secrets={"soho-s3": secret}, config_maps={}, workdir=tmp_path)
    assert [p.name for p in runner.pods] == ["soho-pretrain-pods-master-0", "soho-pretrain-pods-worker-0"]
    step_at_kill = run_with_a_killed_worker(runner, client, "runs/launcher", timeout=600)
    master, worker = runner.pods
    assert worker.exit_codes == [137, 0] and worker.restarts == 1, "restarted once, as restartPolicy ExitCode does"
    assert master.exit_codes == [0] and master.restarts == 0, "the Master rode out the Worker's restart"
    assert_ended_at_the_planned_step(client, "runs/launcher", step_at_kill, nodes=2, procs=1)


@pytest.mark.slow
def test_manifest_pytorchjob_trains_across_two_containers_and_survives_a_killed_worker(image, store, tmp_path):
    """manifests/pretrain as `kubectl apply -k` would send it, with the ConfigMap soho-defaults
    of manifests/base, and one change: appended to the command, arguments that cut the demo
    preset's 1,000 steps to this test's budget (the tiny preset, 16 steps)."""
    import components

    (job,) = [doc for doc in kustomize(ROOT / "manifests" / "pretrain") if doc["kind"] == "PyTorchJob"]
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in kustomize(ROOT / "manifests" / "base") if doc["kind"] == "ConfigMap"}
    assert config_maps["soho-defaults"]["SOHO_STORE_ROOT"] == "s3://soho"
    # The manifest names components.IMAGE; a CPU-only cluster pushes the CPU build under it.
    podman("tag", image, components.IMAGE)
    endpoint, client, secret = store
    target = "shards/synthetic-n2000-s0-px128-q16/"  # where the manifest's --data points
    for obj in client.list_objects_v2(Bucket="soho", Prefix="shards/")["Contents"]:
        if obj["Key"].startswith(target):
            continue
        client.copy_object(Bucket="soho", Key=target + obj["Key"][len("shards/"):],
                           CopySource={"Bucket": "soho", "Key": obj["Key"]})
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        (container,) = replica["template"]["spec"]["containers"]
        container["command"] += ["--config", "tiny", "--max-steps", str(MAX_STEPS), *BUDGET]
    runner = PyTorchJobRunner(job, secrets={"soho-s3": secret}, config_maps=config_maps, workdir=tmp_path)
    nodes, procs = len(runner.pods), int(job["spec"]["nprocPerNode"])
    assert nodes == 2 and procs == 2
    prefix = "runs/soho-pretrain/pretrain"
    step_at_kill = run_with_a_killed_worker(runner, client, prefix, timeout=600)
    master, worker = runner.pods
    assert worker.exit_codes == [137, 0] and master.exit_codes == [0]
    assert_ended_at_the_planned_step(client, prefix, step_at_kill, nodes=nodes, procs=procs)
