"""From test trajectories to ``results.json``, ``results.md`` and PNG plots.

Axes: reward = P(" sure,") (greedy check: the greedy "sure," rate), or in the RL plan the share of the SFT model's
errors on the skill removed (:func:`kept`); ability = the fraction of the seed's own SFT
ability kept (P(correct), greedy check: exact match). Every trajectory starts at the SFT model. The score is the
matched-reward ability (MRA, :mod:`online_merging.evaluation.fronts`); the hypervolume of the points is secondary.
One table per test world; the recommended pipeline is the row above tuned AdamW on every world with the largest
smaller gain (:func:`summarize`).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from online_merging._files import staged_folder
from online_merging.evaluation.fronts import bootstrap_ci, common_levels, hypervolume, matched_reward_ability
from online_merging.lab.lab import TEST_WORLDS
from online_merging.lab.methods import METHODS, ONLINE_MERGING, setting_label
from online_merging.lab.tuning import interpolation_error, replicate_spread
from online_merging.world.rewards import errors_removed, rl_metrics

__all__ = ["SMOKE_TEST", "best_pipeline", "kept", "summarize", "versus", "world_table", "write_report", "xy"]

SMOKE_TEST = (
    "quick mode is a smoke test of the pipeline: its numbers recommend nothing (one tuning and one test replicate "
    "of a small world are too few to tell methods apart); run the lab without --quick for a recommendation."
)


ADAPTER_CANDIDATES = tuple(name for name, method in METHODS.items() if method.adapters and name != "lora_adamw")
"""The LoRA rows compared with LoRA under AdamW (``adapters`` verdict)."""


def _kept(metrics: dict, sft: dict, key: str) -> float:
    """The fraction of the SFT value kept; 1 where the SFT model had none (there was nothing to lose)."""
    return metrics[key] / sft[key] if sft[key] > 0 else 1.0


def kept(metrics: dict, sft: dict, *, skill: str | None = None, **extra) -> dict:
    """A point of a trajectory: reward, ability kept (of ``sft``'s), their greedy checks, per-skill ability kept.

    With ``skill`` (an RL run's) the reward is the share of the SFT model's errors on the skill removed (P(correct)
    on its held-out probes; greedy: exact match), kept with its raw value as ``skill_reward``, and ability is the
    other skills' (``world.rewards.rl_metrics``): so that the levels mean the same on worlds whose SFT models
    start apart."""
    if skill is not None:
        metrics, sft = rl_metrics(metrics, skill), rl_metrics(sft, skill)
    skills = [k.split("/", 1)[1] for k in sft if k.startswith("ability/")]
    point = {
        "reward": metrics["reward"],
        "ability": _kept(metrics, sft, "ability"),
        "reward_greedy": metrics["reward_greedy"],
        "ability_greedy": _kept(metrics, sft, "ability_greedy"),
        "skills": {s: _kept(metrics, sft, f"ability/{s}") for s in skills},
    }
    if skill is not None:
        point |= {"skill_reward": metrics["reward"], "reward": errors_removed(metrics["reward"], sft["reward"]),
                  "reward_greedy": errors_removed(metrics["reward_greedy"], sft["reward_greedy"])}  # fmt: skip
    return {**point, **extra}


def xy(points: list, greedy: bool = False) -> list[list[float]]:
    suffix = "_greedy" if greedy else ""
    return [[p["reward" + suffix], p["ability" + suffix]] for p in points]


def _mean(values: list) -> float | None:
    return None if not values or None in values else sum(values) / len(values)


def summarize(config, found: dict, settings: dict, search: dict | None = None) -> dict:
    """The ``results.json`` content from the test trajectories of every world (``{world: {method: {replicate:
    points}}}``): per world its table (:func:`world_table`), the tuned ``settings``, the tuning ``search``, and two
    verdicts over the worlds, each a paired comparison per world (:func:`versus`):

    - ``recommended``, the pipeline to use: among the main-table rows, those whose Δ MRA vs tuned AdamW has its
      interval above 0 on every test world ("holds"), the one whose smaller Δ over the worlds is the largest; if
      none holds, the row with the largest smaller Δ, with ``"holds": false``. It may be an offline stack (X → MA).
    - ``online_vs_ma``: the same rule among the rows that contain an online merge (``ONLINE_MERGING``), against
      ``ma`` instead of AdamW: does the best pipeline with an online merge beat MA alone on every world?
    - ``adapters``, for LoRA runs: the same rule among the LoRA rows, against ``lora_adamw`` (null without them).

    A smoke-test plan (``config.smoke_test``, the quick one) has neither verdict (null), ``mode`` "quick",
    ``smoke_test`` true and :data:`SMOKE_TEST` as its ``note``; any other plan has ``mode`` "full".
    """
    worlds = {name: world_table(config, name, per_method, settings) for name, per_method in found.items()}
    main = [name for name in METHODS if not METHODS[name].secondary]
    recommended = best_pipeline(worlds, main, "adamw")
    if recommended is not None:
        recommended = {"method": recommended["method"], "setting": settings[recommended["method"]], **recommended}
    smoke = config.smoke_test
    return {
        "mode": "quick" if smoke else "full",
        "smoke_test": smoke,
        "note": SMOKE_TEST if smoke else None,
        "worlds": worlds,
        "settings": settings,
        "recommended": None if smoke else recommended,
        "online_vs_ma": None if smoke else best_pipeline(worlds, ONLINE_MERGING, "ma"),
        "adapters": None if smoke else best_pipeline(worlds, ADAPTER_CANDIDATES, "lora_adamw"),
        "tuning": search,
    }


def world_table(config, world: str, found: dict, settings: dict) -> dict:
    """One test world's table from each method's trajectories there (``{method: {replicate: points}}``).

    The levels of a replicate are the ``config.levels`` (``MRA_LEVELS``) that every main-table method reaches
    there; every method, the secondary ones too, is scored at them. Per method: MRA (mean over replicates,
    bootstrap interval), the paired difference to AdamW with its interval and wins, the hypervolume of the
    trajectory points (secondary), and per replicate the MRA, hypervolume and :func:`interpolation_error`.
    """
    replicates = [f"seed{s}/order{o}" for w, s, o in config.test_replicates() if w == world]
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
        methods[name] = {
            "description": METHODS[name].description,
            "secondary": METHODS[name].secondary,
            "adapters": METHODS[name].adapters,
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
    table = {"world": TEST_WORLDS[world](config.world).to_dict(), "methods": methods, "levels": levels,
             "replicates": replicates}  # fmt: skip
    for name, entry in methods.items():
        diff = None if name == "adamw" else versus(table, name, "adamw")
        if diff is not None:
            entry.update(mra_vs_adamw=diff["mean"], mra_vs_adamw_ci=diff["ci"], wins=diff["wins"])
    errors = [e for m in methods.values() for e in (p["interpolation_error"] for p in m["per_replicate"].values())]
    spreads = [m["mra_spread"] for m in methods.values() if m["mra_spread"] is not None]
    table["interpolation"] = {
        "max_error": max((e for e in errors if e is not None), default=None),
        "median_spread": statistics.median(spreads) if spreads else None,
    }
    return table


def versus(table: dict, name: str, baseline: str) -> dict | None:
    """``name``'s paired MRA difference to ``baseline`` on one world's replicates: ``{"mean", "ci", "wins",
    "replicates"}``; None when either is missing or misses a level on some replicate."""
    methods = table["methods"]
    if name not in methods or baseline not in methods:
        return None
    mras = [(methods[name]["per_replicate"][r]["mra"], methods[baseline]["per_replicate"][r]["mra"])
            for r in table["replicates"]]  # fmt: skip
    if any(None in pair for pair in mras):
        return None
    diffs = [a - b for a, b in mras]
    return {
        "mean": _mean(diffs),
        "ci": bootstrap_ci(diffs),
        "wins": sum(d > 0 for d in diffs),
        "replicates": len(diffs),
    }


def best_pipeline(worlds: dict, candidates, baseline: str) -> dict | None:
    """Among ``candidates`` scored against ``baseline`` on every world, the best by the rule of :func:`summarize`:
    ``{"method", "versus": baseline, "worlds": {world: versus(...)}, "worst": the smaller mean difference, "holds":
    every world's interval above 0}``; None when no candidate is scored on every world."""
    scored = {}
    for name in candidates:
        per_world = {world: versus(table, name, baseline) for world, table in worlds.items()}
        if name != baseline and None not in per_world.values():
            worst = min(v["mean"] for v in per_world.values())
            holds = all(v["ci"][0] > 0 for v in per_world.values())
            scored[name] = {"method": name, "versus": baseline, "worlds": per_world, "worst": worst, "holds": holds}
    if not scored:
        return None
    return max(scored.values(), key=lambda s: (s["holds"], s["worst"]))  # ties: the first in METHODS order


def _fmt_ci(value: float | None, ci: list[float] | None, signed: bool = False) -> str:
    if value is None:
        return "not reached"
    sign = "+" if signed else ""
    return f"{value:{sign}.3f} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]"


def markdown_table(table: dict, secondary: bool = False, adapters: bool = False) -> str:
    """One row per method of a world's ``table`` (of the main, secondary or adapters table): its tuned setting, MRA
    with its interval, the paired difference to AdamW with its interval and wins, and the hypervolume."""
    head = ["method", "tuned setting", "MRA [95% CI]", "Δ MRA vs AdamW [95% CI] (wins)", "hypervolume [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n = len(table["replicates"])
    for name, m in table["methods"].items():
        if m["secondary"] != secondary or m.get("adapters", False) != adapters:
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
    write_tuned(out / "tuned.json", results["settings"])
    _plots(results, out)


def _world_section(name: str, table: dict) -> str:
    world = table["world"]
    text = (
        f"## World `{name}` (hidden {world['hidden_size']}, {world['num_layers']} layers, "
        f"{world['sure_fraction']:.0%} of the SFT targets rewarded)\n\n" + markdown_table(table)
    )
    if any(m["secondary"] and not m.get("adapters") for m in table["methods"].values()):
        text += f"\n### Secondary (KTO), world `{name}`\n\n" + markdown_table(table, secondary=True)
    if any(m.get("adapters") for m in table["methods"].values()):
        text += f"\n### LoRA adapters (Δ vs full-weight AdamW), world `{name}`\n\n" + markdown_table(
            table, secondary=True, adapters=True
        )
    shown = "; ".join(f"{r}: {', '.join(f'{x:g}' for x in ls) or 'none'}" for r, ls in table["levels"].items())
    text += f"\nMRA levels (reached by every main-table method on the replicate): {shown}.\n"
    check = table["interpolation"]
    if check["max_error"] is not None and check["median_spread"] is not None:
        text += (
            f"\nInterpolation check: halving the evaluation density moves a run's MRA by at most "
            f"{check['max_error']:.4f}; the median spread of a method's MRA over the replicates (standard deviation) "
            f"is {check['median_spread']:.4f}.\n"
        )
    return text


def _verdict(best: dict) -> str:
    """Per world the paired difference with its interval and wins, and whether it holds on every world."""
    shown = "; ".join(f"`{world}` {_fmt_ci(v['mean'], v['ci'], signed=True)} ({v['wins']}/{v['replicates']})"
                      for world, v in best["worlds"].items())  # fmt: skip
    return f"Δ MRA vs `{best['versus']}`: {shown}; above 0 on every world: {'yes' if best['holds'] else 'no'}."


def _markdown(results: dict) -> str:
    text = "# Alignment-tax lab (tuned on the default world, tested on every test world)\n"
    skill = results.get("run", {}).get("config", {}).get("rl_skill")
    if skill:
        text += (
            f"\nRL plan: GRPO (the `adamw` row: β 0, AdamW) from the SFT model on {skill} prompts, rewarded by "
            f"exact-match correctness. Reward axis: the share of the SFT model's errors on held-out {skill} probes "
            f"removed (P(correct)); ability: the other skills' P(correct), as a fraction of the SFT model's.\n"
        )
    if results.get("smoke_test"):
        text += f"\n**{SMOKE_TEST[0].upper()}{SMOKE_TEST[1:]}**\n"
    for name, table in results["worlds"].items():
        text += "\n" + _world_section(name, table)
    text += "\n## Pipelines\n"
    if results.get("smoke_test"):
        text += "\nNone recommended: quick mode is a smoke test.\n"
    if results.get("recommended"):
        best = results["recommended"]
        text += (
            f"\nRecommended pipeline (among the rows above 0 against tuned AdamW on every world, the largest smaller "
            f"Δ): `{best['method']}`, {setting_label(best['setting'])}. {_verdict(best)}\n"
        )
    if results.get("online_vs_ma"):
        best = results["online_vs_ma"]
        text += f"\nBest pipeline with an online merge, against MA alone: `{best['method']}`, "
        text += f"{setting_label(results['settings'][best['method']])}. {_verdict(best)}\n"
    if results.get("adapters"):
        best = results["adapters"]
        text += f"\nFor LoRA adapters, the best against LoRA with AdamW: `{best['method']}`, "
        text += f"{setting_label(results['settings'][best['method']])}. {_verdict(best)}\n"
    if results.get("tuning"):
        text += "\n## Tuning (mean MRA over the tuning replicates)\n\n" + tuning_table(results["tuning"])
    run = results.get("run")
    if run:
        n = sum(len(table["replicates"]) for table in results["worlds"].values())
        text += (
            f"\n{n} test replicates (world × seed × data order); this invocation {run['seconds']:.0f} s wall time "
            f"with {run['workers']} workers (cached jobs are not rerun).\n"
        )
        made = run.get("provenance")
        if made:
            text += (
                f"\nMade on {made['cpu']}, torch {made['torch']}, transformers {made['transformers']}, "
                f"trl {made['trl']}. "
                "World weights fingerprints (equal fingerprints: the same worlds bit for bit): "
                + ", ".join(
                    f"{world} `{fingerprint}`" for world, fingerprint in run["fingerprints"].items() if fingerprint
                )
                + ".\n"
            )
    return text


def _plots(results: dict, out: Path) -> None:
    """``fronts.png``: the test trajectories, a block of panels (one per replicate) per world; ``mra.png``: MRA
    with intervals, one panel per world."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = results["worlds"]
    skill = results.get("run", {}).get("config", {}).get("rl_skill")
    names = list(dict.fromkeys(name for table in worlds.values() for name in table["methods"]))
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}
    cols = min(3, max(len(table["replicates"]) for table in worlds.values()))
    blocks = {world: math.ceil(len(table["replicates"]) / cols) for world, table in worlds.items()}
    fig, axes = plt.subplots(sum(blocks.values()), cols, figsize=(5.2 * cols, 4.4 * sum(blocks.values())),
                             squeeze=False)  # fmt: skip
    row = 0
    for world, table in worlds.items():
        block = axes[row : row + blocks[world]].flat
        for ax, replicate in zip(block, table["replicates"], strict=False):
            for name, m in table["methods"].items():
                points = xy(m["per_replicate"][replicate]["points"])
                ls = ":" if m["secondary"] else "-"
                ax.plot(*zip(*points, strict=True), ls, marker="o", ms=2, lw=1, color=colors[name], label=name)
            for level in table["levels"][replicate]:
                ax.axvline(level, color="k", lw=0.3, alpha=0.3)
            if skill:  # RL: the axes span what the runs reach (they keep about all of the ability)
                ax.set(xlabel=f"share of SFT's {skill} errors removed", ylabel="other skills' ability kept (of SFT)")
            else:
                ax.set(xlim=(0, 1.02), ylim=(0, 1.1), xlabel='reward P(" sure,")', ylabel="ability kept (of SFT)")
            ax.set_title(f"test trajectories, {world} world, {replicate}")
            ax.grid(alpha=0.3)
        for ax in list(axes[row : row + blocks[world]].flat)[len(table["replicates"]) :]:
            ax.axis("off")
        row += blocks[world]
    axes.flat[0].legend(fontsize=6, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "fronts.png", dpi=100)
    plt.close(fig)

    scored = {
        world: [n for n, m in table["methods"].items() if m["mra"] is not None] for world, table in worlds.items()
    }
    if not any(scored.values()):
        return
    width = 1 + 0.7 * max(len(names) for names in scored.values())
    fig, axes = plt.subplots(len(worlds), 1, figsize=(width, 3.8 * len(worlds)), squeeze=False)
    for ax, (world, table) in zip(axes.flat, worlds.items(), strict=True):
        methods, shown = table["methods"], scored[world]
        ax.set_title(f"{world} world")
        if not shown:
            continue
        values = [methods[n]["mra"] for n in shown]
        errors = [[v - methods[n]["mra_ci"][0] for n, v in zip(shown, values, strict=True)]]
        errors.append([methods[n]["mra_ci"][1] - v for n, v in zip(shown, values, strict=True)])
        ax.bar(shown, values, yerr=errors, color=[colors[n] for n in shown], capsize=3)
        if "adamw" in shown:
            ax.axhline(methods["adamw"]["mra"], color="k", ls="--", lw=0.8)
        low, high = max(0, min(values) - 0.1), min(1.1, max(values) + 0.05)
        ax.set(ylabel="MRA (ability kept at matched reward)", ylim=(low, high))
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(out / "mra.png", dpi=100)
    plt.close(fig)
