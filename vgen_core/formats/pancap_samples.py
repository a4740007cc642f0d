"""A small COCONut-PanCap dataset in the real on-disk layout, for tests and the demo, and a corpus
of broken samples (one defect each) for the reader's checks.

Images are scikit-image's photographs saved as COCO-style JPEGs; masks come from SLIC
superpixels (:func:`skimage.segmentation.slic`), so segment shapes are those of a real
segmentation algorithm; categories are assigned deterministically (largest regions are stuff);
captions ground phrases to the segment ids with PanCap's ``<id: phrase>`` tags, in the
whitespace variants seen in the real data. The samples also cover the format's variants:
COCONut-style small ids (1..N, stuff first, ``isthing`` in each segment, no ``bbox``), COCO
2017-style colour-derived ids (all three PNG channels used, ``bbox`` present, no ``isthing``),
integral float areas, crowd segments, void pixels and greyscale JPEGs.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vgen_core.data.panoptic import write_id_png
from vgen_core.data.sample_images import load_photo

__all__ = [
    "CATEGORIES",
    "PancapImage",
    "make_pancap_images",
    "write_pancap_layout",
    "write_pancap_sample_dataset",
    "write_pancap_corrupt_corpus",
    "CORRUPT_CASES",
    "CORRUPT_VALID_IDS",
]

#: A few COCO-panoptic categories (real ids, names, supercategories): things then stuff.
CATEGORIES: list[dict[str, Any]] = [
    {"supercategory": "person", "isthing": 1, "id": 1, "name": "person", "color": [220, 20, 60]},
    {"supercategory": "vehicle", "isthing": 1, "id": 3, "name": "car", "color": [0, 0, 142]},
    {"supercategory": "animal", "isthing": 1, "id": 17, "name": "cat", "color": [255, 109, 65]},
    {"supercategory": "sports", "isthing": 1, "id": 41, "name": "skateboard",
     "color": [255, 179, 240]},
    {"supercategory": "kitchen", "isthing": 1, "id": 47, "name": "cup", "color": [0, 82, 0]},
    {"supercategory": "indoor", "isthing": 1, "id": 85, "name": "clock", "color": [0, 143, 149]},
    {"supercategory": "ground", "isthing": 0, "id": 125, "name": "gravel",
     "color": [255, 255, 128]},
    {"supercategory": "ground", "isthing": 0, "id": 149, "name": "road", "color": [128, 64, 128]},
    {"supercategory": "wall", "isthing": 0, "id": 171, "name": "wall-brick",
     "color": [208, 229, 228]},
    {"supercategory": "sky", "isthing": 0, "id": 187, "name": "sky-other-merged",
     "color": [70, 130, 180]},
    {"supercategory": "plant", "isthing": 0, "id": 193, "name": "grass-merged",
     "color": [152, 251, 152]},
    {"supercategory": "wall", "isthing": 0, "id": 199, "name": "wall-other-merged",
     "color": [102, 102, 156]},
]
_PHRASES = {  # category id -> (one, several)
    1: ("a person in a white suit", "people"), 3: ("a small car", "cars"),
    17: ("a striped cat", "cats"), 41: ("a worn skateboard", "skateboards"),
    47: ("a cup of coffee", "cups"), 85: ("an old clock", "clocks"),
    125: ("loose gravel", "patches of gravel"), 149: ("the road", "stretches of road"),
    171: ("a brick wall", "brick walls"), 187: ("the pale sky", "bits of sky"),
    193: ("a patch of grass", "patches of grass"), 199: ("a plain wall", "plain walls"),
}
_THINGS = [c["id"] for c in CATEGORIES if c["isthing"]]
_STUFF = [c["id"] for c in CATEGORIES if not c["isthing"]]
_NUMBER = {2: "two", 3: "three", 4: "four", 5: "five"}
#: Real COCO train2017 ids (the first ones in the train set), then made-up ones.
_COCO_IDS = (9, 25, 30, 34, 36, 42, 49, 61, 64, 71, 72, 73, 74, 77, 78, 81, 86, 89, 92, 94)
_PHOTO_ORDER = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "clock", "brick",
                "grass", "gravel", "moon", "hubble_deep_field", "immunohistochemistry", "retina",
                "cat", "cell", "colorwheel", "logo", "page", "text")
_LICENSES = [
    {"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
     "name": "Attribution-NonCommercial-ShareAlike License"},
    {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"},
]
_INFO = {"description": "COCO 2018 Panoptic Dataset", "url": "http://cocodataset.org",
         "version": "1.0", "year": 2018, "contributor": "https://arxiv.org/abs/1801.00868",
         "date_created": "2018-06-01 00:00:00.0"}
#: Tag renderings seen in the real captions (``<2:a lawn>``, ``<3: a fence>``, ...).
_TAG_STYLES = ("<{ids}:{phrase}>", "<{ids}: {phrase}>", "< {ids} : {phrase} >",
               "<{ids_sp}:  {phrase}>")


@dataclass
class PancapImage:
    """One sample before it is written: pixels, id map, ``segments_info`` records, caption.
    ``segments`` are written verbatim (so they may be made inconsistent on purpose)."""

    image_id: int
    rgb: np.ndarray  # (H, W, 3) uint8
    ids: np.ndarray  # (H, W) int ids, 0 = void
    segments: list[dict[str, Any]]
    caption: str
    grey: bool = False  # save the JPEG as single-channel (COCO has some)
    image_bytes: bytes | None = None  # overrides the JPEG encoding of rgb
    png_bytes: bytes | None = None  # overrides write_id_png(ids)
    record: dict[str, Any] = field(default_factory=dict)  # extra/overriding images[] fields

    @property
    def file_stem(self) -> str:
        return f"{self.image_id:012d}"


def _resize(rgb: np.ndarray, width: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    height = max(8, round(h * width / w))
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))


def _segment_records(ids: np.ndarray, cats: dict[int, int], crowd: set[int], style: str,
                     ) -> list[dict[str, Any]]:
    from vgen_core.data.panoptic import segment_areas, segment_bboxes

    areas, boxes = segment_areas(ids), segment_bboxes(ids)
    isthing = {c["id"]: c["isthing"] for c in CATEGORIES}
    out = []
    for sid in sorted(cats, key=lambda s: (isthing[cats[s]], s)):  # stuff first, like COCONut
        cid, iscrowd, area = cats[sid], int(sid in crowd), areas[sid]
        if style == "coco":  # COCO 2017 panoptic: bbox, no isthing
            out.append({"id": sid, "category_id": cid, "iscrowd": iscrowd, "bbox": boxes[sid],
                        "area": area})
        elif isthing[cid]:  # COCONut's thing records list isthing before area and iscrowd
            out.append({"id": sid, "category_id": cid, "isthing": 1, "area": area,
                        "iscrowd": iscrowd})
        else:
            out.append({"id": sid, "category_id": cid, "iscrowd": iscrowd, "isthing": 0,
                        "area": area if style != "float_area" else float(area)})
    return out


def _caption(segments: list[dict[str, Any]], areas: dict[int, int], k: int) -> str:
    """A grounded paragraph: the biggest things, then the biggest stuff, grouped by category."""
    style = _TAG_STYLES[k % len(_TAG_STYLES)]

    def tag(ids: list[int], phrase: str) -> str:
        return style.format(ids=",".join(map(str, ids)), ids_sp=", ".join(map(str, ids)),
                            phrase=phrase)

    def groups(thing: bool) -> list[tuple[int, list[int]]]:
        by_cat: dict[int, list[int]] = {}
        for s in sorted(segments, key=lambda s: -areas[s["id"]]):
            if (s["category_id"] in _THINGS) == thing:
                by_cat.setdefault(s["category_id"], []).append(s["id"])
        return list(by_cat.items())[:2]

    def phrase(cid: int, ids: list[int]) -> str:
        one, several = _PHRASES[cid]
        return one if len(ids) == 1 else f"{_NUMBER.get(len(ids), 'several')} {several}"

    def listing(groups_: list[tuple[int, list[int]]], sep: str) -> str:
        return sep.join(tag(sorted(ids), phrase(c, ids)) for c, ids in groups_)

    things, stuff = groups(True), groups(False)
    parts = [f"This photograph shows {listing(things, ' and ')}."] if things else []
    if stuff:
        lead = "Behind them lies" if things else "The scene shows"
        parts.append(f"{lead} {listing(stuff, ', with ')}.")
    if things and k % 2 == 0:  # the same segment tagged twice
        cid, ids = things[0]
        again = tag(ids[:1], "its " + _PHRASES[cid][0].split()[-1])
        parts.append(f"The light falls softly on {again}.")
    parts.append("Everything else is out of focus.")
    return " ".join(parts)


def make_pancap_images(n_images: int = 6, seed: int = 0) -> list[PancapImage]:
    """``n_images`` samples from skimage's photographs (cycled), deterministic in ``seed``."""
    from skimage.segmentation import slic

    from vgen_core.data.panoptic import segment_areas

    out = []
    for k in range(n_images):
        rng = np.random.default_rng([seed, k])
        photo = _PHOTO_ORDER[k % len(_PHOTO_ORDER)]
        rgb = _resize(load_photo(photo), int(rng.choice([64, 72, 80, 96])))
        labels = slic(rgb, n_segments=int(rng.integers(10, 18)), compactness=10, start_label=1,
                      channel_axis=-1)
        _, labels = np.unique(labels, return_inverse=True)
        labels = labels.reshape(rgb.shape[:2]) + 1  # 1..K, contiguous
        areas = segment_areas(labels)
        order = sorted(areas, key=lambda s: (-areas[s], s))
        if k % 2 == 1 and len(order) > 4:  # an unlabelled (void) region
            labels[labels == order[-1]] = 0
            order = order[:-1]
        n_stuff = max(1, round(0.4 * len(order)))
        cats = {s: int(rng.choice(_STUFF if i < n_stuff else _THINGS))
                for i, s in enumerate(order)}
        crowd = {order[-1]} if k % 3 == 2 and order[-1] not in order[:n_stuff] else set()
        style = "coco" if k % 4 == 1 else "float_area" if k % 4 == 3 else "coconut"
        # new ids: COCONut numbers stuff first then things 1..N; COCO derives them from colours
        isthing = {c["id"]: c["isthing"] for c in CATEGORIES}
        ranked = sorted(order, key=lambda s: (isthing[cats[s]], order.index(s)))
        if style == "coco":
            new = [int(v) for v in rng.choice(np.arange(65536, 256**3), len(ranked), False)]
        else:
            new = list(range(1, len(ranked) + 1))
        remap = dict(zip(ranked, new))
        ids = np.zeros(labels.shape, dtype=np.int64)
        for old, nid in remap.items():
            ids[labels == old] = nid
        cats = {remap[s]: c for s, c in cats.items()}
        segments = _segment_records(ids, cats, {remap[s] for s in crowd}, style)
        caption = _caption(segments, segment_areas(ids), k)
        image_id = _COCO_IDS[k] if k < len(_COCO_IDS) else 100 + 7 * k
        grey = bool(np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2]))
        out.append(PancapImage(image_id, rgb, ids, segments, caption, grey=grey))
    return out


def _jpeg(img: PancapImage) -> bytes:
    if img.image_bytes is not None:
        return img.image_bytes
    buf = io.BytesIO()
    pil = Image.fromarray(img.rgb[..., 0] if img.grey else img.rgb)
    pil.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


_LAYOUTS = {  # layout -> (panoptic JSON, PNG folder), split "train2017" / subset "coconut_s"
    "detectron2": ("annotations/panoptic_train2017.json", "panoptic_train2017"),
    "kaggle": ("annotations/annotations/coconut_s_panoptic.json", "coconut_s/panoptic"),
    "download_script": ("coconut_s.json", "coconut_s"),
}


def write_pancap_layout(root: str | Path, images: list[PancapImage], *,
                        layout: str = "detectron2", captions: str = "folder",
                        extra_captions: dict[int, str] | None = None) -> Path:
    """Write ``images`` under ``root`` in a real layout.

    ``layout``: ``detectron2`` (``annotations/panoptic_train2017.json``,
    ``panoptic_train2017/``), ``kaggle`` (``annotations/annotations/coconut_s_panoptic.json``,
    ``coconut_s/panoptic/``) or ``download_script`` (``coconut_s.json``, ``coconut_s/``); COCO
    images always go to ``train2017/``. ``captions``: ``folder`` (``caption_train2017/*.txt``),
    ``tar_50k`` (``coconut_pancap_50k.tar`` of ``coconut_pancap_50k/*.txt``) or
    ``webdataset`` (``coconut_pancap-000000.tar`` of ``caption_train2017/*.txt``).
    ``extra_captions`` adds caption files for ids that have no image/annotation.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(_LAYOUTS)}")
    root = Path(root)
    json_rel, png_dir = _LAYOUTS[layout]
    (root / png_dir).mkdir(parents=True, exist_ok=True)
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    records, annotations = [], []
    for img in images:
        h, w = img.ids.shape
        rec = {"license": 1, "file_name": f"{img.file_stem}.jpg",
               "coco_url": f"http://images.cocodataset.org/train2017/{img.file_stem}.jpg",
               "height": h, "width": w, "date_captured": "2013-11-14 16:28:13",
               "flickr_url": "http://farm1.staticflickr.com/1/1_0.jpg", "id": img.image_id}
        rec.update(img.record)
        records.append(rec)
        annotations.append({"segments_info": img.segments, "file_name": f"{img.file_stem}.png",
                            "image_id": img.image_id})
        (root / "train2017" / rec["file_name"]).write_bytes(_jpeg(img))
        png = img.png_bytes if img.png_bytes is not None else write_id_png(img.ids)
        (root / png_dir / f"{img.file_stem}.png").write_bytes(png)
    doc = {"info": _INFO, "licenses": _LICENSES, "images": records, "annotations": annotations,
           "categories": CATEGORIES}
    (root / json_rel).parent.mkdir(parents=True, exist_ok=True)
    (root / json_rel).write_text(json.dumps(doc))
    texts = {img.image_id: img.caption for img in images}
    texts.update(extra_captions or {})
    _write_captions(root, texts, captions)
    return root


def _write_captions(root: Path, texts: dict[int, str], captions: str) -> None:
    if captions == "folder":
        (root / "caption_train2017").mkdir(parents=True, exist_ok=True)
        for image_id, text in texts.items():
            (root / "caption_train2017" / f"{image_id:012d}.txt").write_text(text, "utf-8")
        return
    names = {"tar_50k": ("coconut_pancap_50k.tar", "coconut_pancap_50k"),
             "webdataset": ("coconut_pancap-000000.tar", "caption_train2017")}
    if captions not in names:
        raise ValueError(f"unknown captions {captions!r}; known: folder, {', '.join(names)}")
    tar_name, folder = names[captions]
    with tarfile.open(root / tar_name, "w", format=tarfile.USTAR_FORMAT) as tf:
        for image_id, text in sorted(texts.items()):
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"{folder}/{image_id:012d}.txt")
            info.size, info.mtime = len(data), 1_700_000_000
            tf.addfile(info, io.BytesIO(data))


def write_pancap_sample_dataset(root: str | Path, n_images: int = 6, seed: int = 0, *,
                                layout: str = "detectron2", captions: str = "folder") -> Path:
    """A valid PanCap dataset of ``n_images`` samples under ``root`` (see
    :func:`write_pancap_layout` for ``layout`` / ``captions``). Returns ``root``."""
    return write_pancap_layout(root, make_pancap_images(n_images, seed), layout=layout,
                               captions=captions)


# --------------------------------------------------------------------------------------------
# corrupt corpus
# --------------------------------------------------------------------------------------------

#: case -> (folder under the corpus root, image id of the broken sample; None: listing fails)
CORRUPT_CASES: dict[str, tuple[str, int | None]] = {}
#: Ids of the valid samples written next to the broken ones in ``<root>/samples``.
CORRUPT_VALID_IDS = _COCO_IDS[:3]
_N_VALID = len(CORRUPT_VALID_IDS)


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _drop_segment(img: PancapImage) -> None:
    img.segments = [s for s in img.segments if s["id"] != _untagged_id(img)]


def _untagged_id(img: PancapImage) -> int:
    """A segment the caption does not tag (so removing it breaks only the id check)."""
    from vgen_core.formats.pancap import parse_grounded_caption

    tagged = parse_grounded_caption(img.caption).ids
    untagged = [s["id"] for s in img.segments if s["id"] not in tagged]
    return (untagged or [img.segments[-1]["id"]])[-1]


def _shrink_png(img: PancapImage) -> None:
    from vgen_core.data.panoptic import segment_areas

    small = img.ids[:-2, :-1]
    areas = segment_areas(small)
    img.png_bytes = write_id_png(small)
    img.segments = [dict(s, area=areas[s["id"]]) for s in img.segments if s["id"] in areas]


def _grey_png(img: PancapImage) -> None:
    buf = io.BytesIO()
    Image.fromarray(img.ids.astype(np.uint8)).save(buf, format="PNG")  # COCONut ids are < 256
    img.png_bytes = buf.getvalue()


def _set_area(img: PancapImage) -> None:
    img.segments = [dict(s, area=s["area"] + 7) if i == 0 else s
                    for i, s in enumerate(img.segments)]


def _caption_suffix(text: str):
    def edit(img: PancapImage) -> None:
        img.caption = img.caption + " " + text
    return edit


_EDITS: dict[str, tuple[str, Any]] = {  # case -> (expected check, edit of a valid sample)
    "truncated_png": ("panoptic_png", lambda img: setattr(
        img, "png_bytes", _cut(write_id_png(img.ids)))),
    "png_id_not_in_segments_info": ("png_ids_match_segments", _drop_segment),
    "segments_info_id_not_in_png": ("png_ids_match_segments", lambda img: setattr(
        img, "segments", img.segments + [{"id": 250, "category_id": 1, "iscrowd": 0,
                                          "isthing": 1, "area": 10}])),
    "area_mismatch": ("segment_area", _set_area),
    "png_size_mismatch": ("panoptic_size", _shrink_png),
    "single_channel_png": ("panoptic_png", _grey_png),
    "malformed_tag": ("caption_tags", _caption_suffix("A <9 skateboard> leans on the wall.")),
    "unbalanced_tag": ("caption_tags", _caption_suffix("A <1: dog sits near the door.")),
    "tag_unknown_id": ("caption_tag_ids", _caption_suffix("A <240: ghost> hovers there.")),
    "tag_void_id": ("caption_tag_ids", _caption_suffix("<0: Nothing> is labelled.")),
    "unknown_category": ("segment_category", lambda img: setattr(
        img, "segments", [dict(s, category_id=7777) if i == 0 else s
                          for i, s in enumerate(img.segments)])),
    "image_not_decodable": ("image_decode", lambda img: setattr(
        img, "image_bytes", _cut(_jpeg(img)))),
    "file_name_id_mismatch": ("file_name_id", lambda img: setattr(
        img, "record", {"file_name": f"{img.image_id + 1:012d}.jpg"})),
}
# cases written by deleting a file after the fact, or with no image at all
_AFTER = {"missing_image": "image_missing", "missing_png": "panoptic_png_missing",
          "caption_without_annotation": "annotation_missing"}


def _case_ids() -> dict[str, int]:
    names = list(_EDITS) + list(_AFTER)
    return {name: _COCO_IDS[_N_VALID + i] if _N_VALID + i < len(_COCO_IDS)
            else 100 + 7 * (_N_VALID + i) for i, name in enumerate(names)}


CORRUPT_CASES.update({name: ("samples", i) for name, i in _case_ids().items()})
CORRUPT_CASES["truncated_json"] = ("truncated_json", None)


def write_pancap_corrupt_corpus(root: str | Path) -> dict[str, str]:
    """Broken PanCap samples, one defect each, next to valid ones; returns
    ``{case: expected check}``. Where each case lives is :data:`CORRUPT_CASES`:
    ``<root>/samples`` (detectron2 layout) holds the valid samples :data:`CORRUPT_VALID_IDS`
    (the same as the first samples of ``write_pancap_sample_dataset(seed=0)``) and one broken
    sample per case; ``<root>/truncated_json`` is a separate corpus whose split JSON is cut in
    half, so listing it fails."""
    root = Path(root)
    ids = _case_ids()
    n = _N_VALID + len(ids) - 1  # caption_without_annotation has no image
    base = make_pancap_images(n, seed=0)
    images = base[:_N_VALID]
    for name, (_, edit) in _EDITS.items():
        k = _N_VALID + list(ids).index(name)
        img = replace(base[k], segments=[dict(s) for s in base[k].segments])
        edit(img)
        images.append(img)
    for name in ("missing_image", "missing_png"):
        images.append(base[_N_VALID + list(ids).index(name)])
    samples = write_pancap_layout(
        root / "samples", images,
        extra_captions={ids["caption_without_annotation"]: "A <1: lone caption> without masks."})
    (samples / "train2017" / f"{ids['missing_image']:012d}.jpg").unlink()
    (samples / "panoptic_train2017" / f"{ids['missing_png']:012d}.png").unlink()

    trunc = write_pancap_layout(root / "truncated_json", base[:2])
    json_path = trunc / _LAYOUTS["detectron2"][0]
    json_path.write_bytes(_cut(json_path.read_bytes()))

    expected = {name: check for name, (check, _) in _EDITS.items()}
    expected.update(_AFTER)
    expected["truncated_json"] = "panoptic_json"
    return expected
