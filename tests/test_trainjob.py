"""The Kubeflow Trainer v2 launcher: the TrainJob it builds validates against Trainer v2.3.0's CRD
(unknown fields rejected, as the API server prunes them), patches the runtime's real replicated
job and container, carries no credential value, its command trains when given the variables the
torch runtime sets, and the watcher reads its states. (Over real HTTP: tests/test_launch_http.py.)"""

import copy
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes.client import ApiException
from kube_helpers import FakeClock, kustomize, strict_schema

from soho_core.launch import soho_args
from soho_core.launch.pytorchjob import NODE_ENV, JobSpec
from soho_core.launch.trainjob import (GROUP, NODE, PLURAL, S3_SECRET_KEYS, VERSION, build_trainjob,
                                       trainjob_command)
from soho_core.launch.watch import JobFailed, job_state, run_job

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"
if not SCHEMAS.exists():
    SCHEMAS = Path("/work/shared/schemas")


def _crd_validator(filename: str, plural: str):
    crd = yaml.safe_load((SCHEMAS / filename).read_text())
    assert crd["spec"]["group"] == GROUP and crd["spec"]["names"]["plural"] == plural
    version = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def trainjob_validator():
    return _crd_validator("v2.3.0.trainer.kubeflow.org_trainjobs.yaml", PLURAL)


def errors(validator, body) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]


def _spec(**kw):
    base = dict(name="soho-pretrain-run1", namespace="team-a", image="ghcr.io/soho-kubeflow/soho:0.1.0",
                soho_args=soho_args("pretrain", "res18", "s3://soho/shards/x", "s3://soho/runs/run1/pretrain",
                                    ["train.max_steps=10"]),
                nodes=3, procs_per_node=4, gpus_per_node=4, service_account="soho-launcher",
                env={"WANDB_PROJECT": "soho", "WANDB_RUN_GROUP": "run1", "SOHO_PIPELINE_RUN_ID": "run1"})
    base.update(kw)
    return JobSpec(**base)


def _node_patch(body) -> dict:
    (patch,) = body["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return job


def test_trainjob_validates_against_the_v2_crd_and_carries_the_jobs_settings(trainjob_validator):
    spec = _spec()
    body = build_trainjob(spec)
    assert errors(trainjob_validator, body) == []
    assert (body["apiVersion"], body["kind"]) == (f"{GROUP}/{VERSION}", "TrainJob")
    assert body["spec"]["runtimeRef"] == {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime",
                                          "name": "torch-distributed"}
    trainer = body["spec"]["trainer"]
    assert trainer["image"] == spec.image
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    assert trainer["command"][trainer["command"].index("soho_core") + 1:] == spec.soho_args
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "4"}
    assert trainer["resourcesPerNode"]["requests"] == trainer["resourcesPerNode"]["limits"]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["WANDB_RUN_GROUP"]["value"] == "run1" and env["OMP_NUM_THREADS"]["value"] == "1"
    # Credentials by reference only, each optional (a missing key must not block the pod).
    for key in ("WANDB_API_KEY", *S3_SECRET_KEYS):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert "value" not in env[key] and ref["optional"] is True
        assert ref["name"] == ("soho-wandb" if key == "WANDB_API_KEY" else "soho-s3") and ref["key"] == key
    # /dev/shm and the service account ride on the runtime's node job.
    node = _node_patch(body)
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == NODE and pod["serviceAccountName"] == "soho-launcher"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    assert pod["containers"] == [{"name": NODE, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]


def test_gpu_nodes_get_tolerations_and_a_node_selector_through_the_runtime_patch(trainjob_validator):
    taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    body = build_trainjob(_spec(tolerations=[taint], node_selector={"gpu": "h100"}))
    assert errors(trainjob_validator, body) == []
    pod = _node_patch(body)["template"]["spec"]["template"]["spec"]
    assert pod["tolerations"] == [taint] and pod["nodeSelector"] == {"gpu": "h100"}
    pod = _node_patch(build_trainjob(_spec()))["template"]["spec"]["template"]["spec"]
    assert "tolerations" not in pod and "nodeSelector" not in pod


def test_the_pull_secret_rides_on_the_runtime_patch_and_the_crd_has_no_pull_policy(trainjob_validator):
    """Trainer v2.3.0's TrainJob has nowhere to put an image pull policy (neither the trainer slot nor
    a runtime patch's container): the runtime decides it. The pull Secret goes on the node pods."""
    image = "ghcr.io/soho-kubeflow/soho@sha256:" + "ab" * 32
    body = build_trainjob(_spec(image=image, image_pull_policy="Always", image_pull_secret="regcred"))
    assert errors(trainjob_validator, body) == []
    assert body["spec"]["trainer"]["image"] == image
    assert _node_patch(body)["template"]["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert "imagePullPolicy" not in str(body)
    crd = yaml.safe_load((SCHEMAS / "v2.3.0.trainer.kubeflow.org_trainjobs.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)["schema"]["openAPIV3Schema"]
    trainer = schema["properties"]["spec"]["properties"]["trainer"]["properties"]
    pod = (schema["properties"]["spec"]["properties"]["runtimePatches"]["items"]["properties"]["trainingRuntimeSpec"]
           ["properties"]["template"]["properties"]["spec"]["properties"]["replicatedJobs"]["items"]["properties"]
           ["template"]["properties"]["spec"]["properties"]["template"]["properties"]["spec"]["properties"])
    assert "image" in trainer and "imagePullPolicy" not in trainer
    assert "imagePullSecrets" in pod and "imagePullPolicy" not in pod["containers"]["items"]["properties"]


def test_the_s3_keys_are_the_pipelines():
    from pipelines.soho import S3_KEYS

    assert S3_SECRET_KEYS == S3_KEYS


def test_cpu_job_without_deadline_or_service_account_and_a_namespaced_runtime(trainjob_validator):
    body = build_trainjob(_spec(nodes=1, procs_per_node=2, gpus_per_node=0, service_account="",
                                cpu_per_node="8", active_deadline_s=3600),
                          runtime="soho-torch", runtime_kind="TrainingRuntime")
    assert errors(trainjob_validator, body) == []
    assert "nvidia.com/gpu" not in body["spec"]["trainer"]["resourcesPerNode"]["limits"]
    assert "serviceAccountName" not in _node_patch(body)["template"]["spec"]["template"]["spec"]
    assert body["spec"]["activeDeadlineSeconds"] == 3600
    assert body["spec"]["runtimeRef"]["kind"] == "TrainingRuntime"
    assert {e["name"]: e.get("value") for e in body["spec"]["trainer"]["env"]}["OMP_NUM_THREADS"] == "4"
    with pytest.raises(ValueError, match="runtime kind"):
        build_trainjob(_spec(), runtime_kind="Runtime")
    with pytest.raises(ValueError, match="runtime is empty"):
        build_trainjob(_spec(), runtime="")
    with pytest.raises(ValueError, match="procs_per_node"):
        build_trainjob(_spec(procs_per_node=8, gpus_per_node=4))


def test_the_trainjob_schema_check_can_fail(trainjob_validator):
    body = build_trainjob(_spec())
    bad = copy.deepcopy(body)
    bad["spec"]["trainer"]["numProcPerNode"] = "4"
    assert errors(trainjob_validator, bad)
    bad = copy.deepcopy(body)
    bad["spec"]["trainer"]["envFrom"] = [{"secretRef": {"name": "soho-s3"}}]  # v1's way: not in v2's trainer
    assert errors(trainjob_validator, bad)
    bad = copy.deepcopy(body)
    del bad["spec"]["runtimeRef"]
    assert errors(trainjob_validator, bad)


def test_the_patch_targets_what_the_torch_distributed_runtime_defines():
    runtime = yaml.safe_load((SCHEMAS / "v2.3.0.runtime.torch_distributed.yaml").read_text())
    validator = _crd_validator("v2.3.0.trainer.kubeflow.org_clustertrainingruntimes.yaml", "clustertrainingruntimes")
    assert errors(validator, runtime) == []
    assert runtime["metadata"]["name"] == "torch-distributed"
    jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    names = {j["name"]: [c["name"] for c in j["template"]["spec"]["template"]["spec"]["containers"]] for j in jobs}
    assert NODE in names and NODE in names[NODE]
    assert "torch" in runtime["spec"]["mlPolicy"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_trainjobs_command_trains_with_the_variables_the_torch_runtime_sets(task_shards, tmp_path):
    """The container command, run here as the runtime runs it on a node: torchrun takes nodes,
    processes, rank and master from the PET_* variables alone (two processes, gloo)."""
    out = tmp_path / "run"
    args = soho_args("pretrain", "tiny", str(task_shards), str(out), ["train.max_steps=2", "train.ckpt_every=2"])
    command = trainjob_command(_spec(soho_args=args, nodes=1, procs_per_node=2, gpus_per_node=0))
    assert not any(a.startswith(("--nnodes", "--nproc", "--rdzv", "--master", "--node")) for a in command)
    env = dict(os.environ, PET_NNODES="1", PET_NPROC_PER_NODE="2", PET_NODE_RANK="0",
               PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    assert command[0] == "python"
    done = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "checkpoints" / "step-00000002.pt").exists()
    assert '"images_seen": 32' in done.stdout  # 2 steps x 8 images x 2 processes: both joined


# --------------------------------------------------------------------------- the watcher


class FakeTrainer:
    """The CustomObjectsApi calls the watcher makes, for TrainJobs; ``script`` lists the status
    (conditions, jobsStatus) the controller reports on successive reads."""

    def __init__(self, script):
        self.script = list(script)
        self.jobs = {}
        self.deleted = 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == (GROUP, VERSION, PLURAL)
        self.jobs[(namespace, body["metadata"]["name"])] = copy.deepcopy(body)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural) == (GROUP, VERSION, PLURAL)
        conditions, jobs = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if (namespace, name) not in self.jobs:
            raise ApiException(status=404, reason="NotFound")
        self.jobs[(namespace, name)]["status"] = {"conditions": conditions, "jobsStatus": jobs}
        return copy.deepcopy(self.jobs[(namespace, name)])

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, body=None):
        assert (group, version, plural) == (GROUP, VERSION, PLURAL)
        self.jobs.pop((namespace, name))
        self.deleted += 1


def c(kind, status="True", reason="", message=""):
    return {"type": kind, "status": status, "reason": reason, "message": message}


CREATED = ([c("Created")], [])
RUNNING = ([c("Created")], [{"name": "node", "active": 3, "ready": 3}])
COMPLETE = ([c("Created"), c("Complete", reason="JobsCompleted")], [{"name": "node", "succeeded": 3}])
FAILED = ([c("Created"), c("Failed", reason="FailedJobs", message="node-1 exited with code 1")],
          [{"name": "node", "failed": 1}])


def _run(api, timeout_s=600.0):
    clock, lines = FakeClock(), []
    state = run_job(api, build_trainjob(_spec()), timeout_s=timeout_s, poll_s=10, log=lines.append,
                    clock=clock, sleep=clock.sleep)
    return state, lines


def test_watch_follows_a_trainjob_to_complete():
    api = FakeTrainer([CREATED, RUNNING, RUNNING, COMPLETE])
    state, lines = _run(api)
    assert state.phase == "Succeeded"
    phases = [line.split(": ")[1].split()[0] for line in lines if line.startswith("TrainJob team-a/")]
    assert phases == ["Created", "Running", "Succeeded"]
    assert lines[0] == "created TrainJob team-a/soho-pretrain-run1"
    assert any("node: 3 active, 3 ready" in line for line in lines)


def test_watch_reports_a_failed_trainjob_and_keeps_it():
    api = FakeTrainer([RUNNING, FAILED])
    with pytest.raises(JobFailed, match="TrainJob team-a/soho-pretrain-run1 failed: FailedJobs: node-1 exited"):
        _run(api)
    assert api.deleted == 0 and api.jobs  # kept for its logs


def test_trainjob_state_terminal_wins_and_suspended_is_not_running():
    body = {"kind": "TrainJob", "status": {"conditions": [c("Complete"), c("Suspended")],
                                           "jobsStatus": [{"name": "node", "active": 1}]}}
    assert job_state(body).phase == "Succeeded"
    body = {"kind": "TrainJob", "status": {"conditions": [c("Created"), c("Suspended")], "jobsStatus": []}}
    assert job_state(body).phase == "Suspended"


class FakePods:
    """list_namespaced_pod and read_namespaced_pod_log over named pods with labels."""

    class _Pod:
        def __init__(self, name):
            self.metadata = type("M", (), {"name": name})()

    def __init__(self, pods):
        self.pods = pods  # name -> log text
        self.selectors = []

    def list_namespaced_pod(self, namespace, label_selector=""):
        self.selectors.append(label_selector)
        return type("L", (), {"items": [self._Pod(n) for n in sorted(self.pods)]})()

    def read_namespaced_pod_log(self, name, namespace, timestamps=False, since_seconds=None):
        if name not in self.pods:
            raise ApiException(status=404, reason="NotFound")
        return self.pods[name]


def test_trainjob_first_node_log_is_found_by_its_labels():
    api = FakeTrainer([RUNNING, COMPLETE])
    pods = FakePods({"soho-pretrain-run1-node-0-0-x7k2p": "2026-11-30T10:00:00Z step 10 loss 3.2\n"})
    clock, lines = FakeClock(), []
    run_job(api, build_trainjob(_spec()), timeout_s=600, poll_s=10, log=lines.append, clock=clock,
            sleep=clock.sleep, core_api=pods)
    assert "[soho-pretrain-run1-node-0-0-x7k2p] step 10 loss 3.2" in lines
    assert pods.selectors[0] == ("jobset.sigs.k8s.io/jobset-name=soho-pretrain-run1,"
                                 "jobset.sigs.k8s.io/replicatedjob-name=node,jobset.sigs.k8s.io/job-index=0,"
                                 "batch.kubernetes.io/job-completion-index=0")


def test_pipeline_pretrain_step_with_the_trainjob_launcher(monkeypatch, trainjob_validator, s3_server):
    from soho_core.pipeline import steps

    api = FakeTrainer([COMPLETE])
    monkeypatch.setattr(steps, "kubernetes_api", lambda: api)
    monkeypatch.setattr(steps, "kubernetes_core_api", lambda: FakePods({}))
    out = steps.pretrain("tiny", "s3://soho/shards/x", "s3://soho", "run-42", ["train.max_steps=3"],
                         launcher="trainjob", nodes=2, image="img:1", namespace="team-a",
                         training_runtime="my-torch")
    ((key, body),) = api.jobs.items()
    sent = {k: v for k, v in body.items() if k != "status"}  # what was created; status is the fake's
    assert key == ("team-a", "soho-pretrain-run-42") and errors(trainjob_validator, sent) == []
    assert body["spec"]["runtimeRef"]["name"] == "my-torch" and body["spec"]["trainer"]["numNodes"] == 2
    command = body["spec"]["trainer"]["command"]
    assert command[command.index("soho_core") + 1:][:6] == ["pretrain", "--config", "tiny", "--data",
                                                            "s3://soho/shards/x", "--out"]
    assert out == "s3://soho/runs/run-42/pretrain"
    with pytest.raises(ValueError, match="launcher='trainjob' needs the image"):
        steps.pretrain("tiny", "D", "s3://soho", "r", launcher="trainjob", namespace="x")


def test_exit_handler_deletes_a_trainjob_still_running(monkeypatch, tmp_path):
    from soho_core.pipeline import steps

    api = FakeTrainer([RUNNING])
    api.jobs[("team-a", "soho-pretrain-run-42")] = build_trainjob(_spec(name="soho-pretrain-run-42"))
    monkeypatch.setattr(steps, "kubernetes_api", lambda: api)
    steps.finish_run(str(tmp_path), "run-42", "FAILED", launcher="trainjob", namespace="team-a")
    assert api.deleted == 1 and not api.jobs


# --------------------------------------------------------------------------- manifests/trainjob

ROOT = Path(__file__).resolve().parents[1]


def test_trainjob_manifest_validates_and_runs_the_launchers_job(trainjob_validator):
    import components
    from soho_core import cli
    from soho_core.config import PRESETS, load_config

    (job,) = kustomize(ROOT / "manifests" / "trainjob")
    assert errors(trainjob_validator, job) == []
    assert job["kind"] == "TrainJob" and job["metadata"]["namespace"] == "soho"
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == components.IMAGE
    launcher = build_trainjob(_spec(soho_args=["pretrain"]))
    assert job["spec"]["runtimeRef"] == launcher["spec"]["runtimeRef"]
    # The command is the launcher's: torchrun with its restart budget only, then `soho pretrain`.
    command = trainer["command"]
    assert command[: command.index("soho_core") + 1] == trainjob_command(_spec(soho_args=["x"]))[:-1]
    config = next(d for d in kustomize(ROOT / "manifests" / "base") if d["kind"] == "ConfigMap")["data"]
    env = {e["name"]: e for e in trainer["env"]}
    referenced = {v for arg in command for v in re.findall(r"\$\((\w+)\)", arg)}
    assert referenced <= set(env)  # every $(VAR) resolves
    soho_argv = command[command.index("soho_core") + 1:]
    argv = [a.replace("$(SOHO_STORE_ROOT)", config["SOHO_STORE_ROOT"]) for a in soho_argv]
    args = cli._parser().parse_args(argv)
    assert args.command == "pretrain" and args.config in PRESETS
    load_config(args.config, list(args.set))
    root = config["SOHO_STORE_ROOT"]
    assert args.out.startswith(root + "/runs/") and args.data.startswith(root + "/shards/")
    # Configuration by reference to the base ConfigMap's keys, credentials to the Secrets' keys,
    # the same Secret keys the launcher names, and never a value.
    for name, e in env.items():
        ref = e.get("valueFrom", {})
        if "configMapKeyRef" in ref:
            assert ref["configMapKeyRef"]["name"] == "soho-defaults" and ref["configMapKeyRef"]["key"] in config
        elif "secretKeyRef" in ref:
            assert ref["secretKeyRef"]["optional"] is True and ref["secretKeyRef"]["key"] == name
        else:
            assert name in ("WANDB_RUN_GROUP", "OMP_NUM_THREADS", *NODE_ENV), name
    assert {k: env[k]["value"] for k in NODE_ENV} == NODE_ENV  # a restarted node can rejoin
    secret_keys = {n for n, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
    launcher_keys = {e["name"] for e in launcher["spec"]["trainer"]["env"] if "valueFrom" in e}
    assert secret_keys == launcher_keys
    # The runtime patch: the torch runtime's node job and container, /dev/shm, the image's user.
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == NODE and [c["name"] for c in pod["containers"]] == [NODE]
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["runAsNonRoot"] is True


# --------------------------------------------------------------------------- usage errors

@pytest.mark.parametrize("bad, names", [
    (["pretrain", "--config", "nope", "--data", "D", "--out", "O"], "nope"),
    (["pretrain", "--config", "tiny", "--data", "D", "--out", "O", "--set", "optim.lrr=1"], "optim.lrr"),
    (["pretrain", "--config", "tiny", "--data", "D", "--out", "O", "--frobnicate"], "--frobnicate"),
    (["evaluate", "--task", "vqa", "--checkpoint", "C", "--data", "D", "--out", "O"], "soho evaluate"),
])
def test_a_usage_error_exits_2_before_torchrun_starts(tmp_path, bad, names):
    """The pods' entry point refuses what can never work with exit code 2 (permanent under
    restartPolicy ExitCode) instead of handing it to torchrun, which would retry it."""
    command = trainjob_command(_spec(soho_args=bad, nodes=1, procs_per_node=2, gpus_per_node=0))
    env = dict(os.environ, PET_NNODES="1", PET_NPROC_PER_NODE="2", PET_NODE_RANK="0",
               PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(_free_port()))
    done = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert names in done.stderr
    assert "torch.distributed" not in done.stderr and "Starting elastic" not in done.stderr  # never started


def test_the_entry_point_splits_torchrun_options_from_soho_arguments():
    from soho_core.launch.node import split_argv

    assert split_argv(["--nnodes=2", "-m", "soho_core", "pretrain", "-m", "x"]) == (
        ["--nnodes=2"], ["pretrain", "-m", "x"])
    with pytest.raises(ValueError, match="-m soho_core"):
        split_argv(["--nnodes=2", "pretrain"])


def test_soho_runtime_fails_a_usage_error_at_once_and_restarts_other_failures():
    """manifests/trainjob/runtime: the v1 ExitCode policy, as a ClusterTrainingRuntime can state
    it, valid against Trainer v2.3.0's CRD and in step with the launcher's exit code and node."""
    from soho_core.launch.node import USAGE_ERROR

    validator = _crd_validator("v2.3.0.trainer.kubeflow.org_clustertrainingruntimes.yaml", "clustertrainingruntimes")
    (runtime,) = kustomize(ROOT / "manifests" / "trainjob" / "runtime")
    assert errors(validator, runtime) == []
    assert runtime["kind"] == "ClusterTrainingRuntime" and "namespace" not in runtime["metadata"]
    assert "torch" in runtime["spec"]["mlPolicy"]
    jobset = runtime["spec"]["template"]["spec"]
    (node,) = jobset["replicatedJobs"]
    assert node["name"] == NODE
    job = node["template"]["spec"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert [c["name"] for c in job["template"]["spec"]["containers"]] == [NODE]
    usage, disruption = job["podFailurePolicy"]["rules"]
    assert usage == {"action": "FailJob", "onExitCodes": {"containerName": NODE, "operator": "In",
                                                          "values": [USAGE_ERROR]}}
    assert disruption == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    (rule,) = jobset["failurePolicy"]["rules"]
    assert rule["action"] == "FailJobSet" and rule["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert jobset["failurePolicy"]["maxRestarts"] >= 1
    # The launcher names it like any runtime.
    body = build_trainjob(_spec(), runtime=runtime["metadata"]["name"])
    assert body["spec"]["runtimeRef"]["name"] == "soho-torch-distributed"
