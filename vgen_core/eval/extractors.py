"""Feature extractors for generation metrics (FID, sFID, IS, precision/recall), methods.md §4.

Every extractor has a ``name`` and every result carries it (``Features.extractor``,
``FeatureStats.extractor``). Numbers computed with different extractors -- different network,
weights or preprocessing -- are not comparable; ``check_comparable`` raises naming both.

- ``InceptionV3FID``: the FID InceptionV3 (TF ``inception-2015-12-05`` graph, ported to torch by
  pytorch-fid), built here without torchvision and loaded from a LOCAL weights file. Outputs the
  2048-d pool3 features (FID, precision/recall), 1008-class logits for IS, and the sFID spatial
  features (TF ``mixed_6/conv``, first 7 channels, 17x17x7 = 2023-d).
- ``TinyConvExtractor``: a small fixed-seed random conv net for tests and demos.

Shape legend: B batch, C=3 channels, H/W image size, D pool-feature dims, K logit classes,
S flattened spatial-feature dims.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_URL",
    "FeatureExtractor",
    "Features",
    "InceptionV3FID",
    "TinyConvExtractor",
    "check_comparable",
    "load_inception_state_dict",
]

# pytorch-fid's port of the TF graph's weights (same file as torch-fidelity's
# weights-inception-2015-12-05-6726825d.pth). Never downloaded here: fetch it once where there is
# network access and pass the local path.
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)
_INCEPTION_SIZE = 299
_SPATIAL_CHANNELS = 7  # ADM evaluator: spatial = mixed_6/conv[..., :7]


@dataclass(frozen=True)
class Features:
    """One batch of features; ``extractor`` names the network that made them."""

    extractor: str
    pool_BD: Tensor
    logits_BK: Tensor | None = None
    spatial_BS: Tensor | None = None


@runtime_checkable
class FeatureExtractor(Protocol):
    """What metrics need from a network. ``images_BCHW``: uint8 in [0, 255] or float in [0, 1]."""

    name: str
    dims: int

    def __call__(self, images_BCHW: Tensor) -> Features: ...


def _name_of(x: Any) -> tuple[str, str | None]:
    if isinstance(x, str):
        return x, None
    if hasattr(x, "extractor"):
        return str(x.extractor), getattr(x, "feature", None)
    if hasattr(x, "name"):
        return str(x.name), None
    raise TypeError(f"check_comparable: cannot tell which extractor made {type(x).__name__}.")


def check_comparable(a: Any, b: Any, what: str = "metric") -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` come from the same extractor (and feature kind).

    ``a``/``b`` may be extractor names, extractors, ``Features`` or ``FeatureStats``.
    """
    name_a, feat_a = _name_of(a)
    name_b, feat_b = _name_of(b)
    if name_a != name_b:
        raise ValueError(
            f"{what}: results from different feature extractors are not comparable: "
            f"{name_a!r} vs {name_b!r}. Recompute both sides with the same extractor "
            f"(same network, weights and preprocessing)."
        )
    if feat_a is not None and feat_b is not None and feat_a != feat_b:
        raise ValueError(
            f"{what}: cannot compare {feat_a!r} features with {feat_b!r} features "
            f"(extractor {name_a!r}); use pool stats for FID and spatial stats for sFID."
        )


def _as_float_images(images_BCHW: Tensor, who: str, scale: float) -> Tensor:
    """uint8 [0, 255] or float [0, 1] -> float32 in [0, scale]."""
    if not isinstance(images_BCHW, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor (B, 3, H, W), got {type(images_BCHW)}.")
    if images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
        raise ValueError(f"{who}: expected images (B, 3, H, W), got {tuple(images_BCHW.shape)}.")
    if images_BCHW.dtype == torch.uint8:
        x = images_BCHW.float()
        return x if scale == 255.0 else x * (scale / 255.0)
    if not images_BCHW.is_floating_point():
        raise TypeError(f"{who}: images must be uint8 or float, got {images_BCHW.dtype}.")
    lo, hi = images_BCHW.min().item(), images_BCHW.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"{who}: float images must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]; "
            f"map [-1, 1] images with (x + 1) / 2, or pass uint8."
        )
    x = images_BCHW.float().clamp(0.0, 1.0)
    return x if scale == 1.0 else x * scale


def _resize_bilinear_tf1(x_BCHW: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres), as in the TF graph
    the ADM evaluator runs: src = dst * in/out, neighbours floor(src) and min(floor+1, in-1)."""

    def axis(x: Tensor, dim: int, n_out: int) -> Tensor:
        n_in = x.shape[dim]
        if n_in == n_out:
            return x
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        i0 = src.floor().long()
        i1 = (i0 + 1).clamp(max=n_in - 1)
        shape = [1] * x.ndim
        shape[dim] = n_out
        w = (src - i0).to(x.dtype).to(x.device).view(shape)
        a = x.index_select(dim, i0.to(x.device))
        b = x.index_select(dim, i1.to(x.device))
        return a + (b - a) * w

    return axis(axis(x_BCHW, 2, size_hw[0]), 3, size_hw[1])


# --- the FID InceptionV3 (module names = torchvision / pytorch-fid state-dict keys) -------------


class _BasicConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, **kw: Any):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **kw)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    # TF's average pool ignores the zero padding (pytorch-fid's FID patch).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = _BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = _BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class _InceptionB(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = _BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = _BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), b7, bd, bp], 1)


class _InceptionD(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = _BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionE(nn.Module):
    def __init__(self, c_in: int, pool: Literal["avg", "max"]):
        super().__init__()
        self.pool = pool  # FID graph: Mixed_7b averages, Mixed_7c max-pools (pytorch-fid E_1/E_2)
        self.branch1x1 = _BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = _BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "avg":
            bp = _avg_pool_tf(x)
        else:
            bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(bp)], 1)


class _FIDInceptionV3(nn.Module):
    """pytorch-fid's ``fid_inception_v3()`` layout; forward takes normalised 299x299 input."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, c7=128)
        self.Mixed_6c = _InceptionC(768, c7=160)
        self.Mixed_6d = _InceptionC(768, c7=160)
        self.Mixed_6e = _InceptionC(768, c7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, pool="avg")
        self.Mixed_7c = _InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-> (pool3 (B, 2048), mixed_6/conv (B, 192, 17, 17) for 299x299 input)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        block: nn.Module
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c):
            x = block(x)
        # TF "mixed_6/conv" = ReLU(BN(conv)) of Mixed_6d's 1x1 branch (recomputed inside; cheap).
        spatial = self.Mixed_6d.branch1x1(x)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1), spatial


_HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


def load_inception_state_dict(path: str | Path, verify_hash: bool = True) -> dict[str, Tensor]:
    """Read FID InceptionV3 weights from a local ``.pth`` or ``.safetensors`` file.

    ``.pth`` files are pickles; they are read with ``torch.load(weights_only=True)``, whose
    restricted unpickler only rebuilds tensors and plain containers and never runs code from the
    file. ``.safetensors`` holds raw tensors only. If the file name ends in a torch-hub hash
    suffix (``...-6726825d.pth``) and ``verify_hash``, the file's SHA-256 must start with it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"InceptionV3 weights not found at {path}. Download {FID_WEIGHTS_URL} where there is "
            f"network access and pass the local path (nothing is downloaded here)."
        )
    m = _HASH_SUFFIX.search(path.name)
    if verify_hash and m:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if not h.hexdigest().startswith(m.group(1)):
            raise ValueError(
                f"{path}: SHA-256 {h.hexdigest()[:16]}... does not match the name's hash suffix "
                f"{m.group(1)!r}; the file is corrupt or not the one its name claims "
                f"(pass verify_hash=False to skip)."
            )
    state: Any  # checked below: torch.load may return anything
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors.")
    return state


def _load_checked(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    def skip(k: str) -> bool:
        return k.endswith("num_batches_tracked")

    want = {k: v.shape for k, v in module.state_dict().items() if not skip(k)}
    have = {k: v.shape for k, v in state.items() if not skip(k)}
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    bad_shape = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if missing or unexpected or bad_shape:
        hint = ""
        if any(k.startswith("AuxLogits") for k in unexpected) or "fc.weight" in bad_shape:
            hint = (" These look like torchvision's ImageNet InceptionV3 (1000 classes), not the "
                    f"FID weights ({FID_WEIGHTS_FILENAME}).")
        raise ValueError(
            f"{source}: not an FID InceptionV3 state dict: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
            f"wrong shape {[(k, tuple(have[k]), tuple(want[k])) for k in bad_shape[:5]]}.{hint}"
        )
    module.load_state_dict({k: v for k, v in state.items() if not skip(k)}, strict=False)


class InceptionV3FID:
    """The standard FID InceptionV3 from a local weights file (see ``load_inception_state_dict``).

    ``preprocess`` (part of ``name``; stats made with one are not comparable with the other):
    - ``"pytorch-fid"`` (name ``inception-v3-fid-pt``): images to [0, 1], torch bilinear resize
      to 299 (align_corners=False, no antialias), then 2x - 1 -- exactly pytorch-fid.
    - ``"tf1"`` (name ``inception-v3-fid-tf1``): the TF graph's own preprocessing that the ADM
      evaluator and torch-fidelity reproduce: [0, 255] pixels, TF1 bilinear resize to 299, then
      (x - 128) / 128. Closest twin of ADM's ``VIRTUAL_*.npz`` reference statistics.

    Call with ``images_BCHW`` (uint8 [0, 255] or float [0, 1], any H/W) -> ``Features`` with
    ``pool_BD`` (B, 2048) pool3, ``logits_BK`` (B, 1008) = pool3 @ fc.weight.T without bias
    (ADM's softmax graph, torch-fidelity's ``logits_unbiased``; use for IS), and ``spatial_BS``
    (B, 2023) = mixed_6/conv[:, :7] flattened in TF's (H, W, C) order (ADM's sFID features).
    """

    dims = 2048
    num_classes = 1008
    spatial_dims = 17 * 17 * _SPATIAL_CHANNELS

    def __init__(
        self,
        weights_path: str | Path,
        *,
        preprocess: Literal["pytorch-fid", "tf1"] = "pytorch-fid",
        device: str | torch.device = "cpu",
        verify_hash: bool = True,
    ):
        if preprocess not in ("pytorch-fid", "tf1"):
            raise ValueError(f"InceptionV3FID: preprocess must be 'pytorch-fid' or 'tf1', got "
                             f"{preprocess!r}.")
        self.preprocess = preprocess
        self.name = "inception-v3-fid-pt" if preprocess == "pytorch-fid" else "inception-v3-fid-tf1"
        self.device = torch.device(device)
        self.module = _FIDInceptionV3()
        _load_checked(self.module, load_inception_state_dict(weights_path, verify_hash),
                      str(weights_path))
        self.module.eval().requires_grad_(False).to(self.device)

    def __call__(self, images_BCHW: Tensor) -> Features:
        size = (_INCEPTION_SIZE, _INCEPTION_SIZE)
        with torch.inference_mode():
            if self.preprocess == "pytorch-fid":
                x = _as_float_images(images_BCHW, self.name, 1.0).to(self.device)
                x = 2 * F.interpolate(x, size=size, mode="bilinear", align_corners=False) - 1
            else:
                x = _as_float_images(images_BCHW, self.name, 255.0).to(self.device)
                x = (_resize_bilinear_tf1(x, size) - 128) / 128
            pool_BD, spatial = self.module(x)
            logits_BK = pool_BD @ self.module.fc.weight.T
            spatial_BS = spatial[:, :_SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        return Features(self.name, pool_BD, logits_BK, spatial_BS)


class TinyConvExtractor:
    """Fixed-seed random conv net for tests and demos (NOT a metric network; never compare its
    numbers with Inception ones). Images -> [0, 1] -> bilinear 32x32 -> 2x - 1 -> three stride-2
    3x3 convs (16, 32, 64 ch, ReLU) -> mean pool (D=64); logits (K=10) from a fixed linear head;
    spatial (S=256) = second conv's first 4 channels, 8x8, flattened (H, W, C).

    Bump the ``-v1`` in ``name`` whenever the architecture or initialisation changes.
    """

    dims = 64
    num_classes = 10
    spatial_dims = 8 * 8 * 4

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu"):
        self.name = f"tiny-conv-seed{seed}-v1"
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        shapes = [(16, 3), (32, 16), (64, 32)]
        self._convs = [
            (torch.randn(co, ci, 3, 3, generator=g) * (2.0 / (ci * 9)) ** 0.5).to(self.device)
            for co, ci in shapes
        ]
        self._head = (torch.randn(10, 64, generator=g) / 8.0).to(self.device)

    def __call__(self, images_BCHW: Tensor) -> Features:
        with torch.inference_mode():
            x = _as_float_images(images_BCHW, self.name, 1.0).to(self.device)
            x = 2 * F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) - 1
            feats = []
            for w in self._convs:
                x = F.relu(F.conv2d(x, w, stride=2, padding=1))
                feats.append(x)
            pool_BD = x.mean(dim=(2, 3))
            spatial_BS = feats[1][:, :4].permute(0, 2, 3, 1).flatten(1)
            return Features(self.name, pool_BD, pool_BD @ self._head.T, spatial_BS)
