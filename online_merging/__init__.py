"""Online merging optimizers: pay less alignment tax (Lu et al. 2024, arXiv 2405.17931).

Importing the package imports no torch, so that ``online-merging --help`` answers at once: each name below but
``PUBLISHED`` imports its module when first read."""

import importlib

from online_merging._quiet import quiet_deepspeed_cpu_notice
from online_merging.settings import PUBLISHED

quiet_deepspeed_cpu_notice()  # before anything this package calls imports DeepSpeed

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

_NEURONS = ("key_neuron_masks", "load_neuron_masks", "locate_key_neurons", "save_neuron_masks")  # transformers
_MODULES = {
    "TaskVector": "online_merging.merging",
    "LambdaSchedule": "online_merging.optim",
    "OnlineMergingAdam": "online_merging.optim",
    "OnlineMergingSGD": "online_merging.optim",
    **dict.fromkeys(_NEURONS, "online_merging.neurons"),
}


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
