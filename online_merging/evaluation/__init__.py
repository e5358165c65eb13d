"""Scoring the alignment tax: reward/ability fronts and the ability kept at matched reward (MRA) of a trajectory."""

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

__all__ = [
    "MRA_LEVELS",
    "ability_at_reward",
    "bootstrap_ci",
    "common_levels",
    "hypervolume",
    "matched_reward_ability",
    "pareto_front",
    "trajectory_ability",
]
