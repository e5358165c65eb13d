"""The same merges with mergekit: a config for each :class:`MergeSpec`, and a runner.

``ma``, ``hma`` and ``linear`` become mergekit ``linear`` (HMA's ratio per block through ``filter:`` conditions on
the tensor names), ``ties`` becomes ``ties`` and ``dare`` ``dare_linear``, whose random mask is mergekit's own.
Math is in float32, as in :func:`~online_merging.offline.merge`, and the output in the SFT config's dtype. The
SFT model is given as ``base_model`` to the methods that ignore a base, so that mergekit takes the output config
and the tokenizer from it, as :func:`~online_merging.offline.save_merged` does.
"""

from __future__ import annotations

from pathlib import Path

from online_merging.layer_blocks import block_of, layer_index, num_layers
from online_merging.merging import open_weights
from online_merging.offline.merge import MergeSpec

__all__ = ["mergekit_config", "run_mergekit"]

_METHOD = {"ma": "linear", "hma": "linear", "linear": "linear", "ties": "ties", "dare": "dare_linear"}


def mergekit_config(spec: MergeSpec, *, sft: str | Path, aligned: str | Path, base: str | Path | None = None) -> dict:
    """The mergekit configuration (the YAML file as a dict) computing ``merge(spec, sft=, aligned=, base=)``.

    The models are local checkpoint directories or Hub ids, as mergekit takes them; HMA reads the SFT tensor
    names to write one filter per layer, then one per tensor outside the layers.
    """
    spec.check(base=base)
    task_vectors = spec.merges_task_vectors
    if spec.method == "ma":
        weights = (1 - spec.alpha, spec.alpha)
    elif spec.method == "hma":
        ratios = _hma_ratios(spec.ratios, sft)
        weights = ([{"filter": f, "value": 1 - r} for f, r in ratios], [{"filter": f, "value": r} for f, r in ratios])
    else:
        weights = spec.weights
    models = []
    for model, weight in zip((sft, aligned), weights, strict=True):
        parameters = {"weight": weight}
        if task_vectors:
            parameters["density"] = spec.density
        models.append({"model": str(model), "parameters": parameters})
    config = {
        "merge_method": _METHOD[spec.method],
        "base_model": str(base if task_vectors else sft),
        "models": models,
        "dtype": "float32",
    }
    dtype = _config_dtype(sft)
    return {**config, "out_dtype": dtype} if dtype else config


def _hma_ratios(ratios: tuple[float, ...], sft: str | Path) -> list[tuple[str, float]]:
    """``(filter, ratio)`` pairs: one per layer (``model.layers.3.``), then one per other tensor (its name).

    mergekit takes the first filter that is a substring of the tensor name, so the layer prefixes, which end
    with a dot, come first: a name outside the layers (``norm.weight``) may be a substring of a layer's tensor.
    """
    names = list(open_weights(sft, "sft"))
    layers = num_layers(names)
    if len(ratios) > layers:
        raise ValueError(f"Invalid ratios: {len(ratios)} blocks for a model of {layers} layers (at most one per layer)")
    prefixes, others = {}, []
    for name in names:
        index = layer_index(name)
        if index is None:
            others.append((name, ratios[block_of(name, layers, len(ratios))]))
        else:
            prefix = name[: name.index(f".{index}.") + len(f".{index}.")]
            prefixes[prefix] = ratios[block_of(name, layers, len(ratios))]
    return [*prefixes.items(), *others]


def _config_dtype(model: str | Path) -> str | None:
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(model).dtype
    return None if dtype is None else str(dtype).removeprefix("torch.")


def run_mergekit(config: dict, out: str | Path) -> Path:
    """Run mergekit in-process on the CPU, offline, into ``out`` (weights, config and tokenizer)."""
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    except ImportError as error:
        raise ImportError(f"run_mergekit needs mergekit ({error}): pip install mergekit") from error
    options = MergeOptions(device="cpu", copy_tokenizer=True, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    return Path(out)
