"""LoRA through recipes and `online-merging train`: TRL's PEFT keys, the refusals, the merged model as the run's
model, and a killed LoRA run resumed bit for bit."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trl import ModelConfig

from online_merging.cli import main
from online_merging.integrations import load_recipe, run_recipe
from online_merging.integrations.recipe import PEFT_DEFAULTS, RecipeArguments

ROOT = Path(__file__).resolve().parents[1]
LORA = str(ROOT / "recipes" / "dpo_onties_lora.yaml")
QUICK = ["--embedded_world", "quick", "--per_device_train_batch_size", "4", "--logging_steps", "1"]


def test_the_peft_keys_are_trls_with_trls_defaults():
    trl_fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    ours = {f.name: f for f in dataclasses.fields(RecipeArguments)}
    for key, default in PEFT_DEFAULTS.items():
        assert trl_fields[key].default == default == ours[key].default, key
    assert ours["use_peft"].default is trl_fields["use_peft"].default is False


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"lora_r": 8}, "recipe key 'lora_r' is set but use_peft is not"),
        ({"use_peft": True, "load_in_4bit": True}, "'load_in_4bit': online merging adds τ into the base weights"),
        ({"use_peft": True, "use_dora": True}, "'use_dora': online merging supports LoRA adapters only"),
        ({"use_peft": True, "neuron_k": 0.1}, "'neuron_k' does not run with use_peft"),
        ({"use_peft": True, "lora_r": 0}, "Invalid recipe key 'lora_r'"),
        ({"use_peft": True, "load_in_8bit": True, "merge": "none"}, "need bitsandbytes"),
    ],
)
def test_bad_peft_keys_are_named_before_any_model_loads(keys, message):
    if "bitsandbytes" in message and torch.cuda.is_available():
        pytest.skip("a GPU machine may have bitsandbytes")
    with pytest.raises(ValueError, match=message):
        RecipeArguments(**keys)


def test_the_lora_run_writes_its_merged_model_and_scores_it(tmp_path, world_cache):
    """output_dir holds the run's model merged (no adapter tensors); loaded again it scores what the run reported;
    the layers without adapters are the SFT model's, bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from online_merging.world import WorldConfig, build_world

    out = tmp_path / "out"
    assert main(["train", LORA, *QUICK, "--max_steps", "3", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [run["method"] for run in summary["runs"]] == ["lora_onties", "lora_adamw"]
    world = build_world(WorldConfig.quick(), cache_dir=world_cache, progress=False)
    sft = load_file(world.sft_dir / "model.safetensors")
    for run in summary["runs"]:
        saved = load_file(Path(run["output_dir"]) / "model.safetensors")
        assert saved.keys() == sft.keys()  # merged: plain names, no lora_A/lora_B
        adapted = [name for name in sft if "self_attn" in name or "mlp" in name]
        assert all(not torch.equal(saved[name], sft[name]) for name in adapted)
        assert all(torch.equal(saved[name], sft[name]) for name in sft if "norm" in name or "embed" in name)
        model = AutoModelForCausalLM.from_pretrained(run["output_dir"])
        tokenizer = AutoTokenizer.from_pretrained(run["output_dir"])
        assert world.evaluate(model, tokenizer)["reward"] == pytest.approx(run["evaluation"]["reward"], abs=1e-6)


def test_a_killed_lora_run_resumes_bit_for_bit(tmp_path, world_cache, monkeypatch):
    """The checkpoint holds the adapter and the optimizer's state, with the base weights τ was merged into: resumed
    through the command, the run ends where the uninterrupted one does."""
    from transformers import Trainer

    saving = ["--save_strategy", "steps", "--save_steps", "2", "--compare_with_adamw", "false"]
    keys = [*QUICK, "--max_steps", "4", *saving]
    assert main(["train", LORA, *keys, "--output_dir", str(tmp_path / "full")]) == 0
    save = Trainer._save_checkpoint

    def save_then_die(trainer, *args, **kwargs):
        save(trainer, *args, **kwargs)
        if trainer.state.global_step == 2:
            raise KeyboardInterrupt

    out = tmp_path / "killed"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(*load_recipe(LORA, [*keys, "--output_dir", str(out)]), progress=False)
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert main(["train", LORA, *keys, "--output_dir", str(out), "--resume_from_checkpoint", "true"]) == 0
    full, resumed = (load_file(root / "model.safetensors") for root in (tmp_path / "full", out))
    assert full.keys() == resumed.keys()
    for name, tensor in full.items():
        assert torch.equal(resumed[name], tensor), name
