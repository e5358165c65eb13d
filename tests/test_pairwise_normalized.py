"""Pairwise-normalised preference optimisation: the gradient against the paper's formula, in a raw loop and in TRL."""

import copy

import pytest
import torch
import torch.nn.functional as F
from trl import DPOConfig

from online_merging.diagnostics import gradient_entanglement, response_log_probs
from online_merging.integrations.normalized_dpo import PairwiseNormalizedDPOTrainer
from online_merging.losses import pairwise_normalized_loss
from online_merging.world.tokenizer import build_tokenizer
from tests.conftest import preference_data, tiny_llama
from tests.test_diagnostics import hand_log_prob

BETA = 0.1


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def formula_gradient(model, tokenizer, data, ref_margins: torch.Tensor) -> torch.Tensor:
    """s·(g_w/‖g_w‖ + g_l/‖g_l‖) for DPO's sigmoid loss, pair by pair with the derivative written out:
    ∂L/∂log π(y_w,i) = −β σ(−β m_i) / n = −∂L/∂log π(y_l,i), m_i the policy's margin minus the reference's."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = list(zip(data["prompt"], data["chosen"], data["rejected"], strict=True))
    n = len(rows)
    g_w = g_l = 0
    for (prompt, chosen, rejected), ref_margin in zip(rows, ref_margins, strict=True):
        logp_w = hand_log_prob(model, tokenizer, prompt, chosen)
        logp_l = hand_log_prob(model, tokenizer, prompt, rejected)
        d = -BETA * torch.sigmoid(-BETA * (logp_w - logp_l - ref_margin)).item() / n
        g_w = g_w + d * torch.cat([g.reshape(-1) for g in torch.autograd.grad(logp_w, params)])
        g_l = g_l - d * torch.cat([g.reshape(-1) for g in torch.autograd.grad(logp_l, params)])
    scale = (g_w.norm() + g_l.norm()) / 2
    return scale * (g_w / g_w.norm() + g_l / g_l.norm())


def test_gradient_equals_the_formula(tokenizer):
    torch.set_num_threads(1)
    model = tiny_llama().double()
    data = preference_data(3)
    ref_margins = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    expected = formula_gradient(model, tokenizer, data, ref_margins)
    chosen, rejected = (
        torch.stack([hand_log_prob(model, tokenizer, p, r) for p, r in zip(data["prompt"], data[key], strict=True)])
        for key in ("chosen", "rejected")
    )
    loss = -F.logsigmoid(BETA * (chosen - rejected - ref_margins)).mean()
    normalized = pairwise_normalized_loss(loss, chosen, rejected, model.parameters())
    assert normalized.loss.item() == loss.item()  # the value is the margin loss's
    normalized.loss.backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    # float64 but for Llama's RMSNorm, which computes in float32: ~1e-8 of |G| ≈ 0.25 from the order of operations
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_an_entangled_pair_moves_the_right_way(tokenizer):
    """On a pair where a DPO step raises the rejected log-probability, the normalised step lowers it and raises
    the chosen one."""
    model = tiny_llama(seed=0).double()
    data = preference_data(2)
    prompt, chosen, rejected = data["prompt"][1], data["chosen"][1], data["rejected"][1]
    assert gradient_entanglement(model, tokenizer, prompt, chosen, rejected).rejected_may_rise, "not an entangled case"

    def step(normalize: bool) -> tuple[float, float]:
        policy = copy.deepcopy(model)
        logp_w = response_log_probs(policy, tokenizer, prompt, chosen)
        logp_l = response_log_probs(policy, tokenizer, prompt, rejected)
        loss = -F.logsigmoid(BETA * (logp_w - logp_l)).mean()
        if normalize:
            loss = pairwise_normalized_loss(loss, logp_w, logp_l, policy.parameters()).loss
        loss.backward()
        with torch.no_grad():
            for p in policy.parameters():
                p -= 1e-3 * p.grad
            after_w = response_log_probs(policy, tokenizer, prompt, chosen)
            after_l = response_log_probs(policy, tokenizer, prompt, rejected)
        return (after_w - logp_w).item(), (after_l - logp_l).item()

    dpo_chosen, dpo_rejected = step(normalize=False)
    assert dpo_chosen - dpo_rejected > 0 and dpo_rejected > 0  # the margin grows, and so does the rejected one
    normalized_chosen, normalized_rejected = step(normalize=True)
    assert normalized_chosen > 0 > normalized_rejected


def test_trainer_step_equals_the_formula(tokenizer, tmp_path):
    """One SGD step of PairwiseNormalizedDPOTrainer moves the weights by −lr times the formula's gradient."""
    torch.set_num_threads(1)
    model = tiny_llama()
    start = copy.deepcopy(model).double()
    data = preference_data(4)
    lr = 1e-2
    config = DPOConfig(
        output_dir=str(tmp_path), beta=BETA, learning_rate=lr, optim="sgd", lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, max_steps=1, per_device_train_batch_size=4, max_length=64,
        activation_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
        dataloader_pin_memory=False, bf16=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = PairwiseNormalizedDPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=config, train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    with torch.no_grad():  # the reference model is the starting one
        ref_margins = torch.stack(
            [hand_log_prob(start, tokenizer, p, w) - hand_log_prob(start, tokenizer, p, lo) for p, w, lo in zip(
                data["prompt"], data["chosen"], data["rejected"], strict=True)]
        )  # fmt: skip
    expected = formula_gradient(start, tokenizer, data, ref_margins)
    pairs = zip(model.parameters(), start.parameters(), strict=True)
    moved = torch.cat([(a.double() - b).reshape(-1) for a, b in pairs])
    torch.testing.assert_close(moved / -lr, expected, rtol=1e-3, atol=2e-5)
    logged = trainer.state.log_history[0]
    assert logged["normalized/norm_chosen"] > 0 and logged["normalized/norm_rejected"] > 0


def test_errors(tokenizer):
    model = tiny_llama()
    logp = response_log_probs(model, tokenizer, "1+1=", " 2")
    with pytest.raises(ValueError, match="loss must be a scalar"):
        pairwise_normalized_loss(logp.repeat(2), logp, logp, model.parameters())
    with pytest.raises(ValueError, match="no parameter requires a gradient"):
        pairwise_normalized_loss(logp.sum(), logp, logp, [])
