"""TRL's DPOTrainer with the pairwise-normalised gradient (:mod:`online_merging.losses.pairwise_normalized`)."""

from __future__ import annotations

import torch
import trl

from online_merging.losses import pairwise_normalized_loss

__all__ = ["PairwiseNormalizedDPOTrainer"]


class PairwiseNormalizedDPOTrainer(trl.DPOTrainer):
    """``trl.DPOTrainer`` whose training gradient is pairwise-normalised; losses, metrics and evaluation are TRL's.

    Every ``loss_type`` of the config works (the chosen and rejected halves of TRL's per-token log-probabilities are
    the two parts). Each micro-batch is normalised on its own; with gradient accumulation or several processes the
    normalised micro-batch gradients are averaged. Logs ``normalized/norm_chosen`` and ``normalized/norm_rejected``.
    Cost: two backward passes per micro-batch instead of one. Not for DeepSpeed or FSDP, whose sharded parameters
    ``torch.autograd.grad`` cannot reach, nor for MoE router losses.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("PairwiseNormalizedDPOTrainer runs in one process or DDP, not DeepSpeed or FSDP")
        if self.aux_loss_enabled:
            raise ValueError("PairwiseNormalizedDPOTrainer: a MoE router loss is neither a chosen nor a rejected term")
        self._halves: tuple[torch.Tensor, torch.Tensor] | None = None
        self.accelerator.unwrap_model(self.model).register_forward_hook(self._split_log_probs)

    def _split_log_probs(self, module, args, output):
        """Make the policy's per-token log-probabilities the concatenation of two tensors we keep: chosen, rejected."""
        log_probs = getattr(output, "log_probs", None)
        if log_probs is None or not log_probs.requires_grad:
            return output  # the reference forward, or evaluation
        chosen, rejected = log_probs.chunk(2, dim=0)  # TRL's batch is [chosen; rejected]
        self._halves = (chosen, rejected)
        output.log_probs = torch.cat(self._halves)
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._halves = None
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._halves is None or not torch.is_grad_enabled():
            return result
        loss, outputs = result if return_outputs else (result, None)
        params = [p for p in model.parameters() if p.requires_grad]
        normalized = pairwise_normalized_loss(loss, *self._halves, params)
        self._halves = None
        metrics = self._metrics["train"]
        metrics["normalized/norm_chosen"].append(normalized.norm_chosen)
        metrics["normalized/norm_rejected"].append(normalized.norm_rejected)
        return (normalized.loss, outputs) if return_outputs else normalized.loss
