"""``vgen tracking sync``: replay the local records an MLflow outage left into a tracking store.

    vgen tracking sync [--storage ROOT | --tracking-uri URI] [--records DIR] [--json]

While the tracking server is unreachable, runs keep going and their trackers append what they
would have logged to ``$TMPDIR/vgen-tracking/<run_id>.jsonl`` (see
:mod:`vgen_core.tracking.mlflow_tracker`). Once the server is back, this command replays those
files (:func:`vgen_core.tracking.sync.sync_records`): into ``--tracking-uri`` (env
MLFLOW_TRACKING_URI), else into the storage root's default store
(``sqlite:///<root>/mlflow.db``, like ``vgen run``). Exit codes: 0 everything replayed, 1 some
records were rejected (listed), 2 no target, or the target does not answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["add_tracking_parser", "cmd_tracking"]


def add_tracking_parser(sub: Any) -> None:
    """Add ``tracking`` (with its ``sync`` subcommand) to the ``vgen`` subparsers."""
    p = sub.add_parser("tracking", help="replay tracking records an MLflow outage left locally",
                       description="Commands on vgen's local tracking records.")
    tsub = p.add_subparsers(dest="tracking_command", required=True)
    s = tsub.add_parser(
        "sync", help="replay local fallback records into the tracking store",
        description="Replay the JSON-lines records trackers wrote while MLflow was unreachable "
        "into a tracking store: offline runs become new runs (children nested under their "
        "parents), runs that exist get their missing params, metrics, tags, images and "
        "artifacts. Replayed files are renamed *.jsonl.synced, so nothing is replayed twice.")
    s.add_argument("--storage", default=os.environ.get("VGEN_STORAGE"),
                   help="storage root whose default store (sqlite:///<root>/mlflow.db) receives "
                        "the records when no --tracking-uri is given (env VGEN_STORAGE)")
    s.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="the tracking store to replay into (env MLFLOW_TRACKING_URI)")
    s.add_argument("--records", metavar="DIR", default=None,
                   help="directory of the records (default: $TMPDIR/vgen-tracking, where "
                        "trackers write them)")
    s.add_argument("--experiment", default="vgen-offline",
                   help="experiment for runs whose records name none (default vgen-offline)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_tracking(args: argparse.Namespace) -> int:
    from vgen_core.tracking import (
        TrackingServerUnavailable,
        default_artifact_location,
        default_fallback_dir,
        default_tracking_uri,
        redact_uri,
    )
    from vgen_core.tracking.sync import sync_records

    if args.tracking_command != "sync":  # argparse allows only sync today
        return 2
    uri, location = args.tracking_uri, None
    if args.storage:
        from vgen_core.data import TableStore

        root = TableStore(args.storage).root
        uri = uri or default_tracking_uri(root)
        location = default_artifact_location(root)
    if not uri:
        print("vgen tracking sync: give --tracking-uri URI or --storage ROOT (the store to "
              "replay into)", file=sys.stderr)
        return 2
    records = args.records or str(default_fallback_dir())
    try:
        result = sync_records(uri, records, experiment=args.experiment,
                              artifact_location=location)
    except TrackingServerUnavailable as e:
        print(f"vgen tracking sync: {e}; nothing was replayed from {records}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"records_dir": records, **result.to_json()}, indent=2))
    else:
        print(f"replayed {result.records} record(s) from {result.files} file(s) in {records} "
              f"into {redact_uri(uri)}")
        for source, target in result.runs.items():
            note = " (new run)" if target in result.created else ""
            print(f"  {source} -> run {target}{note}")
        for line in result.skipped:
            print(f"  skipped {line}")
        for line in result.failed:
            print(f"  FAILED {line}", file=sys.stderr)
    return 0 if result.ok else 1
