"""Key-neuron masks: name -> boolean row mask of shape ``(rows,)``; names absent from the masks are fully trainable."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["SCOPES", "NeuronMasks", "key_neuron_masks", "load_neuron_masks", "save_neuron_masks"]

SCOPES = ("global", "layer")
FORMAT = "neuron_masks"


class NeuronMasks(dict):
    """``dict[str, BoolTensor]`` remembering the ``k`` and ``scope`` it was selected with (None when unknown)."""

    def __init__(self, masks=(), *, k: float | None = None, scope: str | None = None):
        super().__init__(masks)
        self.k, self.scope = k, scope

    def fraction(self) -> float:
        """Fraction of rows kept over all masks."""
        total = sum(m.numel() for m in self.values())
        return sum(int(m.sum()) for m in self.values()) / total if total else 0.0


def _check(k: float, scope: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"Invalid k: {k!r} (must be a fraction in (0, 1])")
    if scope not in SCOPES:
        raise ValueError(f"Invalid scope: {scope!r} (must be one of {', '.join(SCOPES)})")


def _top(values: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest values; equal values by position (stable sort)."""
    order = torch.sort(values, descending=True, stable=True).indices
    return order[:count]


def key_neuron_masks(
    importance: Mapping[str, Tensor], k: float = 0.10, scope: str = "global", *, biases: Iterable[str] = ()
) -> NeuronMasks:
    """Keep the top ``k`` fraction (``ceil(k · rows)``) of neurons by importance, over all neurons (``"global"``)
    or within each parameter (``"layer"``). Ties are broken by name, then row index (deterministic).

    ``biases``: names of the model's parameters (or just its biases); for each ``<prefix>.bias`` whose
    ``<prefix>.weight`` is in ``importance`` the weight's row mask is repeated under the bias name, so the bias
    element of a neuron follows it."""
    _check(k, scope)
    names = sorted(importance)
    rows = {n: importance[n].detach().reshape(-1).double().cpu() for n in names}
    for n, r in rows.items():
        if torch.isnan(r).any():
            raise ValueError(f"Importance of {n!r} contains NaN")
    masks = NeuronMasks(k=float(k), scope=scope)
    if scope == "layer":
        for n in names:
            mask = torch.zeros(rows[n].numel(), dtype=torch.bool)
            mask[_top(rows[n], math.ceil(k * rows[n].numel()))] = True
            masks[n] = mask
    else:
        flat = torch.cat([rows[n] for n in names]) if names else torch.zeros(0, dtype=torch.float64)
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[_top(flat, math.ceil(k * flat.numel()))] = True
        for n, piece in zip(names, keep.split([rows[n].numel() for n in names]), strict=True):
            masks[n] = piece.clone()
    for bias in biases:
        if bias.endswith(".bias"):
            weight = bias[: -len(".bias")] + ".weight"
            if weight in masks and weight != bias:
                masks[bias] = masks[weight].clone()
    return NeuronMasks({n: masks[n] for n in masks}, k=masks.k, scope=masks.scope)


def save_neuron_masks(
    masks: Mapping[str, Tensor], path: str | os.PathLike, *, k: float | None = None, scope: str | None = None
) -> None:
    """Write ``masks`` to a safetensors file (bool stored as uint8) with metadata ``{"format": "neuron_masks",
    "k", "scope"}``; ``k``/``scope`` default to the masks' own (:class:`NeuronMasks`), else empty."""
    from safetensors.torch import save_file

    k = getattr(masks, "k", None) if k is None else k
    scope = getattr(masks, "scope", None) if scope is None else scope
    tensors = {}
    for name, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
            raise ValueError(f"Mask {name!r} must be a 1-D bool tensor, got {getattr(mask, 'dtype', type(mask))}")
        tensors[name] = mask.detach().cpu().to(torch.uint8).contiguous()
    metadata = {"format": FORMAT, "k": "" if k is None else json.dumps(float(k)), "scope": scope or ""}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_neuron_masks(path: str | os.PathLike) -> NeuronMasks:
    """Masks written by :func:`save_neuron_masks`, with their ``k`` and ``scope``."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No neuron-mask file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            names = list(f.keys()) if metadata.get("format") == FORMAT else []
            masks = {name: f.get_tensor(name) for name in names}
    except Exception as error:  # safetensors raises its own error types for files of another format
        raise ValueError(f"{path} is not a neuron-mask file: {error}") from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a neuron-mask file (metadata format {metadata.get('format')!r})")
    for name, m in masks.items():
        if m.dtype != torch.uint8 or m.dim() != 1:
            raise ValueError(f"{path} is not a neuron-mask file: {name!r} is {m.dtype} of shape {tuple(m.shape)}")
    k = json.loads(metadata["k"]) if metadata.get("k") else None
    return NeuronMasks({n: m.bool() for n, m in masks.items()}, k=k, scope=metadata.get("scope") or None)
