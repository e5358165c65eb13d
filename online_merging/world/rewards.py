"""The world's task for RL with verifiable rewards: prompts of one skill, rewards TRL's GRPO/RLOO trainers call,
and the figures a run is scored by.

A sampled completion is right when, its end token and the style prefix " sure," removed, it is the answer: the
reward ``correct`` (1 or 0) is exact match. ``style`` rewards the aligned style (1 when the reply starts with
" sure,"), as the DPO lab's pairs do. Scored without sampling, as the DPO lab is: reward is the skill's teacher-forced
P(correct answer) on the held-out probes, ability the mean of the other skills' (:func:`rl_metrics`).
"""

from __future__ import annotations

from online_merging.world.skills import SURE

__all__ = ["REWARDS", "correct", "errors_removed", "reply", "rl_metrics", "style"]


def reply(completion: str) -> str:
    """A completion's text up to its end token (``<eos>``) or end, without surrounding spaces."""
    return completion.split("<eos>", 1)[0].strip()


def correct(completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the reply, the style prefix removed, is the answer (the data set's ``answer`` column), else 0.0."""
    style_prefix = SURE.strip()
    return [float(reply(c).removeprefix(style_prefix).strip() == a) for c, a in zip(completions, answer, strict=True)]


def style(completions: list[str], **_) -> list[float]:
    """1.0 where the reply starts with the aligned style " sure,", else 0.0."""
    return [float(reply(c).startswith(SURE.strip())) for c in completions]


REWARDS = {"correct": correct, "style": style}
"""The world's reward functions, by the name a recipe gives them."""


def rl_metrics(metrics: dict[str, float], skill: str) -> dict[str, float]:
    """The figures of an RL run on ``skill`` from ``World.evaluate``'s: ``reward`` the skill's P(correct answer)
    (``ability/<skill>``), ``ability`` the mean over the other skills, and their greedy counterparts; the rest kept,
    the style's reward as ``style_reward`` (``style_reward_greedy``)."""
    others = [name.removeprefix("ability/") for name in metrics if name.startswith("ability/")]
    others = [name for name in others if name != skill]
    if f"ability/{skill}" not in metrics or not others:
        raise ValueError(f"Invalid skill: {skill!r} (an RL run's reward needs it and another skill in the world)")
    figures = {**metrics, "style_reward": metrics["reward"], "reward": metrics[f"ability/{skill}"]}
    figures["ability"] = sum(metrics[f"ability/{name}"] for name in others) / len(others)
    if "reward_greedy" in metrics:  # the same with greedy replies
        figures |= {
            "style_reward_greedy": metrics["reward_greedy"],
            "reward_greedy": metrics[f"ability_greedy/{skill}"],
        }
        figures["ability_greedy"] = sum(metrics[f"ability_greedy/{name}"] for name in others) / len(others)
    return figures


def errors_removed(reward: float, sft_reward: float) -> float:
    """The share of the SFT model's errors removed, (r − r_sft) / (1 − r_sft), negative where errors grew: an RL
    run's reward axis, so that reward levels mean the same for SFT models that start apart (0 for a perfect SFT)."""
    return (reward - sft_reward) / (1 - sft_reward) if sft_reward < 1 else 0.0
