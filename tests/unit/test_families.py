"""The family registry: every family builds at its tiny size, trains one step through its loss,
and samples (generators) or encodes and decodes (tokenizers) with outputs of the declared shape
and pixel range; stages and benchmarks find families only through the specs."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch

from vgen_core import families
from vgen_core.families import FamilySpec, from_model_pixels, to_model_pixels

ROOT = Path(__file__).resolve().parents[2]
B = 2


def _tiny(spec: FamilySpec) -> str:
    return next(s for s in spec.sizes if "tiny" in s)


def _resolution(spec: FamilySpec, cfg) -> int:
    return spec.native_resolution(cfg) or 32


def _fast(sampler, **want):
    params = inspect.signature(sampler).parameters
    return {k: v for k, v in want.items() if k in params}


TRAINABLE = [s.name for s in families.all_specs() if "train" in s.capabilities]
GENERATORS = families.names("generator")
TOKENIZERS = [s.name for s in families.all_specs("tokenizer") if "encode" in s.capabilities]


def test_registry_lists_every_family_once_with_its_role():
    names = families.names()
    assert len(names) == len(set(names))
    assert {"lfq", "bar_fsq", "titok", "tatitok", "kl_vae", "deltatok"} <= set(
        families.names("tokenizer"))
    assert set(GENERATORS) == {"maskgit", "maskgen_vq", "maskbit", "rar", "bar", "deepflow",
                               "xar", "flowtok", "deltaworld", "flowar", "dimr",
                               "maskgen_kl"}
    assert families.get("maskgen").name == "maskgen_vq"  # the DAG's alias
    with pytest.raises(ValueError, match="not found; known: .*maskgit"):
        families.get("maskgitt")
    with pytest.raises(ValueError, match="is a generator, not a tokenizer"):
        families.get("rar", role="tokenizer")
    with pytest.raises(ValueError, match="cannot decode here; families that can: .*lfq"):
        families.get("tatitok", can="decode")
    for kind in ("tokenize.lfq", "tokenize.fsq", "tokenize.titok", "cache.latents",
                 "tokenize.deltatok", "train.tokenizer", "train.generator"):
        assert families.find(families.default_for(kind)) is not None


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_trainable_family_builds_tiny_and_takes_one_training_step(name, one_thread):
    spec = families.get(name)
    torch.manual_seed(0)
    model = spec.build(_tiny(spec), {}, {})
    assert type(model) is spec.model_class and model.family == spec.name
    # DeepSpeed broadcasts each parameter viewed as bytes: a 0-dim one fails at initialize
    assert [n for n, p in model.named_parameters() if p.ndim == 0] == []
    batch = spec.example_batch(model.config, B, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss, metrics = spec.loss(model, batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    opt.step()
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())


@pytest.mark.parametrize("name", GENERATORS)
def test_every_generator_samples_its_declared_output(name, one_thread):
    from vgen_core.generators.text import encode_text

    spec = families.get(name)
    torch.manual_seed(0)
    model = spec.build(_tiny(spec), {}, {}).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    opts = _fast(spec.sampler, steps=2, num_steps=2, min_steps=1, num_samples=3)
    if spec.conditioning == "labels":
        out = spec.sampler(model, torch.tensor([0, 1]), generator=g, **opts)
    elif spec.conditioning == "text":
        out = spec.sampler(model, encode_text(["a cat", "a dog"]), generator=g, **opts)
    else:  # context: observed delta tokens and their times
        ctx = torch.randn(B, 3, cfg.token_dim)
        out = spec.sampler(model, ctx, torch.arange(4.0).repeat(B, 1), generator=g, **opts)
    assert out.shape[0] == B and torch.isfinite(out.float()).all()
    if spec.output == "tokens":
        size = cfg.codebook_size if hasattr(cfg, "codebook_size") else 1 << cfg.token_bits
        assert out.shape == (B, cfg.seq_len) and not out.is_floating_point()
        assert int(out.min()) >= 0 and int(out.max()) < size
    elif spec.output == "latents":
        assert out.is_floating_point() and out.ndim in (3, 4)
    else:
        assert spec.output == "delta_tokens" and out.shape == (B, 3, 1, cfg.token_dim)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_every_tokenizer_encodes_and_decodes_in_its_pixel_range(name, one_thread):
    spec = families.get(name)
    torch.manual_seed(0)
    size = _tiny(spec)
    model = spec.build(size, {}, {}).eval()
    cfg = model.config
    assert spec.pixel_range in families.PIXEL_RANGES
    if spec.produces == ("delta_tokens",):  # encodes frozen-VFM features of a clip
        feats = torch.randn(1, 3, 4, cfg.hidden_size)
        with torch.inference_mode():
            delta = spec.encode(model, feats)["delta"]
        assert delta.shape[:2] == (1, 2)
        return
    r = _resolution(spec, cfg)
    images = torch.randint(0, 256, (B, r, r, 3), dtype=torch.uint8)
    x = to_model_pixels(images, spec.pixel_range)
    lo, hi = (-1.0, 1.0) if spec.pixel_range == "signed" else (0.0, 1.0)
    assert x.shape == (B, 3, r, r) and lo <= float(x.min()) and float(x.max()) <= hi
    with torch.inference_mode():
        out = spec.encode(model, x)
        made = spec.produces_kind(cfg)
        assert made in spec.produces
        if made == "latents":
            mean = out["moments"][:, : out["moments"].shape[1] // 2]
            codes, grid = mean * float(getattr(cfg, "scale_factor", 1.0)), None
        else:
            idx = out["indices"]
            grid = tuple(idx.shape[1:]) if idx.ndim == 3 else None
            codes = idx.reshape(B, -1)
        if spec.decode is None:  # TA-TiTok: decoding needs CLIP text features
            assert "decode" not in spec.capabilities
            return
        rec = spec.decode(model, codes, grid)
    assert rec.shape == (B, 3, r, r)
    pixels = from_model_pixels(rec, spec.pixel_range)
    assert pixels.dtype == torch.uint8 and pixels.shape == (B, r, r, 3)


def test_pixel_conversion_round_trips_exactly():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(1, 16, 16, 3)
    for rng in families.PIXEL_RANGES:
        assert torch.equal(from_model_pixels(to_model_pixels(u8, rng), rng), u8)
    assert float(to_model_pixels(u8, "signed").min()) == -1.0
    assert float(to_model_pixels(u8, "unit").max()) == 1.0
    with pytest.raises(ValueError, match="pixel range"):
        to_model_pixels(u8, "zero-one")


def test_sized_config_names_the_known_sizes():
    spec = families.get("rar")
    assert spec.config("tiny", seq_len=7).seq_len == 7
    with pytest.raises(ValueError, match="RAR size 'Q' not found; known: tiny, B"):
        from vgen_core.generators.rar import rar_config

        rar_config("Q")


def test_cli_lists_families_as_json(capsys):
    from pipelines.cli import main

    assert main(["families", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by = {f["name"]: f for f in data["families"]}
    assert set(by) == set(families.names())
    assert by["flowtok"]["role"] == "generator" and "train" in by["flowtok"]["capabilities"]
    assert "evaluate" in by["deltaworld"]["capabilities"]
    assert by["lfq"]["sizes"][0] == "tiny" and "load_released" in by["lfq"]["capabilities"]
    assert set(by["titok"]["capabilities"]) >= {"tokenize", "cache", "encode", "decode"}
    assert main(["families"]) == 0
    assert "maskgen_vq (maskgen)" in capsys.readouterr().out


def _string_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_stages_never_name_a_family():
    """Stages look families up in the specs; no stage module spells a family's name."""
    names = set(families.names()) | {a for s in families.all_specs() for a in s.aliases}
    bad = []
    for path in sorted((ROOT / "pipelines" / "stages").glob("*.py")):
        for line, value in _string_literals(path):
            if value in names:
                bad.append(f"{path.name}:{line}: {value!r}")
    assert bad == []


def test_no_generator_imports_another_generators_private_names():
    bad = []
    for path in sorted((ROOT / "vgen_core" / "generators").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("vgen_core.generators."):
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_")]
    assert bad == []


def test_load_pretrained_finds_every_family_through_its_spec(tmp_path):
    from vgen_core.tokenizers.io import load_pretrained, save_pretrained, weights_digest

    for name in ("flowtok", "deltaworld", "titok"):
        spec = families.get(name)
        torch.manual_seed(0)
        model = spec.build(_tiny(spec), {}, {})
        save_pretrained(model, tmp_path / name)
        back = load_pretrained(tmp_path / name)
        assert type(back) is spec.model_class and weights_digest(back) == weights_digest(model)
