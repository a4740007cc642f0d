"""``vgen report``: two real MLflow runs in a temporary SQLite store -> one HTML page."""

from __future__ import annotations

import argparse
import base64
import re

import numpy as np
import pytest

from pipelines.report import add_report_parser, cmd_report, write_report
from vgen_core.tracking import MlflowTracker


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    runs = []
    for i, (lr, fid) in enumerate([(1e-3, 12.5), (2e-3, 9.25)]):
        t = MlflowTracker.start(uri, "report-test", f"run{i}", fallback_dir=root / "fallback")
        t.log_params({"train": {"lr": lr, "steps": 20}, "model": "maskgit"})
        for step in range(1, 6):
            t.log_metrics({"train/loss": 5.0 / step + i}, step=step)
        t.log_metrics({"fid": fid, "precision": 0.5 + i / 10})
        img = np.zeros((12, 12, 3), np.uint8)
        img[..., i] = 255  # run0 red, run1 green
        t.log_image("samples_grid", img)
        t.log_image("recon", img, step=3)
        t.set_tags({"vgen.eval.extractor": ["tiny-conv-seed0-v1", "inception-v3-fid-tf1"][i],
                    "vgen.lineage.generator.digest": f"digest{i}"})
        t.finish()
        runs.append(t.run_id)
    return uri, runs


def test_report_compares_two_runs(two_runs, tmp_path):
    uri, (a, b) = two_runs
    out = write_report([a, b], uri, tmp_path / "sub" / "report.html")
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert a in page and b in page
    # final metrics, run by run
    for v in ("12.5", "9.25", "0.5", "0.6"):
        assert f">{v}</td>" in page
    # params diff: lr differs, steps is folded into the identical ones
    assert "train.lr" in page and "0.001" in page and "0.002" in page
    assert "1 of 3 params differ" in page and "2 identical params" in page
    # a loss curve as inline SVG with one line per run
    curve = re.search(r"<div class='curve' data-metric='train/loss'>(<svg.*?</svg>)", page, re.S)
    assert curve is not None and curve.group(1).count("<path") >= 2
    # images inlined as base64 PNGs that decode
    imgs = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([^']+)'>", page)
    assert {k for k, _ in imgs} >= {"samples_grid", "recon"}
    assert all(base64.b64decode(d).startswith(b"\x89PNG") for _, d in imgs)
    assert "(step 3)" in page
    # different extractors are flagged; lineage shown
    assert "not comparable" in page and "digest0" in page and "digest1" in page


def test_report_cli_pair(two_runs, tmp_path, capsys):
    uri, (a, _) = two_runs
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "one.html"
    args = parser.parse_args(["report", a, "--tracking-uri", uri, "--out", str(out)])
    assert cmd_report(args) == 0 and a in out.read_text()
    args = parser.parse_args(["report", "0" * 32, "--tracking-uri", uri, "--out", str(out)])
    assert cmd_report(args) == 2
    assert "not found" in capsys.readouterr().err
