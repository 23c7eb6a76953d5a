"""A stand-in for the training operator and the kubelet: a PyTorchJob's replicas run as podman
containers of the real image on this machine.

What is taken from the job object, as a cluster would: each replica's pod template (command,
args, env, envFrom of Secrets and ConfigMaps, secretKeyRef with ``optional``, the
``/dev/shm`` emptyDir's size, the node's CPU limit), ``$(VAR)`` expansion in the command, and
``restartPolicy: ExitCode`` (a replica that exits 128 or above is started again under the same
name; one that exits 1-127 fails the job). What the operator adds is added here too: the
variables of its PyTorch controller (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``,
``RANK``, ``PET_*``) and a host name per pod that resolves to that pod's own loopback address
(127.0.0.2, 127.0.0.3, ...) in every replica, standing in for the Master's headless service.
All containers share the host's network, so a loopback S3 server is reachable from each.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from podman_helpers import podman

DEFAULT_PORT = 23456  # the operator's default when the template names no pytorchjob-port


@dataclass
class Pod:
    name: str
    replica_type: str  # Master or Worker
    index: int
    rank: int
    address: str
    container: dict
    volumes: list[dict]
    restart_policy: str
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: a defined variable is replaced, ``$$`` escapes, anything
    else is left as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class PyTorchJobRunner:
    """Runs one PyTorchJob (the dict that would be sent to the API server) as containers."""

    def __init__(self, job: dict, secrets: dict[str, dict[str, str]], config_maps: dict[str, dict[str, str]],
                 workdir: Path, image: str | None = None):
        self.job, self.secrets, self.config_maps, self.workdir = job, secrets, config_maps, workdir
        self.name = job["metadata"]["name"]
        specs = job["spec"]["pytorchReplicaSpecs"]
        self.pods: list[Pod] = []
        for replica_type in ("Master", "Worker"):
            spec = specs.get(replica_type)
            for index in range(spec["replicas"] if spec else 0):
                template = spec["template"]["spec"]
                (container,) = [c for c in template["containers"] if c["name"] == "pytorch"]
                if image:
                    container = {**container, "image": image}
                rank = len(self.pods)
                self.pods.append(Pod(name=f"{self.name}-{replica_type.lower()}-{index}", replica_type=replica_type,
                                     index=index, rank=rank, address=f"127.0.0.{2 + rank}", container=container,
                                     volumes=template.get("volumes", []),
                                     restart_policy=spec.get("restartPolicy", "Never")))
        if not self.pods or self.pods[0].replica_type != "Master":
            raise ValueError(f"PyTorchJob {self.name} has no Master replica")

    # -------------------------------------------------------------------------------- the pod

    def operator_env(self, pod: Pod) -> dict[str, str]:
        """What the training operator's PyTorch controller sets in every replica."""
        master = self.pods[0]
        ports = [p["containerPort"] for p in master.container.get("ports", []) if p.get("name") == "pytorchjob-port"]
        port = str(ports[0] if ports else DEFAULT_PORT)
        nproc = str(self.job["spec"].get("nprocPerNode", "1"))
        nnodes = str(len(self.pods))
        return {"PYTHONUNBUFFERED": "1", "MASTER_ADDR": master.name, "MASTER_PORT": port,
                "WORLD_SIZE": str(len(self.pods) * int(nproc)), "RANK": str(pod.rank),
                "PET_MASTER_ADDR": master.name, "PET_MASTER_PORT": port, "PET_NNODES": nnodes,
                "PET_NPROC_PER_NODE": nproc, "PET_NODE_RANK": str(pod.rank)}

    def container_env(self, pod: Pod) -> dict[str, str]:
        """envFrom, then env (which wins), then the operator's variables, as the kubelet resolves them."""
        env: dict[str, str] = {}
        for source in pod.container.get("envFrom", []):
            for kind, store in (("secretRef", self.secrets), ("configMapRef", self.config_maps)):
                if kind in source:
                    ref = source[kind]
                    if ref["name"] not in store and not ref.get("optional"):
                        raise LookupError(f"pod {pod.name}: {kind} {ref['name']!r} does not exist")
                    env.update(store.get(ref["name"], {}))
        for var in pod.container.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(str(var["value"]), env)
                continue
            source = var["valueFrom"]
            kind, store = (("secretKeyRef", self.secrets) if "secretKeyRef" in source
                           else ("configMapKeyRef", self.config_maps))
            ref = source[kind]
            value = store.get(ref["name"], {}).get(ref["key"])
            if value is None:
                if not ref.get("optional"):
                    raise LookupError(f"pod {pod.name}: {kind} {ref['name']}/{ref['key']} does not exist")
                continue
            env[var["name"]] = value
        env.update(self.operator_env(pod))
        return env

    def start(self, pod: Pod) -> None:
        env = self.container_env(pod)
        command = [expand(part, env) for part in pod.container.get("command", []) + pod.container.get("args", [])]
        env_file = self.workdir / f"{pod.name}.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        env_file.chmod(0o600)
        args = ["run", "-d", "--name", pod.name, "--hostname", pod.name, "--network", "host",
                "--env-file", str(env_file), "--entrypoint", command[0]]
        for other in self.pods:
            args += ["--add-host", f"{other.name}:{other.address}"]
        for volume in pod.volumes:
            if volume.get("emptyDir", {}).get("medium") == "Memory":
                mounts = [m["mountPath"] for m in pod.container.get("volumeMounts", []) if m["name"] == volume["name"]]
                if mounts == ["/dev/shm"]:
                    args += ["--shm-size", _bytes(volume["emptyDir"].get("sizeLimit", "64Mi"))]
        podman("rm", "-f", pod.name, check=False)
        podman(*args, pod.container["image"], *command[1:])

    # -------------------------------------------------------------------------------- the job

    def run(self, timeout: float, on_tick=None) -> None:
        """Start every replica, restart those the policy restarts, return when all exited 0;
        ``on_tick(runner)`` is called about once a second while the job runs."""
        for pod in self.pods:
            self.start(pod)
        deadline = time.monotonic() + timeout
        running = {pod.name for pod in self.pods}
        while running:
            if time.monotonic() > deadline:
                raise TimeoutError(f"PyTorchJob {self.name} still running after {timeout:.0f} s:\n{self.logs()}")
            if on_tick is not None:
                on_tick(self)
            for pod in self.pods:
                if pod.name not in running:
                    continue
                state = self.state(pod)
                if state["Running"]:
                    continue
                code = int(state["ExitCode"])
                pod.exit_codes.append(code)
                if code == 0:
                    running.discard(pod.name)
                elif self.retried(pod, code):
                    pod.restarts += 1
                    self.start(pod)
                else:
                    raise RuntimeError(f"pod {pod.name} failed with exit code {code} "
                                       f"(restartPolicy {pod.restart_policy}):\n{self.logs()}")
            time.sleep(1)

    def retried(self, pod: Pod, code: int) -> bool:
        """The operator's restart decision for a replica that exited non-zero."""
        backoff = self.job["spec"].get("runPolicy", {}).get("backoffLimit", 6)
        if sum(p.restarts for p in self.pods) >= backoff:
            return False
        return pod.restart_policy in ("Always", "OnFailure") or (pod.restart_policy == "ExitCode" and code >= 128)

    def state(self, pod: Pod) -> dict:
        out = podman("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", pod.name).stdout.split()
        return {"Running": out[0] == "true", "ExitCode": out[1]}

    def kill(self, pod: Pod) -> None:
        """SIGKILL to the container's first process (torchrun): the pod dies with exit code 137."""
        podman("kill", "-s", "KILL", pod.name)

    def logs(self, tail: int = 40) -> str:
        """The last lines of every pod's output (podman keeps stdout and stderr apart)."""
        parts = []
        for pod in self.pods:
            out = podman("logs", "--tail", str(tail), pod.name, check=False)
            parts.append(f"--- {pod.name}\n{out.stdout}{out.stderr}")
        return "\n".join(parts)

    def delete(self) -> None:
        for pod in self.pods:
            podman("rm", "-f", pod.name, check=False)
            (self.workdir / f"{pod.name}.env").unlink(missing_ok=True)


def _bytes(quantity: str) -> str:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return str(int(float(quantity[: -len(unit)]) * factor))
    return quantity
