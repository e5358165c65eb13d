"""Read a model's tensors one at a time, by canonical name, from a module, a state dict, safetensors or the Hub."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from online_merging.sources import hub_unreachable, local_or_hub

__all__ = [
    "Weights", "WeightsSource", "canonical_name", "check_same_shapes", "describe", "locate_weights", "open_weights",
    "preview",
]  # fmt: skip

WeightsSource = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike
"""A model given as a module, a state dict, a safetensors file or directory, or a Hugging Face Hub id."""

_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module|base_layer)\.")
_LEADING_MODULE = re.compile(r"^(module\.|base_model\.model\.)+")


@functools.lru_cache(maxsize=2**16)  # the optimizer looks its parameters' names up in τ every step
def canonical_name(name: str) -> str:
    """A parameter name without wrapper segments: DDP/DeepSpeed ``module.``, ``torch.compile``'s
    ``_orig_mod.``, FSDP1's ``_fsdp_wrapped_module.``, activation checkpointing's prefix, and PEFT's
    ``base_model.model.`` and ``base_layer.`` (a LoRA layer's frozen weight has its plain model's name)."""
    while True:
        stripped = _WRAPPER_SEGMENTS.sub(r"\1", _LEADING_MODULE.sub("", name))
        if stripped == name:
            return name
        name = stripped


class Weights:
    """Read-one-tensor-at-a-time view of a weights source, keyed by canonical name."""

    def __init__(
        self,
        getters: dict[str, Callable[[], torch.Tensor]],
        shapes: dict[str, tuple[int, ...]],
        directory: Path | None = None,
    ):
        self._getters, self._shapes = getters, shapes
        self.directory = directory  # where the checkpoint lies (config, tokenizer), if on disk

    def __iter__(self) -> Iterator[str]:
        return iter(self._getters)

    def get(self, name: str) -> torch.Tensor:
        return self._getters[name]()

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, without reading it (from a safetensors header)."""
        return self._shapes[name]


def check_same_shapes(models: Mapping[str, Weights]) -> None:
    """Raise ``ValueError`` at the first name whose shape differs between ``models`` (role -> weights, the same
    names), before any tensor is read."""
    first = next(iter(models.values()))
    for name in first:
        shapes = {role: weights.shape(name) for role, weights in models.items()}
        if len(set(shapes.values())) > 1:
            shown = " vs ".join(f"{shape} ({role})" for role, shape in shapes.items())
            raise ValueError(f"{' and '.join(models)} models do not match at {name!r}: shape {shown}")


def open_weights(source: WeightsSource, role: str = "model") -> Weights:
    """The tensors of ``source``; ``role`` names it in errors. Tied weights appear once, under their first name."""
    if isinstance(source, nn.Module):
        source = source.state_dict()
    if isinstance(source, Mapping):
        getters, shapes, seen = {}, {}, set()
        for name, tensor in source.items():
            key = canonical_name(name)
            if key in getters:
                continue  # the same tensor under a wrapper alias
            view = _storage_view(tensor)
            if view in seen:
                continue  # a tied weight: kept under its first name only, as save_pretrained does
            if tensor.numel():
                seen.add(view)
            getters[key] = lambda t=tensor: t.detach()
            shapes[key] = tuple(tensor.shape)
        return Weights(getters, shapes)
    if isinstance(source, (str, os.PathLike)):
        return _open_safetensors(locate_weights(source, f"{role} model"))
    raise TypeError(f"{role} model must be an nn.Module, a state dict or a path, got {describe(source)}")


def _storage_view(tensor: torch.Tensor) -> tuple:
    """What makes two tensors the same memory: tied weights appear in a state dict under two names."""
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())


def locate_weights(source: str | os.PathLike, what: str) -> Path:
    """The local file or folder of ``source``, a Hub id downloaded first (safetensors and JSON files only); errors
    begin with ``what`` (an option, a key, "sft model")."""
    located = local_or_hub(source, what)
    if isinstance(located, Path):
        return located
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ImportError(
            f"{what}: {located!r} is not a local path; loading it from the Hugging Face Hub needs "
            "`pip install huggingface_hub`"
        ) from error
    try:
        return Path(snapshot_download(located, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as error:  # offline, missing repo, no permission: all end here
        raise hub_unreachable(located, what, error) from error


def _open_safetensors(path: Path) -> Weights:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {str(path)!r} (convert .bin checkpoints to safetensors)")
    handles = [_safe_open(f) for f in files]
    getters, shapes = {}, {}
    for handle, file in zip(handles, files, strict=False):
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            key = canonical_name(name)
            if key in getters:
                raise ValueError(f"tensor {name!r} appears in more than one file of {str(path)!r} (at {file.name})")
            getters[key] = lambda h=handle, n=name: h.get_tensor(n)
            shapes[key] = tuple(handle.get_slice(name).get_shape())
    return Weights(getters, shapes, path if path.is_dir() else path.parent)


def _safe_open(file: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as error:  # a truncated or foreign file: name it, one line
        raise ValueError(f"{str(file)!r} is not a readable safetensors file ({error})") from None


def preview(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return type(value).__name__
