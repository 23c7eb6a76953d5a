"""Download the official datasets: resumable, size-checked, retried, safely extracted.

    soho data download --dataset coco --out /data/coco
    soho data download --dataset vqa2 --out s3://bucket/raw/vqa2      # staged locally, then uploaded

Every URL is in :data:`SOURCES` below (and in the README's table). What is checked: the
byte count against the size the table publishes, else against the server's Content-Length;
a SHA-256 where the table has one. None of these sources publishes a checksum of its
archives, so no entry has one (do not invent them: a wrong one fails every download).

Layout under OUT: each archive is extracted in place (``OUT/train2014/...``,
``OUT/annotations/...``); plain files land as ``OUT/<filename>``. ``OUT/.soho-download/``
holds partial downloads (``<file>.part``, resumed with an HTTP Range request) and one
``<file>.done`` marker per finished resource, so a re-run skips what is complete.

Sources without a public download (Flickr30K images, NLVR2 images) are user-provided:
:data:`USER_PROVIDED` says where to get them and the layout the readers expect, and asking
``download`` for them raises :class:`UserProvidedError` with that text.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Callable

from soho_core import storage

log = logging.getLogger(__name__)

STATE_DIR = ".soho-download"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    url: str
    filename: str  # the name it is saved under (and the .part / .done names)
    extract: bool = False  # a zip or tar archive to unpack into OUT
    size: int | None = None  # bytes, only where the source publishes it
    sha256: str | None = None  # only where the source publishes it


_COCO = "http://images.cocodataset.org"
_VQA = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa"
_VG_IMAGES = "https://cs.stanford.edu/people/rak248/VG_100K_2"
_VG_DATA = "https://visualgenome.org/static/data/dataset"
_NLVR2 = "https://raw.githubusercontent.com/lil-lab/nlvr/master/nlvr2/data"
_SNLI_VE = "https://raw.githubusercontent.com/necla-ml/SNLI-VE/master"

# THE table of official URLs. Keep README's table in step with it.
SOURCES: dict[str, tuple[Resource, ...]] = {
    "coco": (  # COCO 2014 images + captions (and instances) annotations
        Resource(f"{_COCO}/zips/train2014.zip", "train2014.zip", extract=True),
        Resource(f"{_COCO}/zips/val2014.zip", "val2014.zip", extract=True),
        Resource(f"{_COCO}/annotations/annotations_trainval2014.zip", "annotations_trainval2014.zip", extract=True),
    ),
    "coco-test2015": (  # only for VQA v2 test-dev / test-std submissions
        Resource(f"{_COCO}/zips/test2015.zip", "test2015.zip", extract=True),
    ),
    "vg": (  # Visual Genome 1.2 images (VG_100K/, VG_100K_2/) + region descriptions
        Resource(f"{_VG_IMAGES}/images.zip", "images.zip", extract=True),
        Resource(f"{_VG_IMAGES}/images2.zip", "images2.zip", extract=True),
        Resource(f"{_VG_DATA}/region_descriptions.json.zip", "region_descriptions.json.zip", extract=True),
        Resource(f"{_VG_DATA}/image_data.json.zip", "image_data.json.zip", extract=True),
    ),
    "vqa2": (  # VQA v2 questions + annotations; the images are COCO's (train2014, val2014, test2015)
        Resource(f"{_VQA}/v2_Questions_Train_mscoco.zip", "v2_Questions_Train_mscoco.zip", extract=True),
        Resource(f"{_VQA}/v2_Questions_Val_mscoco.zip", "v2_Questions_Val_mscoco.zip", extract=True),
        Resource(f"{_VQA}/v2_Questions_Test_mscoco.zip", "v2_Questions_Test_mscoco.zip", extract=True),
        Resource(f"{_VQA}/v2_Annotations_Train_mscoco.zip", "v2_Annotations_Train_mscoco.zip", extract=True),
        Resource(f"{_VQA}/v2_Annotations_Val_mscoco.zip", "v2_Annotations_Val_mscoco.zip", extract=True),
    ),
    "nlvr2": (  # NLVR2 statements (JSON lines); the images are user-provided (see USER_PROVIDED)
        Resource(f"{_NLVR2}/train.json", "train.json"),
        Resource(f"{_NLVR2}/dev.json", "dev.json"),
        Resource(f"{_NLVR2}/test1.json", "test1.json"),
    ),
    "snli-ve": (  # SNLI 1.0 + the SNLI-VE Flickr30K split lists; snli_ve_*.jsonl are built from them
        Resource("https://nlp.stanford.edu/projects/snli/snli_1.0.zip", "snli_1.0.zip", extract=True),
        Resource(f"{_SNLI_VE}/flickr30k_train_val.lst", "flickr30k_train_val.lst"),
        Resource(f"{_SNLI_VE}/data/flickr30k_test.lst", "flickr30k_test.lst"),
    ),
    "karpathy": (  # dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json
        Resource("https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
                 "caption_datasets.zip", extract=True),
    ),
}

USER_PROVIDED: dict[str, str] = {
    "flickr30k": (
        "Flickr30K images have no public download: request them at "
        "https://shannon.cs.illinois.edu/DenotationGraph/ (the form there), then unpack so that "
        "IMAGES/flickr30k-images/<flickr id>.jpg exists (e.g. flickr30k-images/1000092795.jpg). "
        "Readers that use them (karpathy with dataset_flickr30k.json, snli-ve) take --images IMAGES; "
        "another layout works with --image-pattern, e.g. 'photos/{id}.jpg'."),
    "nlvr2-images": (
        "NLVR2 images are not redistributed publicly: request access with the form linked from "
        "https://github.com/lil-lab/nlvr/tree/master/nlvr2 (or fetch the listed URLs with its "
        "util/download_images.py; about 5% are gone). Expected layout under IMAGES: "
        "images/train/<directory>/train-<set>-<pair>-img0.png and img1.png, dev/dev-...-img0.png, "
        "test1/test1-...-img0.png (as the official zips unpack); other layouts via --image-pattern "
        "with the fields {split} {directory} {image} {pair} {side}."),
}

USER_PROVIDED_FROM = {"flickr30k": "https://shannon.cs.illinois.edu/DenotationGraph/ (request form)",
                      "nlvr2-images": "https://github.com/lil-lab/nlvr/tree/master/nlvr2 (request form)"}

DATASETS = tuple(SOURCES)


class DownloadError(RuntimeError):
    """A resource could not be fetched or failed its check; the message names the URL."""


class UserProvidedError(ValueError):
    """The dataset has no public download; the message says where to get it and how to lay it out."""


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the target folder (path traversal, links, devices)."""


# --- fetching ---------------------------------------------------------------------------------


def _transient(err: Exception) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code in (408, 429)
    return isinstance(err, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                            OSError))


def _total_from(resp) -> int | None:
    """The full size of the resource from a 200 or 206 response, if the server says."""
    content_range = resp.headers.get("Content-Range")  # "bytes 100-999/1000"
    if resp.status == 206 and content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def fetch(url: str, dest: str, size: int | None = None, sha256: str | None = None, retries: int = 5,
          backoff: float = 2.0, timeout: float = 60.0, sleep: Callable[[float], None] = time.sleep) -> str:
    """Download ``url`` to the local file ``dest``, resuming ``dest + '.part'``; returns dest.

    Transient failures (connection errors, HTTP 5xx / 408 / 429, a body cut short) are retried
    ``retries`` times with exponential backoff (``backoff`` * 2^attempt seconds, +-25% jitter),
    each retry resuming where the last one stopped. The finished file must have ``size`` bytes
    (else the server's total) and, if given, that SHA-256; a mismatch removes the partial file
    and raises :class:`DownloadError`.
    """
    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    expected = size
    attempt = 0
    while True:
        offset = os.path.getsize(part) if os.path.exists(part) else 0
        if expected is not None and offset > expected:
            os.remove(part)  # larger than the resource: not a prefix of it
            offset = 0
        request = urllib.request.Request(url, headers={"User-Agent": "soho-download/1"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            try:
                resp = urllib.request.urlopen(request, timeout=timeout)
            except urllib.error.HTTPError as err:
                if err.code == 416 and offset:  # nothing after offset: the part file may be whole
                    total = err.headers.get("Content-Range", "").rsplit("/", 1)[-1].strip()
                    if total.isdigit():
                        expected = expected if expected is not None else int(total)
                    if expected is None or offset == expected:
                        break
                    os.remove(part)
                    continue
                raise
            with resp:
                total = _total_from(resp)
                if expected is None:
                    expected = total
                elif total is not None and total != expected:
                    raise DownloadError(f"{url}: the server has {total} bytes, the table says {expected}")
                mode = "ab" if resp.status == 206 else "wb"  # 200: the server ignored the range, start over
                with open(part, mode) as f:
                    while True:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        f.write(chunk)
            got = os.path.getsize(part)
            if expected is not None and got < expected:
                raise http.client.IncompleteRead(b"", expected - got)  # cut short: retry and resume
            break
        except DownloadError:
            raise
        except Exception as err:  # noqa: BLE001 - sorted into transient or fatal right here
            if not _transient(err) or attempt >= retries:
                raise DownloadError(f"{url}: {err} (after {attempt + 1} attempt(s))") from err
            delay = backoff * (2 ** attempt) * random.uniform(0.75, 1.25)
            log.warning("%s: %s; retrying in %.1fs (%d/%d)", url, err, delay, attempt + 1, retries)
            attempt += 1
            sleep(delay)
    got = os.path.getsize(part)
    if expected is not None and got != expected:
        os.remove(part)
        raise DownloadError(f"{url}: size mismatch: got {got} bytes, expected {expected}; partial file removed")
    if sha256 is not None:
        digest = _sha256(part)
        if digest != sha256.lower():
            os.remove(part)
            raise DownloadError(f"{url}: SHA-256 mismatch: got {digest}, expected {sha256}; file removed")
    os.replace(part, dest)
    return dest


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# --- extraction -------------------------------------------------------------------------------


def _inside(root: str, name: str) -> bool:
    target = os.path.realpath(os.path.join(root, name))
    return target == root or target.startswith(root + os.sep)


def _check_name(archive: str, name: str, root: str) -> None:
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    if ".." in name.replace("\\", "/").split("/") or not _inside(root, name):
        raise UnsafeArchiveError(f"{archive}: member {name!r} would land outside {root}; refusing to extract")


def extract(archive: str, dest: str) -> list[str]:
    """Unpack a zip or tar archive into ``dest``; returns the member names.

    Every member is checked before anything is written: a path that is absolute, climbs out
    with ``..``, is a symlink or hard link pointing outside ``dest``, a device or a FIFO
    raises :class:`UnsafeArchiveError` naming the archive and member. Zip symlinks are refused
    outright (no official archive has any).
    """
    os.makedirs(dest, exist_ok=True)
    root = os.path.realpath(dest)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_name(archive, info.filename, root)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symlink; refusing to extract")
            for info in infos:
                zf.extract(info, root)
            return [i.filename for i in infos]
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _check_name(archive, m.name, root)
                if m.issym() or m.islnk():
                    # a symlink's target is relative to its own folder, a hard link's to the root
                    base = os.path.dirname(m.name) if m.issym() else ""
                    if os.path.isabs(m.linkname) or not _inside(root, os.path.join(base, m.linkname)):
                        raise UnsafeArchiveError(
                            f"{archive}: link {m.name!r} -> {m.linkname!r} points outside {root}; refusing to extract")
                elif not (m.isfile() or m.isdir()):
                    raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or FIFO; refusing to extract")
            tf.extractall(root, members=members, filter="data")  # the stdlib's own guard, as a second line
            return [m.name for m in members]
    raise DownloadError(f"{archive} is neither a zip nor a tar archive")


# --- datasets ---------------------------------------------------------------------------------


def download(dataset: str, out_uri: str, retries: int = 5, backoff: float = 2.0, keep_archives: bool = False,
             staging: str | None = None, sources: dict[str, tuple[Resource, ...]] | None = None) -> dict:
    """Fetch every resource of ``dataset`` into ``out_uri``; returns a summary.

    A local ``out_uri`` is written in place. Another URI (``s3://...``) is staged in
    ``staging`` (default: a folder under the system temp dir named after the dataset) and
    uploaded when everything is complete, skipping files already there with the same size.
    ``sources`` replaces the URL table (tests point it at a local server).
    """
    table = SOURCES if sources is None else sources
    if dataset in USER_PROVIDED:
        raise UserProvidedError(f"dataset {dataset!r}: {USER_PROVIDED[dataset]}")
    if dataset not in table:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(table)} "
                         f"(user-provided, no download: {', '.join(USER_PROVIDED)})")
    local = storage.is_local(out_uri)
    storage.check_bucket(out_uri)  # before hours of downloading, not at the upload
    root = (out_uri[len("file://"):] if out_uri.startswith("file://") else out_uri) if local else \
        (staging or os.path.join(tempfile.gettempdir(), f"soho-download-{dataset}"))
    state = os.path.join(root, STATE_DIR)
    os.makedirs(state, exist_ok=True)
    done, skipped = [], []
    for res in table[dataset]:
        marker = os.path.join(state, res.filename + ".done")
        if os.path.exists(marker):
            skipped.append(res.filename)
            continue
        target = os.path.join(state if res.extract else root, res.filename)
        log.info("downloading %s", res.url)
        fetch(res.url, target, size=res.size, sha256=res.sha256, retries=retries, backoff=backoff)
        info = {"url": res.url, "bytes": os.path.getsize(target)}
        if res.extract:
            info["members"] = len(extract(target, root))
            if not keep_archives:
                os.remove(target)
        with open(marker, "w") as f:
            json.dump(info, f)
        done.append(res.filename)
    if dataset == "snli-ve":
        build_snli_ve(root)
    if not local:
        _upload(root, out_uri)
    return {"dataset": dataset, "out": out_uri, "downloaded": done, "already_complete": skipped}


def _upload(local_root: str, out_uri: str) -> None:
    fs, base = storage.fs_and_path(out_uri)
    base = base.rstrip("/")
    present = {p: d.get("size") for p, d in (fs.find(base, detail=True).items() if fs.exists(base) else [])}
    for folder, dirs, files in os.walk(local_root):
        dirs[:] = [d for d in dirs if d != STATE_DIR]
        for name in files:
            path = os.path.join(folder, name)
            remote = f"{base}/{os.path.relpath(path, local_root).replace(os.sep, '/')}"
            if present.get(remote) != os.path.getsize(path):
                fs.put_file(path, remote)


def build_snli_ve(root: str) -> dict[str, int]:
    """Write ``snli_ve_{train,dev,test}.jsonl`` into ``root`` from SNLI 1.0 and the Flickr30K lists.

    As the SNLI-VE generator (necla-ml/SNLI-VE) does: keep the SNLI pairs whose premise is a
    Flickr30K caption (pairID without ``vg_``) and that have a gold label, add ``Flickr30K_ID``
    (pairID up to ``.jpg``); test = the images of flickr30k_test.lst, dev = the last 1000 of
    flickr30k_train_val.lst, train = the rest of it. Returns lines written per split.
    """
    snli = os.path.join(root, "snli_1.0")
    lists = {name: os.path.join(root, f"flickr30k_{name}.lst") for name in ("train_val", "test")}
    for path in [*lists.values(), *(os.path.join(snli, f"snli_1.0_{s}.jsonl") for s in ("train", "dev", "test"))]:
        if not os.path.exists(path):
            raise FileNotFoundError(f"cannot build SNLI-VE: {path} is missing (run `soho data download --dataset snli-ve`)")
    by_image: dict[str, list[dict]] = {}
    for s in ("train", "dev", "test"):
        with open(os.path.join(snli, f"snli_1.0_{s}.jsonl"), encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                pair = rec.get("pairID", "")
                if rec.get("gold_label") == "-" or "vg_" in pair or ".jpg" not in pair:
                    continue
                rec["Flickr30K_ID"] = pair[:pair.rfind(".jpg")]
                by_image.setdefault(rec["Flickr30K_ID"], []).append(dict(sorted(rec.items())))

    def read_list(path: str) -> list[str]:
        with open(path, encoding="utf-8") as f:
            return [ln.strip().removesuffix(".jpg") for ln in f if ln.strip()]

    train_val = read_list(lists["train_val"])
    splits = {"train": train_val[:-1000], "dev": train_val[-1000:], "test": read_list(lists["test"])}
    counts = {}
    for split, images in splits.items():
        lines = [json.dumps(rec) for image in images for rec in by_image.get(image, [])]
        storage.write_bytes_atomic(os.path.join(root, f"snli_ve_{split}.jsonl"),
                                   ("\n".join(lines) + "\n").encode("utf-8") if lines else b"")
        counts[split] = len(lines)
    return counts


def url_table() -> str:
    """The URL table as Markdown (for the README)."""
    rows = ["| dataset | file | URL |", "|---|---|---|"]
    rows += [f"| {name} | {r.filename} | {r.url} |" for name, resources in SOURCES.items() for r in resources]
    rows += [f"| {name} | user-provided, no public download | {USER_PROVIDED_FROM[name]} |" for name in USER_PROVIDED]
    return "\n".join(rows)
