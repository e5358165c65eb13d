"""HMA ratio search: the likelihood rises, the ratios keep their mean, the functional merge is the real merge."""

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from online_merging.offline import MergeSpec, merge
from online_merging.offline.hma_search import HMAResult, _ratios, sample_responses, search_hma_ratios
from online_merging.world.tokenizer import build_tokenizer
from tests.conftest import tiny_llama

PROMPTS = ["Q: 12+7 A:", "Q: reverse abc A:", "Q: home of gada A:", "Q: translate kesi A:", "Q: 3+4 A:"]
FAST = dict(steps=25, lr=0.1, regularization=0.0, max_new_tokens=8)


def tiny_pair(tie: bool = True, layers: int = 4, seed: int = 0) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A random 4-layer Llama over the world's vocabulary and an "aligned" copy: the same plus noise."""
    sft = tiny_llama(layers=layers, hidden=16, tie=tie, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        aligned = copy.deepcopy(sft)
        with torch.no_grad():
            for p in aligned.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return sft, aligned


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def log_likelihood(model, tokenizer, prompts, responses) -> float:
    """The oracle: mean log-probability of the response tokens, one unpadded sequence at a time."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for prompt, response in zip(prompts, responses, strict=True):
            start = len(tokenizer(prompt)["input_ids"])
            ids = tokenizer(prompt)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]
            logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            total += sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids)))
            tokens += len(ids) - start
    return total / tokens


def merged_model(spec, sft, aligned):
    model = copy.deepcopy(sft)
    model.load_state_dict(merge(spec, sft=sft, aligned=aligned), strict=False)
    return model.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_search_raises_the_likelihood_and_reports_the_real_merge(tokenizer, tie):
    sft, aligned = tiny_pair(tie)
    responses = sample_responses(aligned, tokenizer, PROMPTS, max_new_tokens=8, seed=1)
    result = search_hma_ratios(sft, aligned, tokenizer, PROMPTS, alpha=0.4, blocks=3, responses=responses, **FAST)
    assert result.log_likelihood_after > result.log_likelihood_before
    assert len(result.ratios) == 3 and len(set(result.ratios)) == 3
    assert abs(sum(result.ratios) / 3 - 0.4) < 1e-6
    assert all(0 <= r <= 1 for r in result.ratios)
    # the functional merge is the merge: the likelihoods reported are those of merge()'s models (float32, batched
    # and padded vs one sequence at a time: 1e-5 nats per token)
    hma = merged_model(result.spec, sft, aligned)
    ma = merged_model(MergeSpec("ma", alpha=0.4), sft, aligned)
    assert log_likelihood(hma, tokenizer, PROMPTS, responses) == pytest.approx(result.log_likelihood_after, abs=1e-5)
    assert log_likelihood(ma, tokenizer, PROMPTS, responses) == pytest.approx(result.log_likelihood_before, abs=1e-5)


def test_models_are_left_as_they_were(tokenizer, tmp_path):
    sft, aligned = tiny_pair()
    sft.train()
    aligned.eval()
    before = {role: copy.deepcopy(m.state_dict()) for role, m in (("sft", sft), ("aligned", aligned))}
    search_hma_ratios(sft, aligned, tokenizer, PROMPTS, **FAST)
    for role, model in (("sft", sft), ("aligned", aligned)):
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, before[role][name]), (role, name)
        assert all(p.grad is None for p in model.parameters())
    assert sft.training and not aligned.training


def test_directories_and_saved_results(tokenizer, tmp_path):
    sft, aligned = tiny_pair()
    sft.save_pretrained(tmp_path / "sft")
    aligned.save_pretrained(tmp_path / "aligned")
    from_dirs = search_hma_ratios(tmp_path / "sft", str(tmp_path / "aligned"), tokenizer, PROMPTS, **FAST)
    from_modules = search_hma_ratios(sft, aligned, tokenizer, PROMPTS, **FAST)
    assert from_dirs.ratios == pytest.approx(from_modules.ratios, abs=1e-6)
    assert HMAResult.load(from_dirs.save(tmp_path / "hma.json")) == from_dirs
    assert from_dirs.spec == MergeSpec("hma", alpha=0.5, ratios=from_dirs.ratios)


def test_one_block_is_ma(tokenizer):
    sft, aligned = tiny_pair()
    result = search_hma_ratios(sft, aligned, tokenizer, PROMPTS, alpha=0.3, blocks=1, **FAST)
    assert result.ratios == pytest.approx((0.3,), abs=1e-12)
    assert result.log_likelihood_after == pytest.approx(result.log_likelihood_before, abs=1e-6)


@pytest.mark.parametrize("w", [[0.0, 0.0, 0.0], [3.0, -1.0, 0.5], [40.0, -40.0, 0.0, 2.0]])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_ratios_keep_their_mean_in_the_unit_interval_with_the_implicit_gradient(w, alpha):
    w = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    ratios = _ratios(w, alpha)
    assert abs(ratios.mean().item() - alpha) < 1e-12
    assert bool(((ratios >= 0) & (ratios <= 1)).all())
    assert torch.autograd.gradcheck(lambda x: _ratios(x, alpha), (w,))


def test_sampling_is_seeded_per_prompt_and_leaves_the_callers_rng_alone(tokenizer):
    _, aligned = tiny_pair()
    state = torch.get_rng_state()
    first = sample_responses(aligned, tokenizer, PROMPTS, max_new_tokens=8, seed=3, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample_responses(aligned, tokenizer, PROMPTS, max_new_tokens=8, seed=3) == first
    assert sample_responses(aligned, tokenizer, PROMPTS[1:], max_new_tokens=8, seed=3) != first[1:]  # index-keyed
    assert sample_responses(aligned, tokenizer, PROMPTS, max_new_tokens=8, seed=4) != first
    assert all(0 < len(tokenizer(r, add_special_tokens=False)["input_ids"]) <= 8 for r in first)
    search_hma_ratios(*tiny_pair(), tokenizer, PROMPTS, **{**FAST, "steps": 1})  # samples too
    assert torch.equal(torch.get_rng_state(), state)


def test_sampling_follows_the_model_at_temperature_one(tokenizer):
    _, aligned = tiny_pair()
    with torch.no_grad():
        aligned.lm_head.weight.mul_(5)  # next token: p ≈ 0.53, 0.09, 0.03, ...; temperature 0.85 or 1.2 → TV > 0.1
    prompt, n = "Q: 1+1 A:", 4000
    probs = aligned(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1].softmax(-1).detach()
    tokens = [tokenizer(r, add_special_tokens=False)["input_ids"][0] for r in
              sample_responses(aligned, tokenizer, [prompt] * n, max_new_tokens=1, batch_size=1000)]  # fmt: skip
    frequencies = torch.bincount(torch.tensor(tokens), minlength=len(probs)) / n
    assert 0.5 * (frequencies - probs).abs().sum() < 0.05  # total variation; ~0.02 expected from n samples


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=0.0), "Invalid alpha"),
        (dict(alpha=1.0), "Invalid alpha"),
        (dict(alpha=math.nan), "Invalid alpha"),
        (dict(blocks=0), "Invalid blocks"),
        (dict(blocks=5), "Invalid blocks.*4"),
        (dict(prompts=[]), "Invalid prompts"),
        (dict(responses=[" 1"]), "Invalid responses"),
        (dict(responses=[""] * len(PROMPTS)), "Invalid responses"),
        (dict(steps=-1), "Invalid steps"),
        (dict(lr=0.0), "Invalid lr"),
        (dict(regularization=-1.0), "Invalid regularization"),
        (dict(max_new_tokens=0), "Invalid max_new_tokens"),
        (dict(batch_size=0), "Invalid batch_size"),
        (dict(aligned=tiny_pair(layers=5)[1]), "only in aligned: model.layers.4"),
        (dict(aligned=tiny_pair(tie=False)[1]), "only in aligned: lm_head.weight"),
    ],
)
def test_bad_inputs_are_named(tokenizer, kwargs, match):
    sft, aligned = tiny_pair()
    args = dict(sft=sft, aligned=aligned, tokenizer=tokenizer, prompts=PROMPTS, **FAST) | kwargs
    with pytest.raises(ValueError, match=match):
        search_hma_ratios(**args)


def test_mismatched_shapes_and_unknown_models_are_named(tokenizer):
    sft, _ = tiny_pair()
    other = LlamaForCausalLM(LlamaConfig(**{**sft.config.to_dict(), "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"do not match at 'model.layers.0.mlp.gate_proj.weight'"):
        search_hma_ratios(sft, other, tokenizer, PROMPTS, **FAST)
    with pytest.raises(TypeError, match="Invalid aligned"):
        search_hma_ratios(sft, 3, tokenizer, PROMPTS, **FAST)
