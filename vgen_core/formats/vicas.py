"""ViCaS reader: grounded video captions, tracked masks and referral prompts (``datasets.md`` B).

Layout (``$VICAS_DIR``, what users download from HF ``Ali2500/ViCaS`` plus their own frames)::

    annotations/<version>/<video_id:06d>.json   (legacy: <video_id>_<anything>.json)
    splits/<version>/{train,val,test}.json      (JSON lists of int video ids)
    video_frames/<video_id:06d>/00000.jpg ...   (ffmpeg -r 30; folder "123" also accepted)
    videos/<video_id:06d>_<original name>.mp4   (any depth under videos/, e.g. an HF re-upload)

:func:`list_vicas` lists one work item per video cheaply (directory listings only, no JSON);
:func:`read_vicas_sample` reads one item, validates it against the checklist of ``datasets.md``
part C and returns a row of :data:`VICAS_SAMPLES`, or raises :class:`SampleError`. Temporal
oddities (track gaps, sudden mask jumps, empty masks) never reject a sample; they become
``flags``. :func:`parse_vicas_caption` parses the ``[phrase]<mask_IDS>`` grounding syntax.

Names: ``H, W`` frame height/width; ``T`` number of 30-fps frames (= len(segmentations)).
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeGuard

import numpy as np

from vgen_core.data import rle as rle_codec
from vgen_core.data.fsio import filesystem_for
from vgen_core.data.identity import Digest, canonical_json, make_sample_id
from vgen_core.data.schemas import VICAS_SAMPLES
from vgen_core.formats._json import bad_json_path
from vgen_core.formats.errors import SampleError

__all__ = [
    "CROWD_ID",
    "FPS",
    "REQUIRED_KEYS",
    "SEGMENTATION_KEYS",
    "VICAS_SAMPLES",
    "CaptionSpan",
    "ParsedCaption",
    "parse_vicas_caption",
    "vicas_sample_id",
    "list_vicas",
    "read_vicas_sample",
]

#: Track id of a ``?`` (crowd / ungrounded entity) in a caption id block, as the official code.
CROWD_ID = -1
#: Frames are decoded at this rate (``ffmpeg -r 30``); one ``segmentations`` entry per frame.
FPS = 30.0
#: Every key of the per-video JSON the official code reads (``datasets.md`` B.3).
REQUIRED_KEYS = (
    "video_id", "src_dataset", "filename", "image_size", "caption_raw_en", "caption_parsed_en",
    "caption_raw_en_gpt", "caption_parsed_en_gpt", "caption_raw_cn", "reworded_en_captions",
    "object_referrals", "all_track_ids", "segmentations",
)
SEGMENTATION_KEYS = ("filename", "is_gt", "track_ids", "mask_rles")
KNOWN_SOURCES = ("oops", "uvo", "kinetics")
#: Consecutive-frame IoU of one track below this is flagged as a sudden mask jump.
DEFAULT_JUMP_IOU = 0.2
#: ``image_size`` may not exceed this many pixels (8K UHD is 7680 x 4320 = 33 M; ViCaS videos are
#: at most 1280 x 720): a corrupt size fails at once instead of making anything allocate H*W.
MAX_FRAME_PIXELS = 2**25
_INT32 = (-2**31, 2**31 - 1)  # track ids are int32 in VICAS_SAMPLES

_IMAGE_EXT = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}
_VIDEO_EXT = (".mp4", ".mkv", ".webm", ".mov", ".avi")

# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------

# VICAS_SAMPLES (the row schema) lives in vgen_core.data.schemas with every other schema.

# ---------------------------------------------------------------------------------------------
# caption grounding syntax
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionSpan:
    """One ``[phrase]<mask_IDS>`` tag. ``start``/``end`` index the plain caption (half-open;
    the official ``end_idx`` is ``end - 1``); ``raw_start``/``raw_end`` the raw text from
    ``[`` to just past ``>``."""

    phrase: str
    track_ids: tuple[int, ...]
    start: int
    end: int
    raw_start: int
    raw_end: int
    official_track_ids: tuple[int, ...]  # what the official parser reads (one digit per id)

    @property
    def multi_digit(self) -> bool:
        return self.official_track_ids != self.track_ids

    def to_row(self) -> dict:
        return {"phrase": self.phrase, "track_ids": list(self.track_ids), "start": self.start,
                "end": self.end, "multi_digit": self.multi_digit}


@dataclass(frozen=True)
class ParsedCaption:
    """A parsed caption. ``plain`` is ``raw`` without brackets and id blocks (with ``？``/``，``
    turned into ``?``/``,`` like the official parser); ``warnings`` lists divergences from the
    official parser (multi-digit ids) and oddities (empty phrases, repeated ids)."""

    raw: str
    plain: str
    spans: tuple[CaptionSpan, ...]
    multi_digit_ids: bool
    warnings: tuple[str, ...]

    def track_ids(self, exclude_crowd: bool = True) -> list[int]:
        """Sorted distinct ids of every span (without ``CROWD_ID`` by default)."""
        ids = {i for s in self.spans for i in s.track_ids}
        if exclude_crowd:
            ids.discard(CROWD_ID)
        return sorted(ids)

    @property
    def grounded_coverage(self) -> float:
        """Fraction of ``plain`` characters inside phrases grounded to at least one track."""
        if not self.plain:
            return 0.0
        covered = np.zeros(len(self.plain), dtype=bool)
        for s in self.spans:
            if any(i != CROWD_ID for i in s.track_ids):
                covered[s.start:s.end] = True
        return float(covered.mean())


_FULLWIDTH = str.maketrans({"？": "?", "，": ","})
_SPECIAL = re.compile(r"[\[\]<>]")
_CONTEXT = 25


def _context(s: str, i: int) -> str:
    lo = max(0, i - _CONTEXT)
    return ("..." if lo else "") + repr(s[lo:i + 1])[1:-1]


def _parse_id_block(s: str, k: int, end: int) -> tuple[list[int], list[int], bool]:
    """Ids of ``s[k:end]`` (after the ``mask``/``mask_`` prefix): (ids, official ids,
    multi_digit). Raises ValueError with a message."""
    ids: list[int] = []
    official: list[int] = []
    multi = False
    j = k
    while j < end:
        ch = s[j]
        if ch in ", ":
            j += 1
        elif ch == "?":
            ids.append(CROWD_ID)
            official.append(CROWD_ID)
            j += 1
        elif "0" <= ch <= "9":
            e = j
            while e < end and "0" <= s[e] <= "9":
                e += 1
            ids.append(int(s[j:e]))
            official.extend(int(c) for c in s[j:e])
            multi = multi or e - j > 1
            j = e
        else:
            raise ValueError(f"unexpected {ch!r} at position {j} in the id block; expected "
                             f"digits, '?', ',' or ' ' (context: \"{_context(s, j)}\")")
    if not ids:
        raise ValueError(f"empty id block ending at position {end}; expected at least one id "
                         f"(context: \"{_context(s, end)}\")")
    return ids, official, multi


def parse_vicas_caption(text: str, *, sample_id: str | None = None,
                        source: str | None = None) -> ParsedCaption:
    """Parse ``[phrase]<mask_IDS>`` grounding (``datasets.md`` B.5).

    ``IDS`` are separated by ``,`` and/or spaces, after a ``mask_`` or ``mask`` prefix; ``?`` is
    a crowd entity (:data:`CROWD_ID`). Unlike the official parser, which reads ids one digit at
    a time (``<mask_12>`` -> [1, 2]), a run of digits is one id here (``[12]``); such spans set
    ``multi_digit`` and ``multi_digit_ids`` and add a warning. Raises
    ``SampleError("caption_tags")`` for stray or nested brackets, a ``]`` not followed by
    ``<mask``, an unclosed tag or an empty/invalid id block (the official parser silently
    accepts an unclosed tag at the end of the caption; this one does not)."""
    if not isinstance(text, str):
        raise SampleError("caption_tags", f"expected the caption as a str, found "
                          f"{type(text).__name__}", sample_id=sample_id, source=source)
    s = text.translate(_FULLWIDTH)
    try:
        return _parse(text, s)
    except ValueError as e:
        raise SampleError("caption_tags", f"{e}; caption: {text[:200]!r}",
                          sample_id=sample_id, source=source) from None


def _parse(text: str, s: str) -> ParsedCaption:
    plain: list[str] = []
    n_plain = 0
    spans: list[CaptionSpan] = []
    warnings: list[str] = []
    i, n = 0, len(s)
    while i < n:
        m = _SPECIAL.search(s, i)
        stop = m.start() if m else n
        plain.append(s[i:stop])
        n_plain += stop - i
        if m is None:
            break
        if s[stop] != "[":
            raise ValueError(f"unexpected {s[stop]!r} at position {stop} outside a "
                             f"[phrase]<mask_ids> tag (context: \"{_context(s, stop)}\")")
        opened = stop
        m2 = _SPECIAL.search(s, opened + 1)
        if m2 is None:
            raise ValueError(f"'[' at position {opened} is never closed by ']' "
                             f"(context: \"{_context(s, n - 1)}\")")
        close = m2.start()
        if s[close] != "]":
            raise ValueError(f"unexpected {s[close]!r} at position {close} inside the phrase "
                             f"opened at {opened}; expected ']' "
                             f"(context: \"{_context(s, close)}\")")
        phrase = s[opened + 1:close]
        if close + 1 >= n or s[close + 1] != "<":
            found = repr(s[close + 1:close + 11]) if close + 1 < n else "end of caption"
            raise ValueError(f"']' at position {close} must be followed by '<mask_IDS>', found "
                             f"{found}")
        k = close + 2
        if s.startswith("mask_", k):
            k += 5
        elif s.startswith("mask", k):
            k += 4
        else:
            raise ValueError(f"id block at position {close + 1} must start with 'mask_' or "
                             f"'mask', found {s[k:k + 10]!r}")
        end = s.find(">", k)
        if end == -1:
            raise ValueError(f"'<' at position {close + 1} is never closed by '>' "
                             f"(context: \"{_context(s, n - 1)}\")")
        ids, official, multi = _parse_id_block(s, k, end)
        start = n_plain
        plain.append(phrase)
        n_plain += len(phrase)
        span = CaptionSpan(phrase, tuple(ids), start, n_plain, opened, end + 1, tuple(official))
        if multi:
            warnings.append(f"multi_digit_ids: {s[close + 1:end + 1]!r} at position {close + 1} "
                            f"is read as {ids}; the official ViCaS parser reads it as "
                            f"{official}")
        if not phrase.strip():
            warnings.append(f"empty_phrase: the tag at position {opened} has no phrase text")
        if len(set(ids)) != len(ids):
            warnings.append(f"repeated_ids: {s[close + 1:end + 1]!r} at position {close + 1}")
        spans.append(span)
        i = end + 1
    return ParsedCaption(raw=text, plain="".join(plain), spans=tuple(spans),
                         multi_digit_ids=any(sp.multi_digit for sp in spans),
                         warnings=tuple(warnings))


# ---------------------------------------------------------------------------------------------
# listing
# ---------------------------------------------------------------------------------------------


def vicas_sample_id(video_id: int | str) -> str:
    """``vicas/<video_id:06d>`` (the id as ViCaS writes it in file names)."""
    return make_sample_id("vicas", video_id, width=6)


def _norm_version(version: str) -> str:
    v = str(version).strip()
    return v if v.startswith("v") else f"v{v}"


def _stem_video_id(name: str) -> tuple[int | None, bool]:
    """(video id, legacy) of an annotation file name: ``000123.json`` -> (123, False),
    ``000123_x.json`` -> (123, True); (None, False) when the stem is not a number."""
    stem = name[:-len(".json")]
    head = stem.split("_", 1)[0]
    if head.isascii() and head.isdigit():
        return int(head), "_" in stem
    return None, False


def _url(fs, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def _read_split(fs, path: str) -> list[int]:
    """The ids of a split file; ``SampleError("split_json")`` (a listing-level error the curate
    stage reports) when it does not parse or is not a list of ints."""
    try:
        with fs.open(path, "rb") as f:
            ids = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, ...
        raise SampleError("split_json", f"split file does not parse as JSON ({type(e).__name__}:"
                          f" {e}); expected a JSON list of int video ids: re-download it from "
                          f"the ViCaS repo (splits/<version>/)", source=_url(fs, path)) from None
    if not isinstance(ids, list) or not all(_is_int(v) and v >= 0 for v in ids):
        bad = (type(ids).__name__ if not isinstance(ids, list) else
               repr(next(v for v in ids if not (_is_int(v) and v >= 0)))[:40])
        raise SampleError("split_json", f"expected a JSON list of non-negative int video ids, "
                          f"found {bad}; re-download it from the ViCaS repo (splits/<version>/)",
                          source=_url(fs, path))
    return ids


def _splits(fs, base: str, version: str, split: str | None) -> tuple[dict[int, str],
                                                                      list[int] | None]:
    """({video_id: split name} of every known split, ids of ``split`` or None)."""
    if split is not None and split.endswith(".json"):
        sfs, spath = filesystem_for(split)
        listed = _read_split(sfs, spath)
        name = posixpath.basename(spath)[:-len(".json")]
        return {v: name for v in listed}, listed
    split_of: dict[int, str] = {}
    wanted: list[int] | None = None
    for name in ("train", "val", "test"):
        p = f"{base}/splits/{version}/{name}.json"
        if fs.exists(p):
            ids = _read_split(fs, p)
            split_of.update({v: split_of.get(v, name) for v in ids})
            wanted = ids if name == split else wanted
    if split is not None and wanted is None:
        p = f"{base}/splits/{version}/{split}.json"
        raise FileNotFoundError(f"split file {_url(fs, p)} not found (the split lists live in "
                                f"the ViCaS GitHub repo under splits/<version>/; copy them "
                                f"under <root>/splits/)")
    if split is not None and wanted is not None:  # (wanted is set only when split is)
        split_of.update({v: split for v in wanted})
    return split_of, wanted


def _numbered(fs, folder: str, *, recursive: bool = False,
              suffixes: tuple[str, ...] | None = None) -> dict[int, str]:
    """{id: path} of the entries of ``folder`` named ``<digits>`` (or ``<digits>_*<suffix>``
    when ``suffixes`` is given); the first in sorted order wins ("000123" before "123")."""
    if not fs.isdir(folder):
        return {}
    paths = fs.find(folder, maxdepth=3) if recursive else fs.ls(folder, detail=False)
    out: dict[int, str] = {}
    for p in sorted(paths):
        name = posixpath.basename(p.rstrip("/"))
        if suffixes is not None:
            if not name.lower().endswith(suffixes):
                continue
            name = name.split("_", 1)[0].split(".", 1)[0]
        if name.isascii() and name.isdigit():
            out.setdefault(int(name), p)
    return out


def _file_stamps(fs, folders: list[str]) -> dict[str, list]:
    """{path: [size, mtime]} of every file under ``folders`` (one recursive listing each)."""
    out: dict[str, list] = {}
    for folder in folders:
        if not fs.isdir(folder):
            continue
        for path, info in fs.find(folder, detail=True).items():
            out[path.rstrip("/")] = [info.get("size"), str(
                info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")]
    return out


def list_vicas(root: str, *, version: str, split: str | None = None) -> list[dict]:
    """One work item per video of ``annotations/<version>/`` (filtered by ``split``), sorted by
    video id. ``version`` is ``v0.1``/``v1.0`` (``1.0`` also works); ``split`` is ``train``,
    ``val``, ``test`` (read from ``splits/<version>/``) or a path to such a JSON list. A split
    id without an annotation file is still listed (the reader quarantines it); so is a file
    whose stem is not a number. Items are plain dicts (picklable) of fs-native paths, each with
    a ``stamp``: a digest of the sizes and mtimes of the files its reader would open (annotation,
    frames, video), so a re-run tells an unchanged video from an edited one without reading it."""
    fs, base = filesystem_for(root)
    base = base.rstrip("/")
    version = _norm_version(version)
    ann_dir = f"{base}/annotations/{version}"
    if not fs.isdir(ann_dir):
        found = (sorted(posixpath.basename(p) for p in fs.ls(f"{base}/annotations", detail=False))
                 if fs.isdir(f"{base}/annotations") else [])
        raise FileNotFoundError(f"ViCaS annotations folder {_url(fs, ann_dir)} not found; "
                                f"versions found: {found or 'none'} (expected "
                                f"<root>/annotations/<version>/<video_id:06d>.json)")
    split_of, wanted = _splits(fs, base, version, split)
    by_id: dict[int, list[tuple[bool, str]]] = {}
    odd: list[str] = []
    for p in sorted(fs.ls(ann_dir, detail=False)):
        name = posixpath.basename(p)
        if name.endswith(".json"):
            vid, legacy = _stem_video_id(name)
            if vid is None:
                odd.append(p)
            else:
                by_id.setdefault(vid, []).append((legacy, p))
    frames_dirs = _numbered(fs, f"{base}/video_frames")
    videos = _numbered(fs, f"{base}/videos", recursive=True, suffixes=_VIDEO_EXT)

    stamps = _file_stamps(fs, [ann_dir, f"{base}/video_frames", f"{base}/videos"])
    in_dir: dict[str, list] = {}  # a frames folder -> its files' stamps
    for path, st in stamps.items():
        in_dir.setdefault(posixpath.dirname(path), []).append([path, st])

    def stamp(*paths: str | None) -> str:
        d = Digest().update("vicas-listing")
        for path in paths:
            key = path.rstrip("/") if path else None
            st = stamps.get(key) if key is not None else None
            files = in_dir.get(key, []) if key is not None else []
            d.update(canonical_json([key, st, sorted(files)]))
        return d.hexdigest()

    items: list[dict[str, Any]] = []
    for vid in (sorted(by_id) if wanted is None else sorted(set(wanted))):
        cands = sorted(by_id.get(vid, []))  # canonical (legacy=False) first
        if cands and not cands[0][0]:
            cands = cands[:1]  # <id>.json wins over legacy <id>_*.json, as the eval code does
        items.append({
            "sample_id": vicas_sample_id(vid), "video_id": vid, "version": version,
            "split": split_of.get(vid), "root": root,
            "annotation": cands[0][1] if cands else f"{ann_dir}/{vid:06d}.json",
            "annotation_candidates": [p for _, p in cands],
            "frames_dir": frames_dirs.get(vid), "video": videos.get(vid),
        })
        items[-1]["stamp"] = stamp(*items[-1]["annotation_candidates"], items[-1]["frames_dir"],
                                   items[-1]["video"])
    for p in odd if wanted is None else []:
        stem = posixpath.basename(p)[:-len(".json")]
        try:
            sid = make_sample_id("vicas", stem)
        except ValueError:
            sid = "vicas/invalid-" + Digest().update(stem).hexdigest()[:12]
        items.append({"sample_id": sid, "video_id": None, "version": version, "split": None,
                      "root": root, "annotation": p, "annotation_candidates": [p],
                      "frames_dir": None, "video": None, "stamp": stamp(p)})
    return items


# ---------------------------------------------------------------------------------------------
# reading and validation
# ---------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v: Any) -> TypeGuard[list[Any]]:
    return isinstance(v, list) and all(_is_int(x) for x in v)


class _Ctx:
    """Raises SampleErrors that name the sample and the file; collects flags."""

    def __init__(self, sample_id: str, source: str):
        self.sample_id, self.source = sample_id, source
        self.flags: list[dict] = []

    def fail(self, check: str, reason: str, source: str | None = None) -> SampleError:
        return SampleError(check, reason, sample_id=self.sample_id, source=source or self.source)

    def flag(self, name: str, detail: str) -> None:
        self.flags.append({"name": name, "detail": detail})


def _load_annotation(fs, item: dict, ctx: _Ctx) -> dict:
    path = item["annotation"]
    if len(item.get("annotation_candidates") or []) > 1:
        raise ctx.fail("annotation_duplicate", f"video {item['video_id']} has several legacy "
                       f"annotation files {item['annotation_candidates']}; expected one "
                       f"{item['video_id']:06d}.json")
    if not fs.exists(path):
        raise ctx.fail("annotation_missing", f"annotation file for video {item['video_id']} "
                       f"not found; expected {posixpath.basename(path)} (the video is listed "
                       f"in split {item.get('split')!r})")
    try:
        with fs.open(path, "rb") as f:
            ann = json.loads(f.read().decode("utf-8"))
    except RecursionError:
        raise ctx.fail("annotation_json", "JSON nested too deeply to parse; expected the ViCaS "
                       "annotation object: corrupt file? re-download it") from None
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, ints past 4300 digits
        raise ctx.fail("annotation_json", f"not valid UTF-8 JSON ({type(e).__name__}: {e}); "
                       "truncated download? re-download it") from None
    if not isinstance(ann, dict):
        raise ctx.fail("annotation_json", f"expected a JSON object at the top level, found "
                       f"{type(ann).__name__}")
    return ann


def _check_keys_and_types(ann: dict, ctx: _Ctx) -> tuple[int, int, int]:
    missing = [k for k in REQUIRED_KEYS if k not in ann]
    if missing:
        raise ctx.fail("missing_keys", f"missing keys {missing}; expected all of "
                       f"{list(REQUIRED_KEYS)}")
    str_keys = ("src_dataset", "filename", "caption_raw_en", "caption_parsed_en",
                "caption_raw_en_gpt", "caption_parsed_en_gpt", "caption_raw_cn")
    bad = [f"{k} (expected str, found {type(ann[k]).__name__})"
           for k in str_keys if not isinstance(ann[k], str)]
    if not _is_int(ann["video_id"]) or not 0 <= ann["video_id"] < 2**63:
        bad.append(f"video_id (expected a non-negative int, found {ann['video_id']!r:.40})")
    if not (isinstance(ann["reworded_en_captions"], list)
            and all(isinstance(c, str) for c in ann["reworded_en_captions"])):
        bad.append("reworded_en_captions (expected a list of str)")
    if not _int_list(ann["all_track_ids"]):
        bad.append(f"all_track_ids (expected a list of int, found {ann['all_track_ids']!r:.80})")
    elif any(not _INT32[0] <= i <= _INT32[1] for i in ann["all_track_ids"]):
        bad.append(f"all_track_ids (expected 32-bit ints, found "
                   f"{max(ann['all_track_ids'], key=abs)!r:.40})")
    if not isinstance(ann["object_referrals"], list):
        bad.append("object_referrals (expected a list)")
    if not isinstance(ann["segmentations"], list) or not ann["segmentations"]:
        bad.append("segmentations (expected a non-empty list, one entry per frame)")
    if bad:
        raise ctx.fail("key_types", "wrong types: " + "; ".join(bad))
    size = ann["image_size"]
    if not (_int_list(size) and len(size) == 2 and min(size) > 0):
        raise ctx.fail("image_size", f"expected image_size = [height, width] (two positive "
                       f"ints), found {size!r:.80}")
    if size[0] * size[1] > MAX_FRAME_PIXELS:
        raise ctx.fail("image_size", f"image_size {size[0]}x{size[1]} (HxW) = "
                       f"{size[0] * size[1]} pixels is more than MAX_FRAME_PIXELS = "
                       f"{MAX_FRAME_PIXELS}: a corrupt size? fix image_size to the frames' size")
    return ann["video_id"], size[0], size[1]


def _check_stem(item: dict, video_id: int, ctx: _Ctx) -> None:
    name = posixpath.basename(item["annotation"])
    stem_id, legacy = _stem_video_id(name)
    if stem_id != video_id:
        raise ctx.fail("file_stem", f"file name {name!r} does not match the JSON's video_id "
                       f"{video_id}; expected {video_id:06d}.json")
    if legacy:
        ctx.flag("legacy_annotation_name", f"{name} (expected {video_id:06d}.json)")
    elif name != f"{video_id:06d}.json":
        ctx.flag("annotation_name_unpadded", f"{name} (expected {video_id:06d}.json)")


def _check_segmentations(ann: dict, h: int, w: int, ctx: _Ctx) -> list[list[dict]]:
    """Validate every frame entry; returns per-frame lists of {track_id, rle, counts}."""
    all_ids = set(ann["all_track_ids"])
    names = []
    frames = []
    for t, seg in enumerate(ann["segmentations"]):
        where = f"segmentations[{t}]"
        if not isinstance(seg, dict):
            raise ctx.fail("key_types", f"{where}: expected an object, found {type(seg).__name__}")
        missing = [k for k in SEGMENTATION_KEYS if k not in seg]
        if missing:
            raise ctx.fail("missing_keys", f"{where}: missing keys {missing}; expected all of "
                           f"{list(SEGMENTATION_KEYS)}")
        fname, tids, rles = seg["filename"], seg["track_ids"], seg["mask_rles"]
        is_gt_ok = isinstance(seg["is_gt"], int) and seg["is_gt"] in (0, 1)  # bool, or 0/1
        if not (isinstance(fname, str) and is_gt_ok and _int_list(tids)
                and isinstance(rles, list)):
            raise ctx.fail("key_types", f"{where}: expected filename str, is_gt bool, track_ids "
                           f"list of int, mask_rles list; found {type(fname).__name__}, "
                           f"{type(seg['is_gt']).__name__}, {tids!r:.60}, "
                           f"{type(rles).__name__}")
        if len(tids) != len(rles):
            raise ctx.fail("track_mask_length", f"{where} ({fname}): {len(tids)} track_ids but "
                           f"{len(rles)} mask_rles; expected one RLE per track id")
        if len(set(tids)) != len(tids):
            raise ctx.fail("frame_track_ids", f"{where} ({fname}): repeated track ids {tids}")
        unknown = sorted(set(tids) - all_ids)
        if unknown:
            raise ctx.fail("frame_track_ids", f"{where} ({fname}): track ids {unknown} are not "
                           f"in all_track_ids {sorted(all_ids)}")
        entries = []
        for tid, r in zip(tids, rles):
            rwhere = f"{where} ({fname}) track {tid}"
            size = r.get("size") if isinstance(r, dict) else None
            if not isinstance(r, dict) or not _int_list(size) or list(size) != [h, w]:
                raise ctx.fail("rle_size", f"{rwhere}: RLE size {size!r} != image_size "
                               f"{[h, w]} ([height, width])")
            try:
                counts = rle_codec.validate(r, [h, w])
            except rle_codec.RLEError as e:
                raise ctx.fail("rle_counts" if e.field == "counts" else "rle_size",
                               f"{rwhere}: {e.reason}") from None
            entries.append({"track_id": tid, "rle": r, "counts": counts})
        names.append(fname)
        frames.append(entries)
    _check_frame_names(names, ctx)
    return frames


_FRAME_NAME = re.compile(r"^([0-9]{1,18})\.(jpg|jpeg|png)$", re.IGNORECASE)


def _check_frame_names(names: list[str], ctx: _Ctx) -> None:
    idx = []
    for t, name in enumerate(names):
        m = _FRAME_NAME.match(name)
        if not m:
            raise ctx.fail("frame_filenames", f"segmentations[{t}].filename {name!r} is not a "
                           f"frame file name like 00000.jpg")
        idx.append(int(m.group(1)))
    if any(b <= a for a, b in zip(idx, idx[1:])):
        t = next(i for i, (a, b) in enumerate(zip(idx, idx[1:])) if b <= a)
        raise ctx.fail("frame_filenames", f"frame file names must strictly increase, found "
                       f"{names[t]!r} then {names[t + 1]!r} at segmentations[{t}..{t + 1}]")
    if idx != list(range(len(idx))):
        ctx.flag("frame_index_noncontiguous", f"frame files go {names[0]}..{names[-1]} for "
                 f"{len(names)} entries; expected 00000.jpg..{len(names) - 1:05d}.jpg")


def _check_referrals(ann: dict, ctx: _Ctx) -> list[dict]:
    all_ids = set(ann["all_track_ids"])
    out = []
    for j, ref in enumerate(ann["object_referrals"]):
        if not (isinstance(ref, dict) and isinstance(ref.get("prompt"), str)
                and _int_list(ref.get("track_ids"))):
            raise ctx.fail("referral_format", f"object_referrals[{j}]: expected "
                           f"{{'prompt': str, 'track_ids': [int]}}, found {ref!r:.120}")
        unknown = sorted(set(ref["track_ids"]) - all_ids)
        if unknown:
            raise ctx.fail("referral_track_ids", f"object_referrals[{j}] ({ref['prompt']!r:.60}) "
                           f"refers to track ids {unknown} not in all_track_ids "
                           f"{sorted(all_ids)}")
        if not ref["track_ids"]:
            ctx.flag("referral_empty", f"object_referrals[{j}] ({ref['prompt']!r:.60}) has no "
                     f"track ids")
        out.append({"prompt": ref["prompt"], "track_ids": list(ref["track_ids"])})
    return out


def _check_captions(ann: dict, ctx: _Ctx) -> tuple[ParsedCaption, ParsedCaption]:
    all_ids = set(ann["all_track_ids"])
    parsed = {}
    for key, plain_key in (("caption_raw_en_gpt", "caption_parsed_en_gpt"),
                           ("caption_raw_en", "caption_parsed_en")):
        try:
            cap = parse_vicas_caption(ann[key])
        except SampleError as e:
            raise ctx.fail("caption_tags", f"{key}: {e.reason}") from None
        unknown = sorted(set(cap.track_ids()) - all_ids)
        if unknown:
            raise ctx.fail("caption_track_ids", f"{key} grounds phrases to track ids {unknown} "
                           f"that are not in all_track_ids {sorted(all_ids)}")
        if cap.multi_digit_ids:
            ctx.flag("multi_digit_caption_ids", f"{key}: " + "; ".join(
                w for w in cap.warnings if w.startswith("multi_digit_ids")))
        if " ".join(cap.plain.split()) != " ".join(ann[plain_key].split()):
            ctx.flag("caption_parsed_mismatch", f"{key} without its tags differs from "
                     f"{plain_key}")
        parsed[key] = cap
    try:
        cn = parse_vicas_caption(ann["caption_raw_cn"])
        unknown = sorted(set(cn.track_ids()) - all_ids)
        if unknown:
            ctx.flag("caption_cn_unknown_ids", f"caption_raw_cn grounds to unknown track ids "
                     f"{unknown}")
    except SampleError as e:  # machine translated, never checked upstream: flag, keep
        ctx.flag("caption_cn_unparseable", e.reason)
    return parsed["caption_raw_en_gpt"], parsed["caption_raw_en"]


def _temporal_stats(ann: dict, frames: list[list[dict]], h: int, w: int, jump_iou: float,
                    ctx: _Ctx, grounded: frozenset[int] = frozenset()) -> dict:
    track_ids = list(dict.fromkeys(ann["all_track_ids"]))
    present: dict[int, list[int]] = {t: [] for t in track_ids}
    last: dict[int, tuple[int, dict, int]] = {}
    min_iou: float | None = None
    jumps: dict[int, list[tuple[int, float]]] = {}
    empty: dict[int, list[int]] = {}
    areas = []
    grounded_px = 0  # pixels covered by the union of caption-grounded tracks, over all frames
    for t, entries in enumerate(frames):
        tagged = [e["rle"] for e in entries if e["track_id"] in grounded]
        if tagged:
            grounded_px += rle_codec.area(rle_codec.merge(tagged))
        for e in entries:
            tid, a = e["track_id"], int(sum(e["counts"][1::2]))
            present[tid].append(t)
            areas.append(a / (h * w))
            if a == 0:
                empty.setdefault(tid, []).append(t)
            prev = last.get(tid)
            if prev is not None and prev[0] == t - 1 and prev[2] > 0 and a > 0:
                v = float(rle_codec.iou([prev[1]], [e["rle"]])[0, 0])
                min_iou = v if min_iou is None else min(min_iou, v)
                if v < jump_iou:
                    jumps.setdefault(tid, []).append((t, v))
            last[tid] = (t, e["rle"], a)
    lengths, gaps = [], []
    for tid in track_ids:
        ts = present[tid]
        lengths.append(len(ts))
        gap = (ts[-1] - ts[0] + 1 - len(ts)) if ts else 0
        gaps.append(gap)
        if not ts:
            ctx.flag("track_never_present", f"track {tid} is in all_track_ids but in no frame")
        elif gap:
            ctx.flag("track_gap", f"track {tid} is absent from {gap} frame(s) between its first "
                     f"({ts[0]}) and last ({ts[-1]}) frame")
    for tid, ts in empty.items():
        ctx.flag("empty_mask", f"track {tid} is listed with an empty mask in {len(ts)} "
                 f"frame(s), first {ann['segmentations'][ts[0]]['filename']}")
    for tid, js in jumps.items():
        t, v = min(js, key=lambda x: x[1])
        ctx.flag("mask_jump", f"track {tid}: IoU with the previous frame < {jump_iou} in "
                 f"{len(js)} frame(s); lowest {v:.3f} at frame {t}")
    return {"track_lengths": lengths, "track_gap_frames": gaps, "num_masks": len(areas),
            "mean_mask_area_fraction": float(np.mean(areas)) if areas else 0.0,
            "min_consecutive_iou": min_iou,
            "mask_grounded_coverage": grounded_px / (h * w * len(frames)) if frames else 0.0}


# ---------------------------------------------------------------------------------------------
# frames: a folder of decoded frames, or the video file
# ---------------------------------------------------------------------------------------------


def _image_size(data: bytes, expect: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an encoded frame; decoded fully only when it is ``expect`` (so a corrupt
    header never makes Pillow allocate a giant image)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if (im.height, im.width) == expect:
            im.load()
        return im.height, im.width


def _frames_from_dir(fs, fdir: str, names: list[str], h: int, w: int, decode: bool,
                     ctx: _Ctx) -> tuple[list[bytes] | None, list[str], list[tuple[str, int]]]:
    listing = {posixpath.basename(d["name"]): d for d in fs.ls(fdir, detail=True)}
    missing = [n for n in names if n not in listing]
    if missing:
        raise ctx.fail("frames_missing", f"{len(missing)} frame file(s) listed in segmentations "
                       f"are not in the frames folder, first {missing[:3]}",
                       source=_url(fs, fdir))
    images = [n for n in listing if _FRAME_NAME.match(n)]
    if len(images) != len(names):
        extra = sorted(set(images) - set(names))[:3]
        raise ctx.fail("frame_count", f"the frames folder has {len(images)} frame files but "
                       f"segmentations has {len(names)} entries (one per 30-fps frame expected;"
                       f" extra files e.g. {extra}); re-extract with ffmpeg -r 30",
                       source=_url(fs, fdir))
    paths = [f"{fdir}/{n}" for n in names]
    if not decode:
        return None, paths, [(n, int(listing[n].get("size") or 0)) for n in names]
    blobs = []
    for n, p in zip(names, paths):
        data = fs.cat_file(p)
        try:
            fh, fw = _image_size(data, (h, w))
        except Exception as e:  # PIL raises many types for broken files
            raise ctx.fail("frame_decode", f"frame {n} does not decode ({e})",
                           source=_url(fs, p)) from None
        if (fh, fw) != (h, w):
            raise ctx.fail("frame_size", f"frame {n} is {fh}x{fw} (HxW), expected image_size "
                           f"{h}x{w}", source=_url(fs, p))
        blobs.append(data)
    return blobs, paths, []


class _CfrResampler:
    """Constant-frame-rate conversion as ``ffmpeg -r 30`` does it (fftools' CFR video sync):
    each source frame is emitted ``lrint(delta)`` times, where ``delta`` is how far its end
    lies past the next output slot; earlier slots that it skips repeat the previous frame."""

    def __init__(self, fps: float = FPS):
        self.fps, self.next_pts, self.hist, self.last = fps, 0, [0, 0, 0], None

    def push(self, obj: Any, t: Fraction, duration: Fraction) -> list:
        """Objects to emit for a source frame shown at ``t`` s for ``duration`` s (exact
        fractions, as ffmpeg rescales timestamps in integers)."""
        exact = t * Fraction(self.fps)
        sync = float(exact)
        if exact.denominator != 1:  # ffmpeg nudges non-integer timestamps off exact midpoints
            sync += (1.0 if sync > 0 else -1.0) * 2.0 ** -17
        delta0 = sync - self.next_pts
        delta = delta0 + float(duration * Fraction(self.fps))
        nb, nb_prev = 1, 0
        if delta0 < 0 < delta:
            delta0 = 0.0
        if delta < -1.1:
            nb = 0
        elif delta > 1.1:
            nb = int(round(delta))  # llrintf: round half to even, like Python's round
            if delta0 > 1.1:
                nb_prev = min(int(round(delta0 - 0.6)), nb)
        out = [self.last if i < nb_prev and self.last is not None else obj for i in range(nb)]
        self.next_pts += nb
        self.hist = [nb_prev] + self.hist[:2]
        self.last = obj
        return out

    def flush(self) -> list:
        n = sorted(self.hist)[1]
        return [self.last] * n if self.last is not None else []


def _iter_video(fs, path: str, ctx: _Ctx) -> Iterator[np.ndarray]:
    """RGB uint8 frames (H, W, 3) at 30 fps, via PyAV or imageio-ffmpeg (streamed: a 720p
    clip never sits decoded in memory)."""
    try:
        import av

        have_av = True
    except ImportError:
        have_av = False
    if have_av:
        try:
            with fs.open(path, "rb") as f, av.open(f) as container:
                stream = container.streams.video[0]
                tb = Fraction(stream.time_base or Fraction(1, int(FPS)))
                start = (Fraction(container.start_time, 1_000_000)
                         if container.start_time is not None else None)
                period = 1 / Fraction(stream.average_rate or stream.guessed_rate or int(FPS))
                cfr = _CfrResampler()
                for fr in container.decode(stream):
                    t = fr.pts * tb if fr.pts is not None else cfr.next_pts / Fraction(int(FPS))
                    start = t if start is None else start
                    dur = getattr(fr, "duration", None)
                    dur = dur * tb if dur else period
                    yield from cfr.push(fr.to_ndarray(format="rgb24"), t - start, dur)
                yield from cfr.flush()
        except Exception as e:
            raise ctx.fail("video_decode", f"PyAV could not decode the video ({e})",
                           source=_url(fs, path)) from None
        return
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ctx.fail("video_decoder_missing", "no frames folder for this video and no video "
                       "decoder installed: `pip install av` (PyAV) or `pip install "
                       "imageio-ffmpeg`, or extract frames with `ffmpeg -i VIDEO -r 30 -q:v 1 "
                       "-start_number 0 video_frames/<video_id:06d>/%05d.jpg`",
                       source=_url(fs, path)) from None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = path
            if _url(fs, path) != path:
                local = posixpath.join(tmp, posixpath.basename(path))
                fs.get_file(path, local)
            gen = imageio_ffmpeg.read_frames(local, pix_fmt="rgb24", output_params=["-r", "30"])
            fw, fh = next(gen)["size"]
            for b in gen:
                yield np.frombuffer(b, np.uint8).reshape(fh, fw, 3)
    except Exception as e:
        raise ctx.fail("video_decode", f"imageio-ffmpeg could not decode the video ({e})",
                       source=_url(fs, path)) from None


def _frames_from_video(fs, path: str, n: int, h: int, w: int, ctx: _Ctx) -> list[bytes]:
    """The video's 30-fps frames as JPEG (q95), one per segmentations entry."""
    from PIL import Image

    blobs: list[bytes] = []
    for a in _iter_video(fs, path, ctx):
        if a.shape[:2] != (h, w):
            raise ctx.fail("frame_size", f"video frames are {a.shape[0]}x{a.shape[1]} (HxW), "
                           f"expected image_size {h}x{w}", source=_url(fs, path))
        if len(blobs) > n:  # count the rest without encoding it
            blobs.append(b"")
            continue
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        blobs.append(buf.getvalue())
    if not blobs or abs(len(blobs) - n) > 1:
        raise ctx.fail("frame_count", f"the video decodes to {len(blobs)} frames at 30 fps but "
                       f"segmentations has {n} entries", source=_url(fs, path))
    if len(blobs) != n:
        ctx.flag("video_frame_count_adjusted", f"decoded {len(blobs)} frames at 30 fps for {n} "
                 f"segmentation entries; {'dropped' if len(blobs) > n else 'repeated'} the last")
        blobs = (blobs + [blobs[-1]])[:n]
    return blobs


# ---------------------------------------------------------------------------------------------
# the reader
# ---------------------------------------------------------------------------------------------


def _meta_flags(ann: dict, video_id: int, ctx: _Ctx) -> None:
    if ann["src_dataset"] not in KNOWN_SOURCES:
        ctx.flag("src_dataset_unknown", f"{ann['src_dataset']!r} is not one of {KNOWN_SOURCES}")
    if not ann["filename"].startswith(f"{video_id:06d}_"):
        ctx.flag("video_filename_prefix", f"{ann['filename']!r} does not start with "
                 f"'{video_id:06d}_'")
    if len(set(ann["all_track_ids"])) != len(ann["all_track_ids"]):
        ctx.flag("all_track_ids_repeated", f"all_track_ids {ann['all_track_ids']} repeats ids")
    wide = sorted(i for i in ann["all_track_ids"] if i > 9)
    if wide:
        ctx.flag("track_ids_multi_digit", f"track ids {wide} have two or more digits; the "
                 f"official caption parser cannot ground them")
    if not any(s["is_gt"] for s in ann["segmentations"]):
        ctx.flag("no_gt_frames", "no segmentations entry has is_gt = true")


def _read_frames(fs, item: dict, ann: dict, h: int, w: int, decode: bool, ctx: _Ctx) -> dict:
    """Frames of the video from its frames folder, else its video file: {source, blobs,
    paths, sizes, format} (blobs None unless decoded; sizes = (name, bytes) when not)."""
    names = [s["filename"] for s in ann["segmentations"]]
    if item.get("frames_dir") and fs.isdir(item["frames_dir"]):
        blobs, paths, sizes = _frames_from_dir(fs, item["frames_dir"], names, h, w, decode, ctx)
        return {"source": "frames_dir", "blobs": blobs, "paths": paths, "sizes": sizes,
                "format": _IMAGE_EXT[posixpath.splitext(names[0])[1].lower()]}
    root = filesystem_for(item["root"])[1].rstrip("/")
    if not item.get("video") and (posixpath.basename(ann["filename"]) != ann["filename"]
                                  or ann["filename"] in ("", ".", "..") or "\0" in ann["filename"]):
        raise ctx.fail("frames_missing", f"no frames folder for this video, and its filename "
                       f"{ann['filename']!r:.80} is not a plain file name under videos/; expected "
                       f"video_frames/{ann['video_id']:06d}/ or videos/<video_id:06d>_<name>.mp4")
    video = item.get("video") or f"{root}/videos/{ann['filename']}"
    if not fs.exists(video):
        frames_dir = item.get("frames_dir") or f"{root}/video_frames/{ann['video_id']:06d}"
        raise ctx.fail("frames_missing", f"neither the frames folder {_url(fs, frames_dir)} "
                       f"nor the video {_url(fs, video)} exists")
    if posixpath.basename(video) != ann["filename"]:
        ctx.flag("video_filename_mismatch", f"found {posixpath.basename(video)!r}, the JSON "
                 f"says {ann['filename']!r}")
    if decode:
        return {"source": "video", "blobs": _frames_from_video(fs, video, len(names), h, w, ctx),
                "paths": None, "sizes": [], "format": "jpeg"}
    ctx.flag("frames_not_verified", "decode_frames=False: the video was not decoded")
    return {"source": "video", "blobs": None, "paths": None, "format": None,
            "sizes": [(posixpath.basename(video), int(fs.size(video) or 0))]}


def _stats(ann: dict, temporal: dict, referrals: list, cap_gpt: ParsedCaption,
           cap_en: ParsedCaption) -> dict:
    segs, tracks = ann["segmentations"], set(ann["all_track_ids"])
    in_caption = (set(cap_gpt.track_ids()) | set(cap_en.track_ids())) & tracks
    return {
        "num_frames": len(segs),
        "num_gt_frames": sum(1 for s in segs if s["is_gt"]),
        "num_tracks": len(tracks),
        **temporal,
        "num_referrals": len(referrals),
        "caption_words": len(ann["caption_parsed_en_gpt"].split()),
        "caption_chars": len(ann["caption_parsed_en_gpt"]),
        "num_caption_spans": len(cap_gpt.spans),
        "grounded_coverage": cap_gpt.grounded_coverage,
        "tracks_in_caption_fraction": len(in_caption) / len(tracks) if tracks else 0.0,
    }


def read_vicas_sample(item: dict, *, fs=None, decode_frames: bool = True,
                      jump_iou: float = DEFAULT_JUMP_IOU) -> dict:
    """Read and validate one :func:`list_vicas` item; returns a :data:`VICAS_SAMPLES` row.

    Frames come from ``video_frames/<id>/`` when that folder exists, else from the video file
    (decoded with PyAV or imageio-ffmpeg, resampled to 30 fps exactly as ``ffmpeg -r 30``,
    re-encoded as JPEG q95). With ``decode_frames=False`` no frame is read: ``frames`` is null,
    ``frame_paths`` lists the files (a folder), and the digest covers file names and sizes
    instead of frame bytes (so it differs from the decoded row's digest).
    ``jump_iou``: consecutive-frame IoU below which a track's mask is flagged ``mask_jump``.
    Raises :class:`SampleError` for every failed check (see ``datasets.md`` part C)."""
    if fs is None:
        fs, _ = filesystem_for(item["root"])
    ctx = _Ctx(item["sample_id"], _url(fs, item["annotation"]))
    ann = _load_annotation(fs, item, ctx)
    video_id, h, w = _check_keys_and_types(ann, ctx)
    _check_stem(item, video_id, ctx)
    masks = _check_segmentations(ann, h, w, ctx)
    referrals = _check_referrals(ann, ctx)
    cap_gpt, cap_en = _check_captions(ann, ctx)
    try:
        ann_json = canonical_json(ann)
        ann_json.encode("utf-8")  # lone surrogates (\udc80 escapes) are not valid Unicode
    except (TypeError, ValueError, RecursionError) as e:
        where = bad_json_path(ann)
        raise ctx.fail("annotation_json", f"not canonical JSON ({type(e).__name__}: {e})"
                       + (f" at {where}" if where else "") + "; expected finite numbers (no "
                       "NaN/Infinity) and valid Unicode text: fix or drop that field") from None
    _meta_flags(ann, video_id, ctx)
    fr = _read_frames(fs, item, ann, h, w, decode_frames, ctx)
    digest = Digest().update("vicas").update(ann_json)
    for part in fr["blobs"] if fr["blobs"] is not None else fr["sizes"]:
        digest.update(part if isinstance(part, bytes) else list(part))
    grounded = frozenset(cap_gpt.track_ids()) | frozenset(cap_en.track_ids())
    stats = _stats(ann, _temporal_stats(ann, masks, h, w, jump_iou, ctx, grounded), referrals,
                   cap_gpt, cap_en)
    segs = ann["segmentations"]
    return {
        "sample_id": item["sample_id"],
        "content_digest": digest.hexdigest(),
        "source": ctx.source,
        "version": item["version"],
        "split": item.get("split"),
        "video_id": video_id,
        "src_dataset": ann["src_dataset"],
        "video_filename": ann["filename"],
        "num_frames": len(segs),
        "height": h,
        "width": w,
        "fps": FPS,
        "frames_source": fr["source"],
        "frames": fr["blobs"],
        "frame_format": fr["format"],
        "frame_paths": [_url(fs, p) for p in fr["paths"]] if fr["paths"] is not None else None,
        "segmentations": [
            {"filename": s["filename"], "is_gt": bool(s["is_gt"]),
             "track_ids": list(s["track_ids"]),
             "mask_rles": [{"size": [h, w], "counts": _counts_str(e)} for e in entries]}
            for s, entries in zip(segs, masks)
        ],
        "all_track_ids": list(ann["all_track_ids"]),
        "caption_raw": ann["caption_raw_en_gpt"],
        "caption": ann["caption_parsed_en_gpt"],
        "caption_spans": [sp.to_row() for sp in cap_gpt.spans],
        "caption_raw_en": ann["caption_raw_en"],
        "caption_parsed_en": ann["caption_parsed_en"],
        "caption_spans_en": [sp.to_row() for sp in cap_en.spans],
        "caption_raw_cn": ann["caption_raw_cn"],
        "reworded_en_captions": list(ann["reworded_en_captions"]),
        "referrals": referrals,
        "stats": stats,
        "flags": ctx.flags,
    }


def _counts_str(entry: dict) -> str:
    counts = entry["rle"]["counts"]
    if isinstance(counts, str):
        return counts
    if isinstance(counts, (bytes, bytearray)):
        return bytes(counts).decode("ascii")
    return rle_codec.counts_to_string(entry["counts"])  # uncompressed list -> COCO string
