"""Readers of the official annotation formats into the canonical shard records.

    soho data shard --source vqa2 --input /data/vqa2 --images /data/coco --out s3://bucket/shards
    python -c "from soho_core.data.readers import *; print(len(read_source('coco', ReaderOptions('/data/coco'))[0]))"

Each reader yields :class:`Sample` s whose ``record`` is exactly what the synthetic world's
shards hold for that task, so the task loaders read them unchanged:

==========  =========  ===============================================================
source      task       record
==========  =========  ===============================================================
coco, vg    pretrain   {"image_id", "captions": [str]}  (coco, karpathy: also retrieval)
karpathy    retrieval  {"image_id", "captions": [str]}
vqa2        vqa        {"image_id", "questions": [{"question_id", "question", "answers"
                       (the 10 raw human answers), "answer_type", "question_type" (where the
                       annotation has one, e.g. "what color is the"), "multiple_choice_answer",
                       "scores" {normalised answer: official VQA accuracy}}]}
snli-ve     ve         {"image_id", "hypotheses": [{"id", "hypothesis", "label"}]}
nlvr2       nlvr2      {"id", "left_image_id", "right_image_id", "statements": [{"id",
                       "statement", "label" (bool)}]}
==========  =========  ===============================================================

Images are found through filename patterns (``str.format`` with the fields each reader
lists in :data:`PATTERN_FIELDS`), tried in order; the first file that exists wins. So
``--image-pattern 'jpgs/{id}.jpg'`` points a reader at a user's own layout. Splits map an
output split to one or more source splits (``train=train+restval,val=val,test=test``).

Missing images: every image is looked up (one directory listing per folder) before any
shard is written. By default a single missing file is an error naming it; with
``max_missing=F`` up to that fraction of samples may lack an image and are skipped and
counted (NLVR2 images fetched from their URLs miss about 5%). Records without usable text
(empty captions, an unlabelled SNLI pair with gold label "-") are dropped and counted too.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from soho_core import storage

log = logging.getLogger(__name__)

SOURCES = ("coco", "vg", "vqa2", "nlvr2", "snli-ve", "karpathy")
DEFAULT_TASKS = {"coco": ("pretrain",), "vg": ("pretrain",), "vqa2": ("vqa",), "nlvr2": ("nlvr2",),
                 "snli-ve": ("ve",), "karpathy": ("retrieval",)}
ALLOWED_TASKS = {**DEFAULT_TASKS, "coco": ("pretrain", "retrieval"), "karpathy": ("retrieval", "pretrain")}
DEFAULT_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "coco": {"train": ("train2014",), "val": ("val2014",)},
    "vg": {"train": ("all",)},  # VG has no splits: everything goes to one output split
    "vqa2": {"train": ("train2014",), "val": ("val2014",)},
    "nlvr2": {"train": ("train",), "val": ("dev",), "test": ("test1",)},
    "snli-ve": {"train": ("train",), "val": ("dev",), "test": ("test",)},
    "karpathy": {"train": ("train", "restval"), "val": ("val",), "test": ("test",)},
}
DEFAULT_PATTERNS: dict[str, tuple[str, ...]] = {
    "coco": ("{split}/{file_name}", "{split}/COCO_{split}_{id:012d}.jpg"),
    "vg": ("VG_100K/{id}.jpg", "VG_100K_2/{id}.jpg"),
    "vqa2": ("{split}/COCO_{split}_{id:012d}.jpg",),
    "nlvr2": ("images/{split}/{directory}/{image}", "{split}/{directory}/{image}", "images/{split}/{image}",
              "{split}/{image}"),
    "snli-ve": ("flickr30k-images/{id}.jpg", "flickr30k_images/{id}.jpg", "{id}.jpg"),
    "karpathy": ("{filepath}/{filename}", "flickr30k-images/{filename}", "images/{filename}", "{filename}"),
}
PATTERN_FIELDS = {
    "coco": "split (source split, e.g. train2014), id (int), file_name",
    "vg": "id (int)",
    "vqa2": "split (e.g. train2014), id (int image id)",
    "nlvr2": "split (train, dev, test1), directory (train only), image (e.g. train-10171-0-img0.png), pair, side (0/1)",
    "snli-ve": "split, id (Flickr30K id, e.g. 2248275918)",
    "karpathy": "split, filepath (coco only), filename, id (cocoid, or the Flickr file stem)",
}


@dataclass
class Sample:
    """One shard sample before its images are read. ``images`` maps the tar member name
    ("png", or "left.png"/"right.png" for NLVR2) to candidate paths relative to the image root."""

    split: str
    key: str
    record: dict[str, Any]
    images: dict[str, tuple[str, ...]]


@dataclass
class ReaderOptions:
    input: str  # annotations: a folder, or for karpathy the dataset_*.json file itself
    images: str | None = None  # image root; default: ``input`` (its folder, for a file)
    image_pattern: tuple[str, ...] = ()  # default: DEFAULT_PATTERNS[source]
    splits: dict[str, tuple[str, ...]] | None = None  # output split -> source splits
    max_missing: float = 0.0  # fraction of samples that may lack an image file (skipped, counted)


@dataclass
class ReadStats:
    records: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> samples or entries dropped
    missing_images: int = 0


def parse_splits(text: str) -> dict[str, tuple[str, ...]]:
    """``"train=train+restval,val=val"`` -> {"train": ("train", "restval"), "val": ("val",)}."""
    out: dict[str, tuple[str, ...]] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, src = part.partition("=")
        if not sep or not name.strip() or not src.strip():
            raise ValueError(f"--splits: {part!r} is not OUT=SOURCE[+SOURCE...] (e.g. train=train2014)")
        out[name.strip()] = tuple(s.strip() for s in src.split("+") if s.strip())
    if not out:
        raise ValueError(f"--splits: {text!r} names no split")
    return out


# --- file helpers: every error names the file (and the field) ---------------------------------


def _load_json(uri: str) -> Any:
    if not storage.exists(uri):
        raise FileNotFoundError(f"annotation file {uri} does not exist")
    try:
        return json.loads(storage.read_bytes(uri).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{uri} is not UTF-8 JSON: {err}") from err


_WHITESPACE = re.compile(r"[ \t\n\r]*")
CHUNK_BYTES = 1 << 20


def _json_array_items(uri: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """The items of a file holding one JSON array, parsed one at a time as chunks are read:
    memory holds one chunk and one item, not the file (Visual Genome's region_descriptions.json
    is 1.5 GB; parsed whole it takes several times that). Errors name the file and position."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"annotation file {uri} does not exist")
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buf, pos, start, read, eof = "", 0, 0, 0, False  # start: characters of the file before buf

    with storage.open_uri(uri, "rb") as f:

        def more() -> None:
            nonlocal buf, pos, start, read, eof
            data = f.read(chunk_bytes)
            eof = not data
            pending = len(utf8.getstate()[0])
            try:
                text = utf8.decode(data, final=eof)
            except UnicodeDecodeError as err:
                raise ValueError(f"{uri} is not UTF-8: byte {read - pending + err.start}: {err.reason}") from None
            read += len(data)
            start += pos
            buf, pos = buf[pos:] + text, 0

        def skip_space() -> str:
            """The next non-blank character ("" at the end of the file), reading more as needed."""
            nonlocal pos
            while True:
                pos = _WHITESPACE.match(buf, pos).end()
                if pos < len(buf) or eof:
                    return buf[pos:pos + 1]
                more()

        def fail(what: str) -> ValueError:
            return ValueError(f"{uri} is not a JSON list: {what} at character {start + pos}")

        if skip_space() != "[":
            raise fail("expected '['")
        pos += 1
        if skip_space() == "]":
            return
        while True:
            skip_space()
            try:
                item, end = decoder.raw_decode(buf, pos)
                complete = end < len(buf) or eof  # a number cut by the chunk also parses: be sure
            except json.JSONDecodeError as err:
                if eof:
                    raise ValueError(f"{uri} is not valid JSON: {err.msg} at character {start + err.pos}") from None
                complete = False
            if not complete:
                more()
                continue
            pos = end
            yield item
            sep = skip_space()
            if sep == "]":
                pos += 1
                if skip_space():
                    raise fail("data after the closing ']'")
                return
            if sep != ",":
                raise fail(f"expected ',' or ']', found {sep!r}" if sep else "the file ends inside the list")
            pos += 1


def _jsonl(uri: str) -> Iterator[tuple[int, dict[str, Any]]]:
    if not storage.exists(uri):
        raise FileNotFoundError(f"annotation file {uri} does not exist")
    for n, line in enumerate(storage.read_bytes(uri).split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{uri} line {n} is not UTF-8 JSON: {err}") from err
        if not isinstance(rec, dict):
            raise ValueError(f"{uri} line {n} is not a JSON object")
        yield n, rec


def _get(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    return obj[key]


def _first_existing(root: str, names: Iterable[str]) -> str:
    tried = [storage.join(root, n) for n in names]
    for uri in tried:
        if storage.exists(uri):
            return uri
    raise FileNotFoundError(f"annotation file not found; looked for: {', '.join(tried)}")


def _texts(values: Iterable[Any], stats: ReadStats, what: str) -> list[str]:
    out = []
    for v in values:
        if isinstance(v, str) and v.strip():
            out.append(v.strip())
        else:
            stats.dropped[f"empty or non-text {what}"] += 1
    return out


def _candidates(patterns: tuple[str, ...], **fields: Any) -> tuple[str, ...]:
    out = []
    for p in patterns:
        try:
            out.append(p.format(**fields))
        except (KeyError, ValueError, IndexError):  # the pattern needs a field this record lacks
            continue
    return tuple(out)


def _key(split: str, ident: str) -> str:
    # webdataset splits a member name at its first dot: keys must not contain one
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{split}-{ident}")


# --- the readers ------------------------------------------------------------------------------


def read_coco(opts: ReaderOptions, patterns, splits, stats: ReadStats) -> Iterator[Sample]:
    """COCO captions (``annotations/captions_<split>.json``): one sample per image, its captions."""
    for out_split, sources in splits.items():
        for src in sources:
            uri = _first_existing(opts.input, [f"annotations/captions_{src}.json", f"captions_{src}.json"])
            data = _load_json(uri)
            captions: dict[Any, list[Any]] = defaultdict(list)
            for i, ann in enumerate(_get(data, "annotations", uri)):
                where = f"{uri} annotations[{i}]"
                captions[_get(ann, "image_id", where)].append(_get(ann, "caption", where))
            for i, img in enumerate(_get(data, "images", uri)):
                image_id = _get(img, "id", f"{uri} images[{i}]")
                texts = _texts(captions.get(image_id, []), stats, "captions")
                stats.records += 1
                if not texts:
                    stats.dropped["images without captions"] += 1
                    continue
                yield Sample(out_split, _key(out_split, f"coco-{image_id}"),
                             {"image_id": f"coco-{image_id}", "captions": texts},
                             {"png": _candidates(patterns, split=src, id=image_id, file_name=img.get("file_name"))})


def read_vg(opts: ReaderOptions, patterns, splits, stats: ReadStats) -> Iterator[Sample]:
    """Visual Genome ``region_descriptions.json`` (a JSON list, streamed item by item): one sample
    per image, its distinct region phrases."""
    uri = opts.input if opts.input.endswith(".json") else _first_existing(opts.input, ["region_descriptions.json"])
    out_split = next(iter(splits))
    for i, item in enumerate(_json_array_items(uri)):  # streamed: the file is 1.5 GB
        where = f"{uri} [{i}]"
        regions = _get(item, "regions", where)
        image_id = item.get("id", item.get("image_id"))
        if image_id is None:  # some releases carry the id only on the regions
            image_id = _get(regions[0] if regions else item, "image_id", f"{where} regions[0]")
        phrases = _texts((_get(r, "phrase", f"{where} regions[{j}]") for j, r in enumerate(regions)), stats, "phrases")
        stats.records += 1
        phrases = list(dict.fromkeys(phrases))  # VG repeats phrases a lot; keep the first of each
        if not phrases:
            stats.dropped["images without phrases"] += 1
            continue
        yield Sample(out_split, _key(out_split, f"vg-{image_id}"), {"image_id": f"vg-{image_id}", "captions": phrases},
                     {"png": _candidates(patterns, id=image_id, split=out_split)})


def official_answer_scores(answers: list[str]) -> dict[str, float]:
    """{normalised answer: its VQA accuracy} as the official metric counts it: with n human
    answers and m equal to a, the mean over annotators of min(matches among the other n - 1 / 3, 1),
    i.e. 0.3, 0.6, 0.9, 1.0 for m = 1, 2, 3, >= 4 of 10 (``vqa_score(..., official=True)``)."""
    from soho_core.tasks.metrics import normalize_answer  # imported here: the CLI imports this module

    norm = [normalize_answer(a) for a in answers]
    n = len(norm)
    return {a: round((m * min((m - 1) / 3, 1.0) + (n - m) * min(m / 3, 1.0)) / n, 6)
            for a, m in Counter(norm).items() if a}


def read_vqa2(opts: ReaderOptions, patterns, splits, stats: ReadStats) -> Iterator[Sample]:
    """VQA v2 questions + annotations, one sample per image with all its questions. A test split
    (no annotation file, e.g. test2015) gets questions with empty ``answers``."""
    for out_split, sources in splits.items():
        for src in sources:
            q_uri = _first_existing(opts.input, [f"v2_OpenEnded_mscoco_{src}_questions.json",
                                                 f"questions/v2_OpenEnded_mscoco_{src}_questions.json"])
            questions = _get(_load_json(q_uri), "questions", q_uri)
            annotations: dict[Any, dict[str, Any]] | None = None
            try:
                a_uri = _first_existing(opts.input, [f"v2_mscoco_{src}_annotations.json",
                                                     f"annotations/v2_mscoco_{src}_annotations.json"])
            except FileNotFoundError:
                if not src.startswith("test"):
                    raise
            else:
                annotations = {}
                for i, ann in enumerate(_get(_load_json(a_uri), "annotations", a_uri)):
                    annotations[_get(ann, "question_id", f"{a_uri} annotations[{i}]")] = ann
            by_image: dict[Any, list[dict[str, Any]]] = {}
            for i, q in enumerate(questions):
                where = f"{q_uri} questions[{i}]"
                qid, image_id, text = _get(q, "question_id", where), _get(q, "image_id", where), _get(q, "question", where)
                entry: dict[str, Any] = {"question_id": str(qid), "question": text, "answers": []}
                if annotations is not None:
                    if qid not in annotations:
                        raise ValueError(f"{where}: question_id {qid} has no annotation in {a_uri}")
                    ann = annotations[qid]
                    answers = [_get(a, "answer", f"{a_uri} question_id {qid} answers")
                               for a in _get(ann, "answers", f"{a_uri} question_id {qid}")]
                    entry.update(answers=[str(a) for a in answers], answer_type=ann.get("answer_type", ""),
                                 multiple_choice_answer=ann.get("multiple_choice_answer", ""),
                                 scores=official_answer_scores([str(a) for a in answers]) if answers else {})
                    if isinstance(ann.get("question_type"), str) and ann["question_type"].strip():
                        # The official type ("what color is the"): the evaluation's breakdown key.
                        entry["question_type"] = ann["question_type"].strip()
                if not isinstance(text, str) or not text.strip():
                    stats.dropped["empty questions"] += 1
                    continue
                by_image.setdefault(image_id, []).append(entry)
            for image_id, entries in by_image.items():
                stats.records += 1
                yield Sample(out_split, _key(out_split, f"coco-{image_id}"),
                             {"image_id": f"coco-{image_id}", "questions": entries},
                             {"png": _candidates(patterns, split=src, id=image_id)})


def _nlvr2_label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{where}: field 'label' is {value!r}, not True/False")


def read_nlvr2(opts: ReaderOptions, patterns, splits, stats: ReadStats) -> Iterator[Sample]:
    """NLVR2 JSON lines (``train.json``, ``dev.json``, ``test1.json``): one sample per image pair
    with its statements; the images of ``split-set-pair-sentence`` are ``split-set-pair-img0.png``
    (left) and ``-img1.png`` (right)."""
    for out_split, sources in splits.items():
        for src in sources:
            uri = _first_existing(opts.input, [f"{src}.json", f"data/{src}.json"])
            pairs: dict[str, dict[str, Any]] = {}
            for n, rec in _jsonl(uri):
                where = f"{uri} line {n}"
                ident = str(_get(rec, "identifier", where))
                pair = ident.rsplit("-", 1)[0]
                statement = _get(rec, "sentence", where)
                label = _nlvr2_label(_get(rec, "label", where), where)
                if not isinstance(statement, str) or not statement.strip():
                    stats.dropped["empty statements"] += 1
                    continue
                entry = pairs.setdefault(pair, {"directory": rec.get("directory"), "statements": []})
                entry["statements"].append({"id": ident, "statement": statement.strip(), "label": label})
            for pair, entry in pairs.items():
                stats.records += 1
                extra = {} if entry["directory"] is None else {"directory": entry["directory"]}
                images = {f"{side}.png": _candidates(patterns, split=src, pair=pair, side=k, image=f"{pair}-img{k}.png",
                                                     **extra)
                          for k, side in enumerate(("left", "right"))}
                yield Sample(out_split, _key(out_split, pair),
                             {"id": pair, "left_image_id": f"{pair}-img0", "right_image_id": f"{pair}-img1",
                              "statements": entry["statements"]}, images)


VE_LABELS = ("entailment", "neutral", "contradiction")


def read_snli_ve(opts: ReaderOptions, patterns, splits, stats: ReadStats) -> Iterator[Sample]:
    """SNLI-VE JSON lines (``snli_ve_<split>.jsonl``): one sample per Flickr30K premise image with
    its hypotheses (``sentence2``) and gold labels; pairs without a gold label are dropped."""
    for out_split, sources in splits.items():
        for src in sources:
            uri = _first_existing(opts.input, [f"snli_ve_{src}.jsonl", f"annotations/snli_ve_{src}.jsonl"])
            by_image: dict[str, list[dict[str, Any]]] = {}
            for n, rec in _jsonl(uri):
                where = f"{uri} line {n}"
                image = rec.get("Flickr30K_ID", rec.get("Flikr30kID", rec.get("Flickr30kID")))
                if image is None:
                    image = str(_get(rec, "pairID", where)).split(".jpg")[0]
                image = str(image).removesuffix(".jpg")
                label, hypothesis = _get(rec, "gold_label", where), _get(rec, "sentence2", where)
                if label not in VE_LABELS:
                    stats.dropped[f"pairs with gold_label {label!r}"] += 1
                    continue
                if not isinstance(hypothesis, str) or not hypothesis.strip():
                    stats.dropped["empty hypotheses"] += 1
                    continue
                by_image.setdefault(image, []).append(
                    {"id": str(rec.get("pairID", f"{src}-{n}")), "hypothesis": hypothesis.strip(), "label": label})
            for image, entries in by_image.items():
                stats.records += 1
                yield Sample(out_split, _key(out_split, f"flickr-{image}"),
                             {"image_id": f"flickr-{image}", "hypotheses": entries},
                             {"png": _candidates(patterns, split=src, id=image)})


def _karpathy_file(input_uri: str) -> str:
    if input_uri.endswith(".json"):
        return input_uri
    found = [n for n in ("dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json")
             if storage.exists(storage.join(input_uri, n))]
    if len(found) != 1:
        raise FileNotFoundError(f"--input {input_uri}: name the Karpathy split file itself "
                                f"(found {found or 'no dataset_*.json'} there)")
    return storage.join(input_uri, found[0])


def read_karpathy(opts: ReaderOptions, patterns, splits, stats: ReadStats) -> Iterator[Sample]:
    """Karpathy splits (``dataset_coco.json``, ``dataset_flickr30k.json``): one sample per image
    with its raw sentences; ``restval`` joins ``train`` by default."""
    uri = _karpathy_file(opts.input)
    data = _load_json(uri)
    wanted = {src: out for out, sources in splits.items() for src in sources}
    for i, img in enumerate(_get(data, "images", uri)):
        where = f"{uri} images[{i}]"
        src = _get(img, "split", where)
        if src not in wanted:
            continue
        filename = _get(img, "filename", where)
        ident = img.get("cocoid", os.path.splitext(filename)[0])
        image_id = f"coco-{ident}" if "cocoid" in img else f"flickr-{ident}"
        texts = _texts((_get(s, "raw", f"{where} sentences") for s in _get(img, "sentences", where)), stats, "sentences")
        stats.records += 1
        if not texts:
            stats.dropped["images without sentences"] += 1
            continue
        fields = {"split": src, "filename": filename, "id": ident}
        if img.get("filepath"):
            fields["filepath"] = img["filepath"]
        yield Sample(wanted[src], _key(wanted[src], image_id), {"image_id": image_id, "captions": texts},
                     {"png": _candidates(patterns, **fields)})


_READERS = {"coco": read_coco, "vg": read_vg, "vqa2": read_vqa2, "nlvr2": read_nlvr2, "snli-ve": read_snli_ve,
            "karpathy": read_karpathy}


# --- images -----------------------------------------------------------------------------------


def image_root(opts: ReaderOptions) -> str:
    if opts.images:
        return opts.images
    return opts.input.rsplit("/", 1)[0] if opts.input.endswith(".json") and "/" in opts.input else opts.input


def _listing(root: str, folder: str) -> dict[str, int]:
    """{file name: size} of one folder under root (empty if it does not exist)."""
    fs, path = storage.fs_and_path(storage.join(root, folder) if folder else root)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries if e.get("type") == "file"}


def resolve_images(samples: list[Sample], root: str, max_missing: float, stats: ReadStats
                   ) -> list[tuple[Sample, dict[str, tuple[str, int]]]]:
    """Find each sample's image files under ``root`` (one listing per folder); returns (sample,
    {member: (uri, size)}). Raises FileNotFoundError naming the first missing file when more than
    ``max_missing`` of the samples lack one; otherwise those are skipped and counted."""
    folders: dict[str, dict[str, int]] = {}
    out, missing = [], []
    for s in samples:
        found: dict[str, tuple[str, int]] = {}
        for member, candidates in s.images.items():
            for rel in candidates:
                folder, _, name = rel.rpartition("/")
                if folder not in folders:
                    folders[folder] = _listing(root, folder)
                if name in folders[folder]:
                    found[member] = (storage.join(root, rel), folders[folder][name])
                    break
            else:
                missing.append((s, member, candidates))
                break
        else:
            out.append((s, found))
    stats.missing_images = len(missing)
    if missing:
        s, member, candidates = missing[0]
        tried = ", ".join(storage.join(root, c) for c in candidates) or "(no pattern fits this record's fields)"
        message = (f"{len(missing)} of {len(samples)} samples have no image file: first {s.key} ({member}), "
                   f"tried {tried}")
        if len(missing) > max_missing * len(samples):
            raise FileNotFoundError(f"{message}. Check --images and --image-pattern, or pass --max-missing F "
                                    f"to skip up to that fraction of samples")
        log.warning("%s; skipping them (max_missing=%s)", message, max_missing)
    return out


def read_source(source: str, opts: ReaderOptions) -> tuple[list[Sample], ReadStats]:
    """All samples of ``source`` (annotations parsed and validated; images not yet looked up)."""
    if source not in _READERS:
        raise ValueError(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")
    if not 0.0 <= opts.max_missing <= 1.0:
        raise ValueError(f"max_missing={opts.max_missing!r}: must be a fraction in [0, 1]")
    patterns = tuple(opts.image_pattern) or DEFAULT_PATTERNS[source]
    splits = opts.splits or DEFAULT_SPLITS[source]
    stats = ReadStats()
    samples = list(_READERS[source](opts, patterns, splits, stats))
    if not samples:
        raise ValueError(f"{source}: no records with text were read from {opts.input} (splits {dict(splits)})")
    keys = Counter(s.key for s in samples)
    dup = next((k for k, n in keys.items() if n > 1), None)
    if dup is not None:
        raise ValueError(f"{source}: sample key {dup!r} occurs {keys[dup]} times in {opts.input}; "
                         f"two source splits map to one output split with the same images?")
    return samples, stats
