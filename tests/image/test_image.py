"""Inside the built image: the entrypoint, the user, the tools, and the folders KFP writes."""

from __future__ import annotations

import json

from podman_helpers import podman


def run_in(image: str, *command: str, entrypoint: str | None = None) -> str:
    args = ["run", "--rm"]
    if entrypoint is not None:
        args += ["--entrypoint", entrypoint]
    return podman(*args, image, *command).stdout


def test_default_command_is_soho_help(image):
    out = run_in(image)
    assert out.startswith("usage: soho"), out[:500]
    for command in ("pretrain", "finetune", "evaluate", "pipeline"):
        assert command in out


def test_runs_as_uid_1000_not_root(image):
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "1000"
    assert config["Entrypoint"] == ["soho"]
    assert run_in(image, "-c", "id -u; id -g; echo $HOME", entrypoint="sh").split() == ["1000", "1000", "/home/soho"]


def test_torch_kfp_and_torchrun_are_there(image):
    code = ("import torch, torchvision, kfp, kfp.kubernetes, kubernetes, s3fs, wandb, soho_core;"
            "print(torch.__version__, kfp.__version__, soho_core.__version__)")
    torch_version, kfp_version, soho_version = run_in(image, "-c", code, entrypoint="python3").split()
    assert torch_version.startswith("2.14.1") and kfp_version.startswith("2.")
    assert "--nproc-per-node" in run_in(image, "--help", entrypoint="torchrun")
    # KFP runs a component as `python3 -m kfp.dsl.executor_main` on PATH: the venv's python.
    assert run_in(image, "-c", "for c in python3 python torchrun soho; do command -v $c; done", entrypoint="sh").split() == [
        "/opt/venv/bin/python3", "/opt/venv/bin/python", "/opt/venv/bin/torchrun", "/opt/venv/bin/soho"]


def test_kfp_artifact_folders_are_writable_by_the_user(image):
    script = "for d in /gcs /minio /s3; do mkdir -p $d/bucket/x && echo ok > $d/bucket/x/f && cat $d/bucket/x/f; done"
    assert run_in(image, "-c", script, entrypoint="sh").split() == ["ok", "ok", "ok"]
    # ... and nothing else at /: the user is not root in disguise.
    denied = podman("run", "--rm", "--entrypoint", "sh", image, "-c", "mkdir /elsewhere", check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
