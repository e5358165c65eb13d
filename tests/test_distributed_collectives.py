"""The small collectives of the optimizers: agreement on flags across ranks, and where collective tensors live."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from online_merging.distributed import all_true, collective_device
from tests.distributed import run_distributed


def _flags() -> list[bool]:
    rank = dist.get_rank()
    # flag t is False on rank t only (t < 3); flag 3 is True everywhere, flag 4 False everywhere
    local = [torch.tensor(rank != t) for t in range(3)] + [torch.tensor(True), torch.tensor(False)]
    return all_true(local) + all_true([])


@pytest.mark.distributed
def test_all_true_is_true_only_where_every_rank_says_so():
    for rank, agreed in enumerate(run_distributed(_flags, 3)):
        assert agreed == [False, False, False, True, False], rank


def test_collective_device_moves_cpu_tensors_to_cuda_only_for_a_backend_without_cpu(monkeypatch):
    cpu, meta = torch.device("cpu"), torch.device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, expected in [("gloo", cpu), ("cpu:gloo,cuda:nccl", cpu), ("nccl", torch.device("cuda", 3))]:
        monkeypatch.setattr(dist, "get_backend", lambda group, backend=backend: backend)
        assert collective_device(None, cpu) == expected, backend
        assert collective_device(None, meta) == meta, backend  # not the CPU: left where it is
