"""Sparsification operators F_R of the papers: random keep (DARE) and top-p magnitude keep (TIES)."""

from __future__ import annotations

import math

import torch

from online_merging.rng import bernoulli_mask

__all__ = ["num_kept", "random_keep", "topk_mask", "topp_keep", "topp_mask"]


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
    n = x.numel()
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    magnitude = x.detach().abs().reshape(-1)
    if magnitude.dtype in (torch.float16, torch.bfloat16):
        magnitude = magnitude.float()  # exact; kthvalue has no half kernels on every device
    threshold = magnitude.kthvalue(n - k + 1).values
    above = magnitude > threshold
    at = magnitude == threshold
    room = k - above.sum()
    keep = above | (at & (torch.cumsum(at, 0) <= room))
    return keep.reshape(x.shape)


def topp_keep(x: torch.Tensor, p: float) -> torch.Tensor:
    """TIES trim: zero all but the top-p fraction of |x| (no rescaling)."""
    if p >= 1.0:
        return x
    return torch.where(topp_mask(x, p), x, 0.0)
