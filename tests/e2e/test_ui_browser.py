"""A real browser (headless Chromium) on `vgen ui` and on a `vgen report` page: the MLflow UI
renders the stage run (its name and metrics) and the experiment's runs table, opens vgen's links
in its model-training layout with the training curves and sample grid as the run's first chart
section (docs/tracking.md), and the static report renders its metrics table and image grid,
checked in the rendered DOM and a screenshot.

Needs a Chromium binary (``VGEN_CHROMIUM``, else ``chromium`` / ``chromium-browser`` /
``google-chrome`` on PATH; Debian: ``apt-get install chromium``); skipped without one."""

from __future__ import annotations

import html
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, serve_ui, vgen_cmd


def chromium() -> str | None:
    if os.environ.get("VGEN_CHROMIUM"):
        return os.environ["VGEN_CHROMIUM"]
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome",
                                                "chrome", "headless_shell")) if p), None)


BROWSER = chromium()
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no Chromium (apt-get install "
                                   "chromium, or set VGEN_CHROMIUM)")


def _chromium_args(tmp_path, wait_ms: int) -> list[str]:
    return [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", "--no-first-run", "--window-size=1400,1000",
            f"--user-data-dir={tmp_path / 'chrome-profile'}",
            f"--virtual-time-budget={wait_ms}"]


def dump_dom(url: str, tmp_path, *, wait_ms: int = 20000) -> str:
    """The DOM of ``url`` after its scripts ran, in headless Chromium."""
    dom = subprocess.run(_chromium_args(tmp_path, wait_ms) + ["--dump-dom", url],
                         capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-3000:]
    return dom.stdout


def browse(url: str, tmp_path, *, wait_ms: int = 20000) -> tuple[str, np.ndarray]:
    """(DOM after scripts ran, screenshot as an RGB array) of ``url`` in headless Chromium."""
    base = _chromium_args(tmp_path, wait_ms)
    dom = dump_dom(url, tmp_path, wait_ms=wait_ms)
    shot = tmp_path / "shot.png"
    shot.unlink(missing_ok=True)
    p = subprocess.run(base + [f"--screenshot={shot}", url], capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0 and shot.exists(), p.stderr[-3000:]
    return dom, np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"))


def assert_not_blank(img: np.ndarray) -> None:
    """A rendered page: many colours, and not one colour over (almost) everything."""
    flat = img.reshape(-1, 3)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    assert len(colours) > 50, len(colours)
    assert counts.max() / len(flat) < 0.97


@pytest.fixture
def storage_with_run(tmp_path):
    """A storage root whose MLflow store holds a DAG run with a stage run: metrics over steps,
    params, lineage tags and a sample grid (red left half, green right half)."""
    from vgen_core.data import TableStore
    from vgen_core.tracking import MlflowTracker, default_tracking_uri

    root = tmp_path / "store"
    uri = default_tracking_uri(TableStore(str(root)).root)
    dag = MlflowTracker.start(uri, "browser-dag", "browser-run", fallback_dir=tmp_path / "fb")
    stage = dag.child("maskgit")
    stage.log_params({"train": {"lr": 0.002, "steps": 5}})
    for step in range(1, 6):
        stage.log_metrics({"train/loss": 5.0 / step}, step=step)
    stage.log_metrics({"fid": 42.5})
    grid = np.zeros((64, 64, 3), np.uint8)
    grid[:, :32, 0] = 255
    grid[:, 32:, 1] = 255
    stage.log_image("samples_grid", grid, step=5)
    stage.set_tags({"vgen.lineage.curated.version": "3"})
    stage.finish()
    dag.finish()
    return root, uri, dag, stage


@needs_browser
def test_mlflow_ui_renders_the_run(storage_with_run, tmp_path):
    root, _, _, stage = storage_with_run
    with serve_ui(root) as url:
        dom, shot = browse(f"{url}/#/experiments/{stage.experiment_id}/runs/{stage.run_id}",
                           tmp_path)
        assert "maskgit" in dom  # the stage run's name, rendered by the React app
        assert "train/loss" in dom or "fid" in dom, dom[-2000:]
        assert_not_blank(shot)
        # the experiment's training-runs table lists the DAG run
        dom, _ = browse(f"{url}/#/experiments/{stage.experiment_id}/runs", tmp_path)
        assert "browser-run" in dom and "Training runs" in dom


@needs_browser
def test_report_page_renders_metrics_and_grids(storage_with_run, tmp_path):
    root, uri, _, stage = storage_with_run
    out = tmp_path / "report.html"
    p = subprocess.run(vgen_cmd() + ["report", stage.run_id, "--tracking-uri", uri, "--out",
                                     str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    dom, shot = browse(out.as_uri(), tmp_path, wait_ms=2000)
    assert ">42.5</td>" in dom and "samples_grid" in dom
    assert_not_blank(shot)
    # the inlined grid is drawn: some pixels are the pure red and pure green of its halves
    flat = shot.reshape(-1, 3).astype(int)
    red = ((flat[:, 0] > 240) & (flat[:, 1] < 15) & (flat[:, 2] < 15)).sum()
    green = ((flat[:, 1] > 240) & (flat[:, 0] < 15) & (flat[:, 2] < 15)).sum()
    assert red > 100 and green > 100, (red, green)


# ------------------------------------------------------------------ the model-training layout

#: MLflow 3.17's GenAI navigation (sidebar entries and tabs) that model training does not show
GENAI_ONLY = ("Evaluation runs", "Sessions", "Judges", "Prompts &amp; versions", "Playground",
              "Agent versions")


#: what the training stage run of `storage_with_training_run` logs at every step: its curves
CURVES = ("train/loss", "train/lr", "train/samples_per_second")


@pytest.fixture
def storage_with_training_run(tmp_path):
    """A storage root whose MLflow store holds a DAG run with a training stage run named as
    docs/tracking.md lays one out: curves over steps under `train/`, a step-logged sample grid
    beside them, and the values logged once (final values, counts, a score) without a `/`."""
    from vgen_core.data import TableStore
    from vgen_core.tracking import MlflowTracker, default_tracking_uri

    root = tmp_path / "store"
    uri = default_tracking_uri(TableStore(str(root)).root)
    dag = MlflowTracker.start(uri, "layout-dag", "layout-run", fallback_dir=tmp_path / "fb")
    stage = dag.child("maskgit")
    stage.log_params({"train": {"lr": 0.002, "steps": 5}})
    for step in range(1, 6):
        stage.log_metrics(dict(zip(CURVES, (5.0 / step, 0.002 * step, 100.0 + step))), step=step)
    stage.log_image("train/samples_grid", np.full((64, 64, 3), 128, np.uint8), step=5)
    stage.log_metrics({"fid": 42.5, "final.loss": 1.0, "final.step": 5, "processed": 40,
                       "seconds": 3.5})
    stage.finish()
    dag.finish()
    return root, uri, dag, stage


def chart_sections(dom: str) -> list[tuple[str, str]]:
    """The run page's chart sections in page order: (name, the text of its charts)."""
    parts = re.split(r'data-testid="experiment-view-compare-runs-section-header"', dom)[1:]
    out = []
    for part in parts:
        texts = [t.strip() for t in re.findall(r">([^<>]+)<", part)]
        texts = [html.unescape(t) for t in texts if t]
        out.append((texts[0], " | ".join(texts[1:])))
    return out


@needs_browser
def test_vgen_experiment_opens_in_the_model_training_layout(storage_with_training_run,
                                                            tmp_path):
    from mlflow.tracking import MlflowClient

    from vgen_core.tracking import mlflow_ui_url

    root, uri, dag, _ = storage_with_training_run
    tags = MlflowClient(tracking_uri=uri).get_experiment(dag.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    with serve_ui(root) as url:
        dom = dump_dom(mlflow_ui_url(url, dag.experiment_id), tmp_path)
    # the experiment opens on its training-runs table, with the model-training navigation
    assert "layout-run" in dom, dom[-3000:]
    assert "Model registry" in dom and ">Runs<" in dom and ">Models<" in dom
    shown = [entry for entry in GENAI_ONLY if entry in dom]
    assert not shown, shown


@needs_browser
def test_run_charts_start_with_the_training_curves_and_grid(storage_with_training_run,
                                                            tmp_path):
    from vgen_core.tracking import mlflow_ui_url

    root, _, _, stage = storage_with_training_run
    with serve_ui(root) as url:
        link = mlflow_ui_url(url, stage.experiment_id, stage.run_id, "model-metrics")
        for wait_ms in (20000, 40000, 60000):  # charts render lazily: on a busy machine, later
            dom = dump_dom(link, tmp_path, wait_ms=wait_ms)
            if f"maskgit ({CURVES[-1]})" in dom:
                break
    assert not [entry for entry in GENAI_ONLY if entry in dom]
    sections = chart_sections(dom)
    names = [name for name, _ in sections]
    # MLflow: one section per metric-name prefix (sorted), then "Model metrics" (names without
    # a '/', here the values logged once), then "System metrics"
    assert names[:2] == ["train", "Model metrics"], names
    first = sections[0][1]
    for key in CURVES:  # line charts over steps: "<run> (<metric>)" traces on a Step axis
        assert f"maskgit ({key})" in first, first
    assert "Step" in first and "train/samples_grid" in first, first
    assert "maskgit (fid)" not in first and "final.loss" not in first

