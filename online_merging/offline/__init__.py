"""Offline merging of SFT and aligned checkpoints: MA, HMA and mergekit's linear, DARE and TIES."""

from online_merging.offline.blocks import block_of, num_layers
from online_merging.offline.merge import METHODS, MergeSpec, merge, merged_tensors, save_merged
from online_merging.offline.mergekit import mergekit_config, run_mergekit

__all__ = [
    "METHODS",
    "MergeSpec",
    "block_of",
    "merge",
    "merged_tensors",
    "mergekit_config",
    "num_layers",
    "run_mergekit",
    "save_merged",
]
