"""The one exception a dataset reader raises for a bad sample."""

from __future__ import annotations


class SampleError(ValueError):
    """A sample failed a check. ``check`` is a short stable name (``png_ids_match_segments``),
    ``reason`` says what was expected and what was found, ``source`` the file (path or URL)."""

    def __init__(self, check: str, reason: str, *, sample_id: str | None = None,
                 source: str | None = None):
        self.check, self.reason, self.sample_id, self.source = check, reason, sample_id, source
        where = ", ".join(p for p in (f"sample {sample_id}" if sample_id else "",
                                      f"file {source}" if source else "") if p)
        super().__init__(f"[{check}] {reason}" + (f" ({where})" if where else ""))
