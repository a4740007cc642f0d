"""`vgen weights convert`: released checkpoints -> vgen exports, strictly, and stages that load
converted and released files alike (the manifest's pixel range checked against the stage's).

The released checkpoint is an official MaskBit ``ConvVQModel`` state dict (the names and modules
of markweberdev/maskbit, re-stated in test_fsq_vae), small widths, saved as a ``.bin`` pickle as
the releases are.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from test_fsq_vae import _SMALL_MB, _MaskBitConvVQModel
from test_pixel_range import RES, black_white_table
from test_pixel_range import seen as seen  # the fixture: what LFQ encode is fed

from pipelines.cli import main
from pipelines.stages.base import InProcessExecutor, StageContext, weights_problem
from pipelines.stages.tokenize import ImageTokenizeConfig, TokenizeLFQ
from vgen_core import families
from vgen_core.data import TableStore
from vgen_core.tokenizers.io import load_pretrained
from vgen_core.tokenizers.maskbit_keys import official_key_map
from vgen_core.weights import MANIFEST_NAME, WeightsError, load_weights

#: the small official model's config as --set overrides of a released size
SETS = ["hidden=32", "ch_mult=[1,2,1]", "num_res_blocks=2", "token_bits=6", "norm_groups=32"]
OVERRIDES = {"hidden": 32, "ch_mult": [1, 2, 1], "num_res_blocks": 2, "token_bits": 6,
             "norm_groups": 32}


@pytest.fixture(scope="module")
def official() -> torch.nn.Module:
    torch.manual_seed(0)
    return _MaskBitConvVQModel(**_SMALL_MB, legacy=False).eval()


@pytest.fixture
def release(tmp_path, official) -> Path:
    path = tmp_path / "pytorch_model.bin"
    torch.save(official.state_dict(), path)
    return path


def _convert(src: Path, dst: Path, *extra: str) -> int:
    args = ["weights", "convert", "--family", "lfq", "--size", "maskbit-k12"]
    for s in SETS:
        args += ["--set", s]
    return main([*args, *extra, str(src), str(dst)])


def test_released_maskbit_converts_strictly_and_encodes_as_the_official(tmp_path, release,
                                                                        official, capsys):
    dst = tmp_path / "maskbit"
    assert _convert(release, dst, "--json") == 0
    manifest = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", MANIFEST_NAME,
                                                     "model.safetensors"]
    assert manifest == json.loads((dst / MANIFEST_NAME).read_text())
    assert (manifest["family"], manifest["size"], manifest["pixel_range"]) == (
        "lfq", "maskbit-k12", "unit")
    assert manifest["preprocessing"]["range"] == [0.0, 1.0]
    assert manifest["source"]["sha256"] == hashlib.sha256(release.read_bytes()).hexdigest()
    assert manifest["source"]["format"] == "pickle" and manifest["source"]["names"] == "released"
    # every released tensor is used but the two fixed codebook buffers, dropped with a reason
    assert sorted(manifest["dropped"]) == ["quantize.bits_to_indices", "quantize.codebook"]
    assert all("codebook" in r for r in manifest["dropped"].values())

    model = load_pretrained(dst)
    state = official.state_dict()
    key_map = official_key_map(state)
    assert manifest["tensors"] == len(model.state_dict()) == len(key_map) == len(state) - 2
    for src, dst_key in key_map.items():
        assert torch.equal(model.state_dict()[dst_key], state[src]), src
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # [0, 1] images
    with torch.no_grad():
        z = official.encoder(x)
        want = ((z > 0).int().permute(0, 2, 3, 1) * official.quantize.bits_to_indices).sum(-1)
        assert torch.equal(model.encode(x)[2], want)

    # inspect reads the export back: family, released size, declared range, source digest
    assert main(["weights", "inspect", str(dst), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["kind"], r["family"], r["size"], r["pixel_range"]) == (
        "vgen", "lfq", "maskbit-k12", "unit")
    assert r["digest_ok"] is True and r["source"]["sha256"] == manifest["source"]["sha256"]


def test_a_checkpoint_of_another_size_exits_2_with_the_diff_and_writes_nothing(
        tmp_path, release, capsys):
    dst = tmp_path / "out" / "maskbit"
    rc = main(["weights", "convert", "--family", "lfq", "--size", "maskbit-k12",
               str(release), str(dst)])  # no --set: the released k12 widths
    assert rc == 2
    err = capsys.readouterr().err
    assert str(release) in err and "lfq / maskbit-k12" in err
    assert "shape mismatches" in err
    assert "decoder.0.weight: file (32, 6, 3, 3), model (512, 12, 3, 3)" in err
    assert not (tmp_path / "out").exists()  # not even the parent folder


def test_a_checkpoint_of_another_family_exits_2(tmp_path, release, capsys):
    rc = main(["weights", "convert", "--family", "titok", "--size", "tiny", str(release),
               str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not fit titok / tiny" in err and "missing" in err and "unexpected" in err
    assert not (tmp_path / "x").exists()


def test_one_missing_tensor_is_named(tmp_path, official, capsys):
    state = dict(official.state_dict())
    del state["decoder.conv_out.weight"]
    path = tmp_path / "partial.bin"
    torch.save(state, path)
    assert _convert(path, tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "missing (1): decoder.9.weight" in err
    assert not (tmp_path / "x").exists()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_files_exit_2_and_write_nothing(tmp_path, release, capsys):
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.bin"
    with evil.open("wb") as f:
        pickle.dump({"weight": _Payload(marker)}, f, protocol=2)
    truncated = tmp_path / "cut.bin"
    truncated.write_bytes(release.read_bytes()[:1000])
    not_weights = tmp_path / "stats.pt"
    torch.save({"epoch": 3}, not_weights)
    for bad, why in ((evil, "weights_only"), (truncated, "cannot be read"),
                     (not_weights, "not a plain state dict")):
        assert _convert(bad, tmp_path / "x") == 2
        err = capsys.readouterr().err
        assert str(bad) in err and why in err
        assert not (tmp_path / "x").exists()
    assert not marker.exists()
    # unknown family / size name the known ones
    assert main(["weights", "convert", "--family", "nope", "--size", "s", str(release),
                 str(tmp_path / "x")]) == 2
    assert "known:" in capsys.readouterr().err
    assert main(["weights", "convert", "--family", "lfq", "--size", "huge", str(release),
                 str(tmp_path / "x")]) == 2
    assert "sizes: " in capsys.readouterr().err


def test_an_existing_destination_needs_force(tmp_path, release, capsys):
    dst = tmp_path / "maskbit"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert _convert(release, dst) == 2
    assert "already exists" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
    (dst / "keep.txt").unlink()  # an empty folder is taken as it is
    assert _convert(release, dst) == 0 and (dst / "model.safetensors").is_file()


def test_vgen_named_state_dict_and_released_titok_names(tmp_path, capsys):
    """A state dict with vgen's own names converts too; TiTok's released names map by the
    family's key map (the same path inspect uses)."""
    from vgen_core.tokenizers.titok import inverse_official_key_map

    torch.manual_seed(0)
    titok = families.get("titok").build("tiny")
    path = tmp_path / "titok.bin"
    torch.save({"model": inverse_official_key_map(titok.state_dict())}, path)
    assert main(["weights", "convert", "--family", "titok", "--size", "tiny", str(path),
                 str(tmp_path / "a")]) == 0
    lfq = families.get("lfq").build("tiny")
    plain = tmp_path / "lfq.pt"
    torch.save(lfq.state_dict(), plain)
    assert main(["weights", "convert", "--family", "lfq", "--size", "tiny", str(plain),
                 str(tmp_path / "b")]) == 0
    assert "from vgen names" in capsys.readouterr().out
    for folder, model in (("a", titok), ("b", lfq)):
        loaded = load_pretrained(tmp_path / folder).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


# -- stages: `weights:` takes converted folders and released files alike ---------------------

def _tokenize(store: TableStore, weights: str):
    ctx = StageContext(dag="t", stage="tok", store=store, row_fingerprint="fp",
                       inputs={"images": {"samples": black_white_table(store)}}, chunk_size=4,
                       error_budget=0.0)
    cfg = ImageTokenizeConfig(size="maskbit-k12", overrides=OVERRIDES, resolution=RES,
                              flip=False, weights=weights)
    return TokenizeLFQ(cfg, ctx)


def test_tokenize_takes_converted_and_released_files_alike(tmp_path, release, seen):
    dst = tmp_path / "converted"
    assert _convert(release, dst) == 0
    assert weights_problem(str(dst)) is None and weights_problem(str(release)) is None
    tokens = {}
    for name, weights in (("converted", dst), ("released", release)):
        store = TableStore(str(tmp_path / f"store-{name}"))
        stage = _tokenize(store, str(weights))
        result = stage.run(InProcessExecutor(batch_size=1))
        assert result.counts.processed == 4, name
        rows = store.read(result.outputs["samples"].name).to_pylist()
        tokens[name] = sorted((r["sample_id"], r["indices"]) for r in rows)
    assert tokens["converted"] == tokens["released"]
    # the MaskBit tokenizer is fed [0, 1] pixels: black is 0.0 and white 1.0
    assert (0.0, 0.0) in seen and (1.0, 1.0) in seen


def test_a_manifest_declaring_another_range_is_refused(tmp_path, release):
    dst = tmp_path / "signed"
    assert _convert(release, dst, "--pixel-range", "signed") == 0
    assert json.loads((dst / MANIFEST_NAME).read_text())["pixel_range"] == "signed"
    from pipelines.stages.base import StageError

    stage = _tokenize(TableStore(str(tmp_path / "store")), str(dst))
    with pytest.raises(StageError) as e:
        stage.run(InProcessExecutor(batch_size=1))
    msg = str(e.value)
    assert "'signed'" in msg and "'unit'" in msg and "pixel range" in msg and str(dst) in msg


def test_an_export_of_another_config_is_refused(tmp_path, release):
    dst = tmp_path / "converted"
    assert _convert(release, dst) == 0
    cfg = families.get("lfq").config("maskbit-k12", **{**OVERRIDES, "token_bits": 8})
    with pytest.raises(WeightsError, match="token_bits: file 6, stage 8"):
        load_weights(dst, "lfq", cfg, pixel_range="unit", what="test")
    with pytest.raises(WeightsError, match="holds a 'lfq' model"):
        load_weights(dst, "titok", families.get("titok").config("tiny"), pixel_range="unit",
                     what="test")
    assert "without model.safetensors" in (weights_problem(str(tmp_path)) or "")


# -- import.weights: a released checkpoint as the DAG's tokenizer / generator output ----------

def _import(store: TableStore, stage: str, model: str, size: str, weights: Path,
            overrides: dict | None = None):
    from pipelines.stages.weights_import import ImportWeights, ImportWeightsConfig

    cfg = ImportWeightsConfig(model=model, size=size, overrides=overrides or {},
                              weights=str(weights))
    ctx = StageContext(dag="t", stage=stage, store=store, row_fingerprint=f"fp-{stage}",
                       inputs={})
    imp = ImportWeights(cfg, ctx)
    return imp, imp.run(InProcessExecutor())


def test_import_weights_feeds_tokenize_like_a_trained_tokenizer(tmp_path, release):
    store = TableStore(str(tmp_path / "store"))
    imp, result = _import(store, "released", "lfq", "maskbit-k12", release, OVERRIDES)
    (key, ref), = result.outputs.items()
    assert key == "tokenizer" and ref.kind == "model"
    parts = imp.row_fingerprint_parts()
    assert parts["pixel_range"] == "unit" and parts["weights_file"]
    model = load_pretrained(ref.uri)
    from vgen_core.tokenizers.io import weights_digest

    assert weights_digest(model) == ref.digest
    # the tokenize stage encodes with the upstream tokenizer: same tokens as `weights:` direct
    images = black_white_table(store)
    ctx = StageContext(dag="t", stage="tok", store=store, row_fingerprint="fp-tok",
                       inputs={"images": {"samples": images}, "released": result.outputs},
                       chunk_size=4, error_budget=0.0)
    out = TokenizeLFQ(ImageTokenizeConfig(resolution=RES, flip=False), ctx).run(
        InProcessExecutor(batch_size=1))
    via_import = sorted((r["sample_id"], r["indices"])
                        for r in store.read(out.outputs["samples"].name).to_pylist())
    direct_store = TableStore(str(tmp_path / "direct"))
    direct = _tokenize(direct_store, str(release)).run(InProcessExecutor(batch_size=1))
    assert via_import == sorted((r["sample_id"], r["indices"]) for r in
                                direct_store.read(direct.outputs["samples"].name).to_pylist())


def test_import_weights_of_a_generator_and_refusals(tmp_path):
    from pipelines.stages.base import StageError

    torch.manual_seed(0)
    rar = families.get("rar").build("tiny")
    path = tmp_path / "rar.bin"
    torch.save(rar.state_dict(), path)
    store = TableStore(str(tmp_path / "store"))
    _, result = _import(store, "gen", "rar", "tiny", path)
    assert list(result.outputs) == ["generator"]
    loaded = load_pretrained(result.outputs["generator"].uri).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in rar.state_dict().items())
    with pytest.raises(StageError, match="does not fit maskbit"):
        _import(store, "bad", "maskbit", "tiny", path)
    assert not list(Path(store.path("models/t")).glob("bad*"))


def test_train_fine_tune_starts_from_the_weights(tmp_path, release):
    """train.tokenizer / train.generator ``weights:``: workers start from the released weights
    (mapped strictly, for the config the run trains); the file is part of the fingerprint."""
    from pipelines.stages.train import TrainTokenizer, TrainTokenizerConfig, _initial_weights

    cfg = {"model": "lfq", "size": "maskbit-k12", "overrides": OVERRIDES,
           "data_info": {"num_rows": 4}, "weights": str(release)}
    model = _initial_weights(cfg)
    state = torch.load(release, weights_only=True)
    for src, dst_key in official_key_map(state).items():
        assert torch.equal(model.state_dict()[dst_key], state[src])
    with pytest.raises(WeightsError, match="does not fit lfq"):
        _initial_weights({**cfg, "overrides": {**OVERRIDES, "hidden": 64}})

    ctx = StageContext(dag="t", stage="train", store=TableStore(str(tmp_path / "s")),
                       row_fingerprint="fp", inputs={})
    stage = TrainTokenizer(TrainTokenizerConfig(model="lfq", size="maskbit-k12",
                                                overrides=OVERRIDES, weights=str(release)), ctx)
    parts = stage.row_fingerprint_parts()
    other = tmp_path / "other.bin"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other)
    stage2 = TrainTokenizer(TrainTokenizerConfig(model="lfq", size="maskbit-k12",
                                                 overrides=OVERRIDES, weights=str(other)), ctx)
    assert parts["init_weights"] != stage2.row_fingerprint_parts()["init_weights"]
    assert stage.check_config() == []
    missing = TrainTokenizer(TrainTokenizerConfig(weights=str(tmp_path / "nope.bin")), ctx)
    assert [f for f, _ in missing.check_config()] == ["with.weights"]


def test_a_wrong_export_makes_the_dag_invalid_before_anything_runs(tmp_path, release, capsys):
    """`vgen run` exits 2 (invalid DAG, nothing computed, nothing written) for a weights folder
    whose manifest declares another pixel range, or that holds another size or family."""
    import yaml

    signed, other = tmp_path / "signed", tmp_path / "k8"
    assert _convert(release, signed, "--pixel-range", "signed") == 0
    lfq = families.get("lfq").build("tiny")
    torch.save(lfq.state_dict(), tmp_path / "tiny.pt")
    assert main(["weights", "convert", "--family", "lfq", "--size", "tiny",
                 str(tmp_path / "tiny.pt"), str(other)]) == 0
    cases = [
        ({"uses": "tokenize.lfq", "with": {"size": "maskbit-k12", "overrides": OVERRIDES}},
         signed, "declares pixel range 'signed'"),
        ({"uses": "tokenize.lfq", "with": {"size": "maskbit-k12", "overrides": OVERRIDES}},
         other, "of another size / config"),
        ({"uses": "tokenize.titok", "with": {"model": "titok", "size": "tiny"}}, other,
         "holds a 'lfq' model"),
        ({"uses": "train.tokenizer", "with": {"model": "lfq", "size": "tiny"}}, signed,
         "declares pixel range 'signed'"),
    ]
    for i, (stage, weights, why) in enumerate(cases):
        stage = {**stage, "needs": ["images"],
                 "with": {**stage["with"], "weights": str(weights)}}
        dag = {"name": f"bad{i}", "stages": {
            "images": {"uses": "ingest.images", "with": {"root": "skimage://", "size": 32}},
            "tok": stage}}
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(dag))
        storage = tmp_path / f"store{i}"
        assert main(["run", str(path), "--storage", str(storage)]) == 2, why
        err = capsys.readouterr().err
        assert "with.weights" in err and why in err, err
        assert not (storage / "models").exists()


def test_force_replaces_only_a_previous_export_and_never_the_source(tmp_path, release, capsys):
    folder = release.parent
    assert _convert(release, folder, "--force") == 2  # DST holds the source
    assert "holds the source" in capsys.readouterr().err and release.is_file()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("keep")
    assert _convert(release, other, "--force") == 2
    assert "only a previous export" in capsys.readouterr().err
    assert (other / "a.txt").read_text() == "keep"
    dst = tmp_path / "exp"
    assert _convert(release, dst) == 0
    assert _convert(release, dst, "--force") == 0
    assert oct((dst).stat().st_mode & 0o777) != oct(0o700)  # readable by others (umask)


def test_an_export_file_uri_is_checked_as_its_folder(tmp_path, release, capsys):
    """`weights: .../model.safetensors` of an export is the export (its manifest's pixel range
    and config are checked), and an HF snapshot folder with its own config.json is a release."""
    from vgen_core.weights import export_uri, is_export

    signed = tmp_path / "signed"
    assert _convert(release, signed, "--pixel-range", "signed") == 0
    assert export_uri(str(signed / "model.safetensors")) == str(signed)
    cfg = families.get("lfq").config("maskbit-k12", **OVERRIDES)
    stage = _tokenize(TableStore(str(tmp_path / "s")), str(signed / "model.safetensors"))
    problems = stage.check_config()
    assert problems and "declares pixel range 'signed'" in problems[0][1]
    snapshot = tmp_path / "hub"
    snapshot.mkdir()
    from safetensors.torch import save_file

    lfq = families.get("lfq").build("maskbit-k12", OVERRIDES)
    save_file(lfq.state_dict(), str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"hidden_size": 32}))  # not vgen's
    assert not is_export(snapshot) and export_uri(str(snapshot / "model.safetensors")).endswith(
        "model.safetensors")
    model = load_weights(snapshot, "lfq", cfg, pixel_range="unit", what="test")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in lfq.state_dict().items())
    assert _tokenize(TableStore(str(tmp_path / "s2")), str(snapshot)).check_config() == []
    (snapshot / "config.json").unlink()  # a snapshot folder without config.json is one too
    assert weights_problem(str(snapshot)) is None
    load_weights(snapshot, "lfq", cfg, pixel_range="unit", what="test")
