"""Consensus operators ⊕ that combine sparsified task vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["elect_sign", "linear", "sign_consensus"]


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i · x_i."""
    _check_lengths(tensors, weights)
    out = tensors[0] * weights[0]
    for x, w in zip(tensors[1:], weights[1:], strict=False):
        out = out + x * w
    return out


def elect_sign(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """TIES sign election: sign(Σ w_i · x_i), or of the unweighted sum when ``weights`` is None."""
    total = linear(tensors, weights) if weights is not None else sum(tensors[1:], tensors[0])
    return torch.sign(total)


def sign_consensus(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, weighted_election: bool = True
) -> torch.Tensor:
    """Σ w_i · x_i over the elements whose sign agrees with the elected sign; the rest are dropped.

    With two inputs and ``weighted_election`` this is Eq. 7 of Lu et al. 2024: a + b where the signs of
    a = w_0·x_0 and b = w_1·x_1 agree, else the one of larger magnitude. With ``weighted_election=False`` the
    sign is elected from the unweighted sum, as in the published OnTIES code.
    """
    _check_lengths(tensors, weights)
    sign = elect_sign(tensors, weights if weighted_election else None)
    out = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weights, strict=False):
        out = out + torch.where(torch.sign(x) == sign, x, 0.0) * w
    return out


def _check_lengths(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if len(tensors) == 0 or len(tensors) != len(weights):
        raise ValueError(f"need one weight per tensor and at least one tensor, got {len(tensors)} and {len(weights)}")
