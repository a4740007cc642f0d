"""``curate.pancap`` and ``curate.vicas``: real-format dataset folders -> curated Delta tables.

The driver lists work items cheaply (:func:`vgen_core.formats.pancap.list_pancap`,
:func:`vgen_core.formats.vicas.list_vicas`); a Ray Data actor pool reads and validates each
sample; a :class:`~vgen_core.formats.SampleError` becomes a quarantine row naming the check, the
file and what was wrong. Listing errors are reported the same way and do not stop the stage
(short of the error budget): a listing that fails as a whole (a truncated split JSON, an
unreadable caption archive, any exception) is one work item quarantined with check ``listing``
(or the SampleError's check) and the exception; an item the listing returns that cannot be used
(no string ``sample_id``, not serialisable) is quarantined alone, naming its position and id.
That ``root`` exists is checked before anything runs (``Stage.check_config``); a root that is
not there is a configuration error, never quarantined. Valid samples then pass the configured
filters (a sample that fails a filter is recorded with check ``filter:<name>``, not counted
against the error budget). One row per image / video, upserted by ``sample_id``; unchanged
samples are not rewritten.

After the last chunk the stage logs dataset statistics to MLflow (means as metrics, histograms as
images) and reports near-duplicate images (64-bit dHash within ``near_duplicate_distance`` bits;
the first frame for videos) as metrics and a JSON artifact.

``root: sample://`` writes the built-in sample dataset (real layout, skimage photographs with
Felzenszwalb masks and grounded captions) under ``<storage>/raw/`` on first use and reads it like
any user download.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import Field

from vgen_core.data.phash import dhash, near_duplicates
from vgen_core.formats import SampleError

from .base import (BatchResult, FILTER_PREFIX, SourceStage, StageConfig, StageError,
                   first_file, quarantine_record, root_problem)

SAMPLE_SCHEME = "sample://"


class _CurateConfig(StageConfig):
    root: str = Field(SAMPLE_SCHEME, description="dataset top folder / s3:// URL, or sample://")
    split: str | None = None
    min_caption_words: int = Field(0, ge=0)
    min_grounded_coverage: float = Field(0.0, ge=0, le=1)
    near_duplicate_distance: int = Field(6, ge=-1, le=64, description="-1 disables")
    sample_size: int = Field(6, ge=1, le=64, description="items of the sample:// dataset")


class CuratePanCapConfig(_CurateConfig):
    min_segments: int = Field(0, ge=0)
    max_segments: int | None = Field(None, ge=1)


class CurateViCaSConfig(_CurateConfig):
    version: str = "v1.0"
    min_tracks: int = Field(0, ge=0)
    min_frames: int = Field(0, ge=0)


class _Curate(SourceStage):
    """Shared body; subclasses give the reader functions, schema, stats and filters."""

    dataset: str
    #: the layout ``root`` should hold, for the message when it holds nothing
    layout: str
    config: _CurateConfig

    def check_config(self) -> list[tuple[str, str]]:
        """Besides the root existing (:meth:`Stage.check_config`): it holds at least one file.
        An empty folder is a configuration mistake (a wrong path, a download not unpacked yet),
        reported before anything runs; a folder with files in the wrong layout is still a
        listing problem, quarantined (module docs)."""
        problems = super().check_config()
        root = self.config.root
        if problems or root.startswith(SAMPLE_SCHEME) or first_file(root):
            return problems
        return problems + [("with.root", f"{root!r} is empty; expected the {self.dataset} "
                            f"dataset's top folder ({self.layout}): point with.root at it "
                            "(local or s3://), or use sample:// for the built-in sample")]

    def _root(self) -> str:
        root = self.config.root
        if root.startswith(SAMPLE_SCHEME):
            return self._sample_root()
        return root

    def _sample_root(self) -> str:
        store = self.ctx.store
        base = store.root if store.scheme == "file" else os.path.expanduser("~/.cache/vgen")
        path = os.path.join(base, "raw", f"{self.dataset}-sample-{self.config.sample_size}")
        marker = os.path.join(path, ".complete")
        if not os.path.exists(marker):
            self._write_sample(path)
            open(marker, "w").close()
        return path

    # subclass hooks -------------------------------------------------------------------
    def _write_sample(self, path: str) -> None:
        raise NotImplementedError

    def _list(self, root: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _read(self, item: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _filters(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        raise NotImplementedError

    def _first_image(self, row: dict[str, Any]) -> bytes | None:
        raise NotImplementedError

    def _stats(self, table: pa.Table) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # driver ---------------------------------------------------------------------------
    def _items(self) -> list[dict[str, Any]]:
        """The listing. A listing-level defect (e.g. a truncated split JSON: a SampleError, or
        any other exception) becomes one work item quarantined with its reason, and an unusable
        item just that item's, so they are reported like any bad sample (module docs)."""
        if not hasattr(self, "_cached_items"):
            root = self.config.root
            why = root_problem(root)  # a root that is not there is a config error, not data
            if why:
                raise StageError(f"stage '{self.ctx.stage}': with.root: {why}; point it at the "
                                 "dataset's top folder (local or s3://), or use sample://")
            try:
                raw = self._list(self._root())
            except SampleError as e:
                raw = [self._listing_error(f"{self.dataset}/_listing", e.check, e.reason,
                                           e.source, stamp=str(e))]
            except Exception as e:
                raw = [self._listing_error(
                    f"{self.dataset}/_listing", "listing",
                    f"listing the dataset under {root} failed: {type(e).__name__}: {e}", root)]
            self._cached_items, self._records = self._checked_items(raw)
        return self._cached_items

    def _listing_error(self, sample_id: str, check: str, reason: str, source: str | None,
                       stamp: str | None = None) -> dict[str, Any]:
        return {"sample_id": sample_id, "stamp": stamp or f"{check}: {reason}",
                "listing_error": {"check": check, "reason": reason, "source": source}}

    def _checked_items(self, raw: Any) -> tuple[list[dict[str, Any]], list[str]]:
        """Each listed item with its JSON record; an item that has no string ``sample_id`` or
        does not serialise is replaced by a listing-error item naming it (the others go on)."""
        items, records = [], []
        for k, item in enumerate(raw):
            sid = item.get("sample_id") if isinstance(item, dict) else None
            try:
                if not isinstance(item, dict):
                    raise TypeError(f"expected a dict, got {type(item).__name__}")
                if not isinstance(sid, str) or not sid:
                    raise ValueError(f"no string 'sample_id' (got {sid!r})")
                record = json.dumps(item, default=str, sort_keys=True)
            except Exception as e:
                name = sid if isinstance(sid, str) and sid else f"{self.dataset}/_listing-{k}"
                item = self._listing_error(
                    name, "listing", f"listed item {k} ({sid!r}) under {self.config.root} "
                    f"cannot be used: {type(e).__name__}: {e}", self.config.root)
                record = json.dumps(item, default=str, sort_keys=True)
            items.append(item)
            records.append(record)
        return items, records

    def source_fingerprint(self) -> dict[str, Any]:
        from vgen_core.data import content_digest

        listing = [(i["sample_id"], i.get("stamp")) for i in self._items()]
        return {"listing": content_digest(listing)}

    def list_items(self) -> pa.Table:
        items = self._items()
        records = self._records
        return pa.table(
            {
                "sample_id": [i["sample_id"] for i in items],
                "item": records,
                "sample_ids": [[i["sample_id"]] for i in items],
                # the whole listing record (annotation, file sizes and mtimes) is the item's stamp
                "item_key": [i["sample_id"] for i in items],
                "item_stamp": [
                    hashlib.blake2b(r.encode(), digest_size=16).hexdigest() for r in records
                ],
            }
        )

    # worker ---------------------------------------------------------------------------
    def process_batch(self, batch: pa.Table) -> BatchResult:
        rows, quarantine = [], []
        for sid, raw in zip(batch["sample_id"].to_pylist(), batch["item"].to_pylist()):
            item = json.loads(raw)
            if "listing_error" in item:
                err = item["listing_error"]
                quarantine.append(
                    quarantine_record(sid, err["check"], err["reason"], source=err["source"])
                )
                continue
            try:
                row = self._read(item)
            except SampleError as e:
                quarantine.append(
                    quarantine_record(sid, e.check, e.reason, source=e.source or item.get("source"))
                )
                continue
            failed = self._filters(row)
            if failed:
                name, why = failed[0]
                quarantine.append(
                    quarantine_record(
                        sid,
                        FILTER_PREFIX + name,
                        why,
                        content_digest=row["content_digest"],
                        source=row.get("source"),
                    )
                )
                continue
            img = self._first_image(row)
            row["phash"] = dhash(_decode_rgb(img)) if img is not None else None
            rows.append(row)
        return BatchResult(pa.Table.from_pylist(rows, schema=self.output_schema), quarantine)

    # after the last chunk ---------------------------------------------------------------
    def finalize(self) -> None:
        super().finalize()
        store, tracker = self.ctx.store, self.ctx.tracker
        table = store.read(self.table_name())
        metrics: dict[str, float] = {"dataset/samples": float(table.num_rows)}
        if table.num_rows:
            from vgen_core.eval.plots import histogram_image

            for name, values in self._stats(table).items():
                values = np.asarray(values, dtype=np.float64)
                values = values[np.isfinite(values)]
                if not len(values):
                    continue
                metrics[f"dataset/{name}_mean"] = float(values.mean())
                metrics[f"dataset/{name}_median"] = float(np.median(values))
                tracker.log_image(f"hist_{name}", histogram_image(values, name))
        dist = self.config.near_duplicate_distance
        if dist >= 0 and table.num_rows:
            valid = table.filter(pc.is_valid(table["phash"]))
            pairs = near_duplicates(
                valid["sample_id"].to_pylist(), valid["phash"].to_pylist(), max_distance=dist
            )
            metrics["dataset/near_duplicate_pairs"] = float(len(pairs))
            tracker.log_dict(
                {
                    "max_distance": dist,
                    "hash": "dhash64",
                    "pairs": [{"a": a, "b": b, "distance": d} for a, b, d in pairs],
                },
                "near_duplicates.json",
            )
        self.metrics.update(metrics)


def _decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _min_filter(name: str, value: float, minimum: float | None) -> list[tuple[str, str]]:
    if minimum and value < minimum:
        return [(name, f"{name.removeprefix('min_')} = {value:g} < {minimum:g} ({name})")]
    return []


class CuratePanCap(_Curate):
    kind = "curate.pancap"
    version = 1
    Config = CuratePanCapConfig
    dataset = "pancap"
    layout = (
        "annotations/panoptic_<split>.json, panoptic_<split>/ PNGs, the COCO images and "
        "PanCap caption files; see vgen_core/formats/pancap.py"
    )
    config: CuratePanCapConfig

    @property
    def output_schema(self) -> pa.Schema:
        from vgen_core.data.schemas import PANCAP_SAMPLES

        return PANCAP_SAMPLES

    def _write_sample(self, path: str) -> None:
        from vgen_core.formats.pancap_samples import write_pancap_sample_dataset

        write_pancap_sample_dataset(path, n_images=self.config.sample_size, seed=0)

    def _list(self, root: str) -> list[dict[str, Any]]:
        from vgen_core.formats.pancap import list_pancap

        return list_pancap(root, split=self.config.split)

    def _read(self, item: dict[str, Any]) -> dict[str, Any]:
        from vgen_core.formats.pancap import read_pancap_sample

        return read_pancap_sample(item)

    def _filters(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        c = self.config
        out = (
            _min_filter("min_caption_words", row["caption_words"], c.min_caption_words)
            + _min_filter("min_segments", row["num_segments"], c.min_segments)
            + _min_filter(
                "min_grounded_coverage", row["grounded_coverage"], c.min_grounded_coverage
            )
        )
        if c.max_segments is not None and row["num_segments"] > c.max_segments:
            out.append(("max_segments", f"segments = {row['num_segments']} > {c.max_segments}"))
        return out

    def _first_image(self, row: dict[str, Any]) -> bytes | None:
        return row["image"]

    def _stats(self, table: pa.Table) -> dict[str, np.ndarray]:
        return {
            k: table[k].to_numpy()
            for k in (
                "num_segments",
                "thing_ratio",
                "grounded_coverage",
                "caption_words",
                "void_fraction",
            )
        }


class CurateViCaS(_Curate):
    kind = "curate.vicas"
    version = 1
    Config = CurateViCaSConfig
    dataset = "vicas"
    layout = (
        "annotations/<version>/<video_id>.json with video_frames/ or videos/; see "
        "vgen_core/formats/vicas.py"
    )
    config: CurateViCaSConfig

    @property
    def output_schema(self) -> pa.Schema:
        from vgen_core.data.schemas import VICAS_SAMPLES

        return VICAS_SAMPLES

    def _write_sample(self, path: str) -> None:
        from vgen_core.formats.vicas_samples import write_vicas_sample_dataset

        write_vicas_sample_dataset(path, n_videos=self.config.sample_size, seed=0)

    def _list(self, root: str) -> list[dict[str, Any]]:
        from vgen_core.formats.vicas import list_vicas

        return list_vicas(root, version=self.config.version, split=self.config.split)

    def _read(self, item: dict[str, Any]) -> dict[str, Any]:
        from vgen_core.formats.vicas import read_vicas_sample

        return read_vicas_sample(item)

    def _filters(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        c, s = self.config, row["stats"]
        return (
            _min_filter("min_caption_words", s["caption_words"], c.min_caption_words)
            + _min_filter("min_tracks", s["num_tracks"], c.min_tracks)
            + _min_filter("min_frames", s["num_frames"], c.min_frames)
            + _min_filter(
                "min_grounded_coverage", s["mask_grounded_coverage"] or 0.0, c.min_grounded_coverage
            )
        )

    def _first_image(self, row: dict[str, Any]) -> bytes | None:
        frames = row.get("frames") or []
        return frames[0] if frames else None

    def _stats(self, table: pa.Table) -> dict[str, np.ndarray]:
        stats = table["stats"].combine_chunks()
        out = {
            k: stats.field(k).to_numpy(zero_copy_only=False)
            for k in (
                "num_frames",
                "num_tracks",
                "caption_words",
                "mask_grounded_coverage",
                "grounded_coverage",
            )
        }
        lengths = stats.field("track_lengths").flatten().to_numpy(zero_copy_only=False)
        out["track_length"] = lengths
        return out
