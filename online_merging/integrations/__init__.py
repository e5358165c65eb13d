"""Glue to training frameworks: HF Trainer and TRL (``build_optimizer``, ``trainer_optimizer``,
``use_online_merging_optimizer``), recipes and running them.

Importing this package does not import transformers or trl; its functions do, when called, and so does reading
``PairwiseNormalizedDPOTrainer`` (a ``trl.DPOTrainer`` subclass) or ``TaxEvalCallback`` (a ``TrainerCallback``).
"""

from online_merging.integrations.recipe import RecipeArguments, load_recipe
from online_merging.integrations.run import RunResult, run_recipe
from online_merging.integrations.trainer import (
    build_optimizer,
    decay_parameter_names,
    task_vector_for,
    trainer_optimizer,
    use_online_merging_optimizer,
)

__all__ = [
    "PairwiseNormalizedDPOTrainer",
    "RecipeArguments",
    "RunResult",
    "TaxEvalCallback",
    "build_optimizer",
    "decay_parameter_names",
    "load_recipe",
    "run_recipe",
    "task_vector_for",
    "trainer_optimizer",
    "use_online_merging_optimizer",
]


def __getattr__(name: str):
    if name == "PairwiseNormalizedDPOTrainer":
        from online_merging.integrations.normalized_dpo import PairwiseNormalizedDPOTrainer

        return PairwiseNormalizedDPOTrainer
    if name == "TaxEvalCallback":
        from online_merging.integrations.tax_eval import TaxEvalCallback

        return TaxEvalCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
