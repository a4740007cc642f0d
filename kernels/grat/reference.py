"""GRAT reference: the specification every other backend is tested against.

Shape legend: B batch, Hh heads, D head dim, N = T*H*W image tokens, n_text text tokens appended
after the image, L = N + n_text, G = gt*gh*gw tokens per group, (nT, nH, nW) = the group grid.

Token orders: *raster* is the model's order, image tokens (t, h, w) row-major then text. *grouped*
is GRAT's: image tokens permuted so each (gt, gh, gw) group is contiguous, groups themselves in
(t, h, w) row-major order over the group grid, then text (unmoved). This is the official
``clusterify`` (OliverRensu/GRAT, cross_processor.py): ``(t_, p_t, h_, p_h, w_, p_w) -> (t_, h_,
w_, p_t, p_h, p_w)``.

Mask, in grouped order (official ``init_local_mask_flex``; ``n_text_valid`` is its
``attenable_text``, the non-pad prefix of the text tokens):

- image query in group (a, b, c) -> image keys in groups (a', b', c') with a' = a or b' = b or
  c' = c ("criss_cross", GRAT-X), or with |a'-a| <= rt and |b'-b| <= rh and |c'-c| <= rw
  ("block", GRAT-B, surrounding blocks; not in the official code, see README). In criss_cross,
  an axis along which the group grid holds a single group takes no part (its "plane" would be
  the whole grid): T = 1 gives the 2D image criss-cross, same group row or same group column;
  with a single group in all, that group attends itself;
- image query -> valid text keys;
- text query (valid or pad) -> every image key and every valid text key;
- nobody attends pad text keys.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "VARIANTS",
    "GratSpec",
    "make_spec",
    "group_permutation",
    "to_grouped",
    "from_grouped",
    "grat_mask",
    "grat_density",
    "grat_attention_reference",
]

VARIANTS = ("criss_cross", "block")


@dataclass(frozen=True)
class GratSpec:
    """Validated GRAT geometry (hashable: used as a cache key by the block-sparse backends)."""

    grid: tuple[int, int, int]
    groups: tuple[int, int, int]
    variant: str
    n_text: int
    n_text_valid: int
    radius: tuple[int, int, int]

    @property
    def n_image(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def seq_len(self) -> int:
        return self.n_image + self.n_text

    @property
    def n_kv_valid(self) -> int:
        """Keys with index below this are attendable by someone (image + valid text)."""
        return self.n_image + self.n_text_valid

    @property
    def group_size(self) -> int:
        gt, gh, gw = self.groups
        return gt * gh * gw

    @property
    def group_grid(self) -> tuple[int, int, int]:
        return tuple(n // g for n, g in zip(self.grid, self.groups))  # type: ignore[return-value]

    @property
    def n_groups(self) -> int:
        nt, nh, nw = self.group_grid
        return nt * nh * nw

    @property
    def variant_id(self) -> int:
        return VARIANTS.index(self.variant)

    @property
    def cross_axes(self) -> tuple[bool, bool, bool]:
        """Axes (t, h, w) whose shared-coordinate plane counts in criss_cross: those with more
        than one group (all three when every axis has one group)."""
        axes = tuple(n > 1 for n in self.group_grid)
        return axes if any(axes) else (True, True, True)  # type: ignore[return-value]


def _triple(x: int | tuple[int, ...] | list[int], name: str) -> tuple[int, int, int]:
    if isinstance(x, int):
        return (x, x, x)
    t = tuple(int(v) for v in x)
    if len(t) != 3:
        raise ValueError(f"{name}={x!r} must be an int or three ints (t, h, w)")
    return t


def make_spec(
    grid: tuple[int, int, int],
    groups: tuple[int, int, int],
    variant: str = "criss_cross",
    n_text: int = 0,
    n_text_valid: int | None = None,
    radius: int | tuple[int, int, int] = 1,
) -> GratSpec:
    """Check the arguments every backend shares and bundle them; errors say how to fix them."""
    grid, groups = _triple(grid, "grid"), _triple(groups, "groups")
    radius = _triple(radius, "radius")
    if any(n < 1 for n in grid):
        raise ValueError(f"grid={grid} must be positive (T, H, W)")
    for axis, n, g in zip("THW", grid, groups):
        if g < 1 or n % g:
            raise ValueError(
                f"group size {g} along {axis} does not divide the grid size {n}; GRAT groups must "
                f"tile the grid exactly: pick a divisor of {n} (grid={grid}, groups={groups})"
            )
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not a GRAT variant; known: {', '.join(VARIANTS)}")
    if n_text < 0:
        raise ValueError(f"n_text={n_text} must be >= 0")
    n_text_valid = n_text if n_text_valid is None else int(n_text_valid)
    if not 0 <= n_text_valid <= n_text:
        raise ValueError(f"n_text_valid={n_text_valid} must lie in [0, n_text={n_text}]")
    if any(r < 0 for r in radius):
        raise ValueError(f"radius={radius} must be >= 0 (groups, per axis)")
    return GratSpec(grid, groups, variant, int(n_text), n_text_valid, radius)


def group_permutation(
    T: int, H: int, W: int, gt: int, gh: int, gw: int
) -> tuple[Tensor, Tensor]:
    """(perm, inv), int64 (N,): ``x_grouped = x_raster[perm]`` and ``x_raster = x_grouped[inv]``."""
    make_spec((T, H, W), (gt, gh, gw))
    perm, inv = _permutation((T, H, W), (gt, gh, gw), "cpu")
    return perm.clone(), inv.clone()


@lru_cache(maxsize=64)
def _permutation(
    grid: tuple[int, ...], groups: tuple[int, ...], device: str
) -> tuple[Tensor, Tensor]:
    (T, H, W), (gt, gh, gw) = grid, groups
    perm = (
        torch.arange(T * H * W)
        .reshape(T // gt, gt, H // gh, gh, W // gw, gw)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(-1)
    )
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return perm.to(device), inv.to(device)


def _reorder(x: Tensor, spec: GratSpec, to_grouped: bool) -> Tensor:
    """Permute the image tokens on dim -2 of (..., L, D); the text tail stays where it is."""
    if x.shape[-2] != spec.seq_len:
        raise ValueError(
            f"tensor has {x.shape[-2]} tokens on dim -2 but grid {spec.grid} plus n_text="
            f"{spec.n_text} needs {spec.seq_len}; expected (B, heads, L, D)"
        )
    perm, inv = _permutation(spec.grid, spec.groups, str(x.device))
    idx = perm if to_grouped else inv
    image = x[..., : spec.n_image, :].index_select(-2, idx)
    if spec.n_text == 0:
        return image
    return torch.cat([image, x[..., spec.n_image :, :]], dim=-2)


def to_grouped(x: Tensor, spec: GratSpec) -> Tensor:
    """(..., L, D) raster order -> grouped order."""
    return _reorder(x, spec, True)


def from_grouped(x: Tensor, spec: GratSpec) -> Tensor:
    """(..., L, D) grouped order -> raster order."""
    return _reorder(x, spec, False)


def _group_coords(spec: GratSpec, device) -> tuple[Tensor, Tensor, Tensor]:
    """Group-grid coordinates (a, b, c) of each image token in grouped order, each (N,)."""
    _, nh, nw = spec.group_grid
    g = torch.arange(spec.n_image, device=device) // spec.group_size
    return g // (nh * nw), (g // nw) % nh, g % nw


def _spec_mask(spec: GratSpec, device=None) -> Tensor:
    n, nv = spec.n_image, spec.n_kv_valid
    a, b, c = _group_coords(spec, device)
    if spec.variant == "criss_cross":
        image = torch.zeros(n, n, dtype=torch.bool, device=device)
        for on, x in zip(spec.cross_axes, (a, b, c)):
            if on:
                image |= x[:, None] == x
    else:
        rt, rh, rw = spec.radius
        image = (
            ((a[:, None] - a).abs() <= rt)
            & ((b[:, None] - b).abs() <= rh)
            & ((c[:, None] - c).abs() <= rw)
        )
    mask = torch.zeros(spec.seq_len, spec.seq_len, dtype=torch.bool, device=device)
    mask[:n, :n] = image
    mask[:n, n:nv] = True  # image queries see the valid text
    mask[n:, :nv] = True  # text queries see the image and the valid text
    return mask


def grat_mask(
    T: int,
    H: int,
    W: int,
    gt: int,
    gh: int,
    gw: int,
    variant: str = "criss_cross",
    n_text: int = 0,
    *,
    n_text_valid: int | None = None,
    radius: int | tuple[int, int, int] = 1,
    device: torch.device | str | None = None,
) -> Tensor:
    """Dense (L, L) bool mask in grouped order, True where query row may attend key column."""
    spec = make_spec((T, H, W), (gt, gh, gw), variant, n_text, n_text_valid, radius)
    return _spec_mask(spec, device)


def _neighbours_per_axis(n: int, r: int) -> int:
    """Sum over c in [0, n) of |{c' in [0, n): |c - c'| <= r}| (window clipped at the edges)."""
    return sum(min(c + r, n - 1) - max(c - r, 0) + 1 for c in range(n))


def grat_density(spec: GratSpec) -> float:
    """Fraction of the L*L (query, key) pairs GRAT computes (1 - sparsity), in closed form."""
    nt, nh, nw = spec.group_grid
    g = spec.group_size
    if spec.variant == "criss_cross":
        # |union of the planes through a query group| by inclusion-exclusion over the axes;
        # the plane sharing the coordinates of axes S holds n_groups / prod_{a in S} n_a groups
        sizes = [n for n, on in zip((nt, nh, nw), spec.cross_axes) if on]
        per_group = 0
        for k in range(1, len(sizes) + 1):
            for subset in itertools.combinations(sizes, k):
                per_group += (-1) ** (k + 1) * spec.n_groups // math.prod(subset)
        group_pairs = spec.n_groups * per_group
    else:
        group_pairs = 1
        for n, r in zip((nt, nh, nw), spec.radius):
            group_pairs *= _neighbours_per_axis(n, r)
    pairs = group_pairs * g * g
    pairs += spec.n_image * spec.n_text_valid  # image -> valid text
    pairs += spec.n_text * spec.n_kv_valid  # text -> image + valid text
    return pairs / spec.seq_len**2


def grat_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int, int],
    groups: tuple[int, int, int],
    variant: str = "criss_cross",
    n_text: int = 0,
    *,
    n_text_valid: int | None = None,
    radius: int | tuple[int, int, int] = 1,
    scale: float | None = None,
    tokens_grouped: bool = False,
) -> Tensor:
    """GRAT attention as dense SDPA with the (L, L) mask of :func:`grat_mask`; O(L^2) memory.

    q, k, v: (B, Hh, L, D), L = T*H*W + n_text, tokens in raster order (image then text) unless
    ``tokens_grouped``. Returns (B, Hh, L, D) in the same order as the inputs.
    """
    spec = make_spec(grid, groups, variant, n_text, n_text_valid, radius)
    if not tokens_grouped:
        q, k, v = (to_grouped(x, spec) for x in (q, k, v))
    mask = _spec_mask(spec, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out if tokens_grouped else from_grouped(out, spec)
