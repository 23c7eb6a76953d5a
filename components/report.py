"""The report step: report.md with its plots in the store, a Markdown artifact, KFP Metrics."""

from typing import List

from kfp import dsl
from kfp.dsl import Markdown, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(pretrain_run: str, metrics_uris: List[str], dataset: str, store_root: str, run_id: str,
           markdown: Output[Markdown], metrics: Output[Metrics]) -> str:
    """Returns the URI of ``report.md`` (``runs/<run_id>/report/``); compares with the previous
    run recorded at ``store_root/reports/latest.json`` and then records this one there."""
    from soho_core import storage
    from soho_core.report import write_report

    result = write_report(storage.join(store_root, "runs", run_id, "report"), pretrain_run, metrics_uris,
                          dataset=dataset, run_id=run_id,
                          history_uri=storage.join(store_root, "reports", "latest.json"))
    with open(markdown.path, "w") as f:
        f.write(result.markdown_inline)
    for task, name in result.summary["primary"].items():
        metrics.log_metric(f"{task}/{name}", float(result.summary["metrics"][task]["metrics"][name]))
    print(result.markdown, flush=True)
    return result.uri
