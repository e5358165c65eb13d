"""Read a model's tensors one at a time, by canonical name, from a module, a state dict, safetensors or the Hub."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["Weights", "WeightsSource", "canonical_name", "describe", "open_weights", "preview"]

WeightsSource = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike
"""A model given as a module, a state dict, a safetensors file or directory, or a Hugging Face Hub id."""

_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")
_LEADING_MODULE = re.compile(r"^(module\.)+")


def canonical_name(name: str) -> str:
    """A parameter name without wrapper segments: DDP/DeepSpeed ``module.``, ``torch.compile``'s
    ``_orig_mod.``, FSDP1's ``_fsdp_wrapped_module.`` and activation checkpointing's prefix."""
    name = _LEADING_MODULE.sub("", name)
    while True:
        stripped = _WRAPPER_SEGMENTS.sub(r"\1", name)
        if stripped == name:
            return name
        name = stripped


class Weights:
    """Read-one-tensor-at-a-time view of a weights source, keyed by canonical name."""

    def __init__(self, getters: dict[str, Callable[[], torch.Tensor]], directory: Path | None = None):
        self._getters = getters
        self.directory = directory  # where the checkpoint lies (config, tokenizer), if on disk

    def __iter__(self) -> Iterator[str]:
        return iter(self._getters)

    def get(self, name: str) -> torch.Tensor:
        return self._getters[name]()


def open_weights(source: WeightsSource, role: str = "model") -> Weights:
    """The tensors of ``source``; ``role`` names it in errors. Tied weights appear once, under their first name."""
    if isinstance(source, nn.Module):
        source = source.state_dict()
    if isinstance(source, Mapping):
        getters, seen = {}, set()
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
        return Weights(getters)
    if isinstance(source, (str, os.PathLike)):
        return _open_safetensors(_resolve_path(source, role))
    raise TypeError(f"{role} model must be an nn.Module, a state dict or a path, got {describe(source)}")


def _storage_view(tensor: torch.Tensor) -> tuple:
    """What makes two tensors the same memory: tied weights appear in a state dict under two names."""
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())


def _resolve_path(source: str | os.PathLike, role: str) -> Path:
    path = Path(source)
    if path.exists():
        return path
    name = str(source)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"{role} model {name!r} is neither a local path nor a Hugging Face Hub id")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ImportError(
            f"{role} model {name!r} is not a local path; loading it from the Hugging Face Hub needs "
            "`pip install huggingface_hub`"
        ) from error
    try:
        return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as error:  # offline, missing repo, no permission: all end here
        raise OSError(
            f"{role} model {name!r} is not a local path and could not be fetched from the Hugging Face Hub "
            f"({type(error).__name__}: {error}). Offline, pass a local directory of safetensors files."
        ) from error


def _open_safetensors(path: Path) -> Weights:
    from safetensors import safe_open

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {str(path)!r} (convert .bin checkpoints to safetensors)")
    handles = [safe_open(str(f), framework="pt") for f in files]
    getters = {}
    for handle, file in zip(handles, files, strict=False):
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            key = canonical_name(name)
            if key in getters:
                raise ValueError(f"tensor {name!r} appears in more than one file of {str(path)!r} (at {file.name})")
            getters[key] = lambda h=handle, n=name: h.get_tensor(n)
    return Weights(getters, path if path.is_dir() else path.parent)


def preview(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return type(value).__name__
