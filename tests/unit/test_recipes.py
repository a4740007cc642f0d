"""Every DAG under pipelines/configs validates (stage kinds, configs, needs) and names model
sizes and families that exist, so a recipe fails here rather than on a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.dag.spec import load_dag
from vgen_core import families
from vgen_core.training.tasks import get_task

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "pipelines" / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_validates(path, tmp_path):
    dag = load_dag(path, storage=str(tmp_path / "s"))
    for name in dag.order:
        spec, cfg = dag.stage(name), dag.configs[name]
        if spec.uses.startswith("train."):
            task = get_task(cfg.model)
            task.config_json(cfg.size, cfg.overrides)  # the size exists, overrides validate
            assert (spec.uses == "train.tokenizer") == (task.kind == "tokenizer"), name
        if spec.uses in ("tokenize.fsq", "tokenize.titok", "cache.latents", "tokenize.lfq",
                         "tokenize.deltatok") and cfg.model is not None:
            from pipelines.stages import get_kind

            assert families.get(cfg.model).name in get_kind(spec.uses).accepted_families()


def test_there_are_recipes_for_every_generator_family():
    found = set()
    for path in CONFIGS:
        dag = load_dag(path, storage="/tmp/x")
        found |= {families.get(dag.configs[n].model).name for n in dag.order
                  if dag.stage(n).uses == "train.generator"}
    assert set(families.names("generator")) <= found
