r"""Pairwise-normalised preference optimisation (Yuan et al., arXiv 2410.13828, §5): a remedy for entanglement.

A margin loss :math:`L` reaches the parameters through the chosen and the rejected log-probabilities, so its
gradient splits into a chosen part and a rejected part, :math:`\nabla L = g_w + g_l` with
:math:`g_w = \sum_i \frac{\partial L}{\partial \log\pi(y_{w,i})} \nabla \log\pi(y_{w,i})` (and :math:`g_l` alike).
The normalised gradient gives both parts the same length,

.. math::
    G = s \left( \frac{g_w}{\|g_w\|} + \frac{g_l}{\|g_l\|} \right), \qquad s = \tfrac12 (\|g_w\| + \|g_l\|),

so that a small step along :math:`-G` changes the summed chosen log-probability by
:math:`\propto \|g_w\| (1 - \cos)` and the rejected one by :math:`\propto -\|g_l\| (1 - \cos)`: the chosen one
cannot fall and the rejected one cannot rise (to first order), whatever the inner product. The scale :math:`s`
keeps the step as long as the margin loss's when the two norms are equal. Cost: two backward passes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["PairwiseNormalized", "pairwise_normalized_loss"]


@dataclass(frozen=True)
class PairwiseNormalized:
    """``loss`` has the margin loss's value and the normalised gradient; the other figures are for logging."""

    loss: torch.Tensor
    norm_chosen: float  # ‖g_w‖
    norm_rejected: float  # ‖g_l‖


def pairwise_normalized_loss(
    loss: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    params: Iterable[torch.nn.Parameter],
) -> PairwiseNormalized:
    """Turn a margin loss into one whose gradient with respect to ``params`` is the pairwise-normalised one.

    ``loss`` must reach ``params`` only through ``chosen_logps`` and ``rejected_logps`` (tensors of any shape: per
    sequence or per token). Backpropagating the returned ``loss`` is cheap: the two passes through the model are
    done here, and the returned tensor is linear in the parameters. Example::

        loss = dpo_loss(chosen_logps - ref_chosen, rejected_logps - ref_rejected)
        pairwise_normalized_loss(loss, chosen_logps, rejected_logps, model.parameters()).loss.backward()
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("pairwise_normalized_loss: no parameter requires a gradient")
    if loss.dim() != 0:
        raise ValueError(f"pairwise_normalized_loss: loss must be a scalar, got shape {tuple(loss.shape)}")
    d_chosen, d_rejected = torch.autograd.grad(loss, (chosen_logps, rejected_logps), retain_graph=True)
    g_chosen = torch.autograd.grad(chosen_logps, params, d_chosen, retain_graph=True, allow_unused=True)
    g_rejected = torch.autograd.grad(rejected_logps, params, d_rejected, allow_unused=True)
    norm_c = _inner(g_chosen, g_chosen).sqrt()
    norm_r = _inner(g_rejected, g_rejected).sqrt()
    scale = (norm_c + norm_r) / 2
    weight_c = scale / norm_c if norm_c > 0 else scale.new_zeros(())
    weight_r = scale / norm_r if norm_r > 0 else scale.new_zeros(())
    linear = loss.new_zeros((), dtype=torch.float64)
    for p, gc, gr in zip(params, g_chosen, g_rejected, strict=True):
        direction = _combine(gc, gr, weight_c, weight_r, p)
        if direction is not None:
            linear = linear + (p * direction).sum(dtype=torch.float64)
    surrogate = loss.detach() + (linear - linear.detach()).to(loss.dtype)
    return PairwiseNormalized(surrogate, float(norm_c), float(norm_r))


def _inner(a: tuple[torch.Tensor | None, ...], b: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    """Σ ⟨a_i, b_i⟩ in float64 over the parameters that both reach."""
    terms = [(x.double() * y.double()).sum() for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)


def _combine(gc, gr, weight_c, weight_r, p) -> torch.Tensor | None:
    """weight_c·g_w + weight_r·g_l for one parameter, in its dtype; None if neither part reaches it."""
    terms = [g.double() * w for g, w in ((gc, weight_c), (gr, weight_r)) if g is not None]
    if not terms:
        return None
    return sum(terms).to(p.dtype).detach()
