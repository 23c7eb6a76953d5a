"""The data step: render the synthetic world, download the official datasets, or check a dataset
URI (cached: same inputs, same data)."""

from typing import List

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def data(source: str, store_root: str, num_images: int = 2000, seed: int = 0, image_size: int = 128,
         min_objects: int = 2, max_objects: int = 4, tasks: List[str] = [], questions_per_image: int = 16) -> str:
    """Returns the dataset URI. ``source``: ``synthetic`` (a new synthetic world under
    ``store_root/datasets/``), ``official`` (download what pre-training and ``tasks`` need into
    ``store_root/datasets/official``), or the URI of a dataset already in place (written by
    ``soho data synth``, or in the official layout)."""
    from soho_core.pipeline.steps import prepare_data

    return prepare_data(source, store_root, num_images=num_images, seed=seed, image_size=image_size,
                        min_objects=min_objects, max_objects=max_objects, tasks=tasks,
                        questions_per_image=questions_per_image)
