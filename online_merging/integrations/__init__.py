"""Glue to training frameworks: HF Trainer and TRL (``build_optimizer``), recipes and running them.

Importing this package does not import transformers or trl; its functions do, when called.
"""

from online_merging.integrations.recipe import RecipeArguments, load_recipe
from online_merging.integrations.run import RunResult, run_recipe
from online_merging.integrations.trainer import build_optimizer, decay_parameter_names, task_vector_for

__all__ = [
    "RecipeArguments",
    "RunResult",
    "build_optimizer",
    "decay_parameter_names",
    "load_recipe",
    "run_recipe",
    "task_vector_for",
]
