"""Incremental re-tokenization through `vgen run` on a real local Ray cluster.

100 source images -> ingest.images (1 crop each) -> tokenize.fsq (binary-FSQ bit tokens).
Modify 1% of the sources and delete one: only the modified sample is recomputed and the served
table (training_dataset) is exactly the current samples. Switch the tokenizer config: every
sample is recomputed into a new side table and the old one stays readable."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import ROOT, vgen_cmd
from vgen_core.data import TableStore
from vgen_core.data.sample_images import PHOTOS, load_photo, to_rgb

N = 100


def write_sources(folder: Path) -> None:
    """ImageFolder layout: 10 class folders of 10 images (labels stay put when one is deleted)."""
    rng = np.random.default_rng(0)
    for i in range(N):
        rgb = to_rgb(load_photo(PHOTOS[i % len(PHOTOS)]))
        h, w = rgb.shape[:2]
        s = int(min(h, w) * 0.5)
        y, x = rng.integers(0, h - s), rng.integers(0, w - s)
        cls = folder / f"class{i % 10}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb[y:y + s, x:x + s]).resize((40, 40)).save(cls / f"src{i:03d}.png")


def make_dag(tmp: Path, images: Path, tokens: dict) -> Path:
    dag = {"name": "tok", "chunk_size": 25, "error_budget": 0.0, "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": str(images), "crops_per_image": 1, "size": 32,
                            "min_scale": 0.9, "max_scale": 0.9}},
        "tokens": {"uses": "tokenize.fsq", "needs": ["images"], "with": tokens,
                   "resources": {"batch_size": 10}},
    }}
    p = tmp / "tok.yaml"
    p.write_text(yaml.safe_dump(dag))
    return p


def vgen(*args: str, env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(vgen_cmd() + list(args), env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    if p.returncode:
        print(p.stdout[-5000:], p.stderr[-10000:])
    return p


def stage_counts(dag: Path, storage: Path, env: dict) -> dict:
    p = vgen("status", str(dag), "--storage", str(storage), "--json", env=env)
    assert p.returncode == 0
    return {s["stage"]: s for s in json.loads(p.stdout)["stages"]}


def test_one_percent_changed_one_deleted_then_tokenizer_switch(ray_cluster, tmp_path):
    import ray

    from pipelines.stages.base import OutputRef
    from pipelines.stages.reading import IncompatibleSideTable, training_dataset

    images, storage = tmp_path / "images", tmp_path / "store"
    write_sources(images)
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    cfg = {"size": "tiny", "init_seed": 0, "flip": True}
    dag = make_dag(tmp_path, images, cfg)
    assert vgen("run", str(dag), "--storage", str(storage), env=env).returncode == 0
    st = stage_counts(dag, storage, env)
    assert st["tokens"]["counts"]["processed"] == N
    store = TableStore(str(storage))
    (side,) = store.list_tables("tok/tokens")
    first = {r["sample_id"]: r for r in store.read(side).to_pylist()}

    # 1% modified, one deleted (ingest ids: the escaped path under root, then the crop)
    CHANGED, DELETED, SAME = ("images/class7%2Fsrc007.png-c0", "images/class2%2Fsrc042.png-c0",
                              "images/class8%2Fsrc008.png-c0")
    path = images / "class7" / "src007.png"
    Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    (images / "class2" / "src042.png").unlink()
    assert vgen("run", str(dag), "--storage", str(storage), env=env).returncode == 0
    st = stage_counts(dag, storage, env)
    assert st["tokens"]["counts"] == {"processed": 1, "skipped": N - 2, "quarantined": 0,
                                      "filtered": 0}
    assert store.list_tables("tok/tokens") == [side]

    # the served table: exactly the current samples, the changed one with its new tokens
    outs = {k: OutputRef.from_json(v) for k, v in st["tokens"]["outputs"].items()}
    ray.init(address=ray_cluster, ignore_reinit_error=True, log_to_driver=False)
    try:
        served = training_dataset(store, outs["source"], outs["samples"],
                                  {"hflip": True, "resolution": 32}).to_arrow_refs()
        served = pa.concat_tables(ray.get(served)).to_pylist()
        curated = {r["sample_id"]: r["content_digest"]
                   for r in store.read("tok/images", columns=["sample_id",
                                                              "content_digest"]).to_pylist()}
        assert len(curated) == N - 1 and DELETED not in curated
        assert {r["sample_id"]: r["content_digest"] for r in served} == curated
        changed = next(r for r in served if r["sample_id"] == CHANGED)
        assert changed["content_digest"] != first[CHANGED]["content_digest"]
        same = next(r for r in served if r["sample_id"] == SAME)
        assert same["indices"] == first[SAME]["indices"]
        # the changed sample's tokens are the tokenizer's encoding of the new crop
        from vgen_core.data.images import decode_image, preprocess
        from vgen_core.tokenizers.fsq import bar_fsq_config

        imgs = store.read("tok/images")
        png = imgs.filter(pc.equal(imgs["sample_id"], CHANGED))["image_png"][0]
        torch.manual_seed(0)
        model = bar_fsq_config("tiny").build().eval()
        x = torch.from_numpy(preprocess(decode_image(png.as_py()), 32)).permute(2, 0, 1)
        with torch.no_grad():
            _, _, idx = model.encode(x[None].float() / 127.5 - 1.0)
        assert changed["indices"] == idx[0].tolist()

        with pytest.raises(IncompatibleSideTable, match="made from 32x32 crops"):
            training_dataset(store, outs["source"], outs["samples"], {"resolution": 64})

        # switch the tokenizer config: the plan says every sample is stale-tokenizer
        dag = make_dag(tmp_path, images, {**cfg, "init_seed": 1, "flip": False})
        p = vgen("plan", str(dag), "--storage", str(storage), "--format", "json", env=env)
        plan = {s["stage"]: s for s in json.loads(p.stdout)["stages"]}
        assert plan["tokens"]["breakdown"] == {"new": 0, "changed": 0,
                                               "stale_tokenizer": N - 1}
        assert vgen("run", str(dag), "--storage", str(storage), env=env).returncode == 0
        st = stage_counts(dag, storage, env)
        assert st["tokens"]["counts"]["processed"] == N - 1
        tables = store.list_tables("tok/tokens")
        assert len(tables) == 2 and side in tables
        new_side = next(t for t in tables if t != side)
        assert store.read(new_side).num_rows == N - 1
        assert store.read(side).num_rows == N + 1  # old table untouched (gc not run)
        outs2 = {k: OutputRef.from_json(v) for k, v in st["tokens"]["outputs"].items()}
        with pytest.raises(IncompatibleSideTable, match="flip: true"):
            training_dataset(store, outs2["source"], outs2["samples"], {"hflip": True})
        assert training_dataset(store, outs2["source"], outs2["samples"]).count() == N - 1
        # the old table is still served for the same curated version
        assert training_dataset(store, outs["source"], outs["samples"]).count() == N - 1
    finally:
        ray.shutdown()
