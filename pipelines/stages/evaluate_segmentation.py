"""``evaluate.panoptic`` and ``evaluate.vicas``: segmentation predictions scored against a curated
table, with the numbers the official scorers print.

``evaluate.panoptic`` (``needs:`` the ``curate.pancap`` stage)::

    pq: {uses: evaluate.panoptic, needs: [pancap], with: {predictions: /preds/predictions.json}}

* **Ground truth**: the curated table of the needed stage, at the version it recorded: per image
  the original panoptic PNG bytes and its ``segments`` (id, category_id, iscrowd, isthing, area).
* **Predictions**: a COCO-panoptic JSON (``{"annotations": [{"image_id", "file_name",
  "segments_info": [{"id", "category_id"}, ...]}, ...]}``) and its RGB id PNGs in the folder
  panopticapi expects: ``predictions.json`` -> ``predictions/<file_name>`` (``with.png_folder``
  overrides). Local paths or ``s3://``.
* **Categories**: those of the ground-truth segments (isthing from the curated rows). panopticapi
  takes them from the GT JSON's ``categories``; the numbers agree whenever the predictions use only
  categories the curated images contain (categories with no TP, FP or FN are skipped in both).
  ``with.categories`` (the dataset's panoptic JSON, or a JSON list of categories) gives the full
  table instead, so a category only the predictions use counts (PQ 0), exactly as panopticapi.
* **Metrics** (×100, :mod:`vgen_core.eval.panoptic_quality`, panopticapi's algorithm to the
  printed digit): ``PQ SQ RQ`` (All), ``PQ_th SQ_th RQ_th`` (Things), ``PQ_st SQ_st RQ_st``
  (Stuff), detectron2's names. A group without any counted category is left out (panopticapi
  divides by zero there). Per category: ``PQ/<id>``, ``SQ/<id>``, ``RQ/<id>`` rows in the
  ``<dag>/<stage>__per_class`` results table (details: name, isthing, TP, FP, FN) and the MLflow
  artifact ``pq_per_class.json``; panopticapi's printed table is the artifact ``pq_table.txt``.

``evaluate.vicas`` (``needs:`` the ``curate.vicas`` stage)::

    lgvis: {uses: evaluate.vicas, needs: [vicas], with: {predictions: /preds/lgvis/}}

* **Predictions**: a folder of ``<video_id:06d>.json`` files in the official format
  (``{"video_id", "pred_lgvis_masks": [[{"filename", "mask_rles": [RLE, ...]}, ...], ...]}``,
  one entry per ``object_referrals`` item in order, one dict per GT frame; other keys such as
  ``pred_caption`` are ignored). JSON files not named like a video id are ignored.
* **Metrics** (×100, :mod:`vgen_core.eval.track_map`, the official ``TrackMAP``):
  ``track_mAP`` (mean over IoU 0.50:0.05:0.95), ``track_AP50``, ``track_AP75``, ``track_AP90``.

**Both.** Every curated sample needs a prediction, and a prediction for an id the curated table
does not hold (image_id, video id, category_id) is an error, as is a file that does not parse:
the message names the stage, the field (``with.predictions``), the file and the id. That the
predictions exist and can be read is checked before anything runs (``check_config``: ``vgen run``
exits 2). The work (PNG decoding and matching, RLE decoding) runs on the stage executor's actor
pool, ``resources.batch_size`` images / videos per call, one batch in the driver; sums are merged
on the driver in id order, so the numbers do not depend on the number of actors. Results: the
``<dag>/<stage>`` results table, MLflow metrics on the stage run, lineage tags
(``vgen.lineage.curated.*``: the curated table and version; ``vgen.lineage.predictions.*``)
and ``evaluation.json``. The row fingerprint covers the predictions' content (JSON digest, size
and mtime / ETag of every PNG or per-video file), so new predictions at the same path re-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator
from typing import Any, TypeGuard

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from vgen_core.data.fsio import file_digest, filesystem_for

from .base import (Counts, InProcessExecutor, JobStage, OutputRef, StageConfig, StageError,
                   StageResult, root_problem)
from .evaluate_generation import _flat
from .results import write_results

__all__ = ["EvaluatePanopticConfig", "EvaluatePanoptic", "EvaluateViCaSConfig", "EvaluateViCaS",
           "default_png_folder"]

log = logging.getLogger("vgen.evaluate")

PQ_GROUPS = (("All", ""), ("Things", "_th"), ("Stuff", "_st"))
TRACK_METRICS = (("mAP", "track_mAP"), ("AP@50", "track_AP50"), ("AP@75", "track_AP75"),
                 ("AP@90", "track_AP90"))


class _PredictionError(Exception):
    """A prediction that cannot be scored; the message names the file and the id."""


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _preview(ids: Any, limit: int = 8) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids)} in all)"
                                                if len(ids) > limit else "")


def _read_json(uri: str) -> Any:
    """A JSON file (local or remote); _PredictionError naming it when missing or unparseable."""
    fs, path = filesystem_for(uri)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise _PredictionError(f"{uri} does not exist") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _PredictionError(f"{uri} does not parse as JSON: {e}") from None


def _listing_stamp(uri: str, suffix: str, maxdepth: int | None = None) -> str:
    """Digest of (relative path, size, mtime / ETag) of the files under ``uri`` ending in
    ``suffix``: cheap (a listing, no reads), changes when a file is rewritten."""
    fs, path = filesystem_for(uri)
    try:
        found = fs.find(path, maxdepth=maxdepth, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(found):
        if p.endswith(suffix):
            info = found[p]
            stamp = (info.get("ETag") or info.get("mtime") or info.get("LastModified")
                     or info.get("created"))
            h.update(json.dumps([p[len(path):], info.get("size"), str(stamp)]).encode())
    return h.hexdigest()


def _digest_or_missing(uri: str | None) -> str | None:
    if not uri:
        return None
    try:
        return file_digest(uri)
    except (FileNotFoundError, IsADirectoryError):
        return "missing"


def default_png_folder(predictions: str) -> str | None:
    """panopticapi's PNG folder of a prediction JSON: ``x/predictions.json`` -> ``x/predictions``
    (None when the name does not end in ``.json``)."""
    return predictions[: -len(".json")] if predictions.endswith(".json") else None


class _SegEval(JobStage):
    """Shared body: the curated input, the error format, results and MLflow records."""

    needs_range = (1, 1)
    #: columns the curated table must have (the upstream is the right curate kind)
    gt_columns: tuple[str, ...] = ()
    upstream_kind: str = ""

    def _where(self) -> str:
        return f"stage '{self.ctx.stage}'"

    def _bad(self, msg: str, field: str = "predictions") -> StageError:
        return StageError(f"{self._where()}: field 'with.{field}': {msg}")

    def _curated(self) -> tuple[str, OutputRef]:
        found = [(u, outs["samples"]) for u, outs in self.ctx.inputs.items() if "samples" in outs]
        if len(found) != 1:
            raise StageError(f"{self._where()}: needs exactly one {self.upstream_kind} stage "
                             f"(`needs: [<its name>]`), found {len(found)} curated tables")
        up, ref = found[0]
        names = set(self.ctx.store.schema(ref.name).names)
        missing = [c for c in self.gt_columns if c not in names]
        if missing:
            raise StageError(f"{self._where()}: '{up}' is not a {self.upstream_kind} stage: its "
                             f"table {ref.uri} lacks {', '.join(missing)}; `needs:` the "
                             f"{self.upstream_kind} stage whose samples the predictions are for")
        return up, ref

    def _batches(self, source: OutputRef, cols: list[str]) -> tuple[Any, Any, int, int]:
        """(make_ds, local_batches, batch_size, number of batches) over the curated table."""
        store = self.ctx.store
        size = int(getattr(self.ctx.resources, "batch_size", 16) or 16)
        n = store.read(source.name, version=source.version, columns=[]).num_rows

        def make_ds():
            import ray.data

            return ray.data.read_delta(source.uri, version=source.version, columns=cols,
                                       storage_options=store.worker_storage_options() or None)

        def local() -> Iterator[pa.Table]:
            for rb in store.iter_batches(source.name, version=source.version, columns=cols,
                                         batch_size=size):
                yield pa.Table.from_batches([rb])

        return make_ds, local, size, max(1, math.ceil(n / size))

    def _raise_first_error(self, rows: pa.Table, key: str, what: str, prefix: str = "") -> None:
        errors = rows.filter(pc.is_valid(rows["error"]))
        if not errors.num_rows:
            return
        errors = errors.sort_by(key)
        first = errors["error"][0].as_py()
        more = len(set(errors[key].to_pylist())) - 1
        raise self._bad(prefix + first
                        + (f" (and {more} more {what} with problems)" if more else ""))

    def _record(self, metrics: dict[str, float], n: int, lineage: dict[str, Any],
                details: dict[str, Any], kind: str) -> StageResult:
        """Results table + MLflow tags and ``evaluation.json``; the runner logs the metrics."""
        store, tracker = self.ctx.store, self.ctx.tracker
        details = {"lineage": lineage, **details}
        tracker.log_dict(details, "evaluation.json")
        tracker.set_tags({"vgen.eval.kind": kind,
                          **{f"vgen.lineage.{k}": v for k, v in _flat(lineage).items()}})
        name = self.table_name()
        version = write_results(store, name, stage=self.ctx.stage,
                                fingerprint=self.ctx.row_fingerprint, metrics=metrics,
                                num_samples=n, details={"lineage": lineage})
        return StageResult(outputs={"results": OutputRef("table", name, store.uri(name),
                                                         version=version)},
                           counts=Counts(processed=n), metrics=dict(metrics))

    @staticmethod
    def _lineage(up: str, source: OutputRef, **predictions: Any) -> dict[str, Any]:
        return {"curated": {"stage": up, "uri": source.uri, "version": source.version},
                "predictions": predictions}


# ---------------------------------------------------------------------------------------------
# evaluate.panoptic
# ---------------------------------------------------------------------------------------------


class EvaluatePanopticConfig(StageConfig):
    predictions: str = Field(..., description="COCO-panoptic prediction JSON (local or s3://); "
                             "its PNGs in the folder of the same name without .json")
    png_folder: str | None = Field(None, description="folder of the prediction PNGs (default: "
                                   "the predictions path without .json, as panopticapi)")
    categories: str | None = Field(None, description="panoptic JSON (or JSON list) whose "
                                   "categories to average over (default: the categories of the "
                                   "curated ground truth)")


_PQ_ROWS = pa.schema([("image_id", pa.int64()), ("category_id", pa.int64()),
                      ("iou", pa.float64()), ("tp", pa.int64()), ("fp", pa.int64()),
                      ("fn", pa.int64()), ("error", pa.string())])


class _PanopticActor:
    """Per image: decode the GT and predicted PNGs, match (panopticapi); per category sums."""

    def __init__(self, preds: dict[int, dict], png_folder: str, categories: dict[int, dict]):
        self.preds, self.categories = preds, categories
        self.folder = png_folder.rstrip("/")
        self.fs, self.path = filesystem_for(self.folder)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for sid, image_id, segments, png in zip(
                batch["sample_id"].to_pylist(), batch["image_id"].to_pylist(),
                batch["segments"].to_pylist(), batch["panoptic_png"].to_pylist()):
            try:
                stat = self._image(sid, image_id, segments, png)
            except _PredictionError as e:
                rows.append({"image_id": image_id, "category_id": -1, "iou": 0.0, "tp": 0,
                             "fp": 0, "fn": 0, "error": str(e)})
                continue
            for cid, c in sorted(stat.pq_per_cat.items()):
                rows.append({"image_id": image_id, "category_id": cid, "iou": c.iou, "tp": c.tp,
                             "fp": c.fp, "fn": c.fn, "error": None})
        return pa.Table.from_pylist(rows, schema=_PQ_ROWS)

    def _image(self, sid: str, image_id: int, segments: list[dict], png: bytes):
        from vgen_core.data.panoptic import PanopticPNGError, read_id_png
        from vgen_core.eval.panoptic_quality import pq_compute

        pred = self.preds[image_id]
        uri = f"{self.folder}/{pred['file_name']}"
        try:
            data = self.fs.cat_file(f"{self.path.rstrip('/')}/{pred['file_name']}")
        except FileNotFoundError:
            raise _PredictionError(f"image_id {image_id}: its PNG {uri} (file_name "
                                   f"{pred['file_name']!r}) does not exist") from None
        try:
            pred_ids = read_id_png(data, source=uri)
        except PanopticPNGError as e:
            raise _PredictionError(f"image_id {image_id}: {e}") from None
        gt_ids = read_id_png(png, source=sid)  # validated when it was curated
        if pred_ids.shape != gt_ids.shape:
            raise _PredictionError(
                f"image_id {image_id}: {uri} is {pred_ids.shape[1]}x{pred_ids.shape[0]} (WxH) "
                f"but the image is {gt_ids.shape[1]}x{gt_ids.shape[0]}")
        gt_ann = {"image_id": image_id, "segments_info": [
            {"id": s["id"], "category_id": s["category_id"], "iscrowd": int(s["iscrowd"]),
             "area": s["area"]} for s in segments]}
        try:
            return pq_compute(gt_ann, pred, gt_ids, pred_ids, self.categories)
        except KeyError as e:  # panopticapi's PNG-vs-JSON consistency messages
            raise _PredictionError(f"{uri}: {e.args[0] if e.args else e}") from None


class EvaluatePanoptic(_SegEval):
    kind = "evaluate.panoptic"
    version = 1
    Config = EvaluatePanopticConfig
    file_fields = ("predictions", "categories")  # checked to exist before anything runs
    root_fields = ("png_folder",)
    gt_columns = ("image_id", "segments", "panoptic_png")
    upstream_kind = "curate.pancap"
    config: EvaluatePanopticConfig

    def png_folder(self) -> str | None:
        return self.config.png_folder or default_png_folder(self.config.predictions)

    def check_config(self) -> list[tuple[str, str]]:
        problems = super().check_config()
        if self.config.png_folder or any(f == "with.predictions" for f, _ in problems):
            return problems
        folder = self.png_folder()
        if folder is None:
            problems.append(("with.predictions", f"{self.config.predictions!r} does not end in "
                             ".json, so its PNG folder has no name (panopticapi: "
                             "predictions.json -> predictions/); rename it or set "
                             "with.png_folder"))
            return problems
        why = root_problem(folder)
        if why:
            problems.append(("with.predictions", f"the folder of its PNGs: {why}; panopticapi "
                             "reads the PNGs of predictions.json from predictions/ beside it "
                             "(or set with.png_folder)"))
        return problems

    def row_fingerprint_parts(self) -> dict[str, Any]:
        folder = self.png_folder()
        return {"predictions": _digest_or_missing(self.config.predictions),
                "pngs": _listing_stamp(folder, ".png") if folder else None,
                "categories": _digest_or_missing(self.config.categories)}

    # -- the run --------------------------------------------------------------------------
    def run(self, executor: Any = None) -> StageResult:
        from vgen_core.eval.panoptic_quality import PQStat, PQStatCat, format_results, pq_results

        executor = executor or InProcessExecutor()
        store, cfg = self.ctx.store, self.config
        up, source = self._curated()
        gt = store.read(source.name, version=source.version, columns=["image_id", "segments"])
        if not gt.num_rows:
            raise StageError(f"{self._where()}: the curated table {source.uri}@v{source.version} "
                             "is empty: nothing to score")
        categories, cat_source = self._categories(gt)
        preds = self._predictions(gt["image_id"].to_pylist(), categories, source)

        cols = ["sample_id", "image_id", "segments", "panoptic_png"]
        make_ds, local, size, n_batches = self._batches(source, cols)
        parts = list(executor.map_actors(
            _PanopticActor, (preds, self.png_folder(), categories), make_ds=make_ds,
            local_batches=local, batch_size=size, resources=self.ctx.resources,
            num_batches=n_batches))
        rows = pa.concat_tables([p for p in parts if p.num_rows] or [_PQ_ROWS.empty_table()])
        self._raise_first_error(rows, "image_id", "images", prefix=f"{cfg.predictions}: ")

        stat = PQStat()  # merged in (image_id, category_id) order: independent of the actors
        for r in rows.sort_by([("image_id", "ascending"), ("category_id", "ascending")]
                              ).to_pylist():
            stat.pq_per_cat[r["category_id"]] += PQStatCat(r["iou"], r["tp"], r["fp"], r["fn"])
        res = pq_results(stat, categories)
        metrics, notes = {}, {}
        for group, suffix in PQ_GROUPS:
            if res[group]["n"] == 0:
                notes[group] = "no category of this group has a TP, FP or FN: left out"
                continue
            for m in ("pq", "sq", "rq"):
                metrics[f"{m.upper()}{suffix}"] = 100.0 * res[group][m]
        per_class = self._per_class(stat, res, categories)
        n = gt.num_rows
        lineage = self._lineage(up, source, uri=cfg.predictions, png_folder=self.png_folder(),
                                digest=_digest_or_missing(cfg.predictions))
        details = {"images": n, "categories": cat_source, "notes": notes,
                   "groups": {g: res[g]["n"] for g, _ in PQ_GROUPS}}
        tracker = self.ctx.tracker
        tracker.log_text(format_results(res) + "\n", "pq_table.txt")
        tracker.log_dict({"categories": per_class}, "pq_per_class.json")
        result = self._record(metrics, n, lineage, details, "panoptic")
        name = self.table_name("__per_class")
        keyed = {f"{m}/{c['category_id']}": (c[m], c)
                 for c in per_class for m in ("PQ", "SQ", "RQ")}
        version = write_results(
            store, name, stage=self.ctx.stage, fingerprint=self.ctx.row_fingerprint,
            metrics={k: v for k, (v, _) in keyed.items()},
            row_details={k: c for k, (_, c) in keyed.items()}, num_samples=n,
            details={"lineage": lineage})
        result.outputs["per_class"] = OutputRef("table", name, store.uri(name), version=version)
        return result

    # -- pieces ---------------------------------------------------------------------------
    def _categories(self, gt: pa.Table) -> tuple[dict[int, dict], str]:
        """``{id: {id, isthing, name}}`` to average over, and where it came from."""
        in_gt: dict[int, bool] = {}
        for segs in gt["segments"].to_pylist():
            for s in segs:
                cid, thing = int(s["category_id"]), bool(s["isthing"])
                if in_gt.setdefault(cid, thing) != thing:
                    raise StageError(f"{self._where()}: category {cid} is a thing in some curated "
                                     "images and stuff in others; re-curate with one categories "
                                     "table")
        if not self.config.categories:
            return ({c: {"id": c, "isthing": int(t), "name": None}
                     for c, t in sorted(in_gt.items())}, "ground truth")
        uri = self.config.categories
        try:
            data = _read_json(uri)
        except _PredictionError as e:
            raise self._bad(str(e), "categories") from None
        cats = data.get("categories") if isinstance(data, dict) else data
        if not isinstance(cats, list) or not all(
                isinstance(c, dict) and _is_int(c.get("id")) for c in cats):
            raise self._bad(f"{uri}: expected a panoptic JSON with a 'categories' list (or a "
                            "JSON list) of {id, isthing, name} records", "categories")
        table = {int(c["id"]): {"id": int(c["id"]), "isthing": int(bool(c.get("isthing"))),
                                "name": c.get("name")} for c in cats}
        for cid, thing in sorted(in_gt.items()):
            if cid not in table:
                raise self._bad(f"{uri} has no category {cid}, which the curated ground truth "
                                f"uses; give the dataset's own panoptic JSON", "categories")
            if bool(table[cid]["isthing"]) != thing:
                raise self._bad(f"{uri}: category {cid} has isthing={table[cid]['isthing']} but "
                                f"the curated ground truth says {int(thing)}", "categories")
        return table, uri

    def _predictions(self, gt_image_ids: list[int], categories: dict[int, dict],
                     source: OutputRef) -> dict[int, dict]:
        """The prediction JSON, checked against the ground truth: ``{image_id: annotation}``."""
        uri = self.config.predictions
        try:
            data = _read_json(uri)
        except _PredictionError as e:
            raise self._bad(str(e)) from None
        anns = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(anns, list):
            raise self._bad(f"{uri}: expected a COCO-panoptic prediction JSON, an object with an "
                            "'annotations' list, got " + (f"keys {sorted(data)[:8]}"
                                                         if isinstance(data, dict)
                                                         else type(data).__name__))
        known = set(gt_image_ids)
        out: dict[int, dict] = {}
        for k, ann in enumerate(anns):
            at = f"{uri}: annotations[{k}]"
            if not isinstance(ann, dict):
                raise self._bad(f"{at} is a {type(ann).__name__}, not an object")
            iid = ann.get("image_id")
            if not _is_int(iid):
                raise self._bad(f"{at} has image_id {iid!r}; expected an integer image id")
            iid = int(iid)
            if iid not in known:
                raise self._bad(
                    f"{at} has image_id {iid}, which the ground truth does not hold: the curated "
                    f"table {source.uri}@v{source.version} has images {_preview(known)}; "
                    "predict exactly the curated images (samples the curate stage quarantined "
                    "or filtered out are not in it)")
            if iid in out:
                raise self._bad(f"{at}: a second annotation for image_id {iid}")
            fname = ann.get("file_name")
            if not isinstance(fname, str) or not fname:
                raise self._bad(f"{at} (image_id {iid}) has no file_name naming its PNG")
            segs = ann.get("segments_info")
            if not isinstance(segs, list):
                raise self._bad(f"{at} (image_id {iid}) has no segments_info list")
            out[iid] = {"image_id": iid, "file_name": fname,
                        "segments_info": self._segments(segs, at, iid, categories)}
        missing = known - set(out)
        if missing:
            raise self._bad(f"{uri} has no annotation for image_id {_preview(missing)} of the "
                            f"curated table {source.uri}@v{source.version}; every curated image "
                            "needs a prediction (panopticapi: 'no prediction for the image')")
        return out

    def _segments(self, segs: list, at: str, iid: int, categories: dict[int, dict]
                  ) -> list[dict]:
        seen: set[int] = set()
        clean = []
        for j, s in enumerate(segs):
            sid = s.get("id") if isinstance(s, dict) else None
            cid = s.get("category_id") if isinstance(s, dict) else None
            where = f"{at} (image_id {iid}) segments_info[{j}]"
            if not _is_int(sid) or sid <= 0:
                raise self._bad(f"{where} has id {sid!r}; expected an integer > 0 (0 is VOID, "
                                "the unlabelled pixels of the PNG)")
            if sid in seen:
                raise self._bad(f"{where}: segment id {sid} appears twice")
            seen.add(int(sid))
            if not _is_int(cid) or int(cid) not in categories:
                hint = ("not in with.categories" if self.config.categories else
                        "not a category of the curated ground truth; set with.categories to the "
                        "dataset's panoptic JSON to score categories its images do not contain, "
                        "as panopticapi does")
                raise self._bad(f"{where} (id {sid}) has category_id {cid!r}: {hint} "
                                f"(categories: {_preview(categories)})")
            clean.append({"id": int(sid), "category_id": int(cid)})
        return clean

    @staticmethod
    def _per_class(stat: Any, res: dict[str, Any], categories: dict[int, dict]
                   ) -> list[dict[str, Any]]:
        """Counted categories (TP + FP + FN > 0): PQ / SQ / RQ ×100 and the sums behind them."""
        out = []
        for cid, vals in sorted(res["per_class"].items()):
            c = stat.pq_per_cat.get(cid)
            if c is None or c.tp + c.fp + c.fn == 0:
                continue
            info = categories[cid]
            out.append({"category_id": cid, "name": info.get("name"),
                        "isthing": bool(info["isthing"]), "PQ": 100.0 * vals["pq"],
                        "SQ": 100.0 * vals["sq"], "RQ": 100.0 * vals["rq"], "tp": c.tp,
                        "fp": c.fp, "fn": c.fn, "iou_sum": c.iou})
        return out


# ---------------------------------------------------------------------------------------------
# evaluate.vicas
# ---------------------------------------------------------------------------------------------


class EvaluateViCaSConfig(StageConfig):
    predictions: str = Field(..., description="folder (local or s3://) of per-video "
                             "<video_id:06d>.json LG-VIS predictions in the official format")


_TRACK_ROWS = pa.schema([("video_id", pa.int64()), ("referral", pa.int32()),
                         ("num_pred", pa.int32()), ("num_gt", pa.int32()),
                         ("match", pa.binary()), ("scores", pa.binary()),
                         ("error", pa.string())])


def _check_vicas_prediction(pred: Any, video_id: int, num_referrals: int, uri: str) -> None:
    """The shape of one official prediction file, with messages naming the file and the id."""
    if not isinstance(pred, dict):
        raise _PredictionError(f"{uri}: expected an object with 'pred_lgvis_masks', got a "
                               f"{type(pred).__name__}")
    if "video_id" in pred and pred["video_id"] != video_id:
        raise _PredictionError(f"{uri}: video_id {pred['video_id']!r} in the file, but its name "
                               f"says video {video_id}")
    refs = pred.get("pred_lgvis_masks")
    if not isinstance(refs, list):
        raise _PredictionError(f"{uri} (video {video_id}) has no 'pred_lgvis_masks' list")
    if len(refs) != num_referrals:
        raise _PredictionError(f"{uri}: pred_lgvis_masks has {len(refs)} entries but video "
                               f"{video_id} has {num_referrals} object_referrals (one entry per "
                               "referral, in order)")
    for i, frames in enumerate(refs):
        if not isinstance(frames, list):
            raise _PredictionError(f"{uri}: pred_lgvis_masks[{i}] (video {video_id}) is not a "
                                   "list of per-frame {filename, mask_rles}")
        for t, fr in enumerate(frames):
            ok = (isinstance(fr, dict) and isinstance(fr.get("filename"), str)
                  and isinstance(fr.get("mask_rles"), list)
                  and all(isinstance(r, dict) and "size" in r and "counts" in r
                          for r in fr["mask_rles"]))
            if not ok:
                raise _PredictionError(f"{uri}: pred_lgvis_masks[{i}][{t}] (video {video_id}) "
                                       "is not {filename: str, mask_rles: [{size, counts}, ...]}")


class _TrackActor:
    """Per video: read its prediction file, match every referral (official ``TrackMAP``)."""

    def __init__(self, files: dict[int, str]):
        self.files = files

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for vid, h, w, segs, refs in zip(
                batch["video_id"].to_pylist(), batch["height"].to_pylist(),
                batch["width"].to_pylist(), batch["segmentations"].to_pylist(),
                batch["referrals"].to_pylist()):
            try:
                results = self._video(vid, h, w, segs, refs)
            except _PredictionError as e:
                rows.append({"video_id": vid, "referral": -1, "num_pred": 0, "num_gt": 0,
                             "match": b"", "scores": b"", "error": str(e)})
                continue
            for r in results:
                rows.append({"video_id": vid, "referral": r.referral,
                             "num_pred": int(r.scores.size), "num_gt": int(r.num_gt),
                             "match": r.match_indices.astype("<i4").tobytes(),
                             "scores": r.scores.astype("<f4").tobytes(), "error": None})
        return pa.Table.from_pylist(rows, schema=_TRACK_ROWS)

    def _video(self, vid: int, h: int, w: int, segs: list[dict], refs: list[dict]) -> list:
        from vgen_core.eval.track_map import TrackMAP, referral_tracks

        uri = self.files[vid]
        pred = _read_json(uri)
        _check_vicas_prediction(pred, vid, len(refs), uri)
        gt = {"video_id": vid, "image_size": [h, w], "segmentations": segs,
              "object_referrals": refs}
        try:
            pairs = referral_tracks(pred, gt)  # official parsing: GT frames, ragged frames
        except (ValueError, KeyError, TypeError) as e:
            raise _PredictionError(f"{uri}: {e}") from None
        metric = TrackMAP()
        for k, (pred_tracks, gt_tracks) in enumerate(pairs):
            try:
                metric.add_referral(pred_tracks, gt_tracks, image_size=[h, w], video_id=vid,
                                    referral=k)
            except ValueError as e:  # RLEError: the prediction's masks (GT was curated)
                raise _PredictionError(f"{uri}: pred_lgvis_masks[{k}] (video {vid}): {e}"
                                       ) from None
        return metric.results


class EvaluateViCaS(_SegEval):
    kind = "evaluate.vicas"
    version = 1
    Config = EvaluateViCaSConfig
    root_fields = ("predictions",)  # checked to exist before anything runs
    gt_columns = ("video_id", "segmentations", "referrals")
    upstream_kind = "curate.vicas"
    config: EvaluateViCaSConfig

    def check_config(self) -> list[tuple[str, str]]:
        problems = super().check_config()
        if not problems:
            fs, path = filesystem_for(self.config.predictions)
            try:
                is_dir = fs.isdir(path)
            except Exception as e:  # credentials, endpoint: reported like root_problem's
                is_dir, problems = True, [("with.predictions", f"cannot be reached: {e}")]
            if not is_dir:
                problems.append(("with.predictions", f"{self.config.predictions!r} is a file; give "
                                 "the folder of per-video <video_id:06d>.json predictions"))
        return problems

    def row_fingerprint_parts(self) -> dict[str, Any]:
        return {"predictions": _listing_stamp(self.config.predictions, ".json", maxdepth=1)}

    def run(self, executor: Any = None) -> StageResult:
        from vgen_core.eval.track_map import THRESHOLDS, ReferralResult, TrackMAP

        executor = executor or InProcessExecutor()
        store = self.ctx.store
        up, source = self._curated()
        video_ids = store.read(source.name, version=source.version,
                               columns=["video_id"])["video_id"].to_pylist()
        if not video_ids:
            raise StageError(f"{self._where()}: the curated table {source.uri}@v{source.version} "
                             "is empty: nothing to score")
        files, ignored = self._prediction_files(set(video_ids), source)
        cols = ["video_id", "height", "width", "segmentations", "referrals"]
        make_ds, local, size, n_batches = self._batches(source, cols)
        parts = list(executor.map_actors(
            _TrackActor, (files,), make_ds=make_ds, local_batches=local, batch_size=size,
            resources=self.ctx.resources, num_batches=n_batches))
        rows = pa.concat_tables([p for p in parts if p.num_rows] or [_TRACK_ROWS.empty_table()])
        self._raise_first_error(rows, "video_id", "videos")

        metric = TrackMAP()
        k = len(THRESHOLDS)
        for r in rows.to_pylist():
            metric.results.append(ReferralResult(
                np.frombuffer(r["match"], "<i4").reshape(k, r["num_pred"]).astype(np.int32),
                np.frombuffer(r["scores"], "<f4").astype(np.float32), r["num_gt"],
                r["video_id"], r["referral"]))
        scores = metric.compute()  # pooled in (video_id, referral) order, as the official
        metrics = {name: float(scores[key]) for key, name in TRACK_METRICS}
        n = len(video_ids)
        details = {"videos": n, "referrals": rows.num_rows,
                   "gt_tracks": int(pc.sum(rows["num_gt"]).as_py() or 0),
                   "predicted_tracks": int(pc.sum(rows["num_pred"]).as_py() or 0),
                   "ignored_files": ignored[:20]}
        lineage = self._lineage(up, source, uri=self.config.predictions,
                                listing=self.row_fingerprint_parts()["predictions"])
        return self._record(metrics, n, lineage, details, "vicas")

    def _prediction_files(self, gt_ids: set[int], source: OutputRef
                          ) -> tuple[dict[int, str], list[str]]:
        """``{video_id: file uri}`` for every curated video, and the JSON files ignored."""
        uri = self.config.predictions.rstrip("/")
        fs, path = filesystem_for(uri)
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            raise self._bad(f"{uri} does not exist") from None
        files: dict[int, str] = {}
        ignored: list[str] = []
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") != "file" or not name.endswith(".json"):
                continue
            m = re.fullmatch(r"(\d+)\.json", name)
            if not m:
                ignored.append(name)
                continue
            vid = int(m.group(1))
            if vid not in gt_ids:
                raise self._bad(
                    f"{uri}/{name} is for video id {vid}, which the ground truth does not hold: "
                    f"the curated table {source.uri}@v{source.version} has videos "
                    f"{_preview(gt_ids)}; predict exactly the curated videos (samples the "
                    "curate stage quarantined or filtered out are not in it)")
            if name != f"{vid:06d}.json":
                raise self._bad(f"{uri}/{name}: name it {vid:06d}.json, as the official scorer "
                                "reads it")
            files[vid] = f"{uri}/{name}"
        if ignored:
            log.warning("%s: ignored %d JSON files not named <video_id:06d>.json in %s: %s",
                        self._where(), len(ignored), uri, ", ".join(sorted(ignored)[:5]))
        missing = gt_ids - set(files)
        if missing:
            raise self._bad(f"{uri} has no prediction file for video {_preview(missing)} of the "
                            f"curated table {source.uri}@v{source.version}; every curated video "
                            "needs <video_id:06d>.json (official: 'No prediction file found')")
        return files, sorted(ignored)
