"""Offline merging of SFT and aligned checkpoints: MA, HMA (and its ratio search), mergekit's linear, DARE, TIES."""

from online_merging.layer_blocks import block_of, num_layers
from online_merging.offline.hma_search import HMAResult, sample_responses, search_hma_ratios
from online_merging.offline.merge import METHODS, MergeSpec, merge, merged_tensors, save_merged
from online_merging.offline.mergekit import mergekit_config, run_mergekit

__all__ = [
    "METHODS",
    "HMAResult",
    "MergeSpec",
    "block_of",
    "merge",
    "merged_tensors",
    "mergekit_config",
    "num_layers",
    "run_mergekit",
    "sample_responses",
    "save_merged",
    "search_hma_ratios",
]
