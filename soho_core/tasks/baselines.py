"""Honest measurement: how much of a downstream score comes from the image at all.

Beside its metric, every downstream evaluation scores two blind baselines and breaks all three
down by the type of text (question, statement, hypothesis):

* ``prior``, the text prior: for each type, the majority answer (VQA) or label (VE, NLVR2) of
  the TRAIN split, applied to the evaluated split and scored with the task's own metric. A
  type the training split never has gets the overall majority. Retrieval has no majority
  answer: its prior is chance-level recall (a ranking in random order).
* ``blind_model``, the constant-image pass: the same trained model with every image replaced
  by a flat grey one (:data:`GREY`, the ImageNet mean colour) of the same size and padding.
  What it scores is the model's own text prior.

``metrics.json`` then holds, beside ``metrics`` (whose names do not change)::

    "baselines": {"prior": {primary metric: v}, "blind_model": {primary metric: v}},
    "gain": metric - max(baselines),
    "breakdown": {type: {"n": examples, "metric": v, "prior": v, "blind_model": v}}

A type is :func:`text_type`: the record's own ``question_type`` (official VQA v2, the
synthetic world) or ``template`` (synthetic NLVR2 and VE), else the first words of the text,
so it works unchanged on any data. The constant-image pass is on unless
``finetune.eval_blind`` is false (it doubles the model's share of evaluation time).

    python -m pytest -q tests/test_baselines.py
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from soho_core.data.transforms import valid_pixels
from soho_core.tasks.metrics import normalize_answer

if TYPE_CHECKING:
    from soho_core.tasks.base import EvalResult

log = logging.getLogger(__name__)

PRIOR, BLIND = "prior", "blind_model"
# The ImageNet mean colour as uint8: the model normalises it to about 0, as it does the padding,
# so a blind image carries no content at all, only its size.
GREY = (124, 116, 104)

# Where a record names its type, first key first (VQA v2 annotations: "question_type"; the
# synthetic world's NLVR2 and VE: "template"); else the text and how many of its first words
# stand for the type (VQA v2's own question types are mostly a question's first 2-4 words).
_TYPE_KEYS = ("question_type", "template")
_TEXT = {"vqa": ("question", 3), "ve": ("hypothesis", 2), "nlvr2": ("statement", 2)}
_WORD = re.compile(r"[a-z0-9']+")


def text_type(entry: dict[str, Any], task: str) -> str:
    """The type of one text of ``task`` ("vqa", "ve", "nlvr2"): the entry's ``question_type``
    or ``template`` when it has one, else its first words lower-cased without punctuation
    (VQA: 3, "What color is the cat?" -> "what color is"; VE and NLVR2: 2)."""
    if task not in _TEXT:
        raise ValueError(f"no text types for task {task!r}; valid: {', '.join(_TEXT)}")
    for key in _TYPE_KEYS:
        given = entry.get(key)
        if isinstance(given, str) and given.strip():
            return given.strip()
    field, words = _TEXT[task]
    return " ".join(_WORD.findall(str(entry.get(field, "")).lower())[:words]) or "(empty)"


# --- the text prior -------------------------------------------------------------------------------


def _majority(counts: Counter) -> Any:
    """The most frequent value; ties go to the smallest by ``str`` so the prior does not depend
    on the order of the data."""
    return min(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))[0]


def majority_answer(answers: Sequence[str]) -> str | None:
    """The answer most of a question's humans gave, normalised (None when there is none)."""
    counts = Counter(normalize_answer(a) for a in answers)
    counts.pop("", None)
    return _majority(counts) if counts else None


@dataclass
class MajorityPrior:
    """The majority target of each type in a training set, and of the whole set for a type it
    never saw. ``prior(type)`` -> target."""

    by_type: dict[str, Any]
    overall: Any

    @classmethod
    def fit(cls, examples: Iterable[tuple[str, Hashable]]) -> "MajorityPrior | None":
        """From (type, target) pairs; None when there are none."""
        counts: dict[str, Counter] = defaultdict(Counter)
        for kind, target in examples:
            counts[kind][target] += 1
        if not counts:
            return None
        overall = sum(counts.values(), Counter())
        return cls({kind: _majority(c) for kind, c in counts.items()}, _majority(overall))

    def __call__(self, kind: str) -> Any:
        return self.by_type.get(kind, self.overall)


def train_prior(data_uri: str, task: str, items_key: str,
                target_of: Callable[[dict[str, Any]], Hashable | None]) -> MajorityPrior | None:
    """The :class:`MajorityPrior` of the TRAIN split of ``task``'s shards, from their JSON
    records alone (no image is decoded). ``items_key``: the record's list of texts;
    ``target_of(entry)``: its answer or label (None, or an error, leaves the entry out). None,
    with a warning, when the shards have no train split."""
    from soho_core.data.loader import read_records
    from soho_core.data.shards import load_index

    _, index = load_index(data_uri, task)
    if "train" not in index["splits"]:
        log.warning("no train split in %s/%s: evaluation reports no text prior", data_uri, task)
        return None

    def examples() -> Iterable[tuple[str, Hashable]]:
        for record in read_records(data_uri, task, "train"):
            for entry in record.get(items_key) or []:
                try:
                    target = target_of(entry)
                except (KeyError, TypeError, ValueError):
                    continue  # a malformed entry: the loader skips and counts it too
                if target is not None:
                    yield text_type(entry, task), target

    return MajorityPrior.fit(examples())


# --- the constant-image pass ----------------------------------------------------------------------


def constant_images(images: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) padded batch, image_sizes (B, 2) valid (height, width) -> the same
    batch with every valid pixel :data:`GREY` and the padding left 0: sizes and padding as the
    model saw them, no content."""
    valid = valid_pixels(images, image_sizes)
    grey = torch.tensor(GREY, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return torch.where(valid, grey, torch.zeros_like(images))


def blind_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch's model inputs (``images``, ``image_sizes``, texts, ...) with constant images."""
    return {**inputs, "images": constant_images(inputs["images"], inputs["image_sizes"])}


# --- scores, baselines and the breakdown ----------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def add_baselines(result: "EvalResult", primary: str, types: Sequence[str], metric: Sequence[float],
                  prior: Sequence[float] | None = None, blind: Sequence[float] | None = None) -> "EvalResult":
    """Fill ``result.baselines`` and ``result.breakdown`` from per-example scores, each (N,) in
    the order of ``types`` (N,): ``metric`` the model's, ``prior`` the text prior's, ``blind``
    the constant-image pass's (None: not measured). ``primary`` is the metric these average
    to (VQA: VQA accuracy per question; VE, NLVR2: 1.0 correct / 0.0 wrong). Returns ``result``."""
    columns = {"metric": metric, PRIOR: prior, BLIND: blind}
    columns = {name: col for name, col in columns.items() if col is not None}
    for name, col in columns.items():
        if len(col) != len(types):
            raise ValueError(f"{name} has {len(col)} scores for {len(types)} examples")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, kind in enumerate(types):
        groups[kind].append(i)
    result.primary = primary
    result.baselines = {name: {primary: _mean(col)} for name, col in columns.items() if name != "metric"}
    # Most frequent types first (metrics.json is written with sorted keys; the report re-sorts).
    result.breakdown = {kind: {"n": len(rows), **{name: _mean([col[i] for i in rows]) for name, col in columns.items()}}
                        for kind, rows in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))}
    return result
