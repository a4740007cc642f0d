"""COCONut-PanCap reader: COCO images + COCONut panoptic masks + grounded captions, joined by the
12-digit COCO image id (``../shared/datasets.md`` Part A).

Public API
==========

* :func:`parse_grounded_caption` - ``<id: phrase>`` / ``<6,7: phrase>`` tags -> plain text + spans.
* :func:`list_pancap` - cheap driver-side listing: one work item per caption file.
* :func:`read_pancap_sample` - reads and validates one item (worker side) -> a
  :data:`PANCAP_SAMPLES` row, or raises :class:`~vgen_core.formats.errors.SampleError`.

Layouts :func:`list_pancap` accepts under ``root`` (a local folder or ``s3://`` prefix)
=======================================================================================

Panoptic JSON + PNG folder, any of:

* detectron2 (what the COCONut authors prescribe): ``annotations/panoptic_train2017.json`` +
  ``panoptic_train2017/`` (same for ``val2017``);
* the Kaggle archive: ``annotations/annotations/coconut_s_panoptic.json`` +
  ``coconut_s/panoptic/`` (``coconut_val/coconut_val/``, ``relabeled_coco_val/panoptic/``, ...);
* ``download_coconut.py`` output: ``coconut_s.json`` + ``coconut_s/``.

Images: COCO JPEGs anywhere under ``root`` (``train2017/``, ``val2017/``, ``unlabeled2017/``),
found by the ``file_name`` of their ``images[]`` record. Captions: ``<12-digit id>.txt`` files
anywhere under ``root`` (``caption_train2017/``, ``coconut_pancap_50k/``,
``coconut_pancap_sample/``) or members of an uncompressed ``.tar`` whose name contains
``pancap`` or ``caption`` (the Hugging Face WebDataset shards / ``coconut_pancap_50k.tar``).

Which captions become items: every caption file when ``split`` is None. With a ``split``,
those of a folder named ``caption_<coco split>`` of that split (``coconut_s``/``coconut_b``/
``*train2017`` -> ``train2017``; ``coconut_val``/``relabeled_coco_val``/``*val2017`` ->
``val2017``), and those of other folders (``coconut_pancap_50k``, ...) whose image the split
annotates. An item whose image has no annotation is listed and fails ``annotation_missing``.

Checks (the ``check`` of the :class:`SampleError` raised)
=========================================================

``panoptic_json`` (listing: a split JSON does not parse or lacks its lists),
``caption_archive`` (listing: a caption ``.tar`` cannot be read),
``annotation_duplicate`` (two different ``images[]`` / ``annotations[]`` records for one id),
``annotation_json`` (a record holds NaN/Infinity or text that is not valid Unicode),
``caption_read``, ``caption_empty``, ``caption_tags`` (malformed / unbalanced ``<...>``),
``caption_tag_ids`` (a tag names id 0 or an id not in ``segments_info``),
``annotation_missing``, ``image_record``, ``file_name_id``, ``image_missing``, ``image_decode``,
``image_size``, ``panoptic_png_missing``, ``panoptic_png`` (not an 8-bit RGB PNG, truncated),
``panoptic_size``, ``segments_info``, ``segments_empty``, ``segment_category``,
``png_ids_match_segments``, ``segment_area``.

Lenient on purpose: ``bbox`` is never required (it is recomputed from the mask), ``isthing`` may
be missing from a segment (taken from ``categories``), ``area`` may be an integral float or
missing (then the pixel count is used), ``iscrowd`` may be missing (0).

Not read (convert first): COCONut-L/XL (Objects365 file names, XL's per-image bare-list JSONs;
PanCap captions are keyed by COCO ids), the Hugging Face parquet files of ``coconut_s``/``_b``
(run ``download_coconut.py``, as the COCONut README says), ``coconut_val.tar`` masks (unpack it),
compressed caption tars (``.tar.gz``) and ``coconut_pancap_region_30k`` (schema unknown).
Annotated images without a caption are not PanCap samples and are not listed.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vgen_core.data.fsio import filesystem_for
from vgen_core.data.identity import content_digest, make_sample_id
from vgen_core.data.panoptic import (MAX_PIXELS, PanopticPNGError, png_size, read_id_png,
                                     segment_areas, segment_bboxes)
from vgen_core.data.schemas import PANCAP_SAMPLES

from ._json import bad_json_path
from .errors import SampleError

__all__ = [
    "CaptionSpan",
    "ParsedCaption",
    "TagError",
    "PANCAP_SAMPLES",
    "parse_grounded_caption",
    "list_pancap",
    "read_pancap_sample",
]

DATASET = "pancap"

# --------------------------------------------------------------------------------------------
# grounded captions
# --------------------------------------------------------------------------------------------

#: Body of one tag (between ``<`` and ``>``): ids, ``:``, phrase; whitespace-tolerant.
_TAG_BODY = re.compile(r"\s*([0-9]+(?:\s*,\s*[0-9]+)*)\s*:\s*(.*)", re.DOTALL)
_ID_SEP = re.compile(r"\s*,\s*")
_MAX_ID_DIGITS = 18  # fits int64; real ids are < 256**3 (8 digits)


@dataclass(frozen=True)
class CaptionSpan:
    """One grounded phrase: ``plain_text[start:end] == phrase``, grounded to segment ``ids``."""

    start: int
    end: int
    phrase: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class TagError:
    """A tag that could not be parsed: char ``position`` in the raw caption, the ``snippet``."""

    position: int
    snippet: str
    message: str


@dataclass(frozen=True)
class ParsedCaption:
    text: str  # the caption with every tag replaced by its phrase
    spans: tuple[CaptionSpan, ...]
    errors: tuple[TagError, ...] = field(default=())  # only filled when strict=False

    @property
    def ids(self) -> frozenset[int]:
        """Every segment id some tag grounds to."""
        return frozenset(i for s in self.spans for i in s.ids)


def _snippet(text: str, start: int, end: int, limit: int = 60) -> str:
    s = text[start:end]
    return s if len(s) <= limit else s[: limit - 3] + "..."


def parse_grounded_caption(text: str, *, strict: bool = True, sample_id: str | None = None,
                           source: str | None = None) -> ParsedCaption:
    """Parse a PanCap caption with inline ``<id: phrase>`` / ``<id1,id2: phrase>`` tags.

    Spaces (any whitespace) are allowed after ``<``, around commas and around ``:``; the phrase
    is stripped. Every ``<...>`` block must be a tag: a block that does not match
    ``<ids: phrase>``, has an empty phrase, a ``<`` that is never closed, a ``<`` inside a tag or
    a ``>`` with no opening ``<`` is an error. ``strict=True`` raises
    ``SampleError("caption_tags")`` at the first error (position and snippet in the reason);
    ``strict=False`` records it in ``errors`` and keeps the bad block verbatim in the text.

    >>> p = parse_grounded_caption("On <2:a green lawn> stand <6, 7: two men>.")
    >>> p.text, [(s.start, s.end, s.ids) for s in p.spans]
    ('On a green lawn stand two men.', [(3, 15, (2,)), (22, 29, (6, 7))])
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be str, got {type(text).__name__}")
    out: list[str] = []
    n_out = 0  # length of "".join(out)
    spans: list[CaptionSpan] = []
    errors: list[TagError] = []

    def fail(pos: int, end: int, message: str) -> None:
        err = TagError(pos, _snippet(text, pos, end), message)
        if strict:
            raise SampleError("caption_tags", f"{message} at char {pos}: {err.snippet!r}",
                              sample_id=sample_id, source=source)
        errors.append(err)

    def emit(s: str) -> None:
        nonlocal n_out
        out.append(s)
        n_out += len(s)

    i = 0
    while i < len(text):
        lt, gt = text.find("<", i), text.find(">", i)
        if gt != -1 and (lt == -1 or gt < lt):
            fail(gt, gt + 1, "unbalanced tag: '>' with no opening '<'")
            emit(text[i:gt + 1])
            i = gt + 1
            continue
        if lt == -1:
            emit(text[i:])
            break
        emit(text[i:lt])
        close, nested = text.find(">", lt + 1), text.find("<", lt + 1)
        if close == -1:
            fail(lt, lt + 40, "unbalanced tag: '<' is never closed by '>'")
            emit(text[lt:])
            break
        if nested != -1 and nested < close:
            fail(lt, nested + 1, "unbalanced tag: '<' opens a tag but another '<' comes "
                                 "before its '>'")
            emit(text[lt:nested])
            i = nested
            continue
        m = _TAG_BODY.fullmatch(text, lt + 1, close)
        phrase = m.group(2).rstrip() if m is not None else ""
        if m is None or not phrase:  # (m is None gives an empty phrase)
            what = ("malformed tag: empty phrase" if m is not None else
                    "malformed tag: expected '<id[,id...]: phrase>'")
            fail(lt, close + 1, what)
            emit(text[lt:close + 1])
        elif any(len(x.lstrip("0")) > _MAX_ID_DIGITS for x in _ID_SEP.split(m.group(1))):
            fail(lt, close + 1, f"malformed tag: a segment id has more than {_MAX_ID_DIGITS} "
                                "digits (panoptic ids are below 16777216)")
            emit(text[lt:close + 1])
        else:
            ids = tuple(int(x) for x in _ID_SEP.split(m.group(1)))
            spans.append(CaptionSpan(n_out, n_out + len(phrase), phrase, ids))
            emit(phrase)
        i = close + 1
    return ParsedCaption("".join(out), tuple(spans), tuple(errors))


# --------------------------------------------------------------------------------------------
# row schema
# --------------------------------------------------------------------------------------------

# PANCAP_SAMPLES (the row schema) lives in vgen_core.data.schemas with every other schema.

# --------------------------------------------------------------------------------------------
# listing
# --------------------------------------------------------------------------------------------

_SUBSET_COCO_SPLIT = {"coconut_s": "train2017", "coconut_b": "train2017",
                      "coconut_val": "val2017", "relabeled_coco_val": "val2017"}
_DIGITS = re.compile(r"^[0-9]+$")


@dataclass
class _Split:
    name: str  # train2017, coconut_s, ...
    json_rel: str
    png_dir: str  # relative to root
    coco_split: str | None


def _split_name(stem: str) -> str:
    name = stem[len("panoptic_"):] if stem.startswith("panoptic_") else stem
    return name[: -len("_panoptic")] if name.endswith("_panoptic") else name


def _coco_split(name: str) -> str | None:
    if name in _SUBSET_COCO_SPLIT:
        return _SUBSET_COCO_SPLIT[name]
    for s in ("train2017", "val2017"):
        if name.endswith(s):
            return s
    return None


def _ancestors(rel_dir: str) -> list[str]:
    out = [rel_dir]
    while rel_dir:
        rel_dir = posixpath.dirname(rel_dir)
        out.append(rel_dir)
    return out


def _find_splits(rels: list[str], png_dirs: set[str]) -> tuple[list[_Split], list[str]]:
    """The panoptic JSONs under root with the PNG folder of each, and the panoptic JSONs
    for which no PNG folder was found."""
    splits, orphans = [], []
    for rel in rels:
        if not rel.lower().endswith(".json"):
            continue
        stem = posixpath.basename(rel)[:-5]
        low = stem.lower()
        if "instance" in low or low.startswith(("captions_", "person_keypoints")):
            continue
        name = _split_name(stem)
        candidates = [posixpath.join(a, d) for a in _ancestors(posixpath.dirname(rel))
                      for d in (stem, f"panoptic_{name}", f"{name}/panoptic", f"{name}/{name}",
                                name)]
        png_dir = next((c for c in candidates if c in png_dirs), None)
        known = "panoptic" in low or name in _SUBSET_COCO_SPLIT
        if png_dir is None:
            if known:
                orphans.append(rel)
        elif known or png_dir == posixpath.join(posixpath.dirname(rel), stem):
            splits.append(_Split(name, rel, png_dir, _coco_split(name)))
    return splits, orphans


@dataclass
class _Caption:
    rel: str  # .txt file, or the .tar holding it
    folder: str  # the folder it sits in (caption_train2017, coconut_pancap_50k, ...)
    member: list[Any] | None = None  # [offset, size, member name] inside a tar


def _caption_folder_split(folder: str) -> str | None:
    base = posixpath.basename(folder)
    return base[len("caption_"):] if base.startswith("caption_") else None


def _find_captions(fs, base: str, root: str, rels: list[str]) -> dict[int, list[_Caption]]:
    found: dict[int, list[_Caption]] = {}
    for rel in rels:
        name = posixpath.basename(rel)
        low = name.lower()
        if (low.endswith(".txt") and _DIGITS.match(name[:-4])
                and len(name) <= 4 + _MAX_ID_DIGITS):
            found.setdefault(int(name[:-4]), []).append(_Caption(rel, posixpath.dirname(rel)))
        elif low.endswith(".tar") and ("pancap" in low or "caption" in low):
            try:
                members = _tar_captions(fs, _join(base, rel))
            except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeError) as e:
                raise SampleError("caption_archive", f"caption archive {rel} cannot be read as "
                                  f"an uncompressed tar ({type(e).__name__}: {e}); truncated or "
                                  f"corrupt download? re-download it, or unpack it and point "
                                  "root at the folder", source=_join(root, rel)) from None
            for image_id, m_name, offset, size in members:
                folder = posixpath.dirname(m_name) or name[:-4]
                found.setdefault(image_id, []).append(_Caption(rel, folder, [offset, size,
                                                                             m_name]))
    return found


def _tar_captions(fs, path: str) -> list[tuple[int, str, int, int]]:
    """(image id, member name, data offset, size) of every ``<digits>.txt`` member."""
    out = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            mname = posixpath.basename(m.name)
            if (m.isfile() and mname.endswith(".txt") and _DIGITS.match(mname[:-4])
                    and len(mname) <= 4 + _MAX_ID_DIGITS):
                out.append((int(mname[:-4]), m.name, m.offset_data, m.size))
    return out


def _join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if rel else base


def _load_split_json(fs, base: str, root: str, split: _Split) -> dict[str, Any]:
    source = _join(root, split.json_rel)
    try:
        with fs.open(_join(base, split.json_rel), "rb") as f:
            data = json.load(f)
    except RecursionError:
        raise SampleError("panoptic_json", f"panoptic JSON of split {split.name!r} is nested "
                          "too deeply to parse (corrupt file?); expected a COCO-panoptic object; "
                          "re-download it", source=source) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, ints past 4300 digits
        raise SampleError("panoptic_json", f"panoptic JSON of split {split.name!r} does not "
                          f"parse (truncated or corrupt download?): {type(e).__name__}: {e}; "
                          "re-download it", source=source) from None
    if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise SampleError("panoptic_json", "expected a COCO-panoptic object with lists "
                          f"'images', 'annotations', 'categories'; found {found}", source=source)
    return data


def _stamp(info: dict[str, Any] | None) -> list[Any] | None:
    if info is None:
        return None
    return [info.get("size"), str(info.get("mtime") or info.get("LastModified")
                                  or info.get("ETag") or "")]


def list_pancap(root: str, *, split: str | None = None) -> list[dict[str, Any]]:
    """One work item per PanCap caption file under ``root``, joined by image id to its panoptic
    annotation, PNG and COCO image (see the module docs for the layouts).

    ``split`` picks one panoptic JSON by name (``train2017``, ``val2017``, ``coconut_s``, ...;
    ``train``/``val`` mean ``train2017``/``val2017``); ``None`` uses all of them, which must not
    annotate the same image twice. Items whose annotation, image or PNG is missing are still
    listed (:func:`read_pancap_sample` then raises for them). Each item is a plain dict:
    ``sample_id, image_id, split, root, base, caption, image, panoptic_png`` (paths relative
    to root; ``image`` is None when no file of that name exists), ``caption_member``,
    ``panoptic_json``, ``image_record``, ``annotation``, ``categories`` (only those the
    annotation uses) and ``stamp`` (a digest of file sizes/mtimes and the records, for
    change detection).
    """
    fs, base = filesystem_for(root)
    try:
        infos = fs.find(base, detail=True)
    except FileNotFoundError:
        infos = {}
    prefix = base.rstrip("/") + "/"
    files = {p[len(prefix):]: info for p, info in infos.items() if p.startswith(prefix)}
    rels = sorted(files)
    png_dirs = {posixpath.dirname(r) for r in rels if r.lower().endswith(".png")}
    splits, orphans = _find_splits(rels, png_dirs)
    if not splits:
        hint = (f"; found {', '.join(orphans)} but no folder of PNGs for it (still zipped?)"
                if orphans else "")
        raise FileNotFoundError(
            f"no COCONut panoptic JSON with its PNG folder under {root!r}; expected e.g. "
            "annotations/panoptic_train2017.json + panoptic_train2017/ (detectron2 layout), "
            "annotations/annotations/coconut_s_panoptic.json + coconut_s/panoptic/ (Kaggle) or "
            f"coconut_s.json + coconut_s/ (download_coconut.py){hint}")
    mask_dirs = {s.png_dir for s in splits}
    if split is not None:
        want = {"train": "train2017", "val": "val2017"}.get(split, split)
        chosen = [s for s in splits if s.name == want]
        if not chosen:
            raise ValueError(f"split {split!r} not found under {root!r}; found: "
                             + ", ".join(f"{s.name} ({s.json_rel})" for s in splits))
        splits = chosen
    coco_splits = {s.coco_split for s in splits}
    captions = _find_captions(fs, base, root, rels)
    if not captions:
        raise FileNotFoundError(
            f"no PanCap caption files under {root!r}; expected <12-digit id>.txt files (e.g. "
            "caption_train2017/000000000009.txt) or a .tar of them named *pancap* / *caption*")

    images_by_name: dict[str, list[str]] = {}
    for r in rels:
        if posixpath.dirname(r) not in mask_dirs and r.lower().endswith((".jpg", ".jpeg", ".png")):
            images_by_name.setdefault(posixpath.basename(r), []).append(r)

    # image id -> (split, image record, annotation, category table)
    joined: dict[int, tuple[_Split, dict | None, dict | None, dict[int, dict]]] = {}
    dups: dict[int, list[str]] = {}  # image id -> the record kinds it has conflicting copies of
    for s in splits:
        data = _load_split_json(fs, base, root, s)
        cats = _index(data["categories"], "id")[0]
        recs, rec_dups = _index(data["images"], "id")
        anns, ann_dups = _index(data["annotations"], "image_id")
        for i in rec_dups:
            dups.setdefault(i, []).append("images[]")
        for i in ann_dups:
            dups.setdefault(i, []).append("annotations[]")
        for image_id in set(recs) | set(anns):
            if not isinstance(image_id, int) or image_id not in captions:
                continue
            if image_id in joined:
                raise ValueError(
                    f"image {image_id} is annotated by both {joined[image_id][0].json_rel} and "
                    f"{s.json_rel} under {root!r}; pass split= to choose one "
                    f"({', '.join(x.name for x in splits)})")
            joined[image_id] = (s, recs.get(image_id), anns.get(image_id), cats)

    items = []
    for image_id in sorted(captions):
        usable = [c for c in captions[image_id]
                  if (_caption_folder_split(c.folder) is None
                      and (split is None or image_id in joined))
                  or _caption_folder_split(c.folder) in coco_splits or None in coco_splits]
        if not usable:
            continue
        # prefer a caption_<split> folder matching this image's split, then path order
        s = joined[image_id][0] if image_id in joined else splits[0]
        cap = sorted(usable, key=lambda c: (_caption_folder_split(c.folder) != s.coco_split,
                                            _caption_folder_split(c.folder) is None, c.rel,
                                            c.member or []))[0]
        _, rec, ann, cats = joined.get(image_id, (s, None, None, {}))
        image_rel: str | None = None
        if rec is not None and isinstance(rec.get("file_name"), str):
            cands = images_by_name.get(posixpath.basename(rec["file_name"]), [])
            pref = [c for c in cands if s.coco_split and f"/{s.coco_split}/" in f"/{c}"]
            found = pref or cands
            image_rel = found[0] if found else None
        png_name = ann.get("file_name") if isinstance(ann, dict) else None
        if not isinstance(png_name, str):
            png_name = f"{image_id:012d}.png"
        png_rel = posixpath.join(s.png_dir, posixpath.basename(png_name))
        used = {seg.get("category_id") for seg in _segments_of(ann) or []
                if isinstance(seg, dict) and _is_int(seg.get("category_id"))}
        item = {
            "sample_id": make_sample_id(DATASET, image_id, width=12),
            "image_id": image_id,
            "split": s.name,
            "root": root,
            "base": base,
            "caption": cap.rel,
            "caption_member": cap.member,
            "image": image_rel,
            "panoptic_png": png_rel,
            "panoptic_json": s.json_rel,
            "image_record": rec,
            "annotation": ann,
            "categories": [cats[c] for c in sorted(c for c in used if c in cats)],
        }
        if image_id in dups:
            item["duplicates"] = dups[image_id]
        item["stamp"] = _stamp_digest(
            [_stamp(files.get(cap.rel)), cap.member, _stamp(files.get(image_rel or "")),
             _stamp(files.get(png_rel))], rec, ann, item["categories"])
        items.append(item)
    return items


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _index(records: list[Any], key: str) -> tuple[dict[int, dict], set[int]]:
    """``{record[key]: record}`` over the dict records with an int ``key`` (others cannot be
    joined and are skipped: their image's caption then fails ``annotation_missing``), and the
    keys that have two or more *different* records (identical copies are harmless)."""
    out: dict[int, dict] = {}
    dups: set[int] = set()
    for r in records:
        if isinstance(r, dict) and _is_int(r.get(key)):
            k = r[key]
            if k in out and out[k] != r:
                dups.add(k)
            out.setdefault(k, r)
    return out, dups


def _stamp_digest(*parts: Any) -> str:
    """The listing stamp: :func:`content_digest` of ``parts``, or, for records it refuses (NaN,
    lone surrogates; the reader rejects those samples), a digest of their ``repr``."""
    try:
        return content_digest(*parts)
    except (TypeError, ValueError, RecursionError):
        return content_digest("repr", repr(parts).encode("utf-8", "backslashreplace"))


def _segments_of(ann: Any) -> list[Any] | None:
    """``segments_info`` of an annotation record (None if it has none); unwraps the Hugging Face
    parquet shape where the column ``segments_info`` holds the whole record."""
    if not isinstance(ann, dict):
        return None
    segs = ann.get("segments_info")
    if isinstance(segs, dict) and "segments_info" in segs:
        segs = segs["segments_info"]
    return segs if isinstance(segs, list) else None


# --------------------------------------------------------------------------------------------
# reading one sample
# --------------------------------------------------------------------------------------------


class _Ctx:
    """Where a sample's files live and how to name them in errors."""

    def __init__(self, item: dict[str, Any], fs) -> None:
        self.item, self.sample_id = item, item["sample_id"]
        self.fs = fs if fs is not None else filesystem_for(item["root"])[0]

    def url(self, rel: str) -> str:
        return _join(self.item["root"], rel)

    def fail(self, check: str, reason: str, rel: str | None = None) -> SampleError:
        return SampleError(check, reason, sample_id=self.sample_id,
                           source=self.url(rel) if rel is not None else None)

    def read(self, rel: str, check_missing: str, what: str,
             member: list[Any] | None = None) -> bytes:
        try:
            with self.fs.open(_join(self.item["base"], rel), "rb") as f:
                if member is None:
                    return f.read()
                f.seek(member[0])
                data = f.read(member[1])
        except FileNotFoundError:
            raise self.fail(check_missing, f"{what} not found: expected {self.url(rel)}",
                            rel) from None
        except (OSError, ValueError) as e:  # a directory, no permission, a NUL in the name ...
            raise self.fail(check_missing, f"{what} {self.url(rel)!r} cannot be read "
                            f"({type(e).__name__}: {e})", rel) from None
        if len(data) != member[1]:
            raise self.fail(check_missing, f"{what} {member[2]} is truncated in the tar: "
                            f"expected {member[1]} bytes, found {len(data)}", rel)
        return data


def _int_field(ctx: _Ctx, rec: dict, key: str, what: str, rel: str, *, minimum: int = 0) -> int:
    v = rec.get(key)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ctx.fail("image_record" if what == "images[]" else "segments_info",
                       f"{what} record of image {ctx.item['image_id']}: field {key!r} must be "
                       f"an int >= {minimum}, found {v!r}", rel)
    return v


def _read_caption(ctx: _Ctx) -> tuple[str, Any]:
    item = ctx.item
    member = item.get("caption_member")
    where = item["caption"] + (f"::{member[2]}" if member else "")
    data = ctx.read(item["caption"], "caption_read", "caption file", member)
    try:
        raw = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ctx.fail("caption_read", f"caption {where} is not UTF-8: {e}",
                       item["caption"]) from None
    raw = raw.strip()
    if not raw:
        raise ctx.fail("caption_empty", f"caption {where} is empty", item["caption"])
    parsed = parse_grounded_caption(raw, sample_id=ctx.sample_id, source=ctx.url(item["caption"]))
    return raw, parsed


def _check_names(ctx: _Ctx, rec: dict, ann: dict, json_rel: str) -> None:
    image_id = ctx.item["image_id"]
    stems = {"images[] file_name": posixpath.splitext(posixpath.basename(rec["file_name"]))[0]}
    if isinstance(ann.get("file_name"), str):
        stems["annotations[] file_name"] = posixpath.splitext(
            posixpath.basename(ann["file_name"]))[0]
    for what, stem in stems.items():
        if _DIGITS.match(stem) and (stem.lstrip("0") or "0") != str(image_id):
            raise ctx.fail("file_name_id", f"{what} {stem!r:.40} names image "
                           f"{(stem.lstrip('0') or '0')[:30]}, but the record is for image id "
                           f"{image_id} (caption {posixpath.basename(ctx.item['caption'])}); "
                           "fix the file_name or the id", json_rel)
    if len(set(stems.values())) > 1:
        raise ctx.fail("file_name_id", f"image {image_id}: file names disagree: {stems}",
                       json_rel)


def _decode_image(ctx: _Ctx, data: bytes, rel: str, height: int, width: int) -> None:
    """Decode the image fully, after checking the size its header gives against the record (so
    a corrupt header never makes Pillow allocate a giant image)."""
    size = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            if size == (width, height):
                im.load()
    except Exception as e:  # PIL raises many types for broken files
        raise ctx.fail("image_decode", f"image {posixpath.basename(rel)} does not decode "
                       f"({len(data)} bytes): {type(e).__name__}: {e}; re-download it",
                       rel) from None
    if size != (width, height):
        raise ctx.fail("image_size", f"image {posixpath.basename(rel)} is {size[0]}x{size[1]} "
                       f"(WxH) but its images[] record says {width}x{height}", rel)


def _segments(ctx: _Ctx, ann: dict, json_rel: str) -> list[dict[str, Any]]:
    segs = _segments_of(ann)
    if segs is None:
        raise ctx.fail("segments_info", f"annotation of image {ctx.item['image_id']} has no "
                       f"segments_info list (found {type(ann.get('segments_info')).__name__})",
                       json_rel)
    cats = {c.get("id"): c for c in ctx.item.get("categories") or []}
    out, seen = [], set()
    for k, seg in enumerate(segs):
        if not isinstance(seg, dict):
            raise ctx.fail("segments_info", f"segments_info[{k}] of image "
                           f"{ctx.item['image_id']} is {type(seg).__name__}, not an object",
                           json_rel)
        what = f"segments_info[{k}]"
        sid = _int_field(ctx, seg, "id", what, json_rel, minimum=1)  # 0 is void
        if sid in seen:
            raise ctx.fail("segments_info", f"segment id {sid} appears twice in segments_info "
                           f"of image {ctx.item['image_id']}", json_rel)
        seen.add(sid)
        cid = _int_field(ctx, seg, "category_id", what, json_rel)
        if cid > 2**31 - 1:
            raise ctx.fail("segments_info", f"{what} of image {ctx.item['image_id']}: "
                           f"category_id {cid} is out of range (COCO category ids are 1..200)",
                           json_rel)
        iscrowd = seg.get("iscrowd", 0)
        if iscrowd not in (0, 1):  # True/False compare equal to 1/0
            raise ctx.fail("segments_info", f"segment {sid}: iscrowd must be 0 or 1, found "
                           f"{iscrowd!r}", json_rel)
        cat = cats.get(cid)
        if cat is None:
            raise ctx.fail("segment_category", f"segment {sid} has category_id {cid}, which is "
                           "not in the categories table of "
                           f"{posixpath.basename(json_rel)}", json_rel)
        isthing = seg.get("isthing", cat.get("isthing"))
        if isthing not in (0, 1) or (cat.get("isthing") in (0, 1)
                                      and isthing != cat.get("isthing")):
            raise ctx.fail("segment_category", f"segment {sid}: isthing={seg.get('isthing')!r} "
                           f"but category {cid} ({cat.get('name')}) has "
                           f"isthing={cat.get('isthing')!r}", json_rel)
        area = seg.get("area")
        if area is not None and not (isinstance(area, (int, float))
                                     and not isinstance(area, bool)):
            raise ctx.fail("segments_info", f"segment {sid}: area must be a number, found "
                           f"{area!r}", json_rel)
        out.append({"id": sid, "category_id": cid, "iscrowd": bool(iscrowd),
                    "isthing": bool(isthing), "area": area})
    if not out:
        raise ctx.fail("segments_empty", f"image {ctx.item['image_id']} has no segments in "
                       "segments_info", json_rel)
    return out


def _fmt_ids(ids) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:10])) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")


def read_pancap_sample(item: dict[str, Any], *, fs=None) -> dict[str, Any]:
    """Read and validate one :func:`list_pancap` item; returns a :data:`PANCAP_SAMPLES` row.

    Raises :class:`SampleError` (check names in the module docs) for the first failed check.
    ``fs`` is the fsspec filesystem of ``item["root"]`` (built from it when None).
    """
    ctx = _Ctx(item, fs)
    image_id, json_rel = item["image_id"], item["panoptic_json"]
    raw, parsed = _read_caption(ctx)

    rec, ann = item.get("image_record"), item.get("annotation")
    if not isinstance(rec, dict) or not isinstance(ann, dict):
        missing = " and ".join(w for w, v in (("images[]", rec), ("annotations[]", ann))
                               if not isinstance(v, dict))
        raise ctx.fail("annotation_missing", f"caption {posixpath.basename(item['caption'])} "
                       f"has no {missing} record for image id {image_id} in "
                       f"{posixpath.basename(json_rel)}", json_rel)
    if item.get("duplicates"):
        raise ctx.fail("annotation_duplicate", f"image id {image_id} has two or more different "
                       f"{' and '.join(item['duplicates'])} records in "
                       f"{posixpath.basename(json_rel)}; expected one per image: remove the "
                       "stale copy", json_rel)
    if not isinstance(rec.get("file_name"), str):
        raise ctx.fail("image_record", f"images[] record of image {image_id} has no file_name "
                       f"string (found {rec.get('file_name')!r:.60})", json_rel)
    height = _int_field(ctx, rec, "height", "images[]", json_rel, minimum=1)
    width = _int_field(ctx, rec, "width", "images[]", json_rel, minimum=1)
    if height * width > MAX_PIXELS:
        raise ctx.fail("image_record", f"images[] record of image {image_id} says {width}x"
                       f"{height} (WxH) = {width * height} pixels, more than the "
                       f"{MAX_PIXELS} a panoptic map may have (panoptic.MAX_PIXELS); a corrupt "
                       "record? fix its height/width", json_rel)
    _check_names(ctx, rec, ann, json_rel)
    segments = _segments(ctx, ann, json_rel)

    if item.get("image") is None:
        raise ctx.fail("image_missing", f"image file {rec['file_name']} (image {image_id}) is "
                       f"not under {item['root']}", json_rel)
    image_bytes = ctx.read(item["image"], "image_missing", "image file")
    _decode_image(ctx, image_bytes, item["image"], height, width)

    png_rel = item["panoptic_png"]
    png_bytes = ctx.read(png_rel, "panoptic_png_missing", "panoptic PNG")
    try:
        png_h, png_w = png_size(png_bytes)
    except PanopticPNGError as e:
        raise ctx.fail("panoptic_png", f"panoptic PNG {posixpath.basename(png_rel)}: {e.reason}",
                       png_rel) from None
    if (png_h, png_w) != (height, width):  # from the header: before decoding anything
        raise ctx.fail("panoptic_size", f"panoptic PNG {posixpath.basename(png_rel)} is "
                       f"{png_w}x{png_h} (WxH) but the image record says {width}x{height}",
                       png_rel)
    try:
        ids_HW = read_id_png(png_bytes, source=ctx.url(png_rel))
    except PanopticPNGError as e:
        raise ctx.fail("panoptic_png", f"panoptic PNG {posixpath.basename(png_rel)}: {e.reason}",
                       png_rel) from None
    if ids_HW.shape != (height, width):
        raise ctx.fail("panoptic_size", f"panoptic PNG {posixpath.basename(png_rel)} is "
                       f"{ids_HW.shape[1]}x{ids_HW.shape[0]} (WxH) but the image record says "
                       f"{width}x{height}", png_rel)

    areas = segment_areas(ids_HW, include_void=True)
    png_ids, seg_ids = set(areas) - {0}, {s["id"] for s in segments}
    if png_ids != seg_ids:
        parts = []
        if png_ids - seg_ids:
            parts.append(f"ids in the PNG but not in segments_info: {_fmt_ids(png_ids - seg_ids)}")
        if seg_ids - png_ids:
            parts.append(f"ids in segments_info but not in the PNG: {_fmt_ids(seg_ids - png_ids)}")
        raise ctx.fail("png_ids_match_segments", f"image {image_id}: " + "; ".join(parts),
                       png_rel)
    for s in segments:
        n = int(areas[s["id"]])
        if s["area"] is not None and s["area"] != n:
            raise ctx.fail("segment_area", f"segment {s['id']} of image {image_id}: "
                           f"segments_info area is {s['area']} but the PNG has {n} pixels",
                           json_rel)
        s["area"] = n
    boxes = segment_bboxes(ids_HW)
    for s in segments:
        s["bbox"] = [int(v) for v in boxes[s["id"]]]

    void_ids = sorted(i for i in parsed.ids if i == 0)
    unknown = sorted(parsed.ids - seg_ids - set(void_ids))
    if void_ids or unknown:
        bad = (["id 0 (void)"] if void_ids else []) + (
            [f"ids not in segments_info: {_fmt_ids(unknown)}"] if unknown else [])
        raise ctx.fail("caption_tag_ids", f"caption of image {image_id} tags "
                       + " and ".join(bad) + f" (segment ids: {_fmt_ids(seg_ids)})",
                       item["caption"])

    n_pixels = height * width
    things = sum(s["isthing"] for s in segments)
    tagged_px = sum(int(areas[i]) for i in parsed.ids)
    records = {"image": {k: rec[k] for k in ("id", "file_name", "height", "width") if k in rec},
               "annotation": ann, "categories": item.get("categories") or []}
    try:
        digest = content_digest(DATASET, image_bytes, png_bytes, raw, records)
    except (TypeError, ValueError, RecursionError) as e:
        where = bad_json_path(records)
        raise ctx.fail("annotation_json", f"the records of image {image_id} are not canonical "
                       f"JSON ({type(e).__name__}: {e})" + (f" at {where}" if where else "")
                       + "; expected finite numbers and valid Unicode text: fix or drop that "
                       "field", json_rel) from None
    return {
        "sample_id": item["sample_id"],
        "content_digest": digest,
        "source": ctx.url(item["caption"]),
        "split": item["split"],
        "image_id": image_id,
        "file_name": posixpath.basename(rec["file_name"]),
        "height": height,
        "width": width,
        "image": image_bytes,
        "panoptic_png": png_bytes,
        "segments": segments,
        "caption": raw,
        "caption_text": parsed.text,
        "caption_spans": [{"start": s.start, "end": s.end, "phrase": s.phrase,
                           "ids": list(s.ids)} for s in parsed.spans],
        "num_segments": len(segments),
        "num_things": things,
        "num_stuff": len(segments) - things,
        "thing_ratio": things / len(segments),
        "num_tags": len(parsed.spans),
        "num_grounded_segments": len(parsed.ids),
        "grounded_coverage": tagged_px / n_pixels,
        "void_fraction": int(areas.get(0, 0)) / n_pixels,
        "caption_words": len(parsed.text.split()),
    }
