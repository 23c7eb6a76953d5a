"""The image's tests: run by `make test-image` after `make image` (and by .ci/run), not by
`make test`. They need podman and runc, and the image built; where either is missing they fail
with what to do, never skip."""

from __future__ import annotations

import os
import shutil

import pytest

from podman_helpers import ROOT, default_image, podman


@pytest.fixture(scope="session")
def image() -> str:
    """The image under test (SOHO_IMAGE, default: what `make image` built), checked to exist."""
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed (apt-get install podman runc); .ci/run installs it")
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "docker" / "containers.conf"))
    ref = os.environ.get("SOHO_IMAGE") or default_image()
    if podman("image", "exists", ref, check=False).returncode != 0:
        pytest.fail(f"image {ref} not found: run `make image` first (or set SOHO_IMAGE)")
    return ref
