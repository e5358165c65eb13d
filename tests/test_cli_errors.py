"""Every user error of the `online-merging` command ends in one line naming its culprit, exit status 2, and, when the
check needs no model, before any model loads."""

import errno
import json
import shutil
import sys
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
    optimizer = root / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [{"lr": 1e-5, "params": [0]}]}, optimizer)
    truncated = {"truncated": ("sft", "model.safetensors"), "truncated_world": ("default_world_model",
                 "model.safetensors"), "resume_model": ("sft", "model.safetensors"),
                 "resume_optimizer": ("sft", "optimizer.pt")}  # fmt: skip
    for name, (source, file) in truncated.items():  # a copy cut short: the first half of the file
        shutil.copytree(paths[source], root / name)
        shutil.copy(optimizer, root / name)
        data = (root / name / file).read_bytes()
        (root / name / file).write_bytes(data[: len(data) // 2])
        paths[name], paths[f"{name}_file"] = root / name, root / name / file
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
        "pairs.jsonl": '{"prompt": "Q: 1+1 A:", "chosen": " 2", "rejected": " 3"}\n',
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
    ("train-unknown-recipe-name", ["train", "dpo_soup"], "shipped: dpo_adamw, dpo_allo", True),
    ("train-model-truncated", ["train", RECIPE, "--model_name_or_path", "{truncated}", "--base_model_name_or_path",
                               "{sft}"], "model_name_or_path: '{truncated_file}' is not a readable safetensors", True),
    ("train-resume-truncated-model", ["train", RECIPE, "--resume_from_checkpoint", "{resume_model}", "--output_dir",
                                      "{tmp}/r1"], "resume_from_checkpoint: '{resume_model_file}'", True),
    ("train-resume-truncated-optimizer", ["train", RECIPE, "--resume_from_checkpoint", "{resume_optimizer}",
                                          "--output_dir", "{tmp}/r2"],
     "resume_from_checkpoint: '{resume_optimizer_file}' is a torch archive without its end", True),
    # merge
    ("merge-missing-sft", ["merge", "--method", "ma", "--alpha", "0.5", "--sft", "{nowhere}", "--aligned",
                           "{aligned}", "--out", "{tmp}/m1"], "--sft", True),
    ("merge-no-safetensors", ["merge", "--method", "ma", "--alpha", "0.5", "--sft", "{sft}", "--aligned", "{empty}",
                              "--out", "{tmp}/m2"], "empty", True),
    ("merge-corrupt", ["merge", "--method", "ma", "--alpha", "0.5", "--sft", "{sft}", "--aligned", "{corrupt}",
                       "--out", "{tmp}/m3"], "corrupt/model.safetensors", True),
    ("merge-truncated", ["merge", "--method", "ma", "--alpha", "0.5", "--sft", "{sft}", "--aligned", "{truncated}",
                         "--out", "{tmp}/m12"], "'{truncated_file}' is not a readable safetensors", True),
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
    ("tv-truncated", ["task-vector", "--base", "{sft}", "--finetuned", "{truncated}", "--out", "{tmp}/t.st"],
     "'{truncated_file}' is not a readable safetensors", True),
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
    ("evaluate-truncated", ["evaluate", "{truncated_world}"], "'{truncated_world_file}' is not a readable safetensors",
     True),
    ("evaluate-pairs-truncated", ["evaluate", "{truncated_world}", "--pairs", "{pairs}", "--reference",
                                  "{default_world_model}"], "'{truncated_world_file}' is not a readable", True),
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


# -- Ctrl-C, a missing extra, a full disk: one line too ---------------------------------------------------------------


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["demo", "merge", "bench"])
def test_ctrl_c_is_one_line_saying_what_was_kept_exit_130(files, command, monkeypatch, capsys):
    """Interrupted midway (a merge between two tensors): nothing partial is left, not even the staged copy."""
    import online_merging.demo
    import online_merging.lab
    from online_merging.lab.runner import lab_cache_dir

    monkeypatch.setattr(online_merging.demo, "run_demo", _interrupt)
    monkeypatch.setattr(sys.modules["online_merging.offline.merge"], "_merge_one", _interrupt)  # the module
    monkeypatch.setattr(online_merging.lab, "run_lab", _interrupt)
    out = files["tmp"] / f"interrupted-{command}"
    argv = {"demo": ["demo"], "bench": ["bench", "tax-lab", "--quick", "--out", str(out)],
            "merge": ["merge", "--method", "ma", "--alpha", "0.5", "--sft", str(files["sft"]), "--aligned",
                      str(files["aligned"]), "--out", str(out)]}[command]  # fmt: skip
    assert main(argv) == 130
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"online-merging {command}: interrupted (Ctrl-C): the inputs are untouched and nothing "
                           "partial was written"), line  # fmt: skip
    assert (f"the jobs finished so far are cached in {lab_cache_dir()}" in line) == (command == "bench")
    assert not out.exists() and not list(files["tmp"].glob(f".{out.name}*"))


@pytest.mark.parametrize("saved", [False, True], ids=["no-checkpoint", "checkpoints"])
def test_ctrl_c_in_train_names_the_checkpoint_to_resume_from(tmp_path, saved, monkeypatch, capsys):
    import online_merging.integrations

    out = tmp_path / "run"
    for step in (2, 10) if saved else ():
        (out / f"checkpoint-{step}").mkdir(parents=True)
    monkeypatch.setattr(online_merging.integrations, "run_recipe", _interrupt)
    assert main(["train", RECIPE, "--output_dir", str(out)]) == 130
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("online-merging train: interrupted (Ctrl-C): "), line
    if saved:
        assert line.endswith(f"kept in {out}; resume with --resume_from_checkpoint {out / 'checkpoint-10'}"), line
    else:
        assert f"no checkpoint was saved yet in {out}" in line, line


@pytest.mark.parametrize(
    ("missing", "argv", "extra"),
    [("yaml", ["train", RECIPE], "trl"), ("transformers", ["train", "dpo_recommended"], "trl"),
     ("transformers", ["evaluate", "{default_world_model}"], "trl"),
     ("yaml", ["merge", "--method", "ma", "--alpha", "0.5", "--sft", "{sft}", "--aligned", "{aligned}", "--out",
               "{tmp}/mk", "--mergekit-config"], "trl")],
    ids=["train-yaml", "train-transformers", "evaluate-transformers", "merge-mergekit-config-yaml"],
)  # fmt: skip
def test_a_missing_extra_is_one_line_naming_its_install_command(files, missing, argv, extra, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # `import yaml` now fails as if it were not installed
    assert _run([item.format(**files) for item in argv]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"online-merging {argv[0]}: error: {missing} is not installed: pip install "
                     f"'online-merging[{extra}]'"]  # fmt: skip


@pytest.mark.parametrize("module", ["online_merging.no_such_module", "transformers.no_such_module"])
def test_a_missing_module_of_an_installed_package_is_a_bug_not_a_missing_extra(module, monkeypatch):
    import importlib

    import online_merging.demo

    monkeypatch.setattr(online_merging.demo, "run_demo", lambda **kwargs: importlib.import_module(module))
    with pytest.raises(ModuleNotFoundError, match=module):
        main(["demo", "--steps", "1"])


@pytest.mark.parametrize("command", ["merge", "task-vector"])
@pytest.mark.parametrize("raised", ["OSError", "SafetensorError"])
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(files, command, raised, monkeypatch, capsys):
    """safetensors' writer fails with its own error, or an OSError (ENOSPC) from a write of ours."""
    import safetensors.torch
    from safetensors import SafetensorError

    full = {"OSError": OSError(errno.ENOSPC, "No space left on device"),
            "SafetensorError": SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                               'message: "No space left on device" })')}[raised]  # fmt: skip

    def write(*args, **kwargs):
        raise full

    monkeypatch.setattr(safetensors.torch, "save_file", write)
    out = files["tmp"] / f"full-{command}-{raised}"
    models = ["--sft", str(files["sft"]), "--aligned", str(files["aligned"])]
    argv = {"merge": ["merge", "--method", "ma", "--alpha", "0.5", *models, "--out", str(out)],
            "task-vector": ["task-vector", "--base", str(files["sft"]), "--finetuned", str(files["aligned"]), "--out",
                            str(out)]}[command]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err
    line = error.splitlines()[-1]  # after task-vector's progress bar
    assert "Traceback" not in error
    assert line.startswith(f"online-merging {command}: error: no space left on the device writing --out {str(out)!r}; "
                           "the inputs are untouched and nothing partial was written"), line  # fmt: skip
    assert not out.exists() and not list(files["tmp"].glob(f".{out.name}*"))


def test_a_full_disk_in_train_says_the_checkpoint_being_written_may_be_cut_short(tmp_path, monkeypatch, capsys):
    """The Trainer writes its checkpoints in place, not staged: the line must not say that nothing partial is left."""
    import online_merging.integrations

    def write(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(online_merging.integrations, "run_recipe", write)
    assert main(["train", RECIPE, "--output_dir", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("online-merging train: error: no space left on the device; the checkpoint being written "
                           "may be cut short"), line  # fmt: skip
