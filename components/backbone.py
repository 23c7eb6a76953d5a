"""The CNN warm-start step: the preset's CNN trained on the objects of a second synthetic world
(cached: same inputs, same weights)."""

from typing import List

from kfp import dsl
from kfp.dsl import Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def backbone(dataset: str, store_root: str, preset: str, steps: int, cnn: Output[Model], overrides: List[str] = []):
    """``cnn`` stands for the trained CNN's weights (a ``model.backbone.weights`` file), or for nothing
    (an empty URI) when ``steps`` is 0 or ``dataset`` has no object labels (the official datasets)."""
    from soho_core.pipeline.steps import publish, warm_backbone

    publish(cnn, warm_backbone(dataset, store_root, preset, steps, overrides))
