"""Bad input at the level users meet it: the loader's batches (``skipped``), the shard writers'
counts, the readers' and CLI's errors naming the file and field, S3 buckets that do not exist
and an S3 server that goes away in the middle of writing shards.

Decisions these tests pin down (soho_core/data/transforms.py): transparency is composited over
white; images with a side under 8 px (a 1x1 placeholder) and images declaring more than
8192x8192 pixels (a decompression bomb, refused from the header) are skipped and counted.
"""

import io
import json
import re
import socket
import struct
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from soho_core.config import load_config
from soho_core.data import transforms
from soho_core.data.pretrain_data import pretrain_loader
from soho_core.data.readers import ReaderOptions, read_source
from soho_core.data.shards import ShardSink, ShardWriteError, load_index, shard_source, shard_synthetic, write_index
from soho_core.data.tokenizer import build_tokenizer
from soho_core.data.transforms import MAX_IMAGE_PIXELS, decode_image
from test_readers import coco  # noqa: F401  (fixture: a small COCO captions tree)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(size=(96, 64)) -> Image.Image:
    """An RGB image with content (a gradient), so truncation cuts real data."""
    w, h = size
    x = torch.linspace(0, 255, w).to(torch.uint8).expand(h, w)
    y = torch.linspace(0, 255, h).to(torch.uint8)[:, None].expand(h, w)
    return Image.fromarray(torch.stack([x, y, 255 - x], -1).contiguous().numpy(), "RGB")


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that declares ``width`` x ``height`` RGB pixels, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def rgba_png() -> bytes:
    """Left half opaque red; right half fully transparent, storing black under the alpha."""
    im = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (0, 0, 16, 16))
    return encode(im, "PNG")


# --- decoding ---------------------------------------------------------------------------------


def test_alpha_greyscale_and_cmyk_decode_to_rgb():
    out = decode_image(rgba_png(), 16, 32)
    assert out.shape == (3, 16, 32) and out.dtype == torch.uint8
    assert out[:, 8, 4].tolist() == [255, 0, 0]
    assert out[:, 8, 28].tolist() == [255, 255, 255]  # composited over white, not the stored black
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255])
    assert decode_image(encode(palette, "PNG", transparency=1), 16, 16)[:, 3, 3].tolist() == [255, 255, 255]

    grey = decode_image(encode(Image.new("L", (40, 20), 90), "JPEG"), 20, 40)
    assert grey.shape == (3, 20, 40) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert abs(int(grey[0, 5, 5]) - 90) <= 2

    cmyk = Image.new("CMYK", (40, 20), (0, 255, 255, 0))  # pure red in CMYK
    assert Image.open(io.BytesIO(encode(cmyk, "JPEG"))).mode == "CMYK"
    r, g, b = decode_image(encode(cmyk, "JPEG"), 20, 40)[:, 10, 20].tolist()
    assert r > 240 and g < 15 and b < 15


def test_a_large_jpeg_decodes_reduced_to_the_same_picture():
    """JPEGs are decoded at a reduced scale (draft) before the resize: same picture, same size."""
    big = photo((640, 480))
    data = encode(big, "JPEG", quality=95)
    out = decode_image(data, 96, 128)
    assert out.shape == (3, 96, 128)
    expect = torch.from_numpy(np.array(big.resize((128, 96), Image.BILINEAR))).permute(2, 0, 1)
    assert (out.int() - expect.int()).abs().float().mean() < 4


def test_decompression_bomb_is_refused_from_its_header():
    bomb = png_claiming(100_000, 100_000)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(Image.DecompressionBombError, match="10000000000 pixels"):
        decode_image(bomb, 64, 64)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 5 << 20  # nothing of the 30 GB it declares was allocated
    # Between this limit and PIL's own (89.5 M pixels): refused by ours, naming it
    with pytest.raises(Image.DecompressionBombError, match="MAX_IMAGE_PIXELS"):
        decode_image(png_claiming(9000, 9000), 64, 64)
    assert 9000 * 9000 > MAX_IMAGE_PIXELS


def test_tiny_and_empty_images_are_refused():
    with pytest.raises(ValueError, match="1x1"):
        decode_image(encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), 64, 64)
    with pytest.raises(ValueError, match="0 bytes"):
        decode_image(b"", 64, 64)
    # the smallest accepted image resizes like any other: 8 x 30 px fit into 64 x 64
    side = transforms.MIN_IMAGE_SIDE
    ok = decode_image(encode(Image.new("RGB", (side, 30), (9, 9, 9)), "PNG"), 64, 64)
    assert ok.shape == (3, *transforms.fit_size(30, side, 64, 64)) == (3, 64, 17)


# --- the loader: each bad sample skipped and counted ----------------------------------------------


def _sample(key: str, image: bytes | None, captions, ext: str = "png", raw_json: bytes | None = None) -> dict:
    sample = {"__key__": key, "json": raw_json if raw_json is not None else
              json.dumps({"image_id": key, "captions": captions}).encode()}
    if image is not None:
        sample[ext] = image
    return sample


def test_loader_skips_and_counts_every_kind_of_bad_sample(tmp_path):
    good_png = encode(photo(), "PNG")
    jpeg = encode(photo(), "JPEG")
    long_caption = " ".join(["red circle"] * 1000)[:10_000]
    samples = [
        _sample("good", good_png, ["a red circle"]),
        _sample("truncated", jpeg[: len(jpeg) // 2], ["a red circle"], "jpg"),
        _sample("zerobytes", b"", ["a red circle"]),
        _sample("alpha", rgba_png(), ["a red square"]),
        _sample("grey", encode(Image.new("L", (64, 64), 128), "JPEG"), ["a grey square"], "jpg"),
        _sample("cmyk", encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"), ["a red square"], "jpg"),
        _sample("onepixel", encode(Image.new("RGB", (1, 1)), "PNG"), ["a red circle"]),
        _sample("bomb", png_claiming(100_000, 100_000), ["a red circle"]),
        _sample("emptycaptions", good_png, ["", "   "]),
        _sample("somecaptions", good_png, ["", "a blue circle"]),
        _sample("longcaption", good_png, [long_caption]),
        _sample("notutf8", good_png, None, raw_json=b'{"image_id": "x", "captions": ["caf\xe9"]}'),
        _sample("noimage", None, ["a red circle"]),
    ]
    assert len(long_caption) == 10_000
    sink = ShardSink(str(tmp_path / "pretrain"), "test")
    for s in samples:
        sink.write(s)
    sink.close()
    write_index(str(tmp_path / "pretrain"), "pretrain", "test",
                {"test": {"shards": sink.shards, "num_samples": len(samples), "num_texts": 0}})
    cfg = load_config("tiny", ["data.images_per_batch=32", "data.sentence_group=1"])
    batches = list(pretrain_loader(str(tmp_path), "test", cfg, build_tokenizer("synthetic"), seed=0, train=False))
    used = sum(b.images.shape[0] for b in batches)
    skipped = sum(b.skipped for b in batches)
    bad = {"truncated", "zerobytes", "onepixel", "bomb", "emptycaptions", "notutf8", "noimage"}
    assert (used, skipped) == (len(samples) - len(bad), len(bad))
    (batch,) = batches
    assert batch.input_ids.shape[1] <= cfg.model.fusion.max_text_len  # the long caption was truncated
    assert torch.isfinite(batch.images).all() and batch.images.shape[2] % cfg.data.size_divisor == 0


# --- readers and the shard writer ---------------------------------------------------------------


def test_shard_writer_skips_and_counts_bombs_and_placeholder_images(coco):  # noqa: F811
    (coco / "train2014" / "COCO_train2014_000000000009.jpg").write_bytes(png_claiming(100_000, 100_000))
    (coco / "train2014" / "COCO_train2014_000000000025.jpg").write_bytes(encode(Image.new("RGB", (1, 1)), "PNG"))
    (coco / "train2014" / "COCO_train2014_000000000030.jpg").write_bytes(rgba_png())  # fine: decodes
    index = shard_source("coco", ReaderOptions(str(coco)), str(coco.parent / "shards"))["pretrain"]
    assert index["splits"]["train"]["num_samples"] == 2 and index["splits"]["train"]["num_skipped"] == 2
    sidecar = json.loads((coco.parent / "shards" / "pretrain" / "train-coco-00000.tar.json").read_text())
    reasons = " ".join(r for _, r in sidecar["skipped"])
    assert "DecompressionBombError" in reasons and "1x1" in reasons


def test_annotations_that_are_not_utf8_name_the_file(coco, tmp_path, capsys):  # noqa: F811
    path = coco / "annotations" / "captions_train2014.json"
    path.write_bytes(path.read_bytes().replace(b"a photo 1 of thing 25", b"caf\xe9 photo"))
    with pytest.raises(ValueError, match=r"captions_train2014\.json is not UTF-8 JSON"):
        read_source("coco", ReaderOptions(str(coco)))
    from soho_core.cli import main

    assert main(["data", "shard", "--source", "coco", "--input", str(coco), "--out", str(tmp_path / "out")]) == 2
    assert "captions_train2014.json is not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    vg = tmp_path / "vg"
    vg.mkdir()
    latin1 = b'[{"id": 1, "regions": [{"phrase": "caf\xe9"}]}]'
    (vg / "region_descriptions.json").write_bytes(latin1)
    with pytest.raises(ValueError, match=rf"region_descriptions\.json is not UTF-8: byte {latin1.index(0xE9)}:"):
        read_source("vg", ReaderOptions(str(vg)))
    (vg / "region_descriptions.json").write_text(json.dumps([
        {"id": 1, "regions": [{"phrase": "a tree"}]}, {"id": 2, "regions": [{"image_id": 2, "x": 0}]}]))
    with pytest.raises(ValueError, match=r"region_descriptions\.json \[1\] regions\[0\]: missing field 'phrase'"):
        read_source("vg", ReaderOptions(str(vg)))


# --- S3: a bucket that does not exist, a server that goes away -----------------------------------


def _buckets():
    import boto3

    return sorted(b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"])


def test_missing_bucket_is_named_before_any_work(s3_server, synthetic_dir, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="S3 bucket 'no-such-bucket' does not exist"):
        shard_synthetic(str(synthetic_dir), "s3://no-such-bucket/shards", tasks=["pretrain"])
    assert _buckets() == ["soho"]  # s3fs would have created it on the first write
    from soho_core.cli import main

    assert main(["data", "shard", "--source", "synthetic", "--input", str(synthetic_dir),
                 "--out", "s3://no-such-bucket/shards"]) == 2
    assert "S3 bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="S3 bucket 'no-such-bucket' does not exist"):
        load_index("s3://no-such-bucket/shards", "pretrain")
    assert main(["pretrain", "--config", "tiny", "--data", "s3://no-such-bucket/shards",
                 "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    assert "S3 bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["data", "synth", "--out", "s3://no-such-bucket/world", "--num-images", "2"]) == 2
    assert "S3 bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert _buckets() == ["soho"]


REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) \S+ HTTP/1\.[01]")


class Outage:
    """A TCP proxy in front of the S3 server that can take it away: once the request line
    ``marker`` has passed ``allow`` times, the connection carrying it next is cut and the port
    refuses connections (the server is gone) until :meth:`restore`. ``requests`` records the
    request lines that got through."""

    def __init__(self, target: str):
        self.target = int(target.rsplit(":", 1)[1])
        self.marker: bytes | None = None
        self.allow = 0
        self.requests: list[str] = []
        self.live: list[socket.socket] = []
        self.lock = threading.Lock()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.restore()

    def restore(self) -> None:
        self.down = False
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: same port again
        listener.settimeout(0.05)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while not self.down:
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                client.settimeout(None)
                upstream = socket.create_connection(("127.0.0.1", self.target))
                with self.lock:
                    self.live += [client, upstream]
                threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
                threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                request = REQUEST_LINE.match(data) if from_client else None
                if request:
                    line = request.group(0)
                    if self.marker and self.marker in line:
                        if self.allow == 0:
                            self._go_down()
                            return
                        self.allow -= 1
                    self.requests.append(line.decode())
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def _go_down(self) -> None:
        self.down = True
        with self.lock:
            for s in self.live:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.live.clear()
        time.sleep(0.1)  # the accept loop closes the listener within 0.05 s


@pytest.fixture
def outage(s3_server, monkeypatch):
    """The S3 server behind an :class:`Outage` proxy; the client tries each request once
    (botocore's retries would only slow the outage down)."""
    import s3fs

    proxy = Outage(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    yield proxy
    proxy.down = True
    s3fs.S3FileSystem.clear_instance_cache()


def _objects(endpoint: str, prefix: str) -> list[str]:
    """Object names under ``prefix``, asked of the S3 server itself (behind the proxy's back)."""
    import boto3

    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="soho", Prefix=prefix)
    return sorted(o["Key"].rsplit("/", 1)[-1] for o in listing.get("Contents", []))


def test_server_going_away_mid_write_leaves_no_listed_partial_shard_and_a_rerun_completes(
        coco, s3_server, outage, tmp_path):  # noqa: F811
    opts = ReaderOptions(str(coco))
    out = "s3://soho/out"
    outage.marker = b"PUT /soho/out/pretrain/train-coco-00002.tar "
    with pytest.raises(ShardWriteError, match=r"train-coco-00002\.tar.*2 of 6 coco shard\(s\) of pretrain are "
                                              r"complete and kept; rerun the same command"):
        shard_source("coco", opts, out, max_count=1)
    assert outage.down
    assert _objects(s3_server, "out/pretrain/") == ["train-coco-00000.tar", "train-coco-00000.tar.json",
                                         "train-coco-00001.tar", "train-coco-00001.tar.json"]  # no index

    outage.marker = None
    outage.restore()
    before = len(outage.requests)
    index = shard_source("coco", opts, out, max_count=1)["pretrain"]
    rerun_puts = [r.split()[1].rsplit("/", 1)[-1] for r in outage.requests[before:] if r.startswith("PUT")]
    assert [p for p in rerun_puts if p.endswith(".tar")] == [
        "train-coco-00002.tar", "train-coco-00003.tar", "val-coco-00000.tar", "val-coco-00001.tar"]
    assert index["splits"]["train"]["num_samples"] == 4 and len(index["splits"]["val"]["shards"]) == 2
    listed = [n for v in index["splits"].values() for n in v["shards"]]
    assert set(listed) <= set(_objects(s3_server, "out/pretrain/"))
    cfg = load_config("tiny", ["data.images_per_batch=8"])
    batches = list(pretrain_loader(out, "train", cfg, build_tokenizer("synthetic"), seed=0, train=False))
    assert sum(b.images.shape[0] for b in batches) == 4 and sum(b.skipped for b in batches) == 0


def test_server_going_away_while_sharding_synthetic_data(synthetic_dir, s3_server, outage):
    """The synthetic writer has no resume, but the same guarantees: no index until every shard
    is published whole, and a rerun after the outage completes."""
    outage.marker = b"PUT /soho/syn/pretrain/train-00001.tar "
    with pytest.raises(ShardWriteError, match=r"could not write shard s3://soho/syn/pretrain/train-00001\.tar"):
        shard_synthetic(str(synthetic_dir), "s3://soho/syn", tasks=["pretrain"], max_count=40)
    assert _objects(s3_server, "syn/pretrain/") == ["train-00000.tar"]  # no index.json, no partial shard
    outage.marker = None
    outage.restore()
    index = shard_synthetic(str(synthetic_dir), "s3://soho/syn", tasks=["pretrain"], max_count=40)["pretrain"]
    assert "index.json" in _objects(s3_server, "syn/pretrain/")
    assert set(index["splits"]["train"]["shards"]) <= set(_objects(s3_server, "syn/pretrain/"))
