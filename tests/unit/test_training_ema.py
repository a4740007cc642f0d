"""EMA of weights: the update rule and its warmup, swapping in for export, state round trip,
and the train stage's export writing the EMA weights (not the raw ones) when it is on."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from vgen_core.training import EMA, TrainConfig


def _named(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(*s, generator=g).to(dtype) for i, s in enumerate(shapes)}


def test_update_is_the_ema_rule_without_warmup():
    cur = _named((3, 4), (5,))
    ema = EMA(cur, decay=0.9, warmup=False)
    start = {k: v.clone() for k, v in cur.items()}
    new = _named((3, 4), (5,), seed=1)
    ema.update(new)
    for k in cur:
        torch.testing.assert_close(ema.shadow[k], 0.9 * start[k] + 0.1 * new[k])
    assert ema.num_updates == 1


def test_warmup_ramps_the_decay_then_caps_it():
    ema = EMA(_named((2,)), decay=0.9)  # (1+n)/(10+n) reaches 0.9 at n = 80
    seen = []
    for _ in range(200):
        seen.append(ema.current_decay())
        ema.update(_named((2,)))
    assert seen[0] == pytest.approx(1 / 10) and seen[1] == pytest.approx(2 / 11)
    assert all(a <= b for a, b in zip(seen, seen[1:]))
    assert seen[-1] == 0.9 and seen[79] < 0.9


def test_constant_weights_stay_constant_and_moving_ones_lag():
    w = torch.full((4,), 2.0)
    ema = EMA({"w": w}, decay=0.5, warmup=False)
    for _ in range(5):
        ema.update({"w": w})
    torch.testing.assert_close(ema.shadow["w"], w)
    for step in range(1, 6):
        ema.update({"w": w + step})
    assert 2.0 < float(ema.shadow["w"][0]) < 7.0  # behind the last value (7), past the start


def test_applied_swaps_in_the_average_and_restores_dtype_and_values():
    cur = _named((8,), dtype=torch.bfloat16)
    ema = EMA(cur, decay=0.5, warmup=False)
    raw = {k: v.clone() for k, v in cur.items()}
    ema.update({k: torch.zeros_like(v) for k, v in cur.items()})
    with ema.applied(cur):
        assert cur["p0"].dtype == torch.bfloat16
        torch.testing.assert_close(cur["p0"], (raw["p0"].float() * 0.5).to(torch.bfloat16))
    assert torch.equal(cur["p0"], raw["p0"])


def test_applied_restores_on_error():
    cur = _named((3,))
    raw = cur["p0"].clone()
    ema = EMA(cur, decay=0.5, warmup=False)
    ema.update({"p0": torch.zeros(3)})
    with pytest.raises(RuntimeError), ema.applied(cur):
        raise RuntimeError("export failed")
    assert torch.equal(cur["p0"], raw)


def test_state_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    ema = EMA(_named((3, 2), (4,)), decay=0.999)
    for s in range(3):
        ema.update(_named((3, 2), (4,), seed=s + 5))
    save_file(ema.state_dict(), tmp_path / "ema.safetensors")
    other = EMA(_named((3, 2), (4,), seed=9), decay=0.999)
    other.load_state_dict(load_file(tmp_path / "ema.safetensors"))
    assert other.num_updates == 3 and other.current_decay() == ema.current_decay()
    for k in ema.shadow:
        assert torch.equal(other.shadow[k], ema.shadow[k])


def test_mismatched_names_are_errors():
    ema = EMA(_named((2,), (3,)), decay=0.9)
    with pytest.raises(KeyError, match="missing"):
        ema.update({"p0": torch.zeros(2)})
    with pytest.raises(ValueError, match="does not match"):
        ema.load_state_dict({"shadow.p0": torch.zeros(2), "num_updates": torch.tensor(0)})


def test_config_bounds():
    assert TrainConfig().ema_decay == 0.0
    with pytest.raises(ValidationError):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(_named((2,)), decay=0.0)


class _FakeEngine:
    """What the train stage's export reads from a DeepSpeed engine (ZeRO 0-2)."""

    def __init__(self, module):
        self.module = module

    def zero_optimization_partition_weights(self) -> bool:
        return False


def test_stage_export_writes_the_ema_weights(tmp_path):
    from pipelines.stages.train import SUMMARY_NAME, _ema_tensors, _export
    from vgen_core.tokenizers.io import load_pretrained
    from vgen_core.training import get_task

    torch.manual_seed(0)
    model = get_task("lfq").build("tiny", {}, {})
    engine = _FakeEngine(model)
    ema = EMA(_ema_tensors(engine), decay=0.5, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(_ema_tensors(engine))  # shadow = raw - 0.5: differs from the live weights
    raw = {k: v.clone() for k, v in model.state_dict().items()}

    out = tmp_path / "model"
    _export(engine, ema, {"output_uri": str(out)}, rank=0, summary={"final": {}})
    loaded = load_pretrained(out)
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, ema.shadow[name])
        assert not torch.equal(p, raw[name])
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())  # restored
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["ema"] is True


def test_stage_export_other_ranks_write_nothing(tmp_path):
    from pipelines.stages.train import _export
    from vgen_core.training import get_task

    engine = _FakeEngine(get_task("lfq").build("tiny", {}, {}))
    _export(engine, None, {"output_uri": str(tmp_path / "m")}, rank=1, summary={})
    assert not (tmp_path / "m").exists()


_ZERO3 = r"""
import os, sys
rank = sys.argv[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK=rank, LOCAL_RANK=rank,
                  WORLD_SIZE="2")
import torch, deepspeed
from pipelines.stages.train import _ema_tensors, _export, _make_ema
from vgen_core.tokenizers.io import load_pretrained
from vgen_core.training import TrainConfig, deepspeed_config, get_task, train_loop

deepspeed.init_distributed(dist_backend="gloo")
cfg = TrainConfig(steps=4, micro_batch_size=4, zero_stage=3, ema_decay=0.5, log_every=2)
info = {"codebook_size": 64, "seq_len": 16, "num_classes": 3}
torch.manual_seed(0)
task = get_task("maskgit")
model = task.build("tiny", {}, info)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                  config=deepspeed_config(cfg, torch.device("cpu")),
                                  dist_init_required=False)
ema = _make_ema(engine, cfg, int(rank))
assert ema is not None  # ZeRO-3: every rank averages its own partitions
g = torch.Generator().manual_seed(1)
data = [{"tokens": torch.randint(0, 64, (4, 16), generator=g),
         "label": torch.randint(0, 3, (4,), generator=g)} for _ in range(4)]
train_loop(engine, iter(data), task.loss, cfg, on_step=lambda s, l: ema.update(_ema_tensors(engine)))
out = sys.argv[3]
_export(engine, ema, {"output_uri": out, "model": "maskgit", "size": "tiny", "overrides": {},
                      "data_info": info}, int(rank), {"final": {}})
torch.distributed.barrier()
exported = dict(load_pretrained(out).named_parameters())
ok = True
for name, p in engine.module.named_parameters():  # this rank's slice of the exported tensor
    n = p.ds_tensor.numel()
    mine = exported[name].detach().flatten()[int(rank) * n:(int(rank) + 1) * n]
    ok &= torch.equal(mine, ema.shadow[name][: mine.numel()])
    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        ok &= not torch.equal(exported[name], p.detach().float())
print("EXPORTED_EMA" if ok else "MISMATCH")
"""


def test_zero3_export_gathers_every_ranks_ema_partitions(tmp_path):
    """Two gloo ranks, ZeRO-3: each rank averages its partitions; the export holds them all."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=str(root), CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(root / ".cache" / "torch_extensions")))
    procs = [subprocess.Popen([sys.executable, "-c", _ZERO3, str(r), port, str(tmp_path / "m")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "EXPORTED_EMA" in out, out[-2000:] + err[-6000:]
