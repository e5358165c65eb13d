"""The task vector τ = θ_finetuned − θ_base, by parameter name, in a compact dtype."""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from online_merging._files import staged_file
from online_merging.merging.weights import (
    WeightsSource,
    canonical_name,
    check_same_shapes,
    describe,
    open_weights,
    preview,
)

__all__ = ["TaskVector"]

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
"""The dtype names :meth:`TaskVector.from_models` accepts besides ``torch.dtype`` (a ``torch.`` prefix allowed)."""


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``dtype`` as a floating-point ``torch.dtype``: given as one, or by a name of :data:`DTYPES`."""
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"Invalid dtype: {dtype!r} (expected a torch dtype or one of {', '.join(DTYPES)})")
        return DTYPES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"Invalid dtype: {dtype!r} (expected a floating-point torch dtype or one of {', '.join(DTYPES)})"
        )
    return dtype


NEGLIGIBLE = 1e-6
"""τ whose norm is at most this fraction of the fine-tuned model's is warned about: the base and the fine-tuned
model are the same weights (up to round-off), and the merge has nothing to add. A fine-tuning moves the weights
by orders of magnitude more (the embedded worlds' τ: 9 to 15% of ‖θ‖)."""

WRITTEN_BY = {"written_by": "online_merging.TaskVector"}
"""The metadata :meth:`TaskVector.save` writes: ``task-vector --out`` replaces only a file that has it."""


class TaskVector(Mapping[str, torch.Tensor]):
    """τ = θ_finetuned − θ_base, one tensor per (canonical) parameter name.

    Build it with :meth:`from_models`, or :meth:`load` one saved with :meth:`save` (safetensors). Values must
    be finite floating-point tensors; the names are canonicalised with :func:`canonical_name`.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            key = canonical_name(name)
            if key in self._tensors:
                raise ValueError(f"task vector names {name!r} and another one both canonicalise to {key!r}")
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise TypeError(f"task vector entry {name!r} must be a floating-point tensor, got {describe(tensor)}")
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(f"task vector entry {name!r} has {bad} NaN/inf element(s)")
            self._tensors[key] = tensor.detach()
        self._fingerprint: dict | None = None

    @classmethod
    def from_models(
        cls,
        base: WeightsSource,
        finetuned: WeightsSource,
        *,
        dtype: torch.dtype | str = torch.bfloat16,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> TaskVector:
        """τ = finetuned − base over their floating-point tensors, computed in float32 and stored as ``dtype`` (a
        floating-point ``torch.dtype`` or a name: ``"bf16"``, ``"bfloat16"``, ``"fp16"``, ``"fp32"``, ...).

        Both models must have the same tensor names and shapes (wrapper prefixes aside); large checkpoints
        are read one tensor at a time, so the two models are never held in memory together. ``progress`` draws
        a progress bar over the tensors. A τ that is all zeros, or whose norm is at most ``NEGLIGIBLE`` (1e-6) times
        the fine-tuned model's, is warned about (``UserWarning``): the base is likely the SFT model itself.
        """
        dtype = resolve_dtype(dtype)
        base_weights, ft_weights = open_weights(base, "base"), open_weights(finetuned, "finetuned")
        missing_in_ft = sorted(set(base_weights) - set(ft_weights))
        missing_in_base = sorted(set(ft_weights) - set(base_weights))
        if missing_in_ft or missing_in_base:
            raise ValueError(
                "base and finetuned models do not match: "
                f"only in base: {preview(missing_in_ft)}; only in finetuned: {preview(missing_in_base)}"
            )
        check_same_shapes({"base": base_weights, "finetuned": ft_weights})
        tensors = {}
        names = list(ft_weights)
        if progress:
            from tqdm.auto import tqdm

            names = tqdm(names, desc="τ = finetuned − base", unit="tensor")
        tau_squared = finetuned_squared = 0.0
        for name in names:
            b, f = base_weights.get(name), ft_weights.get(name)
            if not f.is_floating_point():
                continue
            f = f.to(device, torch.float32)
            difference = f - b.to(device, torch.float32)
            tensors[name] = difference.to(dtype)
            tau_squared += float(torch.linalg.vector_norm(difference)) ** 2
            finetuned_squared += float(torch.linalg.vector_norm(f)) ** 2
        _warn_if_negligible(math.sqrt(tau_squared), math.sqrt(finetuned_squared))
        return cls(tensors)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu", lazy: bool = False) -> TaskVector:
        """Load a task vector saved with :meth:`save` (a safetensors file).

        ``lazy``: check every tensor once, then read each from the file only when it is asked for. Under ZeRO or
        FSDP2 the optimizer keeps just this rank's slices, so τ costs 1/world of its size per rank.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no task vector file at {str(path)!r}")
        try:
            if not lazy:
                return cls(load_file(str(path), device=str(device)))
            tensors = _FileTensors(path, device)
        except SafetensorError as error:  # a truncated or foreign file: name it, one line
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({error})") from None
        for name in tensors:
            cls({name: tensors[name]})  # the checks of one entry, one tensor in memory at a time
        vector = cls({})
        vector._tensors = tensors
        return vector

    def save(self, path: str | os.PathLike) -> None:
        """Write the task vector as one safetensors file, staged beside ``path`` and moved onto it at the end (a
        crash leaves ``path`` as it was)."""
        from safetensors.torch import save_file

        with staged_file(path) as staged:
            tensors = {k: v.contiguous() for k, v in self._tensors.items()}
            save_file(tensors, str(staged), metadata={"format": "pt", **WRITTEN_BY})

    def fingerprint(self) -> dict:
        """Names, shapes and two float64 sums: enough to tell whether a checkpoint was made with this τ."""
        if self._fingerprint is None:
            layout = hashlib.sha256()
            total = absolute = 0.0
            for name in sorted(self._tensors):
                tensor = self._tensors[name]
                layout.update(f"{name}:{tuple(tensor.shape)};".encode())
                total += float(tensor.double().sum())
                absolute += float(tensor.double().abs().sum())
            self._fingerprint = {
                "tensors": len(self._tensors),
                "layout": layout.hexdigest(),
                "sum": total,
                "abs_sum": absolute,
            }
        return dict(self._fingerprint)

    @staticmethod
    def fingerprints_match(a: dict, b: dict) -> bool:
        """Equal layout, sums equal to float64 round-off."""
        return (
            a["tensors"] == b["tensors"]
            and a["layout"] == b["layout"]
            and all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12) for k in ("sum", "abs_sum"))
        )

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[canonical_name(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical_name(name) in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def numel(self) -> int:
        return sum(t.numel() for t in self._tensors.values())

    def __repr__(self) -> str:
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in self._tensors.values()})
        return f"TaskVector({len(self)} tensors, {self.numel():,} elements, {'/'.join(dtypes) or 'empty'})"


def _warn_if_negligible(tau_norm: float, finetuned_norm: float) -> None:
    if tau_norm > NEGLIGIBLE * finetuned_norm:
        return
    size = "all zeros" if tau_norm == 0 else f"tiny: ‖τ‖ = {tau_norm:.3g}, {tau_norm / finetuned_norm:.2g} of ‖θ_sft‖"
    warnings.warn(
        f"the task vector τ = finetuned − base is {size}: the base and fine-tuned (SFT) models hold the same "
        "weights (up to round-off), and the online merge adds nothing; check base_model_name_or_path (the base, "
        "pre-SFT model) against model_name_or_path (the SFT model)",
        stacklevel=3,
    )


class _FileTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file by canonical name, each read when it is asked for."""

    def __init__(self, path: Path, device: torch.device | str):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt", device=str(device))
        self._keys = {canonical_name(key): key for key in self._file.keys()}  # noqa: SIM118 (not a dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(self._keys[name])

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
