"""Arrow schemas of every table vgen writes, declared in one place.

Each schema carries ``vgen.schema`` (its name) and ``vgen.schema_version`` in its metadata, and
every commit vgen makes records the version too. Bump ``SCHEMA_VERSION`` when a column changes
meaning or type; readers check it and refuse tables written by a newer vgen.

Column legend: ``sample_id`` (stable, e.g. ``pancap/000000123456``), ``content_digest`` (blake2b
of the sample's canonical bytes, see :mod:`vgen_core.data.identity`), ``fingerprint`` (of the
stage/model that produced a side-table row: weights digest + preprocessing config + code version).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

__all__ = [
    "SCHEMA_VERSION",
    "IMAGE_SAMPLES",
    "BIT_TOKENS",
    "ID_TOKENS",
    "LATENTS",
    "DELTA_TOKENS",
    "QUARANTINE",
    "SOURCE_ITEMS",
    "STAGE_RUNS",
    "EVAL_RESULTS",
    "REFERENCE_STATS",
    "PANCAP_SAMPLES",
    "VICAS_SAMPLES",
    "SCHEMAS",
    "with_schema_meta",
]


def with_schema_meta(name: str, fields: list[pa.Field]) -> pa.Schema:
    """Build a schema tagged with its name and :data:`SCHEMA_VERSION`."""
    return pa.schema(
        fields, metadata={"vgen.schema": name, "vgen.schema_version": str(SCHEMA_VERSION)}
    )


#: Curated image samples (one row per sample_id; upserted).
IMAGE_SAMPLES = with_schema_meta(
    "image_samples",
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("content_digest", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # file / URL / generator it came from
        pa.field("image_png", pa.binary(), nullable=False),  # PNG bytes, RGB uint8
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),  # class id (-1 when unlabelled)
        pa.field("caption", pa.string(), nullable=True),
    ],
)

#: Bit tokens (LFQ / binary FSQ): a side table keyed by (sample_id, content_digest, fingerprint).
#: ``indices`` are int32 (wide enough for any K <= 31 bits; never float16); ``bits_packed`` holds
#: the same tokens as packed bits (little-endian within a byte, token-major).
BIT_TOKENS = with_schema_meta(
    "bit_tokens",
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("content_digest", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("caption", pa.string(), nullable=True),  # carried for text-conditioned models
        pa.field("grid_h", pa.int16(), nullable=False),
        pa.field("grid_w", pa.int16(), nullable=False),
        pa.field("token_bits", pa.int16(), nullable=False),
        pa.field("indices", pa.list_(pa.int32()), nullable=False),
        pa.field("bits_packed", pa.binary(), nullable=False),
        # Baked augmentation: tokens of the horizontally flipped image (null when not baked).
        pa.field("indices_flip", pa.list_(pa.int32()), nullable=True),
    ],
)

#: 1D token ids (TiTok / TA-TiTok VQ): a side table keyed by (sample_id, content_digest,
#: fingerprint). ids are int32 (codebooks up to 2**31; never float16, which is exact only to
#: 2048). ``caption`` is carried for text-conditioned generators (MaskGen) and TA-TiTok decoding.
ID_TOKENS = with_schema_meta(
    "id_tokens",
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("content_digest", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("caption", pa.string(), nullable=True),
        pa.field("num_tokens", pa.int16(), nullable=False),
        pa.field("codebook_size", pa.int32(), nullable=False),
        pa.field("indices", pa.list_(pa.int32()), nullable=False),
        # Baked augmentation: ids of the horizontally flipped image (null when not baked).
        pa.field("indices_flip", pa.list_(pa.int32()), nullable=True),
    ],
)

#: Cached continuous latents (KL-VAE moments, TA-TiTok KL posteriors): the posterior
#: ``mean || logvar`` stacked on the channel axis, float32, C-order flattened, with its
#: ``shape`` [2Z, h, w] (or [2C, 1, K] for 1D tokens). Training samples the posterior and
#: multiplies by ``scale_factor`` (MAR/xAR/DeepFlow convention, methods.md 1.6-1.7).
LATENTS = with_schema_meta(
    "latents",
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("content_digest", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("caption", pa.string(), nullable=True),
        pa.field("shape", pa.list_(pa.int32()), nullable=False),
        pa.field("scale_factor", pa.float32(), nullable=False),
        pa.field("moments", pa.list_(pa.float32()), nullable=False),
        pa.field("moments_flip", pa.list_(pa.float32()), nullable=True),
    ],
)

#: Delta tokens (DeltaTok over frozen VFM features): one row per video; ``delta`` holds
#: (T-1) x D float32 continuous tokens, token t describing frame_indices[t] -> [t+1]
#: (teacher-forced, as the official ``tokenize_offline``), flattened C-order.
DELTA_TOKENS = with_schema_meta(
    "delta_tokens",
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("content_digest", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=True),
        pa.field("num_steps", pa.int32(), nullable=False),  # T - 1
        pa.field("dim", pa.int32(), nullable=False),  # D
        pa.field("frame_indices", pa.list_(pa.int32()), nullable=False),  # T frames of the video
        pa.field("timestamps", pa.list_(pa.float32()), nullable=False),  # seconds, T values
        pa.field("delta", pa.list_(pa.float32()), nullable=False),
    ],
)

#: Samples a stage could not process, with the reason and where they came from.
QUARANTINE = with_schema_meta(
    "quarantine",
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("content_digest", pa.string(), nullable=True),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("check", pa.string(), nullable=False),  # which check / "exception"
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=True),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
)

#: What a source stage (ingest / curate) has read: one row per listed source item (a file, an
#: annotation record) it processed, with the item's listing stamp (size, mtime, what the listing
#: says of it) and the row fingerprint it was read with. A re-run skips an item whose stamp and
#: fingerprint are unchanged and whose output rows are all still in the table
#: (``<dag>/<stage>__sources``; latest ``recorded_at`` per ``item_key`` wins).
SOURCE_ITEMS = with_schema_meta(
    "source_items",
    [
        pa.field("item_key", pa.string(), nullable=False),
        pa.field("item_stamp", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("rows", pa.list_(pa.string()), nullable=False),  # sample_ids it wrote
        pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
)

#: The runner's record of every stage execution (one row per state change).
STAGE_RUNS = with_schema_meta(
    "stage_runs",
    [
        pa.field("dag", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("fingerprint_parts", pa.string(), nullable=False),  # JSON, for "why" in plans
        pa.field("status", pa.string(), nullable=False),  # started | completed | failed
        pa.field("mlflow_run_id", pa.string(), nullable=True),
        pa.field("outputs", pa.string(), nullable=False),  # JSON {name: {uri, version, ...}}
        pa.field("counts", pa.string(), nullable=False),  # JSON {processed, skipped, quarantined}
        pa.field("error", pa.string(), nullable=True),
        pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
)

#: Metrics an evaluate stage computed (one row per metric).
EVAL_RESULTS = with_schema_meta(
    "eval_results",
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("num_samples", pa.int64(), nullable=False),
        pa.field("extractor", pa.string(), nullable=True),
        pa.field("details", pa.string(), nullable=True),  # JSON
        pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
)

#: Cached reference statistics for generation metrics (``_vgen/reference_stats``; see
#: :mod:`vgen_core.eval.reference`). Key: (source_uri, source_version, extractor, resolution);
#: ``source_version`` is the curated Delta version, -1 for a file (an ADM ``.npz``);
#: ``resolution`` the crop size images were preprocessed to (0: as stored). ``mu``/``sigma``
#: (and the sFID ``mu_s``/``sigma_s``) are little-endian float64, C-order; ``features`` a
#: deterministic subset of pool features (float32, (num_features, dims)) for precision/recall.
REFERENCE_STATS = with_schema_meta(
    "reference_stats",
    [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_version", pa.int64(), nullable=False),
        pa.field("extractor", pa.string(), nullable=False),
        pa.field("resolution", pa.int32(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # delta | adm_npz
        pa.field("source_digest", pa.string(), nullable=True),  # what the source held
        pa.field("count", pa.int64(), nullable=True),  # null: moments without a count (ADM)
        pa.field("dims", pa.int32(), nullable=False),
        pa.field("mu", pa.binary(), nullable=False),
        pa.field("sigma", pa.binary(), nullable=False),
        pa.field("spatial_dims", pa.int32(), nullable=True),
        pa.field("mu_s", pa.binary(), nullable=True),
        pa.field("sigma_s", pa.binary(), nullable=True),
        pa.field("num_features", pa.int64(), nullable=False),
        pa.field("features", pa.binary(), nullable=True),
        pa.field("details", pa.string(), nullable=True),  # JSON
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
)

_PANCAP_SEGMENT = pa.struct([
    pa.field("id", pa.int64(), nullable=False),  # R + 256 G + 256^2 B of the PNG
    pa.field("category_id", pa.int32(), nullable=False),
    pa.field("iscrowd", pa.bool_(), nullable=False),
    pa.field("isthing", pa.bool_(), nullable=False),
    pa.field("area", pa.int64(), nullable=False),  # pixel count (== segments_info area)
    pa.field("bbox", pa.list_(pa.int32(), 4), nullable=False),  # [x, y, w, h] from the mask
])
_PANCAP_SPAN = pa.struct([
    pa.field("start", pa.int32(), nullable=False),  # char offsets into caption_text
    pa.field("end", pa.int32(), nullable=False),
    pa.field("phrase", pa.string(), nullable=False),
    pa.field("ids", pa.list_(pa.int64()), nullable=False),
])

#: Curated COCONut-PanCap samples (one row per sample_id ``pancap/<12-digit id>``; upserted),
#: as :func:`vgen_core.formats.pancap.read_pancap_sample` returns them, plus ``phash``.
PANCAP_SAMPLES = with_schema_meta(
    "pancap_samples",
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("content_digest", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # the caption file (URL or path)
        pa.field("split", pa.string(), nullable=False),  # panoptic JSON split (train2017, ...)
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("file_name", pa.string(), nullable=False),  # image file, 000000xxxxxx.jpg
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # the original JPEG bytes
        pa.field("panoptic_png", pa.binary(), nullable=False),  # the original RGB id PNG
        pa.field("segments", pa.list_(_PANCAP_SEGMENT), nullable=False),  # in segments_info order
        pa.field("caption", pa.string(), nullable=False),  # raw, with tags (BOM/edges stripped)
        pa.field("caption_text", pa.string(), nullable=False),  # tags replaced by phrases
        pa.field("caption_spans", pa.list_(_PANCAP_SPAN), nullable=False),
        # statistics
        pa.field("num_segments", pa.int32(), nullable=False),
        pa.field("num_things", pa.int32(), nullable=False),
        pa.field("num_stuff", pa.int32(), nullable=False),
        pa.field("thing_ratio", pa.float64(), nullable=False),  # num_things / num_segments
        pa.field("num_tags", pa.int32(), nullable=False),
        pa.field("num_grounded_segments", pa.int32(), nullable=False),  # distinct tagged ids
        pa.field("grounded_coverage", pa.float64(), nullable=False),  # tagged px / all px
        pa.field("void_fraction", pa.float64(), nullable=False),  # id-0 px / all px
        pa.field("caption_words", pa.int32(), nullable=False),  # whitespace words of the text
        pa.field("phash", pa.int64(), nullable=True),  # 64-bit dHash (near-duplicates)
    ],
)

_VICAS_RLE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
_VICAS_SPAN = pa.struct([
    ("phrase", pa.string()),
    ("track_ids", pa.list_(pa.int32())),  # as written; -1 = crowd '?'
    ("start", pa.int32()),  # plain[start:end] == phrase
    ("end", pa.int32()),
    ("multi_digit", pa.bool_()),  # the official parser reads these ids digit by digit
])
_VICAS_FLAG = pa.struct([("name", pa.string()), ("detail", pa.string())])

#: Curated ViCaS videos (one row per sample_id ``vicas/<video_id:06d>``; upserted), as
#: :func:`vgen_core.formats.vicas.read_vicas_sample` returns them, plus ``phash``.
VICAS_SAMPLES = with_schema_meta(
    "vicas_samples",
    [
        pa.field("sample_id", pa.string(), nullable=False),  # vicas/<video_id:06d>
        pa.field("content_digest", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # annotation JSON path / URL
        pa.field("version", pa.string(), nullable=False),  # v0.1 | v1.0
        pa.field("split", pa.string(), nullable=True),  # train | val | test | None
        pa.field("video_id", pa.int64(), nullable=False),
        pa.field("src_dataset", pa.string(), nullable=False),
        pa.field("video_filename", pa.string(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),  # T
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("fps", pa.float32(), nullable=False),
        pa.field("frames_source", pa.string(), nullable=False),  # frames_dir | video
        # T encoded frames (decode_frames=True) in ``frame_format``; else null and see frame_paths
        pa.field("frames", pa.list_(pa.binary()), nullable=True),
        pa.field("frame_format", pa.string(), nullable=True),  # jpeg | png
        pa.field("frame_paths", pa.list_(pa.string()), nullable=True),  # frames_dir only
        pa.field("segmentations", pa.list_(pa.struct([
            ("filename", pa.string()),
            ("is_gt", pa.bool_()),
            ("track_ids", pa.list_(pa.int32())),
            ("mask_rles", pa.list_(_VICAS_RLE)),  # parallel to track_ids, COCO compressed RLE
        ])), nullable=False),
        pa.field("all_track_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("caption_raw", pa.string(), nullable=False),  # caption_raw_en_gpt
        pa.field("caption", pa.string(), nullable=False),  # caption_parsed_en_gpt (train/eval)
        pa.field("caption_spans", pa.list_(_VICAS_SPAN), nullable=False),  # of caption_raw
        pa.field("caption_raw_en", pa.string(), nullable=False),  # the human original
        pa.field("caption_parsed_en", pa.string(), nullable=False),
        pa.field("caption_spans_en", pa.list_(_VICAS_SPAN), nullable=False),
        pa.field("caption_raw_cn", pa.string(), nullable=False),
        pa.field("reworded_en_captions", pa.list_(pa.string()), nullable=False),
        pa.field("referrals", pa.list_(pa.struct([
            ("prompt", pa.string()), ("track_ids", pa.list_(pa.int32())),
        ])), nullable=False),
        pa.field("stats", pa.struct([
            ("num_frames", pa.int32()),
            ("num_gt_frames", pa.int32()),
            ("num_tracks", pa.int32()),
            ("track_lengths", pa.list_(pa.int32())),  # frames present, in all_track_ids order
            ("track_gap_frames", pa.list_(pa.int32())),  # absent frames inside each track's span
            ("num_masks", pa.int64()),
            ("mean_mask_area_fraction", pa.float64()),
            ("min_consecutive_iou", pa.float64()),  # null when no track spans two frames
            ("num_referrals", pa.int32()),
            ("caption_words", pa.int32()),
            ("caption_chars", pa.int32()),
            ("num_caption_spans", pa.int32()),
            ("grounded_coverage", pa.float64()),  # caption chars inside id-grounded phrases
            ("tracks_in_caption_fraction", pa.float64()),
            # pixels of caption-grounded tracks (union per frame) / (H * W * frames)
            ("mask_grounded_coverage", pa.float64()),
        ]), nullable=False),
        pa.field("flags", pa.list_(_VICAS_FLAG), nullable=False),
        pa.field("phash", pa.int64(), nullable=True),  # dHash of the first frame
    ],
)

SCHEMAS: dict[str, pa.Schema] = {
    s.metadata[b"vgen.schema"].decode(): s
    for s in (IMAGE_SAMPLES, BIT_TOKENS, ID_TOKENS, LATENTS, DELTA_TOKENS, QUARANTINE, STAGE_RUNS,
              EVAL_RESULTS, REFERENCE_STATS, PANCAP_SAMPLES,
              VICAS_SAMPLES)
}
