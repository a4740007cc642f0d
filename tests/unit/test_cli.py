"""CLI behaviour that needs no Ray: exit codes and messages for bad DAGs and storage, plan and
status output on a fresh root."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipelines.cli import main

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "demo.yaml"


def test_invalid_dag_exit_2(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "stages": {"a": {"uses": "nope"}}}))
    assert main(["run", str(p), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "stage 'a'" in err and "known kinds" in err
    assert not (tmp_path / "s").exists()  # nothing computed, nothing written


def test_unwritable_storage_exit_2_before_compute(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a folder")
    assert main(["run", str(DEMO), "--storage", str(blocker / "root")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_plan_and_status_on_fresh_root(tmp_path, capsys):
    root = str(tmp_path / "root")
    assert main(["plan", str(DEMO), "--storage", root, "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    states = {s["stage"]: (s["state"], s["reason"]) for s in plan["stages"]}
    assert states["images"] == ("to-run", "never ran")
    assert states["tokens"][0] == "to-run" and "upstream" in states["tokens"][1]
    assert main(["status", str(DEMO), "--storage", root, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in st["stages"]] == ["pancap", "vicas", "images", "tokenizer",
                                                  "tokens", "generator", "eval"]
    assert st["tracking_uri"] == f"sqlite:///{tmp_path / 'root'}/mlflow.db"


def test_help_mentions_every_command(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "plan", "status", "ui"):
        assert cmd in out


def test_the_command_exits_with_mains_code_and_all_its_output(tmp_path) -> None:
    """`vgen` (pipelines.cli.entry) ends with os._exit after main: the exit code is main's and
    nothing printed is lost (streams flushed first), piped or not."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "pipelines.cli", "families"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "maskgit" in ok.stdout.lower() and ok.stdout.endswith("\n")
    bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "plan",
                          str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert "missing.yaml" in bad.stderr
