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


def fetch_model_dir(uri: str, dest: str) -> str:
    """A local directory holding the model directory ``uri`` (local: itself; remote: copied
    into ``dest``)."""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = filesystem_for(uri)
    if isinstance(fs, LocalFileSystem):
        return path
    fs.get(path.rstrip("/") + "/", dest, recursive=True)
    return dest


def fetch_file(uri: str, dest_dir: str) -> str:
    """A local path for the file ``uri`` (copied into ``dest_dir`` when remote)."""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = filesystem_for(uri)
    if isinstance(fs, LocalFileSystem):
        return path
    local = f"{dest_dir}/{path.rsplit('/', 1)[-1]}"
    fs.get(path, local)
    return local


def file_digest(uri: str, *, what: str = "file") -> str:
    """blake2b-256 of a (local or remote) file's bytes, streamed. FileNotFoundError names
    ``what`` the file is for."""
    import hashlib

    fs, path = filesystem_for(uri)
    h = hashlib.blake2b(digest_size=32)
    try:
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {uri} not found; it must be readable from every "
                                "node (a local path on each, or s3://)") from None
    return h.hexdigest()


def read_json(uri: str) -> Any:
    """A JSON file, local or remote."""
    import json

    fs, path = filesystem_for(uri)
    return json.loads(fs.cat_file(path))
