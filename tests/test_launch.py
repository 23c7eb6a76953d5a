"""The PyTorchJob launcher: the object it builds validates against the training operator's
CRD, and the watch logic ends every way a job can end (Succeeded, Failed, timeout, deleted
under it, cancelled) correctly. There is no cluster here: a small in-memory stand-in for
the three ``CustomObjectsApi`` calls the watcher makes plays the operator."""

import copy
import json
import os
import signal
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes.client import ApiException
from kube_helpers import FakeClock

from soho_core.launch import soho_args
from soho_core.launch.pytorchjob import GROUP, PLURAL, VERSION, JobSpec, build_pytorchjob, job_name
from soho_core.launch.watch import (JobCancelled, JobFailed, JobTimeout, JobVanished, job_state, run_job)

CRD = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kubeflow.org_pytorchjobs.v1.9.0.yaml"
if not CRD.exists():
    CRD = Path("/work/shared/schemas/kubeflow.org_pytorchjobs.v1.9.0.yaml")


@pytest.fixture(scope="module")
def crd_validator():
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)
    assert crd["spec"]["group"] == GROUP and crd["spec"]["names"]["plural"] == PLURAL
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


def _spec(**kw):
    base = dict(name="soho-pretrain-run1", namespace="team-a", image="ghcr.io/soho-kubeflow/soho:0.1.0",
                soho_args=soho_args("pretrain", "res18", "s3://soho/shards/x", "s3://soho/runs/run1/pretrain",
                                    ["train.max_steps=10"]),
                nodes=3, procs_per_node=4, gpus_per_node=4,
                env={"WANDB_PROJECT": "soho", "WANDB_RUN_GROUP": "run1", "SOHO_PIPELINE_RUN_ID": "run1"})
    base.update(kw)
    return JobSpec(**base)


def test_pytorchjob_validates_against_the_crd(crd_validator):
    body = build_pytorchjob(_spec())
    errors = sorted(crd_validator.iter_errors(body), key=str)
    assert not errors, "\n".join(e.message for e in errors)
    assert body["apiVersion"] == "kubeflow.org/v1" and body["kind"] == "PyTorchJob"
    replicas = body["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert body["spec"]["nprocPerNode"] == "4"
    for role in ("Master", "Worker"):
        pod = replicas[role]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch" and c["image"] == "ghcr.io/soho-kubeflow/soho:0.1.0"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert c["command"][:3] == ["python", "-m", "soho_core.launch.node"]  # checks, then torchrun
        assert replicas[role]["restartPolicy"] == "ExitCode"
        assert "--nnodes=3" in c["command"] and "--nproc-per-node=4" in c["command"]
        assert c["command"][c["command"].index("soho_core") + 1:] == _spec().soho_args
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        # Credentials only by reference to Secrets, never as values.
        assert c["envFrom"] == [{"secretRef": {"name": "soho-s3"}}]
        wandb = next(e for e in c["env"] if e["name"] == "WANDB_API_KEY")
        assert wandb == {"name": "WANDB_API_KEY",
                         "valueFrom": {"secretKeyRef": {"name": "soho-wandb", "key": "WANDB_API_KEY", "optional": True}}}
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["WANDB_RUN_GROUP"] == "run1" and env["SOHO_PIPELINE_RUN_ID"] == "run1"


def test_gpu_nodes_get_tolerations_and_a_node_selector(crd_validator):
    taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    evict = {"key": "spot", "operator": "Equal", "value": "y", "effect": "NoExecute", "tolerationSeconds": 60}
    body = build_pytorchjob(_spec(tolerations=[taint, evict], node_selector={"gpu": "h100"}))
    assert not list(crd_validator.iter_errors(body))
    for replica in body["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["tolerations"] == [taint, evict] and pod["nodeSelector"] == {"gpu": "h100"}
    pod = build_pytorchjob(_spec())["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "tolerations" not in pod and "nodeSelector" not in pod


def test_the_image_by_digest_with_its_pull_policy_and_secret(crd_validator):
    image = "ghcr.io/soho-kubeflow/soho@sha256:" + "ab" * 32
    body = build_pytorchjob(_spec(image=image, image_pull_policy="Always", image_pull_secret="regcred"))
    assert not list(crd_validator.iter_errors(body))
    for replica in body["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert (pod["containers"][0]["image"], pod["containers"][0]["imagePullPolicy"]) == (image, "Always")
    assert "imagePullSecrets" not in build_pytorchjob(_spec())["spec"]["pytorchReplicaSpecs"]["Master"]["template"][
        "spec"]


def test_single_node_cpu_job_has_no_workers_and_no_gpus(crd_validator):
    body = build_pytorchjob(_spec(nodes=1, procs_per_node=2, gpus_per_node=0, cpu_per_node="4"))
    assert not list(crd_validator.iter_errors(body))
    replicas = body["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master"}
    c = replicas["Master"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert {"name": "OMP_NUM_THREADS", "value": "2"} in c["env"]


def test_the_schema_check_can_fail(crd_validator):
    body = build_pytorchjob(_spec())
    bad = copy.deepcopy(body)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "two"
    assert list(crd_validator.iter_errors(bad))
    del bad["spec"]["pytorchReplicaSpecs"]
    assert any("pytorchReplicaSpecs" in e.message for e in crd_validator.iter_errors(bad))


@pytest.mark.parametrize("change, word", [
    ({"name": "Soho_Pretrain"}, "name"), ({"nodes": 0}, "nodes"), ({"gpus_per_node": 2}, "procs_per_node"),
    ({"memory_per_node": "lots"}, "memory_per_node"), ({"env": {"AWS_SECRET_ACCESS_KEY": "x"}}, "credential"),
    ({"tolerations": [{"key": "gpu", "taint": "x"}]}, "toleration"), ({"node_selector": {"gpus": 8}}, "gpus=8"),
    ({"image": "ghcr.io/soho-kubeflow/soho"}, "neither a tag nor a digest"), ({"image_pull_policy": "Sometimes"}, "pull"),
    ({"image_pull_secret": "Reg_Cred"}, "pull secret"),
])
def test_bad_job_specs_are_named(change, word):
    with pytest.raises(ValueError, match=word):
        build_pytorchjob(_spec(**change))


def test_job_names_are_dns_labels_and_stable():
    a = job_name("soho-pretrain", "1F0E3C2A-8A4B-4C5D-9E6F-0123456789AB")
    assert a == job_name("soho-pretrain", "1F0E3C2A-8A4B-4C5D-9E6F-0123456789AB")
    assert len(a) <= 63 and a == a.lower() and a.startswith("soho-pretrain-1f0e3c2a")


def test_soho_args_reject_bad_input():
    assert soho_args("finetune", "tiny", "D", "O", ["a.b=1"], init="I", task="vqa") == [
        "finetune", "--task", "vqa", "--config", "tiny", "--data", "D", "--out", "O", "--init", "I", "--set", "a.b=1"]
    with pytest.raises(ValueError, match="evaluate"):
        soho_args("evaluate", "tiny", "D", "O")
    with pytest.raises(ValueError, match="lr"):
        soho_args("pretrain", "tiny", "D", "O", ["lr"])


# --------------------------------------------------------------------------- the watcher


class FakeCustomObjects:
    """The three CustomObjectsApi calls the watcher makes, over a dict of jobs. ``script`` lists
    the conditions the operator reports on successive reads; ``None`` means the job is gone."""

    def __init__(self, script, existing=False):
        self.script = list(script)
        self.jobs = {}
        self.created = self.deleted = 0
        self.existing = existing

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == (GROUP, VERSION, PLURAL)
        key = (namespace, body["metadata"]["name"])
        if self.existing or key in self.jobs:
            self.jobs.setdefault(key, copy.deepcopy(body))
            raise ApiException(status=409, reason="AlreadyExists")
        self.jobs[key] = copy.deepcopy(body)
        self.created += 1
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        key = (namespace, name)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if step is None:
            self.jobs.pop(key, None)
        if key not in self.jobs:
            raise ApiException(status=404, reason="NotFound")
        self.jobs[key]["status"] = {"conditions": step, "replicaStatuses": {"Master": {"active": 1}}}
        return copy.deepcopy(self.jobs[key])

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, body=None):
        if self.jobs.pop((namespace, name), None) is None:
            raise ApiException(status=404, reason="NotFound")
        self.deleted += 1


def cond(kind, status="True", reason="", message=""):
    return {"type": kind, "status": status, "reason": reason, "message": message}


CREATED = [cond("Created")]
RUNNING = CREATED + [cond("Running")]
SUCCEEDED = RUNNING[:1] + [cond("Running", "False"), cond("Succeeded", reason="PyTorchJobSucceeded")]
FAILED = RUNNING[:1] + [cond("Running", "False"),
                        cond("Failed", reason="PyTorchJobFailed", message="master-0 exited with code 1")]


def _run(api, timeout_s=600.0, clock=None):
    clock = clock or FakeClock()
    lines = []
    body = build_pytorchjob(_spec())
    state = run_job(api, body, timeout_s=timeout_s, poll_s=10, log=lines.append, clock=clock, sleep=clock.sleep)
    return state, lines


def test_watch_succeeded_streams_each_state_once():
    api = FakeCustomObjects([CREATED, RUNNING, RUNNING, RUNNING, SUCCEEDED])
    state, lines = _run(api)
    assert state.phase == "Succeeded" and api.created == 1 and api.deleted == 0
    phases = [line.split(": ")[1].split()[0] for line in lines if line.startswith("PyTorchJob ")]
    assert phases == ["Created", "Running", "Succeeded"]


def test_watch_failed_raises_with_the_operator_message_and_keeps_the_job():
    api = FakeCustomObjects([CREATED, RUNNING, FAILED])
    with pytest.raises(JobFailed, match="master-0 exited with code 1"):
        _run(api)
    assert api.deleted == 0 and len(api.jobs) == 1  # kept for its logs; the operator's TTL removes it


def test_watch_timeout_deletes_the_job():
    api = FakeCustomObjects([CREATED, RUNNING])
    clock = FakeClock()
    with pytest.raises(JobTimeout, match="within 60 s"):
        _run(api, timeout_s=60, clock=clock)
    assert api.deleted == 1 and not api.jobs
    assert clock.now == pytest.approx(60)


def test_watch_vanished_job_fails_the_step():
    api = FakeCustomObjects([CREATED, RUNNING, None])
    with pytest.raises(JobVanished, match="disappeared.*last state: Running"):
        _run(api)


def test_cancel_by_sigterm_deletes_the_job():
    api = FakeCustomObjects([CREATED, RUNNING])
    clock = FakeClock()

    def sleep(s):
        clock.sleep(s)
        if clock.now >= 30:
            os.kill(os.getpid(), signal.SIGTERM)  # what Kubeflow sends the step's pod on cancel

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(JobCancelled):
        run_job(api, build_pytorchjob(_spec()), timeout_s=3600, poll_s=10, log=lambda s: None,
                clock=clock, sleep=sleep)
    assert api.deleted == 1 and not api.jobs
    assert signal.getsignal(signal.SIGTERM) is before


def test_retried_step_adopts_the_existing_job():
    api = FakeCustomObjects([RUNNING, SUCCEEDED], existing=True)
    state, lines = _run(api)
    assert state.phase == "Succeeded" and api.created == 0
    assert any("already exists" in line for line in lines)


def test_terminal_condition_wins_over_later_ones():
    obj = {"status": {"conditions": [cond("Created"), cond("Succeeded"), cond("Running", "True")]}}
    assert job_state(obj).phase == "Succeeded"
    assert job_state({}).phase == "Pending"


class FakePodLogs:
    """``CoreV1Api.read_namespaced_pod_log`` over a clock: ``lines`` maps a time to the lines the
    pod printed then; a read returns those of the last ``since_seconds``, timestamped, or raises
    ``errors[time]`` (an ApiException status) at those times."""

    def __init__(self, lines, clock=None, errors=None):
        self.lines, self.clock, self.errors = lines, clock, errors or {}
        self.reads = []

    def read_namespaced_pod_log(self, name, namespace, timestamps=False, since_seconds=None):
        now = self.clock() if self.clock else 0.0
        self.reads.append((name, namespace, since_seconds))
        if now in self.errors:
            raise ApiException(status=self.errors[now], reason="error")
        out = []
        for t in sorted(self.lines):
            if now - since_seconds <= t <= now:
                stamp = f"2026-11-23T10:{int(t) // 60:02d}:{int(t) % 60:02d}.000000000Z"
                out += [f"{stamp} {line}" for line in self.lines[t]]
        return "\n".join(out)


def test_master_pod_log_lines_reach_the_step_log_once_each_in_order():
    clock = FakeClock()
    # The job runs for three polls (0, 10, 20 s); the pod prints across the windows, two lines
    # with one timestamp, and is not there yet at the first poll (400: container creating).
    pod = FakePodLogs({5.0: ["step 10 loss 7.1"], 12.0: ["step 20 loss 6.0", "step 20 again"],
                       20.0: ["done"]}, clock=clock, errors={0.0: 400})
    api = FakeCustomObjects([CREATED, RUNNING, SUCCEEDED])
    lines = []
    run_job(api, build_pytorchjob(_spec()), timeout_s=600, poll_s=10, log=lines.append, clock=clock,
            sleep=clock.sleep, core_api=pod)
    printed = [line for line in lines if line.startswith("[")]
    assert printed == [f"[{_spec().name}-master-0] {m}" for m in
                       ("step 10 loss 7.1", "step 20 loss 6.0", "step 20 again", "done")]
    assert any("Succeeded" in line for line in lines)


def test_pod_log_errors_other_than_not_ready_stop_following_but_not_the_watch():
    clock = FakeClock()
    pod = FakePodLogs({}, clock=clock, errors={0.0: 403})
    api = FakeCustomObjects([RUNNING, SUCCEEDED])
    lines = []
    state = run_job(api, build_pytorchjob(_spec()), timeout_s=600, poll_s=10, log=lines.append, clock=clock,
                    sleep=clock.sleep, core_api=pod)
    assert state.phase == "Succeeded"
    assert sum("cannot read the logs" in line for line in lines) == 1 and len(pod.reads) == 1


def test_pipeline_pretrain_step_launches_a_valid_job(monkeypatch, crd_validator, tmp_path, s3_server):
    """The pretrain step with launcher=pytorchjob: the job it submits validates, trains on the step's
    shards into the run's folder, and carries the run id as the wandb group."""
    from soho_core.pipeline import steps

    api = FakeCustomObjects([SUCCEEDED])
    monkeypatch.setattr(steps, "kubernetes_api", lambda: api)
    core = FakePodLogs({})
    monkeypatch.setattr(steps, "kubernetes_core_api", lambda: core)
    out = steps.pretrain("tiny", "s3://soho/shards/x", "s3://soho", "run-42", ["train.max_steps=3"],
                         launcher="pytorchjob", nodes=2, procs_per_node=1, gpus_per_node=1,
                         image="img:1", namespace="team-a", wandb_project="proj")
    assert out == "s3://soho/runs/run-42/pretrain"
    ((key, body),) = api.jobs.items()
    assert key == ("team-a", "soho-pretrain-run-42")
    assert not list(crd_validator.iter_errors(body))
    c = body["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    cmd = c["command"][c["command"].index("soho_core") + 1:]
    assert cmd == ["pretrain", "--config", "tiny", "--data", "s3://soho/shards/x", "--out", out,
                   "--set", "train.max_steps=3"]
    assert core.reads and core.reads[0][:2] == ("soho-pretrain-run-42-master-0", "team-a")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["WANDB_RUN_GROUP"] == "run-42" and env["WANDB_PROJECT"] == "proj"
    # The GPU nodes' scheduling settings reach pods that ask for GPUs, and only those.
    taint = [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    for gpus in (1, 0):
        api.jobs.clear()
        steps.pretrain("tiny", "s3://soho/shards/x", "s3://soho", "run-42", launcher="pytorchjob", gpus_per_node=gpus,
                       image="img:1", namespace="team-a", tolerations=taint, node_selector={"gpu": "h100"})
        (body,) = api.jobs.values()
        pod = body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        assert (pod.get("tolerations"), pod.get("nodeSelector")) == ((taint, {"gpu": "h100"}) if gpus else (None, None))
    # The image's pull policy and Secret reach the job's pods.
    api.jobs.clear()
    steps.pretrain("tiny", "s3://soho/shards/x", "s3://soho", "run-42", launcher="pytorchjob", image="img:1",
                   namespace="team-a", image_pull_policy="Always", image_pull_secret="regcred")
    (body,) = api.jobs.values()
    pod = body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["containers"][0]["imagePullPolicy"] == "Always" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    with pytest.raises(ValueError, match="launcher"):
        steps.pretrain("tiny", "D", str(tmp_path), "r", launcher="slurm")
    with pytest.raises(ValueError, match="nodes=2"):
        steps.pretrain("tiny", "D", str(tmp_path), "r", launcher="torchrun", nodes=2)


def _finish(monkeypatch, tmp_path, api, state, launcher="pytorchjob"):
    """The exit handler's step against ``api`` (None: no call to the Kubernetes API is allowed);
    returns what it wrote to the store."""
    from soho_core.pipeline import steps

    def connect():
        assert api is not None, "the Kubernetes API was called"
        return api

    monkeypatch.setattr(steps, "kubernetes_api", connect)
    uri = steps.finish_run(str(tmp_path), "run-42", state, "Task exit-handler-1 failed.", launcher=launcher,
                           namespace="team-a")
    assert uri == str(tmp_path / "runs" / "run-42" / "status.json")
    return json.loads(Path(uri).read_text())


def test_exit_handler_deletes_a_job_still_running_when_the_run_did_not_succeed(monkeypatch, tmp_path):
    body = build_pytorchjob(_spec(name="soho-pretrain-run-42"))
    api = FakeCustomObjects([RUNNING])
    api.jobs[("team-a", "soho-pretrain-run-42")] = body
    status = _finish(monkeypatch, tmp_path, api, "FAILED")
    assert api.deleted == 1 and not api.jobs
    assert status["deleted_jobs"] == ["PyTorchJob team-a/soho-pretrain-run-42"]
    assert (status["run_id"], status["state"], status["error"], status["report"]) == (
        "run-42", "FAILED", "Task exit-handler-1 failed.", "")
    # A job that has ended is kept (a failed one for its logs); a missing one is fine.
    api = FakeCustomObjects([FAILED])
    api.jobs[("team-a", "soho-pretrain-run-42")] = body
    assert _finish(monkeypatch, tmp_path, api, "FAILED")["deleted_jobs"] == [] and api.deleted == 0
    assert _finish(monkeypatch, tmp_path, FakeCustomObjects([RUNNING]), "CANCELED")["deleted_jobs"] == []


def test_exit_handler_after_success_or_torchrun_asks_no_cluster_and_records_the_report(monkeypatch, tmp_path):
    report = tmp_path / "runs" / "run-42" / "report" / "report.md"
    report.parent.mkdir(parents=True)
    report.write_text("# report")
    for state, launcher in (("SUCCEEDED", "pytorchjob"), ("FAILED", "torchrun")):
        status = _finish(monkeypatch, tmp_path, None, state, launcher)
        assert status["state"] == state and status["report"] == str(report) and status["deleted_jobs"] == []


def test_exit_handler_that_cannot_delete_records_it_then_fails(monkeypatch, tmp_path):
    class Forbidden(FakeCustomObjects):
        def get_namespaced_custom_object(self, *args):
            raise ApiException(status=403, reason="Forbidden")

    with pytest.raises(RuntimeError, match="kubectl -n team-a delete pytorchjob soho-pretrain-run-42"):
        _finish(monkeypatch, tmp_path, Forbidden([RUNNING]), "FAILED")
    status = json.loads((tmp_path / "runs" / "run-42" / "status.json").read_text())
    assert status["state"] == "FAILED" and "Forbidden" in status["cleanup_error"]


# --------------------------------------------------------------------------- the local launcher


@pytest.mark.slow
def test_local_torchrun_failure_and_timeout_raise(tmp_path, task_shards):
    from soho_core.launch.local import LocalRunError, run_torchrun

    with pytest.raises(LocalRunError, match="exited with code"):
        run_torchrun(soho_args("pretrain", "tiny", str(tmp_path / "no-shards"), str(tmp_path / "run")), timeout_s=120)
    with pytest.raises(LocalRunError, match="did not finish within 2 s"):
        run_torchrun(soho_args("pretrain", "tiny", str(task_shards), str(tmp_path / "run2")), timeout_s=2)
