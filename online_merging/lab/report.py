"""From run results to ``results.json``, ``results.md`` and PNG plots.

Axes: reward = P(" sure,") (greedy check: the greedy "sure," rate); ability = the fraction of the seed's own SFT
ability kept (P(correct), greedy check: exact match). Every method's points include the SFT model (step 0).
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path

from online_merging._files import staged_folder
from online_merging.diagnostics import EntanglementReport
from online_merging.lab.fronts import ability_at_reward, bootstrap_ci, hypervolume, pareto_front
from online_merging.lab.methods import METHODS

__all__ = ["MATCHED_REWARDS", "summarize", "write_report"]

MATCHED_REWARDS = (0.5, 0.8)
"""Reward levels at which the best ability kept is reported."""


def _kept(metrics: dict, sft: dict, key: str) -> float:
    """The fraction of the SFT value kept; 1 where the SFT model had none (there was nothing to lose)."""
    return metrics[key] / sft[key] if sft[key] > 0 else 1.0


def _point(metrics: dict, sft: dict, **extra) -> dict:
    skills = [k.split("/", 1)[1] for k in sft if k.startswith("ability/")]
    point = {
        "reward": metrics["reward"],
        "ability": _kept(metrics, sft, "ability"),
        "reward_greedy": metrics["reward_greedy"],
        "ability_greedy": _kept(metrics, sft, "ability_greedy"),
        "skills": {s: _kept(metrics, sft, f"ability/{s}") for s in skills},
    }
    return {**point, **extra}


def _collect(config, sft: dict, runs: list, merges: list) -> dict:
    """{method: {replicate: [point, ...]}}, the SFT point first."""
    points: dict = defaultdict(lambda: defaultdict(list))
    for planned, result in runs:
        replicate = f"seed{planned.seed}/order{planned.order}"
        for p in result["points"]:
            name = planned.method if not p["variant"] else "ema"
            if name not in config.methods:
                continue
            setting = planned.setting if not p["variant"] else f"{planned.setting}, {p['variant']}"
            points[name][replicate].append(_point(p, sft[planned.seed], setting=setting, step=p["step"]))
    merged = {p.run.key(): p for p, _ in runs if p.run.save_model}
    finals = {p.run.key(): [x for x in r["points"] if not x["variant"]][-1] for p, r in runs if p.run.save_model}
    for seed, order, result in merges:
        replicate = f"seed{seed}/order{order}"
        # each merge family ends at the model it merges with SFT (MA at α = 1): the AdamW run's final point
        aligned = next(k for k, p in merged.items() if (p.seed, p.order) == (seed, order))
        for name in {p["method"] for p in result["points"]}:
            end = _point(finals[aligned], sft[seed], setting="aligned (AdamW final)", step=finals[aligned]["step"])
            points[name][replicate].append(end)
        for p in result["points"]:
            setting = ", ".join(f"{k}={v}" for k, v in p["setting"].items())
            points[p["method"]][replicate].append(_point(p, sft[seed], setting=setting, step=None))
    for name in points:
        for replicate in points[name]:
            seed = int(replicate.split("/")[0][4:])
            points[name][replicate].insert(0, _point(sft[seed], sft[seed], setting="sft", step=0))
    return points


def _xy(points: list, greedy: bool = False) -> list[list[float]]:
    suffix = "_greedy" if greedy else ""
    return [[p["reward" + suffix], p["ability" + suffix]] for p in points]


def summarize(config, sft: dict, runs: list, merges: list) -> dict:
    """The ``results.json`` content: per method its pooled points and front, area with bootstrap interval over
    replicates (seed × data order), greedy area, ability at matched rewards, and the paired difference to AdamW."""
    collected = _collect(config, sft, runs, merges)
    replicates = [f"seed{s}/order{o}" for s in config.seeds for o in config.data_orders]
    areas = {name: {r: hypervolume(_xy(ps)) for r, ps in per.items()} for name, per in collected.items()}
    methods = {}
    for name in [m for m in METHODS if m in collected]:
        per_replicate = collected[name]
        pooled = [p for r in replicates for p in per_replicate.get(r, [])]
        values = list(areas[name].values())
        greedy = [hypervolume(_xy(per_replicate[r], greedy=True)) for r in per_replicate]
        entry = {
            "description": METHODS[name].description,
            "points": _xy(pooled),
            "front": [list(p) for p in pareto_front(_xy(pooled))],
            "area": sum(values) / len(values),
            "area_ci": bootstrap_ci(values),
            "area_greedy": sum(greedy) / len(greedy),
            "area_greedy_ci": bootstrap_ci(greedy),
            "ability_at_reward": {},
            "per_seed": {
                r: {"area": areas[name][r], "front": [list(p) for p in pareto_front(_xy(ps))], "points": ps}
                for r, ps in per_replicate.items()
            },
        }
        for level in MATCHED_REWARDS:
            found = [ability_at_reward(_xy(per_replicate[r]), level) for r in per_replicate]
            entry["ability_at_reward"][str(level)] = None if None in found else sum(found) / len(found)
        if name != "adamw" and "adamw" in areas:
            diffs = [areas[name][r] - areas["adamw"][r] for r in areas[name] if r in areas["adamw"]]
            entry["vs_adamw"] = {
                "area_diff": sum(diffs) / len(diffs),
                "area_diff_ci": bootstrap_ci(diffs),
                "wins": sum(d > 0 for d in diffs),
                "replicates": len(diffs),
            }
        methods[name] = entry
    sft_summary = {str(s): {k: v for k, v in m.items()} for s, m in sft.items()}
    return {
        "methods": methods,
        "entanglement": _entanglement(config, runs),
        "sft": sft_summary,
        "replicates": replicates,
        "matched_rewards": list(MATCHED_REWARDS),
    }


def _entanglement(config, runs: list) -> dict:
    """Per probed method: the probe trajectories per replicate, and their means over replicates of the change of
    the chosen and rejected log-probabilities and margin, the mean cosine, and the share of probe-to-probe
    intervals in which the monitor would warn (the margin rose while the chosen fell or the rejected rose)."""
    found: dict = defaultdict(dict)
    for planned, result in runs:
        if "entanglement" in result and planned.method in config.methods:
            found[planned.method][f"seed{planned.seed}/order{planned.order}"] = result["entanglement"]
    summary = {}
    for name in [m for m in METHODS if m in found]:
        per_replicate = found[name]
        figures = defaultdict(list)
        for trajectory in per_replicate.values():
            first, last = trajectory[0], trajectory[-1]
            for key in ("logp_chosen", "logp_rejected", "margin"):
                figures[f"delta_{key}"].append(last[key] - first[key])
            figures["cosine"].append(sum(p["cosine"] for p in trajectory) / len(trajectory))
            reports = [EntanglementReport.from_metrics(p) for p in trajectory]
            warned = [after.moved_together_since(before) for before, after in itertools.pairwise(reports)]
            figures["warned_intervals"].append(sum(warned) / max(1, len(warned)))
        means = {key: sum(values) / len(values) for key, values in figures.items()}
        summary[name] = {**means, "per_seed": per_replicate}
    return summary


def _fmt_ci(value: float, ci: list[float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{value:{sign}.3f} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]"


def markdown_table(results: dict) -> str:
    """One row per method: area under the front with its interval, the paired difference to AdamW, the greedy
    area, and the ability kept at matched rewards."""
    levels = results["matched_rewards"]
    head = ["method", "area [95% CI]", "Δ area vs AdamW [95% CI] (wins)", "greedy area [95% CI]"]
    head += [f"ability kept at reward ≥ {level}" for level in levels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        versus = m.get("vs_adamw")
        diff = "—"
        if versus:
            wins = f"({versus['wins']}/{versus['replicates']})"
            diff = f"{_fmt_ci(versus['area_diff'], versus['area_diff_ci'], signed=True)} {wins}"
        at = [m["ability_at_reward"][str(level)] for level in levels]
        row = [f"`{name}`", _fmt_ci(m["area"], m["area_ci"]), diff, _fmt_ci(m["area_greedy"], m["area_greedy_ci"])]
        row += ["not reached" if a is None else f"{a:.3f}" for a in at]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def entanglement_table(results: dict) -> str:
    """One row per probed method: the changes of the probe's log-probabilities, the mean cosine, the warnings."""
    head = ["method", "Δ log π(chosen)", "Δ log π(rejected)", "Δ margin", "mean cos(g_w, g_l)", "intervals warned"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in results.get("entanglement", {}).items():
        row = [f"`{name}`", *(f"{e[k]:+.2f}" for k in ("delta_logp_chosen", "delta_logp_rejected", "delta_margin"))]
        row += [f"{e['cosine']:.3f}", f"{e['warned_intervals']:.0%}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: Path) -> None:
    """``results.json``, ``results.md`` (the table) and the PNG plots, into ``out``: written into a folder beside it
    and moved into place at the end (:func:`~online_merging._files.staged_folder`)."""
    with staged_folder(out, name="out_dir") as staged:
        _write_report(results, staged)


def _write_report(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    run = results.get("run", {})
    text = "# Alignment-tax lab\n\n" + markdown_table(results)
    if run:
        replicates, seconds, jobs = len(results["replicates"]), run["seconds"], run["computed_seconds"]
        text += (
            f"\n{replicates} replicates (seed × data order); this invocation {seconds:.0f} s wall time with "
            f"{run['workers']} workers (cached jobs are not rerun); the jobs took {jobs:.0f} s of one core, summed.\n"
        )
    if results.get("entanglement"):
        text += "\n## Gradient entanglement on held-out pairs (first setting of each probed method)\n\n"
        text += entanglement_table(results)
    (out / "results.md").write_text(text)
    _plots(results, out)
    if results.get("entanglement"):
        _entanglement_plot(results["entanglement"], out / "entanglement.png")


def _entanglement_plot(entanglement: dict, path: Path) -> None:
    """Mean over replicates of the probe's log-probabilities, margin and cosine, against the DPO step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("logp_chosen", "log π(chosen)"), ("logp_rejected", "log π(rejected)"), ("margin", "margin"),
              ("cosine", "cos(g_w, g_l)"))  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for name, e in entanglement.items():
        trajectories = list(e["per_seed"].values())
        steps = [p["step"] for p in trajectories[0]]
        for ax, (key, label) in zip(axes, panels, strict=True):
            mean = [sum(t[i][key] for t in trajectories) / len(trajectories) for i in range(len(steps))]
            ax.plot(steps, mean, "-o", ms=3, label=name)
            ax.set(xlabel="DPO step", title=label)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(methods)}

    def front_line(ax, front, **kwargs):
        # the staircase whose area is the hypervolume
        xs, ys = [0.0], [front[0][1]] if front else [0.0]
        for (r, a), nxt in zip(front, [*front[1:], None], strict=True):
            xs += [r, r]
            ys += [a, nxt[1] if nxt else 0.0]
        ax.plot(xs, ys, drawstyle="default", **kwargs)

    def style(ax, title):
        ax.set(xlim=(0, 1.02), ylim=(0, 1.1), xlabel='reward P(" sure,")', ylabel="ability kept (of SFT)", title=title)
        ax.grid(alpha=0.3)

    # AdamW first: its run must trace a front
    if "adamw" in methods:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for replicate, data in methods["adamw"]["per_seed"].items():
            for setting in sorted({p["setting"] for p in data["points"]} - {"sft"}):
                ps = [data["points"][0]] + [p for p in data["points"] if p["setting"] == setting]
                steps = [p["step"] for p in ps]
                (line,) = left.plot(steps, [p["reward"] for p in ps], "-o", ms=3, label=f"{replicate} {setting}")
                left.plot(steps, [p["ability"] for p in ps], "--s", ms=3, color=line.get_color())
                right.plot([p["reward"] for p in ps], [p["ability"] for p in ps], "-o", ms=3, color=line.get_color())
        left.set(xlabel="DPO step", ylabel="reward (solid) / ability kept (dashed)")
        left.set_title("AdamW: reward up, ability down")
        left.grid(alpha=0.3)
        left.legend(fontsize=6)
        style(right, "AdamW trajectories in the reward/ability plane")
        fig.tight_layout()
        fig.savefig(out / "adamw_front.png", dpi=110)
        plt.close(fig)

    cols = 4
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, m) in zip(axes.flat, methods.items(), strict=False):
        xs, ys = zip(*m["points"], strict=True)
        ax.scatter(xs, ys, s=6, alpha=0.35, color=colors[name])
        for data in m["per_seed"].values():
            front_line(ax, data["front"], color=colors[name], lw=0.6, alpha=0.5)
        if name != "adamw" and "adamw" in methods:
            front_line(ax, methods["adamw"]["front"], color="k", ls="--", lw=1, label="adamw (pooled)")
            ax.legend(fontsize=7, loc="lower left")
        front_line(ax, m["front"], color=colors[name], lw=2)
        style(ax, f"{name}: area {m['area']:.3f} [{m['area_ci'][0]:.3f}, {m['area_ci'][1]:.3f}]")
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "fronts.png", dpi=100)
    plt.close(fig)

    replicates = results["replicates"]
    fig, axes = plt.subplots(1, len(replicates), figsize=(5 * len(replicates), 4.4), squeeze=False)
    for ax, replicate in zip(axes.flat, replicates, strict=True):
        for name, m in methods.items():
            if replicate in m["per_seed"]:
                front_line(ax, m["per_seed"][replicate]["front"], color=colors[name], lw=1.2, label=name)
        style(ax, f"fronts, {replicate}")
    axes.flat[0].legend(fontsize=6, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "fronts_per_seed.png", dpi=100)
    plt.close(fig)

    shown = [n for n in ("adamw", "ondare", "ma") if n in methods]
    skills = sorted(
        {s for d in methods.get("adamw", {}).get("per_seed", {}).values() for s in d["points"][0]["skills"]}
    )
    if shown and skills:
        fig, axes = plt.subplots(1, len(skills), figsize=(4 * len(skills), 3.8), squeeze=False)
        for ax, skill in zip(axes.flat, skills, strict=True):
            for name in shown:
                for i, data in enumerate(methods[name]["per_seed"].values()):
                    ps = sorted(data["points"], key=lambda p: p["reward"])
                    ax.plot(
                        [p["reward"] for p in ps],
                        [p["skills"][skill] for p in ps],
                        "o-",
                        ms=2,
                        lw=0.7,
                        color=colors[name],
                        label=name if i == 0 else None,
                    )
            ax.set(xlabel='reward P(" sure,")', ylabel="skill ability kept", title=skill, xlim=(0, 1.02))
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "skills.png", dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(methods), 3.8))
    names = list(methods)
    values = [methods[n]["area"] for n in names]
    errors = [[v - methods[n]["area_ci"][0] for n, v in zip(names, values, strict=True)]]
    errors.append([methods[n]["area_ci"][1] - v for n, v in zip(names, values, strict=True)])
    ax.bar(names, values, yerr=errors, color=[colors[n] for n in names], capsize=3)
    if "adamw" in methods:
        ax.axhline(methods["adamw"]["area"], color="k", ls="--", lw=0.8)
    ax.set(ylabel="area under the front", ylim=(min(values) - 0.1, max(values) + 0.05))
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(out / "areas.png", dpi=100)
    plt.close(fig)
