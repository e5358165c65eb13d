r"""Gradient entanglement (Yuan et al., arXiv 2410.13828): how the chosen and rejected log-probabilities are coupled.

With :math:`g_w = \nabla \log \pi(y_w)` and :math:`g_l = \nabla \log \pi(y_l)`, a small step along the margin
gradient :math:`g_w - g_l` changes the two log-probabilities by

.. math::
    \Delta \log \pi(y_w) \propto \|g_w\|^2 - \langle g_w, g_l \rangle, \qquad
    \Delta \log \pi(y_l) \propto \langle g_w, g_l \rangle - \|g_l\|^2,

so the chosen log-probability may fall when :math:`\langle g_w, g_l \rangle > \|g_w\|^2` and the rejected one
may rise when :math:`\langle g_w, g_l \rangle > \|g_l\|^2`, while the margin grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from online_merging.layer_blocks import block_of, layer_index, num_layers

__all__ = ["EntanglementReport", "gradient_entanglement", "response_log_probs"]


@dataclass(frozen=True)
class EntanglementReport:
    """The figures of :func:`gradient_entanglement`; ``layers`` maps a layer (or block) name to its
    ``{"inner", "cosine"}``."""

    logp_chosen: float
    logp_rejected: float
    inner: float
    norm2_chosen: float
    norm2_rejected: float
    layers: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def margin(self) -> float:
        return self.logp_chosen - self.logp_rejected

    @property
    def cosine(self) -> float:
        return _cosine(self.inner, self.norm2_chosen, self.norm2_rejected)

    @property
    def chosen_may_fall(self) -> bool:
        """⟨g_w, g_l⟩ > ‖g_w‖²: a margin step lowers the chosen log-probability."""
        return self.inner > self.norm2_chosen

    @property
    def rejected_may_rise(self) -> bool:
        """⟨g_w, g_l⟩ > ‖g_l‖²: a margin step raises the rejected log-probability."""
        return self.inner > self.norm2_rejected

    def moved_together_since(self, before: EntanglementReport) -> bool:
        """Since ``before`` the margin rose while the chosen log-probability fell or the rejected one rose."""
        return self.margin > before.margin and (
            self.logp_chosen < before.logp_chosen or self.logp_rejected > before.logp_rejected
        )

    @classmethod
    def from_metrics(cls, metrics: dict[str, float], prefix: str = "") -> EntanglementReport:
        """The report back from :meth:`metrics` (without the per-layer figures)."""
        names = ("logp_chosen", "logp_rejected", "inner", "norm2_chosen", "norm2_rejected")
        return cls(*(metrics[prefix + name] for name in names))

    def metrics(self, prefix: str = "entanglement/") -> dict[str, float]:
        """Flat ``{prefix + name: value}`` for a Trainer's logs; the conditions as 0.0 / 1.0."""
        values = {
            "logp_chosen": self.logp_chosen,
            "logp_rejected": self.logp_rejected,
            "margin": self.margin,
            "inner": self.inner,
            "norm2_chosen": self.norm2_chosen,
            "norm2_rejected": self.norm2_rejected,
            "cosine": self.cosine,
            "chosen_may_fall": float(self.chosen_may_fall),
            "rejected_may_rise": float(self.rejected_may_rise),
        }
        for group, figures in self.layers.items():
            values.update({f"{group}/{name}": value for name, value in figures.items()})
        return {prefix + name: value for name, value in values.items()}


def _cosine(inner: float, norm2_a: float, norm2_b: float) -> float:
    denominator = (norm2_a * norm2_b) ** 0.5
    return inner / denominator if denominator > 0 else 0.0


def _as_list(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _encode(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """``prompt + response (+ EOS)`` and where the response starts, as TRL's DPOTrainer tokenises a
    non-conversational pair: the response begins where the prompt's and the full text's tokens diverge."""
    eos = tokenizer.eos_token
    if eos is not None and not response.endswith(eos):
        response += eos
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + response)["input_ids"]
    start = next(
        (i for i, (a, b) in enumerate(zip(prompt_ids, full_ids, strict=False)) if a != b),
        min(len(prompt_ids), len(full_ids)),
    )
    return full_ids, start


def response_log_probs(model, tokenizer, prompt: str | Sequence[str], response: str | Sequence[str]) -> torch.Tensor:
    """Per pair, the summed log-probability of the response tokens given the prompt (shape ``[pairs]``)."""
    prompts, responses = _as_list(prompt), _as_list(response)
    if len(prompts) != len(responses):
        raise ValueError(f"Invalid inputs: {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("Invalid inputs: no pairs")
    encoded = [_encode(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    length = max(len(ids) for ids, _ in encoded)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), length), pad, dtype=torch.long, device=device)
    attention = torch.zeros_like(input_ids)
    response_mask = torch.zeros(len(encoded), length, dtype=torch.bool, device=device)
    for row, (ids, start) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, device=device)
        attention[row, : len(ids)] = 1
        response_mask[row, start : len(ids)] = True
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 up, float64 kept
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token_logp * response_mask[:, 1:]).sum(-1)


def gradient_entanglement(
    model,
    tokenizer,
    prompt: str | Sequence[str],
    chosen: str | Sequence[str],
    rejected: str | Sequence[str],
    *,
    blocks: int | None = None,
) -> EntanglementReport:
    """Inner product, squared norms and cosine of g_w = ∇ log π(chosen) and g_l = ∇ log π(rejected).

    log π is the summed log-probability of the response tokens, averaged over the pairs; the gradients are taken
    w.r.t. the trainable parameters with ``torch.autograd.grad`` in eval mode, so ``.grad``, the modules' modes
    and the RNG are left as they were. Costs two forward and two backward passes over the pairs.

    Args:
        blocks: the per-layer breakdown's grouping: None for one entry per transformer layer (``layer_<i>``,
            tensors outside the layers under ``other``), K for HMA's K blocks of layers (``block_<k>``).
    """
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    if blocks is None:
        groups = [f"layer_{i}" if (i := layer_index(n)) is not None else "other" for n in names]
    else:
        groups = [f"block_{block_of(n, num_layers(names), blocks)}" for n in names]
    modes = {module: module.training for module in model.modules()}
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    model.eval()
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            logp_w = response_log_probs(model, tokenizer, prompt, chosen).mean()
            grads_w = torch.autograd.grad(logp_w, params, allow_unused=True)
            logp_l = response_log_probs(model, tokenizer, prompt, rejected).mean()
            grads_l = torch.autograd.grad(logp_l, params, allow_unused=True)
    finally:
        for module, training in modes.items():
            module.training = training
    # per-tensor products in float64, summed per group: no concatenated copy of the gradients
    sums: dict[str, list[float]] = {}
    for group, g_w, g_l in zip(groups, grads_w, grads_l, strict=True):
        acc = sums.setdefault(group, [0.0, 0.0, 0.0])
        g_w = g_w.double() if g_w is not None else None
        g_l = g_l.double() if g_l is not None else None
        if g_w is not None and g_l is not None:
            acc[0] += float((g_w * g_l).sum())
        if g_w is not None:
            acc[1] += float((g_w * g_w).sum())
        if g_l is not None:
            acc[2] += float((g_l * g_l).sum())
    inner, norm2_w, norm2_l = (sum(acc[k] for acc in sums.values()) for k in range(3))
    layers = {group: {"inner": acc[0], "cosine": _cosine(*acc)} for group, acc in sums.items()}
    return EntanglementReport(logp_w.item(), logp_l.item(), inner, norm2_w, norm2_l, layers)
