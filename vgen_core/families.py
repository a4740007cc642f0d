"""Model families: one :class:`FamilySpec` per family, declared at the end of its model module.

A family (TiTok, LFQ, MaskGIT, RAR, DeepFlow, ...) is everything the pipeline needs to know about
a model without branching on its name: its role, config class and size table, model class, the
data it trains on, its loss, its sampler, its pixel range and encode / decode functions, and its
released-weights loader. The train, tokenize, cache and evaluate stages, the benchmarks and
``vgen families`` look families up here (:func:`get`, :func:`all_specs`).

Adding a family is one module ending with ``SPEC = FamilySpec(...)`` (or ``SPECS = (...)`` for a
module holding several) under ``vgen_core/tokenizers`` or ``vgen_core/generators``: the registry
imports those packages' modules on first use and collects their specs.

Data kinds (``data`` of a trainable family, ``produces`` of a tokenizer):

=============  ===========================================================================
images         ``image`` uint8 (B, H, W, 3), ``label`` int64 (B,) (curated image tables)
bit_tokens     ``tokens`` int64 (B, L) indices of K-bit tokens, ``label`` (B,)
id_tokens      ``tokens`` int64 (B, L), ``label`` (B,), ``text_ids`` int64 (B, 77) if captions
latents        ``moments`` float32 (B, 2C, ...) = mean || logvar, ``label`` (B,); sampled and
               scaled by the model's loss (one cache serves every noise draw)
delta_tokens   ``delta`` float32 (B, T, D), ``timestamps`` float32 (B, T)
=============  ===========================================================================

Pixel ranges: ``signed`` is [-1, 1], ``unit`` is [0, 1]; :func:`to_model_pixels` and
:func:`from_model_pixels` are the one place uint8 images are converted.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = [
    "FamilySpec", "PIXEL_RANGES", "all_specs", "get", "find", "names", "sized_config",
    "to_model_pixels", "from_model_pixels", "pixel_range_of", "default_for", "ACCEPTS",
]

PIXEL_RANGES = ("signed", "unit")
Role = Literal["tokenizer", "generator", "component"]

#: side-table kinds a family's ``data`` accepts (bit-token indices are ids of 2**K codes)
ACCEPTS: dict[str, tuple[str, ...]] = {
    "images": ("images",), "id_tokens": ("id_tokens", "bit_tokens"),
    "bit_tokens": ("bit_tokens",), "latents": ("latents",), "delta_tokens": ("delta_tokens",),
}


def sized_config(title: str, config_class: type[BaseModel],
                 sizes: Mapping[str, Any]) -> Callable[..., Any]:
    """``config(size, **overrides)`` for a family's size table: the registered size's fields
    with ``overrides`` applied, validated by ``config_class``; an unknown size names the known."""

    def config(size: str, **overrides: Any) -> Any:
        if size not in sizes:
            raise ValueError(f"{title} size '{size}' not found; known: {', '.join(sizes)}.")
        return config_class.model_validate({**sizes[size].model_dump(), **overrides})

    config.__doc__ = (f"{title} config for a registered size (``{'``, ``'.join(sizes)}``), with "
                      "field overrides.")
    return config


def pixel_range_of(spec: FamilySpec) -> str:
    """The pixel range ``spec``'s models take and return: the family's, set per release in its
    SPEC (e.g. MaskBit LFQ / TiTok ``unit`` [0, 1], KL-VAE ``signed`` [-1, 1]). Every stage
    (tokenize, cache, train, evaluate) reads it here; there is no per-stage default."""
    rng = spec.pixel_range
    if rng is None or rng not in PIXEL_RANGES:
        raise ValueError(f"model family '{spec.name}' declares no pixel range "
                         f"(got {rng!r}; use one of {PIXEL_RANGES})")
    return rng


def to_model_pixels(images_BHWC: Any, pixel_range: str) -> Any:
    """uint8 (B, H, W, C) tensor -> float (B, C, H, W) in ``pixel_range`` (signed / unit)."""
    x = images_BHWC.permute(0, 3, 1, 2).float()
    if pixel_range == "unit":
        return x.div(255.0).contiguous()
    if pixel_range == "signed":
        return x.div(127.5).sub(1.0).contiguous()
    raise ValueError(f"pixel range {pixel_range!r} not known; use one of {PIXEL_RANGES}")


def from_model_pixels(x_BCHW: Any, pixel_range: str) -> Any:
    """float (B, C, H, W) in ``pixel_range`` -> uint8 (B, H, W, C) tensor (clamped, rounded)."""
    if pixel_range == "signed":
        x = x_BCHW.float().clamp(-1, 1).add(1).mul(127.5)
    elif pixel_range == "unit":
        x = x_BCHW.float().clamp(0, 1).mul(255)
    else:
        raise ValueError(f"pixel range {pixel_range!r} not known; use one of {PIXEL_RANGES}")
    return x.round().byte().permute(0, 2, 3, 1)


@dataclass(frozen=True)
class FamilySpec:
    """What a model family is (see the module docstring). Callables take the model first.

    Tokenizers: ``encode(model, x_BCHW) -> dict[str, Tensor]`` (x in ``pixel_range``; keys per
    ``produces``: bit_tokens -> ``bits`` (B, h, w, K) + ``indices`` (B, h, w); id_tokens ->
    ``indices`` (B, L); latents -> ``moments`` (B, 2C, ...)), ``decode(model, out, grid_hw) ->
    x_BCHW`` in ``pixel_range`` (``out``: generated tokens (B, L) or latents). Generators:
    ``sampler(model, cond, *, generator, **options) -> out`` with ``cond`` labels (B,) or text
    ids (B, 77) per ``conditioning``; ``output`` says what ``out`` is.
    """

    name: str
    role: Role
    config_class: type[BaseModel]
    sizes: Mapping[str, Any]
    model_class: type
    #: trainable: the data kind the loss eats (None: not trainable here)
    data: str | None = None
    #: data facts (side table / curated table) copied into the model config when it has the field
    data_fields: tuple[str, ...] = ()
    #: ``loss(model, batch, step, **options) -> (loss, metrics)``
    loss: Callable[..., Any] | None = None
    #: generators: "labels" | "text" (what the sampler is conditioned on)
    conditioning: str | None = None
    sampler: Callable[..., Any] | None = None
    #: generators: "tokens" | "latents" | "delta_tokens" (what the sampler returns)
    output: str | None = None
    #: tokenizers: the side-table kinds ``encode`` can fill (``produces_for(config)`` picks one
    #: per config when there are several, e.g. TiTok VQ ids vs KL latents)
    produces: tuple[str, ...] = ()
    produces_for: Callable[[Any], str] | None = None
    #: tokenizers: fully convolutional, encodes any multiple of its downsampling factor (else
    #: the config's ``image_size`` is the one resolution it takes)
    resolution_free: bool = False
    #: tokenizers: the pixel range the release trains/evaluates on ("signed" [-1, 1] /
    #: "unit" [0, 1]); the one source every stage reads (:func:`pixel_range_of`)
    pixel_range: str | None = None
    encode: Callable[..., Any] | None = None
    decode: Callable[..., Any] | None = None
    #: ``(path, config) -> model`` for a released checkpoint (documented key names)
    load_official: Callable[..., Any] | None = None
    #: other names the DAG's ``model:`` may use
    aliases: tuple[str, ...] = ()
    #: stage kinds whose default family this is (``model:`` unset)
    default_for: tuple[str, ...] = ()
    #: ``tokens_per_sample(data_facts) -> int`` for throughput metrics (default: ``seq_len``)
    tokens_per_sample: Callable[[dict], int] | None = None
    #: training batch needs captions as byte ids (``text_ids``)
    needs_text: bool = False
    #: released inference settings per size (the sampler's keyword arguments)
    sampling: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: short description for ``vgen families``
    summary: str = ""
    #: ``param_groups(model, weight_decay) -> [{"params", "weight_decay"}, ...]``: the optimizer
    #: groups training uses (e.g. DiMR's TD-LN parameters without decay); None: one group
    param_groups: Callable[..., Any] | None = None
    #: ``check(model, where) -> None``: raises ValueError when a built model cannot serve its
    #: role here (e.g. a TiTok in VAE mode asked for VQ ids)
    check: Callable[..., None] | None = None

    def __post_init__(self) -> None:
        # the pixel range is the family's, per release: a tokenizer must declare one
        if self.role == "tokenizer" or self.pixel_range is not None:
            pixel_range_of(self)

    # -- configs and models ---------------------------------------------------------------
    @property
    def family(self) -> str:  # the name a checkpoint's config.json records
        return self.name

    @property
    def kind(self) -> str:  # legacy name of role for trainable families
        return self.role

    def config(self, size: str, **overrides: Any) -> Any:
        return sized_config(self.name, self.config_class, self.sizes)(size, **overrides)

    def model_config(self, size: str, overrides: Mapping[str, Any] | None = None,
                     data: Mapping[str, Any] | None = None) -> Any:
        """The size's config with the data's facts (``data_fields`` the config has) and then
        ``overrides`` applied."""
        base = self.config(size)
        facts = {k: data[k] for k in self.data_fields
                 if data and k in data and k in type(base).model_fields}
        return self.config(size, **{**facts, **(overrides or {})})

    def build(self, size: str, overrides: Mapping[str, Any] | None = None,
              data: Mapping[str, Any] | None = None) -> Any:
        return self.model_class(self.model_config(size, overrides, data))

    def config_json(self, size: str, overrides: Mapping[str, Any] | None = None) -> dict:
        """The resolved config as JSON (for fingerprints: a registry default change retrains)."""
        return self.model_config(size, overrides).model_dump(mode="json")

    def build_config(self, config: Any) -> Any:
        return self.model_class(config)

    # -- what it can do -------------------------------------------------------------------
    def hook(self, name: str) -> Callable[..., Any]:
        """The function ``name`` (``loss``, ``sampler``, ``encode``, ``decode``,
        ``load_official``); ValueError when this family has none (``capabilities`` says which
        it has)."""
        fn = getattr(self, name, None)
        if fn is None:
            raise ValueError(f"model family {self.name!r} has no {name} (it can: "
                             f"{', '.join(self.capabilities) or 'nothing here'})")
        return fn

    @property
    def capabilities(self) -> list[str]:
        caps = []
        if self.loss is not None and self.data is not None:
            caps.append("train")
        if self.encode is not None and self.produces:
            if set(self.produces) - {"latents"}:
                caps.append("tokenize")
            if "latents" in self.produces:
                caps.append("cache")
            caps.append("encode")
        if self.decode is not None:
            caps.append("decode")
        if self.sampler is not None:
            caps.append("sample")
        if self.role == "tokenizer" and self.encode is not None and self.decode is not None:
            caps.append("evaluate")
        if self.role == "generator" and self.sampler is not None:
            caps.append("evaluate")
        if self.load_official is not None:
            caps.append("load_released")
        return caps

    def produces_kind(self, config: Any) -> str:
        """The side-table kind this family's ``encode`` fills for ``config``."""
        if self.produces_for is not None:
            return self.produces_for(config)
        if not self.produces:
            raise ValueError(f"model family '{self.name}' encodes nothing into a side table")
        return self.produces[0]

    def native_resolution(self, config: Any) -> int | None:
        """The one image size a tokenizer takes (None: any, see ``resolution_free``)."""
        return None if self.resolution_free else getattr(config, "image_size", None)

    def example_batch(self, config: Any, batch_size: int = 2, *, generator: Any = None,
                      window: int = 4) -> dict[str, Any]:
        """A random training batch of this family's data kind, shaped by ``config`` (tests,
        benchmarks): what the train stage would feed its ``loss``."""
        import torch

        from vgen_core.generators.text import encode_text

        n, g = batch_size, generator
        classes = max(int(getattr(config, "num_classes", 1) or 1), 1)
        out: dict[str, Any] = {"label": torch.randint(0, classes, (n,), generator=g)}
        if self.data == "images":
            r = self.native_resolution(config) or 32
            out["image"] = torch.randint(0, 256, (n, r, r, 3), generator=g, dtype=torch.uint8)
        elif self.data in ("id_tokens", "bit_tokens"):
            size = (config.codebook_size if hasattr(config, "codebook_size")
                    else 1 << config.token_bits)
            out["tokens"] = torch.randint(0, size, (n, config.seq_len), generator=g)
        elif self.data == "latents":
            if hasattr(config, "num_tokens"):  # 1D tokens: (B, 2C, 1, N)
                shape: tuple[int, ...] = (2 * config.token_dim, 1, config.num_tokens)
            else:
                side = getattr(config, "input_size", None) or config.latent_size
                shape = (2 * config.in_channels, side, side)
            out["moments"] = torch.randn(n, *shape, generator=g)
        elif self.data == "delta_tokens":
            out["delta"] = torch.randn(n, window, config.token_dim, generator=g)
            out["timestamps"] = torch.arange(1, window + 1, dtype=torch.float32).repeat(n, 1)
        else:
            raise ValueError(f"model family '{self.name}' trains on nothing here")
        if self.needs_text:
            words = ["a red square on grass", "two cats on a mat", "a city at night"]
            out["text_ids"] = encode_text([words[i % len(words)] for i in range(n)])
        return out

    def accepts(self, data_kind: str) -> bool:
        """Whether this family trains on a side table of ``data_kind``."""
        return self.data is not None and data_kind in ACCEPTS.get(self.data, (self.data,))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "sizes": list(self.sizes),
                "capabilities": self.capabilities, "aliases": list(self.aliases),
                "data": self.data, "produces": list(self.produces),
                "conditioning": self.conditioning,
                "output": self.output, "pixel_range": self.pixel_range, "summary": self.summary}


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

#: packages whose modules declare ``SPEC`` / ``SPECS``
PACKAGES = ("vgen_core.tokenizers", "vgen_core.generators")

_REGISTRY: dict[str, FamilySpec] = {}
_ALIASES: dict[str, str] = {}
_LOCK = threading.Lock()
_LOADED = False


def _collect(module: Any) -> list[FamilySpec]:
    specs = list(getattr(module, "SPECS", ()))
    if getattr(module, "SPEC", None) is not None:
        specs.append(module.SPEC)
    return specs


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if _LOADED:
            return
        for pkg_name in PACKAGES:
            pkg = importlib.import_module(pkg_name)
            for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
                if info.name.startswith("_"):
                    continue
                module = importlib.import_module(f"{pkg_name}.{info.name}")
                for spec in _collect(module):
                    _add(spec)
        _LOADED = True


def _add(spec: FamilySpec) -> None:
    have = _REGISTRY.get(spec.name)
    if have is not None and have is not spec:
        raise ValueError(f"model family '{spec.name}' is declared twice "
                         f"({have.model_class.__module__} and {spec.model_class.__module__})")
    _REGISTRY[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name


def register(spec: FamilySpec) -> FamilySpec:
    """Add a family declared outside the built-in packages (plugins, tests)."""
    _load()
    _add(spec)
    return spec


def all_specs(role: str | None = None) -> list[FamilySpec]:
    """Every registered family (of ``role`` when given), sorted by name."""
    _load()
    return [s for _, s in sorted(_REGISTRY.items()) if role is None or s.role == role]


def names(role: str | None = None) -> list[str]:
    return [s.name for s in all_specs(role)]


def find(name: str) -> FamilySpec | None:
    """The family called ``name`` (or one of its aliases); None when there is none."""
    _load()
    return _REGISTRY.get(_ALIASES.get(name, name))


def get(name: str, *, role: str | None = None, can: str | None = None) -> FamilySpec:
    """The family called ``name``; ValueError naming the known ones when it is not registered,
    has another ``role``, or lacks the capability ``can`` (train / encode / decode / sample)."""
    spec = find(name)
    if spec is None:
        known = names(role)
        raise ValueError(f"model family {name!r} not found; known: {', '.join(known)}")
    if role is not None and spec.role != role:
        raise ValueError(f"model family {name!r} is a {spec.role}, not a {role}; {role}s: "
                         f"{', '.join(names(role))}")
    if can is not None and can not in spec.capabilities:
        able = [s.name for s in all_specs(role) if can in s.capabilities]
        raise ValueError(f"model family {name!r} cannot {can} here; families that can: "
                         f"{', '.join(able)}")
    return spec


def default_for(stage_kind: str) -> str:
    """The family a stage kind uses when the DAG names none."""
    hits = [s.name for s in all_specs() if stage_kind in s.default_for]
    if len(hits) != 1:
        raise ValueError(f"stage kind {stage_kind!r} has {len(hits)} default families "
                         f"({hits}); exactly one spec must list it in default_for")
    return hits[0]
