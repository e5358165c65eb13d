"""The two axes on in-memory models, against computations by hand: lm-eval's ability (acc from log-probabilities,
exact match from greedy decoding), a reward model's score, the proxy reward's accuracy and margin; and what scoring
must leave alone (the global RNGs, the model's mode)."""

import random

import numpy as np
import pytest
import torch

from online_merging.evaluation import (
    ability_kept,
    ability_scores,
    generate_responses,
    kept_fractions,
    pair_logprobs,
    preference_proxy,
    reward_score,
)
from online_merging.world.tokenizer import BOS, EOS, EOS_ID, build_tokenizer, encode
from tests.conftest import tiny_llama
from tests.evaluation_files import QUESTIONS, context, pairs, save_reward_model, write_tasks

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3).eval()


@torch.no_grad()
def logprob(model, ids: list[int], start: int) -> float:
    """log p(ids[start:] | ids[:start]), one unpadded forward pass in float64."""
    logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


@torch.no_grad()
def greedy(model, text: str, tokens: int) -> str:
    """Greedy continuation of ``text``, one token per forward pass, no padding, stopped at EOS."""
    from online_merging.world.tokenizer import VOCAB

    ids = encode(text)
    out = []
    for _ in range(tokens):
        step = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if step == EOS_ID:
            break
        ids.append(step)
        out.append(VOCAB[step])
    return "".join(out)


def test_acc_is_the_argmax_of_the_choices_log_probabilities(model, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    scores = ability_scores(model, build_tokenizer(), ["tiny_choice"], include_path=tasks, batch_size=4)
    hits = []
    for i, (a, b) in enumerate(QUESTIONS):
        prefix = context(f"{a}+{b}")
        choices = [f" {a + b}", f" {a + b + 1}", f" {a * b + 3}"]
        logps = [logprob(model, encode(prefix + choice), len(encode(prefix))) for choice in choices]
        hits.append(int(np.argmax(logps)) == i % 3)
    assert scores["tiny_choice"].score == pytest.approx(sum(hits) / len(hits))
    assert scores["tiny_choice"].metric == "acc,none" and scores["tiny_choice"].samples == len(QUESTIONS)
    assert type(scores["tiny_choice"].score) is float


def test_exact_match_compares_the_greedy_outputs(model, tmp_path):
    outputs = [greedy(model, context(f"{a}+{b}"), 3) for a, b in QUESTIONS]
    answers = [out if i % 2 == 0 else "zzz" for i, out in enumerate(outputs)]  # half of them the model's own
    tasks = write_tasks(tmp_path / "tasks", answers)
    scores = ability_scores(model, build_tokenizer(), ["tiny_generate"], include_path=tasks, batch_size=4)
    expected = sum(out == answer for out, answer in zip(outputs, answers, strict=True)) / len(QUESTIONS)
    assert expected == 0.5
    assert scores["tiny_generate"] == (0.5, "exact_match,none", len(QUESTIONS))
    assert type(scores["tiny_generate"].score) is float  # lm-eval gives a np.float64


@pytest.mark.parametrize("training", [True, False])
def test_scoring_keeps_the_rngs_and_the_mode(model, tmp_path, training):
    tasks = write_tasks(tmp_path / "tasks")
    model.train(training)
    model.model.layers[0].eval()  # a mixed state, kept as it is
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    modes = [m.training for m in model.modules()]
    ability_scores(model, build_tokenizer(), ["tiny_choice", "tiny_generate"], include_path=tasks, limit=2)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.random.get_rng_state(), before[2])
    assert [m.training for m in model.modules()] == modes
    model.eval()


def test_a_tokenizer_that_appends_eos_scores_as_one_that_does_not(model, tmp_path):
    from tokenizers import processors

    outputs = [greedy(model, context(f"{a}+{b}"), 3) for a, b in QUESTIONS]
    tasks = write_tasks(tmp_path / "tasks", [out if i % 2 == 0 else "zzz" for i, out in enumerate(outputs)])
    appending = build_tokenizer()
    appending._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A $B {EOS}", special_tokens=[(BOS, 1), (EOS, 2)]
    )
    assert appending("1")["input_ids"][-1] == EOS_ID
    names = ["tiny_choice", "tiny_generate"]
    plain = ability_scores(model, build_tokenizer(), names, include_path=tasks)
    assert plain["tiny_generate"].score == 0.5  # an EOS after the context would change the greedy outputs
    assert ability_scores(model, appending, names, include_path=tasks) == plain
    assert appending("1")["input_ids"][-1] == EOS_ID  # the caller's tokenizer is not changed


def test_an_unknown_task_is_named(model, tmp_path):
    with pytest.raises(ValueError, match="unknown lm-eval task 'tiny_nothing'"):
        ability_scores(model, build_tokenizer(), ["tiny_nothing"], include_path=write_tasks(tmp_path / "tasks"))


def test_ability_kept_is_the_mean_ratio_over_the_tasks_where_it_is_defined():
    assert ability_kept({"a": 0.5, "b": 0.3}, {"a": 1.0, "b": 0.6}) == pytest.approx(0.5)
    assert kept_fractions({"a": 0.5, "b": 0.3}, {"a": 1.0, "b": 0.0}) == {"a": 0.5, "b": None}  # b: undefined
    assert ability_kept({"a": 0.5, "b": 0.3}, {"a": 1.0, "b": 0.0}) == 0.5
    assert ability_kept({"b": 0.3}, {"b": 0.0}) is None


def test_the_reward_is_the_reward_models_mean_score_of_the_greedy_responses(model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from online_merging.evaluation import load_reward_model

    reward_model, reward_tokenizer = load_reward_model(save_reward_model(tmp_path / "rm"))
    texts = [context(f"{a}+{b}") for a, b in QUESTIONS]
    tokenizer = build_tokenizer()
    responses = generate_responses(model, tokenizer, texts, max_new_tokens=5, batch_size=4)
    assert responses == [greedy(model, text, 5) for text in texts]  # left padding changes nothing
    score = reward_score(model, tokenizer, reward_model, reward_tokenizer, texts, max_new_tokens=5, batch_size=4)
    direct = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        by_hand = [
            float(direct(torch.tensor([encode(t + r)])).logits[0, 0]) for t, r in zip(texts, responses, strict=True)
        ]
    assert score == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)


def test_sampled_responses_repeat_under_a_seed_and_leave_the_global_rng(model):
    texts = [context(f"{a}+{b}") for a, b in QUESTIONS]
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    first = generate_responses(model, build_tokenizer(), texts, max_new_tokens=6, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert generate_responses(model, build_tokenizer(), texts, max_new_tokens=6, seed=1) == first
    assert generate_responses(model, build_tokenizer(), texts, max_new_tokens=6, seed=2) != first


def test_a_reward_model_with_two_labels_is_refused_naming_its_folder(tmp_path):
    from online_merging.evaluation import load_reward_model

    folder = save_reward_model(tmp_path / "classifier", labels=2)
    with pytest.raises(ValueError, match=f"{folder}.*head of 2 labels"):
        load_reward_model(folder)


def test_the_proxy_reward_is_trls_accuracy_and_margin(model):
    reference = tiny_llama(seed=4).eval()
    data = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} if i % 2 else p for i, p in enumerate(pairs())]
    tokenizer = build_tokenizer()
    proxy = preference_proxy(pair_logprobs(model, tokenizer, data, batch_size=4),
                             pair_logprobs(reference, tokenizer, data, batch_size=4), beta=0.3)  # fmt: skip
    margins = []
    for pair in data:
        start = len(encode(pair["prompt"]))
        logps = {}
        for name, policy in (("pi", model), ("ref", reference)):
            for side in ("chosen", "rejected"):
                ids = [*encode(pair["prompt"] + pair[side]), EOS_ID]  # TRL appends EOS to completions
                logps[name, side] = logprob(policy, ids, start)
        margins.append(0.3 * ((logps["pi", "chosen"] - logps["ref", "chosen"])
                              - (logps["pi", "rejected"] - logps["ref", "rejected"])))  # fmt: skip
    assert 0 < sum(m > 0 for m in margins) < len(margins)  # both outcomes occur: the accuracy is tested
    assert proxy.accuracy == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert proxy.margin == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert preference_proxy(pair_logprobs(reference, tokenizer, data), pair_logprobs(reference, tokenizer, data)) == (
        0.0, 0.0, 0.1)  # fmt: skip
