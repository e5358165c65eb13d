"""Merging operators on tensors: sparsification, consensus, the task vector τ, and reading weights."""

from online_merging.merging.consensus import elect_sign, linear, sign_consensus
from online_merging.merging.packed import PackedTau
from online_merging.merging.sparsify import (
    Cut,
    PendingCut,
    cut_mask,
    magnitude_bits,
    num_kept,
    random_keep,
    topk_cut,
    topk_mask,
    topp_keep,
    topp_mask,
)
from online_merging.merging.task_vector import TaskVector
from online_merging.merging.weights import Weights, WeightsSource, canonical_name, open_weights

__all__ = [
    "Cut",
    "PackedTau",
    "PendingCut",
    "TaskVector",
    "Weights",
    "WeightsSource",
    "canonical_name",
    "cut_mask",
    "elect_sign",
    "linear",
    "magnitude_bits",
    "num_kept",
    "open_weights",
    "random_keep",
    "sign_consensus",
    "topk_cut",
    "topk_mask",
    "topp_keep",
    "topp_mask",
]
