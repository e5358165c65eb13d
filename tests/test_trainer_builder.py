"""One trainer builder for recipes and the lab: the merge settings declared once (MergeSettings), reaching the
recipe's keys, the lab's runs and the optimizer; the spec each orchestrator builds its trainer from."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from online_merging.integrations.builder import TrainSpec, build_trainer, unlearn
from online_merging.integrations.normalized_dpo import PairwiseNormalizedDPOTrainer
from online_merging.integrations.recipe import MERGE_NAMES, RecipeArguments
from online_merging.integrations.run import _train_spec
from online_merging.lab.runner import UNMERGED, RunConfig
from online_merging.merging import TaskVector
from online_merging.settings import MERGE_DEFAULTS, MergeSettings, merge_fields
from online_merging.world import WorldConfig
from online_merging.world.tokenizer import build_tokenizer
from tests.conftest import preference_data, tiny_llama

SETTINGS = MergeSettings(
    merge="ondare", reserve_p=0.3, alpha=0.05, alpha_unit="absolute", merge_every=2, seed=7, dare_rescale=False,
    tau_mask="every_step", tau_clamp=None, ties_sign="weighted", pull=0.01, pull_unit="absolute", pull_elements="kept",
)  # fmt: skip
"""Every merge setting off its default."""


def _fields(cls) -> dict:
    return {item.name: item.default for item in dataclasses.fields(cls)}


def test_recipe_and_lab_hold_every_merge_setting_with_their_defaults():
    recipe = _fields(RecipeArguments)
    names = [MERGE_NAMES.get(key, key) for key in MERGE_DEFAULTS if key != "merge"]
    assert {name: recipe[name] for name in names} == {
        MERGE_NAMES.get(k, k): v for k, v in MERGE_DEFAULTS.items() if k != "merge"
    }
    assert list(recipe)[list(recipe).index("optimizer") + 1 :][: len(names)] == names  # in MergeSettings' order
    assert recipe["merge"] == MERGE_DEFAULTS["merge"]
    lab = _fields(RunConfig)
    assert {key: lab[key] for key in MERGE_DEFAULTS} == {**MERGE_DEFAULTS, **UNMERGED}
    values = {k: v for k, v in dataclasses.asdict(SETTINGS).items() if k != "merge"}
    recipe_values = {MERGE_NAMES.get(k, k): v for k, v in values.items()}
    assert RecipeArguments(merge="ondare", **recipe_values).merge_settings() == SETTINGS
    assert RecipeArguments(merge="none").merge_settings().merge is None
    assert RunConfig(world=WorldConfig(), **dataclasses.asdict(SETTINGS)).merge_settings() == SETTINGS


def test_merge_fields_follow_merge_settings_after_the_named_field():
    @dataclasses.dataclass
    @merge_fields(after="first", defaults={"alpha": 0.5}, names={"seed": "mask_seed"}, omit=("pull",))
    class Holder:
        first: int = 0
        last: int = 1

    names = list(_fields(Holder))
    assert names[0] == "first" and names[-1] == "last" and "pull" not in names and "mask_seed" in names
    assert _fields(Holder)["alpha"] == 0.5 and _fields(Holder)["reserve_p"] == MERGE_DEFAULTS["reserve_p"]
    assert MergeSettings.of(Holder(mask_seed=3), {"seed": "mask_seed"}, pull=0.0).seed == 3
    with pytest.raises(TypeError, match="no field 'second'"):
        merge_fields(after="second")(type("Empty", (), {"__annotations__": {"first": "int"}}))


def test_a_bad_merge_setting_is_named_as_the_recipe_names_it():
    with pytest.raises(ValueError, match="Invalid recipe key 'merge_seed': -1"):
        RecipeArguments(merge_seed=-1)
    with pytest.raises(ValueError, match="Invalid recipe key 'tau_clamp'"):
        RecipeArguments(tau_clamp=0.0)


def test_recipe_spec_picks_the_trainers_optimizer_or_ours():
    named = {"model_name_or_path": "sft/", "base_model_name_or_path": "base/"}
    spec = _train_spec(RecipeArguments(**named, tau_mask="every_step", merge_seed=4), None)
    assert (spec.optimizer, spec.base_model, spec.sft_model, spec.task_vector) == ("adam", "base/", "sft/", None)
    assert (spec.merge_settings.tau_mask, spec.merge_settings.seed) == ("every_step", 4)
    assert _train_spec(RecipeArguments(**named, merge="none"), None).optimizer == "adamw"
    assert _train_spec(RecipeArguments(**named, merge="none", pull=10.0), None).optimizer == "adam"
    assert _train_spec(RecipeArguments(**named, merge="none", neuron_k=0.1, optimizer="sgd"), None).optimizer == "sgd"
    saved = _train_spec(RecipeArguments(model_name_or_path="sft/", task_vector_path="tau.safetensors"), None)
    assert (saved.base_model, saved.sft_model, saved.task_vector) == (None, None, "tau.safetensors")


def test_lab_spec_is_its_runs_fields():
    run = RunConfig(world=WorldConfig(), optimizer="sgd", momentum=0.9, neuron_k=0.15, **dataclasses.asdict(SETTINGS))
    spec = TrainSpec.of(run, base_model="base/")
    assert (spec.optimizer, spec.momentum, spec.neuron_k, spec.merge_settings) == ("sgd", 0.9, 0.15, SETTINGS)
    with pytest.raises(ValueError, match="the pull toward SFT is OnlineMergingAdam's"):
        TrainSpec.of(dataclasses.replace(run, optimizer="adamw"))
    with pytest.raises(ValueError, match="key neurons are OnlineMergingAdam's"):
        TrainSpec.of(dataclasses.replace(run, optimizer="adamw", pull=0.0))
    with pytest.raises(ValueError, match="Invalid trainer: 'ppo'"):
        TrainSpec(trainer="ppo")
    with pytest.raises(ValueError, match=r"Invalid reward_funcs: empty \(trainer 'grpo' samples"):
        TrainSpec(trainer="grpo")
    with pytest.raises(ValueError, match="Invalid reward_funcs: trainer 'dpo' takes none"):
        TrainSpec(reward_funcs=(len,))


@pytest.fixture
def sft_and_base(tmp_path):
    """A tiny Llama's 'SFT' and 'base' folders (τ of 0.05-sized random entries), and the SFT model loaded."""
    sft, base = tiny_llama(), tiny_llama()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in base.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    sft.save_pretrained(tmp_path / "sft")
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")  # named: TRL loads its reference from there
    return model, str(tmp_path / "sft"), str(tmp_path / "base")


def _args(tmp_path, **overrides) -> DPOConfig:
    return DPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, learning_rate=1e-3,
                     report_to="none", save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False,
                     use_cpu=True, bf16=False, activation_checkpointing=False, **overrides)  # fmt: skip


def test_built_trainer_has_the_specs_optimizer_with_every_merge_setting(tmp_path, sft_and_base, one_thread):
    model, sft, base = sft_and_base
    spec = TrainSpec(optimizer="adam", merge_settings=SETTINGS, base_model=base, sft_model=sft)
    trainer = build_trainer(spec, model, _args(tmp_path), preference_data(16), build_tokenizer())
    assert type(trainer) is DPOTrainer
    optimizer = trainer.create_optimizer()
    for group in optimizer.param_groups:
        assert {key: group[key] for key in MERGE_DEFAULTS} == dataclasses.asdict(SETTINGS)
    plain = build_trainer(TrainSpec(), model, _args(tmp_path), preference_data(16), build_tokenizer())
    assert plain.optimizer_cls_and_kwargs is None  # the trainer's own AdamW
    normalized = dataclasses.replace(spec, pairwise_normalized=True)
    assert type(build_trainer(normalized, model, _args(tmp_path), preference_data(16), build_tokenizer())) is (
        PairwiseNormalizedDPOTrainer
    )


def test_after_unlearning_tau_is_still_sft_minus_base(tmp_path, sft_and_base, one_thread):
    """ALLO's NPO stage moves the model before the DPO stage builds its optimizer: τ comes from the SFT files."""
    model, sft, base = sft_and_base
    spec = TrainSpec(optimizer="adam", merge_settings=MergeSettings(), base_model=base, sft_model=sft, unlearn_steps=2)
    tokenizer, pairs = build_tokenizer(), preference_data(16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unlearn(spec, model, _args(tmp_path), pairs, tokenizer)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    optimizer = build_trainer(spec, model, _args(tmp_path), pairs, tokenizer).create_optimizer()
    expected = TaskVector.from_models(base, sft, dtype=torch.bfloat16)  # task_vector_for's
    for name, tensor in optimizer.task_vector.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
