"""Stage fingerprints.

* ``row_fingerprint`` = hash(kind, kind version, config, the kind's own row parts such as a
  tokenizer's weights digest). It is stored on every side-table row: a row is reusable exactly
  when this matches.
* ``stage_fingerprint`` = hash(row fingerprint, external source listing, and for each upstream
  stage its fingerprint and the versions/digests of its outputs). A stage whose fingerprint equals
  the one recorded at its last completed run, and whose outputs are still there, is skipped.

The parts are kept (as JSON) beside the hash so ``vgen plan`` can say *why* a stage must run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["canonical_json", "digest_parts", "diff_parts"]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def digest_parts(parts: dict[str, Any]) -> str:
    """A short stable hash (blake2b, 16 bytes hex) of a JSON-able mapping."""
    return hashlib.blake2b(canonical_json(parts).encode(), digest_size=16).hexdigest()


def diff_parts(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprint part trees (for plan reasons)."""
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff_parts(a, b, key + "."))
        elif k not in old:
            out.append(f"{key} added")
        elif k not in new:
            out.append(f"{key} removed")
        else:
            sa, sb = canonical_json(a), canonical_json(b)
            if len(sa) > 40 or len(sb) > 40:
                out.append(f"{key} changed")
            else:
                out.append(f"{key}: {sa} -> {sb}")
    return out
