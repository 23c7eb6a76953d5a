"""The official datasets laid out in one folder of the store, and what each task is sharded from.

    soho pipeline run --local --param data_source=official            # download, then shard
    soho pipeline submit --host URL --param data_source=s3://bucket/raw   # already downloaded there

Layout under ROOT (each folder is what ``soho data download --dataset D --out ROOT/D`` writes;
the two image sets without a public download are put there by the user)::

    ROOT/coco/        train2014/ val2014/ annotations/captions_*.json
    ROOT/vg/          VG_100K/ VG_100K_2/ region_descriptions.json
    ROOT/vqa2/        v2_OpenEnded_mscoco_*_questions.json v2_mscoco_*_annotations.json
    ROOT/karpathy/    dataset_coco.json (its images are ROOT/coco's)
    ROOT/nlvr2/       train.json dev.json test1.json; user-provided: images/train/<dir>/..., dev/, test1/
    ROOT/snli-ve/     snli_ve_{train,dev,test}.jsonl (built from SNLI 1.0 by the download)
    ROOT/flickr30k/   user-provided: flickr30k-images/<flickr id>.jpg
    ROOT/official.json   {"format": "soho-official", "complete": [datasets downloaded whole]}

:data:`TASK_PARTS` says which reader shards each task, from which folders and splits. The
pipeline evaluates on ``test``: VQA v2 has no public test answers, so its ``val2014`` is the
``test`` split here; pre-training reads COCO ``train2014`` only, as Karpathy's and VQA's test
images come from ``val2014``. (Visual Genome shares about 50,000 images with COCO, some of them
in ``val2014``; removing those needs ``image_data.json``'s ``coco_id`` and is not done.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

from soho_core import storage
from soho_core.data.readers import ReaderOptions, parse_splits

log = logging.getLogger(__name__)

FORMAT = "soho-official"
MARKER = "official.json"


@dataclass(frozen=True)
class Part:
    """One official source feeding a task: a reader and where its files are under ROOT."""

    source: str  # a reader of soho_core.data.readers (SOURCES)
    input: str  # annotations, relative to ROOT
    images: str  # image root, relative to ROOT
    splits: str | None = None  # OUT=SOURCE[+SOURCE],... (default: the reader's)
    max_missing: float = 0.0  # fraction of samples that may lack an image (skipped, counted)


TASK_PARTS: dict[str, tuple[Part, ...]] = {
    "pretrain": (Part("coco", "coco", "coco", splits="train=train2014"), Part("vg", "vg", "vg")),
    "vqa": (Part("vqa2", "vqa2", "coco", splits="train=train2014,test=val2014"),),
    "retrieval": (Part("karpathy", "karpathy/dataset_coco.json", "coco"),),
    # NLVR2 images fetched from their URLs miss about 5%
    "nlvr2": (Part("nlvr2", "nlvr2", "nlvr2", max_missing=0.05),),
    "ve": (Part("snli-ve", "snli-ve", "flickr30k"),),
}

# What ``soho data download`` fetches for each task (its name is the folder under ROOT).
TASK_DOWNLOADS: dict[str, tuple[str, ...]] = {
    "pretrain": ("coco", "vg"), "vqa": ("coco", "vqa2"), "retrieval": ("coco", "karpathy"),
    "nlvr2": ("nlvr2",), "ve": ("snli-ve",),
}

# Image sets without a public download: (any of these folders under ROOT must exist, the key of
# its instructions in soho_core.data.download.USER_PROVIDED, the folder to put them in).
USER_IMAGES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "nlvr2": (("nlvr2/images", "nlvr2/train", "nlvr2/dev"), "nlvr2-images", "nlvr2"),
    "ve": (("flickr30k/flickr30k-images", "flickr30k/flickr30k_images"), "flickr30k", "flickr30k"),
}


def _check_tasks(tasks: Iterable[str]) -> list[str]:
    tasks = list(dict.fromkeys(["pretrain", *tasks]))
    for task in tasks:
        if task not in TASK_PARTS:
            raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASK_PARTS)}")
    return tasks


def check_user_images(root: str, tasks: Iterable[str]) -> None:
    """Raise :class:`~soho_core.data.download.UserProvidedError` for a task whose images have no
    public download and are not under ``root`` yet, saying where to get them and where they go."""
    from soho_core.data.download import USER_PROVIDED, UserProvidedError

    for task in _check_tasks(tasks):
        if task in USER_IMAGES:
            probes, key, folder = USER_IMAGES[task]
            if not any(storage.exists(storage.join(root, p)) for p in probes):
                raise UserProvidedError(
                    f"task {task!r} needs images that must be put in {storage.join(root, folder)} first (none of "
                    f"{', '.join(probes)} exists under {root}): {USER_PROVIDED[key]}")


def check_layout(root: str, tasks: Iterable[str]) -> None:
    """Raise FileNotFoundError naming the first folder or file the tasks' readers need that is
    missing under ``root`` (a dataset downloaded elsewhere and pointed to by URI)."""
    storage.check_bucket(root)
    check_user_images(root, tasks)
    for task in _check_tasks(tasks):
        for part in TASK_PARTS[task]:
            for rel in dict.fromkeys((part.input, part.images)):
                if not storage.exists(storage.join(root, rel)):
                    raise FileNotFoundError(
                        f"{storage.join(root, rel)} is missing: task {task!r} reads {part.source} from it "
                        f"(soho data download --dataset {rel.split('/')[0]} --out {storage.join(root, rel.split('/')[0])})")


def download_for(root: str, tasks: Iterable[str], sources=None) -> list[str]:
    """Download every dataset the tasks need into ``root/<dataset>``, skipping those that
    ``official.json`` lists as complete (a retried step redoes nothing); returns the datasets.
    ``sources`` replaces the URL table (tests point it at a local server)."""
    from soho_core.data.download import download

    tasks = _check_tasks(tasks)
    storage.check_bucket(root)
    check_user_images(root, tasks)  # before hours of downloading
    needed = list(dict.fromkeys(d for t in tasks for d in TASK_DOWNLOADS[t]))
    marker = storage.join(root, MARKER)
    complete = storage.read_json(marker).get("complete", []) if storage.exists(marker) else []
    for dataset in needed:
        if dataset in complete:
            log.info("%s: already complete under %s", dataset, root)
            continue
        print(f"downloading {dataset} into {storage.join(root, dataset)}", flush=True)
        download(dataset, storage.join(root, dataset), sources=sources)
        complete = [*complete, dataset]
        storage.write_json_atomic(marker, {"format": FORMAT, "complete": complete})
    return needed


def reader_options(root: str, part: Part) -> ReaderOptions:
    return ReaderOptions(storage.join(root, part.input), images=storage.join(root, part.images),
                         splits=parse_splits(part.splits) if part.splits else None, max_missing=part.max_missing)


def shard_task(root: str, out_uri: str, task: str, max_count: int = 10_000) -> dict:
    """Shard ``task`` from the official datasets under ``root`` into ``out_uri/<task>``: every
    part's source in turn (pre-training: COCO, then VG, merged in one index); returns the index."""
    from soho_core.data.shards import shard_source

    _check_tasks([task])
    index: dict = {}
    for part in TASK_PARTS[task]:
        index = shard_source(part.source, reader_options(root, part), out_uri, [task], max_count=max_count)[task]
    return index


def sources_of(task: str) -> set[str]:
    return {p.source for p in TASK_PARTS[task]}
