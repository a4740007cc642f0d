"""Export and load model weights: `model.safetensors` + `config.json`, never pickle.

Directory layout written by `save_pretrained(model, directory)`:

    config.json        {"family": "lfq", "format_version": 1, "weights_digest": "...",
                        <config fields>}
    model.safetensors  the state dict (persistent buffers included); header metadata repeats
                       family and digest

A model class is saveable when it has `family: ClassVar[str]`, a pydantic `config` attribute and a
constructor `Model(config)`. `load_pretrained` finds the class from the family name: the
built-in families through their :class:`~vgen_core.families.FamilySpec` (imported on first use,
so this module imports no model code), others added with `register_family`. Loading reads JSON
and safetensors only (no `torch.load`, no unpickling) and checks the recorded weights digest.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = ["load_pretrained", "register_family", "save_pretrained", "weights_digest"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
_RESERVED_KEYS = ("family", "format_version", "weights_digest")

#: classes registered by hand (out-of-tree models); built-in families come from their
#: :class:`~vgen_core.families.FamilySpec` (``vgen_core.families``)
_EXTRA: dict[str, str | type[nn.Module]] = {}


def register_family(family: str, model_cls: type[nn.Module] | str) -> None:
    """Let `load_pretrained` build `family` (a class, or a 'module.path:ClassName' string) that
    has no :class:`~vgen_core.families.FamilySpec`."""
    _EXTRA[family] = model_cls


def _resolve(family: str) -> type[nn.Module]:
    from vgen_core import families

    spec = families.find(family)
    if spec is not None and spec.name == family:
        return spec.model_class
    if family not in _EXTRA:
        raise ValueError(
            f"model family '{family}' is not registered; known: "
            f"{', '.join(sorted({*families.names(), *_EXTRA}))}. Declare a FamilySpec "
            "(vgen_core.families) or call vgen_core.tokenizers.io.register_family(name, cls)."
        )
    target = _EXTRA[family]
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module_name), attr)
        _EXTRA[family] = target
    return target


def weights_digest(model: nn.Module) -> str:
    """blake2b (32-byte) hex digest of the state dict, independent of device and parameter order.

    For each entry in sorted key order, hashes the key, the dtype name, the shape and the raw
    little-endian tensor bytes (each field length-prefixed so boundaries are unambiguous).
    """
    h = hashlib.blake2b(digest_size=32)

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    state = model.state_dict()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        put(key.encode())
        put(str(t.dtype).removeprefix("torch.").encode())
        put(json.dumps(list(t.shape)).encode())
        put(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` into `directory` (created if needed).

    Returns the directory path. Raises if the model lacks `family`/`config` or has tied tensors.
    """
    family = getattr(model, "family", None)
    config = getattr(model, "config", None)
    if not isinstance(family, str) or config is None or not hasattr(config, "model_dump"):
        raise TypeError(
            f"save_pretrained: {type(model).__name__} needs a `family` string and a pydantic "
            "`config` attribute to be exported."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    digest = weights_digest(model)
    save_file(
        state,
        str(directory / WEIGHTS_NAME),
        metadata={
            "family": family,
            "format_version": str(FORMAT_VERSION),
            "weights_digest": digest,
        },
    )
    payload: dict[str, Any] = {
        "family": family,
        "format_version": FORMAT_VERSION,
        "weights_digest": digest,
        **config.model_dump(mode="json"),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return directory


def load_pretrained(
    directory: str | Path, *, expected_family: str | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build the model described by `directory/config.json` and load its safetensors weights.

    The model is returned in eval mode on `device`. Raises ValueError on a family mismatch, an
    unknown family, missing/unexpected weights or a digest that does not match the file.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"load_pretrained: {p} not found; was it written by save_pretrained?"
            )
    payload = json.loads(config_path.read_text())
    family = payload.get("family")
    if family is None:
        raise ValueError(f"load_pretrained: {config_path} has no 'family' key.")
    if expected_family is not None and family != expected_family:
        raise ValueError(
            f"load_pretrained: {directory} holds a '{family}' model, expected '{expected_family}'."
        )
    model_cls = _resolve(family)
    fields = {k: v for k, v in payload.items() if k not in _RESERVED_KEYS}
    config = model_cls.config_class.model_validate(fields)  # type: ignore[attr-defined]
    model = model_cls(config)
    state = load_file(str(weights_path), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"load_pretrained: weights in {weights_path} do not fit the '{family}' config: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    recorded = payload.get("weights_digest")
    if recorded is not None and weights_digest(model) != recorded:
        raise ValueError(
            f"load_pretrained: weights digest of {weights_path} does not match {config_path}; "
            "the files were modified or mixed from two exports."
        )
    return model.to(device).eval()


def read_config(uri: str) -> tuple[Any, Any]:
    """(FamilySpec, validated config) of an exported model directory (local or remote), from its
    ``config.json`` alone (no weights read)."""
    from vgen_core import families
    from vgen_core.data.fsio import filesystem_for

    fs, path = filesystem_for(uri)
    payload = json.loads(fs.cat_file(f"{path.rstrip('/')}/{CONFIG_NAME}"))
    spec = families.get(payload.get("family", "?"))
    fields = {k: v for k, v in payload.items() if k not in _RESERVED_KEYS}
    return spec, spec.config_class.model_validate(fields)


# Released (official) checkpoints ----------------------------------------------------------

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_state_dict(source: str | Path | Mapping[str, Tensor], *, what: str) -> dict[str, Tensor]:
    """A state dict given directly, or read from a `.safetensors` file (never unpickled).

    Pickle checkpoints (.ckpt/.bin/.pt/.pth) are refused. Convert one once, in an environment you
    trust, e.g. for a LDM/SD `.ckpt` (weights under "state_dict") or a MAR `kl16.ckpt` ("model"):

        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd.get("model", sd))
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, out_path)
    """
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(
            f"{what}: {path} is a pickle checkpoint, which is never unpickled here. Convert it "
            "once to safetensors in a trusted environment (torch.load(path, map_location='cpu', "
            "weights_only=True) then safetensors.torch.save_file); see read_state_dict's docstring."
        )
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found.")
    return load_file(str(path), device="cpu")


def check_released_shapes(
    released: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    dropped: Mapping[str, str],
    *,
    what: str,
    config_note: str,
    depth: int,
) -> None:
    """Released names and shapes against the ones a config expects, before anything is mapped:
    ValueError naming the first missing key, the first key of another shape (both shapes and
    ``config_note``, the config fields that set it), or the first key neither expected nor in
    ``dropped``."""
    for key, shape in expected.items():
        if key not in released:
            raise ValueError(f"{what}: the checkpoint has no '{key}' (expected shape {shape}); "
                             "it does not match this size (check depth).")
        got = tuple(released[key].shape)
        if got != tuple(shape):
            raise ValueError(f"{what}: '{key}' has shape {got} in the checkpoint but this config "
                             f"expects {tuple(shape)} ({config_note}).")
    extra = [k for k in released if k not in expected and k not in dropped]
    if extra:
        raise ValueError(f"{what}: checkpoint key '{extra[0]}' has no place in this config "
                         f"({len(extra)} such keys; check depth={depth}).")


def load_mapped_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    key_map: Mapping[str, str],
    *,
    what: str,
    reshape_to_target: bool = False,
) -> nn.Module:
    """Copy `state_dict[src]` into `model`'s `key_map[src]` for every src in `key_map`; strict.

    Raises ValueError naming the first checkpoint key whose shape does not fit (both shapes),
    else the first model key nothing maps to, else the first mapped key the model lacks.
    With `reshape_to_target`, a tensor with the same number of elements and equal leading dims
    (a Linear (D, D) weight for a 1x1 Conv (D, D, 1, 1)) is reshaped to the target shape.
    """
    own = model.state_dict()
    converted: dict[str, Tensor] = {}
    for src, dst in key_map.items():
        tensor = state_dict[src]
        if dst in own and tuple(tensor.shape) != tuple(own[dst].shape):
            target = own[dst].shape
            fits = tensor.ndim >= 2 and tuple(target[: tensor.ndim]) == tuple(tensor.shape)
            if not (reshape_to_target and fits and tensor.numel() == own[dst].numel()):
                raise ValueError(
                    f"{what}: checkpoint key '{src}' (-> '{dst}') has shape "
                    f"{tuple(tensor.shape)} but the model expects {tuple(target)}; the checkpoint "
                    "does not match this size/config."
                )
            tensor = tensor.reshape(target)
        converted[dst] = tensor
    missing = [k for k in own if k not in converted]
    if missing:
        raise ValueError(
            f"{what}: model key '{missing[0]}' has no source in the checkpoint "
            f"({len(missing)} missing in total); the checkpoint does not match this size/config."
        )
    unexpected = [(s, d) for s, d in key_map.items() if d not in own]
    if unexpected:
        s, d = unexpected[0]
        raise ValueError(
            f"{what}: checkpoint key '{s}' (-> '{d}') has no counterpart in the model "
            f"({len(unexpected)} such keys); the checkpoint does not match this size/config."
        )
    model.load_state_dict(converted, strict=True)
    return model
