"""Small collectives the optimizers issue on every rank of a sharded parameter's process group."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_true", "collective_device"]


def collective_device(group, device: torch.device) -> torch.device:
    """Where tensors for a collective over ``group`` must live: ``device``, unless ``group``'s backend takes no
    CPU tensors (NCCL) and ``device`` is the CPU (ZeRO-Offload steps on the CPU), then the current CUDA device."""
    if device.type == "cpu" and "gloo" not in dist.get_backend(group) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_true(flags: list[torch.Tensor], group=None) -> list[bool]:
    """For each 0-d bool tensor of ``flags``, whether it is True on every rank of ``group`` (default: the world):
    one ``all_reduce(MIN)``, which every rank issues with the same number of flags."""
    if not flags:
        return []
    device = collective_device(group, flags[0].device)
    agreed = torch.stack([flag.to(device) for flag in flags]).to(torch.int32)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    return agreed.bool().tolist()
