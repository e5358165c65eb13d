import dataclasses
import hashlib
import json
import random

import pytest

from online_merging.cli import main
from online_merging.evaluation import ability_at_reward, bootstrap_ci, hypervolume, pareto_front
from online_merging.lab import LabConfig, run_lab, runner
from online_merging.lab import lab as lab_module
from online_merging.lab.explore import CENTRE, FACTORS, ONTIES_CENTRE, first_stage, second_stage
from online_merging.lab.methods import GRID_SIZE, MA_WEIGHTS, METHODS, ONLINE_MERGING, RL_METHODS, run_overrides
from online_merging.lab.report import _markdown as report_markdown
from online_merging.lab.report import kept, summarize, write_report
from online_merging.lab.runner import RunConfig, train_run
from online_merging.lab.tuning import interpolation_error, pick_settings, reachable_levels
from online_merging.world import WorldConfig

REQUIRED = ("adamw", "ema", "bema", "ma", "kl_beta", "rpo", "tr_dpo", "ondare", "onties", "allo_mask_k15")
REQUIRED += ("kto_adamw", "kto_ondare", "onties_ma", "rpo_ma", "rpo_onties", "rpo_onties_ma", "pull", "onties_pull")
REQUIRED += ("onties_pull_ma",)
STACKS = {"onties_ma": "onties", "rpo_ma": "rpo", "rpo_onties_ma": "rpo_onties", "onties_pull_ma": "onties_pull"}
NEW_FIELDS = ("setting", "mra", "mra_ci", "mra_vs_adamw", "mra_vs_adamw_ci", "wins", "per_replicate")


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


def test_ability_at_matched_reward():
    points = [(0.1, 1.0), (0.5, 0.7), (0.6, 0.8), (0.9, 0.3)]
    assert ability_at_reward(points, 0.5) == 0.8
    assert ability_at_reward(points, 0.95) is None


def test_bootstrap_interval():
    assert bootstrap_ci([0.4, 0.4, 0.4]) == pytest.approx([0.4, 0.4])
    low, high = bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5])
    assert low < 0.3 < high and low >= 0.1 and high <= 0.5
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_every_method_has_a_grid_of_the_same_size():
    assert set(REQUIRED) <= set(METHODS)
    for name, method in METHODS.items():
        assert len(method.grid) == GRID_SIZE <= 6, name
        assert len({json.dumps(s, sort_keys=True) for s in method.grid}) == GRID_SIZE, name  # no repeats
    assert [s["lr"] for s in METHODS["adamw"].grid] == sorted({s["lr"] for s in METHODS["adamw"].grid}, key=[
        s["lr"] for s in METHODS["adamw"].grid].index)  # fmt: skip
    with pytest.raises(ValueError, match="Invalid methods"):
        LabConfig(methods=("adamw", "nope"))


def test_averages_and_merges_read_the_adamw_run_that_tracks_them():
    for name in ("ema", "bema", "ma"):
        for setting in METHODS[name].grid:
            overrides = run_overrides(setting)
            assert overrides.get("save_model") and "variant" not in overrides and "merge_weights" not in overrides
            adamw = run_overrides({"lr": setting["lr"]})
            if "variant" in setting:  # the same run as AdamW's at that lr: the average costs no training
                assert overrides == adamw
                config = LabConfig().run_config(0, 0, overrides)
                assert setting["variant"] in {f"ema={c:g}" for c in config.ema} | {
                    "bema:" + ",".join(f"{k}={v:g}" for k, v in b) for b in config.bema}  # fmt: skip
    # a method with other overrides is not an AdamW run
    assert "save_model" not in run_overrides(METHODS["ondare"].grid[0])


def test_a_stack_sweeps_the_model_of_its_rows_run():
    for stack, row in STACKS.items():
        assert [{k: v for k, v in s.items() if k != "merge_weights"} for s in METHODS[stack].grid] == list(
            METHODS[row].grid), stack  # fmt: skip
        for setting in METHODS[stack].grid:
            assert setting["merge_weights"] == MA_WEIGHTS
            plain = {k: v for k, v in setting.items() if k != "merge_weights"}
            assert run_overrides(setting) == run_overrides(plain) | {"save_model": True}, stack
            run, merge = LabConfig().source(2, 0, setting)
            assert merge is not None and merge.run == run and run.save_model
    assert {"onties_ma", "rpo_onties", "rpo_onties_ma", "pull", "onties_pull", "onties_pull_ma"} <= set(ONLINE_MERGING)
    assert not {"ma", "rpo_ma", "allo_mask_k15", "kto_ondare"} & set(ONLINE_MERGING)
    for setting in METHODS["rpo_onties"].grid:
        assert setting["merge"] == "onties" and setting["reserve_p"] == 0.1 and setting["rpo_weight"] in (0.3, 1.0)
    for name in ("pull", "onties_pull"):
        run = LabConfig().run_config(0, 0, run_overrides(METHODS[name].grid[0]))
        assert run.optimizer == "adam" and run.pull > 0 and (run.pull_unit, run.pull_elements) == ("lr", "all")


def test_the_second_world_differs_in_size_and_reward_share_and_is_never_tuned_on():
    config = LabConfig()
    default, second = config.test_world("default", 2), config.test_world("second", 2)
    assert default == dataclasses.replace(WorldConfig(), seed=2)
    changed = {k for k, v in second.to_dict().items() if v != default.to_dict()[k]}
    assert changed == {"hidden_size", "intermediate_size", "sure_fraction"}
    assert (second.hidden_size, second.intermediate_size, second.sure_fraction) == (96, 288, 0.3)
    assert {w for w, _, _ in config.tuning_replicates()} == {"default"}
    assert config.test_replicates() == [(w, s, o) for w in ("default", "second") for s in (2, 3, 4) for o in (0, 1)]
    assert config.run_config(3, 1, {}, "second").world == config.test_world("second", 3)
    quick = LabConfig.quick().test_world("second", 1)  # made from the plan's world: as small as its first
    assert quick.num_layers == LabConfig.quick().world.num_layers and quick.hidden_size == 96
    assert config.with_settings(["test_worlds=default"]).test_replicates()[-1] == ("default", 4, 1)
    with pytest.raises(ValueError, match="Invalid test_worlds"):
        LabConfig(test_worlds=("default", "third"))


def test_a_run_and_its_stacks_run_share_one_training(monkeypatch):
    trained, merged = [], []
    monkeypatch.setattr(lab_module, "_build", lambda world: {"reward": 0.1})
    monkeypatch.setattr(lab_module, "_init_worker", lambda: None)
    monkeypatch.setattr(runner, "train_run", lambda run: trained.append(run) or {"points": [run.save_model]})
    monkeypatch.setattr(runner, "evaluate_merges", lambda job: merged.append(job) or {"points": []})
    config = LabConfig(world=WorldConfig.quick())
    jobs = [config.source(0, 0, METHODS[name].grid[0]) for name in ("onties", "onties_ma", "rpo")]
    _, runs, merges = lab_module._execute(jobs, workers=1, progress=False)
    assert [run.save_model for run in trained] == [True, False] and list(merges) == [merged[0].key()]
    assert runs[jobs[0][0].key()] == runs[jobs[1][0].key()] == {"points": [True]}  # onties reads onties_ma's run


# -- tuning: a pure function of made-up trajectories ----------------------------------------------------------------


def _line(top: float, slope: float) -> list[tuple[float, float]]:
    """From SFT (0.1, 1.0) straight to reward ``top`` losing ``slope`` ability per unit of reward."""
    return [(0.1, 1.0), (top, 1.0 - slope * (top - 0.1))]


def test_tuning_picks_the_best_setting_of_a_made_up_table():
    replicates = ["a", "b"]
    grids = {
        "adamw": {0: dict.fromkeys(replicates, _line(0.95, 0.6)), 1: dict.fromkeys(replicates, _line(0.95, 0.5))},
        "other": {
            0: {"a": _line(0.95, 0.2), "b": _line(0.95, 0.9)},  # mean slope 0.55
            1: {"a": _line(0.95, 0.4), "b": _line(0.95, 0.4)},  # 0.4: the best on average
            2: {"a": _line(0.95, 0.1), "b": _line(0.6, 0.1)},  # the best where it goes, but misses levels on b
        },
    }
    picked = pick_settings(grids, replicates)
    assert picked["adamw"]["best"] == 1
    assert picked["other"]["best"] == 1
    assert picked["other"]["scores"][2] is None and picked["other"]["scores"][1] > picked["other"]["scores"][0]
    assert picked["other"]["levels"] == {"a": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]} | {"b": [0.3, 0.4, 0.5, 0.6, 0.7,
                                                                                          0.8, 0.9]}  # fmt: skip


def test_tuning_levels_are_those_every_method_can_reach():
    grids = {
        "fast": {0: {"a": _line(0.95, 0.5)}},
        "slow": {0: {"a": _line(0.55, 0.5)}, 1: {"a": _line(0.75, 0.5)}},  # its best setting reaches 0.75
    }
    assert reachable_levels(grids, "a") == [0.3, 0.4, 0.5, 0.6, 0.7]
    picked = pick_settings(grids, ["a"])
    assert picked["slow"]["best"] == 1 and picked["slow"]["scores"][0] is None
    # no eligible setting at all: the one that goes furthest
    nowhere = {"adamw": {0: {"a": _line(0.95, 0.5)}}, "stuck": {0: {"a": _line(0.2, 0.0)}, 1: {"a": _line(0.25, 0)}}}
    picked = pick_settings(nowhere, ["a"], levels=(0.3, 0.5))
    assert picked["stuck"]["eligible"] is False and picked["stuck"]["best"] == 1


def test_interpolation_error_is_zero_on_a_straight_path_and_not_on_a_bent_one():
    straight = [(0.1 + 0.1 * i, 1.0 - 0.1 * i) for i in range(9)]
    assert interpolation_error(straight, [0.3, 0.5, 0.7]) == pytest.approx(0.0)
    bent = [(0.1, 1.0), (0.2, 0.99), (0.5, 0.5), (0.8, 0.49), (0.9, 0.1)]
    # every other point: (0.1, 1.0), (0.5, 0.5), (0.9, 0.1) — at 0.3 the path read 0.827 becomes 0.75
    assert interpolation_error(bent, [0.3]) == pytest.approx(abs((0.99 - 0.49 / 3) - 0.75))


# -- the report on made-up test trajectories ------------------------------------------------------------------------


def _points(trajectory):
    return [{"reward": r, "ability": a, "reward_greedy": r, "ability_greedy": a, "skills": {}} for r, a in trajectory]


def test_report_scores_mra_at_levels_common_to_the_compared_methods(tmp_path):
    config = LabConfig(
        seeds=(2,), data_orders=(0, 1), methods=("adamw", "ondare", "kto_adamw"), test_worlds=("default",)
    )
    reps = ["seed2/order0", "seed2/order1"]
    found = {
        "adamw": {r: _points(_line(0.95, 0.5)) for r in reps},
        "ondare": {reps[0]: _points(_line(0.85, 0.4)), reps[1]: _points(_line(0.95, 0.6))},
        "kto_adamw": {r: _points(_line(0.65, 0.1)) for r in reps},  # secondary: it does not cut the levels
    }
    settings = {"adamw": {"lr": 1.0}, "ondare": METHODS["ondare"].grid[1], "kto_adamw": {"trainer": "kto"}}
    results = summarize(config, {"default": found}, settings)
    table = results["worlds"]["default"]
    assert table["levels"] == {reps[0]: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], reps[1]: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                                                                                 0.9]}  # fmt: skip
    ondare, adamw = table["methods"]["ondare"], table["methods"]["adamw"]
    mean_reward = {reps[0]: sum((0.3, 0.4, 0.5, 0.6, 0.7, 0.8)) / 6, reps[1]: 0.6}
    expected = {r: 1 - s * (mean_reward[r] - 0.1) for r, s in zip(reps, (0.4, 0.6), strict=True)}
    assert ondare["per_replicate"][reps[0]]["mra"] == pytest.approx(expected[reps[0]])
    assert ondare["mra"] == pytest.approx(sum(expected.values()) / 2)
    diffs = [expected[r] - (1 - 0.5 * (mean_reward[r] - 0.1)) for r in reps]
    assert ondare["mra_vs_adamw"] == pytest.approx(sum(diffs) / 2) and ondare["wins"] == 1
    assert adamw["mra_vs_adamw"] is None and adamw["wins"] is None
    assert table["methods"]["kto_adamw"]["mra"] is None  # it misses the levels the main table reaches
    recommended = results["recommended"]  # the one candidate, though it does not hold (it loses on order1)
    assert recommended["method"] == "ondare" and recommended["setting"] == METHODS["ondare"].grid[1]
    assert recommended["holds"] is False and recommended["worst"] == pytest.approx(ondare["mra_vs_adamw"])
    assert results["online_vs_ma"] is None  # no ma row
    write_report(results, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    for name in found:
        assert set(NEW_FIELDS) <= set(saved["worlds"]["default"]["methods"][name]), name
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| `ondare` |" in table and "Secondary (KTO)" in table and "not reached" in table
    assert (tmp_path / "out" / "fronts.png").stat().st_size > 0
    assert lab_module.read_tuned(tmp_path / "out" / "tuned.json") == settings


def test_the_recommended_pipeline_holds_on_both_worlds():
    """The best row by its smaller Δ vs AdamW over the worlds, among those above 0 on both; the best pipeline with an
    online merge against MA alone."""
    config = LabConfig(seeds=(2, 3, 4), data_orders=(0,), methods=("adamw", "ma", "onties", "onties_ma", "ema"))
    reps = ["seed2/order0", "seed3/order0", "seed4/order0"]

    def rows(slopes: dict) -> dict:  # per method one slope per replicate (less is better)
        return {name: {r: _points(_line(0.95, s + 0.01 * i)) for i, r in enumerate(reps)} for name, s in
                slopes.items()}  # fmt: skip

    found = {
        "default": rows({"adamw": 0.5, "ma": 0.4, "onties": 0.45, "onties_ma": 0.3, "ema": 0.2}),
        "second": rows({"adamw": 0.5, "ma": 0.4, "onties": 0.45, "onties_ma": 0.35, "ema": 0.55}),  # ema fails here
    }
    settings = {name: METHODS[name].grid[0] for name in config.methods}
    results = summarize(config, found, settings)
    best = results["recommended"]
    assert best["method"] == "onties_ma" and best["holds"] and best["setting"] == METHODS["onties_ma"].grid[0]
    assert best["worst"] == pytest.approx(0.15 * 0.5)  # Δ slope 0.15 on the second world × (mean level − 0.1)
    assert best["worlds"]["default"]["wins"] == 3 and best["worlds"]["second"]["replicates"] == 3
    versus_ma = results["online_vs_ma"]
    assert versus_ma["method"] == "onties_ma" and versus_ma["versus"] == "ma" and versus_ma["holds"]
    assert versus_ma["worlds"]["second"]["mean"] == pytest.approx(0.05 * 0.5)
    text = report_markdown(results)
    assert "## World `second` (hidden 96, 3 layers, 30% of the SFT targets rewarded)" in text
    assert (
        "Recommended pipeline" in text and "Best pipeline with an online merge, against MA alone: `onties_ma`" in text
    )


# -- --tuned: write, read, run ----------------------------------------------------------------------------------------


def test_tuned_file_round_trip_and_its_errors(tmp_path):
    settings = {name: METHODS[name].grid[-1] for name in ("adamw", "ema", "ma", "onties")}
    path = tmp_path / "tuned.json"
    lab_module.write_tuned(path, settings)
    assert lab_module.read_tuned(path) == settings  # tuples come back as tuples

    def bad(data, match):
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(ValueError, match=match):
            lab_module.read_tuned(path)

    form = lab_module.TUNED_FORMAT
    bad("{", "not JSON")
    bad({"methods": {}}, "expected")
    bad({"format": form, "methods": {"nope": {}}}, r"methods\.nope: unknown method")
    bad({"format": form, "methods": {"adamw": {"lrr": 1.0}}}, r"methods\.adamw\.lrr: not a setting")
    bad({"format": form, "methods": {"ema": {"lr": 1.0, "variant": "ema=0.7"}}}, r"methods\.ema\.variant")
    bad({"format": form, "methods": {}}, "no methods")
    with pytest.raises(ValueError, match=r"missing\.json"):
        lab_module.read_tuned(tmp_path / "missing.json")


def test_tuned_runs_the_given_settings_on_the_test_replicates_without_tuning(tmp_path, monkeypatch):
    seen = []

    def fake_trajectories(config, settings, replicates, workers, progress):
        seen.append((dict(settings), list(replicates)))
        worlds = dict.fromkeys(w for w, _, _ in replicates)
        return {w: {name: {f"seed{s}/order{o}": _points(_line(0.95, 0.5)) for _, s, o in replicates}
                    for name in settings} for w in worlds}  # fmt: skip

    monkeypatch.setattr(lab_module, "_trajectories", fake_trajectories)
    monkeypatch.setattr(lab_module, "tune", lambda *a, **k: pytest.fail("--tuned must not tune"))
    settings = {"adamw": {"lr": 2.0}, "ondare": METHODS["ondare"].grid[4]}
    lab_module.write_tuned(tmp_path / "tuned.json", settings)
    out = tmp_path / "out"
    code = main(["bench", "tax-lab", "--tuned", str(tmp_path / "tuned.json"), "--seeds", "0,1", "--data-orders", "3",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    assert seen == [(settings, [("default", 0, 3), ("default", 1, 3), ("second", 0, 3), ("second", 1, 3)])]
    assert lab_module.read_tuned(out / "tuned.json") == settings  # written back, readable again
    saved = json.loads((out / "results.json").read_text())
    assert saved["worlds"]["second"]["methods"]["ondare"]["setting"]["alpha"] == 3.0


def test_quick_mode_is_a_smoke_test_that_recommends_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    slopes = {"adamw": 0.5, "ondare": 0.3}  # OnDARE keeps more ability: a full run recommends it

    def fake_trajectories(config, settings, replicates, workers, progress):
        worlds = dict.fromkeys(w for w, _, _ in replicates)
        return {w: {name: {f"seed{s}/order{o}": _points(_line(0.95, slopes[name])) for _, s, o in replicates}
                    for name in settings} for w in worlds}  # fmt: skip

    monkeypatch.setattr(lab_module, "_trajectories", fake_trajectories)
    lab_module.write_tuned(tmp_path / "tuned.json", {"adamw": {"lr": 1.0}, "ondare": METHODS["ondare"].grid[0]})
    notice = "quick mode is a smoke test of the pipeline: its numbers recommend nothing"
    for mode, flags in (("quick", ["--quick"]), ("full", ["--seeds", "2", "--data-orders", "0"])):
        out = tmp_path / mode
        assert main(["bench", "tax-lab", *flags, "--tuned", str(tmp_path / "tuned.json"), "--out", str(out)]) == 0
        saved, text = json.loads((out / "results.json").read_text()), (out / "results.md").read_text()
        printed = capsys.readouterr().out
        assert saved["mode"] == mode and saved["smoke_test"] == (mode == "quick")
        if mode == "quick":
            assert saved["recommended"] is None and saved["online_vs_ma"] is None and notice in saved["note"]
            assert f"**Q{notice[1:]}" in text and "Recommended pipeline" not in text and notice in printed
        else:
            assert saved["recommended"]["method"] == "ondare" and saved["note"] is None
            assert "Recommended pipeline" in text and notice not in text and notice not in printed


def test_bad_tuned_file_is_one_line_naming_the_file_and_key(tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": lab_module.TUNED_FORMAT, "methods": {"adamw": {"speed": 1}}}))
    assert main(["bench", "tax-lab", "--tuned", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "methods.adamw.speed" in err


def test_test_replicates_must_not_be_tuning_replicates():
    with pytest.raises(ValueError, match="seed0/order0 are tuning replicates"):
        lab_module._check_split(LabConfig(seeds=(0, 2)))


# -- the exploration's plan -------------------------------------------------------------------------------------------


def test_exploration_varies_one_factor_at_a_time_then_combines_the_best():
    rows = first_stage()
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    for name, (factor, setting) in rows.items():
        if factor in FACTORS:
            assert {k for k in setting if setting[k] != CENTRE.get(k, defaults[k])} == {factor}, name
    other_values = {f"{f}={v}" for f, values in FACTORS.items() for v in values if v != CENTRE.get(f, defaults[f])}
    assert {name for name, (factor, _) in rows.items() if factor in FACTORS} == other_values  # none is the centre
    assert rows["update sparsification alone (α = 0)"][1]["alpha"] == 0.0
    assert rows["τ term alone (p = 1)"][1]["reserve_p"] == 1.0
    pulls = {name: setting for name, (_, setting) in rows.items() if "pull" in setting}
    assert {s["pull"] for s in pulls.values() if s.get("merge") == "onties"} == {50.0, 150.0, 500.0}
    assert {s.get("pull_elements", "all") for s in pulls.values()} == {"all", "kept", "consensus"}
    for setting in pulls.values():
        base = ONTIES_CENTRE if setting.get("merge") == "onties" else {"optimizer": "adam", "merge": None, "lr": 1.0}
        assert {k for k in setting if setting[k] != base.get(k)} <= {"pull", "pull_elements"}
    scores = dict.fromkeys(rows, 0.5) | {"alpha=10.0": 0.6, "alpha=30.0": 0.55, "tau_mask=every_step": 0.58}
    scores |= {"merge_every=5": 0.52, "reserve_p=0.1": 0.4}
    stage2 = second_stage(scores, rows)
    settings = list(stage2.values())
    assert {**CENTRE, "alpha": 10.0, "tau_mask": "every_step", "merge_every": 5} in settings  # all the best values
    assert {**CENTRE, "alpha": 10.0, "tau_mask": "every_step"} in settings  # the top pair
    assert {**CENTRE, "alpha": 10.0, "merge_every": 5} in settings
    assert len(settings) == 3
    assert second_stage(dict.fromkeys(rows, 0.5), rows) == {}  # nothing beats the centre: no second stage


# -- end to end on a tiny world ---------------------------------------------------------------------------------------


def _smoke_config(**overrides) -> LabConfig:
    world = WorldConfig.quick(n_preference_pairs=48, n_eval_probes=24)
    settings = dict(world=world, steps=2, eval_every=1, batch_size=8, lr=1e-3, seeds=(0,), data_orders=(1,),
                    levels=(0.003, 0.005))  # fmt: skip
    return LabConfig.quick(**{**settings, **overrides})


@pytest.mark.slow
def test_lab_smoke_end_to_end(world_cache, tmp_path, capfd):
    """Tune on the default world → test on both worlds, tiny: every method yields a trajectory from SFT, a stack
    its sweep; files exist; the jobs print nothing; the rerun is cached."""
    out = tmp_path / "lab"
    results = run_lab(out, config=_smoke_config(), workers=2, progress=False)
    assert "train_runtime" not in capfd.readouterr().out  # Trainer's PrinterCallback, removed from the lab's runs
    for name in ("results.json", "results.md", "tuned.json", "fronts.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["worlds"]) == ["default", "second"]
    assert saved["worlds"]["second"]["world"]["sure_fraction"] == 0.3
    for table in saved["worlds"].values():
        assert set(table["methods"]) == {name for name, m in METHODS.items() if not (m.adapters or m.online_rl)}
        for name, m in table["methods"].items():
            assert set(NEW_FIELDS) <= set(m), name
            (points,) = [p["points"] for p in m["per_replicate"].values()]
            assert points[0]["ability"] == 1.0 and points[0]["step"] == 0, name  # the SFT point first
            assert len(points) == (11 if "merge_weights" in METHODS[name].grid[0] else 3), name
            picked = METHODS[name].grid[saved["tuning"][name]["best"]]
            assert m["setting"] == saved["settings"][name] == json.loads(json.dumps(picked)), name
            assert len(saved["tuning"][name]["scores"]) == 2, name
        for name in ("ma", "onties_ma"):
            assert [p["weight"] for p in table["methods"][name]["per_replicate"]["seed0/order1"]["points"][1:]] == [
                0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # fmt: skip
        # the BEMA trajectory is the callback's weights, not the model's
        bema, adamw = (table["methods"][n]["per_replicate"]["seed0/order1"]["points"] for n in ("bema", "adamw"))
        assert bema[1]["ability"] != adamw[1]["ability"]
        # OnTIES → MA ends at the OnTIES model: the same run
        onties, stack = (table["methods"][n] for n in ("onties", "onties_ma"))
        if onties["setting"] == {k: v for k, v in stack["setting"].items() if k != "merge_weights"}:
            assert onties["per_replicate"]["seed0/order1"]["points"][-1]["reward"] == stack["per_replicate"][
                "seed0/order1"]["points"][-1]["reward"]  # fmt: skip
    assert saved["recommended"] is None or saved["recommended"]["method"] in METHODS
    assert "## World `second`" in (out / "results.md").read_text()
    again = run_lab(tmp_path / "again", config=_smoke_config(), workers=1, progress=False, tuned=out / "tuned.json")
    for world in ("default", "second"):
        for name in ("ondare", "onties_ma"):
            assert again["worlds"][world]["methods"][name]["per_replicate"] == results["worlds"][world]["methods"][
                name]["per_replicate"]  # fmt: skip


def test_new_run_fields_reach_the_optimizer_and_keep_old_keys(world_cache):
    config = _smoke_config()
    run = config.run_config(0, 0, {"optimizer": "adam", "merge": "ondare", "reserve_p": 0.5, "alpha": 0.01})
    # fields added since the first edition enter the key only when changed: unchanged configs keep their keys
    plain = RunConfig(world=config.world)
    later = ("pairwise_normalized", "probe_entanglement", "neuron_k", "unlearn_steps", "noisy_token_percentile")
    later += ("seed", "dare_rescale", "tau_mask", "tau_clamp", "ties_sign", "bema", "rpo_weight", "ref_sync_alpha")
    later += ("ref_sync_steps", "pull", "pull_unit", "pull_elements", "lora_r", "rl_skill", "num_generations")
    later += ("max_completion_length", "temperature")
    fields = {k: v for k, v in dataclasses.asdict(plain).items() if k not in later}
    text = json.dumps({"version": runner.LAB_VERSION, **fields}, sort_keys=True)
    assert plain.key() == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert run.key() != dataclasses.replace(run, tau_mask="every_step").key()
    pulled = dataclasses.replace(run, pull=50.0)
    assert run.key() != pulled.key() != dataclasses.replace(pulled, pull_elements="kept").key()
    once, every = train_run(run), train_run(dataclasses.replace(run, tau_mask="every_step"))
    assert once["points"] != every["points"]  # the option reaches the optimizer
    assert train_run(pulled)["points"] != once["points"]  # and so does the pull


@pytest.mark.slow
def test_exploration_smoke_end_to_end(world_cache, tmp_path, monkeypatch):
    """Both stages run on the tuning replicate and write their table; the second stage comes from the first."""
    from online_merging.lab import explore

    chosen = {}

    def one_combination(scores, rows):  # whatever the tiny world scores, a second stage of one combination
        chosen.update(scores)
        return {"combination": {**CENTRE, "alpha": 10.0, "tau_mask": "every_step"}}

    monkeypatch.setattr(explore, "second_stage", one_combination)
    config = _smoke_config(lr=5e-4)  # pull 500 in lr units at lr ×3: 0.75 per step, at most 1
    results = explore.run_exploration(tmp_path / "explore", config=config, workers=2, progress=False)
    rows = {row["row"]: row for row in results["rows"]}
    assert set(chosen) == set(first_stage()) and rows["combination"]["stage"] == 2
    assert set(rows) == set(first_stage()) | {"combination"}
    assert results["replicates"] == ["seed0/order0"]
    for row in rows.values():
        assert {"mra", "hypervolume", "mra_vs_adamw", "per_replicate"} <= set(row)
    # α = 0 is the same run whichever row asks for it
    assert rows["alpha=0.0"]["per_replicate"] == rows["update sparsification alone (α = 0)"]["per_replicate"]
    assert "| τ term alone (p = 1) |" in (tmp_path / "explore" / "explore.md").read_text()


def test_explore_refuses_options_it_does_not_use(tmp_path, capsys):
    assert main(["bench", "tax-lab", "--explore", "--seeds", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--explore runs its own rows on the tuning replicates" in capsys.readouterr().err


def test_lora_rows_train_adapters_and_report_them_apart(world_cache, tmp_path):
    """The LoRA rows run when named: their runs train adapters (the merged model is saved, so lora_ma sweeps it and
    ends where lora_adamw ends), OnTIES's base weights move, and they get their own table, out of the verdicts."""
    out = tmp_path / "lab"
    config = _smoke_config(methods=("adamw", "lora_adamw", "lora_onties", "lora_ma"), test_worlds=("default",))
    assert "lora_adamw" not in LabConfig().methods  # not in the full plan unless named
    results = run_lab(out, config=config, workers=2, progress=False)
    table = results["worlds"]["default"]["methods"]
    lora = ("lora_adamw", "lora_onties", "lora_ma")
    assert all(table[name]["adapters"] and table[name]["secondary"] for name in lora)
    (adamw,) = table["lora_adamw"]["per_replicate"].values()
    (stack,) = table["lora_ma"]["per_replicate"].values()
    if table["lora_ma"]["setting"]["lr"] == table["lora_adamw"]["setting"]["lr"]:
        assert stack["points"][-1]["reward"] == adamw["points"][-1]["reward"]  # the sweep ends at the run's model
    (onties,) = table["lora_onties"]["per_replicate"].values()
    assert onties["points"][-1] != adamw["points"][-1]
    text = (out / "results.md").read_text()
    assert "### LoRA adapters" in text and "`lora_onties`" in text.split("### LoRA adapters")[1]
    assert results["recommended"] is None and results["adapters"] is None  # a smoke test


# -- the RL plan ------------------------------------------------------------------------------------------------------


def test_the_rl_plan_runs_its_own_rows_only():
    assert set(LabConfig.rl().methods) == set(RL_METHODS) and LabConfig.rl().trainer == "grpo"
    assert not set(LabConfig().methods) & {name for name, m in METHODS.items() if m.online_rl}
    with pytest.raises(ValueError, match=r"Invalid methods: \['grpo_kl'\] are not rows of this plan"):
        LabConfig(methods=("adamw", "grpo_kl"))
    with pytest.raises(ValueError, match=r"Invalid methods: \['rpo'\] are not rows of this plan: the RL plan's"):
        LabConfig.rl(methods=("adamw", "rpo"))
    with pytest.raises(ValueError, match="Invalid rl_skill: 'facts' with trainer 'dpo'"):
        LabConfig(rl_skill="facts")
    config = LabConfig.rl()
    assert config.run_config(0, 0, {"trainer": "rloo", "lr": 2.0}).trainer == "rloo"
    run = config.run_config(0, 0, {"beta": 0.1})
    assert (run.trainer, run.beta, run.rl_skill, run.lr) == ("grpo", 0.1, "translation", 1e-4)
    assert config.run_config(0, 0, {}).beta == 0.0  # GRPO's default: no KL
    with pytest.raises(ValueError, match="Invalid batch_size: 12"):
        runner._check(dataclasses.replace(run, batch_size=12))
    with pytest.raises(ValueError, match="Invalid rl_skill: '' with trainer 'grpo'"):
        runner._check(dataclasses.replace(run, rl_skill=""))


def test_rl_points_score_the_skill_as_errors_removed_and_the_other_skills_as_ability():
    rng = random.Random(0)
    skills = ("addition", "facts", "reversal", "translation")
    sft, now = ({f"ability{g}/{s}": rng.random() for s in skills for g in ("", "_greedy")} for _ in range(2))
    for metrics in (sft, now):
        metrics |= {"reward": rng.random(), "reward_greedy": rng.random(), "ability": 0.0, "ability_greedy": 0.0}
    point = kept(now, sft, skill="facts")
    others = [s for s in skills if s != "facts"]
    mean = lambda m, g="": sum(m[f"ability{g}/{s}"] for s in others) / 3  # noqa: E731
    assert point["reward"] == pytest.approx((now["ability/facts"] - sft["ability/facts"]) / (1 - sft["ability/facts"]))
    assert point["reward_greedy"] == pytest.approx(
        (now["ability_greedy/facts"] - sft["ability_greedy/facts"]) / (1 - sft["ability_greedy/facts"])
    )
    assert point["skill_reward"] == now["ability/facts"]
    assert point["ability"] == pytest.approx(mean(now) / mean(sft))
    assert point["ability_greedy"] == pytest.approx(mean(now, "_greedy") / mean(sft, "_greedy"))
    start = kept(sft, sft, skill="facts")
    assert start["reward"] == 0.0 and start["ability"] == pytest.approx(1.0)


@pytest.mark.slow
def test_rl_plan_end_to_end(world_cache, tmp_path):
    """The RL plan on a tiny world: GRPO, RLOO and GRPO with a KL term train on the skill's prompts; each point is the
    run's own raw metrics read as the RL axes; the stack sweeps the OnTIES run's model; the report says the task."""
    world = WorldConfig.quick(n_preference_pairs=48, n_eval_probes=24)
    config = LabConfig.rl(quick=True, world=world, steps=2, eval_every=1, batch_size=8, num_generations=4,
                          lr=1e-3, seeds=(0,), data_orders=(1,), levels=(0.001, 0.002), test_worlds=("default",),
                          methods=("adamw", "onties", "onties_ma", "grpo_kl", "rloo_adamw"))  # fmt: skip
    out = tmp_path / "rl"
    results = run_lab(out, config=config, workers=2, progress=False)
    table = results["worlds"]["default"]["methods"]
    sft = runner.world_metrics(config.test_world("default", 0))
    for name in ("adamw", "grpo_kl", "rloo_adamw"):
        run, _ = config.source(0, 1, table[name]["setting"])
        assert run.trainer == ("rloo" if name == "rloo_adamw" else "grpo") and (run.beta > 0) == (name == "grpo_kl")
        raw = [p for p in train_run(run)["points"] if p["variant"] == ""]
        points = table[name]["per_replicate"]["seed0/order1"]["points"][1:]
        assert len(points) == len(raw) == 2
        for point, metrics in zip(points, raw, strict=True):
            gained = (metrics["ability/facts"] - sft["ability/facts"]) / (1 - sft["ability/facts"])
            others = ("addition", "reversal", "translation")
            ability = sum(metrics[f"ability/{s}"] for s in others) / sum(sft[f"ability/{s}"] for s in others)
            assert point["reward"] == pytest.approx(gained) and point["ability"] == pytest.approx(ability)
    onties, stack = (table[n]["per_replicate"]["seed0/order1"]["points"] for n in ("onties", "onties_ma"))
    if table["onties"]["setting"] == {k: v for k, v in table["onties_ma"]["setting"].items() if k != "merge_weights"}:
        assert stack[-1]["reward"] == onties[-1]["reward"]
    assert "RL plan: GRPO" in (out / "results.md").read_text() and results["recommended"] is None
