"""ALLO's losses (NPO, the noisy-token filter, token-weighted DPO) against hand computations, and their TRL trainers."""

import copy
import math

import pytest
import torch
from trl import DPOConfig

from online_merging import OnlineMergingSGD, TaskVector
from online_merging.diagnostics import response_log_probs
from online_merging.integrations.allo_trainers import NPOTrainer, TokenWeightedDPOTrainer
from online_merging.losses import noisy_token_weights, npo_loss, token_log_ratio_weights, token_weighted_dpo_loss
from online_merging.world.tokenizer import build_tokenizer
from tests.conftest import preference_data, tiny_llama

F64 = torch.float64


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Three responses of lengths 4, 2 and 0 (the last has garbage outside its mask, which must not count)
POLICY = [[-1.0, -2.0, -0.5, -3.0], [-0.25, -1.5, 7.0, 9.0], [5.0, 6.0, 7.0, 8.0]]
REF = [[-1.5, -1.0, -0.75, -2.0], [-0.5, -1.0, -9.0, 3.0], [1.0, 1.0, 1.0, 1.0]]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]
WEIGHTS = [[0.5, 2.0, 1.0, 0.0], [1.5, 0.25, 4.0, 4.0], [3.0, 3.0, 3.0, 3.0]]


def tensors(*rows):
    return [torch.tensor(r, dtype=F64) for r in rows]


def hand_sums(policy, ref, mask, weights=None) -> list[float]:
    return [
        sum(
            (1.0 if weights is None else weights[i][j]) * (policy[i][j] - ref[i][j])
            for j in range(len(policy[i]))
            if mask[i][j]
        )
        for i in range(len(policy))
    ]


# -- the losses on tiny tensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_npo_loss_equals_a_hand_computation(weighted, beta):
    weights = WEIGHTS if weighted else None
    sums = hand_sums(POLICY, REF, MASK, weights)
    expected = sum(-(2 / beta) * log_sigmoid(-beta * s) for s in sums) / len(sums)
    policy, ref, mask = tensors(POLICY, REF, MASK)
    got = npo_loss(policy, ref, mask.bool(), beta, None if weights is None else torch.tensor(weights, dtype=F64))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    if not weighted:  # hand check of the first sum: 0.5 − 1 + 0.25 − 1
        assert sums[0] == -1.25 and sums[2] == 0


@pytest.mark.parametrize("weighted", [False, True])
def test_npo_gradient_is_the_closed_form(weighted):
    """∂L/∂log π_ij = (2/B) σ(β s_i) w_ij m_ij, and the reference's is its negative."""
    beta = 0.5
    weights = WEIGHTS if weighted else None
    policy, ref, mask = tensors(POLICY, REF, MASK)
    policy.requires_grad_(True)
    ref.requires_grad_(True)
    npo_loss(policy, ref, mask, beta, None if weights is None else torch.tensor(weights, dtype=F64)).backward()
    sums = hand_sums(POLICY, REF, MASK, weights)
    expected = torch.tensor(
        [
            [
                (2 / 3) * sigmoid(beta * sums[i]) * (1.0 if weights is None else weights[i][j]) * MASK[i][j]
                for j in range(4)
            ]
            for i in range(3)
        ],
        dtype=F64,
    )
    torch.testing.assert_close(policy.grad, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(ref.grad, -expected, rtol=1e-12, atol=0)
    assert (policy.grad >= 0).all()  # descent lowers every weighted response token


def test_token_log_ratio_weights_equal_a_hand_computation():
    temperature = 0.5
    policy, ref, mask = tensors(POLICY, REF, MASK)
    policy.requires_grad_(True)
    got = token_log_ratio_weights(policy, ref, mask, temperature)
    assert not got.requires_grad
    expected = [[0.0] * 4 for _ in range(3)]
    for i in range(3):
        tokens = [j for j in range(4) if MASK[i][j]]
        exps = {j: math.exp((POLICY[i][j] - REF[i][j]) / temperature) for j in tokens}
        for j in tokens:
            expected[i][j] = len(tokens) * exps[j] / sum(exps.values())
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-15)
    assert got[0].sum().item() == pytest.approx(4) and got[1].sum().item() == pytest.approx(2)
    # equal log-ratios (the policy is the reference): plain NPO
    torch.testing.assert_close(token_log_ratio_weights(ref, ref, mask), mask)


def hand_filter(rewards, mask, percentile) -> list[list[float]]:
    """Drop a completion token iff at most k = ⌊percentile·N⌋ completion tokens have a reward ≥ its own."""
    values = [r for row, m in zip(rewards, mask, strict=True) for r, keep in zip(row, m, strict=True) if keep]
    k = math.floor(percentile * len(values))
    return [
        [0.0 if not keep or sum(v >= r for v in values) <= k else 1.0 for r, keep in zip(row, m, strict=True)]
        for row, m in zip(rewards, mask, strict=True)
    ]


FILTER_MASK = [[1] * 10, [1] * 6 + [0] * 4]  # N = 16 completion tokens; masked positions hold the largest rewards
FILTER_CASES = {
    # name: (rewards, percentile, which tokens (row, col) are dropped)
    "distinct": ([[0.5, 3.0, -1, 0, 0, 0, 0, 0, 0, 0], [2.5, 0, 0, 0, 0, 0, 9, 9, 9, 9]], 0.125, {(0, 1), (1, 0)}),
    "tie_at_the_cut_is_kept": (
        [[0.5, 3.0, 2.0, 0, 0, 0, 0, 0, 0, 0], [2.0, 0, 0, 0, 0, 0, 9, 9, 9, 9]],
        0.125,
        {(0, 1)},
    ),
    "tie_inside_is_dropped": (
        [[0.5, 3.0, 1.0, 0, 0, 0, 0, 0, 0, 0], [3.0, 0, 0, 0, 0, 0, 9, 9, 9, 9]],
        0.15,
        {(0, 1), (1, 0)},
    ),
    "all_equal": ([[1.0] * 10, [1.0] * 6 + [9.0] * 4], 0.3, set()),
    "k_rounds_down_to_0": ([[0.5, 3.0, -1, 0, 0, 0, 0, 0, 0, 0], [2.5, 0, 0, 0, 0, 0, 9, 9, 9, 9]], 0.0624, set()),
    "k_plus_one_tied_at_the_top": (
        [[4.0, 4.0, 4.0, 1, 0, 0, 0, 0, 0, 0], [4.0, 0, 0, 0, 0, 0, 9, 9, 9, 9]],
        0.2,
        set(),
    ),
}


@pytest.mark.parametrize("case", FILTER_CASES)
def test_noisy_token_filter_equals_a_hand_computation(case):
    rewards, percentile, dropped = FILTER_CASES[case]
    beta = 0.5  # rewards = β (policy − ref) with ref = 0: exact in binary
    policy = torch.tensor(rewards, dtype=F64) / beta
    ref = torch.zeros_like(policy)
    mask = torch.tensor(FILTER_MASK)
    policy.requires_grad_(True)
    got = noisy_token_weights(policy, ref, mask, beta, percentile)
    assert not got.requires_grad
    expected = hand_filter(rewards, FILTER_MASK, percentile)
    assert got.tolist() == expected
    by_hand = {(i, j) for i in range(2) for j in range(10) if FILTER_MASK[i][j] and expected[i][j] == 0}
    assert by_hand == dropped  # the hand rule says what the case's name says


@pytest.mark.parametrize("weighted", [False, True])
def test_token_weighted_dpo_loss_equals_a_hand_computation(weighted):
    beta = 0.25
    # rows [chosen; rejected]: pair 0 = rows 0 and 2, pair 1 = rows 1 and 3
    policy_rows = [POLICY[0], POLICY[1], [-2.0, -0.5, -1.0, 30.0], [-0.125, -4.0, -2.0, -1.0]]
    ref_rows = [REF[0], REF[1], [-1.0, -1.0, -1.0, -1.0], [-1.0, -3.0, -2.5, -0.5]]
    mask_rows = [MASK[0], MASK[1], [1, 1, 1, 0], [1, 1, 1, 1]]
    weight_rows = [WEIGHTS[0], WEIGHTS[1], [1.0, 0.0, 2.0, 5.0], [0.5, 0.5, 3.0, 1.0]] if weighted else None
    sums = hand_sums(policy_rows, ref_rows, mask_rows, weight_rows)
    expected = -(log_sigmoid(beta * (sums[0] - sums[2])) + log_sigmoid(beta * (sums[1] - sums[3]))) / 2
    policy, ref, mask = tensors(policy_rows, ref_rows, mask_rows)
    weights = None if weight_rows is None else torch.tensor(weight_rows, dtype=F64)
    assert token_weighted_dpo_loss(policy, ref, mask, beta, weights).item() == pytest.approx(expected, rel=1e-12)


def test_loss_errors():
    policy, ref, mask = tensors(POLICY, REF, MASK)
    with pytest.raises(ValueError, match="one shape"):
        npo_loss(policy, ref[:2], mask, 0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        npo_loss(policy, ref, mask, 0.0)
    with pytest.raises(ValueError, match="weights must have shape"):
        npo_loss(policy, ref, mask, 0.1, torch.ones(3, 3))
    with pytest.raises(ValueError, match="fraction"):
        noisy_token_weights(policy, ref, mask, 0.1, 5.0)
    with pytest.raises(ValueError, match="chosen; rejected"):
        token_weighted_dpo_loss(policy, ref, mask, 0.1)
    with pytest.raises(ValueError, match="token_weights"):
        NPOTrainer(model=None, token_weights="reward_model")


# -- the trainers ---------------------------------------------------------------------------------------------------

BETA = 0.1
LR = 1e-2


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def config(tmp_path, **overrides) -> DPOConfig:
    settings = dict(
        output_dir=str(tmp_path), beta=BETA, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, max_steps=2, per_device_train_batch_size=8, max_length=64,
        activation_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
        dataloader_pin_memory=False, bf16=False, disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    return DPOConfig(**{**settings, **overrides})


def hand_token_log_probs(model, tokenizer, prompt: str, response: str) -> torch.Tensor:
    """log π(x_t | x_<t) of each response token and EOS, from one unpadded forward pass (the world's tokenizer is one
    token per character, so the response starts right after the prompt's tokens)."""
    start = len(tokenizer(prompt)["input_ids"])
    ids = tokenizer(prompt + response + tokenizer.eos_token)["input_ids"]
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[start - 1 : len(ids) - 1], dim=-1)
    return logp[torch.arange(len(ids) - start), torch.tensor(ids[start:])]


def hand_batch(policy, ref, tokenizer, data):
    """Per-token log-probabilities of the policy and the reference, rows [chosen; rejected], padded, with the mask."""
    rows = [(p, r) for key in ("chosen", "rejected") for p, r in zip(data["prompt"], data[key], strict=True)]
    with torch.no_grad():
        pol = [hand_token_log_probs(policy, tokenizer, p, r) for p, r in rows]
        ref = [hand_token_log_probs(ref, tokenizer, p, r) for p, r in rows]
    length = max(len(x) for x in pol)
    padded = [torch.stack([torch.nn.functional.pad(x, (0, length - len(x))) for x in xs]) for xs in (pol, ref)]
    mask = torch.stack([torch.arange(length) < len(x) for x in pol])
    return padded[0], padded[1], mask


def record_losses(trainer) -> list[float]:
    losses = []
    compute_loss = trainer.compute_loss

    def recording(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        losses.append(loss.item())
        return loss

    trainer.compute_loss = recording
    return losses


def models_and_tau():
    """The policy, a reference that differs from it (so the log-ratios are not 0), and τ for our optimizer."""
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    base = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in base.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return policy, ref, TaskVector.from_models(base, policy, dtype=torch.float32)


@pytest.mark.parametrize("token_weights", ["uniform", "log_ratio"])
def test_npo_trainer_step_loss_equals_the_hand_loss(tokenizer, tmp_path, token_weights):
    """Two steps with our optimizer (optimizers=); the first step's loss is npo_loss on the hand log-probs."""
    torch.set_num_threads(1)
    policy, ref, tau = models_and_tau()
    start = copy.deepcopy(policy).double()
    data = preference_data(8)
    optimizer = OnlineMergingSGD(policy.named_parameters(), lr=LR, task_vector=tau)
    trainer = NPOTrainer(
        model=policy, ref_model=ref, args=config(tmp_path), train_dataset=data, processing_class=tokenizer,
        optimizers=(optimizer, None), token_weights=token_weights,
    )  # fmt: skip
    losses = record_losses(trainer)
    trainer.train()
    assert trainer.state.global_step == 2 and len(losses) == 2
    pol, ref_logps, mask = hand_batch(start, copy.deepcopy(ref).double(), tokenizer, data)
    _, pol = pol.chunk(2)
    _, ref_logps = ref_logps.chunk(2)
    _, mask = mask.chunk(2)
    weights = token_log_ratio_weights(pol, ref_logps, mask) if token_weights == "log_ratio" else None
    if weights is not None:
        assert weights[mask].std() > 0.1  # the weights are not uniform on this batch
    expected = npo_loss(pol, ref_logps, mask, BETA, weights)
    assert losses[0] == pytest.approx(expected.item(), rel=1e-5)
    logged = trainer.state.log_history[0]
    assert {"rewards/margins", "logps/rejected", "allo/rejected_logratio"} <= logged.keys()  # TRL's and ours
    assert ("allo/max_weight" in logged) == (token_weights == "log_ratio")
    assert any(not torch.equal(a.double(), b) for a, b in zip(policy.parameters(), start.parameters(), strict=True))


def test_token_weighted_dpo_trainer_step_loss_equals_the_hand_loss(tokenizer, tmp_path):
    """Two steps with our optimizer (optimizer_cls_and_kwargs=); the first step's loss is token_weighted_dpo_loss with
    the noisy-token filter on the hand log-probs."""
    torch.set_num_threads(1)
    policy, ref, tau = models_and_tau()
    start = copy.deepcopy(policy).double()
    data = preference_data(8)
    percentile = 0.05
    trainer = TokenWeightedDPOTrainer(
        model=policy, ref_model=ref, args=config(tmp_path), train_dataset=data, processing_class=tokenizer,
        optimizer_cls_and_kwargs=(OnlineMergingSGD, {"lr": LR, "task_vector": tau, "module": policy}),
        noisy_token_percentile=percentile,
    )  # fmt: skip
    losses = record_losses(trainer)
    trainer.train()
    assert isinstance(
        getattr(trainer.optimizer, "optimizer", trainer.optimizer), OnlineMergingSGD
    )  # accelerate wraps it
    assert trainer.state.global_step == 2 and len(losses) == 2
    pol, ref_logps, mask = hand_batch(start, copy.deepcopy(ref).double(), tokenizer, data)
    weights = noisy_token_weights(pol, ref_logps, mask, BETA, percentile)
    dropped = int(mask.sum() - weights.sum())
    assert dropped == int(percentile * mask.sum())  # k tokens dropped (no ties on this batch)
    expected = token_weighted_dpo_loss(pol, ref_logps, mask, BETA, weights)
    assert expected.item() != pytest.approx(token_weighted_dpo_loss(pol, ref_logps, mask, BETA).item(), rel=1e-3)
    assert losses[0] == pytest.approx(expected.item(), rel=1e-5)
    logged = trainer.state.log_history[0]
    assert logged["allo/dropped_fraction"] == pytest.approx(dropped / mask.sum().item())
    assert "rewards/margins" in logged and "allo/weighted_margin" in logged
    assert any(not torch.equal(a.double(), b) for a, b in zip(policy.parameters(), start.parameters(), strict=True))


def test_npo_lowers_the_rejected_log_probabilities(tokenizer, tmp_path):
    torch.set_num_threads(1)
    policy = tiny_llama(seed=0)
    data = preference_data(8)
    with torch.no_grad():
        before = response_log_probs(policy, tokenizer, data["prompt"], data["rejected"])
    trainer = NPOTrainer(
        model=policy, ref_model=copy.deepcopy(policy), args=config(tmp_path, max_steps=4, learning_rate=0.5),
        train_dataset=data, processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    with torch.no_grad():
        after = response_log_probs(policy, tokenizer, data["prompt"], data["rejected"])
    assert (after < before).all(), (before, after)
    assert (after - before).mean() < -0.1
