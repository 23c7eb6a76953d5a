"""Webdataset tar shards plus ``index.json``, at any URI (local path, file://, s3://).

    soho data shard --source synthetic --input DIR --out URI

Layout written under OUT::

    OUT/<task>/<split>-00000.tar ...   samples keyed by id; ``png`` image bytes + ``json`` record
    OUT/<task>/index.json              {"format", "version", "task", "source", "splits":
                                        {split: {"shards": [names], "num_samples", "num_texts"}},
                                        "answer_vocab": [...] or null}

``index.json`` is written last: a task folder without one is incomplete.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from typing import Any, Iterable

import webdataset as wds

from soho_core import storage

FORMAT = "soho-shards"
VERSION = 1
TASKS = ("pretrain", "retrieval", "vqa", "ve", "nlvr2")


class ShardSink:
    """Writes samples of one split into numbered tar shards of bounded count and size."""

    def __init__(self, task_uri: str, split: str, max_count: int = 10_000, max_bytes: int = 256 << 20):
        self.task_uri, self.split = task_uri, split
        self.max_count, self.max_bytes = max_count, max_bytes
        self.shards: list[str] = []
        self.num_samples = 0
        self._writer: wds.TarWriter | None = None
        self._file = None
        self._count = self._bytes = 0

    def write(self, sample: dict[str, Any]) -> None:
        size = sum(len(v) for v in sample.values() if isinstance(v, (bytes, bytearray)))
        if self._writer is None or self._count >= self.max_count or self._bytes + size > self.max_bytes:
            self._open_next()
        self._writer.write(sample)
        self._count += 1
        self._bytes += size
        self.num_samples += 1

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.split}-{len(self.shards):05d}.tar"
        self._file = storage.open_uri(storage.join(self.task_uri, name), "wb")
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=0.0)
        self.shards.append(name)
        self._count = self._bytes = 0

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()  # closes the file object too
            self._writer = self._file = None

    def close(self) -> None:
        self._close_current()


def write_index(task_uri: str, task: str, source: str, splits: dict[str, dict[str, Any]],
                answer_vocab: list[str] | None = None) -> dict[str, Any]:
    index = {"format": FORMAT, "version": VERSION, "task": task, "source": source,
             "splits": splits, "answer_vocab": answer_vocab}
    storage.write_json_atomic(storage.join(task_uri, "index.json"), index)
    return index


def load_index(data_uri: str, task: str) -> tuple[str, dict[str, Any]]:
    """Return (task folder URI, index) for ``task`` under a shard root, with a clear error."""
    task_uri = storage.join(data_uri, task)
    index_uri = storage.join(task_uri, "index.json")
    if not storage.exists(index_uri):
        raise FileNotFoundError(
            f"no shards for task {task!r} at {data_uri!r}: {index_uri} is missing "
            f"(write them with `soho data shard --out {data_uri}`)")
    index = storage.read_json(index_uri)
    if index.get("format") != FORMAT or index.get("task") != task:
        raise ValueError(f"{index_uri} is not a {FORMAT} index for task {task!r}")
    return task_uri, index


def shard_urls(task_uri: str, index: dict[str, Any], split: str) -> list[str]:
    if split not in index["splits"]:
        raise ValueError(f"split {split!r} not in {task_uri}/index.json (has: {sorted(index['splits'])})")
    return [storage.join(task_uri, name) for name in index["splits"][split]["shards"]]


def _jsonl(uri: str) -> Iterable[dict[str, Any]]:
    with storage.open_uri(uri, "rb") as f:
        for line in io.TextIOWrapper(f, encoding="utf-8"):
            if line.strip():
                yield json.loads(line)


def _group(records: Iterable[dict[str, Any]], key) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(key(rec), []).append(rec)
    return groups


def _synthetic_samples(input_uri: str, task: str) -> Iterable[tuple[str, dict[str, Any]]]:
    """(split, sample) pairs of one task, from the files of ``soho data synth``.

    pretrain, retrieval: one image with its captions. vqa: one image with its questions
    (each with 10 human answers). ve: one image with its hypotheses. nlvr2: one image pair
    (``left.png``, ``right.png``) with its statements.
    """
    image = lambda image_id: storage.read_bytes(storage.join(input_uri, "images", f"{image_id}.png"))  # noqa: E731
    pack = lambda key, record, **images: {"__key__": key, **images, "json": json.dumps(record).encode()}  # noqa: E731
    if task in ("pretrain", "retrieval"):
        for rec in _jsonl(storage.join(input_uri, "captions.jsonl")):
            yield rec["split"], pack(rec["image_id"], {"image_id": rec["image_id"], "captions": rec["captions"]},
                                     png=image(rec["image_id"]))
    elif task in ("vqa", "ve"):
        field, items = ("questions", "vqa.jsonl") if task == "vqa" else ("hypotheses", "ve.jsonl")
        for (split, image_id), recs in _group(_jsonl(storage.join(input_uri, items)),
                                              lambda r: (r["split"], r["image_id"])).items():
            entries = [{k: v for k, v in r.items() if k not in ("split", "image_id")} for r in recs]
            yield split, pack(image_id, {"image_id": image_id, field: entries}, png=image(image_id))
    elif task == "nlvr2":
        for (split, left, right), recs in _group(_jsonl(storage.join(input_uri, "nlvr2.jsonl")),
                                                 lambda r: (r["split"], r["left_image_id"], r["right_image_id"])).items():
            statements = [{"id": r["id"], "statement": r["statement"], "label": bool(r["label"])} for r in recs]
            record = {"id": f"{left}+{right}", "left_image_id": left, "right_image_id": right, "statements": statements}
            yield split, pack(f"{left}_{right}", record, **{"left.png": image(left), "right.png": image(right)})


def shard_synthetic(input_uri: str, out_uri: str, tasks: Iterable[str] = TASKS, max_count: int = 10_000,
                    max_bytes: int = 256 << 20, answer_vocab_size: int = 3129) -> dict[str, dict[str, Any]]:
    """Turn the output of ``soho data synth`` into shards, one folder per task; returns {task: index}."""
    tasks = list(tasks)
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} to shard; valid: {', '.join(TASKS)}")
    manifest_uri = storage.join(input_uri, "manifest.json")
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(
            f"{input_uri!r} is not a complete synthetic dataset: {manifest_uri} is missing "
            f"(make one with `soho data synth --out {input_uri}`)")
    storage.register_webdataset_openers()
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        task_uri = storage.join(out_uri, task)
        sinks: dict[str, ShardSink] = {}
        texts: dict[str, int] = defaultdict(int)
        train_answers: list[list[str]] = []
        for split, sample in _synthetic_samples(input_uri, task):
            sink = sinks.get(split) or sinks.setdefault(split, ShardSink(task_uri, split, max_count, max_bytes))
            sink.write(sample)
            record = json.loads(sample["json"])
            items = next(record[k] for k in ("captions", "questions", "hypotheses", "statements") if k in record)
            texts[split] += len(items)
            if task == "vqa" and split == "train":
                train_answers += [q["answers"] for q in record["questions"]]
        for sink in sinks.values():
            sink.close()
        splits = {s: {"shards": k.shards, "num_samples": k.num_samples, "num_texts": texts[s]}
                  for s, k in sorted(sinks.items())}
        vocab = None
        if task == "vqa":
            from soho_core.tasks.metrics import build_answer_vocab

            vocab = build_answer_vocab(train_answers, answer_vocab_size)
        out[task] = write_index(task_uri, task, "synthetic", splits, answer_vocab=vocab)
    return out
