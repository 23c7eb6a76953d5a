"""The PyTorchJob (``kubeflow.org/v1``, Kubeflow training operator) that runs pre-training
on N nodes x M processes.

    from soho_core.launch.pytorchjob import JobSpec, build_pytorchjob
    body = build_pytorchjob(JobSpec(name="soho-pretrain-1a2b", namespace="kubeflow-user",
                                    image=IMAGE, soho_args=[...], nodes=2, procs_per_node=8, gpus_per_node=8))

One Master and ``nodes - 1`` Workers, all from the same pod template: the same image (by tag
or by digest, with its pull policy and optional pull Secret),
``python -m torch.distributed.run`` (behind ``soho_core.launch.node``, which exits 2 on a usage
error instead of letting torchrun retry it) with an elastic c10d rendezvous at the Master's
service (so node ranks are assigned by torchrun, and a restarted pod rejoins), a
memory-backed ``/dev/shm`` for the data loader workers, resources and GPUs per node (with
GPUs, tolerations and a node selector), and S3 and wandb credentials from Kubernetes Secrets
(``envFrom`` / ``secretKeyRef``): the object never holds a credential value. Pods are built with the kubernetes client's
models and serialised to the plain dict that ``CustomObjectsApi`` takes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from soho_core.storage import S3_SECRET

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"  # the training operator finds the training container by this name
ENTRY = "soho_core.launch.node"  # checks the soho arguments, then execs torch.distributed.run
# Exit codes 1-127 fail the replica for good (a usage error is 2; torchrun exits 1 once its own
# restarts are spent); 128 and up (out-of-memory kill, a preemption's SIGTERM) restart the pod.
RESTART_POLICY = "ExitCode"
RDZV_PORT = 23456  # the operator's default master port, exposed by the Master's service
# Set in every training pod. torch >= 2.4 shares the rendezvous store with the trainers and
# publishes its address only in the first rendezvous round, so a restarted pod (a new agent
# joining a later round) waits for it forever and times out (pytorch/pytorch#135712):
# tests/image/test_pods.py saw exactly that before this setting.
NODE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
TOLERATION_FIELDS = ("key", "operator", "value", "effect", "tolerationSeconds")  # a toleration as JSON
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# [registry[:port]/]path, then a tag, a digest or both: a name alone would mean whatever :latest is.
_IMAGE = re.compile(r"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*"
                    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class JobSpec:
    """What a PyTorchJob needs; every field is checked by :meth:`validate`.

    ``soho_args`` are the arguments after ``python -m soho_core`` (see
    :func:`soho_core.launch.soho_args`). ``env`` holds plain, non-secret settings only
    (wandb project and group, the pipeline run id); credentials come from the Secrets
    named by ``s3_secret`` (every key becomes a variable: ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...) and ``wandb_secret`` (key
    ``WANDB_API_KEY``, optional: without it wandb runs offline). ``tolerations`` (each a
    Kubernetes toleration as JSON: ``key``, ``operator``, ``value``, ``effect``,
    ``tolerationSeconds``) and ``node_selector`` (node labels) place the pods. The nodes pull
    ``image`` with ``image_pull_policy`` and, when set, the Secret named ``image_pull_secret``.
    """

    name: str
    namespace: str
    image: str
    soho_args: list[str]
    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0
    cpu_per_node: str = "4"
    memory_per_node: str = "16Gi"
    shm_size: str = "8Gi"
    s3_secret: str = S3_SECRET
    wandb_secret: str = "soho-wandb"
    env: dict[str, str] = field(default_factory=dict)
    service_account: str = ""
    max_restarts: int = 3  # torchrun restarts of the worker group; training resumes from its checkpoint
    backoff_limit: int = 3
    active_deadline_s: int = 0  # 0: no deadline (the watcher enforces its own timeout)
    ttl_after_finished_s: int = 3600
    labels: dict[str, str] = field(default_factory=dict)
    image_pull_policy: str = "IfNotPresent"
    image_pull_secret: str = ""
    tolerations: list[dict] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)

    def validate(self) -> "JobSpec":
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"PyTorchJob {what}")

        need(len(self.name) <= 63 and bool(_DNS_LABEL.match(self.name)),
             f"name {self.name!r} is not a DNS label (lower-case letters, digits, '-', at most 63)")
        need(bool(_DNS_LABEL.match(self.namespace)), f"namespace {self.namespace!r} is not a DNS label")
        need(bool(self.image), "image is empty")
        check_image(self.image, self.image_pull_policy, self.image_pull_secret)
        need(bool(self.soho_args), "soho_args is empty")
        need(self.nodes >= 1, f"nodes={self.nodes} must be >= 1")
        need(self.procs_per_node >= 1, f"procs_per_node={self.procs_per_node} must be >= 1")
        need(self.gpus_per_node >= 0, f"gpus_per_node={self.gpus_per_node} must be >= 0")
        need(self.gpus_per_node == 0 or self.procs_per_node <= self.gpus_per_node,
             f"procs_per_node={self.procs_per_node} exceeds gpus_per_node={self.gpus_per_node} (one GPU per process)")
        for key in ("cpu_per_node", "memory_per_node", "shm_size"):
            need(bool(_QUANTITY.match(str(getattr(self, key)))),
                 f"{key}={getattr(self, key)!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
        for t in self.tolerations:
            need(isinstance(t, dict) and set(t) <= set(TOLERATION_FIELDS),
                 f"toleration {t!r} is not a toleration (fields: {', '.join(TOLERATION_FIELDS)})")
        for key, value in self.node_selector.items():
            need(isinstance(value, str), f"node_selector {key}={value!r}: a label value is a string")
        for key in self.env:
            need(not _looks_secret(key), f"env {key!r} looks like a credential: put it in a Secret, not in env")
        return self


def check_image(image: str, pull_policy: str = "IfNotPresent", pull_secret: str = "") -> None:
    """Raise a ValueError naming what is wrong unless ``image`` is a reference with a tag or a digest
    (``registry/name:tag``, ``registry/name@sha256:<64 hex digits>``), ``pull_policy`` one of
    :data:`PULL_POLICIES` and ``pull_secret`` empty or a Secret's name."""
    match = _IMAGE.match(image)
    if not match:
        raise ValueError(f"image {image!r} is not an image reference (registry/name:tag or "
                         f"registry/name@sha256:<64 hex digits>)")
    if not (match["tag"] or match["digest"]):
        raise ValueError(f"image {image!r} names neither a tag nor a digest (nodes would pull whatever :latest is)")
    if pull_policy not in PULL_POLICIES:
        raise ValueError(f"image pull policy {pull_policy!r} is not one of {', '.join(PULL_POLICIES)}")
    if pull_secret and not (len(pull_secret) <= 253 and _DNS_SUBDOMAIN.match(pull_secret)):
        raise ValueError(f"image pull secret {pull_secret!r} is not a Secret's name "
                         f"(lower-case letters, digits, '-', '.')")


def _looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in ("SECRET", "PASSWORD", "TOKEN", "API_KEY", "ACCESS_KEY"))


def torchrun_command(spec: JobSpec) -> list[str]:
    """The container command: torchrun (behind :mod:`soho_core.launch.node`, which refuses a usage
    error before torchrun could retry it) with a c10d rendezvous at the Master's service.

    ``$(MASTER_ADDR)`` is set by the operator in every replica and expanded by the kubelet.
    """
    return ["python", "-m", ENTRY,
            f"--nnodes={spec.nodes}", f"--nproc-per-node={spec.procs_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=$(MASTER_ADDR):{RDZV_PORT}", f"--rdzv-id={spec.name}",
            f"--max-restarts={spec.max_restarts}",
            "-m", "soho_core", *spec.soho_args]


def pod_template(spec: JobSpec):
    """The pod template shared by Master and Workers, as a ``kubernetes.client.V1PodTemplateSpec``."""
    from kubernetes import client as k8s

    env = [k8s.V1EnvVar(name=k, value=str(v)) for k, v in sorted(spec.env.items())]
    env.append(k8s.V1EnvVar(name="WANDB_API_KEY", value_from=k8s.V1EnvVarSource(
        secret_key_ref=k8s.V1SecretKeySelector(name=spec.wandb_secret, key="WANDB_API_KEY", optional=True))))
    env.append(k8s.V1EnvVar(name="OMP_NUM_THREADS", value=threads_per_process(spec)))
    env += [k8s.V1EnvVar(name=k, value=v) for k, v in NODE_ENV.items()]
    limits = node_limits(spec)
    container = k8s.V1Container(
        name=CONTAINER, image=spec.image, image_pull_policy=spec.image_pull_policy,
        command=torchrun_command(spec), env=env,
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=spec.s3_secret))],
        ports=[k8s.V1ContainerPort(name="pytorchjob-port", container_port=RDZV_PORT)],
        resources=k8s.V1ResourceRequirements(requests=dict(limits), limits=limits),
        volume_mounts=[k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")])
    # The default 64 MiB /dev/shm is too small for data loader workers passing image batches.
    shm = k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=spec.shm_size))
    tolerations = [k8s.V1Toleration(key=t.get("key"), operator=t.get("operator"), value=t.get("value"),
                                    effect=t.get("effect"), toleration_seconds=t.get("tolerationSeconds"))
                   for t in spec.tolerations]
    pull_secrets = [k8s.V1LocalObjectReference(name=spec.image_pull_secret)] if spec.image_pull_secret else None
    pod = k8s.V1PodSpec(containers=[container], volumes=[shm], service_account_name=spec.service_account or None,
                        tolerations=tolerations or None, node_selector=dict(spec.node_selector) or None,
                        image_pull_secrets=pull_secrets)
    return k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=job_labels(spec)), spec=pod)


def job_labels(spec: JobSpec) -> dict[str, str]:
    """The labels of the job and of its pods."""
    return {"app.kubernetes.io/name": "soho", "app.kubernetes.io/component": "pretrain", **spec.labels}


def node_limits(spec: JobSpec) -> dict[str, str]:
    """Each node's resources (requested and limited alike): CPUs, memory and, with GPUs, one per process."""
    limits = {"cpu": spec.cpu_per_node, "memory": spec.memory_per_node}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    return limits


def threads_per_process(spec: JobSpec) -> str:
    """OMP_NUM_THREADS: the node's CPUs shared by its processes (torchrun would default to 1)."""
    return str(max(1, _cpu_count(spec.cpu_per_node) // spec.procs_per_node))


def _cpu_count(quantity: str) -> int:
    return int(float(quantity[:-1]) / 1000) if quantity.endswith("m") else int(float(quantity))


def build_pytorchjob(spec: JobSpec) -> dict:
    """The PyTorchJob as the plain dict ``CustomObjectsApi.create_namespaced_custom_object`` takes."""
    from kubernetes.client import ApiClient

    spec.validate()
    template = ApiClient().sanitize_for_serialization(pod_template(spec))
    replicas = {"Master": {"replicas": 1, "restartPolicy": RESTART_POLICY, "template": template}}
    if spec.nodes > 1:
        replicas["Worker"] = {"replicas": spec.nodes - 1, "restartPolicy": RESTART_POLICY, "template": template}
    run_policy: dict = {"cleanPodPolicy": "None", "backoffLimit": spec.backoff_limit,
                        "ttlSecondsAfterFinished": spec.ttl_after_finished_s}
    if spec.active_deadline_s:
        run_policy["activeDeadlineSeconds"] = spec.active_deadline_s
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": job_labels(spec)},
        "spec": {"nprocPerNode": str(spec.procs_per_node), "runPolicy": run_policy,
                 "pytorchReplicaSpecs": replicas},
    }


def job_name(prefix: str, run_id: str) -> str:
    """A DNS-label job name from a prefix and a pipeline run id: the same run id gives the same
    name, so a retried step finds (and adopts) the job it started before."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-") or "local"
    name = f"{prefix}-{slug}"[:63].rstrip("-")
    if not _DNS_LABEL.match(name):
        raise ValueError(f"cannot make a job name from prefix {prefix!r} and run id {run_id!r}")
    return name
