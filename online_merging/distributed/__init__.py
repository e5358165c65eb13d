"""Running the optimizers on sharded parameters: exact distributed top-k selection (and, later, engine bindings)."""

from online_merging.distributed.topk import DIGIT_BITS, distributed_topk_cut, distributed_topk_cuts, radix_rounds

__all__ = ["DIGIT_BITS", "distributed_topk_cut", "distributed_topk_cuts", "radix_rounds"]
