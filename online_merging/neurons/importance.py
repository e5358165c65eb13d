"""Per-neuron importance: accumulated update (ALLO, arXiv 2406.12606) and its cheaper in-training variants.

A *neuron* is one output row of a parameter with at least two dimensions (index along dim 0, summed over the rest:
``out_features`` rows of a Linear, one row per token of an embedding or LM head), together with the matching element
of its bias (same module prefix, ``.bias``, 1-D of the same length). Other 1-D and 0-d parameters (norm scales, …)
are not neurons. Tied weights count once: the first name of the storage wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

__all__ = [
    "GradientMagnitudeCallback",
    "UpdateMagnitudeCallback",
    "importance_from_weights",
    "neuron_layout",
    "snapshot",
]


def _storage_key(t: Tensor):
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta / exotic tensors: no tie detection
        return None
    return ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.device


def neuron_layout(tensors: Mapping[str, Tensor]) -> dict[str, str | None]:
    """``{weight name: bias name or None}`` for every neuron parameter of ``tensors`` (name -> tensor), in the
    mapping's order. Weights sharing a storage (tied) appear once, under their first name."""
    layout: dict[str, str | None] = {}
    seen = set()
    for name, t in tensors.items():
        if t.dim() < 2:
            continue
        key = _storage_key(t)
        if key is not None and key in seen:
            continue
        seen.add(key)
        layout[name] = None
    for name in layout:
        if name.endswith(".weight"):
            bias = name[: -len(".weight")] + ".bias"
            b = tensors.get(bias)
            if b is not None and b.dim() == 1 and b.shape[0] == tensors[name].shape[0]:
                layout[name] = bias
    return layout


def _rows(t: Tensor) -> Tensor:
    t = t.detach().float().abs()
    return t.reshape(t.shape[0], -1).sum(dim=1) if t.dim() > 1 else t


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of ``model``'s parameters (``named_parameters``: tied weights once)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def importance_from_weights(before: Mapping[str, Tensor], after: Mapping[str, Tensor], lr: float) -> dict[str, Tensor]:
    """ALLO's importance: per neuron, Σ over its row of ``|after − before| / lr``, plus its bias element's.

    Keyed by weight name (see :func:`neuron_layout`, applied to ``after``); values are float32 of shape ``(rows,)``.
    Tied weights are recognised when the ``after`` tensors share storage (a live ``state_dict()``), or are absent
    from the mappings (:func:`snapshot`, ``named_parameters``)."""
    if not lr > 0:
        raise ValueError(f"Invalid lr: {lr} (must be > 0)")
    out = {}
    for name, bias in neuron_layout(after).items():
        if name not in before:
            raise KeyError(f"{name!r} is in `after` but not in `before`")
        if before[name].shape != after[name].shape:
            raise ValueError(f"Shape mismatch for {name!r}: {tuple(before[name].shape)} vs {tuple(after[name].shape)}")
        row = _rows(after[name].detach().float() - before[name].detach().to(after[name].device).float())
        if bias is not None and bias in before:
            row = row + (after[bias].detach().float() - before[bias].detach().to(after[bias].device).float()).abs()
        out[name] = row / lr
    return out


class _RowSums(TrainerCallback):
    """Per-neuron sums over the first ``steps`` optimizer steps (all steps when None) of the model the Trainer
    passes to callbacks (or ``model``). Read them with :attr:`importance` (float32, on the parameters' devices)."""

    def __init__(self, steps: int | None = None, *, model: nn.Module | None = None):
        if steps is not None and steps < 1:
            raise ValueError(f"Invalid steps: {steps} (must be >= 1 or None)")
        self.steps, self.model = steps, model
        self.sums: dict[str, Tensor] = {}
        self.steps_seen = 0
        self._layout: dict[str, str | None] | None = None
        self._params: dict[str, Tensor] = {}

    @property
    def importance(self) -> dict[str, Tensor]:
        return dict(self.sums)

    def _active(self) -> bool:
        return self.steps is None or self.steps_seen < self.steps

    def _bind(self, kwargs) -> None:
        if self._layout is None:
            model = self.model if self.model is not None else kwargs["model"]
            self._params = dict(model.named_parameters())
            self._layout = neuron_layout(self._params)

    def _add(self, name: str, row: Tensor) -> None:
        if name in self.sums:
            self.sums[name] += row
        else:
            self.sums[name] = row.clone()

    def _neurons(self) -> Iterable[tuple[str, Tensor, Tensor | None]]:
        for name, bias in self._layout.items():
            yield name, self._params[name], None if bias is None else self._params[bias]


class UpdateMagnitudeCallback(_RowSums):
    """Σ_t |θ_t − θ_{t−1}| per neuron over the first ``steps`` optimizer steps, collected during normal training.

    θ is copied just before each optimizer step (``on_pre_optimizer_step``) into buffers allocated once and freed
    after the last counted step, and compared just after it (``on_optimizer_step``); training is not changed. No
    division by the learning rate: with a constant rate it does not change the ranking."""

    def __init__(self, steps: int | None = None, *, model: nn.Module | None = None):
        super().__init__(steps, model=model)
        self._before: dict[str, Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._active():
            return
        self._bind(kwargs)
        with torch.no_grad():
            for name, bias in self._layout.items():
                for n in (name, bias):
                    if n is None:
                        continue
                    if n in self._before:
                        self._before[n].copy_(self._params[n].detach())
                    else:
                        self._before[n] = self._params[n].detach().clone()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self._before:
            return
        with torch.no_grad():
            for name, weight, bias in self._neurons():
                row = _rows(weight.detach().float() - self._before[name].float())
                if bias is not None:
                    row = row + (bias.detach().float() - self._before[self._layout[name]].float()).abs()
                self._add(name, row)
        self.steps_seen += 1
        if not self._active():
            self._before = {}


class GradientMagnitudeCallback(_RowSums):
    """Σ_t |g_t| per neuron over the first ``steps`` optimizer steps, read in ``on_pre_optimizer_step`` (after
    gradient accumulation and clipping, before the step and ``zero_grad``). Parameters without a gradient add 0.
    Under fp16 loss scaling without clipping the gradients read may still be scaled (a constant factor per step)."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._active():
            return
        self._bind(kwargs)
        with torch.no_grad():
            for name, weight, bias in self._neurons():
                grad = weight.grad
                row = torch.zeros(weight.shape[0], device=weight.device) if grad is None else _rows(grad)
                if bias is not None and bias.grad is not None:
                    row = row + bias.grad.detach().float().abs()
                self._add(name, row)
        self.steps_seen += 1
