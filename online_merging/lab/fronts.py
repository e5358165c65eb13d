"""Reward/ability fronts: Pareto front, area under it (hypervolume against the origin), matched-reward ability,
bootstrap intervals. Both axes are "higher is better"."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

__all__ = ["ability_at_reward", "bootstrap_ci", "hypervolume", "pareto_front"]

Point = tuple[float, float]


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


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = 4000, seed: int = 0) -> list[float]:
    """Percentile interval of the mean of ``values`` over resamples with replacement (one value: [v, v])."""
    if not values:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return [means[int(tail * (resamples - 1))], means[round((1 - tail) * (resamples - 1))]]
