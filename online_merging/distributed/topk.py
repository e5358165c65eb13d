"""Exact top-k magnitude selection over a tensor split into contiguous pieces held by different ranks.

Radix select over :func:`~online_merging.merging.sparsify.magnitude_bits`: each round fixes the next ``DIGIT_BITS``
bits of the threshold T from one ``all_reduce(SUM)`` of a batched histogram ``[n_tensors, 2**DIGIT_BITS]``. The
histograms count only each rank's local k largest (``torch.topk``), among which the whole tensor's k largest lie,
so that for a small top-p they cost little next to one pass over the piece; then
the tie cutoff (the r-th lowest global index among elements with bits == T) takes one ``all_gather`` of per-rank tie
counts and piece offsets and one ``all_reduce(MAX)``. The collectives depend only on the number of tensors and their
dtypes, never on the data or the piece sizes, so every rank issues the same ones in the same order.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from online_merging.distributed.collectives import collective_device
from online_merging.kernels import to_device
from online_merging.merging.sparsify import KEEP_ALL, KEEP_NONE, Cut, PendingCut, magnitude_bits

__all__ = ["DIGIT_BITS", "distributed_topk_cut", "distributed_topk_cuts", "radix_rounds", "select_pending"]

DIGIT_BITS = 11
"""Bits of the threshold fixed per round: a histogram row has 2**11 bins."""


def radix_rounds(dtypes: list[torch.dtype]) -> int:
    """Radix rounds of one call: 3 for float32 bit patterns (< 2**31), 6 if any tensor is float64 (< 2**63)."""
    width = 63 if torch.float64 in dtypes else 31
    return math.ceil(width / DIGIT_BITS) if dtypes else 0


def distributed_topk_cut(piece: torch.Tensor, offset: int, k: int, group=None) -> Cut:
    """:func:`distributed_topk_cuts` for one tensor."""
    return distributed_topk_cuts([piece], [offset], [k], group)[0]


def distributed_topk_cuts(
    pieces: list[torch.Tensor], offsets: list[int], ks: list[int], group=None, *, on_device: bool = False
) -> list[Cut] | torch.Tensor:
    """The :data:`~online_merging.merging.sparsify.Cut` of the k largest |x| of each sharded tensor, on every rank.

    Every rank of ``group`` (default: the world) passes, for each tensor in the same order, its piece (any shape,
    flattened row-major, possibly empty but of the tensor's dtype), the piece's global flat offset, and the global k.
    The result equals ``topk_cut(whole_tensor, k)`` exactly and is the same on every rank. Issues
    ``radix_rounds(dtypes) + 2`` collectives and one host synchronisation, to read the cuts; none when there are no
    tensors, or ``on_device``: then the cuts stay where the collectives ran, an int64 tensor of a row (T, cutoff)
    per tensor.
    """
    if not len(pieces) == len(offsets) == len(ks):
        raise ValueError(f"{len(pieces)} pieces, {len(offsets)} offsets and {len(ks)} ks: one of each per tensor")
    if not pieces:
        return []
    device = collective_device(group, pieces[0].device)
    bins = 1 << DIGIT_BITS
    rounds = radix_rounds([p.dtype for p in pieces])
    k = to_device(torch.tensor(ks), device)
    bits = [magnitude_bits(p).to(device) for p in pieces]
    # the k largest of the whole tensor are among the union of each rank's k largest: only those are counted
    candidates = [
        b if kk >= b.numel() else torch.topk(b, max(kk, 0), sorted=False).values for b, kk in zip(bits, ks, strict=True)
    ]
    need = k.clone()  # rank, from the top, of the k-th largest among the elements matching the prefix so far
    prefix = torch.zeros_like(k)  # the threshold's bits fixed so far
    rows = torch.arange(len(pieces), device=device)
    for r in range(rounds):
        shift = (rounds - 1 - r) * DIGIT_BITS
        hist = torch.zeros(len(pieces), bins + 1, dtype=torch.int64, device=device)  # last bin: see below
        for t, c in enumerate(candidates):
            digit = (c >> shift) & (bins - 1)
            if r > 0:  # candidates not matching the prefix go to the last bin
                digit = torch.where((c >> (shift + DIGIT_BITS)) == prefix[t], digit, bins)
            hist[t].scatter_add_(0, digit, torch.ones_like(digit))
        if r == 0:  # the last bin carries the piece's size instead: the tensor's size, once all-reduced
            hist[:, bins] = to_device(torch.tensor([b.numel() for b in bits]), device)
        else:
            hist[:, bins] = 0
        dist.all_reduce(hist, op=dist.ReduceOp.SUM, group=group)
        if r == 0:
            numel = hist[:, bins].clone()
        hist = hist[:, :bins]
        at_least = hist.flip(1).cumsum(1).flip(1)  # at_least[t, d]: matching elements with digit >= d
        digit = ((at_least >= need[:, None]).sum(1) - 1).clamp(min=0)
        need = need - (at_least[rows, digit] - hist[rows, digit])
        prefix = (prefix << DIGIT_BITS) | digit
    threshold, room = prefix, need  # room = k - #(bits > T), the ties to keep, lowest global index first

    is_tie = [b == threshold[t] for t, b in enumerate(bits)]
    ties = torch.stack([m.sum() for m in is_tie])
    local = torch.stack([ties, to_device(torch.tensor(offsets), device)])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    gathered = torch.stack(gathered)  # [ranks, (ties, offset), tensors]
    ranks = torch.arange(len(gathered), device=device)[:, None]
    other_offset, my_offset = gathered[:, 1], local[1]
    earlier = (other_offset < my_offset) | ((other_offset == my_offset) & (ranks < dist.get_rank(group)))
    j = room - (gathered[:, 0] * earlier).sum(0)  # the wanted tie's 1-based position among this piece's ties
    position = torch.stack([(m.cumsum(0) < j[t]).sum() for t, m in enumerate(is_tie)])  # its index in the piece
    cutoff = torch.where((j >= 1) & (j <= ties), my_offset + position, -1)
    dist.all_reduce(cutoff, op=dist.ReduceOp.MAX, group=group)

    if on_device:
        keep_all, keep_none = k >= numel, k <= 0
        threshold = torch.where(keep_all, KEEP_ALL[0], torch.where(keep_none, KEEP_NONE[0], threshold))
        return torch.stack(
            [threshold, torch.where(keep_all, KEEP_ALL[1], torch.where(keep_none, KEEP_NONE[1], cutoff))], 1
        )
    cuts = []
    for n, kk, th, c in zip(*torch.stack([numel, k, threshold, cutoff]).tolist(), strict=True):
        cuts.append(KEEP_ALL if kk >= n else KEEP_NONE if kk <= 0 else (th, c))
    return cuts


def select_pending(
    pending: list[PendingCut], totals: list[torch.Tensor], *, on_device: bool = False
) -> list[Cut] | list[torch.Tensor]:
    """The cut of each :class:`~online_merging.merging.PendingCut`, of its piece's flat Δ in ``totals``: one
    :func:`distributed_topk_cuts` per process group for all of them, in the order given (every rank of a group
    passes its pieces of the same tensors, in the same order); ``on_device``: each a (T, cutoff) tensor, nothing
    read back."""
    by_group: dict = {}
    for i, cut in enumerate(pending):
        by_group.setdefault(cut.group, []).append(i)
    cuts: list = [KEEP_ALL] * len(pending)
    for group, indices in by_group.items():
        chosen = [pending[i] for i in indices]
        pieces, offsets, ks = [totals[i] for i in indices], [c.offset for c in chosen], [c.k for c in chosen]
        selected = distributed_topk_cuts(pieces, offsets, ks, group, on_device=on_device)
        for i, cut in zip(indices, selected, strict=True):
            cuts[i] = cut
    return cuts
