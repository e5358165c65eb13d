"""The exploration: where does online merging's effect come from? One factor at a time around a centre, on the
tuning replicates only, then the promising combinations, chosen from the first stage's results.

    run_exploration("explore/", quick=True)      # explore.json, explore.md

The centre is OnDARE-Adam with the published mask semantics, p = 0.01 and α = 3 in learning-rate units (over the
lab's 40 steps at 4.5e-5, a τ drift of α·Σ_t η_t / p ≈ 0.54 τ_i, near the paper's best; docs/algorithm.md). Each
row is scored by MRA at the levels the centre-lr AdamW run reaches on each replicate. Around OnTIES (p 0.1, α 3,
lr ×3): its sign rule, and the online pull toward SFT (strength, which elements it pulls, and without a merge).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import replace

from online_merging._files import check_folder_target, staged_folder
from online_merging.evaluation.fronts import bootstrap_ci, common_levels, hypervolume, matched_reward_ability
from online_merging.lab.lab import LabConfig, _trajectories, replicate_label
from online_merging.lab.methods import setting_label
from online_merging.lab.runner import RunConfig

__all__ = ["CENTRE", "FACTORS", "ONTIES_CENTRE", "PULL_ROWS", "run_exploration", "second_stage"]

CENTRE = {"optimizer": "adam", "merge": "ondare", "alpha_unit": "lr", "reserve_p": 0.01, "alpha": 3.0}
FACTORS: dict[str, tuple] = {
    "alpha": (0.0, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0),  # drift/τ_i = α·1.8e-3/p: 0.05 (inert) … 18 (collapse)
    "reserve_p": (0.01, 0.1, 0.5),
    "tau_mask": ("once", "every_step"),
    "tau_clamp": (1.0, None),
    "dare_rescale": (True, False),
    "merge_every": (1, 5, 10),
}
"""OnDARE's factors, each varied alone around :data:`CENTRE` (whose value is in each tuple)."""
ONTIES_CENTRE = {**CENTRE, "merge": "onties", "reserve_p": 0.1, "lr": 3.0}
"""OnTIES at the lab's best first-edition setting; its update has no rescaling option (it is always unrescaled)."""
ONTIES_FACTORS: dict[str, tuple] = {"ties_sign": ("unweighted", "weighted"), "pull": (0.0, 50.0, 150.0, 500.0)}
"""OnTIES's factors around :data:`ONTIES_CENTRE`; the pull toward SFT in lr units (its total strength over the
lab's 40 steps at lr ×3 is pull × 5.4e-3: 0.27, 0.81, 2.7)."""
PULL_ROWS = {
    "onties pull=150.0, kept elements": {**ONTIES_CENTRE, "pull": 150.0, "pull_elements": "kept"},
    "onties pull=150.0, consensus elements": {**ONTIES_CENTRE, "pull": 150.0, "pull_elements": "consensus"},
    "adamw + pull=150.0 (lr ×1)": {"optimizer": "adam", "merge": None, "pull": 150.0, "lr": 1.0},
}
"""The pull's other rows: which elements it pulls, and the pull without a merge (OnlineMergingAdam, merge None)."""
DECOMPOSITION = {
    "update sparsification alone (α = 0)": {**CENTRE, "alpha": 0.0},
    "τ term alone (p = 1)": {**CENTRE, "reserve_p": 1.0},
}
ADAMW = {"lr": 1.0}


def first_stage() -> dict[str, tuple[str | None, dict]]:
    """{row name: (factor or None, setting)}: AdamW at the centre lr, the centres, every factor's other values,
    the decomposition rows, the pull's rows."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    rows: dict[str, tuple[str | None, dict]] = {"adamw (centre lr)": (None, ADAMW), "centre (OnDARE)": (None, CENTRE)}
    rows["centre (OnTIES)"] = (None, ONTIES_CENTRE)
    for centre, factors, prefix in ((CENTRE, FACTORS, ""), (ONTIES_CENTRE, ONTIES_FACTORS, "onties ")):
        for factor, values in factors.items():
            for value in values:
                if value != centre.get(factor, defaults[factor]):
                    rows[f"{prefix}{factor}={value}"] = (factor, {**centre, factor: value})
    for name, setting in DECOMPOSITION.items():
        rows[name] = (None, setting)
    for name, setting in PULL_ROWS.items():
        rows[name] = ("pull_elements" if "pull_elements" in setting else None, setting)
    return rows


def second_stage(scores: dict[str, float | None], rows: dict[str, tuple[str | None, dict]]) -> dict[str, dict]:
    """The promising combinations of OnDARE's factors: each factor's best value (by ``scores``, the mean MRA of
    the first stage's rows) where it beats the centre; all of those combined, and the pairs of the best factor
    with the second and with the third."""
    centre = scores.get("centre (OnDARE)")
    if centre is None:
        return {}
    gains = {}
    for name, (factor, setting) in rows.items():
        score = scores.get(name)
        better = factor in FACTORS and score is not None and score > centre
        if better and (factor not in gains or score - centre > gains[factor][0]):
            gains[factor] = (score - centre, setting[factor])
    ranked = sorted(gains, key=lambda f: -gains[f][0])
    combos = {}
    if len(ranked) >= 2:
        combos["best of each factor"] = {f: gains[f][1] for f in ranked}
    for other in ranked[1:3]:
        combos[f"{ranked[0]} + {other}"] = {f: gains[f][1] for f in (ranked[0], other)}
    unique, seen = {}, {json.dumps(CENTRE, sort_keys=True)}
    for name, changes in combos.items():
        setting = {**CENTRE, **changes}
        text = json.dumps(setting, sort_keys=True)
        if text not in seen:
            seen.add(text)
            label = ", ".join(f"{k}={v}" for k, v in changes.items())
            unique[f"{name} ({label})"] = setting
    return unique


def _score(found: dict, replicates: list[str], candidates) -> tuple[dict, dict]:
    """Levels per replicate (those the centre-lr AdamW run reaches) and per row its figures."""
    from online_merging.lab.report import xy

    adamw = found["adamw (centre lr)"]
    levels = {r: common_levels([xy(adamw[r])], candidates) for r in replicates}
    figures = {}
    for name, per_replicate in found.items():
        per = {
            r: {
                "mra": matched_reward_ability(xy(points), levels[r]),
                "hypervolume": hypervolume(xy(points)),
                "max_reward": max(p["reward"] for p in points),
            }
            for r, points in per_replicate.items()
        }
        mras = [per[r]["mra"] for r in replicates]
        volumes = [per[r]["hypervolume"] for r in replicates]
        mra = None if None in mras else sum(mras) / len(mras)
        figures[name] = {"mra": mra, "hypervolume": sum(volumes) / len(volumes), "per_replicate": per}
    centre = figures["adamw (centre lr)"]
    for f in figures.values():
        if f["mra"] is not None and centre["mra"] is not None:
            diffs = [f["per_replicate"][r]["mra"] - centre["per_replicate"][r]["mra"] for r in replicates]
            f["mra_vs_adamw"], f["mra_vs_adamw_ci"] = sum(diffs) / len(diffs), bootstrap_ci(diffs)
        else:
            f["mra_vs_adamw"], f["mra_vs_adamw_ci"] = None, None
    return levels, figures


def run_exploration(
    out_dir: str | os.PathLike,
    *,
    quick: bool = False,
    workers: int = 2,
    config: LabConfig | None = None,
    progress: bool = True,
) -> dict:
    """Run both stages on ``config``'s tuning replicates and write ``explore.json`` and ``explore.md`` into
    ``out_dir`` (a folder of its own: not the lab's). Cached like the lab's runs. Returns explore.json's content."""
    check_folder_target(out_dir, name="out_dir")
    config = config or (LabConfig.quick() if quick else LabConfig())
    replicates = config.tuning_replicates()
    labels = [replicate_label(s, o) for _, s, o in replicates]
    start = time.perf_counter()
    rows = first_stage()
    (found,) = _trajectories(config, {n: s for n, (_, s) in rows.items()}, replicates, workers, progress).values()
    _, figures = _score(found, labels, config.levels)
    stage2 = second_stage({n: f["mra"] for n, f in figures.items()}, rows)
    if stage2:
        found |= _trajectories(config, stage2, replicates, workers, progress)["default"]
    levels, figures = _score(found, labels, config.levels)
    table = []
    for name in found:
        factor, setting = rows[name] if name in rows else ("combination", stage2[name])
        table.append({"row": name, "stage": 1 if name in rows else 2, "factor": factor, "setting": setting,
                      **figures[name]})  # fmt: skip
    results = {
        "rows": table,
        "levels": levels,
        "replicates": labels,
        "run": {
            "config": dataclasses.asdict(replace(config, methods=(), test_worlds=("default",))),
            "seconds": round(time.perf_counter() - start, 1),
            "workers": workers,
        },
    }
    with staged_folder(out_dir, name="out_dir") as staged:
        (staged / "explore.json").write_text(json.dumps(results, indent=1) + "\n")
        (staged / "explore.md").write_text(_markdown(results))
    return results


def _markdown(results: dict) -> str:
    def number(value, signed=False):
        return "not reached" if value is None else f"{value:{'+' if signed else ''}.3f}"

    head = ["row", "stage", "setting", "MRA", "Δ MRA vs AdamW (centre lr) [95% CI]", "hypervolume", "max reward"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        diff = number(row["mra_vs_adamw"], signed=True)
        if row["mra_vs_adamw_ci"]:
            low, high = row["mra_vs_adamw_ci"]
            diff += f" [{low:+.3f}, {high:+.3f}]"
        top = sum(p["max_reward"] for p in row["per_replicate"].values()) / len(row["per_replicate"])
        cells = [row["row"], str(row["stage"]), setting_label(row["setting"]), number(row["mra"]), diff]
        lines.append("| " + " | ".join([*cells, f"{row['hypervolume']:.3f}", f"{top:.3f}"]) + " |")
    shown = "; ".join(f"{r}: {', '.join(f'{x:g}' for x in ls) or 'none'}" for r, ls in results["levels"].items())
    return (
        "# Alignment-tax lab: exploration (tuning replicates only)\n\n"
        f"Means over {len(results['replicates'])} tuning replicates. MRA levels (reached by AdamW at the centre lr): "
        f"{shown}.\n\n" + "\n".join(lines) + "\n"
    )
