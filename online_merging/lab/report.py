"""From test trajectories to ``results.json``, ``results.md`` and PNG plots.

Axes: reward = P(" sure,") (greedy check: the greedy "sure," rate); ability = the fraction of the seed's own SFT
ability kept (P(correct), greedy check: exact match). Every trajectory starts at the SFT model. The score is the
matched-reward ability (MRA, :mod:`online_merging.evaluation.fronts`); the hypervolume of the points is secondary.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from online_merging._files import staged_folder
from online_merging.evaluation.fronts import bootstrap_ci, common_levels, hypervolume, matched_reward_ability
from online_merging.lab.methods import METHODS, ONLINE_MERGING, setting_label
from online_merging.lab.tuning import interpolation_error, replicate_spread

__all__ = ["kept", "summarize", "write_report", "xy"]


def _kept(metrics: dict, sft: dict, key: str) -> float:
    """The fraction of the SFT value kept; 1 where the SFT model had none (there was nothing to lose)."""
    return metrics[key] / sft[key] if sft[key] > 0 else 1.0


def kept(metrics: dict, sft: dict, **extra) -> dict:
    """A point of a trajectory: reward, ability kept (of ``sft``'s), their greedy checks, per-skill ability kept."""
    skills = [k.split("/", 1)[1] for k in sft if k.startswith("ability/")]
    point = {
        "reward": metrics["reward"],
        "ability": _kept(metrics, sft, "ability"),
        "reward_greedy": metrics["reward_greedy"],
        "ability_greedy": _kept(metrics, sft, "ability_greedy"),
        "skills": {s: _kept(metrics, sft, f"ability/{s}") for s in skills},
    }
    return {**point, **extra}


def xy(points: list, greedy: bool = False) -> list[list[float]]:
    suffix = "_greedy" if greedy else ""
    return [[p["reward" + suffix], p["ability" + suffix]] for p in points]


def _mean(values: list) -> float | None:
    return None if not values or None in values else sum(values) / len(values)


def summarize(config, found: dict, settings: dict, search: dict | None = None) -> dict:
    """The ``results.json`` content from each method's test trajectories (``{method: {replicate: points}}``).

    The levels of a replicate are the ``config.levels`` (``MRA_LEVELS``) that every main-table method reaches
    there; every method, the secondary ones too, is scored at them. Per method: MRA (mean over replicates,
    bootstrap interval), the paired difference to AdamW with its interval and wins, the hypervolume of the
    trajectory points (secondary), and per replicate the MRA, hypervolume and :func:`interpolation_error`.
    """
    replicates = [f"seed{s}/order{o}" for s, o in config.test_replicates()]
    main = [name for name in found if not METHODS[name].secondary]
    levels = {r: common_levels([xy(found[name][r]) for name in main], config.levels) for r in replicates}
    methods = {}
    for name in [m for m in METHODS if m in found]:
        per_replicate = {}
        for r in replicates:
            points = found[name][r]
            per_replicate[r] = {
                "mra": matched_reward_ability(xy(points), levels[r]),
                "hypervolume": hypervolume(xy(points)),
                "interpolation_error": interpolation_error(xy(points), levels[r]),
                "max_reward": max(p["reward"] for p in points),
                "points": points,
            }
        mras = [per_replicate[r]["mra"] for r in replicates]
        volumes = [per_replicate[r]["hypervolume"] for r in replicates]
        entry = {
            "description": METHODS[name].description,
            "secondary": METHODS[name].secondary,
            "setting": settings[name],
            "label": setting_label(settings[name]),
            "mra": _mean(mras),
            "mra_ci": None if None in mras else bootstrap_ci(mras),
            "mra_spread": None if None in mras else replicate_spread(mras),
            "hypervolume": _mean(volumes),
            "hypervolume_ci": bootstrap_ci(volumes),
            "mra_vs_adamw": None,
            "mra_vs_adamw_ci": None,
            "wins": None,
            "per_replicate": per_replicate,
        }
        if name != "adamw" and "adamw" in found and entry["mra"] is not None and methods["adamw"]["mra"] is not None:
            diffs = [per_replicate[r]["mra"] - methods["adamw"]["per_replicate"][r]["mra"] for r in replicates]
            entry.update(mra_vs_adamw=_mean(diffs), mra_vs_adamw_ci=bootstrap_ci(diffs), wins=sum(d > 0 for d in diffs))
        methods[name] = entry
    online = [n for n in ONLINE_MERGING if n in methods and methods[n]["mra"] is not None]
    best = max(online, key=lambda n: methods[n]["mra"], default=None)
    errors = [e for m in methods.values() for e in (p["interpolation_error"] for p in m["per_replicate"].values())]
    spreads = [m["mra_spread"] for m in methods.values() if m["mra_spread"] is not None]
    return {
        "methods": methods,
        "recommended": None if best is None else {"method": best, "setting": settings[best]},
        "levels": levels,
        "replicates": replicates,
        "tuning": search,
        "interpolation": {
            "max_error": max((e for e in errors if e is not None), default=None),
            "median_spread": statistics.median(spreads) if spreads else None,
        },
    }


def _fmt_ci(value: float | None, ci: list[float] | None, signed: bool = False) -> str:
    if value is None:
        return "not reached"
    sign = "+" if signed else ""
    return f"{value:{sign}.3f} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]"


def markdown_table(results: dict, secondary: bool = False) -> str:
    """One row per method: its tuned setting, MRA with its interval, the paired difference to AdamW with its
    interval and wins, and the hypervolume."""
    head = ["method", "tuned setting", "MRA [95% CI]", "Δ MRA vs AdamW [95% CI] (wins)", "hypervolume [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n = len(results["replicates"])
    for name, m in results["methods"].items():
        if m["secondary"] != secondary:
            continue
        diff = "—" if name == "adamw" else _fmt_ci(m["mra_vs_adamw"], m["mra_vs_adamw_ci"], signed=True)
        if m["wins"] is not None:
            diff += f" ({m['wins']}/{n})"
        row = [f"`{name}`", m["label"], _fmt_ci(m["mra"], m["mra_ci"]), diff]
        row.append(_fmt_ci(m["hypervolume"], m["hypervolume_ci"]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def tuning_table(search: dict) -> str:
    """Per method, every searched setting's mean MRA over the tuning replicates; the pick in bold."""
    lines = ["| method | setting | tuning MRA |", "|---|---|---|"]
    for name, figures in search.items():
        for i, (label, score) in enumerate(zip(figures["settings"], figures["scores"], strict=True)):
            text = "misses a level" if score is None else f"{score:.3f}"
            if i == figures["best"]:
                label, text = f"**{label}**", f"**{text}**"
            lines.append(f"| `{name}` | {label} | {text} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: Path) -> None:
    """``results.json``, ``results.md`` (the tables), ``tuned.json`` (each method's setting, for ``--tuned``) and
    the PNG plots, into ``out``: written into a folder beside it and moved into place at the end
    (:func:`~online_merging._files.staged_folder`)."""
    with staged_folder(out, name="out_dir") as staged:
        _write_report(results, staged)


def _write_report(results: dict, out: Path) -> None:
    from online_merging.lab.lab import write_tuned

    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(_markdown(results))
    write_tuned(out / "tuned.json", {name: m["setting"] for name, m in results["methods"].items()})
    _plots(results, out)


def _markdown(results: dict) -> str:
    levels = results["levels"]
    text = "# Alignment-tax lab (second edition: tuned, then tested)\n\n" + markdown_table(results)
    if any(m["secondary"] for m in results["methods"].values()):
        text += "\n## Secondary (KTO)\n\n" + markdown_table(results, secondary=True)
    shown = "; ".join(f"{r}: {', '.join(f'{x:g}' for x in ls) or 'none'}" for r, ls in levels.items())
    text += f"\nMRA levels (reached by every main-table method on the replicate): {shown}.\n"
    check = results["interpolation"]
    if check["max_error"] is not None and check["median_spread"] is not None:
        text += (
            f"\nInterpolation check: halving the evaluation density moves a run's MRA by at most "
            f"{check['max_error']:.4f}; the median spread of a method's MRA over the replicates (standard deviation) "
            f"is {check['median_spread']:.4f}.\n"
        )
    if results.get("recommended"):
        best = results["recommended"]
        text += f"\nRecommended online-merging setting (best held-out MRA): `{best['method']}`, "
        text += f"{setting_label(best['setting'])}.\n"
    if results.get("tuning"):
        text += "\n## Tuning (mean MRA over the tuning replicates)\n\n" + tuning_table(results["tuning"])
    run = results.get("run")
    if run:
        text += (
            f"\n{len(results['replicates'])} test replicates (seed × data order); this invocation "
            f"{run['seconds']:.0f} s wall time with {run['workers']} workers (cached jobs are not rerun).\n"
        )
    return text


def _plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(methods)}
    replicates = results["replicates"]
    cols = min(3, len(replicates))
    rows = math.ceil(len(replicates) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False)
    for ax, replicate in zip(axes.flat, replicates, strict=False):
        for name, m in methods.items():
            points = xy(m["per_replicate"][replicate]["points"])
            ls = ":" if m["secondary"] else "-"
            ax.plot(*zip(*points, strict=True), ls, marker="o", ms=2, lw=1, color=colors[name], label=name)
        for level in results["levels"][replicate]:
            ax.axvline(level, color="k", lw=0.3, alpha=0.3)
        ax.set(xlim=(0, 1.02), ylim=(0, 1.1), xlabel='reward P(" sure,")', ylabel="ability kept (of SFT)")
        ax.set_title(f"test trajectories, {replicate}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(replicates) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "fronts.png", dpi=100)
    plt.close(fig)

    scored = [n for n, m in methods.items() if m["mra"] is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(1 + 0.7 * len(scored), 3.8))
        values = [methods[n]["mra"] for n in scored]
        errors = [[v - methods[n]["mra_ci"][0] for n, v in zip(scored, values, strict=True)]]
        errors.append([methods[n]["mra_ci"][1] - v for n, v in zip(scored, values, strict=True)])
        ax.bar(scored, values, yerr=errors, color=[colors[n] for n in scored], capsize=3)
        if "adamw" in scored:
            ax.axhline(methods["adamw"]["mra"], color="k", ls="--", lw=0.8)
        low, high = max(0, min(values) - 0.1), min(1.1, max(values) + 0.05)
        ax.set(ylabel="MRA (ability kept at matched reward)", ylim=(low, high))
        ax.tick_params(axis="x", rotation=60)
        fig.tight_layout()
        fig.savefig(out / "mra.png", dpi=100)
        plt.close(fig)
