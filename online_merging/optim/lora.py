"""LoRA adapters under online merging: each adapter tensor's update is merged as a parameter's, τ goes into the
frozen base weight of its layer (docs/algorithm.md, "LoRA").

A PEFT LoRA layer computes y = W x + s·B A x (W frozen, A and B trained, s its scaling, lora_alpha / r), so its
effective weight is W + s·B A. With adapters, OnDARE and OnTIES mean:

- A and B step as parameters whose τ is 0: their update is sparsified (DARE's draw, rescaled, or TIES's top-p)
  and weighted by 1 − α;
- at each merge step (B's step count a multiple of K), W gains α·F(τ): OnDARE's draw of τ, as a full parameter
  would take it; OnTIES's top-p of τ, b, kept where its sign agrees with the sign elected from b and the
  adapter's change of the effective weight at this merge, U = s·(B'A' − B°A°) (B°, A°: before the step, less
  step-K's Δc): sign(U + α·b) (weighted) or sign(U / (1 − α) + b). U is a low-rank product, not sparsified per
  element of W: unlike a full parameter's update it is never dropped.

W is written in place by the optimizer only. Its value lives in B's optimizer state as ``base_weight`` (the tensor
itself, no copy), so that a checkpoint holds it and a resume is bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from online_merging.kernels.plan import Binding, dare_keys
from online_merging.merging import canonical_name, cut_mask, num_kept, random_keep, topk_cut
from online_merging.settings import MergeSettings

__all__ = ["BASE_WEIGHT", "Site", "adapter_kind", "find_sites", "is_lora"]

BASE_WEIGHT = "base_weight"
"""The key of a LoRA layer's base weight in its B's optimizer state."""

OTHER_ADAPTERS = {
    "lora_embedding_A": "LoRA on an embedding",
    "lora_embedding_B": "LoRA on an embedding",
    "lora_magnitude_vector": "DoRA",
    "lora_E": "AdaLoRA",
    "ia3_l": "IA³",
    "hada_w1_a": "LoHa",
    "lokr_w1": "LoKr",
    "oft_R": "OFT",
    "oft_r": "OFT",
    "boft_R": "BOFT",
    "vera_lambda_b": "VeRA",
    "fourierft_spectrum": "FourierFT",
    "prompt_encoder": "prompt tuning",
    "prefix_encoder": "prefix tuning",
}
"""Name segments of PEFT's other adapters' trainable tensors, and the adapter's name: online merging refuses them."""


def is_lora(name: str) -> bool:
    """Whether ``name`` is a LoRA adapter tensor (``....lora_A.<adapter>.weight`` or ``lora_B``)."""
    return any(segment in ("lora_A", "lora_B") for segment in name.split("."))


def adapter_kind(name: str) -> str | None:
    """The adapter type of a PEFT tensor online merging does not support (``"DoRA"``, ...), else ``None``."""
    return next((OTHER_ADAPTERS[s] for s in name.split(".") if s in OTHER_ADAPTERS), None)


@dataclass(eq=False)
class Site:
    """One LoRA-adapted linear layer: its adapter's A and B, the layer (for its scaling and layout), its base
    weight W and W's canonical name, τ's entry; ``binding`` keeps W's τ on W's device, τ's cuts and keys."""

    name: str
    layer: nn.Module
    adapter: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    base: torch.Tensor
    binding: Binding = field(default_factory=Binding)

    @property
    def quantized(self) -> str | None:
        """The base weight's type when it cannot take τ (bitsandbytes' 4-bit or 8-bit weights), else ``None``."""
        return None if self.base.is_floating_point() else f"{type(self.base).__name__} ({self.base.dtype})"

    def product(self, lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None) -> torch.Tensor:
        """s·B A in W's layout, float32 (of the given A and B, else of the live ones)."""
        lora_A = self.lora_A if lora_A is None else lora_A
        lora_B = self.lora_B if lora_B is None else lora_B
        delta = (lora_B.float() @ lora_A.float()) * float(self.layer.scaling[self.adapter])
        return delta.T if getattr(self.layer, "fan_in_fan_out", False) else delta

    def merge_tau(self, settings: MergeSettings, step: int, before: torch.Tensor | None) -> None:
        """W ← W + α·F(τ) at merge step ``step`` (module docstring); ``before``: s·B°A° (OnTIES)."""
        tau, alpha, p = self.binding.tau, settings.alpha, settings.reserve_p
        if tau.device != self.base.device:
            tau = self.binding.tau = tau.to(self.base.device)
        if settings.merge == "ondare":
            _, key = dare_keys(settings, step, self.name, self.binding.tau_keys)
            task = random_keep(tau.float(), p, key, rescale=settings.dare_rescale)
            if settings.tau_clamp is not None:
                task = task.clamp(-settings.tau_clamp, settings.tau_clamp)
        else:
            if p not in self.binding.tau_cuts:
                self.binding.tau_cuts[p] = topk_cut(tau, num_kept(p, tau.numel()))
            task = torch.where(cut_mask(tau, self.binding.tau_cuts[p]), tau.float(), 0.0)
            change = self.product() - before
            if settings.ties_sign == "weighted":
                elected = torch.sign(change + alpha * task)
            else:
                elected = torch.sign((change / (1.0 - alpha) if alpha < 1.0 else 0.0) + task)
            task = torch.where(torch.sign(task) == elected, task, 0.0)
        merged = self.base.float().add_(task, alpha=alpha)
        self.base.copy_(merged)


def find_sites(module: nn.Module) -> dict[torch.Tensor, Site]:
    """The LoRA layers of ``module`` (a PEFT model), by their A and B tensors (both map to the layer's site)."""
    sites = {}
    for path, layer in module.named_modules():
        if not all(hasattr(layer, key) for key in ("lora_A", "lora_B", "scaling", "get_base_layer")):
            continue
        base = layer.get_base_layer().weight
        for adapter in layer.lora_A:
            lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            name = canonical_name(f"{path}.weight")
            site = Site(name, layer, adapter, lora_A, lora_B, base)
            sites[lora_A] = sites[lora_B] = site
    return sites
