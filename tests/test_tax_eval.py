"""TaxEvalCallback: reward and ability every N steps, logged and plotted, with training left bit-identical."""

import copy
import random

import numpy
import pytest
import torch
from trl import DPOConfig, DPOTrainer

from online_merging.integrations import TaxEvalCallback
from online_merging.world.tokenizer import build_tokenizer
from tests.conftest import preference_data, tiny_llama


def dropout_llama():
    """A tiny Llama whose training draws random numbers (attention dropout): a step depends on the RNG state and on
    the train mode, so a callback that disturbed either would change the weights."""
    model = tiny_llama()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    return model


def careless_score(model):
    """What lm-eval does to a model and the RNGs: eval mode, fresh draws; the figures depend on the weights."""
    model.eval()
    torch.rand(3), random.random(), numpy.random.rand()
    weight = model.model.embed_tokens.weight
    return {"reward": float(weight.mean()), "ability": 0.5 + float(weight.abs().mean())}


def train(tmp_path, name, with_callback: bool, every: int = 2):
    torch.set_num_threads(1)
    model = dropout_llama()
    args = DPOConfig(
        output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_pin_memory=False,
        use_cpu=True, bf16=False, seed=0, beta=0.1, activation_checkpointing=False, max_length=32,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=preference_data(16),
        processing_class=build_tokenizer(),
    )  # fmt: skip
    callback = None
    if with_callback:
        callback = TaxEvalCallback(trainer, careless_score, every, reference={"reward": 0.0, "ability": 0.5})
        trainer.add_callback(callback)
    trainer.train()
    return model, trainer, callback


def test_training_is_bit_identical_and_the_figures_are_logged_and_plotted(tmp_path):
    plain, plain_trainer, _ = train(tmp_path, "plain", False)
    watched, trainer, callback = train(tmp_path, "watched", True)
    for (name, a), b in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert [p["step"] for p in callback.points] == [2, 4]
    logged = [entry for entry in trainer.state.log_history if "tax/reward" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    final = careless_score(copy.deepcopy(watched))  # the weights at step 4, scored again by hand
    assert logged[-1]["tax/reward"] == pytest.approx(final["reward"])
    assert logged[-1]["tax/ability_kept"] == pytest.approx(final["ability"] / 0.5)
    assert all(entry["tax/seconds"] >= 0 for entry in logged)
    losses = [e["loss"] for e in plain_trainer.state.log_history if "loss" in e]
    assert [e["loss"] for e in trainer.state.log_history if "loss" in e] == losses  # TRL's running metrics intact
    assert (tmp_path / "watched" / "tax_front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_disturbing_the_rng_would_be_seen():
    """The test above can fail: the same careless score, unguarded, changes a dropout model's training step."""
    torch.manual_seed(0)
    model = dropout_llama().train()
    batch = torch.randint(3, 20, (2, 8))
    state = torch.random.get_rng_state()
    first = model(batch).logits
    torch.random.set_rng_state(state)
    careless_score(model)
    model.train()
    assert not torch.equal(model(batch).logits, first)


def test_every_must_be_a_positive_int():
    with pytest.raises(ValueError, match="Invalid every: 0"):
        TaxEvalCallback(None, careless_score, 0)
