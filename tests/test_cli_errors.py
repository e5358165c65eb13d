"""Every user error of the `online-merging` command ends in one line naming its culprit, exit status 2, and, when the
check needs no model, before any model loads."""

import json
from pathlib import Path

import pytest
import torch

from online_merging.cli import main
from online_merging.sources import local_or_hub
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "dpo_ondare.yaml")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints and data files, good and bad, by name; every path absolute."""
    from safetensors.torch import save_file

    from online_merging.world import WorldConfig
    from online_merging.world.tokenizer import build_tokenizer
    from online_merging.world.train import make_model

    root = tmp_path_factory.mktemp("cli_errors")
    paths = {"tmp": root, "nowhere": root / "nowhere"}
    for name, model in {"sft": tiny_llama(), "aligned": tiny_llama(seed=1), "wide": tiny_llama(hidden=48)}.items():
        model.save_pretrained(root / name)
        paths[name] = root / name
    for world in ("default", "quick"):  # the architecture and tokenizer of each embedded world, no world built
        directory = root / f"{world}_world_model"
        make_model(WorldConfig() if world == "default" else WorldConfig.quick()).save_pretrained(directory)
        build_tokenizer().save_pretrained(directory)
        paths[f"{world}_world_model"] = directory
    (root / "corrupt").mkdir()
    (root / "corrupt" / "config.json").write_text((root / "sft" / "config.json").read_text())
    (root / "corrupt" / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    paths["corrupt"], paths["corrupt_file"] = root / "corrupt", root / "corrupt" / "model.safetensors"
    (root / "empty").mkdir()
    paths["empty"] = root / "empty"
    for name, tensors in {"tv_base": {"a": torch.ones(2), "b": torch.ones(2)},
                          "tv_names": {"a": torch.ones(2), "c": torch.ones(2)},
                          "tv_shapes": {"a": torch.ones(3), "b": torch.ones(2)}}.items():  # fmt: skip
        save_file(tensors, str(root / f"{name}.safetensors"))
        paths[name] = root / f"{name}.safetensors"
    texts = {
        "file.txt": "not a folder\n",
        "syntax.yaml": "merge: ondare\nalpha: [1, 2\nreserve_p: 0.1\n",
        "list.yaml": "- merge\n- alpha\n",
        "unknown_key.yaml": "merge: ondare\nlearnin_rate: 1.0e-5\n",
        "bad_range.yaml": "merge: ondare\nreserve_p: [0.5]\n",
        "no_chosen.jsonl": '{"prompt": "Q: 1+1 A:", "rejected": " 2"}\n',
        "no_label.jsonl": '{"prompt": "Q: 1+1 A:", "completion": " 2"}\n',
        "bad.json": '[{"prompt": "Q: 1+1 A:"},\n',
        "no_prompt.json": '[{"prompt": "Q: 1+1 A:"}, {"question": "Q: 2+2 A:"}]',
        "bad_line.jsonl": '{"prompt": "Q: 1+1 A:"}\n{"prompt": \n',
    }
    for name, text in texts.items():
        (root / name).write_text(text)
        paths[Path(name).stem] = root / name
    return paths


@pytest.fixture
def forbid_loading(monkeypatch):
    """Make loading a model, reading a tensor, building a world or starting a run fail the test."""
    import transformers

    import online_merging.demo
    import online_merging.lab
    import online_merging.world
    import online_merging.world.build
    from online_merging.merging.weights import Weights

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded (or a world built, or a run started) before the check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    monkeypatch.setattr(Weights, "get", loaded)
    for module in (online_merging.world, online_merging.world.build):
        monkeypatch.setattr(module, "build_world", loaded)
    monkeypatch.setattr(online_merging.lab, "run_lab", loaded)
    monkeypatch.setattr(online_merging.demo, "run_demo", loaded)


# (id, argv with {name} standing for files[name], what stderr must name, whether the check precedes any loading)
# fmt: off
CASES = [
    # train
    ("train-unknown-key", ["train", "{unknown_key}"], "learnin_rate", True),
    ("train-unknown-override", ["train", RECIPE, "--alpah", "0.1"], "--alpah", True),
    ("train-bad-type", ["train", RECIPE, "--max_steps", "many"], "max_steps", True),
    ("train-reserve_p-0", ["train", RECIPE, "--reserve_p", "0"], "'reserve_p'", True),
    ("train-alpha-2", ["train", RECIPE, "--alpha", "2", "--alpha_unit", "absolute"], "'alpha'", True),
    ("train-alpha-negative", ["train", RECIPE, "--alpha", "-1"], "'alpha'", True),
    ("train-merge_every-0", ["train", RECIPE, "--merge_every", "0"], "'merge_every'", True),
    ("train-merge_seed-negative", ["train", RECIPE, "--merge_seed", "-1"], "'merge_seed'", True),
    ("train-bad-choice", ["train", RECIPE, "--merge", "dare"], "--merge", True),
    ("train-learning_rate", ["train", RECIPE, "--learning_rate", "-1"], "'learning_rate'", True),
    ("train-range-in-file", ["train", "{bad_range}"], "'reserve_p'", True),
    ("train-yaml-syntax", ["train", "{syntax}"], "syntax.yaml: not valid YAML, line 3", True),
    ("train-not-a-mapping", ["train", "{list}"], "list.yaml", True),
    ("train-missing-recipe", ["train", "{nowhere}"], "nowhere", True),
    ("train-recipe-folder", ["train", "{tmp}"], "is a folder", True),
    ("train-missing-dataset", ["train", RECIPE, "--dataset_name", "{nowhere}.jsonl"], "dataset_name", True),
    ("train-no-chosen", ["train", RECIPE, "--dataset_name", "{no_chosen}"], "'chosen'", True),
    ("train-kto-no-label", ["train", RECIPE, "--trainer", "kto", "--dataset_name", "{no_label}"], "'label'", True),
    ("train-missing-model", ["train", RECIPE, "--model_name_or_path", "./nowhere", "--base_model_name_or_path",
                             "{sft}"], "model_name_or_path", True),
    ("train-missing-tau", ["train", RECIPE, "--model_name_or_path", "{sft}", "--task_vector_path", "{nowhere}"],
     "task_vector_path", True),
    ("train-tax-eval-partial", ["train", RECIPE, "--model_name_or_path", "{sft}", "--base_model_name_or_path",
                                "{sft}", "--tax_eval_tasks", "t"], "tax_eval_reward_model, tax_eval_prompts", True),
    ("train-tax-eval-missing-reward-model", ["train", RECIPE, "--model_name_or_path", "{sft}",
                                             "--base_model_name_or_path", "{sft}", "--tax_eval_tasks", "t",
                                             "--tax_eval_reward_model", "{nowhere}", "--tax_eval_prompts",
                                             "{no_chosen}"], "tax_eval_reward_model", True),
    ("train-output-is-a-file", ["train", RECIPE, "--output_dir", "{file}"], "output_dir", True),
    # merge
    ("merge-missing-sft", ["merge", "--method", "ma", "--alpha", "0.5", "--sft", "{nowhere}", "--aligned",
                           "{aligned}", "--out", "{tmp}/m1"], "--sft", True),
    ("merge-no-safetensors", ["merge", "--method", "ma", "--alpha", "0.5", "--sft", "{sft}", "--aligned", "{empty}",
                              "--out", "{tmp}/m2"], "empty", True),
    ("merge-corrupt", ["merge", "--method", "ma", "--alpha", "0.5", "--sft", "{sft}", "--aligned", "{corrupt}",
                       "--out", "{tmp}/m3"], "corrupt/model.safetensors", True),
    ("merge-shapes", ["merge", "--method", "ma", "--alpha", "0.5", "--sft", "{sft}", "--aligned", "{wide}",
                      "--out", "{tmp}/m4"], "do not match at", False),
    ("merge-alpha-range", ["merge", "--method", "ma", "--alpha", "1.5", "--sft", "{sft}", "--aligned", "{aligned}",
                           "--out", "{tmp}/m5"], "alpha", True),
    ("merge-alpha-not-a-number", ["merge", "--method", "ma", "--alpha", "half", "--sft", "{sft}", "--aligned",
                                  "{aligned}", "--out", "{tmp}/m6"], "--alpha", True),
    ("merge-weights-count", ["merge", "--method", "linear", "--weights", "1,2,3", "--sft", "{sft}", "--aligned",
                             "{aligned}", "--out", "{tmp}/m7"], "weights", True),
    ("merge-ratios-count", ["merge", "--method", "hma", "--ratios", "0.1,0.2,0.3", "--sft", "{sft}", "--aligned",
                            "{aligned}", "--out", "{tmp}/m8"], "ratios", True),
    ("merge-needs-base", ["merge", "--method", "ties", "--sft", "{sft}", "--aligned", "{aligned}", "--out",
                          "{tmp}/m9"], "--base", True),
    ("merge-density", ["merge", "--method", "dare", "--density", "2", "--sft", "{sft}", "--aligned", "{aligned}",
                       "--base", "{sft}", "--out", "{tmp}/m10"], "density", True),
    ("merge-out-is-a-file", ["merge", "--method", "ma", "--alpha", "0.5", "--sft", "{sft}", "--aligned",
                             "{aligned}", "--out", "{file}"], "--out", True),
    ("merge-bad-method", ["merge", "--method", "soup", "--sft", "{sft}", "--aligned", "{aligned}", "--out", "{tmp}"],
     "--method", True),
    ("merge-hub-offline", ["merge", "--method", "ma", "--alpha", "0.5", "--sft", "{sft}", "--aligned",
                           "nobody/no-such-model", "--out", "{tmp}/m11"], "--aligned", True),
    # task-vector
    ("tv-missing-base", ["task-vector", "--base", "{nowhere}", "--finetuned", "{sft}", "--out", "{tmp}/t.st"],
     "--base", True),
    ("tv-corrupt", ["task-vector", "--base", "{sft}", "--finetuned", "{corrupt_file}", "--out", "{tmp}/t.st"],
     "corrupt/model.safetensors", True),
    ("tv-names", ["task-vector", "--base", "{tv_base}", "--finetuned", "{tv_names}", "--out", "{tmp}/t.st"],
     "only in base: b", True),
    ("tv-shapes", ["task-vector", "--base", "{tv_base}", "--finetuned", "{tv_shapes}", "--out", "{tmp}/t.st"],
     "'a'", False),
    ("tv-out-is-a-folder", ["task-vector", "--base", "{tv_base}", "--finetuned", "{tv_base}", "--out", "{tmp}"],
     "--out", True),
    ("tv-bad-dtype", ["task-vector", "--base", "{sft}", "--finetuned", "{sft}", "--out", "{tmp}/t", "--dtype", "fp8"],
     "--dtype", True),
    # evaluate
    ("evaluate-missing", ["evaluate", "{nowhere}"], "nowhere", True),
    ("evaluate-no-config", ["evaluate", "{empty}"], "config.json", True),
    ("evaluate-not-a-world-model", ["evaluate", "{sft}", "--embedded_world", "quick"], "hidden_size 32", True),
    ("evaluate-quick-model-on-default", ["evaluate", "{quick_world_model}"], "--embedded_world quick", True),
    ("evaluate-default-model-on-quick", ["evaluate", "{default_world_model}", "--embedded_world", "quick"],
     "--embedded_world default", True),
    ("evaluate-bad-world", ["evaluate", "{sft}", "--embedded_world", "big"], "--embedded_world", True),
    # hma-search
    ("hma-missing-sft", ["hma-search", "--sft", "{nowhere}", "--aligned", "{aligned}"], "--sft", True),
    ("hma-missing-aligned", ["hma-search", "--sft", "{sft}", "--aligned", "../nowhere"], "--aligned", True),
    ("hma-missing-prompts", ["hma-search", "--sft", "{sft}", "--aligned", "{aligned}", "--prompts", "{nowhere}"],
     "--prompts", True),
    ("hma-bad-json", ["hma-search", "--sft", "{sft}", "--aligned", "{aligned}", "--prompts", "{bad}"],
     "bad.json' is not valid JSON", True),
    ("hma-no-prompt-field", ["hma-search", "--sft", "{sft}", "--aligned", "{aligned}", "--prompts", "{no_prompt}"],
     "record 2", True),
    ("hma-bad-jsonl-line", ["hma-search", "--sft", "{sft}", "--aligned", "{aligned}", "--prompts", "{bad_line}"],
     "line 2", True),
    ("hma-out-is-a-folder", ["hma-search", "--sft", "{sft}", "--aligned", "{aligned}", "--out", "{tmp}"],
     "--out", True),
    # demo
    ("demo-negative-steps", ["demo", "--steps", "-5"], "--steps", True),
    ("demo-zero-steps", ["demo", "--steps", "0"], "--steps", True),
    ("demo-steps-not-a-number", ["demo", "--steps", "many"], "--steps", True),
    # bench tax-lab
    ("lab-unknown-setting", ["bench", "tax-lab", "--set", "world.layers=2"], "world.layers", True),
    ("lab-bad-setting-value", ["bench", "tax-lab", "--set", "steps=many"], "steps=many", True),
    ("lab-unknown-method", ["bench", "tax-lab", "--methods", "adamw,soup"], "soup", True),
    ("lab-seeds-not-integers", ["bench", "tax-lab", "--seeds", "0,1.5"], "--seeds", True),
    ("lab-workers-0", ["bench", "tax-lab", "--workers", "0"], "--workers", True),
    ("lab-out-is-a-file", ["bench", "tax-lab", "--out", "{file}"], "--out", True),
]
# fmt: on


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own errors
        return stop.code


@pytest.mark.parametrize(("argv", "culprit", "before_loading"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_user_error_is_one_line_naming_its_culprit(files, argv, culprit, before_loading, request, capsys):
    import datasets
    import huggingface_hub

    request.getfixturevalue("monkeypatch").setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if before_loading:
        request.getfixturevalue("forbid_loading")
    datasets.disable_progress_bars()  # datasets draws a bar while it reads a local file; not ours to judge here
    try:
        code = _run([item.format(**files) for item in argv])
    finally:
        datasets.enable_progress_bars()
    error = capsys.readouterr().err
    lines = error.splitlines()
    assert code == 2, error
    assert "Traceback" not in error
    assert culprit.format(**files) in lines[-1], error
    if lines[-1].startswith("online-merging") and "error: argument" not in lines[-1]:
        assert len(lines) == 1, error
    else:  # argparse: its usage (wrapped over lines), then one line of error
        assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), error


def test_a_model_of_the_world_passes_the_check(files):
    from online_merging.cli import _check_world_checkpoint

    _check_world_checkpoint(str(files["quick_world_model"]), "quick")
    _check_world_checkpoint(str(files["default_world_model"]), "default")


def test_the_table_covers_every_command_and_thirty_inputs():
    commands = {argv[0] for _, argv, _, _ in CASES}
    assert commands == {"train", "merge", "task-vector", "evaluate", "hma-search", "demo", "bench"}
    assert len(CASES) >= 30


def test_the_traceback_is_shown_on_request(monkeypatch, files):
    monkeypatch.setenv("ONLINE_MERGING_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="--sft"):
        main(["hma-search", "--sft", str(files["nowhere"]), "--aligned", str(files["aligned"])])


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch):
    import online_merging.demo

    def bug(**kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(online_merging.demo, "run_demo", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["demo", "--steps", "1"])


@pytest.mark.parametrize(
    ("name", "local"),
    [("org/name", False), ("org/name.v2-x", False), ("./org/name", True), ("/org/name", True), ("~/org", True),
     ("org/name/sub", True), ("../name", True), ("gpt2", True), ("org/pairs.jsonl", True), ("org/../x", True)],
)  # fmt: skip
def test_only_an_org_name_id_goes_to_the_hub(name, local):
    if local:
        with pytest.raises(FileNotFoundError, match=r"--opt: no such file or folder: "):
            local_or_hub(name, "--opt")
    else:
        assert local_or_hub(name, "--opt") == name


def test_a_path_under_an_existing_folder_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "run").mkdir()
    assert local_or_hub("outputs/run", "--opt") == Path("outputs/run")
    with pytest.raises(FileNotFoundError, match="outputs/missing"):
        local_or_hub("outputs/missing", "--opt")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".csv"])
def test_every_command_reads_prompts_in_every_format_through_one_reader(suffix, tmp_path, monkeypatch):
    import online_merging.offline.hma_search
    from online_merging.evaluation import read_records

    texts = {".txt": "a\n\nb\n", ".jsonl": json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"prompt": "b", "x": 1}),
             ".json": json.dumps([{"prompt": "a"}, {"prompt": "b"}]), ".csv": "prompt,x\na,1\nb,2\n"}  # fmt: skip
    path = tmp_path / f"p{suffix}"
    path.write_text(texts[suffix])
    assert [r["prompt"] for r in read_records(path, ("prompt",), option="--prompts")] == ["a", "b"]
    seen = {}

    def search(*args, **kwargs):  # hma-search hands its prompts to the search: stop there
        seen["prompts"] = args[3]
        raise ValueError("stopped")

    monkeypatch.setattr(online_merging.offline.hma_search, "search_hma_ratios", search)
    sft = tmp_path / "sft"
    tiny_llama().save_pretrained(sft)
    from online_merging.world.tokenizer import build_tokenizer

    build_tokenizer().save_pretrained(sft)
    out = str(tmp_path / "r.json")
    assert main(["hma-search", "--sft", str(sft), "--aligned", str(sft), "--prompts", str(path), "--out", out]) == 2
    assert seen["prompts"] == ["a", "b"]
