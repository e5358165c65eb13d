"""Localisation of key neurons (ALLO, Chen et al. 2024, arXiv 2406.12606): importance of each neuron (an output row
of a weight plus its bias element) from a short DPO probe, and boolean row masks of the top ``k`` fraction."""

from online_merging.neurons.importance import (
    GradientMagnitudeCallback,
    UpdateMagnitudeCallback,
    importance_from_weights,
    neuron_layout,
    snapshot,
)
from online_merging.neurons.locate import embedding_names, locate_key_neurons, probe_importances
from online_merging.neurons.masks import NeuronMasks, key_neuron_masks, load_neuron_masks, save_neuron_masks

__all__ = [
    "GradientMagnitudeCallback",
    "NeuronMasks",
    "UpdateMagnitudeCallback",
    "embedding_names",
    "importance_from_weights",
    "key_neuron_masks",
    "load_neuron_masks",
    "locate_key_neurons",
    "neuron_layout",
    "probe_importances",
    "save_neuron_masks",
    "snapshot",
]
