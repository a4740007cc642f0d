"""The kernels inside the models: each model gives the same output through its Triton kernel as
through the kernel's PyTorch reference, and the dispatcher really sends it there.

* GRAT in a generator: DeepFlow's ``sample(attention="grat")`` (the ``attention: grat`` sampler
  option of ``evaluate.generation``), GRAT-X and GRAT-B, through ``kernels.grat``.
* The ternary stage's model: a tiny MaskGIT and a tiny DeepFlow made 1.58-bit as
  ``quantize.ternary`` does (``to_qat`` then ``pack_student``: ``kernels.ternary.TernaryLinear``),
  forward through ``kernels.ternary``.
* The LFQ tokenizer is in ``test_lfq_kernel_path.py`` (encode, decode, backward, exact).

On CPU the Triton path runs in the interpreter: one child process (this file run as a script)
with ``TRITON_INTERPRET=1`` and ``VGEN_KERNELS=triton``, as in tests/kernels (the interpreter
switch is read when a kernel is defined and must not leak into this session). The models and
inputs are made here; this process computes the reference path with the default dispatch (auto:
the reference for CPU tensors), and the child the Triton path. Each side counts the calls that
reached its backend, so a dispatcher that silently took the other path fails the test.

On a GPU (marker ``gpu``) the same models run on CUDA with the default dispatch and must reach
the Triton kernels: ``pytest tests/unit/test_kernel_model_paths.py -m gpu``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # when run as the interpreter child
    sys.path.insert(0, str(ROOT))

import kernels.grat  # noqa: E402
import kernels.grat.reference  # noqa: E402
import kernels.ternary  # noqa: E402
from vgen_core import families  # noqa: E402
from vgen_core.generators import deepflow  # noqa: E402
from vgen_core.training.ternary import pack_student, to_qat  # noqa: E402

# name: what runs. GRAT cases sample a tiny DeepFlow (4x4 tokens) with groups (gh, gw);
# ternary cases run the forward of a packed tiny generator.
CASES: dict[str, dict[str, Any]] = {
    "deepflow-grat-X-2x2": {"kind": "grat", "groups": (2, 2), "variant": "criss_cross",
                            "radius": 1, "cfg_scale": 1.0},
    "deepflow-grat-B-r0-cfg": {"kind": "grat", "groups": (2, 2), "variant": "block",
                               "radius": 0, "cfg_scale": 1.5},
    "maskgit-ternary": {"kind": "ternary", "family": "maskgit"},
    "deepflow-ternary": {"kind": "ternary", "family": "deepflow"},
}
GRAT_STEPS = 3
MASKGIT_SMALL = {"seq_len": 16, "codebook_size": 32}


# --------------------------------------------------------------------------------------------------
# models and inputs (made once, in the parent)
# --------------------------------------------------------------------------------------------------


def _randomize_zeros(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill zero-initialised tensors (adaLN-Zero gates, heads): with them every output is 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _build(name: str) -> torch.nn.Module:
    """The case's model before any state is loaded (same code in parent and child)."""
    case = CASES[name]
    family = case.get("family", "deepflow")
    if family == "maskgit":
        model = families.get("maskgit").build("tiny", MASKGIT_SMALL)
    else:
        model = deepflow.deepflow_config("tiny").build()
    if case["kind"] == "ternary":
        to_qat(model)  # the quantize stage's student layout; packed below
    return model.eval()


def _inputs(name: str, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = _randomize_zeros(_build(name), seed)
    g = torch.Generator().manual_seed(seed + 100)
    case = CASES[name]
    if case["kind"] == "grat":
        return {"state": model.state_dict(), "labels": torch.tensor([0, 1, 2])}
    if case["family"] == "maskgit":
        return {"state": model.state_dict(),
                "tokens": torch.randint(0, MASKGIT_SMALL["codebook_size"] + 1, (3, 16),
                                        generator=g),
                "labels": torch.tensor([1, 2, 3])}
    return {"state": model.state_dict(), "x": torch.randn(3, 4, 8, 8, generator=g),
            "t": torch.rand(3, generator=g), "labels": torch.tensor([0, 4, 9])}


def _run(name: str, inp: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The case's model output on whichever backend VGEN_KERNELS (or the device) selects."""
    case = CASES[name]
    model = _build(name)
    model.load_state_dict(inp["state"])
    device = inp.get("device", "cpu")
    model.to(device)
    if case["kind"] == "grat":
        gen = torch.Generator(device=device).manual_seed(0)
        out = deepflow.sample(model, inp["labels"].to(device), num_steps=GRAT_STEPS,
                              cfg_scale=case["cfg_scale"], attention="grat",
                              grat_groups=case["groups"], grat_variant=case["variant"],
                              grat_radius=case["radius"], generator=gen)
        return {"samples": out.detach().cpu()}
    packed, report = pack_student(model)
    assert report.converted, "no linear was packed"
    with torch.no_grad():
        if case["family"] == "maskgit":
            logits = packed(inp["tokens"].to(device), inp["labels"].to(device))
            return {"logits": logits.cpu()}
        outs = packed(inp["x"].to(device), inp["t"].to(device), inp["labels"].to(device))[0]
        return {f"branch{i}": o.cpu() for i, o in enumerate(outs)}


# --------------------------------------------------------------------------------------------------
# call counting
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _counting(targets: list[tuple[Any, str]]) -> Iterator[dict[str, int]]:
    """Count the calls of ``getattr(module, attr)`` for each target, restored afterwards."""
    counts: dict[str, int] = {}
    saved = []
    for module, attr in targets:
        fn = getattr(module, attr)
        key = f"{module.__name__}.{attr}"
        counts[key] = 0

        def counted(*a: Any, _fn: Any = fn, _key: str = key, **kw: Any) -> Any:
            counts[_key] += 1
            return _fn(*a, **kw)

        saved.append((module, attr, fn))
        setattr(module, attr, counted)
    try:
        yield counts
    finally:
        for module, attr, fn in saved:
            setattr(module, attr, fn)


def _reference_targets() -> list[tuple[Any, str]]:
    # what the dispatchers call on the reference path (kernels/grat/__init__.py calls
    # reference.grat_attention_reference; kernels/ternary/__init__.py its imported name)
    return [(kernels.grat.reference, "grat_attention_reference"),
            (kernels.ternary, "ternary_matmul_reference")]


def _triton_targets() -> list[tuple[Any, str]]:
    from kernels.grat import triton as grat_triton
    from kernels.ternary import triton as ternary_triton

    return [(grat_triton, "grat_attention"), (ternary_triton, "ternary_matmul_triton")]


def _short(counts: dict[str, int]) -> dict[str, int]:
    """{"grat": n, "ternary": m} from the qualified counter names."""
    return {"grat": sum(v for k, v in counts.items() if ".grat." in k),
            "ternary": sum(v for k, v in counts.items() if ".ternary" in k)}


def _child(in_path: str, out_path: str) -> None:
    """Interpreter child (TRITON_INTERPRET=1, VGEN_KERNELS=triton): every case through Triton."""
    torch.set_num_threads(1)
    inputs = torch.load(in_path)
    results: dict[str, Any] = {"cases": {}, "calls": {}}
    for name, inp in inputs.items():
        with _counting(_triton_targets() + _reference_targets()) as counts:
            results["cases"][name] = _run(name, inp)
        results["calls"][name] = {"triton": _short({k: v for k, v in counts.items()
                                                   if ".triton." in k}),
                                  "reference": _short({k: v for k, v in counts.items()
                                                      if ".triton." not in k})}
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interp(tmp_path_factory) -> dict[str, Any]:
    pytest.importorskip("triton")
    d = tmp_path_factory.mktemp("kernel_model_paths")
    inputs = {name: _inputs(name, seed=i) for i, name in enumerate(CASES)}
    torch.save(inputs, d / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", VGEN_KERNELS="triton",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, str(d / "in.pt"), str(d / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"Triton interpreter child failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return {"inputs": inputs, "results": torch.load(d / "out.pt")}


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------

# fp32 everywhere. GRAT: the kernel's online softmax sums in another order than the dense-mask
# reference; ternary: the kernel applies the row scale after the dot, the reference to the weight
# first. Measured max |diff| (output scale): GRAT-X 2.7e-7 (3.3), GRAT-B 4.2e-7 (3.3), ternary
# MaskGIT 8.9e-8 (0.66), ternary DeepFlow 2.4e-7 (1.3).
TOL = {"grat": (1e-5, 1e-5), "ternary": (1e-5, 1e-5)}


@pytest.mark.parametrize("name", list(CASES))
def test_model_output_through_triton_equals_reference(interp, name, monkeypatch, one_thread):
    monkeypatch.delenv("VGEN_KERNELS", raising=False)  # auto: the reference for CPU tensors
    kind = CASES[name]["kind"]
    with _counting(_reference_targets()) as counts:
        want = _run(name, interp["inputs"][name])
    got = interp["results"]["cases"][name]
    calls = interp["results"]["calls"][name]
    ref_calls = _short(counts)[kind]
    # both paths made the same number of kernel calls, each on its own backend only
    assert ref_calls > 0
    assert calls["triton"][kind] == ref_calls, calls
    assert calls["reference"] == {"grat": 0, "ternary": 0}, calls
    assert got.keys() == want.keys()
    rtol, atol = TOL[kind]
    for key in want:
        assert got[key].dtype == want[key].dtype
        assert want[key].abs().max() > 0.1, key  # a real signal, not zeros
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol, msg=key)


def test_grat_call_count_is_blocks_times_model_evaluations(interp):
    """GRAT replaces every DiT self-attention at every sampler evaluation: the tiny DeepFlow has
    4 blocks and the sampler evaluates it once per step; with guidance (cfg 1.5) the conditional
    and unconditional halves go through in one batched evaluation, so the count is the same."""
    counts = [interp["results"]["calls"][n]["triton"]["grat"] for n in CASES
              if CASES[n]["kind"] == "grat"]
    depth = deepflow.deepflow_config("tiny").depth
    assert counts == [depth * GRAT_STEPS] * 2  # 4 blocks x 3 steps


def test_sparse_pattern_changes_the_samples(interp, monkeypatch, one_thread):
    """The GRAT cases are not accidentally dense: the reference samples differ from dense ones."""
    monkeypatch.delenv("VGEN_KERNELS", raising=False)
    name = "deepflow-grat-X-2x2"
    inp = interp["inputs"][name]
    model = _build(name)
    model.load_state_dict(inp["state"])
    dense = deepflow.sample(model, inp["labels"], num_steps=GRAT_STEPS,
                            generator=torch.Generator().manual_seed(0))
    grat = interp["results"]["cases"][name]["samples"]
    assert (grat - dense).abs().max() > 1e-3


def test_dispatch_picks_triton_for_cuda_tensors_and_the_reference_for_cpu(monkeypatch):
    """The rule each model path goes through (kernels._dispatch.choose_backend), for a tensor on
    each device; a CUDA tensor is faked by its ``is_cuda`` only (no GPU here)."""
    from kernels._dispatch import choose_backend

    class FakeCuda:
        is_cuda = True

    monkeypatch.delenv("VGEN_KERNELS", raising=False)
    def loaded() -> object:  # triton imports
        return object()

    def missing() -> None:  # triton does not import
        return None

    assert choose_backend(FakeCuda(), loaded) == "triton"  # type: ignore[arg-type]
    assert choose_backend(FakeCuda(), missing) == "reference"  # type: ignore[arg-type]
    assert choose_backend(torch.zeros(1), loaded) == "reference"
    assert kernels.ternary.ternary_backend(torch.zeros(1)) == "reference"
    monkeypatch.setenv("VGEN_KERNELS", "reference")
    assert choose_backend(FakeCuda(), loaded) == "reference"  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_on_cuda_the_models_reach_the_triton_kernels(name, monkeypatch):
    """On a GPU, default dispatch: every kernel call of the model goes to Triton, and the output
    matches the reference path's (VGEN_KERNELS=reference) on the same device."""
    monkeypatch.delenv("VGEN_KERNELS", raising=False)
    kind = CASES[name]["kind"]
    inp = {**_inputs(name, seed=0), "device": "cuda"}
    with _counting(_triton_targets() + _reference_targets()) as counts:
        got = _run(name, inp)
    tri = _short({k: v for k, v in counts.items() if ".triton." in k})
    ref = _short({k: v for k, v in counts.items() if ".triton." not in k})
    assert tri[kind] > 0 and ref == {"grat": 0, "ternary": 0}, (tri, ref)
    monkeypatch.setenv("VGEN_KERNELS", "reference")
    want = _run(name, inp)
    for key in want:  # TF32 is off by default for matmuls; the kernels accumulate in fp32
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-3, msg=key)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
