"""Online merging optimizers: pay less alignment tax (Lu et al. 2024, arXiv 2405.17931)."""

from online_merging.merging import TaskVector
from online_merging.optim import LambdaSchedule, OnlineMergingAdam, OnlineMergingSGD
from online_merging.settings import PUBLISHED

__version__ = "0.1.0"
__all__ = [
    "PUBLISHED",
    "LambdaSchedule",
    "OnlineMergingAdam",
    "OnlineMergingSGD",
    "TaskVector",
    "__version__",
    "key_neuron_masks",
    "load_neuron_masks",
    "locate_key_neurons",
    "save_neuron_masks",
]

_NEURONS = ("key_neuron_masks", "load_neuron_masks", "locate_key_neurons", "save_neuron_masks")


def __getattr__(name: str):
    if name in _NEURONS:  # imports transformers: only when asked for
        from online_merging import neurons

        return getattr(neurons, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
