"""`vgen weights inspect`: vgen exports, foreign state dicts matched to a family, refused files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from pipelines.cli import main
from vgen_core import families
from vgen_core.tokenizers.io import save_pretrained, weights_digest

FAMILY, SIZE = "lfq", "tiny"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return families.get(FAMILY).build(SIZE).eval()


def _inspect(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, dict]:
    rc = main(["weights", "inspect", str(path), "--json"])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if rc == 0 else {})


def test_vgen_export(tmp_path, capsys, model):
    out_dir = save_pretrained(model, tmp_path / "exp")
    rc, r = _inspect(capsys, out_dir)
    assert rc == 0
    assert r["kind"] == "vgen"
    assert (r["family"], r["size"]) == (FAMILY, SIZE)
    assert r["pixel_range"] == families.get(FAMILY).pixel_range
    state = model.state_dict()
    assert r["tensors"] == len(state)
    assert r["bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert r["weights_digest"] == weights_digest(model) and r["digest_ok"] is True
    # the safetensors file itself, with config.json beside it, reads the same; text output too
    rc, r2 = _inspect(capsys, out_dir / "model.safetensors")
    assert rc == 0 and r2["family"] == FAMILY and r2["size"] == SIZE
    assert main(["weights", "inspect", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "family       lfq" in text and "size         tiny" in text


def test_foreign_state_dict_matches_family_and_size(tmp_path, capsys, model):
    path = tmp_path / "released.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 7}, path)
    rc, r = _inspect(capsys, path)
    assert rc == 0 and r["kind"] == "foreign" and r["wrapper"] == "state_dict"
    m = r["match"]
    assert (m["family"], m["size"]) == (FAMILY, SIZE)
    assert m["missing"] == [] and m["unexpected"] == [] and m["mismatched"] == []
    assert m["matched"] == m["expected"] == len(model.state_dict())


def test_foreign_state_dict_with_key_differences(tmp_path, capsys, model):
    state = dict(model.state_dict())
    keys = sorted(state)
    removed, renamed = keys[0], keys[1]
    del state[removed]
    state["renamed.weight"] = state.pop(renamed)
    path = tmp_path / "released.bin"
    torch.save(state, path)
    rc, r = _inspect(capsys, path)
    assert rc == 0
    m = r["match"]
    assert (m["family"], m["size"]) == (FAMILY, SIZE)
    assert m["missing"] == sorted([removed, renamed]) and m["missing_count"] == 2
    assert m["unexpected"] == ["renamed.weight"] and m["mismatched"] == []


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_an_object_is_refused_unexecuted(tmp_path, capsys):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"weight": _Payload(marker)}, f, protocol=2)
    assert main(["weights", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "weights_only" in err
    assert not marker.exists()


def test_pickle_that_is_not_a_state_dict(tmp_path, capsys):
    path = tmp_path / "stats.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    assert main(["weights", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not a plain state dict" in err


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_truncated_file(tmp_path, capsys, model, name):
    full = tmp_path / "full"
    if name.endswith(".safetensors"):
        save_pretrained(model, full)
        data = (full / "model.safetensors").read_bytes()
    else:
        full.mkdir()
        torch.save(model.state_dict(), full / name)
        data = (full / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    assert main(["weights", "inspect", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    assert main(["weights", "inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_released_names_are_mapped_by_the_family_key_map(tmp_path, capsys):
    from vgen_core.tokenizers.titok import inverse_official_key_map

    torch.manual_seed(0)
    titok = families.get("titok").build("tiny")
    path = tmp_path / "titok.bin"
    torch.save({"model": inverse_official_key_map(titok.state_dict())}, path)
    rc, r = _inspect(capsys, path)
    assert rc == 0
    m = r["match"]
    assert (m["family"], m["size"], m["key_map"]) == ("titok", "tiny", True)
    assert m["missing"] == m["unexpected"] == m["mismatched"] == []
