"""The paper's central claim, measured: does pre-training help every task, and does the
visual dictionary (with MVM) add to it?

    soho ablate --data SHARDS --out DIR [--config demo] [--tasks vqa,nlvr2,retrieval,ve]

Three variants, each fine-tuned on every task with the same budget (``finetune.max_steps``):
  scratch  no pre-training: fine-tuning starts from random weights
  no_vd    pre-training with MLM + ITM only (model.dictionary.enabled=false: no VD, no MVM)
  soho     full SOHO pre-training: MLM + MVM + ITM with the visual dictionary
Every run resumes, and finished evaluations are kept, so an interrupted ablation picks up
where it stopped. Writes DIR/ablation.json and prints one table.
"""

from __future__ import annotations

from typing import Any

from soho_core import storage
from soho_core.config import load_config
from soho_core.tasks.catalog import DOWNSTREAM, get_task
from soho_core.train.engine import evaluate, train

VARIANTS: dict[str, list[str] | None] = {
    "scratch": None,
    "no_vd": ["model.dictionary.enabled=false"],
    "soho": [],
}
PRIMARY = {"vqa": "vqa_score", "nlvr2": "accuracy", "retrieval": "r_mean", "ve": "accuracy"}


def ablate(data: str, out: str, preset: str = "demo", overrides: list[str] | None = None,
           tasks: tuple[str, ...] = DOWNSTREAM, variants: tuple[str, ...] = tuple(VARIANTS),
           split: str = "test") -> dict[str, dict[str, float]]:
    overrides = list(overrides or [])
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    tasks_ = [get_task(t) for t in tasks]  # an unknown task fails here, before any training
    table: dict[str, dict[str, float]] = {}
    for variant in variants:
        init = None
        if VARIANTS[variant] is not None:
            init = storage.join(out, f"pretrain-{variant}")
            train(get_task("pretrain"), load_config(preset, overrides + VARIANTS[variant]), data, init)
        table[variant] = {}
        for task in tasks_:
            run = storage.join(out, f"{variant}-{task.name}")
            train(task, load_config(preset, overrides), data, run, init=init)
            result_uri = storage.join(run, f"metrics-{split}.json")
            if not storage.exists(result_uri):
                evaluate(task, run, data, result_uri, split=split)
            table[variant][task.name] = storage.read_json(result_uri)["metrics"][PRIMARY[task.name]]
    storage.write_json_atomic(storage.join(out, "ablation.json"),
                              {"preset": preset, "overrides": overrides, "split": split, "metrics": PRIMARY,
                               "table": table})
    return table


def format_table(table: dict[str, dict[str, Any]]) -> str:
    tasks = list(next(iter(table.values())).keys()) if table else []
    head = "| pre-training | " + " | ".join(f"{t} ({PRIMARY[t]})" for t in tasks) + " |"
    rule = "|---|" + "---|" * len(tasks)
    rows = [f"| {v} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) + " |" for v, row in table.items()]
    return "\n".join([head, rule, *rows])
