"""TRL's DPOTrainer(peft_config=...) with the online-merging optimizer: its steps follow the float64 LoRA definition."""

import pytest
import torch
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from online_merging.integrations import use_online_merging_optimizer
from online_merging.reference import ReferenceLoRA
from online_merging.world.tokenizer import build_tokenizer
from tests.conftest import preference_data, tiny_llama
from tests.test_integrations import common_args

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]


class GradRecorder(TrainerCallback):
    """At each optimizer step, the lr and the gradients of the LoRA tensors, by name."""

    def __init__(self):
        self.steps = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {p: n for n, p in model.named_parameters()}
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper

        def record(opt, *_):
            grads = {
                names[p]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None
            }
            self.steps.append((opt.param_groups[0]["lr"], grads))

        inner.register_step_pre_hook(record)


def lora_layers(model):
    return {name: module for name, module in model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("merge", ["ondare", "onties"])
def test_trl_dpo_with_peft_config_follows_the_lora_reference(tmp_path, merge):
    sft, base = tiny_llama(), tiny_llama()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in base.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    sft_weights, base_weights = sft.state_dict(), base.state_dict()
    sft_weights = {name: tensor.clone() for name, tensor in sft_weights.items()}  # PEFT wraps sft's layers in place
    args = DPOConfig(
        **common_args(tmp_path, weight_decay=0.1), beta=0.1, max_length=32, precompute_ref_log_probs=True,
        activation_checkpointing=False,
    )  # fmt: skip
    recorder = GradRecorder()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    trainer = DPOTrainer(
        model=sft, args=args, train_dataset=preference_data(), processing_class=build_tokenizer(),
        peft_config=config, callbacks=[recorder],
    )  # fmt: skip
    settings = {"merge": merge, "reserve_p": 0.3, "alpha": 0.05, "alpha_unit": "absolute", "eps": 1e-3}
    use_online_merging_optimizer(trainer, base_model=base, **settings)
    model = trainer.model
    references = {}
    for path, layer in lora_layers(model).items():
        name = path.removeprefix("base_model.model.")
        names = (f"{name}.weight", f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight")
        tau = (sft_weights[f"{name}.weight"] - base_weights[f"{name}.weight"]).bfloat16()  # task_vector_for's dtype
        references[path] = ReferenceLoRA(
            layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight, tau,
            layer.scaling["default"], names, weight_decay=0.1, **settings,
        )  # fmt: skip
    assert len(references) == 2 * len(TARGETS)
    trainer.train()
    assert len(recorder.steps) == args.max_steps
    for lr, grads in recorder.steps:
        for path, reference in references.items():
            reference.adapter.hyper["lr"] = lr
            reference.step(grads[f"{path}.lora_A.default.weight"], grads[f"{path}.lora_B.default.weight"])
    for path, layer in lora_layers(model).items():
        ref = references[path]
        torch.testing.assert_close(layer.base_layer.weight.double(), ref.base, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_A["default"].weight.double(), ref.lora_A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B["default"].weight.double(), ref.lora_B, rtol=1e-5, atol=1e-6)
    moved = max(
        float((ref.base - sft_weights[f"{path.removeprefix('base_model.model.')}.weight"]).abs().max())
        for path, ref in references.items()
    )
    assert moved > 1e-4, "τ did not reach the base weights"


def test_a_lora_run_without_precomputed_reference_is_warned(tmp_path):
    args = DPOConfig(**common_args(tmp_path), beta=0.1, max_length=32, activation_checkpointing=False)
    trainer = DPOTrainer(
        model=tiny_llama(), args=args, train_dataset=preference_data(), processing_class=build_tokenizer(),
        peft_config=peft.LoraConfig(r=2, target_modules=TARGETS),
    )  # fmt: skip
    with pytest.warns(
        UserWarning, match="reference model is the policy with its adapter off.*precompute_ref_log_probs"
    ):
        use_online_merging_optimizer(trainer, base_model=tiny_llama())
