"""`online-merging evaluate` on any local checkpoint: two fake Trainer runs of three checkpoints each, scored on
lm-eval tasks written here and by a reward model and the proxy reward, into a table, evaluation.json and
front.png; which checkpoints a folder stands for; every bad input one line naming its culprit, exit 2, before any
model loads where the check needs none."""

import json
import sys

import pytest
import torch

from online_merging.cli import main
from online_merging.evaluation import (
    Checkpoint,
    ability_scores,
    generate_responses,
    load_causal_lm,
    plot_front,
    resolve_runs,
)
from online_merging.world.tokenizer import build_tokenizer
from tests.conftest import tiny_llama
from tests.evaluation_files import (
    QUESTIONS,
    context,
    pairs,
    prompts,
    save_causal_lm,
    save_reward_model,
    write_jsonl,
    write_tasks,
)

pytest.importorskip("lm_eval")

TASKS = "tiny_choice,tiny_generate"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every path by name, absolute: the reference, run_a (checkpoint-1, -2, -10, the tokenizer beside them), run_b
    (checkpoint-5, -10 and its final model), tasks, a reward model, data files, and bad inputs."""
    root = tmp_path_factory.mktemp("evaluate")
    paths = {"tmp": root, "nowhere": root / "nowhere", "reference": save_causal_lm(root / "reference", 0)}
    for seed, step in enumerate((1, 2, 10), 1):
        save_causal_lm(root / "run_a" / f"checkpoint-{step}", seed, tokenizer=False)
    build_tokenizer().save_pretrained(root / "run_a")
    for seed, step in enumerate((5, 10), 4):
        save_causal_lm(root / "run_b" / f"checkpoint-{step}", seed)
    save_causal_lm(root / "run_b", 6)
    # tiny_generate's targets: half of them the reference's own greedy answers, so that it scores above 0
    reference = load_causal_lm(Checkpoint("reference", paths["reference"]))
    texts = [context(f"{a}+{b}") for a, b in QUESTIONS]
    answers = [a if i % 2 else "zzz" for i, a in enumerate(generate_responses(reference, build_tokenizer(), texts,
                                                                                max_new_tokens=3))]  # fmt: skip
    paths.update(run_a=root / "run_a", run_b=root / "run_b", tasks=write_tasks(root / "tasks", answers))
    paths["zero_tasks"] = write_tasks(root / "zero_tasks", ["zzz"] * len(QUESTIONS))  # nobody answers zzz
    paths["rm"] = save_reward_model(root / "rm")
    paths["classifier"] = save_reward_model(root / "classifier", labels=2)
    paths["prompts"] = write_jsonl(root / "prompts.jsonl", prompts())
    paths["pairs"] = write_jsonl(root / "pairs.jsonl", pairs())
    paths["no_prompt"] = write_jsonl(root / "no_prompt.jsonl", [{"question": "Q: 1+1 A:"}])
    paths["no_rejected"] = write_jsonl(root / "no_rejected.jsonl", [{"prompt": "Q:", "chosen": " 1"}])
    other = build_tokenizer()
    other.add_tokens(["<extra>"])
    save_causal_lm(root / "other_vocab", 8, tokenizer=False)
    other.save_pretrained(root / "other_vocab")
    paths["other_vocab"] = root / "other_vocab"
    (root / "empty").mkdir()
    paths["empty"] = root / "empty"
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text((root / "reference" / "config.json").read_text())
    paths["no_weights"] = root / "no_weights"
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine\n")
    paths["foreign"] = root / "foreign"
    paths["adapter"] = _save_adapter(root / "adapter", paths["reference"])
    return paths


def _save_adapter(folder, base):
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        model = get_peft_model(
            tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(folder)
    return folder


def test_two_runs_end_to_end_table_json_and_png(files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["evaluate", str(files["run_a"]), str(files["run_b"]), "--reference", str(files["reference"]), "--tasks",
            TASKS, "--include-path", str(files["tasks"]), "--reward-model", str(files["rm"]), "--prompts",
            str(files["prompts"]), "--pairs", str(files["pairs"]), "--max-new-tokens", "4", "--batch-size", "4",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    labels = ["reference", *(f"{files['run_a']}/checkpoint-{s}" for s in (1, 2, 10)),
              *(f"{files['run_b']}/checkpoint-{s}" for s in (5, 10)), f"{files['run_b']} (final)"]  # fmt: skip
    assert printed[0].split()[:5] == ["checkpoint", "tiny_choice", "tiny_generate", "ability", "kept"]
    assert "proxy acc" in printed[0] and "proxy margin" in printed[0]
    assert [line.startswith(label + " ") for line, label in zip(printed[1:8], labels, strict=True)] == [True] * 7
    assert any(line.startswith("proxy acc, proxy margin: a proxy reward") for line in printed)

    result = json.loads((out / "evaluation.json").read_text())
    assert [run["name"] for run in result["runs"]] == [str(files["run_a"]), str(files["run_b"])]
    assert [p["step"] for p in result["runs"][0]["checkpoints"]] == [1, 2, 10]
    assert [p["step"] for p in result["runs"][1]["checkpoints"]] == [5, 10, None]
    reference = result["reference"]
    assert reference["ability_kept"] == 1.0 and reference["proxy_reward"]["margin"] == 0.0
    assert result["proxy_reward"]["what"].startswith("proxy reward:")
    scores = {task: value["score"] for task, value in reference["ability"].items()}
    for run in result["runs"]:
        for point in run["checkpoints"]:
            kept = sum(point["ability"][t]["score"] / scores[t] for t in scores) / len(scores)
            assert point["ability_kept"] == pytest.approx(kept)
            assert isinstance(point["reward"], float) and 0 <= point["proxy_reward"]["accuracy"] <= 1
    middle = result["runs"][0]["checkpoints"][1]
    direct = ability_scores(load_causal_lm(Checkpoint("x", files["run_a"] / "checkpoint-2")), build_tokenizer(),
                            TASKS.split(","), include_path=files["tasks"], batch_size=4)  # fmt: skip
    assert {t: s["score"] for t, s in middle["ability"].items()} == {t: s.score for t, s in direct.items()}
    assert result["front"]["x"] == "ability_kept" and result["front"]["y"] == "reward"
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_json_is_written_and_the_png_skipped(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "out"
    argv = ["evaluate", str(files["run_a"] / "checkpoint-1"), "--reference", str(files["reference"]), "--tasks",
            "tiny_choice", "--include-path", str(files["tasks"]), "--limit", "2", "--pairs", str(files["pairs"]),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "no front.png: matplotlib is not installed" in capsys.readouterr().out
    result = json.loads((out / "evaluation.json").read_text())
    assert result["front"]["y_label"].startswith("PROXY reward")
    assert not (out / "front.png").exists()
    assert result["reference"]["ability"]["tiny_choice"]["samples"] == 2
    assert plot_front(result, tmp_path / "front.png") is False


def test_a_task_the_reference_scores_0_on_is_scored_and_its_kept_fraction_marked_undefined(files, tmp_path, capsys):
    def evaluate(tasks, out):
        argv = ["evaluate", str(files["run_a"] / "checkpoint-1"), "--reference", str(files["reference"]), "--tasks",
                tasks, "--include-path", str(files["zero_tasks"]), "--pairs", str(files["pairs"]),
                "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        return json.loads((out / "evaluation.json").read_text()), capsys.readouterr().out.splitlines()

    with pytest.warns(UserWarning, match="reference scores 0 on task 'tiny_generate': .* undefined .* other tasks"):
        result, printed = evaluate(TASKS, tmp_path / "two")
    reference, (point,) = result["reference"], result["runs"][0]["checkpoints"]
    for scored in (reference, point):
        assert scored["ability"]["tiny_generate"]["kept"] is None and scored["ability"]["tiny_generate"]["score"] == 0
    kept = point["ability"]["tiny_choice"]["score"] / reference["ability"]["tiny_choice"]["score"]
    assert point["ability"]["tiny_choice"]["kept"] == pytest.approx(kept) == point["ability_kept"]  # the other task
    assert any("leaving out tiny_generate" in line and "undefined (n/a)" in line for line in printed)
    assert result["front"]["x"] == "ability_kept"

    with pytest.warns(UserWarning, match="so is ability_kept"):
        result, printed = evaluate("tiny_generate", tmp_path / "one")
    assert printed[1].split()[:4] == ["reference", "0.000", "0.000", "n/a"]
    assert result["reference"]["ability_kept"] is None and result["runs"][0]["checkpoints"][0]["ability_kept"] is None
    assert result["front"]["x"] == "ability_mean" and (tmp_path / "one" / "front.png").is_file()


def test_a_trainer_folder_is_one_run_in_step_order_its_final_model_last(files):
    run_a, run_b = resolve_runs([str(files["run_a"]), str(files["run_b"])])
    assert [c.step for c in run_a.checkpoints] == [1, 2, 10]
    assert [c.source for c in run_b.checkpoints] == [files["run_b"] / "checkpoint-5",
                                                     files["run_b"] / "checkpoint-10", files["run_b"]]  # fmt: skip
    (single,) = resolve_runs([str(files["reference"])])
    assert single.checkpoints == (Checkpoint(str(files["reference"]), files["reference"]),)


def test_a_peft_adapter_is_merged_into_its_base(files):
    from peft import PeftModel

    merged = load_causal_lm(Checkpoint("adapter", files["adapter"]))
    unmerged = PeftModel.from_pretrained(load_causal_lm(Checkpoint("base", files["reference"])), files["adapter"])
    base = load_causal_lm(Checkpoint("base", files["reference"]))
    ids = torch.tensor([[1, 20, 21, 22, 5]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, unmerged(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-3)  # the adapter changes something


@pytest.fixture
def forbid_loading(monkeypatch):
    import lm_eval
    import transformers

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded (or lm-eval run) before the check")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(auto, "from_pretrained", loaded)
    monkeypatch.setattr(lm_eval, "simple_evaluate", loaded)


# (id, argv with {name} standing for files[name], what the last line of stderr must name, before any loading)
# fmt: off
AXES = ["--tasks", "tiny_choice", "--include-path", "{tasks}"]
CASES = [
    ("missing", ["{nowhere}", *AXES], "no such checkpoint folder: '{nowhere}'", True),
    ("no-config", ["{empty}", *AXES], "config.json", True),
    ("no-weights", ["{no_weights}", *AXES], "safetensors", True),
    ("hub-offline", ["nobody/no-such-model", *AXES], "nobody/no-such-model", True),
    ("unknown-task", ["{reference}", "--tasks", "tiny_nothing", "--include-path", "{tasks}"],
     "--tasks: unknown lm-eval task 'tiny_nothing'", True),
    ("missing-include-path", ["{reference}", "--tasks", "tiny_choice", "--include-path", "{nowhere}"],
     "--include-path", True),
    ("empty-task-name", ["{reference}", "--tasks", "tiny_choice,,x"], "--tasks", True),
    ("limit-0", ["{reference}", *AXES, "--limit", "0"], "--limit", True),
    ("pairs-need-reference", ["{reference}", "--pairs", "{pairs}"], "--pairs", True),
    ("pairs-no-rejected", ["{reference}", "--reference", "{reference}", "--pairs", "{no_rejected}"],
     "'rejected'", True),
    ("reward-needs-prompts", ["{reference}", "--reward-model", "{rm}"], "--reward-model", True),
    ("prompts-need-reward", ["{reference}", *AXES, "--prompts", "{prompts}"], "--prompts", True),
    ("prompts-no-column", ["{reference}", "--reward-model", "{rm}", "--prompts", "{no_prompt}"], "'prompt'", True),
    ("prompts-missing", ["{reference}", "--reward-model", "{rm}", "--prompts", "{nowhere}.jsonl"], "--prompts", True),
    ("reward-two-labels", ["{reference}", "--reward-model", "{classifier}", "--prompts", "{prompts}"],
     "'{classifier}' has a head of 2 labels", True),
    ("reward-missing", ["{reference}", "--reward-model", "{nowhere}", "--prompts", "{prompts}"],
     "--reward-model", True),
    ("vocabulary", ["{other_vocab}", "--reference", "{reference}", *AXES], "'{other_vocab}'", True),
    ("reference-is-a-run", ["{reference}", "--reference", "{run_a}", *AXES], "--reference", True),
    ("out-foreign", ["{reference}", *AXES, "--out", "{foreign}"], "notes.txt", True),
    ("out-is-an-input", ["{run_a}", *AXES, "--out", "{run_a}"], "--out", True),
    ("out-without-axis", ["{reference}", "--out", "{tmp}/o"], "--out", True),
    ("world-with-axis", ["{reference}", *AXES, "--embedded_world", "quick"], "--embedded_world", True),
]
# fmt: on


def _run(argv):
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own errors
        return stop.code


@pytest.mark.parametrize(("argv", "culprit", "before_loading"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_naming_it(files, argv, culprit, before_loading, request, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if before_loading:
        request.getfixturevalue("forbid_loading")
    code = _run(["evaluate", *(item.format(**files) for item in argv)])
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.strip() and "\r" not in line]  # progress bars aside
    assert code == 2, error
    assert "Traceback" not in error
    assert culprit.format(**files) in lines[-1], error
    if "error: argument" not in lines[-1]:
        assert lines[-1].startswith("online-merging evaluate: error: "), error


def test_an_adapter_without_peft_is_one_line(files, capsys, monkeypatch, forbid_loading):
    monkeypatch.setitem(sys.modules, "peft", None)
    assert main(["evaluate", str(files["adapter"]), *[a.format(**files) for a in AXES]]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "PEFT adapter" in error and "pip install peft" in error
