"""TRL's DPOTrainer with ALLO's losses (:mod:`online_merging.losses.allo`): stage 2 (NPO) and stage 3 (DPO with a
noisy-token filter).

Both trainers let TRL's ``_compute_loss`` run as it is (its forward passes, its metrics: ``rewards/*``,
``logps/*``, ``entropy``, ...) and keep, through forward hooks, the per-token log-probabilities of the policy and the
reference it computes; the loss they return is ours, from those tensors. TRL's ``rewards/*`` and ``logps/*``
metrics are therefore the unweighted sequence sums; ours are logged under ``allo/``.

Our optimizers go in either way: ``optimizers=(optimizer, None)``, or ``optimizer_cls_and_kwargs=(cls, kwargs)``
(which TRL 1.16's ``DPOTrainer`` does not take; these trainers set it after construction, as
:func:`~online_merging.integrations.trainer.use_online_merging_optimizer` does).

Limits (refused at construction): ``precompute_ref_log_probs`` (per-token reference log-probabilities are needed),
``ld_alpha``, ``use_weighting``, MoE router losses.
"""

from __future__ import annotations

from typing import Any

import torch
import trl

from online_merging.losses.allo import noisy_token_weights, npo_loss, token_log_ratio_weights, token_weighted_dpo_loss

__all__ = ["NPOTrainer", "TokenWeightedDPOTrainer"]


class _PerTokenLogProbs(trl.DPOTrainer):
    """Keeps the per-token log-probabilities of TRL's policy and reference forward passes; subclasses build the loss."""

    def __init__(self, *args, optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if self.precompute_ref_logps:
            raise ValueError(f"{name}: precompute_ref_log_probs gives no per-token reference log-probabilities")
        if self.ld_alpha is not None or self.use_weighting:
            raise ValueError(f"{name}: ld_alpha and use_weighting are not supported")
        if self.aux_loss_enabled:
            raise ValueError(f"{name}: MoE router losses are not supported")
        if optimizer_cls_and_kwargs is not None:
            if self.optimizer is not None:
                raise ValueError(f"{name}: pass optimizers=(optimizer, ...) or optimizer_cls_and_kwargs, not both")
            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self._captured: list[torch.Tensor] | None = None
        models = [self.accelerator.unwrap_model(self.model)]
        if self.ref_model is not None:  # None: PEFT, the reference is the policy with its adapter off
            models.append(self.ref_model)
        for model in models:
            model.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        log_probs = getattr(output, "log_probs", None)
        if self._captured is not None and log_probs is not None and len(self._captured) < 2:
            self._captured.append(log_probs)  # TRL runs the policy first, then the reference
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._captured = []
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            captured = self._captured
        finally:
            self._captured = None
        if len(captured) != 2:
            raise RuntimeError(f"{type(self).__name__}: expected the policy's and the reference's forward passes")
        mask = inputs["completion_mask"][:, 1:]  # the log-probability at position t is that of token t + 1
        policy, ref = (logps[:, -mask.size(1) :] for logps in captured)
        mode = "train" if self.model.training else "eval"
        loss = self._allo_loss(policy, ref.detach(), mask, self._metrics[mode])
        return (loss, result[1]) if return_outputs else loss

    def _allo_loss(self, policy, ref, mask, metrics) -> torch.Tensor:
        raise NotImplementedError


class NPOTrainer(_PerTokenLogProbs):
    """ALLO stage 2: NPO (:func:`~online_merging.losses.allo.npo_loss`, ``β = args.beta``) on the rejected responses.

    ``token_weights``: ``"uniform"`` (plain NPO) or ``"log_ratio"``
    (:func:`~online_merging.losses.allo.token_log_ratio_weights` at ``token_weight_temperature``: a stand-in for
    ALLO's token-level reward model, which we do not have). The chosen responses are not trained on; TRL still
    forwards them (for its metrics), which costs a forward pass of the chosen half. ``loss_type`` is ignored.
    Logs ``allo/rejected_logratio`` (mean weighted log-ratio of the rejected responses) and, for ``"log_ratio"``,
    ``allo/max_weight``.
    """

    def __init__(self, *args, token_weights: str = "uniform", token_weight_temperature: float = 1.0, **kwargs):
        if token_weights not in ("uniform", "log_ratio"):
            raise ValueError(f"NPOTrainer: token_weights must be 'uniform' or 'log_ratio', got {token_weights!r}")
        if not token_weight_temperature > 0:
            raise ValueError(f"NPOTrainer: token_weight_temperature must be > 0, got {token_weight_temperature}")
        self.token_weights = token_weights
        self.token_weight_temperature = token_weight_temperature
        super().__init__(*args, **kwargs)

    def _allo_loss(self, policy, ref, mask, metrics) -> torch.Tensor:
        _, policy = policy.chunk(2)  # TRL's batch is [chosen; rejected]
        _, ref = ref.chunk(2)
        _, mask = mask.chunk(2)
        weights = None
        if self.token_weights == "log_ratio":
            weights = token_log_ratio_weights(policy, ref, mask, self.token_weight_temperature)
            metrics["allo/max_weight"].append(self.accelerator.gather_for_metrics(weights.max()).max().item())
        with torch.no_grad():
            ratio = (policy - ref) * (1 if weights is None else weights)
            ratio = torch.where(mask.bool(), ratio, torch.zeros_like(ratio)).sum(dim=1)
        metrics["allo/rejected_logratio"].append(self.accelerator.gather_for_metrics(ratio).mean().item())
        return npo_loss(policy, ref, mask, self.beta, weights)


class TokenWeightedDPOTrainer(_PerTokenLogProbs):
    """ALLO stage 3: DPO whose margin sums only the tokens that pass the noisy-token filter
    (:func:`~online_merging.losses.allo.noisy_token_weights` over the micro-batch's chosen and rejected completion
    tokens together, then :func:`~online_merging.losses.allo.token_weighted_dpo_loss`, ``β = args.beta``).

    ``noisy_token_percentile``: the fraction of tokens with the highest implicit reward dropped (default 0.05; 0:
    plain DPO). Needs ``loss_type="sigmoid"`` and ``f_divergence_type="reverse_kl"``. With several processes each
    filters its own micro-batch. Logs ``allo/dropped_fraction`` and ``allo/weighted_margin``.
    """

    def __init__(self, *args, noisy_token_percentile: float = 0.05, **kwargs):
        if not 0.0 <= noisy_token_percentile < 1.0:
            raise ValueError(f"noisy_token_percentile must be a fraction in [0, 1), got {noisy_token_percentile}")
        self.noisy_token_percentile = noisy_token_percentile
        super().__init__(*args, **kwargs)
        if list(self.loss_types) != ["sigmoid"] or self.f_divergence_type != "reverse_kl":
            raise ValueError(
                "TokenWeightedDPOTrainer: needs loss_type='sigmoid' and f_divergence_type='reverse_kl', got "
                f"{self.loss_types} and {self.f_divergence_type!r}"
            )

    def _allo_loss(self, policy, ref, mask, metrics) -> torch.Tensor:
        weights = noisy_token_weights(policy, ref, mask, self.beta, self.noisy_token_percentile)
        with torch.no_grad():
            tokens = mask.sum()
            dropped = tokens - weights.sum()
            tokens, dropped = (self.accelerator.gather_for_metrics(t).sum() for t in (tokens, dropped))
            metrics["allo/dropped_fraction"].append((dropped / tokens.clamp(min=1)).item())
            sums = torch.where(mask.bool(), (policy - ref) * weights, torch.zeros_like(policy)).sum(dim=1)
            chosen, rejected = sums.chunk(2)
            margin = self.beta * (chosen - rejected)
            metrics["allo/weighted_margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
        return token_weighted_dpo_loss(policy, ref, mask, self.beta, weights)
