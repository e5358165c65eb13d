"""HF Trainer, TRL DPO/KTO: the trainers drive the optimizers exactly as the float64 reference says."""

import copy
import random

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from online_merging import OnlineMergingAdam, OnlineMergingSGD, TaskVector
from online_merging.integrations import build_optimizer, decay_parameter_names, task_vector_for
from online_merging.reference import ADAM_DEFAULTS, SGD_DEFAULTS, ReferenceOnlineMerging
from online_merging.settings import MERGE_DEFAULTS
from online_merging.world.skills import addition
from online_merging.world.tokenizer import VOCAB, build_tokenizer
from tests.conftest import preference_data, tiny_llama

LR = 1e-3
STEPS = 4


def kto_data(n: int = 32) -> Dataset:
    pairs = preference_data(n // 2)
    return Dataset.from_dict(
        {
            "prompt": [p for p in pairs["prompt"] for _ in range(2)],
            "completion": [c for row in zip(pairs["chosen"], pairs["rejected"], strict=True) for c in row],
            "label": [True, False] * (n // 2),
        }
    )


class StepRecorder:
    """Records, at every optimizer step, each group's lr and the gradients the optimizer is handed."""

    def __init__(self, optimizer, model):
        self.names = {p: n for n, p in model.named_parameters()}
        self.steps = []
        optimizer.register_step_pre_hook(self._record)

    def _record(self, optimizer, args, kwargs):
        self.steps.append(
            [
                (group["lr"], {self.names[p]: p.grad.detach().clone() for p in group["params"] if p.grad is not None})
                for group in optimizer.param_groups
            ]
        )


def replay(optimizer, initial: dict, tau: TaskVector, recorded: StepRecorder) -> dict[str, torch.Tensor]:
    """The float64 reference run on the recorded gradients and lrs, one reference per param group."""
    defaults = ADAM_DEFAULTS if isinstance(optimizer, OnlineMergingAdam) else SGD_DEFAULTS
    kind = "adam" if isinstance(optimizer, OnlineMergingAdam) else "sgd"
    references = []
    for group in optimizer.param_groups:
        names = [recorded.names[p] for p in group["params"]]
        hyper = {k: group[k] for k in (*defaults, *MERGE_DEFAULTS)}
        references.append(
            ReferenceOnlineMerging({n: initial[n] for n in names}, {n: tau[n] for n in names}, optimizer=kind, **hyper)
        )
    for step in recorded.steps:
        for reference, (lr, grads) in zip(references, step, strict=True):
            reference.hyper["lr"] = lr
            reference.step(grads)
    return {n: p for reference in references for n, p in reference.params.items()}


def assert_follows_reference(model, optimizer, initial, tau, recorded, steps=STEPS):
    assert len(recorded.steps) == steps
    expected = replay(optimizer, initial, tau, recorded)
    moved = 0
    for name, param in model.named_parameters():
        torch.testing.assert_close(
            param.detach().double(), expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
        moved += int((param.detach() != initial[name]).sum())
    assert moved > 0


def initial_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def common_args(tmp_path, **overrides) -> dict:
    return dict(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=LR,
        lr_scheduler_type="linear",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        use_cpu=True,
        bf16=False,
        seed=0,
        **overrides,
    )


MODES = {
    "ondare": {"alpha_unit": "absolute", "merge": "ondare", "reserve_p": 0.3, "alpha": 0.05},
    # ε comparable to |g|: Adam's first update is then not ≈ ±lr everywhere, whose near-ties top-p would
    # break differently in float32 and in the float64 reference
    "onties": {"alpha_unit": "absolute", "merge": "onties", "reserve_p": 0.3, "alpha": 0.05, "eps": 1e-3},
    "ondare_k2": {"alpha_unit": "absolute", "merge": "ondare", "reserve_p": 0.3, "alpha": 0.05, "merge_every": 2},
}


# -- TRL trainers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("trainer_name", ["dpo", "kto"])
def test_trl_trainer_steps_follow_the_reference(tmp_path, sft_and_base, trainer_name, mode):
    sft, base = sft_and_base
    initial = initial_weights(sft)
    if trainer_name == "dpo":
        args = DPOConfig(**common_args(tmp_path), beta=0.1, activation_checkpointing=False, max_length=32)
        trainer_cls, data = DPOTrainer, preference_data()
    else:
        args = KTOConfig(**common_args(tmp_path), beta=0.1, activation_checkpointing=False, max_length=32)
        trainer_cls, data = KTOTrainer, kto_data()
    optimizer = build_optimizer(sft, args, base_model=base, **MODES[mode])
    recorder = StepRecorder(optimizer, sft)
    trainer = trainer_cls(
        model=sft,
        ref_model=copy.deepcopy(sft),  # TRL reloads the reference from the policy's path; this one has none
        args=args,
        train_dataset=data,
        processing_class=build_tokenizer(),
        optimizers=(optimizer, None),
    )
    trainer.train()
    # Trainer's linear schedule reached the optimizer: lr_t = LR·(1 − t/T)
    lrs = [step[0][0] for step in recorder.steps]
    assert lrs == pytest.approx([LR * (1 - t / STEPS) for t in range(STEPS)])
    assert_follows_reference(sft, optimizer, initial, optimizer.task_vector, recorder)


# -- HF Trainer, both entry points ---------------------------------------------------------------------------------


def lm_data(n: int = 32) -> Dataset:
    tokenizer = build_tokenizer()
    texts = [f"{q} = {a}" for q, a in addition(random.Random(0), n)]
    ids = [tokenizer(t)["input_ids"][:12] for t in texts]
    ids = [row + [0] * (12 - len(row)) for row in ids]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def test_trainer_with_built_optimizer_follows_the_reference_with_trainers_decay_groups(tmp_path, sft_and_base):
    sft, base = sft_and_base
    initial = initial_weights(sft)
    args = TrainingArguments(**common_args(tmp_path), weight_decay=0.1)
    optimizer = build_optimizer(sft, args, base_model=base, **MODES["ondare"])
    decay = decay_parameter_names(sft)
    assert {n for n, _ in sft.named_parameters() if "norm" in n}.isdisjoint(decay)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert set(optimizer.param_groups[0]["param_names"]) == decay
    recorder = StepRecorder(optimizer, sft)
    Trainer(model=sft, args=args, train_dataset=lm_data(), optimizers=(optimizer, None)).train()
    assert_follows_reference(sft, optimizer, initial, optimizer.task_vector, recorder)


def test_trainer_optimizer_cls_and_kwargs_equals_the_built_optimizer(tmp_path, sft_and_base):
    sft, base = sft_and_base
    twin = tiny_llama()
    tau = TaskVector.from_models(base, sft)
    args = TrainingArguments(**common_args(tmp_path), weight_decay=0.1)
    settings = {"lr": LR, "weight_decay": 0.1, "task_vector": tau, **MODES["onties"]}
    by_cls = Trainer(
        model=sft,
        args=args,
        train_dataset=lm_data(),
        optimizer_cls_and_kwargs=(OnlineMergingAdam, {**settings, "module": sft}),
    )
    by_cls.train()
    built = build_optimizer(twin, args, task_vector=tau, **MODES["onties"])
    Trainer(model=twin, args=args, train_dataset=lm_data(), optimizers=(built, None)).train()
    assert [g["weight_decay"] for g in by_cls.optimizer.param_groups] == [0.1, 0.0]
    for (name, a), b in zip(sft.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_trainer_passing_model_in_optimizer_kwargs_gets_a_clear_error(tmp_path, sft_and_base):
    sft, base = sft_and_base
    args = TrainingArguments(**common_args(tmp_path))
    kwargs = {"lr": LR, "task_vector": TaskVector.from_models(base, sft), "model": sft}
    trainer = Trainer(
        model=sft, args=args, train_dataset=lm_data(), optimizer_cls_and_kwargs=(OnlineMergingAdam, kwargs)
    )
    with pytest.raises(TypeError, match="module="):
        trainer.train()


def test_sgd_through_trainer_follows_the_reference(tmp_path, sft_and_base):
    sft, base = sft_and_base
    initial = initial_weights(sft)
    args = TrainingArguments(**common_args(tmp_path), weight_decay=0.01)
    optimizer = build_optimizer(sft, args, base_model=base, optimizer="sgd", momentum=0.9, **MODES["ondare"])
    assert isinstance(optimizer, OnlineMergingSGD)
    recorder = StepRecorder(optimizer, sft)
    Trainer(model=sft, args=args, train_dataset=lm_data(), optimizers=(optimizer, None)).train()
    assert_follows_reference(sft, optimizer, initial, optimizer.task_vector, recorder)


# -- checkpoints ------------------------------------------------------------------------------------------------------


def test_dpo_resume_from_checkpoint_is_bit_identical_to_an_uninterrupted_run(tmp_path, sft_and_base):
    sft, base = sft_and_base
    tau = TaskVector.from_models(base, sft)

    def trainer(model, out):
        args = DPOConfig(
            **{**common_args(tmp_path), "output_dir": str(out), "save_strategy": "steps"},
            save_steps=2,
            beta=0.1,
            activation_checkpointing=False,
            max_length=32,
        )
        optimizer = build_optimizer(model, args, task_vector=tau, **MODES["ondare_k2"])
        return DPOTrainer(
            model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=preference_data(),
            processing_class=build_tokenizer(), optimizers=(optimizer, None),
        )  # fmt: skip

    trainer(sft, tmp_path / "full").train()
    resumed_model = tiny_llama()
    trainer(resumed_model, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for (name, a), b in zip(sft.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b), name


# -- bad input -------------------------------------------------------------------------------------------------------


def test_base_with_other_parameter_names_is_refused_before_training(tmp_path, sft_and_base):
    sft, _ = sft_and_base
    tiny_llama(layers=1).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"only in finetuned: model\.layers\.1\."):
        build_optimizer(sft, base_model=tmp_path / "base")


def test_base_of_another_architecture_is_refused_naming_the_config_field(tmp_path, sft_and_base):
    from transformers import MistralConfig, MistralForCausalLM

    sft, _ = sft_and_base
    config = MistralConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    MistralForCausalLM(config).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="'model_type' is 'mistral' in the base, 'llama' in the model"):
        build_optimizer(sft, base_model=tmp_path / "base")


def test_saved_task_vector_that_does_not_fit_the_model_is_refused(tmp_path, sft_and_base):
    sft, base = sft_and_base
    TaskVector.from_models(tiny_llama(layers=1), tiny_llama(layers=1)).save(tmp_path / "tv.safetensors")
    TaskVector({"lm_head.weight": torch.zeros(3, 3)}).save(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"'lm_head\.weight' has shape"):
        build_optimizer(sft, task_vector=tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        build_optimizer(sft, task_vector=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="exactly one of base_model"):
        build_optimizer(sft, base_model=base, task_vector=tmp_path / "tv.safetensors")


def test_base_model_from_disk_gives_the_same_task_vector_as_from_memory(tmp_path, sft_and_base):
    sft, base = sft_and_base
    base.save_pretrained(tmp_path / "base")
    from_disk = task_vector_for(sft, base_model=tmp_path / "base")
    from_memory = task_vector_for(sft, base_model=base)
    assert TaskVector.fingerprints_match(from_disk.fingerprint(), from_memory.fingerprint())
