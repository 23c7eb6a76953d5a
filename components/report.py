"""The report step: report.md with its plots in the store; the report as Markdown and HTML
artifacts, each task's primary metric as KFP Metrics."""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Input, Markdown, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(pretrain: Input[Model], evaluations: Input[List[Metrics]], dataset: str, store_root: str, run_id: str,
           markdown: Output[Markdown], html: Output[HTML], metrics: Output[Metrics]) -> str:
    """Returns the URI of ``report.md`` (``runs/<run_id>/report/``); compares with the previous
    run recorded at ``store_root/reports/latest.json`` and then records this one there."""
    from soho_core.pipeline.steps import location
    from soho_core.pipeline.steps import report as run

    result = run(location(pretrain), [location(e) for e in evaluations], dataset, store_root, run_id)
    with open(markdown.path, "w") as f:
        f.write(result.markdown_inline)
    with open(html.path, "w") as f:
        f.write(result.html)
    for task, name in result.summary["primary"].items():
        metrics.log_metric(f"{task}/{name}", float(result.summary["metrics"][task]["metrics"][name]))
    print(result.markdown, flush=True)
    return result.uri
