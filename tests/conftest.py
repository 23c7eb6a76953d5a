import os
import socket
import sys

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The venv's tools first (kubectl from the test extra, soho, torchrun), also when pytest is run
# as .venv/bin/python -m pytest without the venv activated.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
# wandb costs ~3 s a training; the tracking tests turn it on (offline) where they check it.
os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A small synthetic world at 64 px (the tiny preset's size)."""
    from soho_core.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("synthetic")
    synthesize(str(out), num_images=160, seed=0, image_size=64, min_objects=1, max_objects=2)
    return out


@pytest.fixture(scope="session")
def shard_root(synthetic_dir, tmp_path_factory):
    from soho_core.data.shards import shard_synthetic

    out = tmp_path_factory.mktemp("shards")
    shard_synthetic(str(synthetic_dir), str(out), max_count=40)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3 HTTP server (moto) on loopback; endpoint and keys only via AWS_* variables."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="soho")
    import fsspec

    fsspec.config.conf.pop("s3", None)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="session")
def task_shards(synthetic_dir, tmp_path_factory):
    """Shards of every task (pretrain, retrieval, vqa, ve, nlvr2) from the small world."""
    from soho_core.data.shards import shard_synthetic

    out = tmp_path_factory.mktemp("task_shards")
    shard_synthetic(str(synthetic_dir), str(out), max_count=40)
    return out


@pytest.fixture(scope="session")
def tiny_pretrained(task_shards, tmp_path_factory):
    """A tiny pre-training run (a few steps) to initialise fine-tuning from."""
    from soho_core.config import load_config
    from soho_core.tasks.catalog import get_task
    from soho_core.train.engine import train

    out = tmp_path_factory.mktemp("tiny_pretrain")
    train(get_task("pretrain"), load_config("tiny", ["train.max_steps=4", "train.log_every=2"]),
          str(task_shards), str(out))
    return out


@pytest.fixture(scope="session")
def pytorchjob_crd():
    """The PyTorchJob CRD of the Kubeflow training operator v1.9.0 (``shared/schemas`` beside the
    repository): the object a cluster checks PyTorchJobs against. Fails where it is absent."""
    from pathlib import Path

    import yaml

    name = "kubeflow.org_pytorchjobs.v1.9.0.yaml"
    for path in (Path(__file__).resolve().parents[2] / "shared" / "schemas" / name,
                 Path("/work/shared/schemas") / name):
        if path.exists():
            return yaml.safe_load(path.read_text())
    pytest.fail(f"the PyTorchJob CRD {name} is not beside the repository (shared/schemas/)")
