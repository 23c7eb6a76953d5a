"""The exit handler: runs once the rest of the run has ended, however it ended."""

from kfp import dsl
from kfp.dsl import PipelineTaskFinalStatus

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish(store_root: str, run_id: str, status: PipelineTaskFinalStatus, launcher: str = "pytorchjob",
           namespace: str = "") -> str:
    """Returns the URI of ``runs/<run_id>/status.json``, the run's final state. When the run did not
    succeed, first deletes a pre-training job that is still running."""
    from soho_core.pipeline.steps import finish_run

    return finish_run(store_root, run_id, status.state, status.error_message or "", launcher=launcher,
                      namespace=namespace)
