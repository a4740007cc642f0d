"""``vgen gc``: remove side-table rows that no current curated version references.

A stage's side tables (tokens, latents) are one Delta table per tokenizer fingerprint
(``<dag>/<stage>/<fp16>``). In each of them, rows whose (sample_id, content_digest) is not in the
*latest* version of the curated table they were made from (the stage's recorded ``source``) can
never be served again and are deleted, in chunks of at most ``chunk`` keys per Delta commit.
Tables of older fingerprints are cleaned the same way but kept (a run may still select them);
old Delta versions stay readable until the table is vacuumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from .state import StageState

__all__ = ["GcResult", "gc_side_table", "gc_dag"]


@dataclass
class GcResult:
    table: str
    source: str
    stale: int
    version: int | None


def _quote(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def gc_side_table(store: Any, side: str, source: str, *, dry_run: bool = False,
                  chunk: int = 200) -> GcResult:
    keys = ["sample_id", "content_digest"]
    current = store.read(source, columns=keys)
    rows = store.read(side, columns=keys).group_by(keys).aggregate([])
    stale = rows.join(current, keys=keys, join_type="left anti") if current.num_rows else rows
    version = store.version(side)
    if not dry_run:
        pairs = stale.to_pylist()
        for i in range(0, len(pairs), chunk):
            pred = " OR ".join(f"(sample_id = {_quote(p['sample_id'])} AND content_digest = "
                               f"{_quote(p['content_digest'])})" for p in pairs[i:i + chunk])
            version = store.delete(side, pred, commit_metadata={"vgen.operation": "gc"})
    return GcResult(side, source, stale.num_rows, version)


def gc_dag(dag: Any, store: Any, *, dry_run: bool = False) -> list[GcResult]:
    """Collect every side table a completed stage of ``dag`` wrote (outputs with a ``source``)."""
    _, done = StageState(store).latest(dag.name)
    results = []
    for name in dag.order:
        outs = (done.get(name) or {}).get("outputs", {})
        if "source" in outs and "samples" in outs and store.exists(outs["samples"]["name"]):
            current = outs["samples"]["name"]
            siblings = [t for t in store.list_tables(f"{dag.name}/{name}") if t != current]
            for side in [current, *siblings]:
                results.append(gc_side_table(store, side, outs["source"]["name"],
                                             dry_run=dry_run))
    return results
