"""``vgen report``: one static HTML page that compares MLflow runs side by side.

    vgen report RUN_ID [RUN_ID ...] --tracking-uri sqlite:///.vgen-demo/mlflow.db --out report.html

The page holds, for the runs given (any experiments of one tracking store):

* the runs (name, status, start, duration, DAG / stage / kind tags);
* a warning when their evaluation extractors differ, and whether each run's numbers can stand
  beside published ones (``vgen.eval.*`` tags of ``evaluate.generation``);
* params that differ between runs (the identical ones folded away);
* the final value of every metric, run by run;
* metric curves (every metric logged at more than one step: losses, learning rates, ...),
  matplotlib figures inlined as SVG;
* image artifacts (sample grids, reconstructions): the latest step of each image key, inlined
  as base64 PNG, so the file can be mailed or attached to a review as it is;
* lineage tags (``vgen.lineage.*``: generator / tokenizer digests and URIs, table versions).

Everything is read through ``MlflowClient``; nothing is written to the tracking store.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

__all__ = ["write_report", "add_report_parser", "cmd_report"]

#: MLflow's step-image artifact names: images/<key>+step+<n>+timestamp+<ms>+<uuid>.png
#: (older MLflow versions use '%' for '+')
_STEP_IMAGE = re.compile(r"^(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]")
_COLORS = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb"]


@dataclass
class _Image:
    key: str
    step: int | None
    path: str
    png: bytes = b""


@dataclass
class _Run:
    id: str
    name: str
    experiment: str
    status: str
    start_ms: int | None
    end_ms: int | None
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: list[_Image] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.id[:8]})" if self.name else self.id[:8]


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------


def _list_pngs(client: Any, run_id: str, path: str | None = None) -> list[str]:
    out: list[str] = []
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out.extend(_list_pngs(client, run_id, f.path))
        elif f.path.lower().endswith(".png"):
            out.append(f.path)
    return out


def _latest_images(paths: list[str], limit: int) -> list[_Image]:
    """One image per key: the highest step of step-logged images, or the file itself."""
    best: dict[str, _Image] = {}
    for p in paths:
        name = p.rsplit("/", 1)[-1]
        m = _STEP_IMAGE.match(name)
        if m:
            img = _Image(m.group("key"), int(m.group("step")), p)
        else:
            img = _Image(p[: -len(".png")], None, p)
        cur = best.get(img.key)
        if cur is None or (img.step or 0) > (cur.step or 0):
            best[img.key] = img
    return [best[k] for k in sorted(best)][:limit]


def _collect(client: Any, run_id: str, *, max_images: int) -> _Run:
    try:
        r = client.get_run(run_id)
    except Exception as e:
        raise ValueError(f"run {run_id!r} not found in the tracking store ({e}); list runs in "
                         "`vgen ui` or with mlflow.search_runs") from None
    try:
        experiment = client.get_experiment(r.info.experiment_id).name
    except Exception:
        experiment = str(r.info.experiment_id)
    tags = {k: v for k, v in r.data.tags.items()}
    run = _Run(r.info.run_id, tags.get("mlflow.runName", r.info.run_name or ""), experiment,
               r.info.status, r.info.start_time, r.info.end_time, dict(r.data.params),
               dict(r.data.metrics), tags)
    for key in sorted(run.metrics):
        hist = client.get_metric_history(run_id, key)
        pts = sorted((int(m.step), float(m.value)) for m in hist)
        if len({s for s, _ in pts}) > 1:
            run.curves[key] = pts
    images = _latest_images(_list_pngs(client, run_id), max_images)
    with tempfile.TemporaryDirectory() as tmp:
        for img in images:
            local = client.download_artifacts(run_id, img.path, tmp)
            img.png = Path(local).read_bytes()
    run.images = images
    return run


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: float | None) -> str:
    if v is None:
        return "&mdash;"
    if math.isnan(v):
        return "nan"
    return f"{v:.6g}"


def _time(ms: int | None) -> str:
    if not ms:
        return "&mdash;"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _duration(run: _Run) -> str:
    if not run.start_ms or not run.end_ms:
        return "&mdash;"
    return f"{(run.end_ms - run.start_ms) / 1000:.1f}s"


def _curve_svg(key: str, runs: list[_Run]) -> str:
    """One metric's curves (a line per run) as an inline SVG string."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "vgen-report"}):
        fig = Figure(figsize=(5.2, 3.0), dpi=100)
        ax = fig.add_subplot(1, 1, 1)
        for i, run in enumerate(runs):
            pts = run.curves.get(key)
            if not pts:
                continue
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=run.label,
                    color=_COLORS[i % len(_COLORS)], linewidth=1.5)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML


def _sort_curves(keys: set[str]) -> list[str]:
    return sorted(keys, key=lambda k: (0 if "loss" in k else 1, k))


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.diff{background:#fff4d6}.warn{background:#fde2e1;border:1px solid #e99;padding:8px 12px}
.ok{color:#1a7f37}.no{color:#b42318}.curves{display:flex;flex-wrap:wrap;gap:12px}
.curve svg{width:520px;height:auto}figure{display:inline-block;margin:6px;text-align:center}
figure img{max-width:420px;image-rendering:pixelated;border:1px solid #ccc}
figcaption{font-size:12px;color:#555}code{font-size:12px}
"""


def _runs_table(runs: list[_Run]) -> str:
    rows = ["<tr><th>run</th><th>run id</th><th>experiment</th><th>status</th><th>start (UTC)"
            "</th><th>duration</th><th>dag / stage / kind</th></tr>"]
    for r in runs:
        what = " / ".join(r.tags.get(t, "") for t in ("vgen.dag", "vgen.stage", "vgen.kind"))
        rows.append(f"<tr><td>{_esc(r.name)}</td><td><code>{_esc(r.id)}</code></td>"
                    f"<td>{_esc(r.experiment)}</td><td>{_esc(r.status)}</td>"
                    f"<td>{_time(r.start_ms)}</td><td>{_duration(r)}</td>"
                    f"<td>{_esc(what.strip(' /'))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _header_row(runs: list[_Run], first: str) -> str:
    return f"<tr><th>{first}</th>" + "".join(f"<th>{_esc(r.label)}</th>" for r in runs) + "</tr>"


def _eval_section(runs: list[_Run]) -> str:
    evaluated = [r for r in runs if "vgen.eval.extractor" in r.tags]
    if not evaluated:
        return ""
    names = {r.tags["vgen.eval.extractor"] for r in evaluated}
    out = ["<h2>Evaluation</h2>"]
    if len(names) > 1:
        out.append(f"<p class='warn'>These runs used different feature extractors "
                   f"({_esc(', '.join(sorted(names)))}): their FID / IS / precision / recall are "
                   "<b>not comparable</b> with each other.</p>")
    out.append("<table>" + _header_row(runs, ""))
    for tag, title in (("vgen.eval.extractor", "extractor"),
                       ("vgen.eval.reference", "reference"),
                       ("vgen.eval.reference_cached", "reference from cache"),
                       ("vgen.eval.comparable_to_published", "comparable to published")):
        cells = []
        for r in runs:
            v = r.tags.get(tag)
            if tag.endswith("comparable_to_published") and v is not None:
                cls = "ok" if v == "true" else "no"
                cells.append(f"<td class='{cls}'>{_esc(v)}</td>")
            else:
                cells.append(f"<td>{_esc(v) if v is not None else '&mdash;'}</td>")
        out.append(f"<tr><th>{title}</th>{''.join(cells)}</tr>")
    out.append("</table>")
    return "".join(out)


#: segmentation scores (evaluate.panoptic / evaluate.vicas, x100): (metric, row label, format)
_SEGMENTATION = [(f"{m}{sfx}", f"{m} {grp}", "{:.1f}") for grp, sfx in
                 (("All", ""), ("Things", "_th"), ("Stuff", "_st")) for m in ("PQ", "SQ", "RQ")]
_SEGMENTATION += [(f"track_{m}", f"track {m}", "{:.2f}") for m in ("mAP", "AP50", "AP75", "AP90")]


def _segmentation_section(runs: list[_Run]) -> str:
    """PQ / SQ / RQ (All / Things / Stuff) and LG-VIS track mAP, as the official scorers print
    them (panopticapi: one decimal), with the curated table version they were scored against."""
    rows = [r for r in _SEGMENTATION if any(r[0] in run.metrics for run in runs)]
    if not rows:
        return ""
    out = ["<h2>Segmentation</h2><table>" + _header_row(runs, "")]
    for key, label, fmt in rows:
        cells = "".join(f"<td class='num'>{fmt.format(r.metrics[key])}</td>" if key in r.metrics
                        else "<td>&mdash;</td>" for r in runs)
        out.append(f"<tr><th>{_esc(label)}</th>{cells}</tr>")
    cells = "".join(f"<td><code>{_esc(r.tags.get('vgen.lineage.curated.uri', '—'))}"
                    f"@v{_esc(r.tags.get('vgen.lineage.curated.version', '?'))}</code></td>"
                    for r in runs)
    out.append(f"<tr><th>ground truth</th>{cells}</tr></table>")
    return "".join(out)


def _params_section(runs: list[_Run]) -> str:
    keys = sorted(set().union(*(r.params for r in runs)))
    differ = [k for k in keys if len({r.params.get(k) for r in runs}) > 1]
    same = [k for k in keys if k not in differ]
    out = ["<h2>Params</h2>"]
    if len(runs) > 1:
        out.append(f"<p>{len(differ)} of {len(keys)} params differ between the runs.</p>")
    shown = differ if len(runs) > 1 else keys
    if shown:
        out.append("<table>" + _header_row(runs, "param"))
        for k in shown:
            cells = "".join(f"<td class='diff'>{_esc(r.params.get(k, '—'))}</td>" if len(runs) > 1
                            else f"<td>{_esc(r.params.get(k, '—'))}</td>" for r in runs)
            out.append(f"<tr><td><code>{_esc(k)}</code></td>{cells}</tr>")
        out.append("</table>")
    if same and len(runs) > 1:
        out.append(f"<details><summary>{len(same)} identical params</summary><table>"
                   "<tr><th>param</th><th>value</th></tr>")
        out.extend(f"<tr><td><code>{_esc(k)}</code></td><td>{_esc(runs[0].params[k])}</td></tr>"
                   for k in same)
        out.append("</table></details>")
    return "".join(out)


def _metrics_section(runs: list[_Run]) -> str:
    keys = sorted(set().union(*(r.metrics for r in runs)))
    if not keys:
        return "<h2>Final metrics</h2><p>No metrics.</p>"
    out = ["<h2>Final metrics</h2><table>" + _header_row(runs, "metric")]
    for k in keys:
        cells = "".join(f"<td class='num'>{_fmt(r.metrics.get(k))}</td>" for r in runs)
        out.append(f"<tr><td><code>{_esc(k)}</code></td>{cells}</tr>")
    out.append("</table>")
    return "".join(out)


def _curves_section(runs: list[_Run], max_curves: int) -> str:
    keys = _sort_curves(set().union(*(r.curves for r in runs)))
    if not keys:
        return ""
    out = ["<h2>Curves</h2><div class='curves'>"]
    for k in keys[:max_curves]:
        out.append(f"<div class='curve' data-metric='{_esc(k)}'>{_curve_svg(k, runs)}</div>")
    out.append("</div>")
    if len(keys) > max_curves:
        out.append(f"<p>{len(keys) - max_curves} more curves not shown: "
                   f"{_esc(', '.join(keys[max_curves:]))}</p>")
    return "".join(out)


def _images_section(runs: list[_Run]) -> str:
    if not any(r.images for r in runs):
        return ""
    out = ["<h2>Images</h2>"]
    for r in runs:
        if not r.images:
            continue
        out.append(f"<h3>{_esc(r.label)}</h3>")
        for img in r.images:
            data = base64.b64encode(img.png).decode()
            step = f" (step {img.step})" if img.step is not None else ""
            out.append(f"<figure><img alt='{_esc(img.key)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{_esc(img.key)}{step}</figcaption></figure>")
    return "".join(out)


def _lineage_section(runs: list[_Run]) -> str:
    keys = sorted({k for r in runs for k in r.tags if k.startswith("vgen.lineage.")})
    if not keys:
        return ""
    out = ["<h2>Lineage</h2><table>" + _header_row(runs, "tag")]
    for k in keys:
        cells = "".join(f"<td><code>{_esc(r.tags.get(k, '—'))}</code></td>" for r in runs)
        out.append(f"<tr><td>{_esc(k[len('vgen.lineage.'):])}</td>{cells}</tr>")
    out.append("</table>")
    return "".join(out)


def render(runs: list[_Run], tracking_uri: str, *, max_curves: int = 16) -> str:
    """The HTML page for already collected runs."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<h1>vgen report: {len(runs)} run{'s' if len(runs) != 1 else ''}</h1>",
        f"<p>Tracking store <code>{_esc(tracking_uri)}</code>, generated {now}.</p>",
        "<h2>Runs</h2>", _runs_table(runs), _eval_section(runs), _segmentation_section(runs),
        _metrics_section(runs),
        _curves_section(runs, max_curves), _images_section(runs), _params_section(runs),
        _lineage_section(runs),
    ]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>vgen report</title><style>{_CSS}</style></head><body>"
            + "\n".join(b for b in body if b) + "</body></html>\n")


def write_report(run_ids: Sequence[str], tracking_uri: str, out_path: str | os.PathLike,
                 *, max_images_per_run: int = 8, max_curves: int = 16) -> Path:
    """Write the comparison page of ``run_ids`` (see the module docstring); returns its path.

    Raises ValueError when no run id is given or one is not in the store."""
    from mlflow import MlflowClient

    if not run_ids:
        raise ValueError("write_report: give at least one run id")
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = [_collect(client, rid, max_images=max_images_per_run)
            for rid in dict.fromkeys(run_ids)]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs, tracking_uri, max_curves=max_curves), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report`` to ``vgen``'s subcommands (``subparsers`` from add_subparsers)."""
    p = subparsers.add_parser(
        "report", help="write a static HTML page comparing MLflow runs",
        description="Params diff, final metrics, metric curves (SVG) and image artifacts "
        "(base64) of the given runs in one self-contained HTML file.")
    p.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="MLflow run ids to compare")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (env MLFLOW_TRACKING_URI); default: the MLflow "
                        "store of --storage")
    p.add_argument("--storage", default=os.environ.get("VGEN_STORAGE"),
                   help="storage root whose default MLflow store to read (env VGEN_STORAGE)")
    p.add_argument("--out", default="report.html", help="output file (default report.html)")
    p.add_argument("--max-images", type=int, default=8, help="images per run (default 8)")
    p.set_defaults(handler=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """0: written; 2: no tracking store given, or a run is unknown."""
    import sys

    uri = args.tracking_uri
    if not uri and args.storage:
        from vgen_core.data import TableStore
        from vgen_core.tracking import default_tracking_uri

        uri = default_tracking_uri(TableStore(args.storage).root)
    if not uri:
        print("vgen report: give --tracking-uri (or --storage, or set MLFLOW_TRACKING_URI)",
              file=sys.stderr)
        return 2
    try:
        path = write_report(args.run_ids, uri, args.out, max_images_per_run=args.max_images)
    except ValueError as e:
        print(f"vgen report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(args.run_ids)} runs)")
    return 0
