"""A real browser (headless Chromium) on `vgen ui` and on a `vgen report` page: the MLflow UI
renders the stage run (its name and metrics) and the experiment's runs table, and the static
report renders its metrics table and image grid, checked in the rendered DOM and a screenshot.

Needs a Chromium binary (``VGEN_CHROMIUM``, else ``chromium`` / ``chromium-browser`` /
``google-chrome`` on PATH; Debian: ``apt-get install chromium``); skipped without one."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, serve_ui, vgen_cmd

pytestmark = pytest.mark.slow


def chromium() -> str | None:
    if os.environ.get("VGEN_CHROMIUM"):
        return os.environ["VGEN_CHROMIUM"]
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome",
                                                "chrome", "headless_shell")) if p), None)


BROWSER = chromium()
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no Chromium (apt-get install "
                                   "chromium, or set VGEN_CHROMIUM)")


def browse(url: str, tmp_path, *, wait_ms: int = 20000) -> tuple[str, np.ndarray]:
    """(DOM after scripts ran, screenshot as an RGB array) of ``url`` in headless Chromium."""
    base = [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", "--no-first-run", "--window-size=1400,1000",
            f"--user-data-dir={tmp_path / 'chrome-profile'}",
            f"--virtual-time-budget={wait_ms}"]
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-3000:]
    shot = tmp_path / "shot.png"
    shot.unlink(missing_ok=True)
    p = subprocess.run(base + [f"--screenshot={shot}", url], capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0 and shot.exists(), p.stderr[-3000:]
    return dom.stdout, np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"))


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
