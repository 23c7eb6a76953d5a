"""The paper's central claim, measured: does pre-training help every task, and does the
visual dictionary (with MVM) add to it? Over several seeds, with the spread.

    soho ablate --data SHARDS --out DIR [--config demo] [--tasks vqa,nlvr2,retrieval,ve] [--seeds 0,1,2]

Three variants, each fine-tuned on every task with the same budget (``finetune.max_steps``):
  scratch  no pre-training: fine-tuning starts from random weights
  no_vd    pre-training with MLM + ITM only (model.dictionary.enabled=false: no VD, no MVM)
  soho     full SOHO pre-training: MLM + MVM + ITM with the visual dictionary
Each seed sets ``train.seed`` for its pre-trainings and every fine-tune, and has its own folder:
DIR/seed-1/pretrain-soho, DIR/seed-1/soho-vqa, ... A finished evaluation is kept (its run is not
touched again) and every run resumes, so an interrupted ablation picks up where it stopped. A
DIR written before seeds existed (runs directly in DIR) is taken as seed 0, so it is extended,
not redone.

Writes DIR/ablation.json (per variant and task: the per-seed values of the task's primary metric,
their mean, sample standard deviation, min and max, the mean text-prior and blind-model scores
and the mean gain over the best of them; and two effects paired by seed: ``pretraining`` = soho
- scratch, ``dictionary`` = soho - no_vd) and prints it as one table.

    python -m pytest -q tests/test_ablate.py
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
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
# name -> (with, without): the effect is with - without, paired by seed.
EFFECTS = {"pretraining": ("soho", "scratch"), "dictionary": ("soho", "no_vd")}
SEED_LIMIT = 2**32  # numpy's seeds are 32-bit


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2). Anything but distinct whole numbers in [0, 2**32) is a
    ValueError that names the value."""
    items = [s.strip() for s in str(text).split(",")]
    if not any(items):
        raise ValueError(f"--seeds {text!r}: give one or more seeds, e.g. --seeds 0,1,2")
    seeds = []
    for item in items:
        try:
            seeds.append(int(item, 10))
        except ValueError:
            raise ValueError(f"--seeds {text!r}: {item!r} is not a whole number (e.g. --seeds 0,1,2)") from None
    return check_seeds(seeds, f"--seeds {text!r}")


def check_seeds(seeds: Sequence[int], what: str = "seeds") -> tuple[int, ...]:
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError(f"{what}: give at least one seed")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < SEED_LIMIT:
            raise ValueError(f"{what}: seed {s!r} must be a whole number in [0, 2**32)")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"{what}: seed {repeated[0]} is given twice (each seed is one repeat of every run)")
    return seeds


def seed_dir(out: str, seed: int) -> str:
    """The folder of one seed's runs: DIR/seed-N, except that seed 0 of a DIR laid out before
    seeds existed (runs directly in DIR, no seed-0 folder) stays in DIR."""
    folder = storage.join(out, f"seed-{seed}")
    if seed == 0 and not storage.exists(folder):
        legacy = [f"pretrain-{v}" for v in VARIANTS] + [f"{v}-{t}" for v in VARIANTS for t in DOWNSTREAM]
        if any(storage.exists(storage.join(out, name)) for name in legacy):
            return out
    return folder


def ablate(data: str, out: str, preset: str = "demo", overrides: list[str] | None = None,
           tasks: tuple[str, ...] = DOWNSTREAM, variants: tuple[str, ...] = tuple(VARIANTS),
           split: str = "test", seeds: Sequence[int] = (0,)) -> dict[str, Any]:
    """Run (or resume) every variant x task x seed and return what DIR/ablation.json holds
    (:func:`summarize`)."""
    overrides = list(overrides or [])
    seeds = check_seeds(seeds)
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    for item in overrides:
        if item.partition("=")[0].strip() == "train.seed":
            raise ValueError(f"--set {item}: the ablation sets train.seed from --seeds; "
                             f"use --seeds {item.partition('=')[2].strip() or 'N'} instead")
    tasks_ = [get_task(t) for t in tasks]  # an unknown task fails here, before any training
    for variant in variants:  # and so does a bad --set
        load_config(preset, overrides + (VARIANTS[variant] or []))

    runs: dict[int, str] = {}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {v: {t.name: [] for t in tasks_} for v in variants}
    for seed in seeds:
        root = runs[seed] = seed_dir(out, seed)
        seeded = overrides + [f"train.seed={seed}"]
        for variant in variants:
            uris = {t.name: storage.join(root, f"{variant}-{t.name}", f"metrics-{split}.json") for t in tasks_}
            pending = [t for t in tasks_ if not storage.exists(uris[t.name])]
            init = None
            if VARIANTS[variant] is not None and pending:  # all evaluated: its pre-training is not needed
                init = storage.join(root, f"pretrain-{variant}")
                train(get_task("pretrain"), load_config(preset, seeded + VARIANTS[variant]), data, init)
            for task in pending:
                run = storage.join(root, f"{variant}-{task.name}")
                train(task, load_config(preset, seeded), data, run, init=init)
                evaluate(task, run, data, uris[task.name], split=split)
            for task in tasks_:
                results[variant][task.name].append(storage.read_json(uris[task.name]))

    summary = {"preset": preset, "overrides": overrides, "split": split, "metrics": PRIMARY,
               "seeds": list(seeds), "runs": {str(s): runs[s] for s in seeds}, **summarize(results)}
    storage.write_json_atomic(storage.join(out, "ablation.json"), summary)
    return summary


def spread(values: Sequence[float]) -> dict[str, Any]:
    """{"values", "n", "mean", "std" (sample, n - 1; None for one value), "min", "max"}."""
    values = [float(v) for v in values]
    return {"values": values, "n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def _mean_of(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """``results[variant][task]``: one metrics.json per seed, in seed order ->
    ``{"table": {variant: {task: cell}}, "effects": {name: {"of": "soho - scratch", "tasks": {task: spread}}}}``.

    A cell is :func:`spread` of the task's primary metric over the seeds, plus the means over
    seeds of ``prior`` and ``blind_model`` (the blind baselines) and ``gain`` (metric minus the
    best baseline); each None where no seed's evaluation measured it. An effect's values are the
    per-seed differences (same seed, same task) and ``positive`` counts the seeds where it is > 0;
    it is left out where one of its two variants was not run."""
    table: dict[str, dict[str, Any]] = {}
    for variant, per_task in results.items():
        table[variant] = {}
        for task, reports in per_task.items():
            primary = PRIMARY[task]
            baselines = [r.get("baselines") or {} for r in reports]
            cell = spread([r["metrics"][primary] for r in reports])
            for name in ("prior", "blind_model"):
                cell[name] = _mean_of([b.get(name, {}).get(primary) for b in baselines])
            cell["gain"] = _mean_of([r.get("gain") for r in reports])
            table[variant][task] = cell
    effects: dict[str, Any] = {}
    for name, (with_, without) in EFFECTS.items():
        if with_ in table and without in table:
            tasks = {}
            for task, cell in table[with_].items():
                diffs = [a - b for a, b in zip(cell["values"], table[without][task]["values"], strict=True)]
                tasks[task] = {**spread(diffs), "positive": sum(d > 0 for d in diffs)}
            effects[name] = {"of": f"{with_} - {without}", "tasks": tasks}
    return {"table": table, "effects": effects}


def _cell(s: dict[str, Any], signed: bool = False) -> str:
    mean = f"{s['mean']:+.3f}" if signed else f"{s['mean']:.3f}"
    std = s.get("std")
    return mean if std is None or math.isnan(std) else f"{mean} ± {std:.3f}"


def format_table(summary: dict[str, Any]) -> str:
    """A markdown table of an ablation summary (:func:`ablate`'s result): ``mean ± std`` over
    seeds per variant and task, then one row per effect, signed, with how many seeds it is > 0."""
    table, effects = summary.get("table") or {}, summary.get("effects") or {}
    if not table:
        return "(no results)"
    tasks = list(next(iter(table.values())).keys())
    n = max((cell["n"] for row in table.values() for cell in row.values()), default=0)
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    head = f"| pre-training ({seeds}: mean ± std) | " + " | ".join(f"{t} ({PRIMARY[t]})" for t in tasks) + " |"
    rule = "|---|" + "---|" * len(tasks)
    rows = [f"| {v} | " + " | ".join(_cell(row[t]) for t in tasks) + " |" for v, row in table.items()]
    for name, effect in effects.items():
        cells = [f"{_cell(e, signed=True)} ({e['positive']}/{e['n']} > 0)"
                 for e in (effect["tasks"][t] for t in tasks)]
        rows.append(f"| {name} effect: {effect['of']} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])
