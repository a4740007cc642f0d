"""Error types the DAG runner (``pipelines.dag``) and the stage kinds (``pipelines.stages``) share.

Both layers import them from here, so a stage never imports the runner's modules.
"""

from __future__ import annotations

__all__ = ["DagError", "StageError"]


class DagError(ValueError):
    """An invalid DAG: says which file, stage and field, what was expected, and how to fix it."""

    def __init__(self, message: str, *, file: str | None = None, stage: str | None = None,
                 field: str | None = None):
        self.file, self.stage, self.field = file, stage, field
        self.detail = message  # the message without the file / stage / field prefix
        where = [p for p in (file, f"stage '{stage}'" if stage else None,
                             f"field '{field}'" if field else None) if p]
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class StageError(RuntimeError):
    """A stage failed: the message names the stage and says why and what to do."""
