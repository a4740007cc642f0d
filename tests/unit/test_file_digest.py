"""file_digest: blake2b-256 of a file's bytes, cached by the file's identity (URI, size, mtime /
ETag) so that a plan does not re-read a multi-GB weights file every run."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from vgen_core.data import fsio
from vgen_core.data.fsio import file_digest


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VGEN_DIGEST_CACHE", raising=False)
    return tmp_path / "cache"


def _blake(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths file_digest opens from here on."""
    opened: list[str] = []
    real = fsio.filesystem_for

    def spy(url: str, **kw):
        fs, path = real(url, **kw)  # fsspec caches the instance: wrap its open once
        if not getattr(fs.open, "spied", False):
            orig = fs.open

            def open_(p, *a, **k):
                opened.append(p)
                return orig(p, *a, **k)

            open_.spied = True  # type: ignore[attr-defined]
            monkeypatch.setattr(fs, "open", open_)
        return fs, path

    monkeypatch.setattr(fsio, "filesystem_for", spy)
    return opened


def test_digest_is_read_once_then_cached(tmp_path: Path, cache_home: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    opened = _reads(monkeypatch)
    assert file_digest(str(f)) == _blake(b"weights" * 1000)
    assert file_digest(str(f)) == _blake(b"weights" * 1000)
    assert len(opened) == 1  # the second answer came from the cache
    (entry,) = [p for p in cache_home.rglob("*") if p.is_file()]
    assert entry.parent.parent == cache_home / "vgen" / "file_digests"
    assert entry.read_text() == _blake(b"weights" * 1000)


def test_a_rewrite_is_a_new_digest_even_with_size_and_mtime_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 64)
    first = file_digest(str(f))
    st = os.stat(f)
    f.write_bytes(b"b" * 64)  # same size, new mtime: read again
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert file_digest(str(f)) == _blake(b"b" * 64) != first
    st = os.stat(f)
    time.sleep(0.01)
    f.write_bytes(b"c" * 64)  # same size, mtime restored (cp -p, rsync -t): the ctime moved
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_digest(str(f)) == _blake(b"c" * 64)
    opened = _reads(monkeypatch)
    monkeypatch.setenv("VGEN_DIGEST_CACHE", "0")  # the cache off: read every time
    assert file_digest(str(f)) == file_digest(str(f)) == _blake(b"c" * 64)
    assert len(opened) == 2


def test_a_broken_cache_entry_is_recomputed(tmp_path: Path, cache_home: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 10)
    file_digest(str(f))
    (entry,) = [p for p in cache_home.rglob("*") if p.is_file()]
    entry.write_text("not a digest")
    assert file_digest(str(f)) == _blake(b"x" * 10)
    assert entry.read_text() == _blake(b"x" * 10)


def test_an_unwritable_cache_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    f = tmp_path / "w.bin"
    f.write_bytes(b"y")
    assert file_digest(str(f)) == file_digest(str(f)) == _blake(b"y")


def test_missing_file_names_what_it_is_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weights file .*nope.bin not found"):
        file_digest(str(tmp_path / "nope.bin"), what="weights file")
