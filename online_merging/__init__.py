"""Online merging optimizers: pay less alignment tax (Lu et al. 2024, arXiv 2405.17931)."""

from online_merging.merging import TaskVector
from online_merging.optim import LambdaSchedule, OnlineMergingAdam, OnlineMergingSGD

__version__ = "0.1.0"
__all__ = ["LambdaSchedule", "OnlineMergingAdam", "OnlineMergingSGD", "TaskVector", "__version__"]
