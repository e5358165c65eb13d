"""Scoring the alignment tax: ability (lm-eval tasks) and reward (a reward model, or a proxy on preference pairs)
of checkpoints, reward/ability fronts and the ability kept at matched reward (MRA) of a trajectory.

Nothing here imports lm-eval, transformers or matplotlib until a function needs it."""

from online_merging.evaluation.ability import (
    PRIMARY_METRICS,
    TaskScore,
    ability_kept,
    ability_scores,
    check_tasks,
    kept_fractions,
    lm_eval_tokenizer,
)
from online_merging.evaluation.checkpoints import Checkpoint, Run, load_causal_lm, resolve_runs
from online_merging.evaluation.data import read_records
from online_merging.evaluation.fronts import (
    MRA_LEVELS,
    ability_at_reward,
    bootstrap_ci,
    common_levels,
    hypervolume,
    matched_reward_ability,
    pareto_front,
    trajectory_ability,
)
from online_merging.evaluation.plot import plot_front
from online_merging.evaluation.proxy import ProxyReward, completion_logprobs, pair_logprobs, preference_proxy
from online_merging.evaluation.reward import generate_responses, load_reward_model, reward_score, reward_scores
from online_merging.evaluation.runs import PROXY_NOTE, EvaluationPlan, evaluate_plan, format_table, plan_evaluation

__all__ = [
    "MRA_LEVELS",
    "PRIMARY_METRICS",
    "PROXY_NOTE",
    "Checkpoint",
    "EvaluationPlan",
    "ProxyReward",
    "Run",
    "TaskScore",
    "ability_at_reward",
    "ability_kept",
    "ability_scores",
    "bootstrap_ci",
    "check_tasks",
    "common_levels",
    "completion_logprobs",
    "evaluate_plan",
    "format_table",
    "generate_responses",
    "hypervolume",
    "kept_fractions",
    "lm_eval_tokenizer",
    "load_causal_lm",
    "load_reward_model",
    "matched_reward_ability",
    "pair_logprobs",
    "pareto_front",
    "plan_evaluation",
    "plot_front",
    "preference_proxy",
    "read_records",
    "resolve_runs",
    "reward_score",
    "reward_scores",
    "trajectory_ability",
]
