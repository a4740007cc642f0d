"""Environment switches shared by the library (no other import)."""

from __future__ import annotations

import os

_OFF = ("0", "false", "no", "off")


def env_switch(name: str) -> bool:
    """An operator's on-by-default switch: False when ``name`` is 0 / false / no / off (any
    case, spaces ignored), True otherwise, unset included (``VGEN_TRACKING_SIDECAR``,
    ``VGEN_DIGEST_CACHE``)."""
    return os.environ.get(name, "1").strip().lower() not in _OFF
