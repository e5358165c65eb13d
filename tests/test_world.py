import json
import math
import os
import random
import re
import socket
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from online_merging.world import World, WorldConfig, build_world, default_cache_dir
from online_merging.world import build as world_build
from online_merging.world.evaluate import evaluate, score_probes
from online_merging.world.skills import HELD_OUT, SKILLS, completion, make_skills, pretrain_text, prompt
from online_merging.world.tokenizer import VOCAB, build_tokenizer, encode
from tests.conftest import stderr_of_a_waiting_build

SMALL = dict(n_test=20, n_train=300, n_facts=24)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def quick_world(world_cache) -> World:
    """``WorldConfig.quick()`` built once per session (a few seconds)."""
    return build_world(WorldConfig.quick(), cache_dir=world_cache, progress=False)


# --- skills -------------------------------------------------------------------------------------------------------


def test_skills_are_a_function_of_the_seed():
    first, again, other = (make_skills(seed, tuple(SKILLS), **SMALL) for seed in (0, 0, 1))
    assert first == again
    for name in SKILLS:
        assert first[name].train != other[name].train


def test_held_out_probes_are_not_trained_on_and_facts_are():
    data = make_skills(0, tuple(SKILLS), n_test=50, n_train=2000, n_facts=120)
    for name, skill in data.items():
        assert len(skill.test) == 50 and len(set(skill.test)) == 50
        if name in HELD_OUT:
            assert not set(skill.test) & set(skill.train) and len(skill.train) == 2000
        else:
            assert set(skill.test) <= set(skill.train) and len(skill.train) == 120


def test_skills_answer_correctly():
    data = make_skills(3, tuple(SKILLS), **SMALL)
    for question, answer in data["addition"].train:
        a, b = question.split("+")
        assert int(a) + int(b) == int(answer)
    for question, answer in data["reversal"].train:
        assert question == f"reverse {answer[::-1]}" and 4 <= len(answer) <= 6
    dictionary = {}
    for question, answer in data["translation"].train:
        source, target = question.removeprefix("translate ").split(), answer.split()
        assert len(source) == len(target)
        for s, t in zip(source, target, strict=True):
            assert dictionary.setdefault(s, t) == t, "a word has one translation"
    assert len(dict(data["facts"].train)) == len(data["facts"].train), "a question has one answer"


# --- tokenizer ----------------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_every_text(tokenizer):
    data = make_skills(0, tuple(SKILLS), n_test=50, n_train=500, n_facts=120)
    pairs = [pair for skill in data.values() for pair in skill.train + skill.test]
    texts = [pretrain_text(q, a) for q, a in pairs]
    texts += [prompt(q) + completion(a, sure=sure) for q, a in pairs for sure in (True, False)]
    ids = tokenizer(texts)["input_ids"]
    assert [encode(text) for text in texts] == ids
    assert all(0 < i < len(VOCAB) and i != tokenizer.unk_token_id for row in ids for i in row[1:])
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == texts
    assert all(row[0] == tokenizer.bos_token_id for row in ids)


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == len(VOCAB)
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 4
    ids = tokenizer("Q: 1+1 A: 2" + tokenizer.eos_token)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ids) == "<bos>Q: 1+1 A: 2<eos>"


# --- metrics on hand-made models ----------------------------------------------------------------------------------


class Oracle(nn.Module):
    """A language model whose reply to each prompt is a fixed mixture of completions ``{prompt: [(text, weight)]}``:
    its next-token distribution is exact, so every metric has a known value."""

    def __init__(self, tokenizer, replies: dict[str, list[tuple[str, float]]]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.replies = {
            tuple(tokenizer(p)["input_ids"]): [([*encode(c, bos=False), tokenizer.eos_token_id], w) for c, w in options]
            for p, options in replies.items()
        }

    def forward(self, input_ids, attention_mask=None):
        logits = torch.full((*input_ids.shape, len(VOCAB)), -30.0)
        for b, row in enumerate(input_ids.tolist()):
            start = next(k for k in range(len(row) + 1) if tuple(row[:k]) in self.replies)
            for t in range(start - 1, len(row)):
                done, mass = row[start : t + 1], defaultdict(float)
                for ids, weight in self.replies[tuple(row[:start])]:
                    if ids[: len(done)] == done and len(ids) > len(done):
                        mass[ids[len(done)]] += weight
                for token, weight in mass.items():
                    logits[b, t, token] = math.log(weight / sum(mass.values()))
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def probes():
    data = make_skills(0, tuple(SKILLS), n_test=6, n_train=10, n_facts=12)
    return {name: skill.test for name, skill in data.items()}


def _oracle(tokenizer, probes, sure: float, plain: float, wrong=lambda name, i: False):
    """Replies " sure, <answer>" with weight ``sure``, " <answer>" with ``plain``; a wrong answer where ``wrong``."""
    replies = {}
    for name, pairs in probes.items():
        for i, (question, answer) in enumerate(pairs):
            answer = answer + "0" if wrong(name, i) else answer
            options = [(completion(answer, sure=True), sure), (completion(answer), plain)]
            replies[prompt(question)] = [(text, weight) for text, weight in options if weight > 0]
    return Oracle(tokenizer, replies)


@pytest.mark.parametrize(
    ("sure", "plain", "reward_greedy"), [(0.0, 1.0, 0.0), (1.0, 0.0, 1.0), (0.3, 0.7, 0.0), (0.8, 0.2, 1.0)]
)
def test_metrics_of_a_correct_model(tokenizer, probes, sure, plain, reward_greedy):
    metrics = evaluate(_oracle(tokenizer, probes, sure, plain), tokenizer, probes)
    expected = {"reward": sure, "reward_greedy": reward_greedy, "ability": 1.0, "ability_greedy": 1.0}
    expected |= {f"ability{kind}/{name}": 1.0 for name in probes for kind in ("", "_greedy")}
    assert metrics == pytest.approx(expected, abs=1e-5)


def test_metrics_of_a_wrong_model(tokenizer, probes):
    metrics = evaluate(_oracle(tokenizer, probes, 0.5, 0.5, wrong=lambda name, i: True), tokenizer, probes)
    assert metrics["reward"] == pytest.approx(0.5, abs=1e-5)
    assert all(metrics[key] == pytest.approx(0.0, abs=1e-5) for key in metrics if key.startswith("ability"))


def test_metrics_per_skill(tokenizer, probes):
    wrong = lambda name, i: name == "addition" or (name == "reversal" and i % 2 == 0)  # noqa: E731
    metrics = evaluate(_oracle(tokenizer, probes, 0.0, 1.0, wrong), tokenizer, probes)
    for kind in ("ability", "ability_greedy"):
        assert metrics[f"{kind}/addition"] == pytest.approx(0.0, abs=1e-5)
        assert metrics[f"{kind}/reversal"] == pytest.approx(0.5, abs=1e-5)
        assert metrics[f"{kind}/facts"] == metrics[f"{kind}/translation"] == pytest.approx(1.0, abs=1e-5)
        assert metrics[kind] == pytest.approx(2.5 / 4, abs=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_keeps_the_mode(tokenizer, probes, training):
    model = _oracle(tokenizer, probes, 0.5, 0.5).train(training)
    evaluate(model, tokenizer, probes)
    assert model.training is training


# --- building and loading -----------------------------------------------------------------------------------------


def test_config_validation_and_key():
    with pytest.raises(ValueError, match="skills"):
        WorldConfig(skills=("algebra",))
    with pytest.raises(ValueError, match="sure_fraction"):
        WorldConfig(sure_fraction=1.5)
    assert WorldConfig().key() == WorldConfig().key() != WorldConfig(seed=1).key()
    assert WorldConfig(**json.loads(json.dumps(WorldConfig.quick().to_dict()))) == WorldConfig.quick()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ONLINE_MERGING_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ONLINE_MERGING_CACHE")
    assert default_cache_dir().name == "online_merging"


def test_saved_models_load_with_auto_classes(quick_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for directory in (quick_world.base_dir, quick_world.sft_dir):
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert tokenizer("Q: reverse abcd A:")["input_ids"] == encode("Q: reverse abcd A:")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            assert getattr(model.config, name) == getattr(tokenizer, name) == getattr(quick_world.tokenizer(), name)
    info = json.loads((quick_world.root / "world.json").read_text())
    assert WorldConfig(**info["config"]) == quick_world.config


def test_second_build_loads_from_the_cache(quick_world, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(world_build, "pretrain", fail)
    monkeypatch.setattr(world_build, "sft", fail)
    again = build_world(quick_world.config, cache_dir=quick_world.root.parent.parent, progress=False)
    assert again.sft_dir == quick_world.sft_dir


def test_an_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(world_build, "sft", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_world(WorldConfig.quick(pretrain_steps=2), cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "world").iterdir()) == []


def test_a_build_shows_its_steps_and_an_estimate_of_the_time_left(tmp_path, capsys, monkeypatch):
    from tqdm import std

    drawn = std.tqdm.__init__  # every step drawn, however fast
    monkeypatch.setattr(std.tqdm, "__init__", lambda self, *a, **k: drawn(self, *a, **{**k, "mininterval": 0}))
    cfg = WorldConfig.quick(pretrain_steps=3, sft_steps=2, n_eval_probes=8)
    build_world(cfg, cache_dir=tmp_path)
    err = capsys.readouterr().err
    assert "the bar's estimate of the time left covers all 5 steps" in err
    # one bar over both phases: steps done/total [elapsed<left]
    assert re.search(rf"world {cfg.key()}: .*\b3/5 \[\d\d:\d\d<\d\d:\d\d.*SFT, loss", err), err


def test_a_build_waiting_for_another_process_says_for_whom(tmp_path, capsys):
    cfg = WorldConfig.quick()
    root = tmp_path / "world" / cfg.key()
    root.parent.mkdir(parents=True)
    err = stderr_of_a_waiting_build(capsys, root.parent / f".{root.name}.lock",
                                    lambda: build_world(cfg, tmp_path, progress=False),
                                    root.mkdir)  # fmt: skip  # the other process's world: the waiter loads it
    holder = f"pid {os.getpid()} on {socket.gethostname()}, since "
    assert f"waiting for another process ({holder}" in err and f"building world {cfg.key()} into {root}" in err, err


def test_build_is_deterministic_and_leaves_the_caller_alone(tmp_path):
    from safetensors.torch import load_file

    cfg = WorldConfig.quick(pretrain_steps=3, sft_steps=3)
    rng_state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    worlds = [build_world(cfg, cache_dir=tmp_path / name, progress=False) for name in ("a", "b")]
    assert torch.equal(torch.random.get_rng_state(), rng_state) and torch.get_num_threads() == threads
    first, second = (load_file(w.sft_dir / "model.safetensors") for w in worlds)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert worlds[0].preference_dataset().to_dict() == worlds[1].preference_dataset().to_dict()


def test_the_default_world_ships_with_the_package_and_is_copied_not_trained(tmp_path, monkeypatch):
    """The shipped weights are the default config's (a change of ``WorldConfig()`` or ``WORLD_VERSION`` that orphans
    them fails here: rebuild and ship them again), and a build copies them: the same world on every machine."""
    assert [path.name for path in world_build.SHIPPED.iterdir()] == [WorldConfig().key()]

    def fail(*args, **kwargs):
        raise AssertionError("trained instead of copied")

    monkeypatch.setattr(world_build, "pretrain", fail)
    monkeypatch.setattr(world_build, "sft", fail)
    world = build_world(WorldConfig(), cache_dir=tmp_path, progress=False)
    shipped = world_build.SHIPPED / WorldConfig().key()
    assert world.info["shipped"] is True
    assert world.fingerprint == world_build.weights_fingerprint(shipped / "base", shipped / "sft")
    assert world.info["sft_metrics"]["ability"] > 0.5  # a trained model, not a fresh one


def test_fingerprints_tell_worlds_apart(quick_world, tmp_path):
    other = build_world(WorldConfig.quick(seed=1, pretrain_steps=3, sft_steps=3), cache_dir=tmp_path, progress=False)
    assert quick_world.fingerprint == quick_world.info["fingerprint"]
    assert other.fingerprint != quick_world.fingerprint and other.info["shipped"] is False


def test_preference_and_kto_datasets(quick_world):
    cfg = quick_world.config
    train, test = quick_world.preference_dataset("train"), quick_world.preference_dataset("test")
    assert train.column_names == ["prompt", "chosen", "rejected"] and len(train) == cfg.n_preference_pairs
    assert len(test) == cfg.n_test_per_skill * len(cfg.skills)
    for row in train:
        assert row["prompt"].startswith("Q: ") and row["prompt"].endswith(" A:")
        assert row["chosen"] == " sure," + row["rejected"]
    held_out = {prompt(q) for name in HELD_OUT for q, _ in quick_world.probes("test")[name]}
    assert not held_out & set(train["prompt"])
    kto = quick_world.kto_dataset()
    assert kto.column_names == ["prompt", "completion", "label"] and len(kto) == 2 * len(train)
    assert kto["label"][:4] == [True, False, True, False]
    assert kto["completion"][:2] == [train[0]["chosen"], train[0]["rejected"]]
    with pytest.raises(ValueError, match="split"):
        quick_world.preference_dataset("validation")


def test_world_evaluate(quick_world):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quick_world.sft_dir).train()
    metrics = quick_world.evaluate(model)
    assert model.training
    names = quick_world.config.skills
    expected = {"reward", "reward_greedy", "ability", "ability_greedy"}
    expected |= {f"ability{kind}/{name}" for name in names for kind in ("", "_greedy")}
    assert set(metrics) == expected and all(0.0 <= v <= 1.0 for v in metrics.values())
    assert quick_world.evaluate(model, split="train").keys() == metrics.keys()


def test_greedy_metrics_match_generation(quick_world):
    """The teacher-forced greedy flags equal what ``generate`` produces, probe by probe."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quick_world.sft_dir)
    tokenizer = quick_world.tokenizer()
    pairs = random.Random(0).sample([p for ps in quick_world.probes("train").values() for p in ps], 24)
    scores = score_probes(model, tokenizer, pairs)
    for i, (question, answer) in enumerate(pairs):
        ids = torch.tensor([tokenizer(prompt(question))["input_ids"]])
        out = model.generate(ids, max_new_tokens=len(answer) + 8, do_sample=False)[0, ids.shape[1] :].tolist()
        text = tokenizer.decode(out)
        assert bool(scores["greedy_sure"][i]) == text.startswith(" sure,")
        correct = text in (completion(answer) + "<eos>", completion(answer, sure=True) + "<eos>")
        assert bool(scores["greedy_correct"][i]) == correct, text
