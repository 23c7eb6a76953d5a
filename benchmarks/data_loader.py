"""The shard loader's speed against raw image decoding, and against training, in one run.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/data_loader.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/data_loader.py --image-size 384 --format jpeg

Renders a synthetic world (``--images`` scenes at ``--image-size`` px, default the preset's
size), writes its pre-training shards to local disk and to an S3 server (moto, in this
process, on loopback), then measures, each for ``--seconds`` per round:

- raw: ``decode_image`` (decode + resize to the preset's size) over the same image bytes, in a
  loop, one process: the work the loader cannot avoid;
- loader: ``pretrain_loader`` batches (read shards, shuffle, decode, resize, tokenize, mask,
  pad) with ``data.num_workers`` 0 and 2, from local disk and from S3, after the shuffle
  buffers have filled;
- steps: the milliseconds per image of each step a worker takes (read the tar, decode, collate),
  one at a time in this process, against raw decoding: where the loader's time goes;
- train (``--train-steps`` > 0): a few pre-training steps of the preset on the local shards,
  whose ``images_per_s`` says whether the loader could be the bottleneck.

Raw and the four loaders take turns for ``--rounds`` rounds (each figure is its median), so
load from elsewhere on the machine falls on all of them alike.

Progress goes to stderr; stdout gets a header and ends with ONE JSON line: the rates (images
per second: one shard sample is one image with its captions) and the ratios loader/raw and
loader/train. Raw decoding is one process, so with 2 workers on 2 cores the loader may exceed
1.0. The S3 server shares this process (and its GIL) with the loader at 0 workers, and every
figure shares the machine with whatever else runs: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402

from soho_core.config import load_config
from soho_core.data.pretrain_data import pretrain_loader
from soho_core.data.shards import ShardSink, load_index, shard_synthetic, write_index
from soho_core.data.synthetic import synthesize
from soho_core.data.tokenizer import build_tokenizer
from soho_core.data.transforms import decode_image

WORKERS = (0, 2)
TARGET = 0.8  # the loader with 2 workers should reach this fraction of the raw decode rate


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def make_shards(world: Path, out: Path, fmt: str) -> list[bytes]:
    """Pre-training shards of the world under ``out``; returns the train images' encoded bytes.
    png: the synthetic shards as ``soho data shard`` writes them; jpeg: the same scenes
    re-encoded (quality 90), as photos are stored."""
    if fmt == "png":
        shard_synthetic(str(world), str(out), tasks=["pretrain"], max_count=200)
    else:
        sinks: dict[str, ShardSink] = {}
        counts: dict[str, int] = {}
        for line in (world / "captions.jsonl").read_text().splitlines():
            rec = json.loads(line)
            buf = io.BytesIO()
            with Image.open(world / "images" / f"{rec['image_id']}.png") as im:
                im.convert("RGB").save(buf, format="JPEG", quality=90)
            sink = sinks.setdefault(rec["split"], ShardSink(str(out / "pretrain"), rec["split"], max_count=200))
            sink.write({"__key__": rec["image_id"], "jpg": buf.getvalue(),
                        "json": json.dumps({"image_id": rec["image_id"], "captions": rec["captions"]}).encode()})
            counts[rec["split"]] = counts.get(rec["split"], 0) + 1
        for sink in sinks.values():
            sink.close()
        write_index(str(out / "pretrain"), "pretrain", "synthetic-jpeg",
                    {s: {"shards": k.shards, "num_samples": counts[s], "num_texts": 0} for s, k in sinks.items()})
    import webdataset as wds

    task_uri, index = load_index(str(out), "pretrain")
    images = []
    for name in index["splits"]["train"]["shards"]:
        for sample in wds.WebDataset(os.path.join(task_uri, name), shardshuffle=False):
            images.append(sample["png" if fmt == "png" else "jpg"])
    return images


def raw_rate(images: list[bytes], cfg, seconds: float) -> float:
    """Images per second of decode + resize alone, one process."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        decode_image(images[n % len(images)], cfg.data.image_min, cfg.data.image_max)
        n += 1
    return n / (time.perf_counter() - t0)


def stage_costs(data_uri: str, cfg, tokenizer, seconds: float) -> dict[str, float]:
    """Milliseconds per sample of each step a loader worker takes, one process, one at a time:
    reading the tar stream into samples, decoding (the json and the image, resized), and
    collating (caption choice, tokenizing, masking, padding) batches of the preset's size. Their
    sum against raw decoding bounds what a worker can reach; the rest of the gap is sharing the
    cores with the trainer process."""
    import webdataset as wds

    from soho_core.data.loader import SkipCounter, decode_sample
    from soho_core.data.pretrain_data import PretrainCollator

    task_uri, index = load_index(data_uri, "pretrain")
    urls = [os.path.join(task_uri, name) for name in index["splits"]["train"]["shards"]]

    def timed(step, items: list) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += step(items[n % len(items)])
        return (time.perf_counter() - t0) / n * 1e3

    read = lambda url: sum(1 for _ in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()))  # noqa: E731
    samples = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    decoded = [decode_sample(x, cfg, ("png",)) for x in samples]
    per = cfg.data.images_per_batch
    batches = [decoded[i:i + per] for i in range(0, len(decoded) - per + 1, per)]
    collate, counter = PretrainCollator(tokenizer, cfg, seed=0), SkipCounter()
    return {"read_tar": timed(read, urls),
            "decode": timed(lambda x: bool(decode_sample(x, cfg, ("png",))), samples),
            "collate": timed(lambda b: len(collate(b, counter).images), batches)}


class LoaderStream:
    """The training loader of one store and worker count, kept running between measurements."""

    def __init__(self, data_uri: str, preset: str, tokenizer, workers: int):
        self.cfg = load_config(preset, [f"data.num_workers={workers}"])
        self.workers = workers
        self.batches = iter(pretrain_loader(data_uri, "train", self.cfg, tokenizer, seed=0, train=True))
        # Fill the shuffle buffers (one per worker) before any timing.
        for _ in range(math.ceil(self.cfg.data.shuffle_buffer / 2 / self.cfg.data.images_per_batch)
                       * max(1, workers) + 2):
            next(self.batches)

    def rate(self, seconds: float) -> float:
        """Images per second over ``seconds``, after the batches prefetched while idle."""
        for _ in range(2 * self.workers):  # DataLoader's prefetch_factor (2) per worker
            next(self.batches)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += next(self.batches).images.shape[0]
        return n / (time.perf_counter() - t0)


def train_rate(data_uri: str, preset: str, steps: int, work: Path) -> float:
    """Images per second of pre-training at ``preset`` (the last logging window of ``steps``)."""
    from soho_core.tasks.catalog import get_task
    from soho_core.train.engine import train

    half = max(1, steps // 2)
    cfg = load_config(preset, [f"train.max_steps={2 * half}", f"train.log_every={half}",
                               f"train.ckpt_every={10 * steps}"])
    with contextlib.redirect_stdout(sys.stderr):
        train(get_task("pretrain"), cfg, data_uri, str(work / "run"))
    last = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    return float(last["images_per_s"])


@contextlib.contextmanager
def s3_server():
    """A moto S3 server on loopback, in this process; endpoint and keys via AWS_* variables."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo", help="config whose loader settings and image size are measured")
    p.add_argument("--images", type=int, default=400, help="scenes in the synthetic world")
    p.add_argument("--image-size", type=int, help="px of the stored images (default: the preset's input size)")
    p.add_argument("--format", choices=("png", "jpeg"), default="png", help="how shards store the images")
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each figure, taking turns")
    p.add_argument("--train-steps", type=int, default=10, help="pre-training steps to time (0: skip)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the preset's; a real BERT word-piece "
                                       "vocabulary costs more per caption than the synthetic one)")
    p.add_argument("--json-out", help="also write the JSON line to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.preset)
    size = args.image_size or cfg.data.image_max
    tokenizer = build_tokenizer(args.tokenizer or cfg.model.fusion.tokenizer)
    print(f"machine: {machine()}\ntorch threads: {torch.get_num_threads()}, loader workers: "
          f"{', '.join(map(str, WORKERS))}\nimages: {args.images} scenes stored at {size} px as {args.format}, "
          f"loaded at {cfg.data.image_min}-{cfg.data.image_max} px\npreset: {args.preset} "
          f"(batch {cfg.data.images_per_batch} images, shuffle buffer {cfg.data.shuffle_buffer}), tokenizer "
          f"{args.tokenizer or cfg.model.fusion.tokenizer} ({len(tokenizer)} word pieces)", flush=True)

    with tempfile.TemporaryDirectory(prefix="soho-bench-loader-") as tmp:
        work = Path(tmp)
        log(f"rendering {args.images} scenes at {size} px")
        synthesize(str(work / "world"), num_images=args.images, seed=0, image_size=size)
        images = make_shards(work / "world", work / "shards", args.format)
        log(f"{len(images)} train images, {sum(map(len, images)) / len(images) / 1024:.1f} KiB each")
        result: dict = {"benchmark": "data_loader", "machine": machine(), "preset": args.preset,
                        "image_size": size, "input_size": [cfg.data.image_min, cfg.data.image_max],
                        "format": args.format, "train_images": len(images), "threads": torch.get_num_threads(),
                        "tokenizer_size": len(tokenizer)}
        with s3_server():
            import boto3
            import fsspec

            boto3.client("s3").create_bucket(Bucket="bench")
            fsspec.filesystem("s3").put(str(work / "shards"), "bench/shards", recursive=True)
            streams = {}
            for store, uri in (("local", str(work / "shards")), ("s3", "s3://bench/shards")):
                for w in WORKERS:
                    log(f"starting the loader: {store}, {w} workers")
                    streams[store, w] = LoaderStream(uri, args.preset, tokenizer, w)
            # Rounds that take turns, so that load from elsewhere on the machine falls on every
            # figure alike; each figure is the median of its rounds.
            samples: dict = {"raw": []}
            for r in range(args.rounds):
                log(f"round {r + 1}/{args.rounds}")
                samples["raw"].append(raw_rate(images, cfg, args.seconds))
                for key, stream in streams.items():
                    samples.setdefault(key, []).append(stream.rate(args.seconds))
            del streams  # stops the workers
        median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        raw = result["raw_decode_per_s"] = median(samples["raw"])
        rates: dict[str, dict[str, float]] = {"local": {}, "s3": {}}
        for (store, w), xs in ((k, v) for k, v in samples.items() if k != "raw"):
            rates[store][str(w)] = median(xs)
        result["rounds"] = {"raw": samples["raw"],
                            **{f"{k[0]}_w{k[1]}": v for k, v in samples.items() if k != "raw"}}
        result["loader_per_s"] = rates
        result["loader_over_raw"] = {f"{store}_w{w}": r / raw for store, by in rates.items() for w, r in by.items()}
        result["target_w2_over_raw"] = TARGET
        result["meets_target"] = {store: rates[store]["2"] / raw >= TARGET for store in rates}
        log("timing the loader's steps one by one")
        costs = result["worker_ms_per_sample"] = stage_costs(str(work / "shards"), cfg, tokenizer, args.seconds)
        result["raw_decode_ms_per_sample"] = 1e3 / raw
        if args.train_steps > 0:
            log(f"pre-training {args.train_steps} steps at {args.preset}")
            t = result["train_images_per_s"] = train_rate(str(work / "shards"), args.preset, args.train_steps, work)
            result["loader_over_train"] = {f"{store}_w{w}": r / t for store, by in rates.items() for w, r in by.items()}

    print(f"\nraw decode+resize: {raw:.0f} images/s (one process)")
    for store, by in rates.items():
        for w, r in by.items():
            print(f"loader {store:5s} {w} workers: {r:6.0f} images/s = {r / raw:.2f} x raw"
                  + (f" = {r / result['train_images_per_s']:.1f} x training" if "train_images_per_s" in result else ""))
    print(f"a worker's steps, ms per image (one process): read tar {costs['read_tar']:.3f}, decode + resize "
          f"{costs['decode']:.3f}, collate (captions, tokenize, mask, pad) {costs['collate']:.3f}: "
          f"{sum(costs.values()):.3f} against raw decode {1e3 / raw:.3f}")
    if "train_images_per_s" in result:
        print(f"training ({args.preset}): {result['train_images_per_s']:.1f} images/s")
    emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
