"""Reward/ability fronts: Pareto front, area under it (hypervolume against the origin), matched-reward ability
(MRA) of trajectories, bootstrap intervals. Both axes are "higher is better"."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence

__all__ = [
    "MRA_LEVELS",
    "RL_LEVELS",
    "ability_at_reward",
    "bootstrap_ci",
    "common_levels",
    "hypervolume",
    "matched_reward_ability",
    "pareto_front",
    "trajectory_ability",
]

Point = tuple[float, float]

MRA_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Reward levels at which a trajectory's ability is read (matched-reward ability)."""
RL_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
"""The levels of an RL run on a skill, whose reward axis is the share of the SFT model's errors removed
(``world.rewards.errors_removed``)."""


def pareto_front(points: Iterable[Sequence[float]]) -> list[Point]:
    """The non-dominated (reward, ability) points, by increasing reward (so decreasing ability)."""
    front: list[Point] = []
    for reward, ability in sorted(((float(r), float(a)) for r, a in points), key=lambda p: (-p[0], -p[1])):
        if not front or ability > front[-1][1]:
            front.append((reward, ability))
    return front[::-1]


def hypervolume(points: Iterable[Sequence[float]]) -> float:
    """Area of the region dominated by ``points`` within [0, ∞)², i.e. under the front's staircase; points with a
    negative coordinate add nothing."""
    area, previous = 0.0, 0.0
    for reward, ability in pareto_front((max(r, 0.0), max(a, 0.0)) for r, a in points):
        area += (reward - previous) * ability
        previous = reward
    return area


def ability_at_reward(points: Iterable[Sequence[float]], reward: float) -> float | None:
    """The best ability of a point with at least ``reward``; None when no point reaches it."""
    reached = [a for r, a in points if r >= reward]
    return max(reached) if reached else None


def trajectory_ability(trajectory: Sequence[Sequence[float]], reward: float) -> float | None:
    """The best ability on a trajectory's path at a reward of at least ``reward``; None when the path never gets
    there.

    ``trajectory`` is the run's (reward, ability) evaluations in order, the SFT point first; the path joins
    consecutive points by straight lines, and the best ability at reward ≥ r makes it monotone, as a front. So a
    point added on the path changes nothing, and neither does how densely the same path is sampled.
    """
    points = [(float(r), float(a)) for r, a in trajectory]
    best = max((a for r, a in points if r >= reward), default=None)
    for (r0, a0), (r1, a1) in itertools.pairwise(points):
        if min(r0, r1) < reward <= max(r0, r1):  # the segment crosses the level: the point where it does
            crossing = a0 + (a1 - a0) * (reward - r0) / (r1 - r0)
            best = crossing if best is None else max(best, crossing)
    return best


def common_levels(trajectories: Iterable[Sequence[Sequence[float]]], levels: Sequence[float] = MRA_LEVELS) -> list:
    """The ``levels`` that every trajectory reaches."""
    trajectories = list(trajectories)
    return [x for x in levels if all(max(float(r) for r, _ in t) >= x for t in trajectories)]


def matched_reward_ability(trajectory: Sequence[Sequence[float]], levels: Sequence[float]) -> float | None:
    """Matched-reward ability (MRA): the mean of :func:`trajectory_ability` over ``levels`` (usually
    :func:`common_levels` of the compared runs); None without levels, or when the trajectory misses one."""
    found = [trajectory_ability(trajectory, x) for x in levels]
    if not found or None in found:
        return None
    return sum(found) / len(found)


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = 4000, seed: int = 0) -> list[float]:
    """Percentile interval of the mean of ``values`` over resamples with replacement (one value: [v, v])."""
    if not values:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return [means[int(tail * (resamples - 1))], means[round((1 - tail) * (resamples - 1))]]
