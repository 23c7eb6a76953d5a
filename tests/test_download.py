"""The downloader against a real HTTP server on loopback (http.server in a thread)."""

import hashlib
import io
import os
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from soho_core.data import download as dl


class Server:
    """Serves ``files`` with HTTP Range support; ``fail[path] = n`` answers 500 to the next n
    requests of path; ``cut[path] = n`` sends only the first n bytes of the next response."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.fail: dict[str, int] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if server.fail.get(self.path, 0) > 0:
                    server.fail[self.path] -= 1
                    self.send_error(500, "try again")
                    return
                if self.path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[self.path]
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.cut:
                    body = body[: server.cut.pop(self.path)]  # then the connection drops
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server() as s:
        yield s


PAYLOAD = os.urandom(300_000)


def test_resumes_a_partial_file_with_a_range_request(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:120_000])
    dl.fetch(f"{server.url}/a.bin", str(dest), backoff=0)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/a.bin", "bytes=120000-")]
    assert not (tmp_path / "a.bin.part").exists()


def test_retries_after_server_error_and_after_a_dropped_connection(server, tmp_path):
    server.files["/b.bin"] = PAYLOAD
    server.fail["/b.bin"] = 2
    server.cut["/b.bin"] = 100_000
    slept = []
    dl.fetch(f"{server.url}/b.bin", str(tmp_path / "b.bin"), backoff=0.5, sleep=slept.append)
    assert (tmp_path / "b.bin").read_bytes() == PAYLOAD
    ranges = [r for p, r in server.requests]
    assert ranges[:3] == [None, None, None]  # two 500s, then the response that was cut short
    assert ranges[3] == "bytes=100000-"  # the retry resumed where the cut left off
    assert len(slept) == 3 and slept[1] > slept[0]  # backoff grows


def test_gives_up_after_retries_and_fails_fast_on_404(server, tmp_path):
    server.files["/c.bin"] = PAYLOAD
    server.fail["/c.bin"] = 10
    with pytest.raises(dl.DownloadError, match=r"c\.bin.*500.*3 attempt"):
        dl.fetch(f"{server.url}/c.bin", str(tmp_path / "c.bin"), retries=2, backoff=0, sleep=lambda s: None)
    before = len(server.requests)
    with pytest.raises(dl.DownloadError, match=r"missing\.bin.*404"):
        dl.fetch(f"{server.url}/missing.bin", str(tmp_path / "m.bin"), retries=5, sleep=lambda s: None)
    assert len(server.requests) == before + 1  # not retried


def test_size_and_checksum_mismatch_are_detected(server, tmp_path):
    server.files["/d.bin"] = PAYLOAD
    with pytest.raises(dl.DownloadError, match="300000 bytes, the table says 299999"):
        dl.fetch(f"{server.url}/d.bin", str(tmp_path / "d.bin"), size=len(PAYLOAD) - 1, backoff=0)
    with pytest.raises(dl.DownloadError, match="SHA-256 mismatch"):
        dl.fetch(f"{server.url}/d.bin", str(tmp_path / "d.bin"), sha256="0" * 64, backoff=0)
    assert not (tmp_path / "d.bin").exists() and not (tmp_path / "d.bin.part").exists()
    good = hashlib.sha256(PAYLOAD).hexdigest()
    dl.fetch(f"{server.url}/d.bin", str(tmp_path / "d.bin"), size=len(PAYLOAD), sha256=good)
    assert (tmp_path / "d.bin").read_bytes() == PAYLOAD


def test_a_server_that_keeps_sending_too_little_is_a_size_error(server, tmp_path):
    server.files["/e.bin"] = PAYLOAD
    server.cut["/e.bin"] = 10  # re-armed before each retry: every response is cut short
    attempts = []

    def sleep(_):
        attempts.append(1)
        server.cut["/e.bin"] = 10

    with pytest.raises(dl.DownloadError, match=r"e\.bin"):
        dl.fetch(f"{server.url}/e.bin", str(tmp_path / "e.bin"), retries=2, backoff=0, sleep=sleep)
    assert len(attempts) == 2
    assert (tmp_path / "e.bin.part").stat().st_size == 30  # kept for the next run to resume


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_slip_is_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip({"ok/first.txt": b"fine", "../../escaped.txt": b"evil"}))
    dest = tmp_path / "out"
    with pytest.raises(dl.UnsafeArchiveError, match=r"evil\.zip.*\.\./\.\./escaped\.txt"):
        dl.extract(str(archive), str(dest))
    assert not (tmp_path / "escaped.txt").exists() and not (dest / "ok" / "first.txt").exists()
    archive.write_bytes(_zip({"/etc/abs.txt": b"evil"}))
    with pytest.raises(dl.UnsafeArchiveError, match="absolute"):
        dl.extract(str(archive), str(dest))


def test_tar_links_pointing_out_are_refused_and_safe_tars_extract(tmp_path):
    def tar(path, add):
        with tarfile.open(path, "w:gz") as tf:
            add(tf)
        return str(path)

    def symlink_out(tf):
        info = tarfile.TarInfo("images/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
        tf.addfile(info)

    with pytest.raises(dl.UnsafeArchiveError, match="points outside"):
        dl.extract(tar(tmp_path / "l.tar.gz", symlink_out), str(tmp_path / "out"))

    def good(tf):
        data = b"caption"
        info = tarfile.TarInfo("ann/x.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("ann/y.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "x.txt"
        tf.addfile(link)

    names = dl.extract(tar(tmp_path / "g.tar.gz", good), str(tmp_path / "ok"))
    assert sorted(names) == ["ann/x.txt", "ann/y.txt"] and (tmp_path / "ok/ann/y.txt").read_bytes() == b"caption"


def test_download_a_dataset_extracts_and_skips_what_is_complete(server, tmp_path):
    server.files["/ann.zip"] = _zip({"annotations/captions_train2014.json": b"{}"})
    server.files["/train.json"] = b'{"identifier": "train-1-0-0"}\n'
    table = {"mini": (dl.Resource(f"{server.url}/ann.zip", "ann.zip", extract=True),
                      dl.Resource(f"{server.url}/train.json", "train.json"))}
    out = tmp_path / "mini"
    summary = dl.download("mini", str(out), sources=table, backoff=0)
    assert summary["downloaded"] == ["ann.zip", "train.json"]
    assert (out / "annotations" / "captions_train2014.json").read_bytes() == b"{}"
    assert (out / "train.json").exists() and not (out / dl.STATE_DIR / "ann.zip").exists()  # archive removed
    n = len(server.requests)
    again = dl.download("mini", str(out), sources=table)
    assert again["already_complete"] == ["ann.zip", "train.json"] and len(server.requests) == n


def test_download_to_s3_stages_then_uploads(server, tmp_path, s3_server):
    import fsspec

    server.files["/train.json"] = b'{"identifier": "train-1-0-0"}\n'
    table = {"mini": (dl.Resource(f"{server.url}/train.json", "train.json"),)}
    dl.download("mini", "s3://soho/raw/mini", sources=table, staging=str(tmp_path / "stage"))
    fs = fsspec.filesystem("s3")
    assert fs.cat("soho/raw/mini/train.json") == server.files["/train.json"]
    assert not fs.exists(f"soho/raw/mini/{dl.STATE_DIR}")


def test_user_provided_and_unknown_datasets_say_so(tmp_path):
    with pytest.raises(dl.UserProvidedError, match="flickr30k-images/<flickr id>.jpg"):
        dl.download("flickr30k", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'cocoo'.*coco, coco-test2015, vg"):
        dl.download("cocoo", str(tmp_path))


def test_url_table_lists_every_resource():
    table = dl.url_table()
    for resources in dl.SOURCES.values():
        for r in resources:
            assert r.url in table and r.url.startswith(("http://", "https://"))
    assert "flickr30k" in table


def test_build_snli_ve_from_snli_and_split_lists(tmp_path):
    import json

    snli = tmp_path / "snli_1.0"
    snli.mkdir()
    lines = {"train": [("111.jpg#0r1e", "entailment"), ("222.jpg#1r1c", "contradiction"), ("vg_3.jpg#0", "neutral")],
             "dev": [("111.jpg#2r1n", "-")], "test": [("333.jpg#0r1n", "neutral")]}
    for split, rows in lines.items():
        (snli / f"snli_1.0_{split}.jsonl").write_text("".join(
            json.dumps({"pairID": p, "gold_label": g, "sentence1": "a man", "sentence2": f"h {p}"}) + "\n"
            for p, g in rows))
    (tmp_path / "flickr30k_train_val.lst").write_text("111\n" + "".join(f"{9000 + i}\n" for i in range(999)) + "222\n")
    (tmp_path / "flickr30k_test.lst").write_text("333.jpg\n")
    counts = dl.build_snli_ve(str(tmp_path))
    assert counts == {"train": 1, "dev": 1, "test": 1}  # 111 -> train; 222 is in the last 1000 -> dev
    dev = [json.loads(x) for x in (tmp_path / "snli_ve_dev.jsonl").read_text().splitlines()]
    assert dev[0]["Flickr30K_ID"] == "222" and dev[0]["gold_label"] == "contradiction"


def test_readme_lists_every_download_url():
    """The README's URL table is the code's, row for row."""
    from pathlib import Path

    from soho_core.data.download import url_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert url_table() in readme


def test_download_to_a_missing_bucket_fails_before_fetching(server, tmp_path, s3_server):
    import boto3

    server.files["/train.json"] = b'{"identifier": "train-1-0-0"}\n'
    table = {"mini": (dl.Resource(f"{server.url}/train.json", "train.json"),)}
    with pytest.raises(FileNotFoundError, match="S3 bucket 'no-such-bucket' does not exist"):
        dl.download("mini", "s3://no-such-bucket/raw/mini", sources=table, staging=str(tmp_path / "stage"))
    assert server.requests == [] and not (tmp_path / "stage").exists()
    assert [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]] == ["soho"]
