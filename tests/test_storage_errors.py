"""S3 errors a person can act on: no credentials, an endpoint that does not answer, access denied
and a missing bucket each end `soho` (and a pipeline step) with one line naming the URI and what
to set, before any work. Against the real S3 server (moto) on loopback, which enforces IAM keys
and policies once its authentication is switched on."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from soho_core import storage
from soho_core.cli import main
from conftest import free_port

SECRET = "s3cr3t-never-printed"


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("soho: error: "), err
    return lines[0]


def _no_credentials(monkeypatch, tmp_path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # Neither this machine's ~/.aws nor the EC2 metadata service may supply keys.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def iam_keys(s3_server):
    """Switches on the server's authentication after making two IAM users: ``none`` (no policy)
    and ``reader`` (may list and read bucket soho, not write). Returns their keys by name."""
    import uuid

    import boto3
    import requests

    iam = boto3.client("iam", endpoint_url=s3_server)
    keys = {}
    for name, actions in (("none", []), ("reader", ["s3:ListBucket", "s3:GetObject"])):
        user = f"{name}-{uuid.uuid4().hex[:8]}"  # moto keeps its IAM users from one server to the next
        iam.create_user(UserName=user)
        if actions:
            iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=json.dumps({
                "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions,
                                                        "Resource": ["arn:aws:s3:::soho", "arn:aws:s3:::soho/*"]}]}))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[name] = (key["AccessKeyId"], key["SecretAccessKey"])
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0").raise_for_status()  # every request signed from now
    yield keys
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf").raise_for_status()


def _use_keys(monkeypatch, key_id: str, secret: str) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


def test_no_credentials(s3_server, monkeypatch, tmp_path, capsys):
    _no_credentials(monkeypatch, tmp_path)
    assert main(["pretrain", "--data", "s3://soho/shards", "--out", str(tmp_path / "run")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == ("soho: error: no S3 credentials for s3://soho/shards: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (on a cluster: in the Secret soho-s3)")
    assert not (tmp_path / "run").exists()


def test_one_key_only_is_no_credentials(s3_server, monkeypatch, tmp_path, capsys):
    _no_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    assert main(["data", "synth", "--out", "s3://soho/world"]) == 2
    assert "no S3 credentials for s3://soho/world" in _one_line(capsys.readouterr().err)


def test_unreachable_endpoint_fails_in_seconds(s3_server, monkeypatch, tmp_path, capsys):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    start = time.perf_counter()
    assert main(["finetune", "--task", "vqa", "--data", str(tmp_path), "--init", "s3://soho/runs/pre",
                 "--out", str(tmp_path / "run")]) == 2
    assert time.perf_counter() - start < 10
    line = _one_line(capsys.readouterr().err)
    assert line == (f"soho: error: cannot reach the S3 endpoint {endpoint} (connection refused or unknown host) "
                    f"for s3://soho/runs/pre: set AWS_ENDPOINT_URL to the S3 service's URL, or unset it for AWS S3 "
                    f"(on a cluster: in the Secret soho-s3)")


def test_an_endpoint_that_is_no_url(monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio:9000")
    assert main(["data", "synth", "--out", "s3://soho/world"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "s3://soho/world" in line and "minio:9000" in line and "set AWS_ENDPOINT_URL" in line


@pytest.mark.parametrize("user, why", [
    ("unknown", "this S3 service does not know AWS_ACCESS_KEY_ID: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "to its keys"),
    ("wrong secret", "AWS_SECRET_ACCESS_KEY is not the secret of AWS_ACCESS_KEY_ID: set the pair that belongs "
                     "together"),
    ("none", "these keys may not list it (AccessDenied): let them in the bucket's or the user's policy, or set "
             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to keys that may"),
])
def test_access_denied_to_read(iam_keys, user, why, monkeypatch, tmp_path, capsys):
    key_id, secret = {"unknown": ("AKIAUNKNOWN0000000", SECRET), "wrong secret": (iam_keys["reader"][0], SECRET),
                      "none": iam_keys["none"]}[user]
    _use_keys(monkeypatch, key_id, secret)
    assert main(["pretrain", "--data", "s3://soho/shards", "--out", str(tmp_path / "run")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == f"soho: error: S3 access to s3://soho/shards denied: {why} (on a cluster: in the Secret soho-s3)"
    assert secret not in line


def test_access_denied_to_write_is_found_before_work(iam_keys, monkeypatch, tmp_path, capsys):
    _use_keys(monkeypatch, *iam_keys["reader"])
    assert main(["pretrain", "--data", "s3://soho/shards", "--out", "s3://soho/runs/pre"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("soho: error: S3 access to s3://soho/runs/pre denied: these keys may not write to it "
                           "(AccessDenied)")


def test_missing_bucket(s3_server, tmp_path, capsys):
    import boto3

    assert main(["data", "shard", "--source", "synthetic", "--input", str(tmp_path),
                 "--out", "s3://no-such-bucket/shards"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == (f"soho: error: S3 bucket 'no-such-bucket' does not exist at {s3_server} (in "
                    f"s3://no-such-bucket/shards): create it, or fix the URI or AWS_ENDPOINT_URL (on a cluster: in "
                    f"the Secret soho-s3)")
    # Nothing made it: moto keeps one store per process, so other tests' buckets may be there.
    assert "no-such-bucket" not in [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]


def test_the_write_check_leaves_nothing_behind(s3_server):
    import boto3

    storage.check_access("s3://soho/runs/pre", write=True)
    storage.check_access("s3://soho", write=True)
    objects = boto3.client("s3").list_objects_v2(Bucket="soho").get("Contents", [])
    assert not [o["Key"] for o in objects if o["Key"].endswith(".soho-write-check")]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no credentials", "unreachable endpoint"])
def test_the_command_of_the_issue_prints_one_line(case, tmp_path):
    """`soho pretrain --data s3://bucket/shards` as a process: its whole stderr, logging included."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true"}
    if case == "unreachable endpoint":
        env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    done = subprocess.run([sys.executable, "-m", "soho_core.cli", "pretrain", "--data", "s3://bucket/shards",
                           "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    line = _one_line(done.stderr)
    assert "s3://bucket/shards" in line and "soho-s3" in line and SECRET not in line


@pytest.mark.slow
def test_a_pipeline_step_logs_one_line(s3_server, tmp_path):
    """The shard component's own container command (the one its pod runs), into a missing bucket."""
    from components.shard import shard

    container = shard.component_spec.implementation.container
    executor_input = {"inputs": {"parameterValues": {"dataset": "s3://soho/datasets/world",
                                                     "store_root": "s3://no-such-bucket", "task": "vqa"}},
                      "outputs": {"parameters": {"Output": {"outputFile": str(tmp_path / "Output")}},
                                  "outputFile": str(tmp_path / "executor_output.json")}}
    args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container.args]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # python3: this venv's
    done = subprocess.run([*container.command, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout
    assert _one_line(done.stderr) == (f"soho: error: S3 bucket 'no-such-bucket' does not exist at {s3_server} (in "
                                      f"s3://no-such-bucket): create it, or fix the URI or AWS_ENDPOINT_URL (on a "
                                      f"cluster: in the Secret soho-s3)")


def test_only_rank_0_of_a_torchrun_group_checks_the_store(s3_server, monkeypatch, tmp_path, capsys):
    """Every process of a torchrun group runs the CLI; its launcher checked the store already, and
    one probe per group is enough: ranks above 0 skip it (and meet a missing bucket later)."""
    checked: list[str] = []
    monkeypatch.setattr(storage, "check_access", lambda uri, write=False: checked.append(uri))
    args = ["data", "shard", "--source", "synthetic", "--input", str(tmp_path / "nothing"),
            "--out", "s3://soho/shards"]
    monkeypatch.setenv("RANK", "1")
    main(args)
    assert checked == []
    monkeypatch.setenv("RANK", "0")
    main(args)
    assert checked == [str(tmp_path / "nothing"), "s3://soho/shards"]
    capsys.readouterr()
