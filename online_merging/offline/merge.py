"""Offline merges of an SFT and an aligned model: MA, HMA, and mergekit's linear, DARE and TIES.

Every method is one function of the tensors of one name, so a merge streams tensor by tensor: from checkpoints
on disk only one tensor of each model is in memory at a time. Formulas (θ_s SFT, θ_a aligned, θ_b base,
δ_m = θ_m − θ_b, weights w_s, w_a):

- ``ma``: α·θ_a + (1−α)·θ_s (Lin et al., arXiv 2309.06256).
- ``hma``: the same with α_k of the tensor's block k (:mod:`online_merging.layer_blocks`).
- ``linear``: (w_s·θ_s + w_a·θ_a) / (w_s + w_a) (mergekit ``linear``, normalised).
- ``dare``: θ_b + Σ w_m·D(δ_m), D keeping each element with probability ``density`` and rescaling the kept
  ones so that ‖D(δ)‖₁ = ‖δ‖₁ (mergekit ``dare_linear``); the keep mask is the package's counter-based draw
  from (seed, name, index), not mergekit's torch RNG.
- ``ties``: θ_b + Σ_m w_m·T(δ_m)·[sign agrees] / Σ_m w_m·[sign agrees], T keeping the max(1, ⌊density·n⌋)
  largest |δ| and the sign elected from Σ w_m·T(δ_m), ≥ 0 counting as + (mergekit ``ties``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from online_merging._files import check_not_input, staged_folder
from online_merging.layer_blocks import block_of, num_layers
from online_merging.merging import WeightsSource, open_weights, random_keep, topk_mask
from online_merging.merging.weights import check_same_shapes, preview
from online_merging.rng import STREAM_UPDATE, tensor_key
from online_merging.settings import OFFLINE_METHODS

__all__ = ["MA_SWEEP", "METHODS", "MergeSpec", "merge", "merged_tensors", "save_merged"]

METHODS = OFFLINE_METHODS
MA_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The aligned model's weights α of an MA sweep: with SFT before it and the aligned model after, a path from one
to the other, scored like a training run's trajectory."""


@dataclass(frozen=True)
class MergeSpec:
    """A merge method and its settings; :meth:`check` names the field at fault."""

    method: str
    alpha: float | None = None  # ma; hma's target mean when ratios are searched
    ratios: tuple[float, ...] | None = None  # hma, one per block, input to output
    weights: tuple[float, float] = (0.5, 0.5)  # linear, dare, ties: (w_sft, w_aligned)
    density: float = 1.0  # dare, ties
    seed: int = 0  # dare

    @property
    def merges_task_vectors(self) -> bool:
        """``dare`` and ``ties`` merge θ − θ_base: they need the base model."""
        return self.method in ("dare", "ties")

    def check(self, *, base: object = None) -> None:
        """Raise ``ValueError`` naming the field at fault, or the missing ``base`` of a task-vector method."""
        if self.merges_task_vectors and base is None:
            raise ValueError(f"method {self.method!r} merges task vectors: it needs the base model")
        if self.method not in METHODS:
            raise ValueError(f"Invalid method: {self.method!r} (expected one of {', '.join(METHODS)})")
        if self.method == "ma":
            _check_fraction("alpha", self.alpha)
        if self.method == "hma":
            if not self.ratios:
                raise ValueError("method 'hma' needs ratios, one per block")
            for ratio in self.ratios:
                _check_fraction("ratios", ratio)
        if self.method in ("linear", "dare", "ties"):
            if len(self.weights) != 2 or not all(_finite(w) for w in self.weights):
                raise ValueError(f"Invalid weights: {self.weights!r} (expected two finite numbers: w_sft, w_aligned)")
            if self.method == "linear" and sum(self.weights) == 0:
                raise ValueError(f"Invalid weights: {self.weights!r} (they sum to 0; linear divides by the sum)")
        if self.method in ("dare", "ties") and not (_finite(self.density) and 0 < self.density <= 1):
            raise ValueError(f"Invalid density: {self.density!r} (expected a number in (0, 1])")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fraction(name: str, value) -> None:
    if not (_finite(value) and 0 <= value <= 1):
        raise ValueError(f"Invalid {name}: {value!r} (expected a number in [0, 1])")


def merged_tensors(
    spec: MergeSpec, *, sft: WeightsSource, aligned: WeightsSource, base: WeightsSource | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model, one ``(name, tensor)`` at a time, in the SFT model's dtype.

    The models must have the same tensor names and shapes; this is checked for every name before the first
    tensor is read.
    """
    spec.check(base=base)
    models = {"sft": open_weights(sft, "sft"), "aligned": open_weights(aligned, "aligned")}
    if spec.merges_task_vectors:
        models["base"] = open_weights(base, "base")
    names = list(models["sft"])
    for role, weights in models.items():
        if role != "sft" and set(weights) != set(names):
            only_sft, only_other = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
            raise ValueError(
                f"sft and {role} models do not match: only in sft: {preview(only_sft)}; "
                f"only in {role}: {preview(only_other)}"
            )
    check_same_shapes(models)
    layers = num_layers(names) if spec.method == "hma" else 0
    if spec.method == "hma" and not 1 <= len(spec.ratios) <= layers:
        raise ValueError(
            f"Invalid ratios: {len(spec.ratios)} blocks for a model of {layers} layers (at most one per layer)"
        )
    for name in names:
        tensors = {role: weights.get(name) for role, weights in models.items()}
        if not tensors["sft"].is_floating_point():
            yield name, tensors["sft"]
            continue
        yield name, _merge_one(spec, name, tensors, layers).to(tensors["sft"].dtype)


def _merge_one(spec: MergeSpec, name: str, tensors: dict[str, torch.Tensor], layers: int) -> torch.Tensor:
    sft, aligned = tensors["sft"].float(), tensors["aligned"].float()
    if spec.method in ("ma", "hma"):
        alpha = spec.alpha if spec.method == "ma" else spec.ratios[block_of(name, layers, len(spec.ratios))]
        return alpha * aligned + (1 - alpha) * sft
    w_sft, w_aligned = spec.weights
    if spec.method == "linear":
        return (w_sft * sft + w_aligned * aligned) / (w_sft + w_aligned)
    base = tensors["base"].float()
    deltas = [sft - base, aligned - base]
    if spec.method == "dare":
        kept = [
            _dare(delta, spec.density, tensor_key(spec.seed, STREAM_UPDATE, i, name)) for i, delta in enumerate(deltas)
        ]
        return base + w_sft * kept[0] + w_aligned * kept[1]
    trimmed = [w * _trim(delta, spec.density) for w, delta in zip(spec.weights, deltas, strict=True)]
    elected = torch.where(trimmed[0] + trimmed[1] >= 0, 1.0, -1.0)
    agree = [torch.sign(t) == elected for t in trimmed]
    total = sum(torch.where(a, t, 0.0) for a, t in zip(agree, trimmed, strict=True))
    divisor = sum(torch.where(a, w, 0.0) for a, w in zip(agree, spec.weights, strict=True))
    return base + total / torch.where(divisor == 0, 1.0, divisor)


def _dare(delta: torch.Tensor, density: float, key: tuple[int, int]) -> torch.Tensor:
    """Random keep with mergekit's L1 rescale: the kept elements carry the whole ‖δ‖₁."""
    kept = random_keep(delta, density, key, rescale=False)
    before, after = delta.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's magnitude sparsification: the max(1, ⌊density·n⌋) largest |δ|."""
    if density >= 1:
        return delta
    return torch.where(topk_mask(delta, max(1, int(density * delta.numel()))), delta, 0.0)


def merge(
    spec: MergeSpec, *, sft: WeightsSource, aligned: WeightsSource, base: WeightsSource | None = None
) -> dict[str, torch.Tensor]:
    """The merged model as a state dict (for modules: ``model.load_state_dict(merge(...), strict=False)``)."""
    return dict(merged_tensors(spec, sft=sft, aligned=aligned, base=base))


def save_merged(
    spec: MergeSpec,
    out: str | Path,
    *,
    sft: WeightsSource,
    aligned: WeightsSource,
    base: WeightsSource | None = None,
    max_shard_bytes: int = 2 * 2**30,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Merge into ``out`` as safetensors shards (with an index when there are several), with the SFT checkpoint's
    config and tokenizer files, so that ``AutoModelForCausalLM.from_pretrained(out)`` loads it. ``extra_files``:
    more text files to write there, name -> text (e.g. ``mergekit.yaml``).

    Before any work, an ``out`` that is, lies inside or contains an input checkpoint is refused (``ValueError``),
    and so is a folder holding files this package did not write (``FileExistsError``). The merge is written into a
    folder beside ``out`` and moved into place at the end: a crash leaves ``out`` as it was.
    """
    from safetensors.torch import save_file

    spec.check(base=base)
    out = Path(out)
    check_not_input(out, {"sft": sft, "aligned": aligned, "base": base})
    with staged_folder(out) as staged:
        written: list[tuple[Path, list[str]]] = []
        shard: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush():
            path = staged / f".shard-{len(written) + 1:05d}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            written.append((path, list(shard)))
            shard.clear()

        for name, tensor in merged_tensors(spec, sft=sft, aligned=aligned, base=base):
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
                size = 0
            shard[name] = tensor.contiguous()
            size, total = size + nbytes, total + nbytes
        flush()
        count, weight_map = len(written), {}
        for i, (path, names) in enumerate(written, 1):
            file = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(staged / file)
            weight_map.update(dict.fromkeys(names, file))
        if count > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staged / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _copy_model_files(sft, staged)
        (staged / "merge.json").write_text(json.dumps(_describe(spec), indent=2))
        for file, text in (extra_files or {}).items():
            (staged / file).write_text(text)
    return out


def _copy_model_files(sft: WeightsSource, out: Path) -> None:
    """Config, generation config and tokenizer files of the SFT checkpoint: everything but its weights."""
    directory = open_weights(sft, "sft").directory
    if directory is not None:
        for file in directory.iterdir():
            weights = file.suffix in (".safetensors", ".bin", ".pt") or file.name.endswith(".index.json")
            if file.is_file() and not weights and file.name != "merge.json":
                shutil.copy2(file, out / file.name)
    elif hasattr(sft, "config"):
        sft.config.save_pretrained(out)


def _describe(spec: MergeSpec) -> dict:
    fields: Sequence[str] = {
        "ma": ("alpha",), "hma": ("ratios",), "linear": ("weights",), "dare": ("weights", "density", "seed"),
        "ties": ("weights", "density"),
    }[spec.method]  # fmt: skip
    return {"method": spec.method, **{f: getattr(spec, f) for f in fields}}
