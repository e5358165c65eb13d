import dataclasses
import json
import time

import pytest

from online_merging.lab import LabConfig, ability_at_reward, bootstrap_ci, hypervolume, pareto_front, run_lab
from online_merging.lab.methods import ENTANGLEMENT_PROBED, METHODS, TRAINED
from online_merging.lab.runner import RunConfig, train_run
from online_merging.world import WorldConfig

REQUIRED = ("adamw", "ondare", "onties", "ondare_k10", "sgd_ondare", "ema", "childtuning", "ma", "ties", "dare", "hma")
REQUIRED += ("kto_adamw", "kto_ondare", "dpo_normalized", "dpo_normalized_ondare")


def test_pareto_front_drops_dominated_points_and_sorts_by_reward():
    points = [(0.9, 0.2), (0.1, 1.0), (0.5, 0.5), (0.4, 0.4), (0.5, 0.3), (0.1, 0.9)]
    assert pareto_front(points) == [(0.1, 1.0), (0.5, 0.5), (0.9, 0.2)]
    assert pareto_front([]) == []


@pytest.mark.parametrize(
    ("points", "area"),
    [
        ([(0.5, 0.5)], 0.25),
        ([(1.0, 1.0), (0.5, 0.5)], 1.0),  # the second is dominated
        ([(0.2, 1.0), (1.0, 0.5)], 0.2 * 1.0 + 0.8 * 0.5),
        ([(0.2, 1.0), (0.6, 0.7), (1.0, 0.5)], 0.2 + 0.4 * 0.7 + 0.4 * 0.5),
        ([(-0.3, 0.8), (0.5, -0.1)], 0.0),  # nothing in the positive quadrant
        ([], 0.0),
    ],
)
def test_hypervolume_of_known_fronts(points, area):
    assert hypervolume(points) == pytest.approx(area)


def test_hypervolume_is_the_area_under_a_fine_staircase():
    # many points on the line a = 1 - r approach the triangle's area 1/2 from below
    n = 1000
    area = hypervolume([(i / n, 1 - i / n) for i in range(n + 1)])
    assert 0.5 - 1 / n < area < 0.5


def test_ability_at_matched_reward():
    points = [(0.1, 1.0), (0.5, 0.7), (0.6, 0.8), (0.9, 0.3)]
    assert ability_at_reward(points, 0.5) == 0.8
    assert ability_at_reward(points, 0.85) == 0.3
    assert ability_at_reward(points, 0.95) is None


def test_bootstrap_interval():
    assert bootstrap_ci([0.4, 0.4, 0.4]) == pytest.approx([0.4, 0.4])
    low, high = bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5])
    assert low < 0.3 < high and low >= 0.1 and high <= 0.5
    assert bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5], level=0.5)[1] < high
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_every_method_of_the_issue_is_defined_with_a_sweep():
    assert set(REQUIRED) <= set(METHODS)
    for name, method in TRAINED.items():
        assert len(method.settings) >= 2, name
    with pytest.raises(ValueError, match="Invalid methods"):
        LabConfig(methods=("adamw", "nope"))


def _smoke_config(**overrides) -> LabConfig:
    world = WorldConfig.quick(n_preference_pairs=48, n_eval_probes=24)
    settings = dict(world=world, steps=2, eval_every=1, batch_size=8, lr=1e-3, hma_steps=1)
    return LabConfig.quick(**{**settings, **overrides})


def test_lab_smoke_end_to_end(world_cache, tmp_path):
    """Every method trains or merges and yields points; the files exist; a rerun comes from the cache."""
    out = tmp_path / "lab"
    results = run_lab(out, config=_smoke_config(), workers=2, progress=False)
    for name in ("results.json", "results.md", "fronts.png", "fronts_per_seed.png", "adamw_front.png", "skills.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == set(METHODS)
    for name, m in saved["methods"].items():
        assert len(m["points"]) >= 2, name  # the SFT point and at least one of the method's own
        assert all(len(p) == 2 for p in m["points"])
        assert 0 < m["area"] <= 1.5 and m["area_ci"][0] <= m["area"] <= m["area_ci"][1], name
        assert m["points"][0] == [saved["methods"]["adamw"]["points"][0][0], 1.0]  # every front starts at SFT
    trained = saved["methods"]["adamw"]["per_seed"]["seed0/order0"]["points"]
    assert [p["step"] for p in trained] == [0, 1, 2]
    assert "| `ondare` |" in (out / "results.md").read_text()
    # the entanglement probe: a trajectory per probed method, from step 0, in the table and the plot
    assert list(saved["entanglement"]) == list(ENTANGLEMENT_PROBED)
    for name, e in saved["entanglement"].items():
        (trajectory,) = e["per_seed"].values()
        assert [p["step"] for p in trajectory] == [0, 1, 2], name
        assert -1 <= e["cosine"] <= 1 and 0 <= e["warned_intervals"] <= 1
    assert "| `dpo_normalized` |" in (out / "results.md").read_text().split("Gradient entanglement")[1]
    assert (out / "entanglement.png").stat().st_size > 0
    start = time.perf_counter()
    again = run_lab(tmp_path / "again", config=_smoke_config(), workers=1, progress=False)
    assert time.perf_counter() - start < 30
    assert again["methods"]["ondare"]["area"] == results["methods"]["ondare"]["area"]


def test_the_entanglement_probe_does_not_change_training(world_cache):
    config = _smoke_config()
    run = config.run_config(0, 0, {}, probe_entanglement=True)
    probed, plain = train_run(run), train_run(dataclasses.replace(run, probe_entanglement=False))
    assert "entanglement" in probed and "entanglement" not in plain
    assert probed["points"] == plain["points"]
    assert RunConfig(world=config.world).key() == RunConfig(world=config.world, pairwise_normalized=False).key()
