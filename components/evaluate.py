"""The evaluation step of one task: metrics.json beside the checkpoint, and KFP Metrics."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(task: str, checkpoint: Input[Model], shards: Input[Dataset], metrics: Output[Metrics],
             overrides: List[str] = [], split: str = "test"):
    """Evaluates the run's latest checkpoint on ``split``; ``metrics`` stands for its metrics.json and
    logs every metric as ``<task>/<name>``, its blind baselines as ``<task>/prior/<name>`` and
    ``<task>/blind_model/<name>``, and ``<task>/gain``."""
    from soho_core.pipeline.steps import evaluate as run
    from soho_core.pipeline.steps import location, publish

    uri, report = run(task, location(checkpoint), location(shards), overrides, split=split)
    logged = {f"{task}/{name}": value for name, value in report["metrics"].items()}
    for kind, values in report.get("baselines", {}).items():
        logged.update({f"{task}/{kind}/{name}": value for name, value in values.items()})
    logged[f"{task}/gain"] = report.get("gain")
    for name, value in logged.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(name, float(value))
    publish(metrics, uri)
