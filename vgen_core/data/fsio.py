"""Raw files through fsspec: local paths and URLs (``s3://`` via s3fs) alike."""

from __future__ import annotations

import os
from typing import Any

import fsspec

from vgen_core.env import env_switch


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
    ``what`` the file is for.

    Cached on this machine by the file's identity: its URI, size, modification and change
    times and inode (ETag on object stores), in ``$XDG_CACHE_HOME/vgen/file_digests`` (default
    ``~/.cache``). A plan digests every ``weights:`` file it fingerprints: without the cache a
    no-op run re-read a multi-GB checkpoint (from S3: downloaded it) every time. The trust is
    that of source files (make, dataset caches), a little stronger locally: a file rewritten
    with the same size is noticed by its ctime even when its mtime is restored; on object
    stores the ETag decides; ``VGEN_DIGEST_CACHE=0`` reads every file every time. A cache that
    cannot be read or written is skipped."""
    import hashlib

    fs, path = filesystem_for(uri)
    try:
        key = _identity(uri, fs.info(path)) if env_switch("VGEN_DIGEST_CACHE") else None
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {uri} not found; it must be readable from every "
                                "node (a local path on each, or s3://)") from None
    except Exception:  # no metadata: digest without the cache
        key = None
    if key is not None and (known := _cached(key)) is not None:
        return known
    h = hashlib.blake2b(digest_size=32)
    try:
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {uri} not found; it must be readable from every "
                                "node (a local path on each, or s3://)") from None
    digest = h.hexdigest()
    if key is not None:
        _remember(key, digest)
    return digest


def _digest_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vgen", "file_digests")


def _identity(uri: str, info: dict[str, Any]) -> str | None:
    """The cache key of a file: its URI and the metadata that changes when it is rewritten
    (None when the filesystem gives no size and no time or ETag: not cached)."""
    import hashlib
    import json

    if info.get("type") not in (None, "file"):
        return None
    # ``created`` is the local ctime, which no user call sets back (``cp -p`` / ``touch -r``
    # restore the mtime of a same-size rewrite, not its ctime); empty values (an S3 server
    # that sends no ETag) are no identity
    stamp = {k: str(info[k]) for k in ("size", "mtime", "created", "LastModified", "ETag", "ino",
                                        "last_modified", "etag")
             if info.get(k) is not None and str(info[k]) != ""}
    if "size" not in stamp or len(stamp) < 2:
        return None
    text = json.dumps({"uri": uri, **stamp}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _cached(key: str) -> str | None:
    try:
        with open(os.path.join(_digest_cache_dir(), key[:2], key)) as f:
            value = f.read().strip()
    except OSError:
        return None
    return value if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else None


def _remember(key: str, digest: str) -> None:
    folder = os.path.join(_digest_cache_dir(), key[:2])
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{key}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(digest)
        os.replace(tmp, os.path.join(folder, key))  # atomic: readers see all or nothing
    except OSError:
        pass


def read_json(uri: str) -> Any:
    """A JSON file, local or remote."""
    import json

    fs, path = filesystem_for(uri)
    return json.loads(fs.cat_file(path))
