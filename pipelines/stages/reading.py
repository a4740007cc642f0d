"""Reading a side table for training: :func:`training_dataset`.

One function joins a curated table *version* with a chosen side table (tokens or latents) and
yields a Ray Dataset of the side-table rows that are current for that version: the row's
``(sample_id, content_digest)`` is in the curated version and its ``fingerprint`` is the side
table's. Rows of deleted or changed samples, and rows another tokenizer made, are never served.

It also refuses a side table that cannot serve the requested transform, and says why. A cache
stores *baked* augmentations (the horizontal flip is encoded beside the original, as MAR,
1d-tokenizer and BAR do) because a flip cannot be applied to tokens after the fact: the tokens
of a flipped image are not the flipped token grid. So ``Transform(hflip=True)`` needs a table
written with ``flip: true``, and ``Transform(resolution=R)`` a table made at crop size R.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from .base import OutputRef, StageError, filter_to_keys

__all__ = ["Transform", "IncompatibleSideTable", "side_table_info", "check_transform",
           "current_rows", "training_dataset", "FLIP_COLUMNS"]

#: the column holding each side-table schema's baked horizontal flip
FLIP_COLUMNS = {"bit_tokens": "indices_flip", "id_tokens": "indices_flip",
                "latents": "moments_flip"}


class Transform(BaseModel):
    """What a train stage asks of the cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hflip: bool = False  # pick the flipped copy for a random half of the samples
    resolution: int | None = None  # crop size the tokens must have been made at


class IncompatibleSideTable(StageError):
    """The side table cannot serve the requested transform (the message says why and what to do)."""


def side_table_info(store: Any, side: OutputRef) -> dict[str, Any]:
    """Schema name, recorded preprocessing and row counts of ``side`` (at its version)."""
    schema = store.schema(side.name)
    kind = (schema.metadata or {}).get(b"vgen.schema", b"").decode() or None
    desc = store.description(side.name)
    try:
        pre = json.loads(desc).get("vgen.preprocess") if desc else None
        pre = json.loads(pre) if isinstance(pre, str) else pre
    except (ValueError, AttributeError):
        pre = None
    for col in ("sample_id", "content_digest", "fingerprint"):
        if col not in schema.names:
            raise IncompatibleSideTable(
                f"{side.uri} is not a side table: it has no '{col}' column (columns: "
                f"{', '.join(schema.names)}); pass the 'samples' output of a tokenize or "
                "cache.latents stage")
    flip_col = FLIP_COLUMNS.get(kind or "") or next(
        (c for c in ("indices_flip", "moments_flip") if c in schema.names), None)
    kind = kind or (pre or {}).get("kind") or "this"
    cols = ["fingerprint"] + ([flip_col] if flip_col in schema.names else [])
    t = store.read(side.name, version=side.version, columns=cols)
    if side.digest:
        t = t.filter(pc.equal(t["fingerprint"], side.digest))
    flipped = (t.num_rows - t[flip_col].null_count) if flip_col in t.column_names else 0
    return {"schema": kind, "preprocess": pre or {}, "rows": t.num_rows, "flipped_rows": flipped,
            "flip_column": flip_col}


def check_transform(info: dict[str, Any], transform: Transform, where: str) -> None:
    """Raise :class:`IncompatibleSideTable` when ``info`` cannot serve ``transform``."""
    if transform.hflip:
        if info["flip_column"] is None:
            raise IncompatibleSideTable(
                f"{where}: random horizontal flip requested, but {info['schema']} tables have no "
                "baked flip; set flip: false in the train stage")
        if info["flipped_rows"] < info["rows"]:
            missing = info["rows"] - info["flipped_rows"]
            raise IncompatibleSideTable(
                f"{where}: random horizontal flip requested, but {missing} of {info['rows']} "
                f"rows have no baked flip ('{info['flip_column']}' is null: the tokenize stage "
                "ran with flip: false). Tokens of a flipped image are not the flipped tokens, so "
                "the flip cannot be applied after the fact: re-run the tokenize stage with "
                "flip: true (a new side table), or set flip: false in the train stage")
    res = info["preprocess"].get("resolution")
    if transform.resolution is not None and res is not None and res != transform.resolution:
        raise IncompatibleSideTable(
            f"{where}: resolution {transform.resolution} requested, but the side table was made "
            f"from {res}x{res} crops; tokenize at resolution {transform.resolution} (a new side "
            f"table) or train at {res}")


def current_rows(batch: pa.Table, keys: pa.Table, fingerprint: str | None) -> pa.Table:
    """Rows of this fingerprint whose (sample_id, content_digest) is in ``keys``."""
    if fingerprint is not None:
        batch = batch.filter(pc.equal(batch["fingerprint"], fingerprint))
    return filter_to_keys(batch, keys)


def training_dataset(store: Any, samples: OutputRef, side: OutputRef,
                     transform: Transform | dict | None = None, *,
                     columns: list[str] | None = None, where: str = "training_dataset"):
    """A Ray Dataset of ``side``'s rows current for the curated table ``samples`` (at its
    version), after checking that ``side`` can serve ``transform``.

    ``samples``/``side`` are stage outputs (``OutputRef``: table name, uri, version; the side
    table's ``digest`` is its tokenizer fingerprint). ``columns`` projects the side table.
    """
    import ray.data

    transform = Transform.model_validate(transform or {})
    info = side_table_info(store, side)
    if info["rows"] == 0:
        raise IncompatibleSideTable(f"{where}: side table {side.uri}@v{side.version} has no rows "
                                    f"of fingerprint {side.digest}")
    check_transform(info, transform, where)
    keys = store.read(samples.name, version=samples.version,
                      columns=["sample_id", "content_digest"])
    if columns is not None:
        columns = list(dict.fromkeys(["sample_id", "content_digest", "fingerprint", *columns]))
    ds = ray.data.read_delta(side.uri, version=side.version, columns=columns,
                             storage_options=store.storage_options or None)
    return ds.map_batches(current_rows, fn_args=(keys, side.digest), batch_format="pyarrow")
