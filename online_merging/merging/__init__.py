"""Merging operators on tensors: sparsification, consensus, and the task vector τ."""

from online_merging.merging.consensus import elect_sign, linear, sign_consensus
from online_merging.merging.sparsify import num_kept, random_keep, topp_keep, topp_mask
from online_merging.merging.task_vector import TaskVector, canonical_name

__all__ = [
    "TaskVector",
    "canonical_name",
    "elect_sign",
    "linear",
    "num_kept",
    "random_keep",
    "sign_consensus",
    "topp_keep",
    "topp_mask",
]
