"""Soak: one DAG run again and again over a folder of images edited between runs (seeded random
edits: add a file, delete one, change one's pixels, touch one without changing it, rename one,
break one, repair one). After every run each listed image's samples are in the table exactly
once with its current pixels, each undecodable file is quarantined, and at the end the tables
equal a fresh run's over the final files. The slow variant runs 20 times and kills some runs at a
random fault point (:mod:`vgen_core.faults`) before the run that follows.

The runs are in this process (``executor="local"``: the same planning and commit code as
``vgen run``, without Ray start-up or MLflow), so a run takes about a second of work; the killed
runs are subprocesses (SIGKILL has to hit a process of its own).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_output
from tests.e2e.test_chaos import (CROPS, DAG_NAME, _env, check_readable, make_dag,
                                  run_inprocess, run_subprocess, snapshot)
from vgen_core.data import TableStore

CLASSES = ("cats", "dogs")
#: points a killed soak run may die at (the n-th hit is drawn too)
KILL_POINTS = ("before_data_commit", "after_data_commit", "after_quarantine_commit",
               "before_sources_record", "after_sources_record", "before_source_delete",
               "after_table_commit", "before_stage_completed")


class Folder:
    """The image folder and the seeded edits made to it."""

    def __init__(self, root: Path, seed: int):
        self.root, self.rng, self.serial = root, np.random.default_rng(seed), 0
        self.clock = time.time() - 10_000  # mtimes from here on, one second apart
        for c in CLASSES:
            (root / c).mkdir(parents=True, exist_ok=True)
        for _ in range(6):
            self._write(self._new_name(), broken=False)
        self._write(self._new_name(), broken=True)

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*.png"))

    def _new_name(self) -> Path:
        self.serial += 1
        return self.root / CLASSES[int(self.rng.integers(len(CLASSES)))] / f"im{self.serial:03d}.png"

    def _stamp(self, path: Path) -> None:
        # every edit gets a new mtime, whatever the file system's mtime resolution (the stamp is
        # size + mtime; same size and mtime is the documented blind spot, not tested here)
        self.clock += 1
        os.utime(path, (self.clock, self.clock))

    def _write(self, path: Path, broken: bool) -> None:
        if broken:
            path.write_bytes(b"not an image " + bytes(self.rng.integers(0, 256, 8, np.uint8)))
        else:
            side = int(self.rng.integers(24, 48))
            px = self.rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(px).save(path)
        self._stamp(path)

    def edit(self) -> str:
        files = self.files()
        kinds = ["add", "delete", "pixels", "touch", "rename", "break", "repair"]
        kind = str(self.rng.choice(kinds))
        if kind != "add" and len(files) < 3:
            kind = "add"
        pick = files[int(self.rng.integers(len(files)))] if files else None
        if kind == "add":
            self._write(self._new_name(), broken=bool(self.rng.random() < 0.2))
        elif kind == "delete":
            pick.unlink()
        elif kind in ("pixels", "repair"):
            self._write(pick, broken=False)
        elif kind == "break":
            self._write(pick, broken=True)
        elif kind == "touch":
            self._stamp(pick)
        elif kind == "rename":
            target = self._new_name()
            pick.rename(target)
            self._stamp(target)  # rename keeps the mtime; a new name is a new item anyway
        return f"{kind} {pick.relative_to(self.root) if pick and kind != 'add' else ''}".strip()

    def decodes(self, path: Path) -> bool:
        try:
            with Image.open(path) as im:
                im.load()
            return True
        except Exception:  # anything PIL refuses is quarantined by the stage
            return False


def expected(folder: Folder) -> tuple[set[str], set[str]]:
    """(sample ids of the decodable files, of the undecodable ones)."""
    from pipelines.stages.ingest import image_sample_id
    from vgen_core.data.identity import escape_key

    good, bad = set(), set()
    for p in folder.files():
        ids = {image_sample_id("images", escape_key(str(p.relative_to(folder.root))), k)
               for k in range(CROPS)}
        (good if folder.decodes(p) else bad).update(ids)
    return good, bad


def check_run(storage: Path, folder: Folder) -> None:
    """Exactly once, right now: the listed images' ids, once each; the broken ones quarantined."""
    store = TableStore(str(storage))
    check_readable(storage, ("images",))
    good, bad = expected(folder)
    ids = store.read(f"{DAG_NAME}/images", columns=["sample_id"])["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == good, (
        f"missing {sorted(good - set(ids))[:4]}, unexpected {sorted(set(ids) - good)[:4]}")
    q = store.read(f"{DAG_NAME}/images__quarantine", columns=["sample_id", "check"])
    quarantined = set(q["sample_id"].to_pylist())
    assert bad <= quarantined, sorted(bad - quarantined)[:4]


def current_view(storage: Path, folder: Folder) -> dict[str, list[dict]]:
    """The snapshot without the quarantine rows of files that are gone or decode now: those
    stay in the quarantine table, where a fresh run has none (``SourceStage.finalize`` deletes a
    vanished item's rows and sources records, not its quarantine rows; a repaired file's rows are
    written and its old quarantine rows kept)."""
    _, bad = expected(folder)
    snap = snapshot(storage, ("images",))
    qname = f"{DAG_NAME}/images__quarantine"
    snap[qname] = [r for r in snap[qname] if r["sample_id"] in bad]
    return snap


def soak(tmp_path: Path, runs: int, seed: int, kill_every: int = 0) -> list[str]:
    folder = Folder(tmp_path / "images", seed)
    dag = make_dag(tmp_path / "soak.yaml", folder.root, None)
    storage = tmp_path / "store"
    rng = np.random.default_rng(seed + 1)
    log = []
    for i in range(runs):
        edits = "; ".join(folder.edit() for _ in range(int(rng.integers(1, 4)))) if i else "-"
        if kill_every and i % kill_every == kill_every - 1:
            fault = f"{rng.choice(KILL_POINTS)}:{int(rng.integers(1, 4))}"
            p = run_subprocess(dag, storage, "local", dict(_env(None), VGEN_FAULT=fault))
            assert p.returncode in (0, -signal.SIGKILL), run_output(p)[-4000:]
            edits += f" | {fault}: {'killed' if p.returncode else 'not reached'}"
            check_readable(storage, ("images",))
        log.append(f"run {i + 1}: {edits}")
        run_inprocess(dag, storage)
        check_run(storage, folder)
    fresh = tmp_path / "fresh"
    run_inprocess(dag, fresh)
    got, want = current_view(storage, folder), current_view(fresh, folder)
    for name in want:
        assert sorted(map(repr, got[name])) == sorted(map(repr, want[name])), (name, log)
    return log


def test_soak_three_runs(tmp_path):
    soak(tmp_path, runs=3, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_soak_twenty_runs_with_kills(tmp_path, seed):
    log = soak(tmp_path, runs=20, seed=seed, kill_every=4)
    print("\n".join(log))
