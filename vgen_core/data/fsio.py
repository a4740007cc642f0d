"""Raw files through fsspec: local paths and URLs (``s3://`` via s3fs) alike."""

from __future__ import annotations

import os
from typing import Any

import fsspec


def filesystem_for(url: str, **options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URL. For ``s3://`` the endpoint comes
    from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL when set (S3-compatible servers)."""
    if url.startswith("s3://") and "client_kwargs" not in options:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path
