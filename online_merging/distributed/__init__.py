"""Running the optimizers on sharded parameters: exact distributed top-k selection, and which piece of which
parameter each tensor holds under DeepSpeed ZeRO (:mod:`.zero`) and FSDP2 (:mod:`.fsdp`)."""

from online_merging.distributed.collectives import all_true, collective_device
from online_merging.distributed.fsdp import dtensor_fragment, fragment_group, is_dtensor, local_tensor
from online_merging.distributed.topk import (
    DIGIT_BITS,
    distributed_topk_cut,
    distributed_topk_cuts,
    radix_rounds,
    select_pending,
)
from online_merging.distributed.zero import Fragment, ZeroSetup, zero_fragments, zero_setup

__all__ = [
    "DIGIT_BITS",
    "Fragment",
    "ZeroSetup",
    "all_true",
    "collective_device",
    "distributed_topk_cut",
    "distributed_topk_cuts",
    "dtensor_fragment",
    "fragment_group",
    "is_dtensor",
    "local_tensor",
    "radix_rounds",
    "select_pending",
    "zero_fragments",
    "zero_setup",
]
