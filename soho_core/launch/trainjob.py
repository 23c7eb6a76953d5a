"""The TrainJob (``trainer.kubeflow.org/v1alpha1``, Kubeflow Trainer v2) that runs pre-training
on N nodes x M processes: the same image, command arguments, Secrets, resources and ``/dev/shm``
as :mod:`soho_core.launch.pytorchjob`, for clusters that have Trainer v2 instead of the training
operator v1 (``kubectl api-resources | grep -i trainjob``).

    from soho_core.launch.pytorchjob import JobSpec
    from soho_core.launch.trainjob import build_trainjob
    body = build_trainjob(JobSpec(name=..., namespace=..., image=IMAGE, soho_args=[...], nodes=2),
                          runtime="torch-distributed")

The job names a runtime (``ClusterTrainingRuntime`` ``torch-distributed`` by default, Trainer's
own) and fills its ``trainer`` slot: image, command, node count, processes per node, resources
per node, plain environment. What the ``trainer`` slot cannot hold goes into one
``runtimePatches`` entry on the runtime's ``node`` replicated job: the memory-backed ``/dev/shm``
volume, its mount, the service account, tolerations, node selector and image pull Secret.

The torch runtime gives every node ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``; ``torch.distributed.run`` reads its options from
those variables, so the command names no rendezvous of its own.

What v1 has and this v2 job does not (the runtime owns it, not the job):
- S3 credentials come key by key (``secretKeyRef``, each optional) rather than ``envFrom`` the
  whole Secret: the ``trainer`` slot and the container patch take ``env`` only. The keys are
  :data:`S3_SECRET_KEYS`.
- No image pull policy (``JobSpec.image_pull_policy``): Trainer v2.3.0's TrainJob CRD has no
  field for it. Its ``trainer`` slot holds ``image``, ``command``, ``args``, ``env``, ``numNodes``,
  ``numProcPerNode`` and ``resourcesPerNode``; a runtime patch's container holds ``name``,
  ``env``, ``volumeMounts`` and ``securityContext``. The runtime's own container sets the policy
  (Kubernetes' default when it sets none: ``IfNotPresent``, ``Always`` for ``:latest``). The pull
  Secret does pass: the pod patch has ``imagePullSecrets``.
- No ``backoffLimit`` or ``ttlSecondsAfterFinished`` per job: the runtime's JobSet sets its
  failure policy, and a finished TrainJob stays until deleted.
- Restarts are torchrun's only (``--max-restarts``); which pod failures the runtime's JobSet
  retries is the runtime's failure policy, not the job's (v1's ``restartPolicy: ExitCode``). A
  usage error still exits 2 before torchrun starts (:mod:`soho_core.launch.node`), and the
  runtime ``soho-torch-distributed`` (``manifests/trainjob/runtime``) fails the job on it at
  once; Trainer's own ``torch-distributed`` retries it like any failure.
"""

from __future__ import annotations

from soho_core.launch.pytorchjob import ENTRY, NODE_ENV, JobSpec, job_labels, node_limits, threads_per_process

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
NODE = "node"  # the torch runtime's replicated job and container
PATCH_MANAGER = "soho.kubeflow.org/launcher"
# The keys of the S3 Secret (manifests/secrets, the pipeline's S3_KEYS); each optional, as with envFrom.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")


def trainjob_command(spec: JobSpec) -> list[str]:
    """torchrun with no node options: the runtime's ``PET_*`` variables set nodes, processes,
    rank and master. Only the restart budget is ours."""
    return ["python", "-m", ENTRY, f"--max-restarts={spec.max_restarts}",
            "-m", "soho_core", *spec.soho_args]


def _secret_env(variable: str, secret: str, key: str) -> dict:
    return {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}


def build_trainjob(spec: JobSpec, runtime: str = "torch-distributed",
                   runtime_kind: str = "ClusterTrainingRuntime") -> dict:
    """The TrainJob as the plain dict ``CustomObjectsApi.create_namespaced_custom_object`` takes."""
    spec.validate()
    if not runtime:
        raise ValueError("TrainJob runtime is empty: name a (Cluster)TrainingRuntime, e.g. torch-distributed")
    if runtime_kind not in RUNTIME_KINDS:
        raise ValueError(f"TrainJob runtime kind {runtime_kind!r} is not one of {', '.join(RUNTIME_KINDS)}")
    env = [{"name": k, "value": str(v)} for k, v in sorted(spec.env.items())]
    env.append(_secret_env("WANDB_API_KEY", spec.wandb_secret, "WANDB_API_KEY"))
    env += [_secret_env(key, spec.s3_secret, key) for key in S3_SECRET_KEYS]
    env.append({"name": "OMP_NUM_THREADS", "value": threads_per_process(spec)})
    env += [{"name": k, "value": v} for k, v in NODE_ENV.items()]
    limits = node_limits(spec)
    pod: dict = {
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}],
        "containers": [{"name": NODE, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    if spec.image_pull_secret:
        pod["imagePullSecrets"] = [{"name": spec.image_pull_secret}]
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    labels = job_labels(spec)
    body_spec: dict = {
        "runtimeRef": {"apiGroup": GROUP, "kind": runtime_kind, "name": runtime},
        "trainer": {
            "image": spec.image,
            "command": trainjob_command(spec),
            "numNodes": spec.nodes,
            "numProcPerNode": spec.procs_per_node,
            "resourcesPerNode": {"requests": dict(limits), "limits": limits},
            "env": env,
        },
        "runtimePatches": [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                "name": NODE,
                "template": {"spec": {"template": {"metadata": {"labels": labels}, "spec": pod}}},
            }]}}},
        }],
    }
    if spec.active_deadline_s:
        body_spec["activeDeadlineSeconds"] = spec.active_deadline_s
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels},
        "spec": body_spec,
    }
