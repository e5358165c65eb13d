"""Gradient entanglement: the figures against a hand computation, and a monitor that leaves training unchanged."""

import copy
import warnings

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from online_merging.diagnostics import GradientEntanglementCallback, gradient_entanglement, response_log_probs
from online_merging.world.tokenizer import build_tokenizer
from tests.conftest import preference_data, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def hand_log_prob(model, tokenizer, prompt_text: str, response: str) -> torch.Tensor:
    """Σ_t log π(x_t | x_<t) over the response and EOS, one position at a time; the world's tokenizer is one token
    per character, so the response starts right after the prompt's tokens."""
    start = len(tokenizer(prompt_text)["input_ids"])
    ids = tokenizer(prompt_text + response + tokenizer.eos_token)["input_ids"]
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    return sum(torch.log_softmax(logits[t - 1], dim=-1)[ids[t]] for t in range(start, len(ids)))


def hand_figures(model, tokenizer, prompts, chosen, rejected):
    params = [p for p in model.parameters() if p.requires_grad]

    def flat_grad(responses):
        logp = torch.stack([hand_log_prob(model, tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)])
        grads = torch.autograd.grad(logp.mean(), params)
        return logp.mean().item(), torch.cat([g.reshape(-1) for g in grads]).double()

    logp_w, g_w = flat_grad(chosen)
    logp_l, g_l = flat_grad(rejected)
    return logp_w, logp_l, g_w @ g_l, g_w @ g_w, g_l @ g_l


@pytest.mark.parametrize("pairs", [1, 3])
def test_figures_equal_a_hand_computation(tokenizer, pairs):
    torch.set_num_threads(1)
    model = tiny_llama().eval()
    data = preference_data(pairs)
    prompts, chosen, rejected = data["prompt"], data["chosen"], data["rejected"]
    logp_w, logp_l, inner, norm2_w, norm2_l = hand_figures(model, tokenizer, prompts, chosen, rejected)
    args = (prompts[0], chosen[0], rejected[0]) if pairs == 1 else (prompts, chosen, rejected)
    report = gradient_entanglement(model, tokenizer, *args)
    assert report.logp_chosen == pytest.approx(logp_w, rel=1e-5)
    assert report.logp_rejected == pytest.approx(logp_l, rel=1e-5)
    assert report.inner == pytest.approx(inner.item(), rel=1e-4)
    assert report.norm2_chosen == pytest.approx(norm2_w.item(), rel=1e-4)
    assert report.norm2_rejected == pytest.approx(norm2_l.item(), rel=1e-4)
    assert report.cosine == pytest.approx((inner / (norm2_w * norm2_l).sqrt()).item(), rel=1e-4)
    assert report.chosen_may_fall == (inner > norm2_w).item()
    assert report.rejected_may_rise == (inner > norm2_l).item()
    # the per-layer breakdown partitions the inner product
    assert set(report.layers) == {"layer_0", "layer_1", "other"}
    assert sum(group["inner"] for group in report.layers.values()) == pytest.approx(report.inner, rel=1e-6)
    for group in report.layers.values():
        assert -1 - 1e-9 <= group["cosine"] <= 1 + 1e-9
    blocks = gradient_entanglement(model, tokenizer, *args, blocks=1).layers
    assert set(blocks) == {"block_0"}
    assert blocks["block_0"]["inner"] == pytest.approx(report.inner, rel=1e-6)
    metrics = report.metrics()
    assert metrics["entanglement/cosine"] == report.cosine
    assert metrics["entanglement/layer_1/inner"] == report.layers["layer_1"]["inner"]


def test_padding_does_not_change_the_log_probs(tokenizer):
    model = tiny_llama().eval()
    data = preference_data(4)  # answers of different lengths: the batch is padded
    batched = response_log_probs(model, tokenizer, data["prompt"], data["chosen"])
    for i in range(4):
        alone = response_log_probs(model, tokenizer, data["prompt"][i], data["chosen"][i])
        torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-5)


def test_grads_rng_and_modes_are_untouched(tokenizer):
    model = tiny_llama()
    model.train()
    model.model.layers[1].eval()
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.5)
    grads = [p.grad for p in model.parameters()]
    rng = torch.get_rng_state()
    data = preference_data(2)
    gradient_entanglement(model, tokenizer, data["prompt"], data["chosen"], data["rejected"])
    assert torch.equal(torch.get_rng_state(), rng)
    for param, grad in zip(model.parameters(), grads, strict=True):
        assert param.grad is grad and bool((grad == 0.5).all())
    assert model.training and model.model.layers[0].training and not model.model.layers[1].training


def dpo_args(tmp_path, name: str) -> DPOConfig:
    return DPOConfig(
        output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_pin_memory=False,
        use_cpu=True, bf16=False, seed=0, beta=0.1, activation_checkpointing=False, max_length=32,
    )  # fmt: skip


def test_callback_leaves_training_unchanged_and_logs_and_plots(tmp_path, tokenizer):
    torch.set_num_threads(1)
    data = preference_data(16)

    def train(name, callbacks):
        model = tiny_llama()
        trainer = DPOTrainer(
            model=model, ref_model=copy.deepcopy(model), args=dpo_args(tmp_path, name), train_dataset=data,
            processing_class=tokenizer, callbacks=callbacks,
        )  # fmt: skip
        trainer.train()
        return model, trainer

    plain, _ = train("plain", None)
    monitor = GradientEntanglementCallback(preference_data(4), every_n_steps=2)
    watched, trainer = train("watched", [monitor])
    for (name, a), b in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b), name
    logged = [entry for entry in trainer.state.log_history if "entanglement/cosine" in entry]
    assert [entry["step"] for entry in logged] == [0, 2, 4]
    assert [step for step, _ in monitor.trajectory] == [0, 2, 4]
    assert {"entanglement/inner", "entanglement/chosen_may_fall", "entanglement/layer_0/cosine"} <= set(logged[0])
    assert (tmp_path / "watched" / "entanglement.png").stat().st_size > 0


def test_warns_once_per_episode_when_the_chosen_log_prob_falls_while_the_margin_rises(tokenizer):
    model = tiny_llama().eval()
    # an LM head with a bias: shifting a token's logit is then the same at every position
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
    model.lm_head = head
    probe = Dataset.from_dict({"prompt": ["Q: 1+2 A:"], "chosen": [" 3"], "rejected": [" 4"]})
    monitor = GradientEntanglementCallback(probe, processing_class=tokenizer)
    token = {c: tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "34"}

    def step(step, chosen_shift, rejected_shift):
        with torch.no_grad():
            head.bias[token["3"]] += chosen_shift
            head.bias[token["4"]] += rejected_shift
        return monitor.probe(step, model, tokenizer)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = step(0, 0.0, 0.0)
        step(1, 0.0, 0.0)  # nothing moved
        step(2, 0.5, -1.0)  # chosen up, rejected down: healthy
        assert not caught
        third = step(3, -1.5, -4.0)  # both fall, the rejected faster: the margin still rises
        step(4, -0.5, -2.0)  # the same episode: no second warning
        step(5, 1.0, -1.0)  # healthy again: the episode ends
        step(6, 0.0, 1.0)  # the rejected rises (the margin falls): not entangled
        step(7, -0.2, -1.0)  # a new episode
    assert third.logp_chosen < first.logp_chosen and third.margin > first.margin
    assert [str(w.message).split(":")[0] for w in caught] == [
        "gradient entanglement at step 3",
        "gradient entanglement at step 7",
    ]
    assert monitor.episodes == [3, 7]
