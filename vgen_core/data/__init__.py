"""Data model of vgen: who a sample is, what tables look like, and where they live.

* :mod:`~vgen_core.data.identity` - stable ``sample_id`` strings (``pancap/000000123456``) and
  ``content_digest`` (BLAKE2b over a documented, frozen framing of a sample's bytes, text,
  arrays and canonical JSON). Side tables are keyed by ``(sample_id, content_digest)``.
* :mod:`~vgen_core.data.schemas` - the Arrow schema of every table vgen writes.
* :mod:`~vgen_core.data.store` - :class:`TableStore`: Delta Lake tables (atomic, versioned
  commits with caller metadata) and raw files (fsspec) under a local or ``s3://`` root.

Dataset readers (PanCap, ViCaS) live in :mod:`vgen_core.formats`; more readers and codecs (RLE)
join this package as they are written. Nothing here imports Ray.
"""

from .identity import (
    DIGEST_PERSON,
    DIGEST_SIZE,
    DIGEST_VERSION,
    Digest,
    canonical_json,
    content_digest,
    make_sample_id,
    parse_sample_id,
)
from .schemas import *  # noqa: F403 - the schema constants are part of this package's API
from .store import StorageError, TableStore

from . import schemas as _schemas

__all__ = [
    "DIGEST_PERSON",
    "DIGEST_SIZE",
    "DIGEST_VERSION",
    "Digest",
    "canonical_json",
    "content_digest",
    "make_sample_id",
    "parse_sample_id",
    "StorageError",
    "TableStore",
]
__all__ += _schemas.__all__
