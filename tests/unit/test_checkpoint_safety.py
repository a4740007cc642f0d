"""Stored checkpoints are not trusted: digests recorded at save are verified before a load, and
DeepSpeed's pickles are read weights-only (tensors plus an allow-list of DeepSpeed classes).

The DeepSpeed part runs in a subprocess with a one-rank gloo group (ZeRO 0, 2 and 3): a planted
pickle whose ``__reduce__`` runs a shell command is refused and the command never runs, even when
the attacker also rewrote the manifest; a flipped byte is refused with the digests in the message;
a normal save and restore gives back the weights and the optimizer state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.conftest import _free_port as free_port
from vgen_core.training.checkpoint import (
    CheckpointRejected,
    verify_manifest,
    write_manifest,
)
from vgen_core.training.safe_load import deepspeed_allowed, weights_only_loads



class _Evil:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _checkpoint(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    (d / "ds").mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(6.0)}}, d / "ds" / "mp_rank_00_model_states.pt")
    (d / "vgen_rank0.json").write_text('{"step": 3}')
    (d / "zero_to_fp32.py").write_text("print('recovery script')\n")
    write_manifest(str(d), 0)
    return d


def test_the_planted_payload_is_real(tmp_path):
    """Control: a full unpickle of the payload runs its command."""
    marker = tmp_path / "PWNED"
    torch.save({"x": _Evil(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_weights_only_loads_refuses_even_an_explicit_full_unpickle(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"w": torch.ones(2), "x": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointRejected, match=r"posix\.system|os\.system"), \
            weights_only_loads():
        torch.load(tmp_path / "evil.pt", weights_only=False)  # DeepSpeed's call
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored


def test_the_allowed_deepspeed_objects_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    assert deepspeed_allowed() == [ZeroStageEnum, LossScaler, DynamicLossScaler,
                                   fragment_address]
    dyn = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1.0,
                            delayed_shift=2, consecutive_hysteresis=False, dtype=torch.half)
    sd = {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0), "dyn": dyn,
          "param_slice_mappings": [{"w": fragment_address(numel=6, start=0)}],
          "ds_version": "0.19.8", "state": {0: {"exp_avg": torch.ones(3)}}}
    torch.save(sd, tmp_path / "optim.pt")
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(tmp_path / "optim.pt", weights_only=True)  # not without the allow-list
    with weights_only_loads():
        got = torch.load(tmp_path / "optim.pt", weights_only=False)
    assert got["zero_stage"] is ZeroStageEnum.gradients
    assert got["loss_scaler"].cur_scale == 1.0
    assert vars(got["dyn"]) == vars(dyn)
    assert got["param_slice_mappings"][0]["w"] == fragment_address(numel=6, start=0)
    assert torch.equal(got["state"][0]["exp_avg"], torch.ones(3))


def test_manifest_lists_every_file(tmp_path):
    d = _checkpoint(tmp_path)
    manifest = json.loads((d / "vgen_manifest_rank0.json").read_text())
    assert sorted(manifest["files"]) == ["ds/mp_rank_00_model_states.pt", "vgen_rank0.json",
                                         "zero_to_fp32.py"]
    verify_manifest(str(d))


def test_a_flipped_byte_is_refused_with_both_digests(tmp_path):
    d = _checkpoint(tmp_path)
    f = d / "ds" / "mp_rank_00_model_states.pt"
    expected = json.loads((d / "vgen_manifest_rank0.json").read_text())[
        "files"]["ds/mp_rank_00_model_states.pt"]["sha256"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    import hashlib

    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(CheckpointRejected) as err:
        verify_manifest(str(d), where="s3://bucket/ray_train/run/step_00000003")
    msg = str(err.value)
    for part in ("s3://bucket/ray_train/run/step_00000003", "ds/mp_rank_00_model_states.pt",
                 f"expected {expected}", f"actual {actual}", "vgen_manifest_rank0.json",
                 "delete the Ray Train run directory"):
        assert part in msg, (part, msg)


@pytest.mark.parametrize("tamper,match", [
    ("no-manifest", "no digest manifest"),
    ("unlisted-file", r"ds/extra\.pt is in no manifest"),
    ("missing-file", r"vgen_rank0\.json, listed in vgen_manifest_rank0\.json, is missing"),
    ("outside-path", r"lists '\.\./secret'"),
    ("conflicting-ranks", "two recorded digests"),
    ("garbled-manifest", "unreadable"),
])
def test_other_tampering_is_refused(tmp_path, tamper, match):
    d = _checkpoint(tmp_path)
    manifest = d / "vgen_manifest_rank0.json"
    if tamper == "no-manifest":
        manifest.unlink()
    elif tamper == "unlisted-file":
        torch.save({}, d / "ds" / "extra.pt")
    elif tamper == "missing-file":
        (d / "vgen_rank0.json").unlink()
    elif tamper == "outside-path":
        m = json.loads(manifest.read_text())
        m["files"]["../secret"] = {"sha256": "0" * 64, "bytes": 1}
        manifest.write_text(json.dumps(m))
    elif tamper == "conflicting-ranks":
        m = json.loads(manifest.read_text())
        m["files"]["vgen_rank0.json"]["sha256"] = "0" * 64
        (d / "vgen_manifest_rank1.json").write_text(json.dumps(m))
    else:
        manifest.write_text("{not json")
    with pytest.raises(CheckpointRejected, match=match):
        verify_manifest(str(d))


_ENGINE = r"""
import json, os, shutil, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1")
import torch, deepspeed
from vgen_core.training import TrainConfig, deepspeed_config
from vgen_core.training.checkpoint import (CheckpointRejected, WorkerState, restore_checkpoint,
                                           save_checkpoint, scan_checkpoint, write_manifest)

deepspeed.init_distributed(dist_backend="gloo")
work = sys.argv[2]
marker = os.path.join(work, "PWNED")

class Evil:
    def __reduce__(self):
        return os.system, (f"touch {marker}",)

def engine(stage, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = TrainConfig(micro_batch_size=4, grad_accum=1, zero_stage=stage)
    e, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                 config=deepspeed_config(cfg, torch.device("cpu")),
                                 dist_init_required=False)
    return e

def params(e):
    ps = list(e.module.parameters())
    with deepspeed.zero.GatheredParameters(ps, enabled=e.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in e.module.named_parameters()}

def opt_state(e):
    base = getattr(e.optimizer, "optimizer", e.optimizer)  # ZeRO: AdamW on fp32 partitions
    return {f"{i}.{n}": v.clone() for i, s in enumerate(base.state.values())
            for n, v in s.items() if torch.is_tensor(v)}

def same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

def refused(e, d):
    try:
        restore_checkpoint(e, d, 0, where=d)
    except CheckpointRejected as err:
        return str(err)
    return None

def scanned(d):
    try:
        scan_checkpoint(d)
    except CheckpointRejected as err:
        return str(err)
    return None

out = {}
for stage in (0, 2, 3):
    src = os.path.join(work, f"zero{stage}")
    e = engine(stage, 0)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        loss = e(torch.randn(4, 6, generator=g)).pow(2).mean()
        e.backward(loss)
        e.step()
    save_checkpoint(e, src, 0, WorkerState(step=3), {"rng.cpu": torch.get_rng_state()})
    fresh = engine(stage, 1)
    changed = not same(params(e), params(fresh))
    state, tensors = restore_checkpoint(fresh, src, 0)
    res = {"init_differs": changed, "params_equal": same(params(e), params(fresh)),
           "opt_equal": same(opt_state(e), opt_state(fresh)) and len(opt_state(e)) > 0,
           "global_steps": [e.global_steps, fresh.global_steps], "step": state.step,
           "planted": {}, "scan_clean": scanned(src)}
    victim = engine(stage, 2)
    pts = sorted(f for f in os.listdir(os.path.join(src, "ds")) if f.endswith(".pt"))
    for i, name in enumerate(pts):
        # the attacker rewrites the manifest too: only the weights-only load stands in the way
        bad = os.path.join(work, f"zero{stage}-planted-{i}")
        shutil.copytree(src, bad)
        f = os.path.join(bad, "ds", name)
        sd = torch.load(f, weights_only=False)  # our own file, to plant into
        sd["payload"] = Evil()
        torch.save(sd, f)
        os.remove(os.path.join(bad, "vgen_manifest_rank0.json"))
        write_manifest(bad, 0)
        res["planted"][name] = [refused(victim, bad), os.path.exists(marker), scanned(bad)]
    # the same plant without a manifest rewrite: the digest check refuses it first
    bad = os.path.join(work, f"zero{stage}-planted-stale-manifest")
    shutil.copytree(src, bad)
    f = os.path.join(bad, "ds", pts[0])
    sd = torch.load(f, weights_only=False)
    sd["payload"] = Evil()
    torch.save(sd, f)
    res["stale_manifest"] = [refused(victim, bad), os.path.exists(marker)]
    out[stage] = res
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    work = tmp_path_factory.mktemp("ds-safety")
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(ROOT / ".cache" / "torch_extensions")))
    p = subprocess.run([sys.executable, "-c", _ENGINE, str(free_port()), str(work)], cwd=work,
                       env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, p.stdout[-3000:] + p.stderr[-6000:]
    return {int(k): v for k, v in json.loads(line[len("RESULT "):]).items()}


_FILES = {0: ["mp_rank_00_model_states.pt"],
          2: ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
          3: ["zero_pp_rank_0_mp_rank_00_model_states.pt",
              "zero_pp_rank_0_mp_rank_00_optim_states.pt"]}


@pytest.mark.parametrize("stage", [0, 2, 3], ids=lambda s: f"zero{s}")
def test_save_restore_round_trip(engine_results, stage):
    r = engine_results[stage]
    assert r["init_differs"]  # the restored engine started elsewhere
    assert r["params_equal"] and r["opt_equal"]
    assert r["global_steps"] == [3, 3] and r["step"] == 3


@pytest.mark.parametrize("stage", [0, 2, 3], ids=lambda s: f"zero{s}")
def test_a_planted_pickle_is_refused_and_never_runs(engine_results, stage):
    r = engine_results[stage]
    assert sorted(r["planted"]) == _FILES[stage]
    assert r["scan_clean"] is None  # the driver's scan accepts what vgen saved
    for name, (msg, ran, scan) in r["planted"].items():
        assert not ran, f"{name}: the payload ran"
        assert msg is not None, f"{name}: the restore accepted a planted pickle"
        assert f"ds/{name}: refused to load" in msg and "system" in msg, msg
        # the driver's scan (before Ray Train restores anything) finds it without loading it
        assert scan is not None and f"ds/{name} holds objects vgen does not load" in scan, scan
    msg, ran = r["stale_manifest"]
    assert not ran and msg is not None and "was changed after it was saved" in msg, msg
