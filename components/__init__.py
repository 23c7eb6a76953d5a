"""KFP v2 components, one file per pipeline step. Each holds only its signature and a
docstring; the work is done by :mod:`soho_core.pipeline.steps`. Shards, checkpoints and metrics
pass between them as typed artifacts that point into the store (:func:`~soho_core.pipeline.steps.publish`).

Every component runs the one image below, tagged with the package version, so a
compiled pipeline names the image built from the same code unless it is compiled with
another (``soho pipeline compile --image``, by tag or by digest).
"""

import soho_core

# The image built from docker/ for this version of the package (CI pushes it on release).
IMAGE = f"ghcr.io/soho-kubeflow/soho:{soho_core.__version__}"
