"""Transformer layers and HMA's blocks from tensor names: which layer, and which of K contiguous groups of layers,
a tensor belongs to (offline HMA merges and the per-layer entanglement diagnostics group tensors by them).

Layer i of L goes to block ⌊i·K/L⌋. Tensors outside the layers are assigned explicitly: the embeddings (and
anything else before the first layer) to the input block 0, the final norm and the LM head to the output
block K−1, following Lin et al.'s input / middle / output split.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["block_of", "layer_index", "num_layers"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_OUTPUT_SIDE = re.compile(r"(?:^|\.)(?:lm_head|norm|final_layernorm|ln_f|final_layer_norm|embed_out)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The transformer layer a tensor belongs to (``model.layers.7.mlp...`` → 7), or None outside the layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def num_layers(names: Iterable[str]) -> int:
    """The number of transformer layers, from the tensor names."""
    indices = [i for i in map(layer_index, names) if i is not None]
    if not indices:
        raise ValueError("no transformer layers found in the tensor names (expected e.g. 'model.layers.0.')")
    return max(indices) + 1


def block_of(name: str, layers: int, blocks: int) -> int:
    """The HMA block (0 … blocks−1) of the tensor ``name`` in a model of ``layers`` layers."""
    if not 1 <= blocks <= layers:
        raise ValueError(f"Invalid number of blocks: {blocks} (expected 1 to the number of layers, {layers})")
    index = layer_index(name)
    if index is not None:
        if index >= layers:
            raise ValueError(f"tensor {name!r} is in layer {index}, but the model has {layers} layers")
        return index * blocks // layers
    return blocks - 1 if _OUTPUT_SIDE.search(name) else 0
