"""Block-sparse layout of the GRAT mask for tile sizes (block_m, block_n), built from the group
structure without materialising the (L, L) mask.

For each query block: the key blocks it must visit, split into *full* blocks (every (query, key)
pair attended, no element mask needed) and *partial* ones (some pairs attended; the kernel
applies the element mask). Key blocks with no attended pair are never listed. The transposed
lists (per key block, the query blocks that visit it) drive the dK/dV backward pass.

All index tensors are int32, padded on the right; only the first ``*_cnt[row]`` entries of a row
are meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import GratSpec

# Query blocks processed per chunk when building the (QB, n_groups) membership matrix.
_CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class BlockLayout:
    block_m: int
    block_n: int
    n_q_blocks: int
    n_k_blocks: int
    # per query block (rows) -> key blocks
    kv_full_idx: Tensor
    kv_full_cnt: Tensor
    kv_part_idx: Tensor
    kv_part_cnt: Tensor
    # per key block (rows) -> query blocks
    q_full_idx: Tensor
    q_full_cnt: Tensor
    q_part_idx: Tensor
    q_part_cnt: Tensor

    @property
    def block_density(self) -> float:
        """Fraction of (query block, key block) tiles visited."""
        visited = int(self.kv_full_cnt.sum()) + int(self.kv_part_cnt.sum())
        return visited / (self.n_q_blocks * self.n_k_blocks)


def _ranges(n_blocks: int, block: int, n: int) -> tuple[Tensor, Tensor]:
    """Token range [start, end) of each block, clipped to n tokens."""
    start = torch.arange(n_blocks) * block
    return start.clamp(max=n), (start + block).clamp(max=n)


def _image_attend(spec: GratSpec, g_lo: Tensor, g_hi: Tensor) -> Tensor:
    """(rows, n_groups) bool: key groups attended by some query group in [g_lo, g_hi] (inclusive;
    rows with g_lo > g_hi hold no image query and attend no image key)."""
    nt, nh, nw = spec.group_grid
    groups = torch.arange(spec.n_groups)
    member = (groups >= g_lo[:, None]) & (groups <= g_hi[:, None])
    member = member.view(-1, nt, nh, nw)
    if spec.variant == "criss_cross":
        st, sh, sw = member.any(3).any(2), member.any(3).any(1), member.any(2).any(1)
        ct, ch, cw = spec.cross_axes
        hit = torch.zeros_like(member)
        hit |= st[:, :, None, None] & ct
        hit |= sh[:, None, :, None] & ch
        hit |= sw[:, None, None, :] & cw
    else:
        rt, rh, rw = (min(r, n - 1) for r, n in zip(spec.radius, (nt, nh, nw)))
        hit = F.max_pool3d(
            member[:, None].float(),
            kernel_size=(2 * rt + 1, 2 * rh + 1, 2 * rw + 1),
            stride=1,
            padding=(rt, rh, rw),
        )[:, 0] > 0
    return hit.reshape(-1, spec.n_groups)


def _block_matrices(spec: GratSpec, block_m: int, block_n: int) -> tuple[Tensor, Tensor]:
    """(visit, full), both (QB, KB) bool."""
    n, nkv, seq, g = spec.n_image, spec.n_kv_valid, spec.seq_len, spec.group_size
    qb_n, kb_n = -(-seq // block_m), -(-seq // block_n)
    q_lo, q_hi = _ranges(qb_n, block_m, seq)  # token ranges
    k_lo, k_hi = _ranges(kb_n, block_n, seq)
    k_end = torch.arange(1, kb_n + 1) * block_n  # unclipped: a full tile must lie inside [0, L)
    qi_lo, qi_hi = q_lo.clamp(max=n), q_hi.clamp(max=n)  # image part of each block
    ki_lo, ki_hi = k_lo.clamp(max=n), k_hi.clamp(max=n)
    q_has_img, k_has_img = qi_hi > qi_lo, ki_hi > ki_lo
    q_has_text = q_hi > n
    q_all_img, q_all_text = q_hi <= n, q_lo >= n

    # image -> image, at group resolution, then reduced to key blocks with a prefix sum
    qg_lo, qg_hi = qi_lo // g, torch.where(q_has_img, (qi_hi - 1) // g, -1)
    kg_lo, kg_hi = ki_lo // g, torch.where(k_has_img, (ki_hi - 1) // g, -1)
    rows = max(1, _CHUNK_ELEMS // max(1, spec.n_groups))
    img_visit = []
    img_full = []
    k_single = k_has_img & (kg_lo == kg_hi) & (k_end <= n)
    for s in range(0, qb_n, rows):
        hit = _image_attend(spec, qg_lo[s : s + rows], qg_hi[s : s + rows])
        csum = F.pad(hit.to(torch.int32).cumsum(1), (1, 0))
        count = csum[:, (kg_hi + 1).clamp(min=0)] - csum[:, kg_lo.clamp(max=spec.n_groups)]
        img_visit.append(count > 0)
        # a tile is full when its queries and keys each sit in a single group that attends
        q_single = (q_has_img & (qg_lo == qg_hi) & q_all_img)[s : s + rows]
        key_hit = hit[:, kg_lo.clamp(max=spec.n_groups - 1)]
        img_full.append(q_single[:, None] & k_single[None, :] & key_hit)
    visit = torch.cat(img_visit) & q_has_img[:, None] & k_has_img[None, :]
    full = torch.cat(img_full)

    k_valid_text = (k_hi > n) & (k_lo.clamp(min=n) < nkv)  # overlaps [n, nkv)
    k_all_valid_text = (k_lo >= n) & (k_end <= nkv)
    k_any_valid, k_all_valid = k_lo < nkv, k_end <= nkv
    visit |= q_has_img[:, None] & k_valid_text[None, :]
    visit |= q_has_text[:, None] & k_any_valid[None, :]
    full |= q_all_img[:, None] & k_all_valid_text[None, :]
    full |= q_all_text[:, None] & k_all_valid[None, :]
    return visit, full & visit


def _lists(m: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise column indices of the True entries, ascending, padded: (idx (R, max), cnt (R,))."""
    cnt = m.sum(1)
    width = max(1, int(cnt.max()) if m.numel() else 1)
    idx = torch.sort(m.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    return idx.to(torch.int32).contiguous(), cnt.to(torch.int32)


@lru_cache(maxsize=32)
def block_layout(spec: GratSpec, block_m: int, block_n: int, device: str = "cpu") -> BlockLayout:
    """The block-sparse layout of ``spec`` for query tiles of block_m and key tiles of block_n."""
    visit, full = _block_matrices(spec, block_m, block_n)
    part = visit & ~full
    tensors = [*_lists(full), *_lists(part), *_lists(full.T), *_lists(part.T)]
    tensors = [t.to(device) for t in tensors]
    return BlockLayout(block_m, block_n, visit.shape[0], visit.shape[1], *tensors)


def block_matrices(spec: GratSpec, block_m: int, block_n: int) -> tuple[Tensor, Tensor]:
    """(visit, full) (QB, KB) bool tile matrices; for tests and the benchmark."""
    return _block_matrices(spec, block_m, block_n)
