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
           "current_rows", "training_dataset", "FLIP_COLUMNS", "data_facts", "image_batch",
           "token_batch", "latent_batch", "delta_batch"]

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
                             storage_options=store.worker_storage_options() or None)
    return ds.map_batches(current_rows, fn_args=(keys, side.digest), batch_format="pyarrow")


# ---------------------------------------------------------------------------------------------
# Side-table rows -> training batches (numpy; Ray Train turns them into tensors)
# ---------------------------------------------------------------------------------------------


def data_facts(store: Any, side: OutputRef, where: str) -> dict[str, Any]:
    """What a model must know about the side table's data (copied into its config)."""
    import numpy as np

    schema = store.schema(side.name)
    names = schema.names
    cols = [c for c in ("fingerprint", "label", "token_bits", "grid_h", "grid_w", "num_tokens",
                        "codebook_size", "shape", "scale_factor", "dim", "num_steps") if c in names]
    t = store.read(side.name, version=side.version, columns=cols)
    if side.digest:
        t = t.filter(pc.equal(t["fingerprint"], side.digest))
    if t.num_rows == 0:
        raise IncompatibleSideTable(f"{where}: side table {side.uri}@v{side.version} has no rows "
                                    f"of fingerprint {side.digest}")

    def one(col: str) -> Any:
        vals = pc.unique(t[col]).to_pylist() if col != "shape" else \
            sorted({tuple(v) for v in t[col].to_pylist()})
        if len(vals) != 1:
            raise IncompatibleSideTable(f"{where}: mixed {col} {vals[:5]} in {side.uri}")
        return vals[0]

    facts: dict[str, Any] = {"num_rows": t.num_rows}
    # which side-table data this is: bit_tokens | id_tokens | latents | delta_tokens
    if "label" in names:
        facts["num_classes"] = max(int(pc.max(t["label"]).as_py()) + 1, 1)
    if "token_bits" in names:
        k = int(one("token_bits"))
        facts.update(kind="bit_tokens", token_bits=k, codebook_size=1 << k,
                     seq_len=int(one("grid_h")) * int(one("grid_w")))
    elif "num_tokens" in names:
        facts.update(kind="id_tokens", seq_len=int(one("num_tokens")),
                     codebook_size=int(one("codebook_size")))
    elif "shape" in names:
        shape = list(one("shape"))
        facts.update(kind="latents", shape=shape, in_channels=shape[0] // 2,
                     scale_factor=float(one("scale_factor")))
        if len(shape) == 3 and shape[1] == shape[2]:
            facts.update(input_size=shape[1], latent_size=shape[1])
        if len(shape) == 3 and shape[1] == 1:  # 1D tokens (B, C, 1, K): TiTok / TA-TiTok KL
            facts.update(num_tokens=shape[2], token_dim=shape[0] // 2)
    elif "dim" in names:
        facts.update(kind="delta_tokens", token_dim=int(one("dim")),
                     min_steps=int(np.min(t["num_steps"])))
    else:
        raise IncompatibleSideTable(f"{where}: {side.uri} is not a token or latent side table "
                                    f"(columns: {', '.join(names)})")
    return facts


def image_batch(batch: pa.Table, resolution: int | None = None) -> dict[str, Any]:
    """Curated image rows (``image_png`` or PanCap ``image``) -> ``image`` uint8 (B, R, R, 3)."""
    import numpy as np

    from vgen_core.data.images import IMAGE_COLUMNS, decode_image, pick_column, preprocess

    col = pick_column(batch.schema.names, IMAGE_COLUMNS)
    images = [decode_image(b) for b in batch[col].to_pylist()]
    if resolution:
        images = [preprocess(im, resolution) for im in images]
    out = {"image": np.stack(images)}
    out["label"] = (np.asarray(batch["label"], dtype=np.int64) if "label" in batch.schema.names
                    else np.full(len(images), -1, np.int64)).clip(min=0)
    return out


def token_batch(batch: pa.Table, with_text: bool = False) -> dict[str, Any]:
    """bit/id token rows -> ``tokens`` (+ ``tokens_flip`` when baked) int64, ``label``."""
    import numpy as np

    out = {"tokens": np.asarray(batch["indices"].to_pylist(), dtype=np.int64),
           "label": np.asarray(batch["label"], dtype=np.int64).clip(min=0)}
    flips = batch["indices_flip"].to_pylist()
    if any(f is not None for f in flips):
        out["tokens_flip"] = np.asarray([f if f is not None else t for f, t in
                                         zip(flips, out["tokens"].tolist())], dtype=np.int64)
    if with_text:
        out["text_ids"] = _text_ids(batch)
    return out


def _text_ids(batch: pa.Table) -> Any:
    """Captions as byte ids (B, 77) (``vgen_core.generators.text.encode_text``)."""
    from vgen_core.generators.text import encode_text

    caps = batch["caption"].to_pylist() if "caption" in batch.schema.names else \
        [""] * batch.num_rows
    return encode_text([c or "" for c in caps]).numpy()


def latent_batch(batch: pa.Table, with_text: bool = False) -> dict[str, Any]:
    """latent rows -> ``moments`` float32 (B, *shape) (+ ``moments_flip``), ``label``."""
    import numpy as np

    shapes = batch["shape"].to_pylist()
    out = {"moments": np.stack([np.asarray(m, np.float32).reshape(s) for m, s in
                                zip(batch["moments"].to_pylist(), shapes)]),
           "label": np.asarray(batch["label"], dtype=np.int64).clip(min=0)}
    flips = batch["moments_flip"].to_pylist()
    if any(f is not None for f in flips):
        out["moments_flip"] = np.stack([np.asarray(f if f is not None else m, np.float32)
                                        .reshape(s) for f, m, s in
                                        zip(flips, batch["moments"].to_pylist(), shapes)])
    if with_text:
        out["text_ids"] = _text_ids(batch)
    return out


def delta_batch(batch: pa.Table, window: int, seed: int | None = None) -> dict[str, Any]:
    """delta-token rows -> a random window of ``window`` steps per video: ``delta`` float32
    (B, W, D) and ``timestamps`` (B, W) (the time of the frame each delta leads to)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    deltas, times = [], []
    for d, n, dim, ts in zip(batch["delta"].to_pylist(), batch["num_steps"].to_pylist(),
                             batch["dim"].to_pylist(), batch["timestamps"].to_pylist()):
        if n < window:
            continue
        s = int(rng.integers(0, n - window + 1))
        deltas.append(np.asarray(d, np.float32).reshape(n, dim)[s:s + window])
        times.append(np.asarray(ts[1:], np.float32)[s:s + window])
    if not deltas:
        return {"delta": np.zeros((0, window, 1), np.float32),
                "timestamps": np.zeros((0, window), np.float32)}
    return {"delta": np.stack(deltas), "timestamps": np.stack(times)}
