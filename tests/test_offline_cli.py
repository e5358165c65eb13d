"""`online-merging merge` and `evaluate` on the embedded default's SFT and a DPO model trained from it."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from online_merging.cli import main
from online_merging.offline import METHODS, HMAResult, MergeSpec, merge, mergekit_config
from online_merging.world import WorldConfig, build_world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(world_cache, tmp_path_factory):
    """(base, sft, aligned) directories of the quick world, the aligned one from 2 DPO steps."""
    world = build_world(WorldConfig.quick(), progress=False)
    aligned = tmp_path_factory.mktemp("aligned")
    quick = ["--embedded_world", "quick", "--max_steps", "2", "--per_device_train_batch_size", "4"]
    assert main(["train", str(ROOT / "recipes" / "dpo_adamw.yaml"), *quick, "--output_dir", str(aligned)]) == 0
    return world.base_dir, world.sft_dir, aligned


OPTIONS = {"ma": ["--alpha", "0.3"], "hma": ["--ratios", "0.1,0.9"], "linear": ["--weights", "1,3"],
           "dare": ["--density", "0.5", "--seed", "3"], "ties": ["--density", "0.5"]}  # fmt: skip
SPECS = {"ma": MergeSpec("ma", alpha=0.3), "hma": MergeSpec("hma", ratios=(0.1, 0.9)),
         "linear": MergeSpec("linear", weights=(1, 3)), "dare": MergeSpec("dare", density=0.5, seed=3),
         "ties": MergeSpec("ties", density=0.5)}  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_merge_command_writes_a_loadable_checkpoint_equal_to_the_in_memory_merge(method, checkpoints, tmp_path):
    base, sft, aligned = checkpoints
    out = tmp_path / method
    args = ["merge", "--method", method, "--sft", str(sft), "--aligned", str(aligned), "--base", str(base)]
    assert main([*args, "--out", str(out), *OPTIONS[method], "--mergekit-config"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = merge(SPECS[method], sft=sft, aligned=aligned, base=base)
    assert set(expected) <= set(loaded)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert (out / "tokenizer.json").is_file()
    assert yaml.safe_load((out / "mergekit.yaml").read_text()) == mergekit_config(
        SPECS[method], sft=sft, aligned=aligned, base=base
    )


def test_an_alpha_sweep_writes_one_checkpoint_per_alpha(checkpoints, tmp_path):
    _, sft, aligned = checkpoints
    args = ["merge", "--method", "ma", "--sft", str(sft), "--aligned", str(aligned), "--alpha", "0,1"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    for alpha, source in (("0", sft), ("1", aligned)):
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"ma-{alpha}").state_dict()
        original = AutoModelForCausalLM.from_pretrained(source).state_dict()
        assert all(torch.equal(merged[k], original[k]) for k in original)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--method", "hma", "--ratios", "0.5,1.5"], "Invalid ratios: 1.5"),
        (["--method", "hma", "--ratios", "0.1,0.2,0.3"], "3 blocks for a model of 2 layers"),
        (["--method", "ties", "--density", "0.5", "--no-base"], "needs the base model"),
        (["--method", "ma", "--alpha", "0.2,0.4", "--method", "linear"], "several values sweep MA only"),
        (["--method", "dare", "--density", "0"], "Invalid density: 0.0"),
    ],
)
def test_bad_options_end_in_one_line_naming_them(checkpoints, tmp_path, capsys, options, message):
    base, sft, aligned = checkpoints
    args = ["merge", "--sft", str(sft), "--aligned", str(aligned), "--out", str(tmp_path / "out")]
    if "--no-base" in options:
        options = [o for o in options if o != "--no-base"]
    else:
        args += ["--base", str(base)]
    assert main([*args, *options]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and error.count("\n") == 1


def test_a_missing_checkpoint_is_named(checkpoints, tmp_path, capsys):
    _, sft, _ = checkpoints
    missing = tmp_path / "nowhere"
    args = ["merge", "--method", "ma", "--alpha", "0.5", "--sft", str(sft), "--aligned", str(missing)]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_evaluate_prints_reward_and_ability_of_each_checkpoint(checkpoints, capsys):
    aligned = checkpoints[2]
    assert main(["evaluate", str(aligned), "--embedded_world", "quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["checkpoint", "reward", "ability", "retained"]
    assert lines[1].split()[0] == "sft" and lines[1].split()[-1] == "1.000"
    assert lines[2].split()[0] == str(aligned)


def test_hma_search_command_saves_ratios_that_merge_accepts(checkpoints, tmp_path, capsys):
    _, sft, aligned = checkpoints
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Q: 12+30 A:\nQ: reverse abcd A:\n")
    out = tmp_path / "ratios.json"
    args = ["hma-search", "--sft", str(sft), "--aligned", str(aligned), "--alpha", "0.4", "--blocks", "2"]
    options = ["--prompts", str(prompts), "--steps", "3", "--max-new-tokens", "6", "--out", str(out)]
    assert main([*args, *options]) == 0
    result = HMAResult.load(out)
    assert len(result.ratios) == 2 and sum(result.ratios) / 2 == pytest.approx(0.4, abs=1e-6)
    suggested = capsys.readouterr().out.splitlines()[-1].removeprefix("merge with: online-merging ").split()
    assert main([*suggested, "--out", str(tmp_path / "hma")]) == 0
    assert (tmp_path / "hma" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--alpha", "1.5"], "alpha"), (["--blocks", "5"], "blocks"), (["--prompts", "nowhere.txt"], "nowhere.txt")],
)
def test_hma_search_bad_options_are_named(checkpoints, tmp_path, capsys, options, message):
    _, sft, aligned = checkpoints
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Q: 1+2 A:\n")
    args = ["hma-search", "--sft", str(sft), "--aligned", str(aligned), "--prompts", str(prompts), "--steps", "1"]
    assert main([*args, *options, "--out", str(tmp_path / "r.json")]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
