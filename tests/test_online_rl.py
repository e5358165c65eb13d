"""Online RL: TRL's GRPO and RLOO trainers drive the online-merging optimizer as the float64 reference says (through
the API and through use_online_merging_optimizer), the world's verifiable rewards, and GRPO/RLOO recipes."""

import json
from pathlib import Path

import pytest
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from online_merging.cli import main
from online_merging.integrations import build_optimizer, load_recipe, use_online_merging_optimizer
from online_merging.integrations.recipe import RecipeArguments
from online_merging.world.rewards import correct, rl_metrics, style
from online_merging.world.tokenizer import build_tokenizer
from tests.test_integrations import (
    MODES,
    StepRecorder,
    assert_follows_reference,
    common_args,
    initial_weights,
)

ROOT = Path(__file__).resolve().parents[1]
GRPO = str(ROOT / "recipes" / "grpo_onties.yaml")
STEPS = 4
TRAINERS = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}


def prompts(n: int = 16) -> Dataset:
    questions = [(f"{a}+{b}", str(a + b)) for a, b in zip(range(n), range(3, n + 3), strict=True)]
    return Dataset.from_dict({"prompt": [f"Q: {q} A:" for q, _ in questions], "answer": [a for _, a in questions]})


def length_reward(completions, **_):
    """A dense reward (the tiny random model is never right): so every group has a spread and gradients flow."""
    return [float(len(c)) for c in completions]


def rl_args(kind: str, tmp_path, **overrides):
    settings = {**common_args(tmp_path, **overrides), "per_device_train_batch_size": 8}
    return TRAINERS[kind][1](**settings, num_generations=4, max_completion_length=6, beta=0.0)


@pytest.mark.parametrize("mode", ["ondare", "onties"])
@pytest.mark.parametrize("kind", TRAINERS)
def test_rl_trainer_steps_follow_the_reference(tmp_path, sft_and_base, kind, mode):
    """``optimizers=(build_optimizer(...), None)``: every step the trainer takes is the reference's, on the gradients
    and learning rates it handed the optimizer."""
    sft, base = sft_and_base
    initial = initial_weights(sft)
    args = rl_args(kind, tmp_path)
    optimizer = build_optimizer(sft, args, base_model=base, **MODES[mode])
    recorder = StepRecorder(optimizer, sft)
    trainer = TRAINERS[kind][0](
        model=sft, reward_funcs=length_reward, args=args, train_dataset=prompts(), processing_class=build_tokenizer(),
        optimizers=(optimizer, None),
    )  # fmt: skip
    trainer.train()
    assert_follows_reference(sft, optimizer, initial, optimizer.task_vector, recorder, steps=STEPS)


@pytest.mark.parametrize("kind", TRAINERS)
def test_use_online_merging_optimizer_builds_ours_in_rl_trainers(tmp_path, sft_and_base, kind):
    sft, base = sft_and_base
    args = rl_args(kind, tmp_path)
    trainer = TRAINERS[kind][0](
        model=sft, reward_funcs=length_reward, args=args, train_dataset=prompts(), processing_class=build_tokenizer()
    )
    use_online_merging_optimizer(trainer, base_model=base, merge="onties")
    before = initial_weights(sft)
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "OnlineMergingAdam"
    assert any((p.detach() != before[n]).any() for n, p in sft.named_parameters())


def test_world_rewards_check_replies():
    assert correct([" 12", " sure, 12", " 12<eos>junk", " 13", "12 "], ["12"] * 5) == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert style([" sure, 3", " 3", "sure,"], answer=["3"] * 3) == [1.0, 0.0, 1.0]
    metrics = {"reward": 0.2, "ability/addition": 0.1, "ability/facts": 0.8, "ability/reversal": 0.6}
    greedy = {"reward_greedy": 0.3, "ability_greedy/addition": 0.0, "ability_greedy/facts": 1.0}
    figures = rl_metrics({**metrics, **greedy, "ability_greedy/reversal": 0.5}, "addition")
    assert figures["reward"] == 0.1 and figures["style_reward"] == 0.2 and figures["ability"] == pytest.approx(0.7)
    assert figures["reward_greedy"] == 0.0 and figures["style_reward_greedy"] == 0.3
    assert figures["ability_greedy"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="Invalid skill: 'poetry'"):
        rl_metrics({"reward": 0.0, "ability/facts": 1.0}, "poetry")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--reward_funcs", "nowhere"], "'nowhere' is neither the world's"),
        (["--reward_funcs", "json:nothing_here"], "'json' has no 'nothing_here'"),
        (["--reward_funcs", "no_such_module_x:f"], "cannot import 'no_such_module_x'"),
    ],
)
def test_reward_functions_are_found_before_any_model_loads(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(GRPO, overrides)
    with pytest.raises(ValueError, match="'reward_funcs' is for trainer grpo or rloo, not 'dpo'"):
        RecipeArguments(trainer="dpo", reward_funcs=["correct"])
    recipe, _ = load_recipe(GRPO, ["--reward_funcs", "correct", "json:dumps"])
    assert [f.__name__ for f in recipe.rewards()] == ["correct", "dumps"]


@pytest.mark.parametrize("kind", TRAINERS)
def test_an_rl_recipe_trains_on_the_world_and_scores_the_skill(kind, tmp_path, world_cache, capsys):
    out = tmp_path / "out"
    keys = ["--embedded_world", "quick", "--max_steps", "2", "--per_device_train_batch_size", "8"]
    assert main(["train", GRPO, "--trainer", kind, *keys, "--num_generations", "4", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [run["method"] for run in summary["runs"]] == [f"{kind}_onties", f"{kind}_adamw"]
    sft, skill = summary["sft"], summary["recipe"]["rl_skill"]
    assert sft["reward"] == sft[f"ability/{skill}"] and sft["style_reward"] >= 0
    assert sft["ability"] == pytest.approx(
        sum(v for k, v in sft.items() if k.startswith("ability/") and k != f"ability/{skill}") / 3
    )
    assert f"held-out {skill} prompts" in capsys.readouterr().out


def test_an_rl_runs_mra_reads_the_share_of_sft_errors_removed():
    """``train``'s MRA for GRPO/RLOO: the reward axis is (r − r_sft) / (1 − r_sft) at RL_LEVELS, checked against a
    hand-made path whose crossings are known."""
    from online_merging.evaluation.fronts import RL_LEVELS
    from online_merging.integrations.run import matched_reward

    sft = {"reward": 0.8, "ability": 0.5}
    # errors removed 0.25 then 0.5 (rewards 0.85, 0.9); ability kept 0.9 then 0.8
    run = {"method": "grpo", "trajectory": [{"reward": 0.85, "ability": 0.45}, {"reward": 0.9, "ability": 0.4}]}
    found = matched_reward(sft, [run], rl=True)
    assert found["levels"] == [x for x in RL_LEVELS if x <= 0.5] == [0.1, 0.2, 0.3, 0.4, 0.5]
    # the path (0, 1) → (0.25, 0.9) → (0.5, 0.8), read where it crosses each level
    expected = [1 - 0.1 * x / 0.25 for x in (0.1, 0.2)] + [0.9 - 0.1 * (x - 0.25) / 0.25 for x in (0.3, 0.4, 0.5)]
    assert found["mra"]["grpo"] == pytest.approx(sum(expected) / 5)
    assert matched_reward(sft, [run])["levels"] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # DPO's: the raw reward
