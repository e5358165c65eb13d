"""Matched-reward ability (MRA): ability kept along a trajectory, read at matched reward levels."""

import itertools
import random

import pytest

from online_merging.evaluation import MRA_LEVELS, common_levels, matched_reward_ability, trajectory_ability


def _straight(start, end, n):
    """``n`` + 1 evenly spaced points on the segment from ``start`` to ``end``."""
    return [tuple(s + (e - s) * i / n for s, e in zip(start, end, strict=True)) for i in range(n + 1)]


def test_ability_is_read_on_the_segment_between_evaluations():
    trajectory = [(0.2, 1.0), (0.6, 0.8), (1.0, 0.4)]
    assert trajectory_ability(trajectory, 0.4) == pytest.approx(0.9)  # halfway between the first two points
    assert trajectory_ability(trajectory, 0.8) == pytest.approx(0.6)
    assert trajectory_ability(trajectory, 0.2) == pytest.approx(1.0)
    assert trajectory_ability(trajectory, 1.01) is None


def test_the_path_is_made_monotone_as_a_front():
    # the run overshoots in reward, then comes back with more ability: at 0.5 the later, better point counts
    trajectory = [(0.2, 1.0), (0.9, 0.3), (0.6, 0.7)]
    assert trajectory_ability(trajectory, 0.5) == pytest.approx(0.7)
    # between 0.6 and 0.9 the best is on the returning segment, above the first segment at the same reward
    assert trajectory_ability(trajectory, 0.75) == pytest.approx(0.5)


def test_adding_points_on_the_same_path_changes_nothing():
    rng = random.Random(0)
    coarse = [(0.2, 1.0), (0.5, 0.9), (0.7, 0.6), (0.95, 0.5)]
    fine = [coarse[0]]
    for start, end in itertools.pairwise(coarse):
        fine += _straight(start, end, rng.randint(2, 7))[1:]
    levels = common_levels([coarse, fine])
    assert levels == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert matched_reward_ability(fine, levels) == pytest.approx(matched_reward_ability(coarse, levels))


def test_a_front_above_another_scores_higher():
    lower = [(0.2, 1.0), (0.5, 0.8), (0.95, 0.3)]
    upper = [(r, a + 0.05) for r, a in lower]
    levels = common_levels([lower, upper])
    assert matched_reward_ability(upper, levels) == pytest.approx(matched_reward_ability(lower, levels) + 0.05)


def test_levels_are_those_every_run_reaches():
    short = [(0.2, 1.0), (0.55, 0.9)]
    long = [(0.2, 1.0), (0.95, 0.2)]
    assert common_levels([short, long]) == [0.3, 0.4, 0.5]
    assert common_levels([short, long], levels=(0.1, 0.6)) == [0.1]
    assert common_levels([], levels=MRA_LEVELS) == list(MRA_LEVELS)
    # a level the run misses has no ability: no MRA rather than a silent mean over fewer levels
    assert matched_reward_ability(short, [0.3, 0.9]) is None
    assert matched_reward_ability(short, []) is None


def test_mra_equals_a_dense_numerical_reading():
    rng = random.Random(1)
    trajectory = [(0.2, 1.0)] + [(rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0)) for _ in range(8)]
    dense = [p for a, b in itertools.pairwise(trajectory) for p in _straight(a, b, 2000)]
    for level in MRA_LEVELS:
        exact = trajectory_ability(trajectory, level)
        sampled = max((a for r, a in dense if r >= level), default=None)
        if exact is None:
            assert sampled is None
        else:
            assert sampled == pytest.approx(exact, abs=2e-3)
