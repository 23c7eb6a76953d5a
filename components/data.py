"""The data step: render the synthetic world or check a dataset URI (cached: same inputs, same data)."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def data(source: str, store_root: str, num_images: int = 2000, seed: int = 0, image_size: int = 128,
         min_objects: int = 2, max_objects: int = 4) -> str:
    """Returns the dataset URI: ``source`` when it is a dataset written by ``soho data synth``,
    else (``source="synthetic"``) a new synthetic world under ``store_root/datasets/``."""
    from soho_core.pipeline.steps import prepare_data

    return prepare_data(source, store_root, num_images=num_images, seed=seed, image_size=image_size,
                        min_objects=min_objects, max_objects=max_objects)
