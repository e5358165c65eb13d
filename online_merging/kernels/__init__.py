"""Backends of the optimizer step. Each module exposes ``step``, ``ties_merge`` and ``topk_cut`` (see ``eager``).

- ``eager``: plain torch ops, any device; the readable float32 version.
- ``cpu``: one fused C++ call per param group (compiled on first use with torch's cpp_extension).
- ``triton``: one fused Triton kernel launch per param group, for CUDA tensors.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

__all__ = ["BACKENDS", "get_backend", "to_device"]

BACKENDS = ("eager", "cpu", "triton")


def to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A table made on the host, on ``device``: copied from pinned memory on CUDA, so that the copy waits for no work
    queued before it and the host does not wait for the copy."""
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table


def get_backend(name: str | None, device: torch.device) -> ModuleType:
    """The backend module ``name``, or for ``None`` the fastest one that works on ``device``."""
    return _backend(name, device.type)


@functools.cache
def _backend(name: str | None, device_type: str) -> ModuleType:
    device = torch.device(device_type)
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"Invalid backend: {name!r} (expected one of {BACKENDS} or None)")
        if name == "cpu" and device.type != "cpu":
            raise ValueError(f"backend='cpu' cannot update a tensor on {device}")
        if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got a tensor on {device}")
        return importlib.import_module(f"online_merging.kernels.{name}")
    preferred = {"cpu": "cpu", "cuda": "triton"}.get(device.type)
    if preferred is not None:
        try:
            return importlib.import_module(f"online_merging.kernels.{preferred}")
        except (ImportError, RuntimeError, OSError) as error:
            warnings.warn(
                f"the {preferred!r} backend is unavailable ({type(error).__name__}: {error}); "
                "falling back to the slower 'eager' backend",
                stacklevel=2,
            )
    return importlib.import_module("online_merging.kernels.eager")
