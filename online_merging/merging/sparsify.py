"""Sparsification operators F_R of the papers: random keep (DARE) and top-p magnitude keep (TIES)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from online_merging.rng import bernoulli_mask

__all__ = [
    "KEEP_ALL",
    "KEEP_NONE",
    "Cut",
    "PendingCut",
    "cut_mask",
    "kth_largest_bits",
    "magnitude_bits",
    "num_kept",
    "random_keep",
    "topk_cut",
    "topk_mask",
    "topp_keep",
    "topp_mask",
]


@functools.lru_cache(maxsize=2**12)
def num_kept(p: float, numel: int) -> int:
    """k = ceil(p * n), with p * n first rounded to 9 significant digits so that 0.01 * 300 keeps 3, not 4."""
    return min(numel, math.ceil(float(f"{p * numel:.9g}")))


def random_keep(
    x: torch.Tensor, p: float, key: tuple[int, int], *, rescale: bool = True, offset: int = 0
) -> torch.Tensor:
    """DARE: keep each element with probability p (counter-based draw), scaled by 1/p when ``rescale``."""
    if p >= 1.0:
        return x
    kept = torch.where(bernoulli_mask(key, p, x.shape, offset=offset, device=x.device), x, 0.0)
    return kept / p if rescale else kept


def topp_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean mask of the k = num_kept(p, n) largest |x| (see :func:`topk_mask`)."""
    return topk_mask(x, num_kept(p, x.numel()))


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |x|.

    Exactly k elements are kept. Ties at the threshold magnitude are broken by flat index, lower first: the
    same elements as a stable descending sort of |x|. Runs in O(n) with ``kthvalue``; no full sort.
    """
    return cut_mask(x, topk_cut(x, k))


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of |x|, flat, as int64, which order as the magnitudes do: float64's own, else float32's
    (half types upcast exactly)."""
    if x.dtype == torch.float64:
        return x.detach().abs().reshape(-1).view(torch.int64)
    return x.detach().float().abs().reshape(-1).view(torch.int32).to(torch.int64)


Cut = tuple[int, int]
"""(T, cutoff) of a top-k selection: keep element i iff bits(|x_i|) > T, or == T and its flat index i ≤ cutoff."""

KEEP_ALL: Cut = (-1, 0)
KEEP_NONE: Cut = (2**63 - 1, -1)


@dataclass(frozen=True)
class PendingCut:
    """The :data:`Cut` of the k largest |Δ| of a whole tensor held in pieces, to be selected once the backends have
    computed the Δ of every tensor of a step, for all of them at once (one batched selection,
    :func:`~online_merging.distributed.select_pending`).

    ``offset``: the piece's global flat index; ``k`` and ``numel``: the whole tensor's; ``group``: the process
    group holding its pieces.
    """

    offset: int
    k: int
    numel: int
    group: Any = None


def topk_cut(x: torch.Tensor, k: int) -> Cut:
    """The :data:`Cut` of the k largest |x|, ties broken by flat index (lower first)."""
    n = x.numel()
    if k >= n:
        return KEEP_ALL
    if k <= 0:
        return KEEP_NONE
    bits = magnitude_bits(x)
    if bits.is_cuda:  # torch's CUDA kthvalue selects a 1-D tensor in one thread block: seconds at 100M elements
        threshold = kth_largest_bits(bits, k, 64 if x.dtype == torch.float64 else 32)
    else:
        threshold = int(bits.kthvalue(n - k + 1).values)
    room = k - int((bits > threshold).sum())
    cutoff = int((bits == threshold).nonzero()[room - 1])
    return threshold, cutoff


def kth_largest_bits(bits: torch.Tensor, k: int, width: int) -> int:
    """The k-th largest of non-negative int64 ``bits`` below 2**width (1 <= k <= numel), by a radix select: per
    16-bit digit from the top, one histogram of the candidates left, whose digit is then known."""
    prefix, candidates = 0, bits
    for shift in range(width - 16, -1, -16):
        digits = (candidates >> shift) & 0xFFFF
        counts = torch.bincount(digits, minlength=2**16)
        at_least = counts.flip(0).cumsum(0).flip(0)  # at_least[d]: candidates whose digit is d or more
        digit = int((at_least >= k).nonzero()[-1])
        k -= int(at_least[digit] - counts[digit])
        prefix |= digit << shift
        candidates = candidates[digits == digit]
    return prefix


def cut_mask(x: torch.Tensor, cut: Cut, *, offset: int = 0) -> torch.Tensor:
    """Boolean mask of the elements a :data:`Cut` keeps; element i (row-major) has flat index ``offset + i``, so a
    piece of a larger tensor takes the whole tensor's cut."""
    threshold, cutoff = cut
    bits = magnitude_bits(x)
    index = torch.arange(offset, offset + bits.numel(), device=bits.device)
    return ((bits > threshold) | ((bits == threshold) & (index <= cutoff))).reshape(x.shape)


def topp_keep(x: torch.Tensor, p: float) -> torch.Tensor:
    """TIES trim: zero all but the top-p fraction of |x| (no rescaling)."""
    if p >= 1.0:
        return x
    return torch.where(topp_mask(x, p), x, 0.0)
