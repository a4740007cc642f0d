"""``ingest.images``: a folder of images (or the photographs scikit-image ships) -> a curated
image table, several deterministic random crops per image.

Config ``root`` is a local folder, an ``s3://`` prefix, or ``skimage://`` for the built-in
photographs. Each source image becomes ``crops_per_image`` samples.

Sample ids: ``<dataset>/<key>-c<k>``, where ``key`` is the image's path relative to ``root``
(sub-folders, file name and extension) through :func:`vgen_core.data.identity.escape_key`
(``%``, ``/``, whitespace and control characters percent-encoded, everything else kept), and
``k`` the crop index. ``root/cats/my photo.png`` gives ``images/cats%2Fmy%20photo.png-c0``,
``-c1``, ...; :func:`parse_image_sample_id` turns an id back into (dataset, relative path, k).
So two files never share an id (``a/cat.png`` and ``b/cat.png`` are ``images/a%2Fcat.png-c0``
and ``images/b%2Fcat.png-c0``) and any file name is ingested, none refused (a local name that
is not valid UTF-8 too: Python lists its bytes as lone surrogates, which the id escapes and
``source`` shows as ``\\udcXX``). For skimage:// the
relative path is the photo's name: ``images/astronaut-c0``. The crop box depends only on
(seed, key, k), so ids and pixels are the same on every run and every number of workers, and
same-named files in different folders get different crops.

Versions: ``version`` 2 keyed samples by the file stem alone (``images/cat-c0``), so same-named
files overwrote each other and a name with a space failed the stage. Version 3 (this scheme)
changes the row fingerprint, so a re-run over a version-2 table reads every file again, writes
the new ids, and deletes the old-scheme ids as no longer listed (skimage ids and crops are the
same in both, so those rows are left as they are).

Labels (``labels: auto``): when every image sits in a class sub-folder (the ImageFolder /
ImageNet layout ``root/<class>/<image>``) the label is the class folder's index among the sorted
class folders, so adding or deleting an image never relabels the others; for a flat folder (and
skimage://) it is the image's index in the sorted listing. ``labels: none`` gives -1
everywhere. A file that does not decode is quarantined with the decoder's message.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import Field

from vgen_core.data import content_digest, make_sample_id
from vgen_core.data.fsio import filesystem_for
from vgen_core.data.identity import escape_key, parse_sample_id, unescape_key
from vgen_core.data.sample_images import PHOTOS, encode_png, load_photo, to_rgb
from vgen_core.data.schemas import IMAGE_SAMPLES

from .base import (BUILTIN_ROOTS, BatchResult, SourceStage, StageConfig, StageError, first_file,
                   quarantine_record)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

_CROP_SUFFIX = "-c"
#: `` at 0x7f..>`` in an exception's text (PIL names the BytesIO it read): dropped, so the
#: quarantine reason of a file is the same on every read (recorded once, not replaced)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def image_sample_id(dataset: str, key: str, k: int) -> str:
    """Id of crop ``k`` of the image whose escaped relative path is ``key``."""
    return make_sample_id(dataset, f"{key}{_CROP_SUFFIX}{k}")


def escape_path(text: str) -> str:
    """:func:`~vgen_core.data.identity.escape_key` of a file path, fast for the usual one: a
    printable path without ``%`` or spaces needs only its ``/`` escaped (``%2F``), a
    ``str.replace``; any other goes through ``escape_key`` (character by character, which cost
    ~2 s per 10^5 files, two paths each, on every listing)."""
    if text.isprintable() and "%" not in text and " " not in text:
        return text.replace("/", "%2F")
    return escape_key(text)


def crop_sample_ids(dataset: str, keys: list[str], crops: int) -> pa.ListArray:
    """``[[image_sample_id(dataset, key, k) for k in range(crops)] for key in keys]`` as an
    Arrow ``list<string>``, built for listings of 10^5 files x 64 crops: each key is validated
    once (the crop suffix adds only ``-c`` and digits), and the ids are joined in Arrow, never
    made one Python string at a time (which cost ~1.2 s per 10^6 ids on every listing)."""
    prefixes = pa.array([make_sample_id(dataset, f"{key}{_CROP_SUFFIX}") for key in keys],
                        pa.string())
    n = len(keys)
    values = pc.binary_join_element_wise(
        prefixes.take(pa.array(np.repeat(np.arange(n, dtype=np.int64), crops))),
        pa.array([str(k) for k in range(crops)], pa.string()).take(
            pa.array(np.tile(np.arange(crops, dtype=np.int64), n))), "")
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * crops, pa.int32())
    return pa.ListArray.from_arrays(offsets, values)


def parse_image_sample_id(sample_id: str) -> tuple[str, str, int]:
    """``(dataset, relative path, crop index)`` of an ``ingest.images`` sample id.

    >>> parse_image_sample_id("images/cats%2Fmy%20photo.png-c3")
    ('images', 'cats/my photo.png', 3)
    """
    dataset, key = parse_sample_id(sample_id)
    head, sep, k = key.rpartition(_CROP_SUFFIX)
    if not sep or not head or not (k.isascii() and k.isdigit()) or str(int(k)) != k:
        raise ValueError(f"not an ingest.images sample id (<dataset>/<key>-c<k>): {sample_id!r}")
    return dataset, unescape_key(head), int(k)


class IngestImagesConfig(StageConfig):
    root: str = Field("skimage://", description="folder, s3:// prefix, or skimage://")
    dataset: str = Field("images", pattern=r"^[a-z0-9_-]+$")
    crops_per_image: int = Field(4, ge=1, le=64)
    size: int = Field(32, ge=8, le=1024, description="output side length (pixels)")
    min_scale: float = Field(0.35, gt=0, le=1)
    max_scale: float = Field(0.9, gt=0, le=1)
    seed: int = 0
    labels: str = Field("auto", pattern="^(auto|folder|index|none)$")


class IngestImages(SourceStage):
    kind = "ingest.images"
    #: 3: ids from the escaped relative path (2: from the file stem; see the module docs)
    version = 3
    Config = IngestImagesConfig
    output_schema = IMAGE_SAMPLES
    config: IngestImagesConfig

    def check_config(self) -> list[tuple[str, str]]:
        """Besides the root existing (:meth:`Stage.check_config`): it holds at least one image
        (a walk that stops at the first one). An empty root is a mistake, not an empty dataset."""
        problems = super().check_config()
        root = self.config.root
        if problems or root.startswith(BUILTIN_ROOTS) or first_file(root, IMAGE_EXTENSIONS):
            return problems
        return problems + [("with.root", _no_images(root))]

    # -- listing --------------------------------------------------------------------------
    def _scan(self) -> list[tuple[str, str]]:
        """``(path as listed, stamp)`` of every source image, sorted: all a fingerprint needs,
        listed once per stage instance and kept compact (two strings a file), so a plan of an
        up-to-date DAG over 10^6 files holds no per-file dict (see :meth:`_list_source`)."""
        if not hasattr(self, "_cached_scan"):
            self._cached_scan = self._scan_source()
        return self._cached_scan

    def _scan_source(self) -> list[tuple[str, str]]:
        root = self.config.root
        if root.startswith("skimage://"):
            from importlib.metadata import version

            stamp = f"skimage-{version('scikit-image')}"
            return [(f"skimage://{n}", stamp) for n in sorted(PHOTOS)]
        fs, base = filesystem_for(root)
        found = []
        for path, info in _iter_files(fs, base):
            if path.lower().endswith(IMAGE_EXTENSIONS):
                when = info.get("mtime") or info.get("LastModified") or info.get("ETag")
                found.append((path, f"{info.get('size')}-{when}"))
        if not found:  # checked before the run (check_config): emptied since
            raise StageError(f"stage '{self.ctx.stage}': with.root: {_no_images(root)}")
        found.sort()
        return found

    def _list_source(self) -> list[dict[str, Any]]:
        """The source files with what the work items need (ids, labels), built from
        :meth:`_scan` when the stage lists its work (:meth:`list_items`) and not kept after
        (~1 KiB a file)."""
        root = self.config.root
        if root.startswith("skimage://"):
            return [{"path": path, "file": escape_key(path),
                     "key": escape_key(path[len("skimage://"):]), "stamp": stamp}
                    for path, stamp in self._scan()]
        _, base = filesystem_for(root)
        items = []
        prefix = base.rstrip("/") + "/"
        for path, stamp in self._scan():
            if path.startswith(prefix):
                rel = path[len(prefix) :]
            elif path.rstrip("/") == base.rstrip("/"):  # root is the file itself
                rel = path.rsplit("/", 1)[-1]
            else:  # not under root as spelled (should not happen): the whole path, still unique
                rel = path.lstrip("/")
            folder = rel.rsplit("/", 1)[0].split("/")[0] if "/" in rel else None
            full = _full_path(root, path)
            items.append(
                {
                    "path": _printable(full),
                    "file": escape_path(full),
                    "key": escape_path(rel),
                    "stamp": stamp,
                    "folder": folder,
                }
            )
        return items

    def source_fingerprint(self) -> dict[str, Any]:
        root = self.config.root
        return {"listing": content_digest([(_printable(_full_path(root, path)), stamp)
                                           for path, stamp in self._scan()])}

    def list_items(self) -> pa.Table:
        listing = self._list_source()
        labels = self._labels(listing)
        return pa.table(
            {
                "path": [i["path"] for i in listing],
                "file": [i["file"] for i in listing],  # the exact path, escaped (see _printable)
                "key": [i["key"] for i in listing],
                "label": labels,
                "sample_ids": crop_sample_ids(self.config.dataset, [i["key"] for i in listing],
                                              self.config.crops_per_image),
                # a file's rows depend on its bytes (size + mtime) and the label the listing
                # gives it
                "item_key": [i["path"] for i in listing],
                "item_stamp": [f"{i['stamp']}|label={lab}" for i, lab in zip(listing, labels)],
            }
        )

    def _labels(self, listing: list[dict[str, Any]]) -> list[int]:
        mode = self.config.labels
        folders = [i.get("folder") for i in listing]
        if mode == "none":
            return [-1] * len(listing)
        if mode == "folder" or (mode == "auto" and all(folders)):
            if not all(folders):
                flat = next(i["path"] for i in listing if not i.get("folder"))
                raise ValueError(
                    f"stage '{self.ctx.stage}': labels: folder needs every image "
                    f"in a class sub-folder of with.root; {flat} is not"
                )
            classes = {c: k for k, c in enumerate(sorted({str(f) for f in folders}))}
            return [classes[str(f)] for f in folders]
        return list(range(len(listing)))

    # -- per worker -----------------------------------------------------------------------
    def process_batch(self, batch: pa.Table) -> BatchResult:
        cfg = self.config
        rows: list[dict[str, Any]] = []
        quarantine = []
        for item in batch.to_pylist():
            path = unescape_key(item["file"])
            check = "read"  # the bytes could not be read: retried next run (TRANSIENT_CHECKS)
            try:
                data = self._read(path)
                check = "decode"  # undecodable: its content is bad until the file changes
                rgb = self._decode(path, data)
            except Exception as e:  # quarantine every crop of it
                what = "read" if check == "read" else "decode image"
                for k in range(cfg.crops_per_image):
                    quarantine.append(
                        quarantine_record(
                            image_sample_id(cfg.dataset, item["key"], k),
                            check,
                            f"cannot {what} {item['path']}: {type(e).__name__}: "
                            f"{_ADDRESS.sub('>', str(e))}",
                            source=item["path"],
                        )
                    )
                continue
            for k in range(cfg.crops_per_image):
                crop = self._crop(rgb, item["key"], k)
                sid = image_sample_id(cfg.dataset, item["key"], k)
                rows.append(
                    {
                        "sample_id": sid,
                        "content_digest": content_digest(crop, int(item["label"]), None),
                        "source": item["path"],
                        "image_png": encode_png(crop),
                        "height": crop.shape[0],
                        "width": crop.shape[1],
                        "label": int(item["label"]),
                        "caption": None,
                    }
                )
        return BatchResult(pa.Table.from_pylist(rows, schema=IMAGE_SAMPLES), quarantine)

    def _read(self, path: str) -> bytes:
        if path.startswith("skimage://"):
            return b""  # a built-in photo: nothing to read
        fs, p = filesystem_for(path)
        with fs.open(p, "rb") as f:
            return f.read()

    def _decode(self, path: str, data: bytes) -> np.ndarray:
        if path.startswith("skimage://"):
            return load_photo(path[len("skimage://") :])
        import io

        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb(np.asarray(im.convert("RGB")))

    def _crop(self, rgb: np.ndarray, key: str, k: int) -> np.ndarray:
        """Crop ``k`` of the image with escaped relative path ``key``: depends on nothing else
        (for skimage:// the key is the photo name, as the stem was in version 2)."""
        cfg = self.config
        h, w = rgb.shape[:2]
        seed = int.from_bytes(
            hashlib.blake2b(f"{cfg.seed}/{key}/{k}".encode(), digest_size=8).digest(), "little"
        )
        rng = np.random.default_rng(seed)
        side = int(min(h, w) * rng.uniform(cfg.min_scale, max(cfg.min_scale, cfg.max_scale)))
        side = max(side, 1)
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(rgb[y0 : y0 + side, x0 : x0 + side])
        return np.asarray(crop.resize((cfg.size, cfg.size), Image.Resampling.BICUBIC))


def _no_images(root: str) -> str:
    return (
        f"{root!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), at any depth; "
        "expected a folder or s3:// prefix of images (class sub-folders allowed): point "
        "with.root at it, or use skimage:// for the built-in photographs"
    )


def _iter_files(fs: Any, base: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path, info)`` of every file under ``base``, exactly the files (and infos)
    ``fs.find(base, detail=True)`` lists, in no particular order. A filesystem that lists
    through fsspec's generic ``find`` (local folders) is walked one folder at a time, so the
    infos of 10^6 files (~1 KiB each) are never all held at once; one with its own ``find``
    (s3fs: a flat, paginated LIST of the prefix) lists through it."""
    from fsspec.spec import AbstractFileSystem

    if getattr(fs.find, "__func__", None) is not AbstractFileSystem.find:
        try:
            yield from fs.find(base, detail=True).items()
        except FileNotFoundError:
            return
        return
    base = fs._strip_protocol(base)
    found = False
    for _, _dirs, files in fs.walk(base, detail=True):
        for info in files.values():
            found = True
            yield info["name"], info
    if not found and fs.isfile(base):  # as find: the root may be the file itself
        yield base, fs.info(base)


def _printable(path: str) -> str:
    """``path`` as it is, unless it is not valid UTF-8 (a local file name with undecodable
    bytes, which Python lists as lone surrogates and Arrow cannot store): then with those
    written as ``\\udcXX``. Used for display, ``source`` and ``item_key``; the file is opened
    through the exact path (the escaped ``file`` column)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _full_path(root: str, found: str) -> str:
    if "://" in root and "://" not in found:
        return root.split("://", 1)[0] + "://" + found
    return found
