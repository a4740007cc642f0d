"""ViCaS-layout sample datasets made from real pixels, for tests and the demo.

:func:`write_vicas_sample_dataset` writes the exact ViCaS layout (``annotations/<version>/``,
``splits/<version>/``, ``video_frames/<id:06d>/%05d.jpg``, optionally ``videos/<id>_<name>.mp4``)
for a few short 30-fps videos:

* the animated GIF scikit-image ships (``no_time_for_that_tiny.gif``, 24 frames at 70 ms),
  resampled to 30 fps the way ``ffmpeg -r 30`` does and upscaled 4x; every frame is segmented
  with Felzenszwalb's method and segments are linked into tracks by IoU with the previous frame;
* moving crops (camera pans) of scikit-image photographs; the photograph is segmented once and
  each track follows its segment through the moving crop window (absent while out of view).

Masks are COCO compressed RLE, captions carry ``[phrase]<mask_IDS>`` grounding (in the three
id-block spellings seen upstream), and each video has referral prompts. Video 0 is always the
GIF. :func:`write_vicas_corrupt_corpus` adds one-defect copies next to valid videos.
"""

from __future__ import annotations

import copy
import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from vgen_core.data import rle as rle_codec
from vgen_core.data.sample_images import load_photo
from vgen_core.formats.vicas import _CfrResampler, parse_vicas_caption

__all__ = [
    "GIF_NAME",
    "CORRUPT_CASES",
    "CORRUPT_CASE_IDS",
    "gif_path",
    "write_vicas_video",
    "write_vicas_sample_dataset",
    "write_vicas_corrupt_corpus",
]

GIF_NAME = "no_time_for_that_tiny.gif"
_VERSIONS = ("v0.1", "v1.0")
_SPLITS = ("train", "val", "test")

#: photo -> (English scene, Chinese scene, original clip name)
_PHOTO_SCENES = {
    "astronaut": ("a photograph of an astronaut in front of a flag", "一张宇航员站在旗帜前的照片",
                  "Space_Walk_Fails_2017"),
    "chelsea": ("a photograph of a tabby cat", "一张虎斑猫的照片", "Cat_Fails_(March_2018)7"),
    "coffee": ("a cup of coffee on a saucer", "一杯放在碟子上的咖啡", "Kitchen_Fails_Compilation3"),
    "rocket": ("a rocket on its launch pad", "一枚停在发射台上的火箭", "Launch_Day_Fails12"),
}
_GIF_SCENE = ("a short clip of a person standing in front of a pale green wall",
              "一段一个人站在浅绿色墙前的短片", "No_Time_For_That_(Fail_Army)5")

_PALETTE = {
    "black": (25, 25, 25), "white": (235, 235, 235), "gray": (128, 128, 128),
    "red": (190, 40, 40), "orange": (225, 140, 50), "yellow": (225, 205, 60),
    "green": (70, 140, 70), "blue": (50, 80, 190), "purple": (120, 60, 150),
    "brown": (115, 75, 45), "pink": (225, 145, 170), "beige": (205, 190, 150),
}
_COLOR_CN = {"black": "黑色", "white": "白色", "gray": "灰色", "red": "红色", "orange": "橙色",
             "yellow": "黄色", "green": "绿色", "blue": "蓝色", "purple": "紫色",
             "brown": "棕色", "pink": "粉色", "beige": "米色"}


# ---------------------------------------------------------------------------------------------
# frames and tracks
# ---------------------------------------------------------------------------------------------


def gif_path() -> Path:
    """Path of the animated GIF in scikit-image's data folder."""
    import skimage.data

    return Path(skimage.data.__file__).parent / GIF_NAME


def _resample_indices(durations_ms: list[int]) -> list[int]:
    """Source frame shown at each 30-fps output frame, as ``ffmpeg -r 30`` picks them."""
    cfr, out = _CfrResampler(), []
    t = Fraction(0)
    for k, d in enumerate(durations_ms):
        out += cfr.push(k, t, Fraction(d, 1000))
        t += Fraction(d, 1000)
    return out + cfr.flush()


def _segment(rgb: np.ndarray, scale: float, min_size: int) -> np.ndarray:
    from skimage.segmentation import felzenszwalb

    return felzenszwalb(rgb, scale=scale, sigma=0.5, min_size=min_size)


def _seed_labels(labels: np.ndarray, k: int, lo: float = 0.03, hi: float = 0.6) -> list[int]:
    ids, counts = np.unique(labels, return_counts=True)
    frac = counts / labels.size
    cand = sorted(((int(c), int(i)) for i, c, f in zip(ids, counts, frac) if lo <= f <= hi),
                  reverse=True)
    return [i for _, i in cand[:k]]


def _link_tracks(labels_T: list[np.ndarray], k: int, min_iou: float = 0.3) -> list[dict]:
    """Per frame {track_id: bool mask}: seeds from frame 0, each following its best-IoU segment
    (>= min_iou, one track per segment) of the next frame; unmatched tracks are absent."""
    last = {tid: labels_T[0] == lab for tid, lab in enumerate(_seed_labels(labels_T[0], k), 1)}
    out = [dict(last)]
    for lab in labels_T[1:]:
        frame, used = {}, set()
        for tid, prev in last.items():
            best = None
            ls, inter = np.unique(lab[prev], return_counts=True)
            for lbl, i in zip(ls.tolist(), inter.tolist()):
                if lbl in used:
                    continue
                seg = lab == lbl
                v = i / (prev.sum() + seg.sum() - i)
                if v >= min_iou and (best is None or v > best[0]):
                    best = (v, lbl, seg)
            if best is not None:
                used.add(best[1])
                frame[tid] = last[tid] = best[2]
        out.append(frame)
    return out


def _gif_video(scale: int = 4) -> tuple[list[np.ndarray], list[dict]]:
    with Image.open(gif_path()) as im:
        src = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
        durations = [int(f.info.get("duration", 70)) for f in ImageSequence.Iterator(im)]
    idx = _resample_indices(durations)
    up = np.ones((scale, scale), dtype=np.uint8)
    labels_src = [np.kron(_segment(f, 100, 15), up) for f in src]
    frames = [np.kron(src[k], up[:, :, None]) for k in idx]
    return frames, _link_tracks([labels_src[k] for k in idx], k=3)


def _pan_video(photo: str, n_frames: int, rng: np.random.Generator,
               crop_hw: tuple[int, int] = (96, 128)) -> tuple[list[np.ndarray], list[dict], str]:
    photo_im = Image.fromarray(load_photo(photo))
    f = 200 / min(photo_im.size)
    img = np.asarray(photo_im.resize((round(photo_im.width * f), round(photo_im.height * f)),
                                     Image.Resampling.BILINEAR))
    labels = _segment(img, 300, 120)
    ch, cw = crop_hw
    H, W = labels.shape
    # a slow pan (about 1 px per frame), as a hand-held camera would
    y0 = int(rng.integers(0, H - ch + 1))
    y1 = int(np.clip(y0 + rng.integers(-n_frames // 4, n_frames // 4 + 1), 0, H - ch))
    x0 = int(rng.integers(0, W - cw - n_frames + 1))
    x1 = x0 + n_frames
    if rng.random() < 0.5:
        x0, x1 = x1, x0
    ys = np.round(np.linspace(y0, y1, n_frames)).astype(int)
    xs = np.round(np.linspace(x0, x1, n_frames)).astype(int)
    crops = [labels[y:y + ch, x:x + cw] for y, x in zip(ys, xs)]
    frames = [np.ascontiguousarray(img[y:y + ch, x:x + cw]) for y, x in zip(ys, xs)]
    union = np.unique(np.concatenate([c.ravel() for c in crops]), return_counts=True)
    seeds = []
    for lbl, _ in sorted(zip(*union), key=lambda p: -p[1]):
        fr = [(c == lbl).mean() for c in crops]
        if max(fr) <= 0.6 and sum(v > 0 for v in fr) >= n_frames // 4 and max(fr) >= 0.03:
            seeds.append(int(lbl))
        if len(seeds) == 3:
            break
    tracks = [{tid: c == lbl for tid, lbl in enumerate(seeds, 1) if (c == lbl).any()}
              for c in crops]
    direction = "right" if x1 > x0 else "left"
    return frames, tracks, direction


# ---------------------------------------------------------------------------------------------
# captions and annotations
# ---------------------------------------------------------------------------------------------


def _describe(frames: list[np.ndarray], tracks: list[dict], tid: int) -> dict:
    t0 = next(t for t, tr in enumerate(tracks) if tid in tr)
    t1 = max(t for t, tr in enumerate(tracks) if tid in tr)
    m = tracks[t0][tid]
    rgb = frames[t0][m].mean(axis=0)
    color = min(_PALETTE, key=lambda c: float(np.sum((np.array(_PALETTE[c]) - rgb) ** 2)))
    ys, xs = np.nonzero(m)
    w = m.shape[1]
    pos = ("on the left" if xs.mean() < w / 3 else "on the right" if xs.mean() > 2 * w / 3
           else "in the middle")
    size = "large" if m.mean() > 0.15 else "small"
    cx0 = xs.mean()
    cx1 = np.nonzero(tracks[t1][tid])[1].mean()
    present = [tid in tr for tr in tracks]
    if not present[0]:
        verbs, verb_cn = ("comes into view", "come into view"), "进入画面"
    elif t1 < len(tracks) - 1:
        verbs, verb_cn = ("slides out of view", "slide out of view"), "移出画面"
    elif abs(cx1 - cx0) > 3:
        side = "left" if cx1 < cx0 else "right"
        verbs = (f"drifts to the {side}", f"drift to the {side}")
        verb_cn = "向左移动" if side == "left" else "向右移动"
    else:
        verbs, verb_cn = ("stays in place", "stay in place"), "保持不动"
    return {"phrase": f"a {size} {color} area {pos}", "short": f"the {color} area",
            "color": color, "verb": verbs[0], "verb_plural": verbs[1], "verb_cn": verb_cn}


def _tag(ids: list[int], form: int, crowd: bool = False) -> str:
    body = "?" if crowd else [", ".join, ",".join, " ".join][form](str(i) for i in ids)
    return f"<{'mask' if form == 1 else 'mask_'}{body}>"


def _group(d: dict, rest: list[int]) -> tuple[str, str]:
    """(phrase, verb) for the tracks ``rest`` named together."""
    if len(rest) == 1:
        return f"a {d[rest[0]]['color']} area", d[rest[0]]["verb"]
    colors = list(dict.fromkeys(d[t]["color"] for t in rest))
    number = {2: "two", 3: "three"}.get(len(rest), str(len(rest)))
    return f"{number} {' and '.join(colors)} areas", d[rest[0]]["verb_plural"]


def _annotation(video_id: int, src: str, orig: str, frames: list[np.ndarray],
                tracks: list[dict], scene: tuple[str, str], motion: str, form: int) -> dict:
    h, w = frames[0].shape[:2]
    tids = sorted({t for tr in tracks for t in tr})
    d = {t: _describe(frames, tracks, t) for t in tids}
    first, rest = tids[:1], tids[1:]
    # the original (human) caption and its GPT-polished version
    raw = f"The camera {motion} {scene[0]}. [{d[first[0]]['phrase'].capitalize()}]" \
          f"{_tag(first, form)} {d[first[0]]['verb']}"
    as_ = "As the clip plays" if motion.startswith("holds") else "As it moves"
    gpt = f"In this video the camera {motion} {scene[0]}. {as_}, [{d[first[0]]['phrase']}]" \
          f"{_tag(first, form)} {d[first[0]]['verb']}"
    cn = f"镜头扫过{scene[1]}，[一块{_COLOR_CN[d[first[0]]['color']]}的区域]<mask_{first[0]}>" \
         f"{d[first[0]]['verb_cn']}"
    if rest:
        group, verb = _group(d, rest)
        raw += f", while [{group}]{_tag(rest, form)} {verb}"
        gpt += f", and [{group}]{_tag(rest, form)} {verb}"
        cn += f"，[其他区域]<mask_{'，'.join(str(t) for t in rest)}>{d[rest[0]]['verb_cn']}"
    raw += ". [A few other patches]" + _tag([], form, crowd=True) + " fill the background."
    gpt += ", with [some smaller patches]" + _tag([], form, crowd=True) + " around them."
    cn += "，[背景]<mask_？>保持不变。"
    referrals = [{"prompt": d[first[0]]["phrase"], "track_ids": first}]
    if rest:
        referrals.append({"prompt": "the " + _group(d, rest)[0].removeprefix("a "),
                          "track_ids": rest})
    segmentations = []
    for t, tr in enumerate(tracks):
        ids = sorted(tr)
        segmentations.append({
            "filename": f"{t:05d}.jpg",
            "is_gt": t % 30 == 0,
            "track_ids": ids,
            "mask_rles": [rle_codec.encode(tr[i].astype(np.uint8)) for i in ids],
        })
    return {
        "video_id": video_id,
        "src_dataset": src,
        "filename": f"{video_id:06d}_{orig}.mp4",
        "image_size": [h, w],
        "caption_raw_en": raw,
        "caption_parsed_en": parse_vicas_caption(raw).plain,
        "caption_raw_en_gpt": gpt,
        "caption_parsed_en_gpt": parse_vicas_caption(gpt).plain,
        "caption_raw_cn": cn,
        "reworded_en_captions": [
            f"A video where the camera {motion} {scene[0]}.",
            f"The view {motion} {scene[0]}, showing {len(tids)} distinct areas.",
        ],
        "object_referrals": referrals,
        "all_track_ids": tids,
        "segmentations": segmentations,
    }


def _make_videos(n_videos: int, seed: int) -> list[tuple[dict, list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    ids = sorted(int(v) for v in rng.choice(38469, size=n_videos, replace=False))
    photos = list(_PHOTO_SCENES)
    out = []
    for j, vid in enumerate(ids):
        src = ("oops", "uvo", "oops", "kinetics")[j % 4]
        if j == 0:
            frames, tracks = _gif_video()
            scene, motion, orig = _GIF_SCENE[:2], "holds still on", _GIF_SCENE[2]
        else:
            photo = photos[(j - 1) % len(photos)]
            frames, tracks, direction = _pan_video(photo, 36 + 6 * (j % 3), rng)
            scene, orig = _PHOTO_SCENES[photo][:2], _PHOTO_SCENES[photo][2]
            motion = f"pans to the {direction} across"
        out.append((_annotation(vid, src, orig, frames, tracks, scene, motion, j % 3), frames))
    return out


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _write_mp4(path: Path, frames: list[np.ndarray]) -> None:
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        try:
            stream = container.add_stream("libx264", rate=30)
            stream.options = {"crf": "15"}
        except Exception:  # a PyAV build without x264
            stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_vicas_video(root: str | os.PathLike, annotation: dict, frames: list[np.ndarray], *,
                      version: str = "v1.0", write_video: bool = False,
                      json_name: str | None = None) -> Path:
    """Write one video: ``annotations/<version>/<id:06d>.json`` (or ``json_name``), its frames
    as ``video_frames/<file id>/%05d.jpg`` (JPEG q95) and, with ``write_video``, the MP4
    ``videos/<filename>`` (needs PyAV). Returns the annotation path."""
    root = Path(root)
    vid = annotation["video_id"]
    ann_dir = root / "annotations" / version
    ann_dir.mkdir(parents=True, exist_ok=True)
    path = ann_dir / (json_name or f"{vid:06d}.json")
    path.write_text(json.dumps(annotation, ensure_ascii=False), encoding="utf-8")
    fdir = root / "video_frames" / path.stem.split("_")[0]  # the file's id
    fdir.mkdir(parents=True, exist_ok=True)
    for t, a in enumerate(frames):
        Image.fromarray(a).save(fdir / f"{t:05d}.jpg", format="JPEG", quality=95)
    if write_video:
        (root / "videos").mkdir(parents=True, exist_ok=True)
        _write_mp4(root / "videos" / annotation["filename"], frames)
    return path


def _write_splits(root: Path, version: str, splits: dict[str, list[int]]) -> None:
    d = root / "splits" / version
    d.mkdir(parents=True, exist_ok=True)
    for name in _SPLITS:
        (d / f"{name}.json").write_text(json.dumps(sorted(splits.get(name, []))))


def write_vicas_sample_dataset(root: str | os.PathLike, n_videos: int = 3, seed: int = 0, *,
                               write_videos: bool = False) -> dict[int, dict]:
    """Write ``n_videos`` real-pixel videos in the ViCaS layout under ``root``.

    All videos are in ``v1.0`` (splits train/val/test round-robin); the ``oops`` ones are also
    in ``v0.1`` with the same split, like the real release. ``write_videos`` also writes the
    MP4s (needs PyAV). Returns ``{video_id: {"split", "src_dataset", "num_frames",
    "num_tracks", "versions"}}``."""
    root = Path(root)
    info: dict[int, dict] = {}
    splits: dict[str, dict[str, list[int]]] = {v: {s: [] for s in _SPLITS} for v in _VERSIONS}
    for j, (ann, frames) in enumerate(_make_videos(n_videos, seed)):
        vid, split = ann["video_id"], _SPLITS[j % 3]
        versions = ["v1.0"] + (["v0.1"] if ann["src_dataset"] == "oops" else [])
        for k, v in enumerate(versions):
            write_vicas_video(root, ann, frames, version=v, write_video=write_videos and k == 0)
            splits[v][split].append(vid)
        info[vid] = {"split": split, "src_dataset": ann["src_dataset"],
                     "num_frames": len(frames), "num_tracks": len(ann["all_track_ids"]),
                     "versions": sorted(versions)}
    for v in _VERSIONS:
        _write_splits(root, v, splits[v])
    return info


# ---------------------------------------------------------------------------------------------
# corrupt corpus
# ---------------------------------------------------------------------------------------------

#: One defect per case -> the ``SampleError.check`` the reader must raise.
CORRUPT_CASES: dict[str, str] = {
    "rle_size_mismatch": "rle_size",
    "rle_counts_short": "rle_counts",
    "rle_counts_long": "rle_counts",
    "rle_counts_bad_chars": "rle_counts",
    "rle_counts_truncated": "rle_counts",
    "track_ids_vs_mask_rles": "track_mask_length",
    "frame_track_id_unknown": "frame_track_ids",
    "referral_id_unknown": "referral_track_ids",
    "caption_id_unknown": "caption_track_ids",
    "caption_tag_malformed": "caption_tags",
    "caption_tag_no_prefix": "caption_tags",
    "caption_tag_unbalanced": "caption_tags",
    "caption_tag_unclosed_id": "caption_tags",
    "missing_key": "missing_keys",
    "missing_frame_key": "missing_keys",
    "wrong_type": "key_types",
    "image_size_malformed": "image_size",
    "file_name_vs_video_id": "file_stem",
    "missing_frames": "frames_missing",
    "extra_frame": "frame_count",
    "frame_wrong_size": "frame_size",
    "truncated_json": "annotation_json",
    "annotation_missing": "annotation_missing",
}
_CORRUPT_BASE_ID = 900100
#: The video id of each case's file stem (its sample id is ``vicas/<id:06d>``).
CORRUPT_CASE_IDS: dict[str, int] = {c: _CORRUPT_BASE_ID + k for k, c in enumerate(CORRUPT_CASES)}


def _set_counts(ann: dict, fn) -> None:
    seg = next(s for s in ann["segmentations"] if s["mask_rles"])
    r = seg["mask_rles"][0]
    r["counts"] = fn(r["counts"], rle_codec.counts_from_string(r["counts"]))


def _corrupt(case: str, ann: dict) -> dict:
    """Apply one defect to a copy of ``ann`` (whose first segmentation has >= 2 tracks)."""
    a = copy.deepcopy(ann)
    h, w = a["image_size"]
    seg = next(s for s in a["segmentations"] if len(s["track_ids"]) >= 2)
    tids = a["all_track_ids"]
    if case == "rle_size_mismatch":
        seg["mask_rles"][0] = rle_codec.encode(np.zeros((h, w + 2), np.uint8))
    elif case == "rle_counts_short":
        _set_counts(a, lambda s, c: rle_codec.counts_to_string(c[:-1] + [c[-1] - 5]))
    elif case == "rle_counts_long":
        _set_counts(a, lambda s, c: rle_codec.counts_to_string(c[:-1] + [c[-1] + 7]))
    elif case == "rle_counts_bad_chars":
        _set_counts(a, lambda s, c: s[:3] + "~{" + s[3:])
    elif case == "rle_counts_truncated":
        _set_counts(a, lambda s, c: s + "h")  # 'h' has the continuation bit: ends mid-value
    elif case == "track_ids_vs_mask_rles":
        seg["mask_rles"].pop()
    elif case == "frame_track_id_unknown":
        seg["track_ids"][0] = max(tids) + 3
    elif case == "referral_id_unknown":
        a["object_referrals"][0]["track_ids"] = [tids[0], max(tids) + 4]
    elif case == "caption_id_unknown":
        a["caption_raw_en_gpt"] += f" [Something else]<mask_{max(tids) + 5}> appears."
        a["caption_parsed_en_gpt"] += " Something else appears."
    elif case == "caption_tag_malformed":
        a["caption_raw_en_gpt"] = a["caption_raw_en_gpt"].replace("]<", "] <", 1)
    elif case == "caption_tag_no_prefix":
        a["caption_raw_en"] = a["caption_raw_en"].replace("<mask_", "<", 1).replace("<mask", "<", 1)
    elif case == "caption_tag_unbalanced":
        a["caption_raw_en_gpt"] = a["caption_raw_en_gpt"].replace("]", "", 1)
    elif case == "caption_tag_unclosed_id":
        a["caption_raw_en"] = a["caption_raw_en"].split(">")[0]
    elif case == "missing_key":
        del a["all_track_ids"]
    elif case == "missing_frame_key":
        del seg["is_gt"]
    elif case == "wrong_type":
        a["video_id"] = str(a["video_id"])
    elif case == "image_size_malformed":
        a["image_size"] = [h, w, 3]
    return a


def write_vicas_corrupt_corpus(root: str | os.PathLike, n_valid: int = 2,
                               seed: int = 0) -> dict[str, str]:
    """Write ``n_valid`` valid videos (exactly as :func:`write_vicas_sample_dataset` with the
    same ``seed``) plus one single-defect video per :data:`CORRUPT_CASES` entry, all in
    ``v1.0``; the corrupt ones are listed in the ``train`` split. Returns ``{case: check}``;
    :data:`CORRUPT_CASE_IDS` gives each case's video id."""
    root = Path(root)
    info = write_vicas_sample_dataset(root, n_videos=n_valid, seed=seed)
    videos = _make_videos(max(n_valid, 2), seed)
    base, frames = next((a, f) for a, f in videos
                        if any(len(s["track_ids"]) >= 2 for s in a["segmentations"]))
    train = [v for v, i in info.items() if i["split"] == "train"]
    for case, vid in CORRUPT_CASE_IDS.items():
        train.append(vid)
        if case == "annotation_missing":
            continue
        a = _corrupt(case, base)
        if isinstance(a.get("video_id"), int):
            a["video_id"] = vid
        a["filename"] = f"{vid:06d}_" + base["filename"].split("_", 1)[1]
        if case == "file_name_vs_video_id":
            a["video_id"] = vid + 50  # the file says vid
        path = write_vicas_video(root, a, frames, json_name=f"{vid:06d}.json")
        fdir = root / "video_frames" / path.stem.split("_")[0]  # the file's id
        if case == "missing_frames":
            (fdir / "00003.jpg").unlink()
        elif case == "extra_frame":
            Image.fromarray(frames[-1]).save(fdir / f"{len(frames):05d}.jpg", quality=95)
        elif case == "frame_wrong_size":
            Image.fromarray(frames[2][:-2]).save(fdir / "00002.jpg", quality=95)
        elif case == "truncated_json":
            text = path.read_bytes()
            path.write_bytes(text[: len(text) // 2])
    splits = {s: [v for v, i in info.items() if i["split"] == s] for s in _SPLITS}
    splits["train"] = train
    _write_splits(root, "v1.0", splits)
    return dict(CORRUPT_CASES)
