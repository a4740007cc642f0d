"""Inspect a weights file: a vgen export, or a released (foreign) checkpoint matched to a family.

``inspect(path)`` reads, without building a model on a real device:

* a vgen export (a folder with ``config.json`` + ``model.safetensors``, or that safetensors file
  with ``config.json`` beside it): family, size (the named size whose config equals the file's,
  else ``"custom"``), pixel range, tensor count and bytes, the file's sha256, and the recorded
  ``weights_digest`` checked against the tensors;
* any other state dict (``.safetensors``; ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` read only
  with ``torch.load(weights_only=True)``, never a full unpickle; the usual ``{"state_dict": ...}``
  / ``{"model": ...}`` wrappers are unwrapped): the family and size whose expected keys and shapes
  (models instantiated on the ``meta`` device, nothing allocated) fit best, with the missing,
  unexpected and shape-mismatched keys. A family's ``official_key_map`` (released names ->
  vgen names) is applied when it fits better than the names as they are.

Unreadable, truncated or not-a-state-dict files raise :class:`WeightsError` naming the file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

__all__ = ["WeightsError", "inspect", "format_report", "expected_shapes"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: wrappers released checkpoints put the state dict under (first found wins)
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "ema", "net", "params")
#: mapping functions (released names -> vgen names) of families whose load_official module does
#: not define ``official_key_map`` itself
_KEY_MAP_FUNCS = {"lfq": "vgen_core.tokenizers.maskbit_keys:official_key_map"}
SHOW = 10  # keys listed per diff category

Shapes = dict[str, tuple[int, ...]]


class WeightsError(ValueError):
    """A weights file that cannot be read or is not a state dict (the message names the file)."""


@dataclass
class Match:
    family: str
    size: str
    matched: int
    expected: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[dict[str, Any]]
    key_map: bool = False
    ties: list[str] = field(default_factory=list)

    @property
    def badness(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family, "size": self.size, "matched": self.matched,
            "expected": self.expected, "key_map": self.key_map,
            "missing": sorted(self.missing)[:SHOW], "missing_count": len(self.missing),
            "unexpected": sorted(self.unexpected)[:SHOW],
            "unexpected_count": len(self.unexpected),
            "mismatched": sorted(self.mismatched, key=lambda m: m["key"])[:SHOW],
            "mismatched_count": len(self.mismatched), "ties": self.ties,
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dtype_size(dtype: str) -> int:
    name = dtype.lower()
    table = {"bool": 1, "u8": 1, "i8": 1, "f8_e4m3": 1, "f8_e5m2": 1, "i16": 2, "u16": 2,
             "f16": 2, "bf16": 2, "i32": 4, "u32": 4, "f32": 4, "i64": 8, "u64": 8, "f64": 8}
    if name not in table:
        raise KeyError(dtype)
    return table[name]


def _read_safetensors(path: Path) -> tuple[Shapes, int, dict[str, str]]:
    """(shapes, total bytes, header metadata) from the header alone."""
    from safetensors import safe_open

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(f"header of {n} bytes does not fit in a {size}-byte file")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items()
                   if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"truncated: tensor data ends at byte {8 + n + end}, file has {size}")
        with safe_open(str(path), framework="pt") as f:  # validates offsets and dtypes
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            meta = dict(f.metadata() or {})
        total = 0
        for k, v in header.items():
            if k != "__metadata__":
                a, b = v["data_offsets"]
                total += int(b) - int(a)
    except Exception as e:  # safetensors raises its own error types; all mean "unreadable"
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    return shapes, total, meta


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict in a loaded pickle, and the wrapper key it was under (None: top level)."""
    if _tensor_dict(obj):
        return dict(obj), None
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if _tensor_dict(inner):
                return dict(cast(Mapping[str, torch.Tensor], inner)), key
        bad = next(((k, v) for k, v in obj.items()
                    if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        what = (f"entry {bad[0]!r} holds {type(bad[1]).__name__}" if bad else "it is empty")
        raise WeightsError(
            f"{path}: not a plain state dict ({what}; no {'/'.join(WRAPPER_KEYS)} wrapper "
            "holding one)")
    raise WeightsError(f"{path}: not a plain state dict (the pickle holds a "
                       f"{type(obj).__name__})")


def _read_pickle(path: Path) -> tuple[Shapes, int, str | None]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (refused object), RuntimeError (truncated zip), ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if len(reason) > 200:  # torch's corrupted-zip advice runs on; keep the first sentence
            reason = reason[:200].rsplit(". ", 1)[0] + "."
        raise WeightsError(
            f"{path}: cannot be read with torch.load(weights_only=True): {reason}") from e
    state, wrapper = _unwrap(obj, path)
    if all(k.startswith("module.") for k in state):  # DataParallel / DDP prefix
        state = {k.removeprefix("module."): v for k, v in state.items()}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    total = sum(v.numel() * v.element_size() for v in state.values())
    return shapes, total, wrapper


# -- families: expected keys and shapes ---------------------------------------------------------

_EXPECTED: dict[tuple[str, str], Shapes | None] = {}


def expected_shapes(spec: Any, size: str) -> Shapes | None:
    """State-dict keys and shapes of ``spec``'s ``size`` (built on the meta device; None when
    it cannot be built there)."""
    key = (spec.name, size)
    if key not in _EXPECTED:
        try:
            with torch.device("meta"):
                model = spec.build_config(spec.config(size))
            _EXPECTED[key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        except Exception:  # a model that cannot be instantiated on meta: not a candidate
            _EXPECTED[key] = None
    return _EXPECTED[key]


def _key_map_func(spec: Any) -> Callable[..., Any] | None:
    target = _KEY_MAP_FUNCS.get(spec.name)
    if target is not None:
        module_name, _, attr = target.partition(":")
        return cast(Callable[..., Any], getattr(importlib.import_module(module_name), attr))
    if spec.load_official is None:
        return None
    module = importlib.import_module(spec.load_official.__module__)
    fn = getattr(module, "official_key_map", None)
    return fn if callable(fn) else None


def _mapped(spec: Any, shapes: Shapes) -> Shapes | None:
    """``shapes`` under the family's released -> vgen key names (None: no mapping applies)."""
    fn = _key_map_func(spec)
    if fn is None:
        return None
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    try:
        out = fn(fake)
    except Exception:  # the mapping refuses these names: they are not this family's release
        return None
    if not isinstance(out, Mapping):
        return None
    mapped: Shapes = {}
    for src, dst in out.items():
        if isinstance(dst, str) and src in shapes:  # key -> key
            mapped[dst] = shapes[src]
        elif isinstance(dst, torch.Tensor):  # key -> tensor, renamed
            mapped[str(src)] = tuple(dst.shape)
    return mapped


def _compare(family: str, size: str, got: Shapes, want: Shapes, key_map: bool) -> Match:
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    mismatched = [{"key": k, "file": list(got[k]), "model": list(want[k])}
                  for k in want if k in got and got[k] != want[k]]
    matched = sum(1 for k in want if k in got and got[k] == want[k])
    return Match(family, size, matched, len(want), missing, unexpected, mismatched, key_map)


def best_match(shapes: Shapes) -> Match | None:
    """The family / size whose expected state dict fits ``shapes`` best (most keys with equal
    shapes, then fewest differences); None when nothing matches a single key."""
    from vgen_core import families

    best: Match | None = None
    ties: list[str] = []
    for spec in families.all_specs():
        mapped = _mapped(spec, shapes)
        for size in spec.sizes:
            want = expected_shapes(spec, size)
            if want is None:
                continue
            cands = [_compare(spec.name, size, shapes, want, False)]
            if mapped is not None and mapped != shapes:
                cands.append(_compare(spec.name, size, mapped, want, True))
            m = max(cands, key=lambda c: (c.matched, -c.badness))
            if best is None or (m.matched, -m.badness) > (best.matched, -best.badness):
                best, ties = m, []
            elif (m.matched, -m.badness) == (best.matched, -best.badness):
                ties.append(f"{m.family}/{m.size}")
    if best is None or best.matched == 0:
        return None
    best.ties = ties
    return best


# -- entry point -------------------------------------------------------------------------------

def _export_info(path: Path, config_path: Path) -> dict[str, Any]:
    """Family, size and pixel range of a vgen export's ``config.json``."""
    from vgen_core import families
    from vgen_core.tokenizers.io import _RESERVED_KEYS

    try:
        payload = json.loads(config_path.read_text())
        family = payload["family"]
        spec = families.get(family)
        fields = {k: v for k, v in payload.items() if k not in _RESERVED_KEYS}
        config = spec.config_class.model_validate(fields).model_dump(mode="json")
    except Exception as e:
        raise WeightsError(f"{config_path}: not a vgen config.json ({e})") from e
    size = next((s for s in spec.sizes if spec.config(s).model_dump(mode="json") == config),
                "custom")
    return {"family": family, "size": size, "pixel_range": spec.pixel_range,
            "weights_digest": payload.get("weights_digest")}


def _digest_ok(path: Path, recorded: str | None) -> bool | None:
    if recorded is None:
        return None
    from safetensors.torch import load_file

    from vgen_core.tokenizers.io import weights_digest

    state = load_file(str(path), device="cpu")

    class _Holder:
        def state_dict(self) -> dict[str, torch.Tensor]:
            return state

    return weights_digest(cast(Any, _Holder())) == recorded


def inspect(path: str | Path) -> dict[str, Any]:
    """What ``vgen weights inspect`` reports about ``path`` (see the module docstring)."""
    p = Path(path)
    if p.is_dir():
        weights = p / "model.safetensors"
        if not weights.is_file():
            raise WeightsError(f"{p}: no model.safetensors in this folder")
        p = weights
    if not p.is_file():
        raise WeightsError(f"{p}: not found")
    report: dict[str, Any] = {"path": str(p)}
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        shapes, total, meta = _read_safetensors(p)
        report["format"] = "safetensors"
    elif suffix in PICKLE_SUFFIXES:
        shapes, total, wrapper = _read_pickle(p)
        meta = {}
        report["format"] = "pickle"
        report["wrapper"] = wrapper
    else:
        raise WeightsError(f"{p}: unknown weights format '{suffix}' (use .safetensors, "
                           f"{', '.join(PICKLE_SUFFIXES)})")
    report.update(tensors=len(shapes), bytes=total, sha256=_sha256(p))
    config_path = p.with_name("config.json")
    if report["format"] == "safetensors" and config_path.is_file():
        report["kind"] = "vgen"
        report.update(_export_info(p, config_path))
        recorded = report["weights_digest"] or meta.get("weights_digest")
        report["weights_digest"] = recorded
        report["digest_ok"] = _digest_ok(p, recorded)
        return report
    report["kind"] = "foreign"
    match = best_match(shapes)
    report["match"] = None if match is None else match.to_json()
    return report


def format_report(r: dict[str, Any]) -> str:
    """Human-readable lines for an :func:`inspect` report."""
    lines = [f"{r['path']}: {'vgen export' if r['kind'] == 'vgen' else 'released checkpoint'} "
             f"({r['format']}{', under ' + repr(r['wrapper']) if r.get('wrapper') else ''})",
             f"  tensors      {r['tensors']} ({r['bytes']:,} bytes)",
             f"  sha256       {r['sha256']}"]
    if r["kind"] == "vgen":
        ok = {True: "matches the tensors", False: "DOES NOT match the tensors",
              None: "not recorded"}[r["digest_ok"]]
        lines[1:1] = [f"  family       {r['family']}", f"  size         {r['size']}",
                      f"  pixel range  {r['pixel_range']}"]
        lines.append(f"  digest       {r['weights_digest']} ({ok})")
        return "\n".join(lines)
    m = r["match"]
    if m is None:
        lines.append("  match        none: no family's keys and shapes fit this state dict")
        return "\n".join(lines)
    how = " (names via the family's official_key_map)" if m["key_map"] else ""
    lines.append(f"  best match   {m['family']} / {m['size']}: {m['matched']} of "
                 f"{m['expected']} keys with equal shapes{how}")
    if m["ties"]:
        lines.append(f"  as good      {', '.join(m['ties'])}")
    for name in ("missing", "unexpected", "mismatched"):
        if m[f"{name}_count"]:
            lines.append(f"  {name:<12} {m[f'{name}_count']}")
            for item in m[name]:
                text = (f"{item['key']}: file {tuple(item['file'])}, model "
                        f"{tuple(item['model'])}" if isinstance(item, dict) else item)
                lines.append(f"    {text}")
    lines.append(f"  convert with family {m['family']!r}, size {m['size']!r}")
    return "\n".join(lines)
