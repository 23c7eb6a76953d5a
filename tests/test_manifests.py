"""The cluster side, checked without a cluster: every kustomization under manifests/ renders with
`kubectl kustomize`; every object validates against the Kubernetes schemas (kubernetes-validate,
strict) or, for PyTorchJobs, the training operator's CRD (unknown fields rejected, as
`kubectl apply`'s strict field validation would); and the manifests and Dockerfiles agree with
what the code reads and runs: the image, the entrypoint, the launcher's torchrun command, the
Secret and variable names, the pipeline's defaults, the non-root user. The bucket Job's script
runs against a real S3 server on loopback. No Docker engine here: the Dockerfiles are checked
statically, and the files they copy are built into a wheel.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from kube_helpers import kustomize, strict_schema

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

import components
import soho_core
from soho_core import cli
from soho_core.config import PRESETS, load_config
from soho_core.launch.pytorchjob import (CONTAINER, GROUP, KIND, PLURAL, NODE_ENV, RDZV_PORT, RESTART_POLICY, VERSION,
                                         JobSpec, torchrun_command)

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# Variables read by torch or OpenMP rather than by the project's code.
THIRD_PARTY_ENV = {"OMP_NUM_THREADS", *NODE_ENV}
# Rendered as they are; manifests/secrets needs the git-ignored env files (test_secret_templates).
KUSTOMIZATIONS = ("base", "pretrain", "overlays/minio", "overlays/gpu")
K8S_VERSION = "1.33"  # schemas of kubernetes-validate; Kubeflow 1.10 runs on Kubernetes 1.31-1.33
TORCH_PINS = {"torch": "2.14.1", "torchvision": "0.29.1"}
EXTRAS = ("pipeline", "s3", "tracking")

@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(MANIFESTS / name) for name in KUSTOMIZATIONS}


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec inside a rendered object (Deployment, Job, each PyTorchJob replica)."""
    if doc["kind"] == KIND:
        return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] in ("Deployment", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


def soho_containers(docs: list[dict]) -> list[dict]:
    return [c for d in docs for p in pod_specs(d) for c in p["containers"]
            if c["image"].split(":")[0] == components.IMAGE.split(":")[0]]


# ---------------------------------------------------------------------------------------- schemas

def strict_crd_schema(crd: dict) -> dict:
    """The CRD's openAPIV3Schema, unknown fields rejected (see kube_helpers.strict_schema)."""
    version = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)
    return strict_schema(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def crd_validator(pytorchjob_crd):
    assert pytorchjob_crd["spec"]["group"] == GROUP and pytorchjob_crd["spec"]["names"]["plural"] == PLURAL
    return jsonschema.Draft7Validator(strict_crd_schema(pytorchjob_crd))


def schema_errors(doc: dict, crd_validator) -> list[str]:
    import kubernetes_validate

    if doc["apiVersion"] == f"{GROUP}/{VERSION}" and doc["kind"] == KIND:
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [str(err)]
    return []


def test_every_kustomization_is_tested():
    found = {str(p.parent.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("kustomization.yaml")}
    # trainjob and trainjob/runtime: tests/test_trainjob.py
    assert found == {*KUSTOMIZATIONS, "secrets", "trainjob", "trainjob/runtime"}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_renders_and_every_object_validates(rendered, crd_validator, name):
    docs = rendered[name]
    assert docs
    for doc in docs:
        errors = schema_errors(doc, crd_validator)
        assert not errors, f"{name}: {doc['kind']} {doc['metadata']['name']}:\n" + "\n".join(errors)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "soho", f"{doc['kind']} {doc['metadata']['name']}"
    # Cluster-wide objects would need more than namespace rights to apply, and grant more.
    assert not {d["kind"] for d in docs} & {"ClusterRole", "ClusterRoleBinding"}


def test_the_schema_checks_can_fail(rendered, crd_validator):
    job = copy.deepcopy(one(rendered["pretrain"], KIND))
    job["spec"]["nprocsPerNode"] = "2"  # typo: the API server would drop it silently
    assert schema_errors(job, crd_validator)
    job = copy.deepcopy(one(rendered["pretrain"], KIND))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "one"
    assert schema_errors(job, crd_validator)
    deployment = copy.deepcopy(one(rendered["overlays/minio"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    assert schema_errors(deployment, crd_validator)
    deployment["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicy="Always", volumMounts=[])
    assert schema_errors(deployment, crd_validator)


# ------------------------------------------------------------------------------------------- RBAC

def test_rbac_grants_what_the_launcher_uses_and_nothing_more(rendered):
    base = rendered["base"]
    role = one(base, "Role")
    rules = {(group, resource): set(rule["verbs"])
             for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    assert rules == {
        (GROUP, PLURAL): {"create", "get", "list", "watch", "delete"},
        ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
    }
    assert not any("resourceNames" in rule or "nonResourceURLs" in rule for rule in role["rules"])
    # The launcher's calls (create, get, delete of a namespaced custom object) are all covered.
    source = (ROOT / "soho_core" / "launch" / "watch.py").read_text()
    used = set(re.findall(r"api\.(\w+)_namespaced_custom_object", source))
    assert used == {"create", "get", "delete"}
    assert used <= rules[(GROUP, PLURAL)] and used <= rules[("trainer.kubeflow.org", "trainjobs")]
    # And the TrainJob's log follower finds its pod by labels (list) before reading its log.
    assert set(re.findall(r"api\.(\w+)_namespaced_pod\b", source)) <= rules[("", "pods")]

    account = one(base, "ServiceAccount")
    binding = one(base, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "soho"}]


# ------------------------------------------------------------------------------- the PyTorchJob

def _parse_torchrun(command: list[str]) -> tuple[dict[str, str], list[str]]:
    assert command[:3] == ["python", "-m", "soho_core.launch.node"], command  # then torchrun
    i = command.index("-m", 3)
    flags = dict(arg[2:].split("=", 1) for arg in command[3:i])
    assert command[i + 1] == "soho_core", command
    return flags, command[i + 2:]


def _expand(arg: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion of a command argument."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def docker_user(dockerfile: Path) -> str:
    user = [args for ins, args in dockerfile_instructions(dockerfile) if ins == "USER"]
    return user[-1]


@pytest.mark.parametrize("name", ["pretrain", "overlays/gpu"])
def test_pytorchjob_runs_the_launchers_command(rendered, name):
    job = one(rendered[name], KIND)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] >= 1, "a multi-node job"
    # Master and Worker run the same pod: torchrun assigns node ranks at the rendezvous.
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    for r in replicas.values():
        assert r["restartPolicy"] == RESTART_POLICY == "ExitCode"  # a usage error (2) is not retried
    template = replicas["Master"]["template"]
    pod = template["spec"]
    (c,) = pod["containers"]
    assert c["name"] == CONTAINER and c["image"] == components.IMAGE

    flags, soho_argv = _parse_torchrun(c["command"])
    nodes = 1 + replicas["Worker"]["replicas"]
    procs = int(job["spec"]["nprocPerNode"])
    assert flags["nnodes"] == str(nodes) and flags["nproc-per-node"] == str(procs)
    assert flags["rdzv-backend"] == "c10d" and flags["rdzv-endpoint"] == f"$(MASTER_ADDR):{RDZV_PORT}"
    assert flags["rdzv-id"] == job["metadata"]["name"]
    gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", "0"))
    spec = JobSpec(name=job["metadata"]["name"], namespace=job["metadata"]["namespace"], image=c["image"],
                   soho_args=soho_argv, nodes=nodes, procs_per_node=procs, gpus_per_node=gpus,
                   cpu_per_node=c["resources"]["limits"]["cpu"], memory_per_node=c["resources"]["limits"]["memory"],
                   max_restarts=int(flags["max-restarts"])).validate()
    assert c["command"] == torchrun_command(spec), "same shape as the pipeline's launcher"
    assert {"name": "pytorchjob-port", "containerPort": RDZV_PORT} in c["ports"]
    assert c["resources"]["requests"] == c["resources"]["limits"]
    env = {e["name"]: e for e in c["env"]}
    assert env["OMP_NUM_THREADS"]["value"] == str(max(1, int(spec.cpu_per_node) // procs))
    # A restarted pod can rejoin the rendezvous (tests/image/test_pods.py runs that for real).
    assert {k: env[k]["value"] for k in NODE_ENV} == NODE_ENV
    if name == "overlays/gpu":
        assert gpus == procs and job["spec"]["nprocPerNode"] == str(gpus)
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME"} <= set(env)
    else:
        assert gpus == 0

    # /dev/shm in memory, resources, run policy, non-root, no Istio sidecar, no API token.
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    policy = job["spec"]["runPolicy"]
    assert policy["backoffLimit"] >= 1 and policy["activeDeadlineSeconds"] > 0 and policy["ttlSecondsAfterFinished"] > 0
    assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert pod["automountServiceAccountToken"] is False
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
    assert str(ctx["runAsUser"]) == docker_user(DOCKERFILE), "the image's user"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("name", ["pretrain", "overlays/gpu"])
def test_pytorchjob_arguments_are_a_valid_soho_pretrain(rendered, pipeline_defaults, name):
    job = one(rendered[name], KIND)
    c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    defaults = one(rendered["base"], "ConfigMap", "soho-defaults")["data"]
    assert [ref["configMapRef"]["name"] for ref in c["envFrom"] if "configMapRef" in ref] == ["soho-defaults"]
    # Every $(VAR) must resolve: the kubelet leaves an unknown one in the argument, as text.
    known = {"MASTER_ADDR", *defaults, *(e["name"] for e in c["env"])}
    referenced = {v for arg in c["command"] for v in re.findall(r"\$\((\w+)\)", arg)}
    assert referenced <= known, referenced - known
    _, soho_argv = _parse_torchrun(c["command"])
    argv = [_expand(a, defaults) for a in soho_argv]
    args = cli._parser().parse_args(argv)  # the real `soho` parser: unknown flags exit here
    assert args.command == "pretrain" and args.config in PRESETS
    load_config(args.config, list(args.set))  # a bad preset or override fails here, not in the pod
    # Resuming needs one fixed --out: no per-pod or per-attempt part, on the shared store.
    assert "$(" not in args.out and args.out.startswith(defaults["SOHO_STORE_ROOT"] + "/runs/")
    assert args.data.startswith(defaults["SOHO_STORE_ROOT"] + "/shards/") and args.data != args.out
    if name == "pretrain":  # the CPU job reads the shards a pipeline run with default parameters writes
        from soho_core.pipeline.steps import dataset_uri

        p = pipeline_defaults
        dataset = dataset_uri(p["store_root"], p["num_images"], p["seed"], p["image_size"], p["min_objects"],
                              p["max_objects"], p["questions_per_image"]).rsplit("/", 1)[-1]
        assert args.data == f"{p['store_root']}/shards/{dataset}"


def test_gpu_overlay_changes_only_what_a_gpu_job_needs(rendered):
    cpu, gpu = one(rendered["pretrain"], KIND), one(rendered["overlays/gpu"], KIND)
    cpu_c = cpu["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    gpu_c = gpu["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert [e for e in gpu_c["env"] if not e["name"].startswith("NCCL_") and e["name"] != "OMP_NUM_THREADS"] == \
        [e for e in cpu_c["env"] if e["name"] != "OMP_NUM_THREADS"]
    assert gpu_c["envFrom"] == cpu_c["envFrom"] and gpu_c["volumeMounts"] == cpu_c["volumeMounts"]
    assert gpu["spec"]["runPolicy"] == cpu["spec"]["runPolicy"]
    args = cli._parser().parse_args(_parse_torchrun(gpu_c["command"])[1])
    assert args.config in ("res18", "res101")


# ------------------------------------------------------------------ names shared with the code

def names_the_code_reads() -> set[str]:
    """The environment variables soho_core reads (soho_core/env.py, the one place) and the S3
    keys botocore reads, as the pipeline passes them (pipelines.soho.S3_KEYS)."""
    from pipelines.soho import S3_KEYS

    env_source = (ROOT / "soho_core" / "env.py").read_text()
    names = set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', env_source))
    assert {"RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_GROUP"} <= names
    return names | set(S3_KEYS)


@pytest.fixture(scope="module")
def pipeline_defaults() -> dict:
    from soho_core.pipeline.runner import pipeline_parameters

    return pipeline_parameters()


def test_secret_names_agree_with_the_pipeline_and_the_launcher(pipeline_defaults):
    defaults = {f.name: f.default for f in JobSpec.__dataclass_fields__.values()}
    assert defaults["s3_secret"] == pipeline_defaults["s3_secret"] == "soho-s3"
    assert defaults["wandb_secret"] == pipeline_defaults["wandb_secret"] == "soho-wandb"


def test_configmap_defaults_are_the_pipelines_defaults(rendered, pipeline_defaults):
    data = one(rendered["base"], "ConfigMap", "soho-defaults")["data"]
    assert data["SOHO_STORE_ROOT"] == pipeline_defaults["store_root"]
    assert data["WANDB_PROJECT"] == pipeline_defaults["wandb_project"]
    # Each key is read by the code or expanded by a manifest: none is there for show.
    commands = " ".join(" ".join(c.get("command", []) + c.get("args", []))
                        for docs in rendered.values() for c in soho_containers(docs))
    for docs in rendered.values():
        for cm in (d for d in docs if d["kind"] == "ConfigMap"):
            for key in cm["data"]:
                assert key in names_the_code_reads() or re.search(rf"\b{key}\b", commands), key


def test_env_and_secret_references_match_the_code(rendered, pipeline_defaults):
    read = names_the_code_reads()
    containers = [c for docs in rendered.values() for c in soho_containers(docs)]
    assert containers
    for c in containers:
        expanded = {v for arg in c.get("command", []) for v in re.findall(r"\$\((\w+)\)", arg)}
        for e in c.get("env", []):
            name = e["name"]
            assert name in read or name.startswith("NCCL_") or name in THIRD_PARTY_ENV or name in expanded, \
                f"{c['name']}: {name} is read by nothing"
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:  # the only secret variable: the wandb key, optional (offline without it)
                assert (name, ref) == ("WANDB_API_KEY", {"name": pipeline_defaults["wandb_secret"],
                                                         "key": "WANDB_API_KEY", "optional": True})
            else:
                assert "value" in e and not re.search(r"KEY|SECRET|PASSWORD|TOKEN", name)
        secrets = [ref["secretRef"]["name"] for ref in c.get("envFrom", []) if "secretRef" in ref]
        assert secrets == [pipeline_defaults["s3_secret"]]
        # The Secret comes after the ConfigMap so its AWS_ENDPOINT_URL (the pipeline's) wins.
        assert "secretRef" in c["envFrom"][-1]


# ------------------------------------------------------------------------------- no secret values

def test_secret_templates_hold_no_values_and_name_what_the_code_reads():
    from pipelines.soho import S3_KEYS

    files = {p.name: p for p in (MANIFESTS / "secrets").glob("*.env.example")}
    assert set(files) == {"soho-s3.env.example", "soho-wandb.env.example"}
    keys = {}
    for name, path in files.items():
        pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")]
        assert all(value == "" for _, value in pairs), f"{name} holds a value"
        keys[name] = {k for k, _ in pairs}
    assert keys["soho-s3.env.example"] == set(S3_KEYS)
    assert keys["soho-wandb.env.example"] == {"WANDB_API_KEY"}
    # The filled-in copies are git-ignored.
    ignore = (MANIFESTS / "secrets" / ".gitignore").read_text().split()
    assert "*.env" in ignore


def test_secrets_kustomization_makes_the_secrets_the_code_names(tmp_path, pipeline_defaults):
    work = tmp_path / "secrets"
    shutil.copytree(MANIFESTS / "secrets", work, ignore=shutil.ignore_patterns("*.env"))
    for example in work.glob("*.env.example"):
        lines = [f"{line}dummy-{i}" if line.endswith("=") else line
                 for i, line in enumerate(example.read_text().splitlines())]
        (work / example.name.removesuffix(".example")).write_text("\n".join(lines) + "\n")
    secrets = {d["metadata"]["name"]: d for d in kustomize(work)}
    # Fixed names (no hash suffix): the pipeline and the PyTorchJobs refer to them by name.
    assert set(secrets) == {pipeline_defaults["s3_secret"], pipeline_defaults["wandb_secret"]}
    from pipelines.soho import S3_KEYS

    assert set(secrets["soho-s3"]["data"]) == set(S3_KEYS)
    assert set(secrets["soho-wandb"]["data"]) == {"WANDB_API_KEY"}
    assert all(d["kind"] == "Secret" and d["metadata"]["namespace"] == "soho" for d in secrets.values())


CREDENTIAL_PATTERNS = (
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key id
    re.compile(r"minioadmin", re.I),  # MinIO's well-known default credentials
    re.compile(r"(?im)^\s*(stringData|data):\s*$"),  # a Secret body
    re.compile(r"(?i)(password|secret_access_key|api_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}"),
)


def test_no_credential_in_manifests_or_dockerfiles():
    # A filled-in, git-ignored manifests/secrets/*.env on this machine is the user's, not the repository's.
    files = [p for p in MANIFESTS.rglob("*") if p.is_file() and p.suffix != ".env"] + [DOCKERFILE]
    files.append(ROOT / ".dockerignore")
    assert len(files) > 8
    for path in files:
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            assert not pattern.search(text), f"{path.relative_to(ROOT)}: {pattern.pattern}"


def test_no_rendered_object_is_a_secret(rendered):
    for name, docs in rendered.items():
        assert not [d for d in docs if d["kind"] == "Secret"], f"{name} renders a Secret"


# -------------------------------------------------------------------------------------- images

def test_one_image_reference_everywhere():
    image, tag = components.IMAGE.rsplit(":", 1)
    assert tag == soho_core.__version__
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == soho_core.__version__
    for path in MANIFESTS.rglob("*.yaml"):
        text = path.read_text()
        for ref in re.findall(r"image:\s*(\S+)", text):
            if ref.split(":")[0] == image:
                assert ref == components.IMAGE, f"{path.relative_to(ROOT)}: {ref}"
        doc = yaml.safe_load(text) if path.name == "kustomization.yaml" else None
        for entry in (doc or {}).get("images", []):
            assert entry == {"name": image, "newTag": tag}, f"{path.relative_to(ROOT)}: {entry}"


def test_every_rendered_image_is_the_package_image_or_pinned(rendered):
    images = {c["image"] for docs in rendered.values() for d in docs for p in pod_specs(d) for c in p["containers"]}
    assert components.IMAGE in images
    for image in images - {components.IMAGE}:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), f"{image} is not pinned"


def test_kustomize_images_entry_moves_every_pod_to_another_registry(tmp_path):
    """What the README tells a user with their own registry: `newName` under `images:`."""
    work = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, work, ignore=shutil.ignore_patterns("*.env"))
    k = work / "pretrain" / "kustomization.yaml"
    k.write_text(k.read_text().replace("    newTag:", "    newName: registry.example.com/ml/soho\n    newTag:"))
    images = {c["image"] for d in kustomize(work / "overlays" / "gpu") for p in pod_specs(d) for c in p["containers"]}
    assert images == {"registry.example.com/ml/soho:" + soho_core.__version__}


# ----------------------------------------------------------------------------------------- MinIO

def test_minio_overlay_is_wired_together(rendered):
    docs = rendered["overlays/minio"]
    deployment, service = one(docs, "Deployment", "minio"), one(docs, "Service", "minio")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    s3 = next(p for p in service["spec"]["ports"] if p["name"] == "s3")
    assert s3["targetPort"] in ports
    endpoint = one(docs, "ConfigMap", "soho-defaults")["data"]["AWS_ENDPOINT_URL"]
    ns = deployment["metadata"]["namespace"]
    assert endpoint == f"http://{service['metadata']['name']}.{ns}.svc.cluster.local:{s3['port']}"
    claim = next(v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v)
    one(docs, "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])
    # MinIO's root credentials are the two keys SOHO's clients use: one Secret, never a value here.
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env == {"MINIO_ROOT_USER": {"name": "soho-s3", "key": "AWS_ACCESS_KEY_ID"},
                   "MINIO_ROOT_PASSWORD": {"name": "soho-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    job = one(docs, "Job", "minio-make-bucket")
    assert job["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_make_bucket_job_creates_the_bucket_on_a_real_s3_server(rendered, s3_server, tmp_path):
    import os

    import boto3

    job = one(rendered["overlays/minio"], "Job", "minio-make-bucket")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["python", "-c"] and c["image"] == components.IMAGE
    script = c["command"][2]

    def run(store_root: str):
        env = {**os.environ, "SOHO_STORE_ROOT": store_root}  # AWS_* point at the loopback server
        return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)

    s3 = boto3.client("s3", endpoint_url=s3_server)
    assert "made-by-job" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    first = run("s3://made-by-job/soho")
    assert first.returncode == 0, first.stderr
    assert "made-by-job" in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    again = run("s3://made-by-job")  # a re-applied Job, or a retry after a half-done attempt
    assert again.returncode == 0 and "already exists" in again.stdout, again.stderr
    bad = run("/data/soho")
    assert bad.returncode != 0 and "SOHO_STORE_ROOT" in bad.stderr


# ------------------------------------------------------------------------------------ Dockerfiles

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        ins, _, args = current.partition(" ")
        out.append((ins.upper(), args.strip()))
        current = ""
    return out


def stages(path: Path) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(base image with global ARGs expanded, stage name, instructions) per stage."""
    global_args: dict[str, str] = {}
    result: list = []
    for ins, args in dockerfile_instructions(path):
        if ins == "ARG" and not result:
            key, _, value = args.partition("=")
            global_args[key] = value
        elif ins == "FROM":
            parts = args.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], parts[0])
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else ""
            result.append((image, name, []))
        else:
            result[-1][2].append((ins, args))
    return result


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path (or a folder above it)
    decides; `!` re-includes; `**` spans folders."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = regex(pattern.lstrip("!").strip("/"))
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def dockerignore() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_the_context_to_the_package(dockerignore):
    for kept in ("pyproject.toml", "README.md", "soho_core/cli.py", "components/__init__.py", "pipelines/soho.py"):
        assert not dockerignore_excludes(kept, dockerignore), kept
    for dropped in (".venv/bin/python", ".git/config", "demo-out/store/x", "soho_core/__pycache__/cli.cpython-311.pyc",
                    "manifests/secrets/soho-s3.env", "tests/test_manifests.py", "soho_kubeflow.egg-info/PKG-INFO"):
        assert dockerignore_excludes(dropped, dockerignore), dropped


def test_dockerfile_is_pinned_non_root_with_soho_entrypoint(dockerignore):
    """One Dockerfile for both builds: the base pinned by tag, torch from a build argument
    (PyTorch's CPU index by default; docker/build.sh passes an empty one for CUDA). The image
    itself is built and run by tests/image (`make image test-image`)."""
    found = stages(DOCKERFILE)
    assert len(found) == 1, "one stage: the venv is stored once"
    image, _, final = found[0]
    name, _, tag = image.rpartition(":")
    assert name and re.match(r"\d+\.\d+\.\d+", tag), f"{image}: base image not pinned by tag"
    runs = " ".join(args for _, _, instructions in found for ins, args in instructions if ins == "RUN")
    # Everything from the image's lock, with hashes; torch's version from the lock, never typed twice.
    assert "pip install --no-deps --require-hashes -r install.lock" in runs
    assert not re.search(r"\btorch==\d", runs), "the image takes torch's version from the lock"
    assert "pip check" in runs
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(optional)
    assert f"compile docker/requirements.lock {' '.join(EXTRAS)}" in (ROOT / ".ci" / "lock").read_text()
    args = dict(a.partition("=")[::2] for i, a in final if i == "ARG")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert 'if [ -n "$TORCH_INDEX_URL" ]' in runs, "an empty index means PyPI's torch, from the lock"
    build = (ROOT / "docker" / "build.sh").read_text()
    assert re.search(r"cuda\)[^;]*index=\$\{TORCH_INDEX_URL-\}", build), "the CUDA build: PyPI's torch"

    # Non-root by number (Kubernetes' runAsNonRoot can only check a number), the venv first on
    # PATH (KFP's component command calls `python3`), KFP's artifact folders writable.
    user = [args for ins, args in final if ins == "USER"]
    assert user and user[-1].isdigit() and int(user[-1]) != 0
    env = " ".join(args for ins, args in final if ins == "ENV")
    assert re.search(r"PATH=/opt/venv/bin:\$PATH", env)
    assert re.search(r"install -d -m 1777 /gcs /minio /s3", " ".join(a for i, a in final if i == "RUN"))
    entrypoint = [args for ins, args in final if ins == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["soho"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["soho"] == "soho_core.cli:main" and callable(cli.main)
    for ins, args in (i for _, _, instructions in found for i in instructions):
        if ins in ("ENV", "ARG"):
            assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN", args), f"{ins} {args}"
    # Every COPY source is in the build context.
    for _, _, instructions in found:
        for ins, args in instructions:
            if ins == "COPY" and not args.startswith("--from"):
                for src in args.split()[:-1]:
                    assert (ROOT / src).exists(), src
                    assert not dockerignore_excludes(src, dockerignore), f"{src} is excluded by .dockerignore"


def lock_entries(path: Path) -> dict[str, tuple[str, int]]:
    """{name: (version, number of hashes)} of a `make lock` file."""
    entries: dict[str, tuple[str, int]] = {}
    name = ""
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            name = match.group(1).lower()
            entries[name] = (match.group(2), 0)
        elif "--hash=sha256:" in line:
            entries[name] = (entries[name][0], entries[name][1] + 1)
    return entries


def test_locks_pin_everything_with_hashes_and_agree_with_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    pins = dict(p.split("==") for p in re.search(r"^TORCH_PINS := (.+)$", makefile, re.M).group(1).split())
    assert pins == TORCH_PINS
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}

    wanted = {"requirements.lock": names(project["dependencies"]) | names(
                  [r for extra, reqs in project["optional-dependencies"].items() if extra != "all" for r in reqs]),
              "docker/requirements.lock": names(project["dependencies"]) | names(
                  [r for extra in EXTRAS for r in project["optional-dependencies"][extra]])}
    for path, direct in wanted.items():
        text = (ROOT / path).read_text()
        assert "make lock" in text.splitlines()[1], f"{path} is written by `make lock`"
        entries = lock_entries(ROOT / path)
        assert direct <= set(entries), f"{path} misses {direct - set(entries)}"
        assert all(count >= 1 for _, count in entries.values()), f"{path}: an entry without a hash"
        for package, version in TORCH_PINS.items():
            assert entries[package][0] == version, f"{path}: {package}"
    assert "pytest" not in lock_entries(ROOT / "docker" / "requirements.lock"), "no test tools in the image"


def test_the_cpu_image_leaves_out_exactly_the_locks_cuda_packages(tmp_path):
    """The Dockerfile's own awk filter, run on the image's lock: torch, torchvision and the CUDA
    packages go (they come from the CPU index), every other entry stays whole, hashes included."""
    runs = " ".join(a for i, a in stages(DOCKERFILE)[0][2] if i == "RUN")
    program = re.search(r"awk '([^']+)'", runs).group(1)
    lock = ROOT / "docker" / "requirements.lock"
    out = subprocess.run(["awk", program, str(lock)], capture_output=True, text=True, check=True).stdout
    (tmp_path / "install.lock").write_text(out)
    kept, everything = lock_entries(tmp_path / "install.lock"), lock_entries(lock)
    dropped = set(everything) - set(kept)
    assert {"torch", "torchvision"} <= dropped
    assert all(n in ("torch", "torchvision", "triton") or n.startswith(("nvidia-", "cuda-")) for n in dropped), dropped
    assert all(kept[n] == everything[n] for n in kept), "kept entries keep all their hashes"
    assert {"numpy", "kfp", "s3fs", "wandb", "sympy"} <= set(kept)


@pytest.mark.slow
def test_the_copied_files_build_the_package(tmp_path, dockerignore):
    """What the build stage copies (through .dockerignore) is enough to build the wheel it installs,
    with the `soho` entry point and the extras it asks for."""
    copies = [args for ins, args in stages(DOCKERFILE)[0][2] if ins == "COPY"]
    assert copies
    for args in copies:
        *sources, dest = args.split()
        target = tmp_path / dest.lstrip("/")
        for src in sources:
            src_path = ROOT / src
            # COPY puts a file into the destination folder and a folder's contents at the destination.
            pairs = [(src_path, target / src_path.name)] if src_path.is_file() else \
                [(f, target / f.relative_to(src_path)) for f in src_path.rglob("*") if f.is_file()]
            for f, out in pairs:
                if dockerignore_excludes(f.relative_to(ROOT).as_posix(), dockerignore):
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)
    source = tmp_path / "src"
    wheels = tmp_path / "wheels"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = wheels.glob("soho_kubeflow-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {"soho_core/cli.py", "components/__init__.py", "pipelines/soho.py"} <= names
        dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = z.read(f"{dist}/entry_points.txt").decode()
        metadata = z.read(f"{dist}/METADATA").decode()
    assert re.search(r"^soho = soho_core\.cli:main$", entry_points, re.M)
    for extra in EXTRAS:
        assert f"Provides-Extra: {extra}" in metadata


# ------------------------------------------------------------------------ soho pipeline submit

def test_submit_passes_service_account_and_namespace_to_kfp(monkeypatch, tmp_path):
    """`soho pipeline submit --service-account --namespace` reach kfp.Client: the run's pods use
    the account bound to manifests/base/rbac.yaml. A stand-in for kfp.Client records the calls
    (no server); the arguments are bound against the real method's signature."""
    import kfp

    calls = []

    class Recorder:
        def __init__(self, host=None, namespace="kubeflow", **kw):
            calls.append(("Client", {"host": host, "namespace": namespace}))

        def create_run_from_pipeline_package(self, pipeline_file, **kwargs):
            inspect.signature(kfp.Client.create_run_from_pipeline_package).bind(self, pipeline_file, **kwargs)
            calls.append(("create_run_from_pipeline_package", {"pipeline_file": pipeline_file, **kwargs}))
            return type("Run", (), {"run_id": "run-123"})()

    monkeypatch.setattr(kfp, "Client", Recorder)
    package = tmp_path / "pipeline.yaml"
    package.write_text("{}")
    code = cli.main(["pipeline", "submit", "--host", "https://kfp.example.com/pipeline", "--package", str(package),
                     "--namespace", "team-a", "--service-account", "soho-pipeline-runner",
                     "--param", "store_root=s3://bucket/soho"])
    assert code == 0
    assert calls[0] == ("Client", {"host": "https://kfp.example.com/pipeline", "namespace": "team-a"})
    name, kwargs = calls[1]
    assert kwargs["service_account"] == "soho-pipeline-runner" and kwargs["namespace"] == "team-a"
    assert kwargs["arguments"] == {"store_root": "s3://bucket/soho"} and kwargs["pipeline_file"] == str(package)

    calls.clear()
    assert cli.main(["pipeline", "submit", "--host", "https://kfp.example.com/pipeline", "--package", str(package)]) == 0
    assert calls[1][1]["service_account"] is None, "no flag: the installation's default runner"


def test_readme_cluster_section_names_what_exists(rendered):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    for path in set(re.findall(r"manifests/[\w./-]+", section)):
        assert (ROOT / path.rstrip(".")).exists(), path
    for path in set(re.findall(r"docker/[\w.-]+", section)):
        assert (ROOT / path).exists(), path
    account = one(rendered["base"], "ServiceAccount")["metadata"]["name"]
    assert set(re.findall(r"--service-account[ =]([\w.-]+)", section)) == {account}
    created = set(re.findall(r"create secret generic ([\w.-]+)", section))
    assert created == {"soho-s3", "soho-wandb"}
    from pipelines.soho import S3_KEYS

    literals = set(re.findall(r"--from-literal=(\w+)=", section))
    assert set(S3_KEYS) | {"WANDB_API_KEY"} <= literals <= set(S3_KEYS) | {"WANDB_API_KEY"}
    assert components.IMAGE in section
