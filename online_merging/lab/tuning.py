"""Tune on some replicates, score on others: levels, MRA per setting, the pick, and the interpolation check.

Trajectories are lists of (reward, ability) in evaluation order, the SFT point first. The functions are pure: they
take trajectories keyed by method, setting index and replicate, and never train.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from online_merging.evaluation.fronts import MRA_LEVELS, matched_reward_ability

__all__ = ["interpolation_error", "pick_settings", "reachable_levels", "replicate_spread"]

Trajectory = Sequence[Sequence[float]]
Grid = Mapping[str, Mapping[int, Mapping[str, Trajectory]]]  # method → setting index → replicate → trajectory


def reachable_levels(grids: Grid, replicate: str, levels: Sequence[float] = MRA_LEVELS) -> list[float]:
    """The tuning levels of a replicate: those that at least one setting of every method reaches, so that each
    method can be scored at all of them; a setting that misses one of them is not eligible."""
    tops = [max(float(r) for s in settings.values() for r, _ in s[replicate]) for settings in grids.values()]
    return [x for x in levels if all(top >= x for top in tops)]


def pick_settings(grids: Grid, replicates: Sequence[str], levels: Sequence[float] = MRA_LEVELS) -> dict[str, dict]:
    """Per method: ``{"best": index, "scores": [mean MRA over ``replicates`` or None per setting], "levels":
    {replicate: levels}}``. The best setting has the highest mean MRA over the replicates at their
    :func:`reachable_levels` (among ``levels``); a setting that misses a level on some replicate scores None. When
    no setting of a method is eligible, the one reaching the highest mean reward is taken (``"eligible": False``)."""
    levels = {r: reachable_levels(grids, r, levels) for r in replicates}
    picked = {}
    for name, settings in grids.items():
        scores = []
        for i in sorted(settings):
            found = [matched_reward_ability(settings[i][r], levels[r]) for r in replicates]
            scores.append(None if None in found else sum(found) / len(found))
        eligible = [i for i, s in enumerate(scores) if s is not None]
        if eligible:
            best = max(eligible, key=lambda i: scores[i])  # ties: the first in grid order
        else:
            best = max(range(len(scores)), key=lambda i: sum(max(r for r, _ in settings[i][x]) for x in replicates))
        picked[name] = {"best": best, "scores": scores, "levels": levels, "eligible": bool(eligible)}
    return picked


def interpolation_error(trajectory: Trajectory, levels: Sequence[float]) -> float | None:
    """|MRA from every evaluation − MRA from every other one| (the SFT point and the last kept): how much the
    linear reading between evaluations moves the score when their density halves. None when either misses a level.
    Compare it with :func:`replicate_spread`: below it, the evaluation density is not what decides."""
    coarse = list(trajectory[::2])
    if (len(trajectory) - 1) % 2:
        coarse.append(trajectory[-1])
    full, half = matched_reward_ability(trajectory, levels), matched_reward_ability(coarse, levels)
    return None if full is None or half is None else abs(full - half)


def replicate_spread(values: Sequence[float]) -> float:
    """The standard deviation of a score over replicates (0 for one replicate): the seed noise."""
    return statistics.stdev(values) if len(values) > 1 else 0.0
