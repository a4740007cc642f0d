"""Where a storage root's MLflow store and artifacts go by default. No mlflow import: the driver
resolves these before (and without) importing mlflow (`vgen_core.tracking.sidecar`)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["default_artifact_location", "default_tracking_uri"]


def _is_remote(root: str) -> bool:
    scheme = urlparse(root).scheme
    return scheme not in ("", "file") and len(scheme) > 1  # len>1: a Windows drive is no scheme


def _local_root(root: str) -> Path:
    path = urlparse(root).path if root.startswith("file:") else root
    return Path(path).expanduser().resolve()


def default_tracking_uri(storage_root: str) -> str:
    """SQLite tracking URI for a storage root: `sqlite:///<abs root>/mlflow.db` for a local root,
    `sqlite:///~/.cache/vgen/mlflow.db` (expanded) for a remote one such as `s3://bucket/vgen`."""
    if _is_remote(storage_root):
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return f"sqlite:///{cache.expanduser().resolve() / 'vgen' / 'mlflow.db'}"
    return f"sqlite:///{_local_root(storage_root) / 'mlflow.db'}"


def default_artifact_location(storage_root: str) -> str:
    """`<root>/mlartifacts`: an absolute local path, or a URI beside the data for `s3://` roots."""
    if _is_remote(storage_root):
        return f"{storage_root.rstrip('/')}/mlartifacts"
    return str(_local_root(storage_root) / "mlartifacts")
