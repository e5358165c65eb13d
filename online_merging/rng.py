"""Counter-based random bits for DARE masks.

An element's draw is a pure function of ``(seed, stream, step, parameter name, flat element index)``:
no generator state, no use of the global torch RNG. Masks are therefore reproducible, resumable from a
checkpoint without RNG state, and identical however parameters are grouped, flattened or sharded, as
long as each piece knows the global index of its first element.

The bits of element i are ``lowbias32(lo(i) ^ k)`` (a 32-bit integer finaliser, one round), where
``k = lowbias32(hi(i) ^ k2) ^ k1`` folds the index's high word into the per-tensor keys (k1, k2) derived from
the other four inputs; k is constant over each 2**32-element range, so kernels compute it once per range.
Arithmetic is int64 with explicit 32-bit masking and 16-bit split multiplies, so the same bits come out of
eager torch, the C++ kernel and Triton (uint32).
"""

from __future__ import annotations

import functools
import zlib

import torch

__all__ = ["STREAM_TASK_VECTOR", "STREAM_UPDATE", "bernoulli_mask", "keep_threshold", "random_bits", "tensor_key"]

MASK32 = 0xFFFFFFFF
MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B
GOLDEN = 0x9E3779B9

STREAM_UPDATE = 0
"""Stream of the masks drawn for the optimizer update Δθ."""
STREAM_TASK_VECTOR = 1
"""Stream of the masks drawn for the task vector τ."""


def _mix32_int(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_MUL1) & MASK32
    x ^= x >> 15
    x = (x * MIX_MUL2) & MASK32
    x ^= x >> 16
    return x


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """Low 32 bits of ``x * c`` for int64 ``x`` in [0, 2**32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_MUL2)
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=1 << 16)
def _tensor_base_key(seed: int, stream: int, name: str) -> int:
    k = _mix32_int(stream)
    for word in (zlib.crc32(name.encode()), seed & MASK32, (seed >> 32) & MASK32):
        k = _mix32_int(k ^ word)
    return k


def tensor_key(seed: int, stream: int, step: int, name: str) -> tuple[int, int]:
    """The two 32-bit keys of one tensor's draw at one step (plain Python ints)."""
    k = _mix32_int(_tensor_base_key(seed, stream, name) ^ (step & MASK32))
    k = _mix32_int(k ^ (step >> 32))
    return k, _mix32_int(k ^ GOLDEN)


def random_bits(key: tuple[int, int], index: torch.Tensor) -> torch.Tensor:
    """Uniform 32-bit integers (as int64 in [0, 2**32)) for int64 flat element indices."""
    k1, k2 = key
    return _mix32((index & MASK32) ^ (_mix32((index >> 32) ^ k2) ^ k1))


def keep_threshold(p: float) -> int:
    """An element is kept when its bits are below this: P(keep) = floor(p * 2**32) / 2**32."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"Invalid keep probability: {p}")
    return int(p * 2**32)


def bernoulli_mask(
    key: tuple[int, int], p: float, shape: torch.Size | tuple[int, ...], *, offset: int = 0, device=None
) -> torch.Tensor:
    """Boolean keep-mask of ``shape``; element i (row-major) uses global index ``offset + i``."""
    numel = 1
    for size in shape:
        numel *= size
    if p >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return (random_bits(key, index) < keep_threshold(p)).reshape(shape)
