"""Streaming shards into batches, shared by pre-training and every task.

Training resamples shards forever, each rank and dataloader worker with its own seed;
evaluation reads every shard exactly once, split by node and by worker. A sample that
cannot be read or decoded is skipped and counted: each batch carries the number of
samples its worker dropped since its previous batch, so nothing is lost silently.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds

from soho_core import storage
from soho_core.config import SohoConfig
from soho_core.data.shards import IMAGE_EXTENSIONS, load_index, shard_urls
from soho_core.data.transforms import decode_image

log = logging.getLogger(__name__)


class SkipCounter:
    """Per-worker count of dropped samples; read and reset by each batch."""

    def __init__(self) -> None:
        self.n = 0

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


class WorkerRandom:
    """Random streams seeded lazily, so each dataloader worker of each rank draws its own."""

    def __init__(self, seed: int):
        self.seed = seed
        self._rng: random.Random | None = None
        self._gen: torch.Generator | None = None

    def _init(self) -> None:
        if self._rng is None:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            s = self.seed * 1_000_003 + rank * 1000 + worker
            self._rng, self._gen = random.Random(s), torch.Generator().manual_seed(s)

    @property
    def rng(self) -> random.Random:
        self._init()
        return self._rng

    @property
    def gen(self) -> torch.Generator:
        self._init()
        return self._gen


class DataUnavailableError(RuntimeError):
    """No shard could be read for ``data.unreadable_timeout_s``: the store is unreachable or
    every shard is broken. The message names the last error."""


class ReadFailures:
    """Unreadable shards in a row. After the third, each retry waits longer (0.5 s doubling, at
    most 30 s), so a store that blinks costs a pause, not a burst of skipped shards; after
    ``give_up_s`` with no readable sample the stream raises :class:`DataUnavailableError`
    (training resampling shards forever would otherwise spin on errors)."""

    def __init__(self, give_up_s: float):
        self.give_up_s = give_up_s
        self.count = 0
        self.since: float | None = None

    def ok(self) -> None:
        self.count, self.since = 0, None

    def failed(self, err: Exception) -> None:
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        self.count += 1
        if now - self.since >= self.give_up_s:
            raise DataUnavailableError(f"no shard readable for {now - self.since:.0f} s ({self.count} failures in a "
                                       f"row; data.unreadable_timeout_s={self.give_up_s:g}); last: {err}") from err
        if self.count >= 3:
            time.sleep(min(30.0, 0.5 * 2 ** (self.count - 3), max(0.0, self.since + self.give_up_s - now)))


def image_member(sample: dict[str, Any], slot: str) -> bytes:
    """The bytes of image ``slot`` ("png", "left.png") stored under any image extension
    ("jpg", "left.jpeg", ...): shards keep each file's own encoding."""
    if slot in sample:
        return sample[slot]
    stem = slot.rpartition(".")[0]
    for ext in IMAGE_EXTENSIONS:
        name = f"{stem}.{ext}" if stem else ext
        if name in sample:
            return sample[name]
    raise KeyError(f"sample has no image {slot!r} under any of the extensions {', '.join(IMAGE_EXTENSIONS)}")


def decode_sample(sample: dict[str, Any], cfg: SohoConfig, image_keys: tuple[str, ...]) -> dict[str, Any]:
    """Raw tar sample -> {"key", "record" (the json), "images": [uint8 (3, h, w), ...]}."""
    return {"key": sample["__key__"], "record": json.loads(sample["json"]),
            "images": [decode_image(image_member(sample, k), cfg.data.image_min, cfg.data.image_max)
                       for k in image_keys]}


def stream(data_uri: str, task: str, split: str, cfg: SohoConfig, seed: int, train: bool,
           collate: Callable[[list[dict[str, Any]], SkipCounter], Any],
           image_keys: tuple[str, ...] = ("png",),
           check: Callable[[dict[str, Any]], None] | None = None,
           batch_size: int | None = None) -> wds.WebLoader:
    """Batches of ``task`` shards. ``check`` may raise on a decoded sample to have it skipped."""
    task_uri, index = load_index(data_uri, task)
    urls = shard_urls(task_uri, index, split)
    # Loader workers are the parallelism: handing a batch's few dozen captions to the Rust
    # tokenizer's own thread pool made collating slower (a demo batch: 2.9 against 1.9-2.3 ms on
    # one thread, 2 cores), and a pool in each worker oversubscribes the cores. The tokenizer
    # reads the variable at each call; a value the user set is kept.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    storage.register_webdataset_openers()
    counter = SkipCounter()

    failures = ReadFailures(cfg.data.unreadable_timeout_s)

    def count_and_continue(err: Exception) -> bool:
        counter.n += 1
        log.warning("skipping unreadable shard data: %s", err)
        failures.failed(err)
        return True

    def readable(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            failures.ok()
            yield sample

    def decode(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            try:
                out = decode_sample(sample, cfg, image_keys)
                if check is not None:
                    check(out)
            except Exception as err:  # a corrupt sample must not stop a long job
                counter.n += 1
                log.warning("skipping sample %s: %s", sample.get("__key__"), err)
                continue
            yield out

    if train:
        stages: list[Any] = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    stages += [wds.tarfile_to_samples(handler=count_and_continue), readable]
    if train:
        stages.append(wds.shuffle(cfg.data.shuffle_buffer, initial=cfg.data.shuffle_buffer // 2,
                                  rng=random.Random(seed)))
    workers = cfg.data.num_workers if train else min(cfg.data.num_workers, len(urls))
    collation = functools.partial(collate, counter=counter)
    if workers > 0:
        collation = functools.partial(_collate_for_the_wire, collation)
    stages += [decode, wds.batched(batch_size or cfg.data.images_per_batch, partial=not train, collation_fn=collation)]
    loader = wds.WebLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=workers,
                           persistent_workers=workers > 0)
    return loader.map(from_the_wire) if workers > 0 else loader


def read_records(data_uri: str, task: str, split: str) -> Iterator[dict[str, Any]]:
    """The JSON record of every sample of one split, in shard order, without decoding any image.

    For what needs only the texts and labels of a split (e.g. the per-type answer priors of the
    evaluation's blind baselines). Local shards are read by seeking past the image members; on
    an object store the bytes still stream through. A shard or record that cannot be read is
    skipped with a warning, as the loaders do.
    """
    import tarfile

    task_uri, index = load_index(data_uri, task)
    for url in shard_urls(task_uri, index, split):
        try:
            with storage.open_uri(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".json"):
                        try:
                            yield json.loads(tar.extractfile(member).read())
                        except ValueError as err:
                            log.warning("skipping record %s of %s: %s", member.name, url, err)
        except (OSError, tarfile.TarError) as err:
            log.warning("skipping unreadable shard %s: %s", url, err)


# Below this many bytes a batch's tensor crosses from a loader worker to the trainer inside the
# pickled batch (as a NumPy array); above it, through shared memory. Every tensor sent through
# shared memory costs a segment created, mapped, passed and unmapped: for a pre-training batch's
# seven tensors, 3.1 ms against 0.5 ms with the six small ones inline (measured round trip, one
# process), which made two workers no faster than one. A demo batch of uint8 images (0.4 MB) goes
# inline too; a full-size one (4 x 3 x 608 x 1024: 7.5 MB) through shared memory.
INLINE_BYTES = 1 << 20


def to_the_wire(batch: Any) -> Any:
    """A batch (dataclass) with its small tensors as NumPy arrays, for the trip out of a worker."""
    if not dataclasses.is_dataclass(batch):
        return batch
    small = {f.name: value.numpy() for f in dataclasses.fields(batch)
             if isinstance(value := getattr(batch, f.name), torch.Tensor) and value.device.type == "cpu"
             and value.numel() * value.element_size() < INLINE_BYTES}
    return dataclasses.replace(batch, **small) if small else batch


def from_the_wire(batch: Any) -> Any:
    """The batch as the collator made it: NumPy fields back to tensors (no copy)."""
    if not dataclasses.is_dataclass(batch):
        return batch
    arrays = {f.name: torch.from_numpy(value) for f in dataclasses.fields(batch)
              if isinstance(value := getattr(batch, f.name), np.ndarray)}
    return dataclasses.replace(batch, **arrays) if arrays else batch


def _collate_for_the_wire(collation: Callable[[list[dict[str, Any]]], Any], samples: list[dict[str, Any]]) -> Any:
    return to_the_wire(collation(samples))
