"""Exact top-k over tensors split across gloo ranks: the same Cut as topk_cut of the whole tensor, on every rank."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.distributed as dist

from online_merging.distributed import distributed_topk_cut, distributed_topk_cuts, radix_rounds
from online_merging.merging.sparsify import cut_mask, topk_cut
from tests.distributed import run_distributed

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"),
]

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "gather", "scatter", "send", "recv",
)  # fmt: skip
SIZES = (0, 1, 2, 3, 7, 10, 64, 101, 1000, 4099)
TRIALS = 16


def whole_tensor(g: torch.Generator, n: int, dtype: torch.dtype, kind: str) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(n, dtype=dtype)
    if kind == "normal":
        return torch.randn(n, generator=g).to(dtype)
    x = (torch.randint(-3, 4, (n,), generator=g) * 0.5).to(dtype)  # "ties": a few values, many repeats, ±0
    if kind == "special":
        specials = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e-45, 3.0])
        x = torch.where(torch.rand(n, generator=g) < 0.3, specials[torch.randint(6, (n,), generator=g)], x.float())
        x = x.to(dtype)
    return x


def trial(seed: int, world_size: int) -> list[tuple[torch.Tensor, int, list[tuple[int, int]]]]:
    """Tensors with, for each, k and each rank's (start, end) piece: the same on every rank for a seed."""
    g = torch.Generator().manual_seed(seed)
    dtypes = (
        [torch.float64, torch.float64, torch.float32, torch.bfloat16]
        if seed % 3 == 0
        else [torch.float32, torch.bfloat16, torch.float16]
    )
    tensors = []
    for _ in range(int(torch.randint(3, 8, (), generator=g))):
        n = SIZES[int(torch.randint(len(SIZES), (), generator=g))]
        dtype = dtypes[int(torch.randint(len(dtypes), (), generator=g))]
        kind = ("ties", "ties", "zeros", "normal", "special")[int(torch.randint(5, (), generator=g))]
        x = whole_tensor(g, n, dtype, kind)
        k = [0, 1, n // 3, n - 1, n, n + 3, -2, *torch.randint(n + 1, (3,), generator=g).tolist()]
        k = k[int(torch.randint(len(k), (), generator=g))]
        if seed % 2:  # ZeRO-like: equal chunks by rank, the last ones short or empty
            chunk = -(-n // world_size)
            bounds = [min(n, r * chunk) for r in range(world_size + 1)]
        else:  # random boundaries (empty pieces likely), pieces dealt to ranks in a random order
            bounds = [0, *sorted(torch.randint(n + 1, (world_size - 1,), generator=g).tolist()), n]
        spans = list(itertools.pairwise(bounds))
        if seed % 4 == 2:
            spans = [spans[i] for i in torch.randperm(world_size, generator=g).tolist()]
        tensors.append((x, k, spans))
    return tensors


def piece_of(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    piece = x[start:end]
    return piece.reshape(2, -1) if len(piece) % 2 == 0 and len(piece) else piece  # pieces of any shape


def count_collectives(log: list) -> None:
    """Record (name, shapes) of each torch.distributed collective called from now on in this process."""

    def wrap(name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            log.append((name, shapes))
            return fn(*args, **kwargs)

        return counted

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def topk_worker(world_size: int, seeds: list[int]):
    """Per seed: the cuts, this rank's (offset, mask) per tensor, and the collectives of the call; then the cut of
    :func:`subgroup_cut` (None on ranks outside its group)."""
    rank, log, out = dist.get_rank(), [], []
    count_collectives(log)
    for seed in seeds:
        tensors = trial(seed, world_size)
        pieces = [piece_of(x, *spans[rank]) for x, _, spans in tensors]
        offsets = [spans[rank][0] for _, _, spans in tensors]
        log.clear()
        cuts = distributed_topk_cuts(pieces, offsets, [k for _, k, _ in tensors])
        masks = [(o, cut_mask(p, c, offset=o).reshape(-1)) for p, o, c in zip(pieces, offsets, cuts, strict=True)]
        out.append((cuts, masks, list(log)))
        on_device = distributed_topk_cuts(pieces, offsets, [k for _, k, _ in tensors], on_device=True)
        assert [tuple(cut) for cut in on_device.tolist()] == cuts, (seed, on_device, cuts)  # the same cuts, kept
    return out, subgroup_cut(world_size)


def subgroup_cut(world_size: int):
    """The top 30 of a tensor split over the first and last rank only, through a group of the two."""
    members = [0, world_size - 1]
    group = dist.new_group(members)
    if dist.get_rank() not in members:
        return None
    x = whole_tensor(torch.Generator().manual_seed(5), 101, torch.float32, "ties")
    bounds = [0, 40, 101]
    me = members.index(dist.get_rank())
    return distributed_topk_cut(x[bounds[me] : bounds[me + 1]], bounds[me], 30, group=group)


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_topk_cuts_match_whole_tensor(world_size):
    seeds = list(range(TRIALS))
    results = run_distributed(topk_worker, world_size, world_size, seeds)
    for i, seed in enumerate(seeds):
        tensors = trial(seed, world_size)
        per_rank = [results[rank][0][i] for rank in range(world_size)]
        calls = [log for _, _, log in per_rank]
        assert all(log == calls[0] for log in calls), f"seed {seed}: ranks issued different collectives {calls}"
        assert len(calls[0]) == radix_rounds([x.dtype for x, _, _ in tensors]) + 2
        for t, (x, k, _) in enumerate(tensors):
            expected = topk_cut(x, k)
            where = f"seed {seed}, tensor {t} ({x.dtype}, n={x.numel()}, k={k})"
            assert all(cuts[t] == expected for cuts, _, _ in per_rank), f"{where}: {[c[t] for c, _, _ in per_rank]}"
            pieces = sorted((masks[t] for _, masks, _ in per_rank), key=lambda om: om[0])
            assert torch.equal(torch.cat([m for _, m in pieces]), cut_mask(x, expected)), where
            kept = int(cut_mask(x, expected).sum())
            assert kept == min(max(k, 0), x.numel()), where
    expected = topk_cut(whole_tensor(torch.Generator().manual_seed(5), 101, torch.float32, "ties"), 30)
    assert [sub for _, sub in results] == [expected, *[None] * (world_size - 2), expected]


def failing_worker():
    if dist.get_rank() == 1:
        raise ValueError("rank one fails")
    return dist.get_rank()


def test_run_distributed_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1: Traceback.*ValueError: rank one fails"):
        run_distributed(failing_worker, 2)
