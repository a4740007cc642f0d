"""Where a parsed JSON record holds something canonical JSON refuses, for error messages."""

from __future__ import annotations

import math
from typing import Any

_MAX_DEPTH = 200


def bad_json_path(obj: Any, path: str = "", depth: int = 0) -> str | None:
    """Path of the first value :func:`vgen_core.data.identity.canonical_json` refuses (NaN or
    Infinity, text with lone surrogates, nesting past 200 levels), e.g.
    ``segmentations[3].mask_rles[0].counts``; None if there is none."""
    if depth > _MAX_DEPTH:
        return (path or ".") + " (nested too deeply)"
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "."
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "."
        return None
    items = (obj.items() if isinstance(obj, dict) else
             enumerate(obj) if isinstance(obj, (list, tuple)) else ())
    for k, v in items:
        if isinstance(k, str) and bad_json_path(k) is not None:
            return f"{path or '.'} (a key)"
        sub = f"{path}.{k}" if isinstance(k, str) else f"{path}[{k}]"
        found = bad_json_path(v, sub.lstrip("."), depth + 1)
        if found is not None:
            return found
    return None
