"""Recipes parse, bad ones are refused with the key at fault, and `online-merging train` runs each of them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import DPOConfig, GRPOConfig, KTOConfig

from online_merging.cli import main
from online_merging.integrations import load_recipe, run_recipe
from online_merging.integrations.run import _scorer, matched_reward, method_name, pipeline_name
from online_merging.lab import LabConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
QUICK = ["--embedded_world", "quick", "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1"]


def test_the_four_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"dpo_recommended", "dpo_ondare", "dpo_onties", "kto_ondare", "dpo_adamw"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_and_runs_offline(path):
    recipe, config = load_recipe(path)
    assert isinstance(config, {"dpo": DPOConfig, "kto": KTOConfig, "grpo": GRPOConfig}[recipe.trainer])
    assert path.stem.startswith(recipe.trainer)
    assert config.beta == (0.0 if recipe.trainer in ("grpo", "rloo") else 0.1)  # TRL's GRPO default: no KL
    if recipe.merge != "none" and path.stem != "dpo_recommended":  # a pipeline: tested against the lab below
        assert path.stem.removesuffix("_lora").endswith(recipe.merge)
    assert recipe.use_peft == ("lora" in path.stem)
    assert recipe.embedded  # runs offline as written
    assert not config.bf16 or torch.cuda.is_available()


TUNED = json.loads((ROOT / "docs" / "results" / "held_out" / "tuned.json").read_text())["methods"]
LAB_METHODS = {
    "dpo_onties": ("onties", "adamw"),
    "dpo_ondare": ("ondare", "adamw"),
    "kto_ondare": ("kto_ondare", "kto_adamw"),
}


@pytest.mark.parametrize("stem", LAB_METHODS)
def test_merge_recipes_carry_the_labs_tuned_settings(stem):
    """The recipes' merge settings and learning rates are the tax lab's held-out tuning (docs/results.md), on its
    protocol (its steps at a constant learning rate), and each is compared with AdamW at AdamW's own tuned rate."""
    method, baseline = LAB_METHODS[stem]
    recipe, config = load_recipe(ROOT / "recipes" / f"{stem}.yaml")
    tuned, lab = TUNED[method], LabConfig()
    assert (recipe.merge, recipe.reserve_p, recipe.alpha, recipe.alpha_unit) == (
        tuned["merge"],
        tuned["reserve_p"],
        tuned["alpha"],
        tuned["alpha_unit"],
    )
    assert config.learning_rate == pytest.approx(tuned["lr"] * lab.lr)
    assert recipe.adamw_learning_rate == pytest.approx(TUNED[baseline]["lr"] * lab.lr)
    assert (config.max_steps, config.lr_scheduler_type, config.per_device_train_batch_size) == (
        lab.steps,
        "constant",
        lab.batch_size,
    )
    assert recipe.tax_eval_every == lab.eval_every


LORA_TUNED = json.loads((ROOT / "docs" / "results" / "lora" / "tuned.json").read_text())["methods"]


def test_lora_recipes_carry_the_labs_tuned_adapter_settings():
    """dpo_onties_lora is the lab's lora_onties beside lora_adamw at its own rate; dpo_lora_recommended is lora_ma:
    its run at lora_ma's rate, averaged with SFT (docs/results.md, LoRA adapters)."""
    lab = LabConfig()
    recipe, config = load_recipe(ROOT / "recipes" / "dpo_onties_lora.yaml")
    tuned = LORA_TUNED["lora_onties"]
    assert (recipe.merge, recipe.reserve_p, recipe.alpha, recipe.alpha_unit, recipe.lora_r) == (
        tuned["merge"], tuned["reserve_p"], tuned["alpha"], tuned["alpha_unit"], tuned["lora_r"])  # fmt: skip
    assert config.learning_rate == pytest.approx(lab.lr * tuned["lr"])
    assert recipe.adamw_learning_rate == pytest.approx(lab.lr * LORA_TUNED["lora_adamw"]["lr"])
    recipe, config = load_recipe(ROOT / "recipes" / "dpo_lora_recommended.yaml")
    tuned = LORA_TUNED["lora_ma"]
    assert recipe.merge == "none" and recipe.use_peft and recipe.lora_r == tuned["lora_r"]
    assert config.learning_rate == pytest.approx(lab.lr * tuned["lr"])
    assert recipe.average_with_sft in tuned["merge_weights"]
    assert config.max_steps == lab.steps and config.lr_scheduler_type == "constant"


def test_the_main_job_is_the_labs_recommended_pipeline():
    """README's main job (and CI's) is recipes/dpo_recommended.yaml, and its settings are the pipeline the lab
    recommends (docs/results/pipelines/results.json): optimizer, merge, loss, learning rates, the offline average."""
    results = json.loads((ROOT / "docs" / "results" / "pipelines" / "results.json").read_text())
    setting, lab = results["recommended"]["setting"], LabConfig()
    main_job = re.search(r"online-merging train (\S+) +# the main job", (ROOT / "README.md").read_text())
    assert main_job and main_job[1] == "dpo_recommended"  # by name: the recipe ships in the package
    assert f"online-merging train {main_job[1]} " in (ROOT / ".ci" / "run").read_text()
    recipe, config = load_recipe(main_job[1])
    assert recipe.merge == (setting.get("merge") or "none")
    for key in ("reserve_p", "alpha", "alpha_unit", "pull"):
        if key in setting:
            assert getattr(recipe, key) == setting[key], key
    assert config.learning_rate == pytest.approx(setting.get("lr", 1.0) * lab.lr)
    assert recipe.adamw_learning_rate == pytest.approx(results["settings"]["adamw"]["lr"] * lab.lr)
    if setting.get("rpo_weight"):
        assert (config.loss_type, config.loss_weights) == (["sigmoid", "sft"], [1.0, setting["rpo_weight"]])
    else:
        assert config.loss_type == ["sigmoid"]
    assert (recipe.average_with_sft is not None) == ("merge_weights" in setting)
    assert recipe.average_with_sft is None or recipe.average_with_sft in setting["merge_weights"]
    protocol = (config.max_steps, config.lr_scheduler_type, recipe.tax_eval_every)
    assert protocol == (lab.steps, "constant", lab.eval_every)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_a_duplicate_key_and_an_empty_recipe_are_refused(tmp_path):
    """YAML would take a duplicate key's last value silently (trained at 1e-3, not 9e-5); an empty recipe would
    train every default into TRL's default output_dir."""
    with pytest.raises(ValueError, match=r"line 3 column 1: duplicate key 'learning_rate'"):
        load_recipe(write(tmp_path, "learning_rate: 9.0e-5\nbeta: 0.1\nlearning_rate: 1.0e-3\n"))
    for text in ("", "# only a comment\n", "{}\n"):
        with pytest.raises(ValueError, match="the recipe is empty"):
            load_recipe(write(tmp_path, text))


def test_unknown_key_is_named_in_one_line_that_points_to_the_valid_keys(tmp_path):
    path = write(tmp_path, "merge: ondare\nlearnin_rate: 1.0e-5\n")
    with pytest.raises(ValueError, match=r"unknown key 'learnin_rate' \(did you mean 'learning_rate'") as error:
        load_recipe(path)
    assert str(error.value).endswith("`online-merging train RECIPE.yaml --help` lists every key")
    assert "\n" not in str(error.value)


def test_unknown_override_is_named(tmp_path):
    path = write(tmp_path, "merge: ondare\n")
    with pytest.raises(ValueError, match=r"unknown override '--alpah' \(did you mean 'alpha'"):
        load_recipe(path, ["--alpah", "0.1"])


def test_bad_values_name_the_key(tmp_path):
    path = write(tmp_path, "merge: ondare\n")
    with pytest.raises(ValueError, match=r"--merge: invalid choice: 'dare'"):
        load_recipe(path, ["--merge", "dare"])
    with pytest.raises(ValueError, match=r"--max_steps.*invalid int value: 'many'"):
        load_recipe(path, ["--max_steps", "many"])
    with pytest.raises(ValueError, match=r"'trainer': 'ppo'"):
        load_recipe(write(tmp_path, "trainer: ppo\n"))
    with pytest.raises(ValueError, match=r"a mapping of keys to values"):
        load_recipe(write(tmp_path, "- merge\n"))


def test_bad_allo_keys_are_named(tmp_path):
    path = write(tmp_path, "merge: none\n")
    with pytest.raises(ValueError, match=r"'neuron_k': 1\.5"):
        load_recipe(path, ["--neuron_k", "1.5"])
    with pytest.raises(ValueError, match=r"'noisy_token_percentile': 5\.0"):
        load_recipe(path, ["--noisy_token_percentile", "5"])
    with pytest.raises(ValueError, match="'unlearn_steps': -1"):
        load_recipe(path, ["--unlearn_steps", "-1"])
    with pytest.raises(ValueError, match="need trainer: dpo"):
        load_recipe(path, ["--trainer", "kto", "--unlearn_steps", "5"])


def test_missing_recipe_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"recipe file not found: '.*nowhere\.yaml'"):
        load_recipe(tmp_path / "nowhere.yaml")


def test_overrides_win_and_trainer_picks_the_config(tmp_path):
    path = write(tmp_path, "merge: ondare\nalpha: 1.0e-7\nlearning_rate: 1.0e-5\n")
    recipe, config = load_recipe(path, ["--alpha", "0.5", "--learning_rate=3e-6", "--trainer", "kto"])
    assert (recipe.alpha, config.learning_rate, type(config)) == (0.5, 3e-6, KTOConfig)


def test_a_named_model_needs_a_base_for_merging(tmp_path):
    path = write(tmp_path, "merge: ondare\nmodel_name_or_path: some/sft\n")
    with pytest.raises(ValueError, match="needs τ = SFT − base: set base_model_name_or_path"):
        load_recipe(path)


def test_a_hub_id_offline_gets_an_error_that_says_how_to_use_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: the env var is too late
    path = write(tmp_path, "model_name_or_path: nobody/sft-model\nbase_model_name_or_path: nobody/base\n")
    recipe, config = load_recipe(path, ["--output_dir", str(tmp_path / "out"), "--dataset_name", "nobody/data"])
    with pytest.raises(OSError, match=r"dataset_name: 'nobody/data' is not a local path.*--local-dir DIR"):
        run_recipe(recipe, config)  # the data set first: it is read before any model loads


# -- the command on the embedded default (its quick world) ------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_train_command_runs_each_recipe_on_the_embedded_default(path, tmp_path, world_cache, capsys):
    out = tmp_path / "out"
    recipe, written = load_recipe(path)
    quick = [*QUICK, "--num_generations", "4"] if recipe.trainer == "grpo" else QUICK  # 4 completions per step
    assert main(["train", str(path), *quick, "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    methods = [run["method"] for run in summary["runs"]]
    with_baseline = recipe.adamw_baseline() is not None
    baseline = ("lora_" if recipe.use_peft else "") + "adamw"
    baseline = f"grpo_{baseline}" if recipe.trainer == "grpo" else baseline
    assert methods == [method_name(recipe, written), *([baseline] if with_baseline else [])]
    recipe, config = load_recipe(path, quick)
    rates = [config.learning_rate, *([recipe.adamw_learning_rate or config.learning_rate] if with_baseline else [])]
    for run, rate in zip(summary["runs"], rates, strict=True):  # the baseline at its own learning rate
        assert run["steps"] == 2 and run["learning_rate"] == rate
        assert {"reward", "ability", "reward_greedy", "ability_greedy"} <= set(run["evaluation"])
        assert run["trajectory"][-1] == {"step": 2, "reward": run["evaluation"]["reward"],
                                         "ability": run["evaluation"]["ability"]}  # fmt: skip
        assert (Path(run["output_dir"]) / "config.json").is_file()
    assert summary["sft"]["ability"] >= 0
    pipelines = {pipeline_name(run) for run in summary["runs"] if run["average"]}  # the run averaged with SFT
    assert set(summary["matched_reward"]["mra"]) == set(methods) | pipelines
    printed = capsys.readouterr().out
    assert "retained" in printed and "MRA" in printed and f"model saved in {out}" in printed


def test_tax_eval_every_records_the_trajectory(tmp_path, world_cache):
    out = tmp_path / "out"
    recipe = ["train", str(ROOT / "recipes" / "dpo_onties.yaml"), *QUICK, "--max_steps", "3", "--tax_eval_every", "2"]
    assert main([*recipe, "--output_dir", str(out)]) == 0
    for run in json.loads((out / "summary.json").read_text())["runs"]:
        assert [point["step"] for point in run["trajectory"]] == [2, 3]  # every 2 steps, and the end
        assert run["trajectory"][-1]["reward"] == run["evaluation"]["reward"]
    named = ["--model_name_or_path", "org/sft", "--base_model_name_or_path", "org/base"]
    with pytest.raises(ValueError, match="'tax_eval_every': 4 on a named model needs tax_eval_reward_model, tax_eval"):
        load_recipe(ROOT / "recipes" / "dpo_onties.yaml", [*named, "--tax_eval_tasks", "arc_easy"])
    recipe, _ = load_recipe(ROOT / "recipes" / "dpo_onties.yaml", named)  # no tax_eval_* key: not scored, said so
    with pytest.warns(UserWarning, match="tax_eval_every: 4 is ignored: a named model is scored during training only"):
        assert _scorer(recipe, None) is None


def test_matched_reward_reads_each_run_at_the_levels_all_reach():
    """By hand: SFT (reward 0.2, ability 0.5); A ends at (0.4, 0.5), B at (0.6, 0.25). Both reach 0.3 and 0.4; A
    keeps all its ability there, B (on the line from (0.2, 1) to (0.6, 0.5) in ability kept) 0.875 and 0.75."""
    sft = {"reward": 0.2, "ability": 0.5}
    runs = [
        {"method": "a", "trajectory": [{"step": 4, "reward": 0.4, "ability": 0.5}]},
        {"method": "b", "trajectory": [{"step": 2, "reward": 0.4, "ability": 0.375},
                                       {"step": 4, "reward": 0.6, "ability": 0.25}]},
    ]  # fmt: skip
    result = matched_reward(sft, runs)
    assert result["levels"] == pytest.approx([0.3, 0.4])
    assert result["mra"] == pytest.approx({"a": 1.0, "b": (0.875 + 0.75) / 2})


def test_average_with_sft_writes_the_pipelines_model_and_scores_its_sweep(tmp_path, world_cache, capsys):
    """The averaged model is α·θ_run + (1 − α)·θ_sft of the saved run and SFT models, computed here apart; the
    pipeline's path is SFT, the α sweep and the run's model; the AdamW baseline is neither averaged nor pulled."""
    from safetensors.torch import load_file

    from online_merging.world import WorldConfig, build_world

    out = tmp_path / "out"
    recipe = ["train", str(ROOT / "recipes" / "dpo_onties.yaml"), *QUICK, "--tax_eval_every", "1"]
    assert main([*recipe, "--average_with_sft", "0.3", "--pull", "50", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    onties, adamw = summary["runs"]
    assert adamw["average"] is None and summary["recipe"]["pull"] == 50
    world = build_world(WorldConfig.quick(), cache_dir=world_cache, progress=False)
    sft = load_file(world.sft_dir / "model.safetensors")
    run, averaged = (load_file(path / "model.safetensors") for path in (out, out / "average_with_sft"))
    for name, tensor in averaged.items():
        torch.testing.assert_close(tensor, 0.3 * run[name] + 0.7 * sft[name], rtol=0, atol=1e-7)
    average = onties["average"]
    assert [p["weight"] for p in average["sweep"]] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert average["evaluation"]["reward"] == average["sweep"][2]["reward"]
    rewards = [p["reward"] for p in average["sweep"]]  # the sweep scores the averages, not the trained model again
    assert len(set(rewards)) == len(rewards) and rewards[0] != onties["evaluation"]["reward"]
    assert onties["method"] == "onties_pull" and "onties_pull+ma" in summary["matched_reward"]["mra"]
    assert f"onties_pull+ma: model saved in {out / 'average_with_sft'}" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"'average_with_sft': 1\.5"):
        load_recipe(ROOT / "recipes" / "dpo_onties.yaml", ["--average_with_sft", "1.5"])
    with pytest.raises(ValueError, match=r"pull_elements.*invalid choice: 'most'"):
        load_recipe(ROOT / "recipes" / "dpo_onties.yaml", ["--pull_elements", "most"])


@pytest.mark.filterwarnings("ignore:gradient entanglement")  # may fire on the tiny run; tested in test_diagnostics
def test_one_flag_turns_on_the_entanglement_monitor(tmp_path, world_cache):
    out = tmp_path / "out"
    recipe = ["train", str(ROOT / "recipes" / "kto_ondare.yaml"), *QUICK, "--compare_with_adamw", "false"]
    assert main([*recipe, "--entanglement_every", "1", "--output_dir", str(out)]) == 0
    assert (out / "entanglement.png").stat().st_size > 0


def test_one_flag_turns_on_pairwise_normalized_dpo(tmp_path, world_cache):
    out = tmp_path / "out"
    recipe = ["train", str(ROOT / "recipes" / "dpo_ondare.yaml"), *QUICK, "--compare_with_adamw", "false"]
    assert main([*recipe, "--pairwise_normalized", "true", "--output_dir", str(out)]) == 0
    (run,) = json.loads((out / "summary.json").read_text())["runs"]
    assert run["method"] == "ondare_normalized"
    assert run["train_metrics"]["normalized/norm_chosen"] > 0  # logged by PairwiseNormalizedDPOTrainer
    with pytest.raises(ValueError, match="pairwise_normalized needs trainer: dpo"):
        load_recipe(ROOT / "recipes" / "kto_ondare.yaml", ["--pairwise_normalized", "true"])


def test_train_help_lists_every_key(capsys):
    assert main(["train", str(ROOT / "recipes" / "kto_ondare.yaml"), "--help"]) == 0
    printed = capsys.readouterr().out
    assert "--reserve_p" in printed and "--desirable_weight" in printed


def test_accelerate_launch_runs_a_recipe(tmp_path, world_cache):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "online_merging.cli", "train",
        str(ROOT / "recipes" / "dpo_ondare.yaml"), *QUICK, "--compare_with_adamw", "false", "--output_dir", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [run["method"] for run in summary["runs"]] == ["ondare"]
    assert summary["runs"][0]["steps"] == 2


def test_tax_eval_on_a_named_model_scores_lm_eval_tasks_and_a_reward_model(tmp_path):
    """A named model's runs are scored every N steps on lm-eval tasks (ability) and by a reward model (reward), and
    compared at matched reward: the final figures equal those functions called on the saved models."""
    pytest.importorskip("lm_eval")
    from online_merging.evaluation import ability_scores, load_reward_model, reward_score
    from online_merging.world.tokenizer import build_tokenizer
    from tests import evaluation_files as files

    sft, base = files.save_causal_lm(tmp_path / "sft", 0), files.save_causal_lm(tmp_path / "base", 1)
    data = files.write_jsonl(tmp_path / "pairs.jsonl", files.pairs() * 3)
    prompts = files.write_jsonl(tmp_path / "prompts.jsonl", files.prompts())
    tasks, reward_model = files.write_tasks(tmp_path / "tasks"), files.save_reward_model(tmp_path / "rm")
    out = tmp_path / "out"
    command = [
        "train", str(ROOT / "recipes" / "dpo_onties.yaml"), "--model_name_or_path", str(sft),
        "--base_model_name_or_path", str(base), "--dataset_name", str(data), "--compare_with_adamw", "true",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--tax_eval_every", "1",
        "--tax_eval_tasks", "tiny_choice", "--tax_eval_include_path", str(tasks), "--tax_eval_reward_model",
        str(reward_model), "--tax_eval_prompts", str(prompts), "--tax_eval_max_new_tokens", "3",
        "--output_dir", str(out),
    ]  # fmt: skip
    assert main(command) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["matched_reward"]["mra"]) == {"onties", "adamw"}
    judge, judge_tokenizer = load_reward_model(reward_model)
    tokenizer = build_tokenizer()
    for run in summary["runs"]:
        assert [p["step"] for p in run["trajectory"]] == [1, 2]
        model = AutoModelForCausalLM.from_pretrained(run["output_dir"])
        ability = ability_scores(model, tokenizer, ["tiny_choice"], include_path=tasks, limit=64)["tiny_choice"].score
        reward = reward_score(model, tokenizer, judge, judge_tokenizer, [p["prompt"] for p in files.prompts()],
                              max_new_tokens=3)  # fmt: skip
        assert run["evaluation"]["ability"] == pytest.approx(ability)
        assert run["evaluation"]["reward"] == pytest.approx(reward)
        assert (Path(run["output_dir"]) / "tax_front.png").is_file()
