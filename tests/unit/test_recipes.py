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
        if spec.uses == "import.weights":  # a released checkpoint: the family has that size
            fam = families.get(cfg.model)
            assert cfg.size in fam.sizes, (name, cfg.size)
            fam.config(cfg.size, **cfg.overrides)


def test_there_are_recipes_for_every_generator_family():
    found = set()
    for path in CONFIGS:
        dag = load_dag(path, storage="/tmp/x")
        found |= {families.get(dag.configs[n].model).name for n in dag.order
                  if dag.stage(n).uses == "train.generator"}
    assert set(families.names("generator")) <= found


def test_released_weight_recipes():
    """The recipes that start from released weights name the released sizes, and the released
    sampler settings RAR-B is evaluated with are keyword arguments its sampler takes."""
    import inspect

    from pipelines.stages.evaluate_generation import released_size

    root = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "recipes"
    seen = {}
    for name in ("released_titok_l32_tokenize", "released_maskbit_12bit_tokenize",
                 "released_rar_b_eval"):
        dag = load_dag(root / f"{name}.yaml", storage="/tmp/x")
        for n in dag.order:
            cfg = dag.configs[n]
            if getattr(cfg, "weights", None):
                seen[(name, n)] = (cfg.model or "", cfg.size)
    assert seen == {
        ("released_titok_l32_tokenize", "ids"): ("titok", "titok-l32"),
        ("released_maskbit_12bit_tokenize", "bits"): ("lfq", "maskbit-k12"),
        ("released_rar_b_eval", "vqgan"): ("maskgit-vqgan", "maskgit-vqgan-f16-256"),
        ("released_rar_b_eval", "rar"): ("rar", "B"),
    }
    rar = families.get("rar")
    gen_cfg = {"family": "rar", **rar.config("B").model_dump(mode="json")}
    assert released_size(rar, gen_cfg) == "B"
    assert rar.sampler is not None
    takes = inspect.signature(rar.sampler).parameters
    assert set(rar.sampling["B"]) <= set(takes)
    # evaluate.generation: the released settings of the size, with.sampler on top
    from pipelines.stages.base import StageContext
    from pipelines.stages.evaluate_generation import EvaluateGeneration, EvaluateGenerationConfig
    from vgen_core.data import TableStore

    ctx = StageContext(dag="t", stage="eval", store=TableStore("/tmp/x"), row_fingerprint="f",
                       inputs={})
    stage = EvaluateGeneration(EvaluateGenerationConfig(sampler={"temperature": 1.5}), ctx)
    assert stage.sampler_options(rar, gen_cfg) == ("B", {**rar.sampling["B"], "temperature": 1.5})
    tiny = {"family": "rar", **rar.config("tiny").model_dump(mode="json")}
    assert stage.sampler_options(rar, tiny) == (None, {"temperature": 1.5})
