r"""The ALLO losses (Chen et al., arXiv 2406.12606) on per-token log-probabilities, in pure torch.

Every function takes per-token tensors of shape ``[B, T]``: the policy's log-probabilities ``policy_logps``, the
reference's ``ref_logps`` and a completion ``mask`` (bool or 0/1: which positions are response tokens). Positions
outside the mask never count, whatever their values.

* Stage 2, unlearning: :func:`npo_loss`, negative preference optimisation (Zhang et al., arXiv 2404.05868) on the
  rejected responses with per-token weights :math:`w_{ij}`,

  .. math::
      L_\mathrm{NPO} = -\frac{2}{\beta} \frac{1}{B} \sum_i \log\sigma\Big(-\beta \sum_j m_{ij} w_{ij}
      \big(\log\pi_\theta(y_{ij}) - \log\pi_\mathrm{ref}(y_{ij})\big)\Big).

  ALLO's weights come from a token-level reward model trained on teacher rewrites (only the misaligned tokens are
  pushed down). Without one we offer two stand-ins: uniform weights (``weights=None``, plain NPO) and
  :func:`token_log_ratio_weights`, a softmax over each response of the policy/reference log-ratio (the tokens the
  policy has already drifted towards are pushed down hardest). The stand-in is *not* ALLO's reward model.
* Stage 3, DPO with a noisy-token filter: :func:`noisy_token_weights` gives weight 0 to the completion tokens whose
  implicit reward :math:`r_{ij} = \beta(\log\pi_\theta - \log\pi_\mathrm{ref})` lies in the top ``percentile`` of
  the batch (a detached decision); :func:`token_weighted_dpo_loss` is DPO's sigmoid loss on the weighted token sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["noisy_token_weights", "npo_loss", "token_log_ratio_weights", "token_weighted_dpo_loss"]


def _check(policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float, name: str):
    if policy_logps.dim() != 2 or policy_logps.shape != ref_logps.shape or policy_logps.shape != mask.shape:
        raise ValueError(
            f"{name}: policy_logps, ref_logps and mask must have one shape [B, T], got "
            f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(mask.shape)}"
        )
    if not beta > 0:
        raise ValueError(f"{name}: beta must be > 0, got {beta}")


def _weighted_log_ratio(policy_logps, ref_logps, mask, weights) -> torch.Tensor:
    """Σ_j m_ij w_ij (log π − log π_ref) per row; masked positions are zeroed (not multiplied: they may be −inf)."""
    ratio = policy_logps - ref_logps
    if weights is not None:
        if weights.shape != ratio.shape:
            raise ValueError(f"weights must have shape {tuple(ratio.shape)}, got {tuple(weights.shape)}")
        ratio = ratio * weights.to(ratio.dtype)
    return torch.where(mask.bool(), ratio, torch.zeros_like(ratio)).sum(dim=1)


def npo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""NPO on the responses in the rows of ``policy_logps`` (the rejected ones): a scalar, the mean over rows of
    :math:`-\frac{2}{\beta}\log\sigma(-\beta s_i)`, with
    :math:`s_i = \sum_j m_{ij} w_{ij} (\log\pi_\theta(y_{ij}) - \log\pi_\mathrm{ref}(y_{ij}))`.

    ``weights`` (``[B, T]``, default 1: plain NPO) are used as given: detach them if they depend on the policy
    (:func:`token_log_ratio_weights` does). The gradient is :math:`\partial L / \partial \log\pi_\theta(y_{ij}) =
    \frac{2}{B} \sigma(\beta s_i) w_{ij} m_{ij}`: always positive, so descent lowers every weighted token, and it
    fades as the response's weighted log-ratio falls (unlike gradient ascent's constant push). A row without
    response tokens adds :math:`\frac{2}{\beta}\log 2` and no gradient.
    """
    _check(policy_logps, ref_logps, mask, beta, "npo_loss")
    s = _weighted_log_ratio(policy_logps, ref_logps, mask, weights)
    return -(2.0 / beta) * F.logsigmoid(-beta * s).mean()


def token_log_ratio_weights(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    r"""Stand-in for ALLO's token-level reward model: per response, :math:`w_{ij} = n_i \,
    \mathrm{softmax}_j\big((\log\pi_\theta(y_{ij}) - \log\pi_\mathrm{ref}(y_{ij})) / \mathrm{temperature}\big)`
    over its :math:`n_i` response tokens, 0 elsewhere; detached.

    The weights of a response sum to its length (mean 1), so they give plain NPO when every token has the same
    log-ratio (in particular while the policy equals the reference), and shift the push towards the tokens whose
    probability the policy has raised most relative to the reference; each weight lies in :math:`[0, n_i]`.
    A higher ``temperature`` flattens them towards uniform.
    """
    _check(policy_logps, ref_logps, mask, 1.0, "token_log_ratio_weights")
    if not temperature > 0:
        raise ValueError(f"token_log_ratio_weights: temperature must be > 0, got {temperature}")
    with torch.no_grad():
        keep = mask.bool()
        ratio = (policy_logps - ref_logps) / temperature
        ratio = torch.where(keep, ratio, torch.full_like(ratio, float("-inf")))
        softmax = torch.softmax(ratio, dim=1).nan_to_num(0.0)  # a row without response tokens: all 0
        return softmax * keep.sum(dim=1, keepdim=True).to(softmax.dtype)


def noisy_token_weights(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float, percentile: float
) -> torch.Tensor:
    r"""ALLO's noisy-token filter: 0 for the completion tokens whose implicit reward :math:`r_{ij} = \beta
    (\log\pi_\theta(y_{ij}) - \log\pi_\mathrm{ref}(y_{ij}))` is in the top ``percentile`` of the batch, 1 for the
    other completion tokens, 0 outside ``mask``; detached (a decision, not a function to differentiate).

    ``percentile`` is a fraction in ``[0, 1)`` (0.05: the top 5 %) of the :math:`N` completion tokens of all rows
    together (pass TRL's chosen and rejected rows at once to filter over both). With :math:`k = \lfloor
    \mathrm{percentile} \cdot N \rfloor`, a token is dropped iff at most :math:`k` completion tokens have a reward
    :math:`\geq` its own: the :math:`k` highest are dropped, except that tokens tied with a kept one are kept too (so
    ties never drop more than :math:`k`, and a batch of equal rewards, e.g. while the policy is the reference, keeps
    every token).
    """
    _check(policy_logps, ref_logps, mask, beta, "noisy_token_weights")
    if not 0.0 <= percentile < 1.0:
        raise ValueError(f"noisy_token_weights: percentile must be a fraction in [0, 1), got {percentile}")
    with torch.no_grad():
        keep = mask.bool()
        weights = keep.to(policy_logps.dtype)
        rewards = beta * (policy_logps - ref_logps)
        values = rewards[keep]
        k = int(percentile * values.numel())
        if k == 0:
            return weights
        threshold = values.sort(descending=True).values[k]  # the (k+1)-th highest: kept, with all tokens tied to it
        return torch.where(keep & (rewards > threshold), torch.zeros_like(weights), weights)


def token_weighted_dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""DPO's sigmoid loss on weighted token sums, rows laid out as TRL's batch: ``[chosen; rejected]`` (``2B`` rows,
    pair ``i`` in rows ``i`` and ``B + i``). A scalar, the mean over pairs of :math:`-\log\sigma(\beta (s^w_i -
    s^l_i))` with :math:`s_i = \sum_j m_{ij} w_{ij} (\log\pi_\theta - \log\pi_\mathrm{ref})`; ``weights`` default 1
    (plain DPO), used as given (:func:`noisy_token_weights` gives ALLO's stage 3).
    """
    _check(policy_logps, ref_logps, mask, beta, "token_weighted_dpo_loss")
    if policy_logps.shape[0] % 2:
        raise ValueError(f"token_weighted_dpo_loss: need rows [chosen; rejected], got {policy_logps.shape[0]} rows")
    chosen, rejected = _weighted_log_ratio(policy_logps, ref_logps, mask, weights).chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()
