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

__all__ = ["ConvertError", "WeightsError", "convert", "expected_shapes", "fit", "format_report",
           "inspect", "load_weights", "read_manifest", "read_weights"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: wrappers released checkpoints put the state dict under (first found wins)
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "ema", "net", "params")
#: mapping functions (released names -> vgen names) of families whose load_official module does
#: not define ``official_key_map`` itself
_KEY_MAP_FUNCS = {"lfq": "vgen_core.tokenizers.maskbit_keys:official_key_map",
                  "deltatok": "vgen_core.tokenizers.deltatok:deltatok_key_map"}
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


def _load_pickle(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict of a ``.bin`` / ``.pt`` / ... file, read with ``weights_only=True`` (no
    object is ever built from the pickle), and the wrapper key it was under."""
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
    return state, wrapper


def _read_pickle(path: Path) -> tuple[Shapes, int, str | None]:
    state, wrapper = _load_pickle(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    total = sum(v.numel() * v.element_size() for v in state.values())
    return shapes, total, wrapper


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, source facts) of a released checkpoint: ``.safetensors`` (header checked,
    tensors on CPU) or a pickle read with ``torch.load(weights_only=True)`` only (the usual
    wrappers unwrapped). Facts: ``path``, ``format``, ``wrapper``, ``sha256``, ``bytes``.
    :class:`WeightsError` naming the file when it cannot be read or is not a state dict."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"  # an HF-hub style snapshot folder
    if not p.is_file():
        raise WeightsError(f"{p}: not found")
    suffix = p.suffix.lower()
    wrapper: str | None = None
    if suffix == ".safetensors":
        _, total, _ = _read_safetensors(p)
        try:
            state = load_file(str(p), device="cpu")
        except Exception as e:
            raise WeightsError(f"{p}: not a readable safetensors file ({e})") from e
        fmt = "safetensors"
    elif suffix in PICKLE_SUFFIXES:
        state, wrapper = _load_pickle(p)
        total = sum(v.numel() * v.element_size() for v in state.values())
        fmt = "pickle"
    else:
        raise WeightsError(f"{p}: unknown weights format '{suffix}' (use .safetensors, "
                           f"{', '.join(PICKLE_SUFFIXES)})")
    return state, {"path": str(p), "format": fmt, "wrapper": wrapper, "sha256": _sha256(p),
                   "bytes": total}


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


# -- convert: a released checkpoint -> a vgen export ------------------------------------------

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vgen-converted-weights/1"


class ConvertError(WeightsError):
    """A checkpoint that does not fit the asked family / size (``match`` holds the key diff)."""

    def __init__(self, message: str, match: Match | None = None):
        super().__init__(message)
        self.match = match


def _official_module(spec: Any) -> Any:
    target = _KEY_MAP_FUNCS.get(spec.name)
    if target is not None:
        return importlib.import_module(target.partition(":")[0])
    if spec.load_official is None:
        return None
    return importlib.import_module(spec.load_official.__module__)


def dropped_reasons(spec: Any, keys: list[str]) -> dict[str, str]:
    """Released keys the family deliberately does not load -> why (the family module's
    ``OFFICIAL_DROPPED``: key or key prefix -> reason, ``network.`` style wrappers allowed; or
    ``name[rows]`` for rows of a table loaded in part, reported under that entry)."""
    module = _official_module(spec)
    table: Mapping[str, str] = getattr(module, "OFFICIAL_DROPPED", {}) if module else {}
    out: dict[str, str] = {}
    for key in keys:
        for prefix, reason in table.items():
            if "[" in prefix:  # rows of a table that is loaded in part: "pos_embed[L + 2:]"
                if key == prefix.partition("[")[0]:
                    out[prefix] = reason
            elif key == prefix or key.startswith(prefix) or f".{prefix}" in f".{key}":
                out[key] = reason
                break
    return out


def _shapes_of_config(spec: Any, config: Any) -> Shapes:
    try:
        with torch.device("meta"):
            model = spec.build_config(config)
    except Exception as e:
        raise ConvertError(f"cannot build a {spec.name} model from this config ({e})") from e
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _renamed(spec: Any, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """``state`` under vgen names through the family's ``official_key_map`` (None: no map, or
    the map refuses these names)."""
    fn = _key_map_func(spec)
    if fn is None:
        return None
    try:
        out = fn(state)
    except Exception:
        return None
    if not isinstance(out, Mapping):
        return None
    renamed: dict[str, torch.Tensor] = {}
    for a, b in out.items():
        if isinstance(b, str):  # released key -> vgen key
            renamed[b] = state[a]
        elif isinstance(b, torch.Tensor):  # vgen key -> tensor
            renamed[str(a)] = b
    return renamed


def fit(spec: Any, config: Any, state: Mapping[str, torch.Tensor], *, what: str,
        size: str = "custom") -> tuple[Any, Match]:
    """Build ``spec``'s model of ``config`` holding ``state`` (released names through the
    family's key map and ``load_official``, or vgen's own names), strictly: every model tensor
    sourced with its shape, every checkpoint tensor used or dropped with a reason
    (:func:`dropped_reasons`). Returns (model in eval mode, the key match).
    :class:`ConvertError` with the key diff otherwise."""
    want = _shapes_of_config(spec, config)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    own = _compare(spec.name, size, shapes, want, False)
    renamed = _renamed(spec, state)
    mapped = (None if renamed is None or set(renamed) == set(state) and all(
        renamed[k] is state[k] for k in state) else _compare(
            spec.name, size, {k: tuple(v.shape) for k, v in renamed.items()}, want, True))
    match = own if mapped is None or (own.matched, -own.badness) >= (
        mapped.matched, -mapped.badness) else mapped
    if not match.key_map:  # vgen names: leftovers only where the family drops them
        match.unexpected = [k for k in match.unexpected
                            if k not in dropped_reasons(spec, match.unexpected)]
    if match.badness:
        raise ConvertError(f"{what}: the checkpoint does not fit {spec.name} / {size}\n"
                           + diff_lines(match), match)
    try:
        if match.key_map and spec.load_official is not None:
            model = spec.load_official(state, config)
        else:
            model = spec.build_config(config)
            model.load_state_dict({k: v for k, v in state.items() if k in want}, strict=True)
    except Exception as e:  # a family loader's own check (ValueError, KeyError, ...)
        raise ConvertError(f"{what}: {spec.name} / {size} refused the checkpoint: {e}",
                           match) from e
    return model.eval(), match


def diff_lines(m: Match, show: int = 5) -> str:
    """The first ``show`` missing / unexpected / shape-mismatched keys of ``m``, readable."""
    lines = [f"  {m.matched} of {m.expected} model tensors found with equal shapes"
             + (" (keys below are vgen names, mapped from the released ones by the family's "
                "official_key_map)" if m.key_map else "")]
    for name, items in (("missing", sorted(m.missing)), ("unexpected", sorted(m.unexpected))):
        if items:
            lines.append(f"  {name} ({len(items)}): " + ", ".join(items[:show])
                         + (", ..." if len(items) > show else ""))
    if m.mismatched:
        lines.append(f"  shape mismatches ({len(m.mismatched)}):")
        for d in sorted(m.mismatched, key=lambda d: d["key"])[:show]:
            lines.append(f"    {d['key']}: file {tuple(d['file'])}, model {tuple(d['model'])}")
    return "\n".join(lines)


def preprocessing(spec: Any, config: Any, pixel_range: str) -> dict[str, Any]:
    """What a stage does to an image before this model sees it (recorded in the manifest)."""
    from vgen_core import families

    return {"pixel_range": pixel_range,
            "range": {"signed": [-1.0, 1.0], "unit": [0.0, 1.0]}[pixel_range],
            "resolution": spec.native_resolution(config),
            "resize": "shorter side to the resolution (bicubic), center crop",
            "layout": "RGB, (B, 3, H, W) float32",
            "converter": families.__name__ + ".to_model_pixels"}


def convert(src: str | Path, dst: str | Path, family: str, size: str, *,
            overrides: Mapping[str, Any] | None = None, pixel_range: str | None = None,
            force: bool = False) -> dict[str, Any]:
    """Read a released checkpoint (safetensors, or a pickle read weights-only), load it into
    ``family`` / ``size`` strictly (:func:`fit`), and write ``dst`` as a vgen export
    (``config.json`` + ``model.safetensors``) plus ``manifest.json`` (family, size, pixel range,
    preprocessing, the source file's sha256, dropped keys with reasons). ``pixel_range``
    declares the range the checkpoint was trained on (default: the family's); a stage feeding
    another range refuses the export. Written to a temporary folder and renamed: on any error
    nothing is left at ``dst``. Returns the manifest."""
    import os
    import shutil
    import tempfile

    from vgen_core import families
    from vgen_core.tokenizers.io import save_pretrained, weights_digest

    spec = families.find(family)
    if spec is None:
        raise WeightsError(f"model family {family!r} not found; known: "
                           f"{', '.join(families.names())}")
    if size not in spec.sizes:
        raise WeightsError(f"{spec.name} has no size {size!r}; sizes: {', '.join(spec.sizes)}")
    rng = pixel_range or spec.pixel_range
    if rng is not None and rng not in families.PIXEL_RANGES:
        raise WeightsError(f"pixel range {rng!r} not known; use one of "
                           f"{', '.join(families.PIXEL_RANGES)}")
    out = Path(dst)
    src_path = Path(src).resolve()
    if out.resolve() == src_path or out.resolve() in src_path.parents:
        raise WeightsError(f"{out}: is or holds the source {src}; choose another destination")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not force:
            raise WeightsError(f"{out}: already exists (pass --force to replace it)")
        if not (out.is_dir() and (out / "config.json").is_file()
                and (out / "model.safetensors").is_file()):
            raise WeightsError(f"{out}: --force replaces only a previous export (a folder with "
                               "config.json and model.safetensors); this is something else")
    try:
        config = spec.config(size, **dict(overrides or {}))
    except Exception as e:
        raise WeightsError(f"{spec.name} / {size}: overrides do not validate ({e})") from e
    state, source = read_weights(src)
    model, match = fit(spec, config, state, what=str(src), size=size)
    dropped = dropped_reasons(spec, [k for k in state if k not in match.unexpected])
    if not match.key_map:  # vgen names: nothing was sliced or renamed
        dropped = {k: r for k, r in dropped.items()
                   if k not in model.state_dict() and "[" not in k}
    manifest = {
        "format": MANIFEST_FORMAT, "family": spec.name, "size": size,
        "overrides": dict(overrides or {}), "pixel_range": rng,
        "preprocessing": (preprocessing(spec, config, rng) if rng else None),
        "source": {**source, "names": "released" if match.key_map else "vgen"},
        "tensors": len(model.state_dict()), "dropped": dropped,
        "weights_digest": weights_digest(model),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from other users
    try:
        save_pretrained(model, tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The ``manifest.json`` of a converted export (None when the folder has none)."""
    p = Path(folder) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise WeightsError(f"{p}: not JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise WeightsError(f"{p}: not a vgen weights manifest (format "
                           f"{data.get('format') if isinstance(data, dict) else None!r}, "
                           f"expected {MANIFEST_FORMAT!r})")
    return data


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a vgen export: a folder with config.json + model.safetensors, or
    that safetensors file with config.json beside it."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
            and (p.is_dir() or p.name == "model.safetensors")):
        return False
    try:  # an HF snapshot has a config.json too, without vgen's "family"
        return "family" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def export_uri(uri: str) -> str:
    """``uri`` with a vgen export's ``.../model.safetensors`` turned into its folder (so the
    manifest, config and digest checks see the whole export); other uris unchanged."""
    from vgen_core.data.fsio import filesystem_for

    if not uri.rstrip("/").endswith("/model.safetensors"):
        return uri
    folder = uri.rstrip("/").rsplit("/", 1)[0]
    fs, path = filesystem_for(folder)
    try:
        if fs.exists(f"{path.rstrip('/')}/config.json"):
            payload = json.loads(fs.cat_file(f"{path.rstrip('/')}/config.json"))
            if isinstance(payload, dict) and "family" in payload:
                return folder
    except (OSError, ValueError):
        pass
    return uri


def export_problem(uri: str, family: str, config: Any, pixel_range: str | None) -> str | None:
    """Why the export folder ``uri`` (local or remote; read: its two small JSON files) cannot
    serve a stage of ``family`` / ``config`` (None: not compared) fed ``pixel_range``; None
    when it can, or when ``uri`` is not an export folder (released files are checked when
    loaded)."""
    from vgen_core.data.fsio import filesystem_for
    from vgen_core.tokenizers.io import _RESERVED_KEYS

    fs, path = filesystem_for(uri)
    base = path.rstrip("/")
    if not fs.isdir(path) or not fs.exists(f"{base}/config.json"):
        return None
    try:
        payload = json.loads(fs.cat_file(f"{base}/config.json"))
        manifest = (json.loads(fs.cat_file(f"{base}/{MANIFEST_NAME}"))
                    if fs.exists(f"{base}/{MANIFEST_NAME}") else {})
    except (OSError, ValueError) as e:
        return f"{uri!r}: its config.json / {MANIFEST_NAME} cannot be read ({e})"
    if not isinstance(payload, dict) or "family" not in payload:
        return None  # an HF snapshot folder (its config.json is not vgen's): a release
    if payload.get("family") != family:
        return (f"{uri!r} holds a {payload.get('family')!r} model; this stage uses {family!r} "
                "(set with.model, or point at a folder of that family)")
    declared = manifest.get("pixel_range")
    if pixel_range is not None and declared not in (None, pixel_range):
        return (f"{uri!r}: its manifest declares pixel range {declared!r}, but the {family} "
                f"family (and so this stage) feeds {pixel_range!r}; re-convert with the range "
                "the weights were trained on, or use weights trained on the family's range")
    if config is None:  # the config is known only with the data (train): checked when loaded
        return None
    from vgen_core import families

    fields = {k: v for k, v in payload.items() if k not in _RESERVED_KEYS}
    try:  # validated as load_pretrained does (fields added later take their defaults)
        have = families.get(family).config_class.model_validate(fields).model_dump(mode="json")
    except ValueError as e:
        return f"{uri!r}: its config.json does not validate as a {family} config ({e})"
    need = config.model_dump(mode="json")
    diff = sorted(k for k in {*have, *need} if have.get(k) != need.get(k))
    if diff:
        return (f"{uri!r} is a {family} model of another size / config ("
                + ", ".join(f"{k}: file {have.get(k)!r}, stage {need.get(k)!r}"
                            for k in diff[:5])
                + "); set with.size / with.overrides to the export's")
    return None


def load_weights(path: str | Path, family: str, config: Any, *, pixel_range: str | None,
                 what: str) -> Any:
    """The model a stage's ``weights:`` names, in eval mode on CPU: a vgen export (converted or
    trained; its family and config must be the stage's, and the pixel range its manifest
    declares must be ``pixel_range``, the one the stage feeds) or a released checkpoint (loaded
    through the same mapping as ``vgen weights convert``). :class:`WeightsError` saying why."""
    from vgen_core import families
    from vgen_core.tokenizers.io import load_pretrained

    spec = families.get(family)
    p = Path(path)
    if is_export(p):
        folder = p if p.is_dir() else p.parent
        manifest = read_manifest(folder)
        declared = (manifest or {}).get("pixel_range") or spec.pixel_range
        if pixel_range is not None and declared != pixel_range:
            raise WeightsError(
                f"{what}: {folder}'s manifest declares pixel range {declared!r}, but this stage "
                f"feeds the {spec.name} family's {pixel_range!r}; re-convert with the range the "
                "weights were trained on, or use weights trained on the family's range")
        try:
            model = load_pretrained(folder)
        except (ValueError, FileNotFoundError) as e:
            raise WeightsError(f"{what}: {e}") from e
        if getattr(model, "family", None) != spec.name:
            raise WeightsError(f"{what}: {folder} holds a {getattr(model, 'family', None)!r} "
                               "model; this stage "
                               f"uses {spec.name!r}")
        have = cast(Any, model).config.model_dump(mode="json")
        need = config.model_dump(mode="json")
        if have != need:
            diff = sorted(k for k in {*have, *need} if have.get(k) != need.get(k))
            raise WeightsError(
                f"{what}: {folder} is a {spec.name} model of another size / config (differs in "
                + ", ".join(f"{k}: file {have.get(k)!r}, stage {need.get(k)!r}" for k in diff[:5])
                + "); set the stage's size / overrides to the export's")
        return model.eval()
    state, _ = read_weights(p)
    model, _ = fit(spec, config, state, what=what)
    return model


# -- entry point -------------------------------------------------------------------------------

def named_size(spec: Any, config: Mapping[str, Any]) -> str | None:
    """The registered size of ``spec`` whose config equals ``config`` (a validated config's
    JSON dump); None when it is none of them."""
    return next((s for s in spec.sizes if spec.config(s).model_dump(mode="json") == config), None)


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
    size = named_size(spec, config) or "custom"
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
        manifest = read_manifest(p.parent)
        if manifest is not None:  # a converted release: its declared range and source
            report["pixel_range"] = manifest.get("pixel_range") or report["pixel_range"]
            report["size"] = manifest.get("size", report["size"])
            report["source"] = manifest.get("source")
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
        if r.get("source"):
            src = r["source"]
            lines.append(f"  converted    from {src.get('path')} ({src.get('format')}, sha256 "
                         f"{str(src.get('sha256'))[:16]}...)")
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
