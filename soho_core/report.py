"""The pipeline's report, for a person: ``report.md`` with PNG plots beside it, and the same
report as one HTML page with the plots inside (the Kubeflow UI's HTML viewer shows it).

    from soho_core.report import write_report
    result = write_report(out_uri, pretrain_run, [vqa_metrics_json, ...], dataset_uri,
                          run_id="...", history_uri=STORE/reports/latest.json)

It shows every task's metrics (with the change against the previous run recorded in
``history_uri``, if any), each metric against its blind baselines (the training split's
per-type majority answer and the model with constant images; a table, a bar chart and a
breakdown by question / statement / hypothesis type), the pre-training loss curves, the
visual dictionary's usage over training, fine-tuning loss curves, and a few sample
predictions with their images (copied beside the report). Reads only the files the training
and evaluation write (``metrics.jsonl``, ``metrics.json``), at any URI.
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from soho_core import storage

# The one number per task that the table leads with (as in the ablation table).
PRIMARY = {"vqa": "vqa_score", "nlvr2": "accuracy", "retrieval": "r_mean", "ve": "accuracy"}
LOSS_KEYS = ("loss", "loss_mlm", "loss_mvm", "loss_itm", "loss_itc")
BASELINES = {"prior": "text prior", "blind_model": "blind model"}  # metrics.json key -> column title
MAX_TYPES = 12  # breakdown rows per task in the report (metrics.json holds every type)
DICT_KEYS = ("vd_usage", "vd_perplexity")


@dataclass
class Report:
    markdown: str  # report.md as written (images linked by relative path)
    markdown_inline: str  # the same, images embedded as data URIs (for the Kubeflow UI's Markdown viewer)
    html: str  # the same as one HTML page, images embedded
    uri: str  # where report.md was written
    summary: dict[str, Any]  # {"run_id", "metrics": {task: {name: value}}, "primary": {task: name}}
    images: dict[str, bytes] = field(default_factory=dict)  # relative path -> PNG bytes


def _read_jsonl(uri: str) -> list[dict[str, Any]]:
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def _plot(series: dict[str, tuple[list[float], list[float]]], title: str, ylabel: str,
          log_y: bool = False) -> bytes | None:
    """One PNG with a line per series {label: (x, y)}; None when there is nothing to draw."""
    series = {k: v for k, v in series.items() if v[0]}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod or a test
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label, linewidth=1.5)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _curves(rows: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, tuple[list[float], list[float]]]:
    out = {}
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        out[key] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _delta(now: Any, before: Any) -> str:
    if not isinstance(now, (int, float)) or not isinstance(before, (int, float)):
        return "-"
    return f"{now - before:+.4f}"


def _aside(metric: str) -> bool:
    """Timings and bookkeeping stay in metrics.json, out of the table."""
    return metric.endswith("_seconds") or metric.startswith(("two_stage", "pairs", "num_", "shortlist"))


def metrics_table(summary: dict[str, Any], previous: dict[str, Any] | None = None) -> str:
    """A Markdown table: one row per task, its primary metric first, the change against
    ``previous`` (a summary of an earlier run), then the other metrics."""
    rows = ["| task | split | examples | metric | value | change vs previous run | other metrics |",
            "|---|---|---|---|---|---|---|"]
    prev = (previous or {}).get("metrics", {})
    for task, entry in summary["metrics"].items():
        name = summary["primary"][task]
        values = entry["metrics"]
        others = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items()
                           if k != name and isinstance(v, float) and not _aside(k))
        rows.append(f"| {task} | {entry['split']} | {entry['num_examples']} | {name} | {_fmt(values.get(name))} | "
                    f"{_delta(values.get(name), prev.get(task, {}).get('metrics', {}).get(name)) if prev else 'first run'}"
                    f" | {others or '-'} |")
    return "\n".join(rows)


def _cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def baselines_table(summary: dict[str, Any]) -> str:
    """A Markdown table: per task with baselines, its primary metric, each blind baseline and the
    gain (metric - best baseline); "" when no task has baselines (metrics.json from before them)."""
    rows = ["| task | metric | value | " + " | ".join(BASELINES.values()) + " | gain |",
            "|---|---|---|" + "---|" * len(BASELINES) + "---|"]
    for task, entry in summary["metrics"].items():
        if not entry.get("baselines"):
            continue
        name = summary["primary"][task]
        base = [_cell(entry["baselines"].get(k, {}).get(name)) for k in BASELINES]
        gain = entry.get("gain")
        rows.append(f"| {task} | {name} | {_cell(entry['metrics'].get(name))} | {' | '.join(base)} | "
                    f"{f'{gain:+.4f}' if isinstance(gain, (int, float)) else '-'} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def breakdown_table(breakdown: dict[str, dict[str, Any]], limit: int = MAX_TYPES, key: str = "type",
                    count: str = "examples") -> str:
    """A Markdown table of one task's breakdown {type: {"n", "metric", "prior", "blind_model"}},
    the ``limit`` most frequent types first; the gain column is metric - best baseline. ``key``
    and ``count`` title the first two columns (retrieval: "direction", "queries")."""
    ranked = sorted(breakdown.items(), key=lambda kv: (-kv[1].get("n", 0), kv[0]))
    rows = [f"| {key} | {count} | model | " + " | ".join(BASELINES.values()) + " | gain |",
            "|---|---|---|" + "---|" * len(BASELINES) + "---|"]
    for kind, row in ranked[:limit]:
        base = [row[k] for k in BASELINES if isinstance(row.get(k), (int, float))]
        gain = f"{row['metric'] - max(base):+.4f}" if base and isinstance(row.get("metric"), (int, float)) else "-"
        rows.append(f"| {kind} | {row.get('n', '-')} | {_cell(row.get('metric'))} | "
                    f"{' | '.join(_cell(row.get(k)) for k in BASELINES)} | {gain} |")
    if len(ranked) > limit:
        rows.append(f"| ({len(ranked) - limit} more types in metrics.json) | "
                    f"{sum(r.get('n', 0) for _, r in ranked[limit:])} | | | | |")
    return "\n".join(rows)


def _baseline_bars(summary: dict[str, Any]) -> bytes | None:
    """One PNG: per task with baselines, its primary metric next to each blind baseline."""
    tasks = [t for t, e in summary["metrics"].items() if e.get("baselines")]
    if not tasks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    bars = {"model": [summary["metrics"][t]["metrics"].get(summary["primary"][t]) for t in tasks]}
    for key, title in BASELINES.items():
        bars[title] = [summary["metrics"][t]["baselines"].get(key, {}).get(summary["primary"][t]) for t in tasks]
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(tasks) + 1.5), 3.4), dpi=100)
    for i, (label, values) in enumerate(bars.items()):
        xs = [k + (i - (len(bars) - 1) / 2) * width for k in range(len(tasks))]
        heights = [v if isinstance(v, (int, float)) else 0.0 for v in values]
        drawn = ax.bar(xs, heights, width, label=label)
        ax.bar_label(drawn, labels=[f"{v:.2f}" if isinstance(v, (int, float)) else "-" for v in values], fontsize=7)
    ax.set_xticks(range(len(tasks)), [f"{t}\n({summary['primary'][t]})" for t in tasks])
    ax.set_ylim(0, 1.25)  # room above a bar at 1.0 for the legend
    ax.set_ylabel("score")
    ax.set_title("each task against its blind baselines")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(bars), loc="upper center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _sample_rows(task: str, samples: list[dict[str, Any]], image_link) -> list[str]:
    """Markdown lines showing a few predictions of one task with their images."""
    lines = []
    for s in samples[:3]:
        if task == "vqa":
            ok = s["prediction"] in s.get("answers", [])
            lines.append(f"| {image_link(s['image_id'])} | {s['question']} | {s['prediction']} "
                         f"({s['probability']:.2f}) | {'yes' if ok else 'no'} (humans: {', '.join(sorted(set(s.get('answers', []))))}) |")
        elif task == "ve":
            lines.append(f"| {image_link(s['image_id'])} | {s['hypothesis']} | {s['prediction']} "
                         f"({s['probability']:.2f}) | {'yes' if s['prediction'] == s['label'] else 'no'} ({s['label']}) |")
        elif task == "nlvr2":
            lines.append(f"| {image_link(s['left_image_id'])} {image_link(s['right_image_id'])} | {s['statement']} | "
                         f"{s['prediction']} ({s['probability']:.2f}) | "
                         f"{'yes' if s['prediction'] == s['label'] else 'no'} ({s['label']}) |")
        elif task == "retrieval":
            top = s.get("top_images", [])
            ranked = " ".join(image_link(t["image_id"]) for t in top)
            hit = next((i + 1 for i, t in enumerate(top) if t.get("correct")), None)
            lines.append(f"| {image_link(s['image_id'])} | {s['caption']} | {ranked} | "
                         f"{f'rank {hit}' if hit else 'not in top ' + str(len(top))} |")
    return lines


_SAMPLE_HEAD = {
    "vqa": "| image | question | answer (probability) | correct |",
    "ve": "| image | hypothesis | prediction (probability) | correct |",
    "nlvr2": "| left, right | statement | prediction (probability) | correct |",
    "retrieval": "| image | caption | best-scored images for this caption | true image |",
}


def write_report(out_uri: str, pretrain_run: str, metrics_uris: Sequence[str], dataset: str = "",
                 run_id: str = "", history_uri: str = "") -> Report:
    """Write ``out_uri/report.md`` and its PNGs; record this run's metrics at ``history_uri``
    (after reading the previous run's from there) so the next report can compare."""
    results = [storage.read_json(u) for u in sorted(metrics_uris)]
    summary = {"run_id": run_id, "primary": {}, "metrics": {}}
    for r in sorted(results, key=lambda r: r["task"]):
        task = r["task"]
        summary["primary"][task] = PRIMARY.get(task) or next(iter(r["metrics"]))
        summary["metrics"][task] = {"split": r["split"], "num_examples": r["num_examples"], "metrics": r["metrics"],
                                    **{k: r[k] for k in ("baselines", "gain") if k in r}}
    previous = storage.read_json(history_uri) if history_uri and storage.exists(history_uri) else None
    if previous and previous.get("run_id") == run_id:
        previous = None  # a retried report step must not compare the run with itself

    images: dict[str, bytes] = {}
    md = ["# SOHO pipeline report", ""]
    if run_id:
        md += [f"Pipeline run `{run_id}` (the wandb group of its trainings).", ""]
    md += ["## Downstream tasks", "", metrics_table(summary, previous), ""]
    if previous:
        md += [f"Changes are against run `{previous.get('run_id', '?')}`.", ""]
    table = baselines_table(summary)
    if table:
        md += ["## Against blind baselines", "",
               "How much of each number comes from the image. *Text prior*: the training split's "
               "majority answer (label) for each question (statement, hypothesis) type; for retrieval, "
               "chance-level recall. *Blind model*: the same model with every image replaced by a flat "
               "grey one. *Gain*: the metric minus the better of the two.", "", table, ""]
        png = _baseline_bars(summary)
        if png:
            images["baselines.png"] = png
            md += ["![Each task's metric next to its blind baselines](baselines.png)", ""]
        for r in sorted(results, key=lambda r: r["task"]):
            if r.get("breakdown"):
                key, count = ("direction", "queries") if r["task"] == "retrieval" else ("type", "examples")
                md += [f"### {r['task']}: {summary['primary'][r['task']]} by {key}", "",
                       breakdown_table(r["breakdown"], key=key, count=count), ""]

    rows = _read_jsonl(storage.join(pretrain_run, "metrics.jsonl"))
    md += ["## Pre-training", ""]
    if rows:
        last = rows[-1]
        md += [f"{last['step']} steps; final " + ", ".join(f"{k} {_fmt(last[k])}" for k in LOSS_KEYS + DICT_KEYS
                                                       if isinstance(last.get(k), float)) + ".", ""]
    for name, png, caption in (
            ("pretrain_loss.png", _plot(_curves(rows, LOSS_KEYS), "pre-training losses", "loss", log_y=True),
             "Pre-training losses (MLM, MVM, ITM, ITC and their weighted sum)"),
            ("dictionary_usage.png", _plot(_curves(rows, ("vd_usage",)), "visual dictionary usage",
                                           "fraction of entries used"),
             "Visual dictionary: fraction of entries used in each logging window"),
            ("dictionary_perplexity.png", _plot(_curves(rows, ("vd_perplexity",)), "visual dictionary perplexity",
                                                "perplexity"),
             "Visual dictionary: perplexity of the assignment distribution")):
        if png:
            images[name] = png
            md += [f"![{caption}]({name})", ""]
    if not rows:
        md += [f"No metrics.jsonl under {pretrain_run}.", ""]

    ft = {r["task"]: _read_jsonl(storage.join(u.rsplit("/", 1)[0], "metrics.jsonl"))
          for u, r in zip(sorted(metrics_uris), results)}
    png = _plot({t: _curves(rs, ("loss",))["loss"] for t, rs in sorted(ft.items())}, "fine-tuning loss", "loss")
    if png:
        images["finetune_loss.png"] = png
        md += ["## Fine-tuning", "", "![Fine-tuning loss of every task](finetune_loss.png)", ""]

    def image_link(image_id: str) -> str:
        rel = f"samples/{re.sub(r'[^A-Za-z0-9_.-]', '_', image_id)}.png"
        src = storage.join(dataset, "images", f"{image_id}.png") if dataset else ""
        if rel not in images and src and storage.exists(src):
            images[rel] = storage.read_bytes(src)
        return f"![{image_id}]({rel})" if rel in images else f"`{image_id}`"

    sample_md = []
    for r in sorted(results, key=lambda r: r["task"]):
        if r.get("samples"):
            sample_md += [f"### {r['task']}", "", _SAMPLE_HEAD[r["task"]], "|---|---|---|---|",
                          *_sample_rows(r["task"], r["samples"], image_link), ""]
    if sample_md:
        md += ["## Sample predictions", "", *sample_md]

    text = "\n".join(md)
    for rel, data in images.items():
        storage.write_bytes_atomic(storage.join(out_uri, rel), data)
    uri = storage.join(out_uri, "report.md")
    storage.write_bytes_atomic(uri, text.encode())
    storage.write_json_atomic(storage.join(out_uri, "summary.json"), summary)
    if history_uri:
        storage.write_json_atomic(history_uri, summary)

    inline = text
    for rel, data in images.items():
        inline = inline.replace(f"]({rel})", f"]({_data_uri(data)})")
    return Report(markdown=text, markdown_inline=inline, html=to_html(inline), uri=uri, summary=summary,
                  images=images)


def _data_uri(png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


_STYLE = ("body{font-family:sans-serif;max-width:70em;margin:1em auto;padding:0 1em}"
          "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left}"
          "td img{max-height:64px}code{background:#f3f3f3}")


def to_html(markdown: str) -> str:
    """Markdown (CommonMark with tables, rendered by markdown-it-py) as one HTML page."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>SOHO pipeline report</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n{body}</body></html>\n")
