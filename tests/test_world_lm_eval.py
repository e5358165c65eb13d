"""The world's lm-eval task folder: its files, how it is written, and lm-evaluation-harness scoring on it exactly what
``World.evaluate`` scores as ``ability_greedy/<skill>``, probe by probe, for the SFT model and for a second model."""

import json
import shutil

import pytest
import torch

from online_merging._files import MANIFEST
from online_merging.world import World, WorldConfig, build_world
from online_merging.world.evaluate import score_probes
from online_merging.world.lm_eval_tasks import GROUP, task_files, task_name, write_lm_eval_tasks
from online_merging.world.skills import completion, prompt
from online_merging.world.tokenizer import EOS_ID, PAD_ID, encode

PROBES = {"addition": [("1+2", "3"), ("40+60", "100")], "reversal": [("reverse abcd", "dcba")]}


@pytest.fixture(scope="session")
def quick_world(world_cache) -> World:
    """``WorldConfig.quick()`` built once per session (a few seconds); the same fixture as in test_world.py."""
    return build_world(WorldConfig.quick(), cache_dir=world_cache, progress=False)


# --- the files, without lm-eval ---------------------------------------------------------------------------------


def test_task_files(tmp_path):
    import yaml

    folder = write_lm_eval_tasks(tmp_path / "tasks", PROBES)
    names = {"addition.jsonl", "addition.yaml", "reversal.jsonl", "reversal.yaml", f"{GROUP}.yaml", MANIFEST}
    assert {p.name for p in folder.iterdir()} == names
    rows = [json.loads(line) for line in (folder / "addition.jsonl").read_text().splitlines()]
    assert rows[1] == {"question": "40+60", "answer": "100", "prompt": "Q: 40+60 A:", "targets": [" sure, 100", " 100"]}
    task = yaml.safe_load((folder / "addition.yaml").read_text())
    assert task["task"] == task_name("addition") == "online_merging_world_addition"
    assert task["dataset_kwargs"]["data_files"]["test"] == str(folder.absolute() / "addition.jsonl")
    # the longest target, " sure, 100", is 10 tokens: one more lets no reply cut by the limit pass as a target
    assert task["generation_kwargs"] == {"until": ["<eos>"], "do_sample": False, "max_gen_toks": 11}
    group = yaml.safe_load((folder / f"{GROUP}.yaml").read_text())
    assert group["task"] == [task_name("addition"), task_name("reversal")]
    assert group["aggregate_metric_list"][0]["weight_by_size"] is False
    with pytest.raises(ValueError, match="'facts' has none"):
        task_files(tmp_path / "other", {"facts": []})


def test_task_folder_is_written_once_and_repaired(tmp_path):
    folder = write_lm_eval_tasks(tmp_path / "tasks", PROBES)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert write_lm_eval_tasks(folder, PROBES) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # nothing rewritten
    (folder / "reversal.jsonl").unlink()
    (folder / "notes.txt").write_text("mine")
    write_lm_eval_tasks(folder, PROBES)
    assert (folder / "reversal.jsonl").is_file() and (folder / "notes.txt").read_text() == "mine"


def test_task_folder_refuses_foreign_files(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "addition.yaml").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write"):
        write_lm_eval_tasks(folder, PROBES)
    assert [p.name for p in folder.iterdir()] == ["addition.yaml"] and (folder / "addition.yaml").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["tasks"]  # no staging folder left behind


def test_a_world_writes_its_task_folder(quick_world):
    folder = quick_world.lm_eval_dir
    files = task_files(folder, quick_world.probes("test"))
    assert all((folder / name).read_text() == text for name, text in files.items())  # written by the build
    shutil.rmtree(folder)  # a world cached before the folder existed: written on first request
    assert quick_world.lm_eval_tasks() == folder
    assert all((folder / name).read_text() == text for name, text in files.items())


# --- lm-eval on the folder --------------------------------------------------------------------------------------


def test_task_manager_parses_the_folder(quick_world):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(quick_world.lm_eval_tasks()), include_defaults=False)
    skills = quick_world.config.skills
    assert set(manager.all_subtasks) == {task_name(skill) for skill in skills}
    assert manager.all_groups == [GROUP]
    loaded = manager.load([GROUP])
    assert loaded["group_map"] == {GROUP: [task_name(skill) for skill in skills]}
    for skill, probes in quick_world.probes("test").items():
        docs = list(loaded["tasks"][task_name(skill)].eval_docs)
        assert [(doc["question"], doc["answer"]) for doc in docs] == probes


def _taught(world: World):
    """The SFT model trained on half of the test probes (" sure, <answer>" for every other one), so that it answers
    some right, in both styles, and others wrong: a model whose greedy replies are far from the SFT model's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world.sft_dir)
    pairs = [pair for pairs in world.probes("test").values() for pair in pairs][::2]
    rows = [(encode(prompt(q)), [*encode(completion(a, sure=i % 2 == 0), bos=False), EOS_ID]) for i, (q, a) in
            enumerate(pairs)]  # fmt: skip
    width = max(len(c) + len(r) for c, r in rows)
    ids, labels = torch.full((len(rows), width), PAD_ID), torch.full((len(rows), width), -100)
    for i, (context, reply) in enumerate(rows):
        ids[i, : len(context) + len(reply)] = torch.tensor(context + reply)
        labels[i, len(context) : len(context) + len(reply)] = torch.tensor(reply)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
        for _ in range(100):
            model(input_ids=ids, attention_mask=(ids != PAD_ID).long(), labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("which", ["sft", "taught"])
def test_lm_eval_exact_match_is_ability_greedy(quick_world, which, one_thread):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quick_world.sft_dir) if which == "sft" else _taught(quick_world)
    tokenizer, probes = quick_world.tokenizer(), quick_world.probes("test")
    metrics = quick_world.evaluate(model, tokenizer)
    flags = score_probes(model, tokenizer, [pair for pairs in probes.values() for pair in pairs])["greedy_correct"]
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16, device="cpu"),
        tasks=[GROUP],
        task_manager=TaskManager(include_path=str(quick_world.lm_eval_tasks()), include_defaults=False),
        log_samples=True,
        # lm-eval seeds the global RNGs unless told not to
        random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None,
    )  # fmt: skip
    lm_flags, begin = [], 0
    for skill, pairs in probes.items():
        samples = sorted(out["samples"][task_name(skill)], key=lambda sample: sample["doc_id"])
        assert [sample["doc"]["question"] for sample in samples] == [q for q, _ in pairs]
        lm_flags += [float(sample["exact_match"]) for sample in samples]
        # counts, exactly: World.evaluate's mean is a float32 mean, lm-eval's a float64 one
        lm_count = float(out["results"][task_name(skill)]["exact_match,none"]) * len(pairs)
        count = int(flags[begin : begin + len(pairs)].sum())
        assert round(lm_count) == round(metrics[f"ability_greedy/{skill}"] * len(pairs)) == count, skill
        begin += len(pairs)
    assert lm_flags == flags.tolist()
    assert float(out["results"][GROUP]["exact_match,none"]) == pytest.approx(metrics["ability_greedy"])
    if which == "taught":  # a comparison that can tell right from wrong, in both styles
        replies = [s["filtered_resps"][0] for skill in probes for s in out["samples"][task_name(skill)]]
        right = [reply for reply, flag in zip(replies, lm_flags, strict=True) if flag]
        assert 8 <= len(right) <= len(replies) - 8
        assert any(r.startswith(" sure, ") for r in right) and any(not r.startswith(" sure,") for r in right)
