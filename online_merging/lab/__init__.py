"""The alignment-tax lab: reward gained per ability lost, for every method, on the CPU, with plots.

    run_lab("out/", quick=True)        # results.json, results.md, PNG fronts in out/

Every method aligns the synthetic world's SFT model (DPO or KTO, the same step budget) or merges the AdamW result
with it; each is scored by the area under its reward/ability front, over model seeds and data orders.
"""

from online_merging.lab.fronts import (
    MRA_LEVELS,
    ability_at_reward,
    bootstrap_ci,
    common_levels,
    hypervolume,
    matched_reward_ability,
    pareto_front,
    trajectory_ability,
)
from online_merging.lab.lab import LabConfig, run_lab
from online_merging.lab.methods import METHODS

__all__ = [
    "METHODS",
    "MRA_LEVELS",
    "LabConfig",
    "ability_at_reward",
    "bootstrap_ci",
    "common_levels",
    "hypervolume",
    "matched_reward_ability",
    "pareto_front",
    "run_lab",
    "trajectory_ability",
]
