"""Merging operators on tensors: sparsification, consensus, the task vector τ, and reading weights."""

from online_merging.merging.consensus import elect_sign, linear, sign_consensus
from online_merging.merging.sparsify import num_kept, random_keep, topk_mask, topp_keep, topp_mask
from online_merging.merging.task_vector import TaskVector
from online_merging.merging.weights import Weights, WeightsSource, canonical_name, open_weights

__all__ = [
    "TaskVector",
    "Weights",
    "WeightsSource",
    "canonical_name",
    "elect_sign",
    "linear",
    "num_kept",
    "open_weights",
    "random_keep",
    "sign_consensus",
    "topk_mask",
    "topp_keep",
    "topp_mask",
]
