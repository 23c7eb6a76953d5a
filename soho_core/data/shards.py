"""Webdataset tar shards plus ``index.json``, at any URI (local path, file://, s3://).

    soho data shard --source synthetic --input DIR --out URI

Layout written under OUT::

    OUT/<task>/<split>-00000.tar ...   samples keyed by id; ``png`` image bytes + ``json`` record
    OUT/<task>/index.json              {"format", "version", "task", "source", "splits":
                                        {split: {"shards": [names], "num_samples", "num_texts"}},
                                        "answer_vocab": [...] or null}

``index.json`` is written last: a task folder without one is incomplete. Every shard is written
to a temporary file and published whole (a rename, or one upload), so no reader ever sees half a
shard. An S3 bucket that does not exist is an error naming it before anything is written (s3fs
would create it); a store that fails mid-run raises :class:`ShardWriteError` naming the shard,
and the official writer's rerun keeps the shards already complete. An image that does not
decode is skipped and counted (``num_skipped``); one that cannot be *read* fails the run.

Official sources (``--source coco|vg|vqa2|nlvr2|snli-ve|karpathy``, read by
:mod:`soho_core.data.readers`; :func:`shard_source`) add, in the same task folders::

    OUT/<task>/<split>-<source>-00000.tar        samples keyed "<split>-<id>"; the image bytes as found,
                                                 named by slot and the file's extension ("jpg" for COCO,
                                                 "left.png"/"right.png" for NLVR2); loaders accept any
    OUT/<task>/<split>-<source>-00000.tar.json   sidecar: fingerprint, num_samples, num_texts, num_skipped
    OUT/<task>/index-<source>.json               that source's splits and reading stats
    OUT/<task>/index.json                        all sources merged; splits also hold "num_skipped", and
                                                 "sources" the per-source stats (records, dropped, missing)

    soho data shard --source coco --input /data/coco --out s3://bucket/shards
    soho data shard --source vg --input /data/vg --out s3://bucket/shards   # joins coco in pretrain/
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections import defaultdict
from typing import Any, Iterable

import webdataset as wds

from soho_core import storage
from soho_core.data.transforms import check_image

# Extensions an image member of a shard may carry (PIL decodes each by its content).
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")

log = logging.getLogger(__name__)

FORMAT = "soho-shards"
VERSION = 1
TASKS = ("pretrain", "retrieval", "vqa", "ve", "nlvr2")
# Members' modification time: fixed, so shards are reproducible, and an int: a float makes tarfile
# add a pax header to every member, whose parsing took a fifth of the loader's time.
MTIME = 0


class ShardWriteError(OSError):
    """A shard could not be written (the store went away, refused the upload, or an input file
    could not be read). The message names the shard and the cause; shards published before it
    are complete and never half-written, and no index lists a shard that is not complete."""


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _temp_for(dest: str) -> str:
    """A new temporary local file for shard ``dest``: beside it on a local store (publishing is a
    rename), in the system temp folder otherwise (publishing is one upload)."""
    folder = None
    if storage.is_local(dest):
        folder = os.path.dirname(os.path.abspath(_local_path(dest)))
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.rsplit('/', 1)[-1]}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def _publish(tmp: str, dest: str) -> None:
    """Make the finished local file ``tmp`` the shard ``dest`` whole: ``os.replace`` locally, one
    upload elsewhere (an object store shows an object only once its upload completes)."""
    try:
        if storage.is_local(dest):
            os.replace(tmp, _local_path(dest))
        else:
            fs, path = storage.fs_and_path(dest)
            fs.put_file(tmp, path)
    except Exception as err:  # botocore's errors are not OSErrors: name the shard whatever failed
        raise ShardWriteError(f"could not write shard {dest}: {type(err).__name__}: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class ShardSink:
    """Writes samples of one split into numbered tar shards of bounded count and size. Each shard
    is written to a temporary file and published whole when it is full or the sink closes, so
    a run that dies leaves no partial shard under a shard's name (:meth:`abort` drops the open one)."""

    def __init__(self, task_uri: str, split: str, max_count: int = 10_000, max_bytes: int = 256 << 20):
        self.task_uri, self.split = task_uri, split
        self.max_count, self.max_bytes = max_count, max_bytes
        self.shards: list[str] = []
        self.num_samples = 0
        self._writer: wds.TarWriter | None = None
        self._tmp = ""
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
        self._tmp = _temp_for(storage.join(self.task_uri, name))
        self._writer = wds.TarWriter(open(self._tmp, "wb"), encoder=False, mtime=MTIME)
        self.shards.append(name)
        self._count = self._bytes = 0

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()  # closes the file too
            self._writer = None
            _publish(self._tmp, storage.join(self.task_uri, self.shards[-1]))

    def close(self) -> None:
        self._close_current()

    def abort(self) -> None:
        """Drop the shard being written, unpublished."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            os.remove(self._tmp)


def _unpublish(task_uri: str, *names: str) -> None:
    """Remove index files before a task folder is rewritten: from here until the new index is
    written, the folder is incomplete and no reader trusts it."""
    for name in names:
        uri = storage.join(task_uri, name)
        if storage.exists(uri):
            fs, path = storage.fs_and_path(uri)
            fs.rm(path)


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
        storage.check_bucket(data_uri)  # a missing bucket says so, rather than "no index"
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
    (each with 10 human answers and its ``question_type``). ve: one image with its hypotheses
    (each with its ``template``). nlvr2: one image pair (``left.png``, ``right.png``) with its
    statements (each with its ``template``).
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
            # The template (the statement's type, for the evaluation's breakdown) is kept where the
            # world has one (worlds written before it was recorded do not).
            statements = [{"id": r["id"], "statement": r["statement"], "label": bool(r["label"]),
                           **({"template": r["template"]} if "template" in r else {})} for r in recs]
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
    storage.check_bucket(out_uri)
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        task_uri = storage.join(out_uri, task)
        _unpublish(task_uri, "index.json")
        sinks: dict[str, ShardSink] = {}
        texts: dict[str, int] = defaultdict(int)
        train_answers: list[list[str]] = []
        try:
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
        except BaseException:
            for sink in sinks.values():
                sink.abort()
            raise
        splits = {s: {"shards": k.shards, "num_samples": k.num_samples, "num_texts": texts[s]}
                  for s, k in sorted(sinks.items())}
        vocab = None
        if task == "vqa":
            from soho_core.tasks.metrics import build_answer_vocab

            vocab = build_answer_vocab(train_answers, answer_vocab_size)
        out[task] = write_index(task_uri, task, "synthetic", splits, answer_vocab=vocab)
    return out


# --- official sources: planned, resumable, parallel ---------------------------------------------
#
# Shards of an official source are planned before anything is written: samples in reader order,
# cut by count and by byte size (image sizes come from the directory listings). Each shard has a
# fingerprint of what goes into it. A shard is written to a temporary file and published whole
# (os.replace locally, one upload on object stores), then its sidecar ``<name>.json`` (fingerprint,
# counts) is written: the sidecar marks a complete shard, and a re-run skips every shard whose
# sidecar has the same fingerprint. Per-source indexes ``index-<source>.json`` are merged into
# ``index.json`` last, so COCO and VG shards can share the ``pretrain`` folder.


def _plan(items: list[tuple[Any, dict[str, tuple[str, int]]]], max_count: int, max_bytes: int) -> list[list]:
    shards: list[list] = []
    count = size = 0
    for sample, images in items:
        n = sum(sz for _, sz in images.values()) + len(json.dumps(sample.record)) + 1024  # + tar headers
        if not shards or count >= max_count or (count and size + n > max_bytes):
            shards.append([])
            count = size = 0
        shards[-1].append((sample.key, sample.record, {m: uri for m, (uri, _) in images.items()},
                           [sz for _, sz in images.values()]))
        count += 1
        size += n
    return shards


def _fingerprint(items: list) -> str:
    import hashlib

    blob = json.dumps([FORMAT, VERSION, items], sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _texts_of(record: dict[str, Any]) -> int:
    return len(next(record[k] for k in ("captions", "questions", "hypotheses", "statements") if k in record))


def member_for(slot: str, uri: str) -> str:
    """The tar member name of an image: its slot ("png", "left.png") with the file's own
    extension, so a JPEG is stored as ``jpg`` (the loader accepts any image extension)."""
    ext = uri.rsplit("/", 1)[-1].rpartition(".")[2].lower()
    if ext not in IMAGE_EXTENSIONS:
        return slot
    stem = slot.rpartition(".")[0]
    return f"{stem}.{ext}" if stem else ext


def write_planned_shard(task_uri: str, name: str, items: list, fingerprint: str) -> dict[str, Any]:
    """Write one planned shard and its sidecar; returns the sidecar. Top-level so worker
    processes can run it.

    An image that does not decode (truncated, empty, not an image, a decompression bomb, too
    small: :func:`~soho_core.data.transforms.check_image`) skips its sample, counted in the
    sidecar. An image that cannot be *read* (the store is unreachable, the file vanished since
    planning) fails the shard with :class:`ShardWriteError` instead: skipping it would publish a
    shard that a rerun trusts, and its samples would be lost for good.
    """
    dest = storage.join(task_uri, name)
    tmp = _temp_for(dest)
    skipped: list[list[str]] = []
    num_samples = num_texts = 0
    try:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=MTIME)
            for key, record, images, _ in items:
                sample: dict[str, Any] = {"__key__": key}
                for member, uri in images.items():
                    try:
                        data = storage.read_bytes(uri)
                    except Exception as err:
                        raise ShardWriteError(f"could not write shard {dest}: reading {uri} failed: "
                                              f"{type(err).__name__}: {err}") from err
                    try:
                        check_image(data)
                    except Exception as err:  # a corrupt image must not stop a long job: skip and count
                        skipped.append([key, f"{uri}: {type(err).__name__}: {err}"[:300]])
                        break
                    sample[member_for(member, uri)] = data
                else:
                    sample["json"] = json.dumps(record).encode("utf-8")
                    writer.write(sample)
                    num_samples += 1
                    num_texts += _texts_of(record)
            writer.close()
    except BaseException:
        os.remove(tmp)
        raise
    _publish(tmp, dest)
    sidecar = {"fingerprint": fingerprint, "num_samples": num_samples, "num_texts": num_texts,
               "num_skipped": len(skipped), "skipped": skipped[:50]}
    try:
        storage.write_json_atomic(f"{dest}.json", sidecar)
    except Exception as err:
        raise ShardWriteError(f"could not write {dest}.json (the mark of a complete shard): "
                              f"{type(err).__name__}: {err}") from err
    if skipped:
        log.warning("%s: skipped %d unreadable sample(s), first: %s", dest, len(skipped), skipped[0][1])
    return sidecar


def _read_sidecar(uri: str) -> dict[str, Any] | None:
    try:
        return storage.read_json(uri) if storage.exists(uri) else None
    except (ValueError, OSError):
        return None  # a damaged sidecar: the shard is rewritten


def _merge_source_indexes(task_uri: str, task: str, answer_vocab: list[str] | None) -> dict[str, Any]:
    fs, path = storage.fs_and_path(task_uri)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{path.rstrip('/')}/index-*.json"))
    parts = {n[len("index-"):-len(".json")]: storage.read_json(storage.join(task_uri, n)) for n in names}
    splits: dict[str, dict[str, Any]] = {}
    for part in parts.values():
        for split, v in part["splits"].items():
            into = splits.setdefault(split, {"shards": [], "num_samples": 0, "num_texts": 0, "num_skipped": 0})
            into["shards"] += v["shards"]
            for k in ("num_samples", "num_texts", "num_skipped"):
                into[k] += v.get(k, 0)
    index = {"format": FORMAT, "version": VERSION, "task": task, "source": "+".join(parts), "splits": splits,
             "answer_vocab": answer_vocab, "sources": {s: p["stats"] for s, p in parts.items()}}
    storage.write_json_atomic(storage.join(task_uri, "index.json"), index)
    return index


def shard_source(source: str, options, out_uri: str, tasks: Iterable[str] | None = None, max_count: int = 10_000,
                 max_bytes: int = 256 << 20, answer_vocab_size: int = 3129, workers: int = 1) -> dict[str, dict[str, Any]]:
    """Shard an official source (see :mod:`soho_core.data.readers`) into OUT/<task>/; returns {task: index}.

    Annotations are parsed and every image is looked up before the first shard is written
    (bad input fails here, naming the file). Shards are ``<split>-<source>-NNNNN.tar``;
    complete ones from an earlier run with the same content are skipped; ``workers`` > 1
    writes shards in that many processes.
    """
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from soho_core.data import readers

    tasks = list(tasks or readers.DEFAULT_TASKS.get(source, ()))
    if source not in readers.SOURCES:
        raise ValueError(f"unknown source {source!r}; valid: synthetic, {', '.join(readers.SOURCES)}")
    for task in tasks:
        if task not in readers.ALLOWED_TASKS[source]:
            raise ValueError(f"source {source!r} cannot make {task!r} shards; it makes: "
                             f"{', '.join(readers.ALLOWED_TASKS[source])}")
    if max_count < 1 or max_bytes < 1 or workers < 1:
        raise ValueError(f"max_count={max_count}, max_bytes={max_bytes}, workers={workers}: each must be >= 1")
    for uri in (out_uri, options.input, readers.image_root(options)):
        storage.check_bucket(uri)
    samples, stats = readers.read_source(source, options)
    resolved = readers.resolve_images(samples, readers.image_root(options), options.max_missing, stats)
    by_split: dict[str, list] = {}
    for sample, images in resolved:
        by_split.setdefault(sample.split, []).append((sample, images))
    vocab = None
    if "vqa" in tasks:
        from soho_core.tasks.metrics import build_answer_vocab

        pool = by_split.get("train") or [x for xs in by_split.values() for x in xs]
        vocab = build_answer_vocab((q["answers"] for s, _ in pool for q in s.record["questions"]), answer_vocab_size)
    read_stats = {"records": stats.records, "dropped": dict(stats.dropped), "missing_images": stats.missing_images}
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        task_uri = storage.join(out_uri, task)
        _unpublish(task_uri, "index.json", f"index-{source}.json")
        jobs, sidecars = [], {}
        plan = {split: _plan(items, max_count, max_bytes) for split, items in sorted(by_split.items())}
        for split, shards in plan.items():
            for i, items in enumerate(shards):
                name = f"{split}-{source}-{i:05d}.tar"
                fp = _fingerprint(items)
                done = _read_sidecar(storage.join(task_uri, f"{name}.json"))
                if done is not None and done.get("fingerprint") == fp and storage.exists(storage.join(task_uri, name)):
                    sidecars[name] = done
                else:
                    jobs.append((task_uri, name, items, fp))
        log.info("%s/%s: %d shard(s) to write, %d already complete", source, task, len(jobs), len(sidecars))
        total = len(jobs) + len(sidecars)
        try:
            if workers > 1 and len(jobs) > 1:
                with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as ex:
                    for job, sidecar in zip(jobs, ex.map(write_planned_shard, *zip(*jobs))):
                        sidecars[job[1]] = sidecar
            else:
                for job in jobs:
                    sidecars[job[1]] = write_planned_shard(*job)
        except ShardWriteError as err:
            raise ShardWriteError(f"{err}. {len(sidecars)} of {total} {source} shard(s) of {task} are complete "
                                  f"and kept; rerun the same command to write the rest") from err
        splits = {}
        for split, shards in plan.items():
            names = [f"{split}-{source}-{i:05d}.tar" for i in range(len(shards))]
            splits[split] = {"shards": names,
                             **{k: sum(sidecars[n][k] for n in names) for k in ("num_samples", "num_texts", "num_skipped")}}
        storage.write_json_atomic(storage.join(task_uri, f"index-{source}.json"),
                                  {"source": source, "splits": splits, "stats": read_stats})
        out[task] = _merge_source_indexes(task_uri, task, vocab if task == "vqa" else None)
    return out
