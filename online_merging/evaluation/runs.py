"""Evaluating runs of checkpoints on both axes, as ``online-merging evaluate`` does: a plan checked before any
model loads (every file, column, task name, tokenizer), then each checkpoint loaded in turn and scored."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from online_merging.evaluation.checkpoints import Checkpoint, Run

__all__ = ["PROXY_NOTE", "EvaluationPlan", "evaluate_plan", "format_table", "plan_evaluation", "point_value"]

PROXY_NOTE = (
    "proxy reward: TRL's DPO held-out preference accuracy and mean margin against the reference model, "
    "β·((log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))); it measures how far the policy moved towards the "
    "preferred answers, not how good its own answers are"
)


@dataclass
class EvaluationPlan:
    """What to evaluate, checked; see :func:`plan_evaluation`."""

    runs: list[Run]
    reference: Checkpoint | None = None
    tasks: tuple[str, ...] = ()
    include_path: str | None = None
    limit: int | None = None
    reward_model: Path | None = None
    prompts: list[str] | None = None
    pairs: list[dict] | None = None
    max_new_tokens: int = 64
    batch_size: int = 8
    seed: int | None = None
    beta: float = 0.1
    tokenizers: dict[str, object] = field(default_factory=dict, repr=False)


def plan_evaluation(
    checkpoints: Sequence[str],
    *,
    reference: str | None = None,
    tasks: Sequence[str] = (),
    include_path: str | None = None,
    limit: int | None = None,
    reward_model: str | None = None,
    prompts: str | None = None,
    pairs: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int | None = None,
    beta: float = 0.1,
) -> EvaluationPlan:
    """Check everything that needs no model weights; each error is one line naming its option, file or column."""
    from online_merging.evaluation.ability import check_tasks
    from online_merging.evaluation.checkpoints import (
        check_loadable,
        check_same_vocabulary,
        load_tokenizer,
        resolve_runs,
    )
    from online_merging.evaluation.data import read_records
    from online_merging.evaluation.reward import check_reward_model

    if not (tasks or reward_model or pairs):
        raise ValueError("--tasks, --reward-model or --pairs: give at least one axis to evaluate")
    if pairs and reference is None:
        raise ValueError("--pairs: the proxy reward compares log-probabilities with the reference model's: add "
                         "--reference DIR (the SFT model)")  # fmt: skip
    if reward_model and prompts is None:
        raise ValueError("--reward-model: add --prompts FILE (held-out prompts the policy answers)")
    if prompts and not reward_model:
        raise ValueError("--prompts: the prompts are answered and scored by --reward-model: add it")
    if include_path and not tasks:
        raise ValueError("--include-path: it holds lm-eval tasks: name them with --tasks")
    for option, value in (("--limit", limit), ("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{option}: expected an integer ≥ 1, got {value}")
    if beta <= 0:
        raise ValueError(f"--beta: expected > 0, got {beta}")
    runs = resolve_runs(list(checkpoints))
    reference_checkpoint = None
    if reference is not None:
        (reference_run,) = resolve_runs([reference], option="--reference")
        if len(reference_run.checkpoints) != 1:
            raise ValueError(f"--reference: {reference!r} is a Trainer output folder; name one of its checkpoints")
        reference_checkpoint = Checkpoint("reference", reference_run.checkpoints[0].source)
    plan = EvaluationPlan(runs, reference_checkpoint, tuple(tasks), include_path, limit, None, None, None,
                          max_new_tokens, batch_size, seed, beta)  # fmt: skip
    if tasks:
        try:
            check_tasks(tasks, include_path)
        except ValueError as error:
            raise ValueError(f"--tasks: {error}") from None
    if reward_model:
        check_reward_model(reward_model)
        plan.reward_model = Path(reward_model).expanduser()
        plan.prompts = [record["prompt"] for record in read_records(prompts, ("prompt",), option="--prompts")]
    if pairs:
        plan.pairs = read_records(pairs, ("prompt", "chosen", "rejected"), option="--pairs")
    everything = [reference_checkpoint] * (reference_checkpoint is not None)
    everything += [c for run in runs for c in run.checkpoints]
    for checkpoint in everything:
        check_loadable(checkpoint)
        fallback = reference_checkpoint.source if reference_checkpoint else None
        plan.tokenizers[checkpoint.label] = load_tokenizer(checkpoint, fallback=fallback)
    if reference_checkpoint is not None:
        reference_tokenizer = plan.tokenizers["reference"]
        for checkpoint in everything[1:]:
            check_same_vocabulary(plan.tokenizers[checkpoint.label], reference_tokenizer, checkpoint.label, reference)
    return plan


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_plan(plan: EvaluationPlan, *, progress: bool = True) -> dict:
    """Score the reference, then every checkpoint; a JSON-able result with the front's axes named."""
    from tqdm.auto import tqdm

    from online_merging.evaluation.ability import ability_kept, ability_scores, kept_fractions
    from online_merging.evaluation.checkpoints import load_causal_lm
    from online_merging.evaluation.proxy import pair_logprobs, preference_proxy
    from online_merging.evaluation.reward import load_reward_model, reward_score

    device = _device()
    reward = load_reward_model(plan.reward_model, device=device) if plan.reward_model else None
    reference_logps = reference_scores = None

    def score(checkpoint: Checkpoint) -> dict:
        nonlocal reference_logps, reference_scores
        model = load_causal_lm(checkpoint, device=device)
        tokenizer = plan.tokenizers[checkpoint.label]
        point = {"label": checkpoint.label, "source": str(checkpoint.source), "step": checkpoint.step}
        if plan.tasks:
            scores = ability_scores(model, tokenizer, plan.tasks, include_path=plan.include_path, limit=plan.limit,
                                    batch_size=plan.batch_size)  # fmt: skip
            point["ability"] = {task: s._asdict() for task, s in scores.items()}
            point["ability_mean"] = sum(s.score for s in scores.values()) / len(scores)
            if checkpoint is plan.reference:
                reference_scores = {task: s.score for task, s in scores.items()}
                _warn_undefined(reference_scores)
            if reference_scores is not None:
                own = {task: s.score for task, s in scores.items()}
                for task, fraction in kept_fractions(own, reference_scores).items():
                    point["ability"][task]["kept"] = fraction
                point["ability_kept"] = ability_kept(own, reference_scores)
        if reward is not None:
            point["reward"] = reward_score(model, tokenizer, *reward, plan.prompts, max_new_tokens=plan.max_new_tokens,
                                           batch_size=plan.batch_size, seed=plan.seed, progress=progress)  # fmt: skip
        if plan.pairs:
            logps = pair_logprobs(model, tokenizer, plan.pairs, batch_size=plan.batch_size)
            if checkpoint is plan.reference:
                reference_logps = logps
            proxy = preference_proxy(logps, reference_logps, beta=plan.beta)
            point["proxy_reward"] = {"accuracy": proxy.accuracy, "margin": proxy.margin, "beta": proxy.beta}
        del model
        return point

    total = sum(len(run.checkpoints) for run in plan.runs) + (plan.reference is not None)
    result = {"tasks": list(plan.tasks), "reference": None, "runs": []}
    with tqdm(total=total, desc="checkpoints", unit="checkpoint", disable=not progress) as bar:
        if plan.reference is not None:
            result["reference"] = score(plan.reference)
            bar.update()
        for run in plan.runs:
            points = []
            for checkpoint in run.checkpoints:
                bar.set_postfix_str(checkpoint.label[-40:])
                points.append(score(checkpoint))
                bar.update()
            result["runs"].append({"name": run.name, "checkpoints": points})
    if plan.reward_model:
        result["reward_model"] = {"path": str(plan.reward_model), "prompts": len(plan.prompts),
                                  "decoding": "greedy" if plan.seed is None else f"sampled, seed {plan.seed}",
                                  "max_new_tokens": plan.max_new_tokens}  # fmt: skip
    if plan.pairs:
        result["proxy_reward"] = {"what": PROXY_NOTE, "pairs": len(plan.pairs), "beta": plan.beta}
    result["front"] = _front(result, plan)
    return result


def _warn_undefined(reference_scores: dict[str, float]) -> None:
    """Warn, naming them, of the tasks the reference scores 0 on: the fraction of its ability kept is undefined."""
    undefined = [task for task, score in reference_scores.items() if score <= 0]
    if not undefined:
        return
    rest = "the mean kept (ability_kept) is over the other tasks" if len(undefined) < len(reference_scores) else (
        "so is ability_kept")  # fmt: skip
    names = ", ".join(map(repr, undefined))
    message = f"the reference scores 0 on task {names}: the fraction of its ability kept there is undefined (n/a; "
    warnings.warn(f"{message}null in evaluation.json); {rest}", UserWarning, stacklevel=4)


def _front(result: dict, plan: EvaluationPlan) -> dict | None:
    if not plan.tasks or not (plan.reward_model or plan.pairs):
        return None
    kept = plan.reference is not None and result["reference"]["ability_kept"] is not None
    x = ("ability_kept", "ability kept (mean over tasks of score / the reference's)") if kept else (
        "ability_mean", "ability (mean task score)")  # fmt: skip
    if plan.reward_model:
        y = ("reward", f"reward ({plan.reward_model.name}, mean over {len(plan.prompts)} prompts)")
    else:
        y = ("proxy_reward.margin", f"PROXY reward: DPO margin on held-out pairs (β={plan.beta:g})")
    return {"x": x[0], "x_label": x[1], "y": y[0], "y_label": y[1]}


def point_value(point: dict, key: str) -> float | None:
    """``point[a][b]`` for the key ``"a.b"``; None where missing."""
    value = point
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def format_table(result: dict) -> str:
    """The result as a table, one row per checkpoint (the reference first), and what each column means."""
    points = [("reference", result["reference"])] if result["reference"] else []
    points += [(p["label"], p) for run in result["runs"] for p in run["checkpoints"]]
    columns = [(task, f"ability.{task}.score") for task in result["tasks"]]
    if result["tasks"]:
        columns += [("ability", "ability_mean")] + [("kept", "ability_kept")] * (result["reference"] is not None)
    if "reward_model" in result:
        columns.append(("reward", "reward"))
    if "proxy_reward" in result:
        columns += [("proxy acc", "proxy_reward.accuracy"), ("proxy margin", "proxy_reward.margin")]
    width = max(len("checkpoint"), *(len(label) for label, _ in points))
    lines = [f"{'checkpoint':<{width}} " + " ".join(f"{name:>{max(len(name), 7)}}" for name, _ in columns)]
    for label, point in points:
        cells = []
        for name, key in columns:
            value = point_value(point, key)
            shown = f"{value:.3f}" if value is not None else "n/a" if key == "ability_kept" else "-"
            cells.append(f"{shown:>{max(len(name), 7)}}")
        lines.append(f"{label:<{width}} " + " ".join(cells))
    if result["tasks"]:
        first = points[0][1]["ability"]
        metrics = ", ".join(f"{task} {first[task]['metric']} on {first[task]['samples']} docs" for task in first)
        kept = "; kept: the mean over tasks of score / the reference's" if result["reference"] else ""
        undefined = [task for task, value in first.items() if value.get("kept", 0) is None]
        if undefined:
            kept += (f", leaving out {', '.join(undefined)}: the reference scores 0 there, so the fraction kept is "
                     f"undefined (n/a)")  # fmt: skip
        lines.append(f"ability: lm-eval's score per task ({metrics}), then its mean{kept}.")
    if "reward_model" in result:
        info = result["reward_model"]
        lines.append(f"reward: mean score of {info['path']} on the policy's {info['decoding']} responses to "
                     f"{info['prompts']} prompts (at most {info['max_new_tokens']} new tokens).")  # fmt: skip
    if "proxy_reward" in result:
        lines.append(f"proxy acc, proxy margin: a {PROXY_NOTE} ({result['proxy_reward']['pairs']} pairs, β="
                     f"{result['proxy_reward']['beta']:g}).")  # fmt: skip
    return "\n".join(lines)
