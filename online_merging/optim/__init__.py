"""The online-merging optimizers."""

from online_merging.optim.adam import OnlineMergingAdam
from online_merging.optim.base import OnlineMergingOptimizer
from online_merging.optim.schedule import LambdaSchedule
from online_merging.optim.sgd import OnlineMergingSGD

__all__ = ["LambdaSchedule", "OnlineMergingAdam", "OnlineMergingOptimizer", "OnlineMergingSGD"]
