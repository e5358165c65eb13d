"""Outputs never destroy user files: staged beside the target, moved into place at the end, inputs refused first."""

import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

from online_merging import TaskVector
from online_merging._files import MANIFEST, check_not_input, staged_file, staged_folder, write_text
from online_merging.cli import main
from online_merging.offline import MergeSpec, merge, save_merged
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _umask_022():
    """The usual umask, whatever the test runner's: written files must then be 0644 and folders 0755."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """base, sft and aligned checkpoint folders of a tiny Llama, each a perturbation of the one before."""
    root = tmp_path_factory.mktemp("checkpoints")
    model = tiny_llama(layers=1, hidden=8)
    for role in ("base", "sft", "aligned"):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / role)
    return {role: root / role for role in ("base", "sft", "aligned")}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name]


class Crash(Exception):
    pass


# -- the helper -------------------------------------------------------------------------------------------------------


def test_staged_file_replaces_the_target_with_ordinary_permissions(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    os.chmod(target, 0o600)
    write_text(target, "new")
    assert target.read_text() == "new" and mode(target) == 0o644 and no_leftovers(tmp_path)


def test_a_crash_inside_staged_file_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(Crash), staged_file(target) as staged:
        staged.write_bytes(b"half")
        raise Crash
    assert target.read_bytes() == b"old" and no_leftovers(tmp_path)


def test_staged_folder_makes_a_new_folder_with_ordinary_permissions(tmp_path):
    target = tmp_path / "deep" / "out"
    with staged_folder(target) as staged:
        (staged / "x.txt").write_text("x")
    assert mode(target) == 0o755 and mode(target / "x.txt") == 0o644
    assert json.loads((target / MANIFEST).read_text()) == {"files": ["x.txt"]}
    assert no_leftovers(target.parent)


def test_staged_folder_replaces_only_its_own_files_and_keeps_the_others(tmp_path):
    target = tmp_path / "out"
    with staged_folder(target) as staged:
        (staged / "a.txt").write_text("a1")
        (staged / "stale.txt").write_text("s")
    (target / "notes.txt").write_text("the user's")
    with staged_folder(target) as staged:
        (staged / "a.txt").write_text("a2")
    assert {name: data for name, data in snapshot(target).items() if name != MANIFEST} == {
        "a.txt": b"a2",
        "notes.txt": b"the user's",
    }
    assert json.loads((target / MANIFEST).read_text()) == {"files": ["a.txt"]}


def test_staged_folder_refuses_a_folder_of_files_it_did_not_write_before_the_block(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"the user's model")
    refused = r"out '.*out' already holds files this package did not write \(model"
    with pytest.raises(FileExistsError, match=refused), staged_folder(target):
        raise AssertionError("the block ran")
    assert snapshot(target) == {"model.safetensors": b"the user's model"} and no_leftovers(tmp_path)


def test_staged_folder_never_replaces_a_file_its_manifest_does_not_list(tmp_path):
    target = tmp_path / "out"
    with staged_folder(target) as staged:
        (staged / "a.txt").write_text("a1")
    (target / "b.txt").write_text("the user's")
    before = snapshot(target)
    clash = re.escape("holds b.txt, which this package did not write there")
    with pytest.raises(FileExistsError, match=clash), staged_folder(target) as staged:
        (staged / "a.txt").write_text("a2")
        (staged / "b.txt").write_text("ours")
    assert snapshot(target) == before and no_leftovers(tmp_path)


def test_a_crash_inside_staged_folder_leaves_the_folder_as_it_was(tmp_path):
    target = tmp_path / "out"
    with staged_folder(target) as staged:
        (staged / "a.txt").write_text("a1")
    before = snapshot(target)
    with pytest.raises(Crash), staged_folder(target) as staged:
        (staged / "a.txt").write_text("half")
        raise Crash
    assert snapshot(target) == before and no_leftovers(tmp_path)
    with pytest.raises(Crash), staged_folder(tmp_path / "new") as staged:
        raise Crash
    assert not (tmp_path / "new").exists() and no_leftovers(tmp_path)


def test_check_not_input_refuses_the_input_what_lies_inside_it_and_what_contains_it(tmp_path):
    model = tmp_path / "models" / "sft"
    model.mkdir(parents=True)
    (tmp_path / "link").symlink_to(model)
    cases = [
        (model, "is the sft folder"),
        (tmp_path / "link", "is the sft folder"),
        (model / "sub", "lies inside the sft folder"),
        (tmp_path / "models", "contains the sft folder"),
    ]
    for out, problem in cases:
        with pytest.raises(ValueError, match=re.escape(f"out '{out}' {problem}")):
            check_not_input(out, {"sft": str(model)})
    check_not_input(tmp_path / "models" / "merged", {"sft": model, "hub": "org/model", "state": {"w": torch.ones(1)}})


# -- merge ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["sft", "aligned", "base"])
@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_save_merged_refuses_an_input_before_reading_any_model(ckpt, role, where, monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("a model was read")

    monkeypatch.setattr(sys.modules["online_merging.offline.merge"], "open_weights", no_reading)
    out = {"is": ckpt[role], "inside": ckpt[role] / "merged", "contains": ckpt[role].parent}[where]
    before = snapshot(ckpt[role].parent)
    with pytest.raises(ValueError, match=re.escape(f"out '{out}' ") + r"(is|lies inside|contains) the \w+ folder"):
        save_merged(MergeSpec("ties"), out, sft=ckpt["sft"], aligned=ckpt["aligned"], base=ckpt["base"])
    assert snapshot(ckpt[role].parent) == before


def test_a_merge_that_crashes_midway_leaves_the_earlier_merge_as_it_was(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    models = {"sft": ckpt["sft"], "aligned": ckpt["aligned"]}
    save_merged(MergeSpec("ma", alpha=0.0), out, **models)
    before = snapshot(out)
    import safetensors.torch

    save_file, shards = safetensors.torch.save_file, []

    def crash_at_the_second_shard(tensors, path, **kwargs):
        shards.append(path)
        if len(shards) == 2:
            raise Crash
        save_file(tensors, path, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_at_the_second_shard)
    with pytest.raises(Crash):
        save_merged(MergeSpec("ma", alpha=1.0), out, max_shard_bytes=4096, **models)
    assert len(shards) == 2 and snapshot(out) == before and no_leftovers(tmp_path)


def test_a_merge_replaces_its_own_files_keeps_the_users_and_writes_0644(ckpt, tmp_path):
    out = tmp_path / "merged"
    models = {"sft": ckpt["sft"], "aligned": ckpt["aligned"]}
    save_merged(MergeSpec("ma", alpha=0.0), out, **models)
    (out / "README.md").write_text("the user's notes")
    config = ckpt["sft"] / "config.json"
    os.chmod(config, 0o600)  # copied files get ordinary permissions too, not their source's
    try:
        save_merged(MergeSpec("ma", alpha=1.0), out, max_shard_bytes=4096, **models)
    finally:
        os.chmod(config, 0o644)
    assert (out / "README.md").read_text() == "the user's notes"
    assert not (out / "model.safetensors").exists()  # the first save's single shard would load beside the new ones
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    expected = merge(MergeSpec("ma", alpha=1.0), **models)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())
    assert mode(out) == 0o755
    assert {p.name: mode(p) for p in out.iterdir()} == dict.fromkeys((p.name for p in out.iterdir()), 0o644)


@pytest.mark.parametrize("alphas", ["0.3", "0,1"])
def test_merge_command_refuses_an_out_that_is_the_sft_folder(ckpt, capsys, alphas):
    before = snapshot(ckpt["sft"])
    argv = ["merge", "--method", "ma", "--alpha", alphas, "--sft", str(ckpt["sft"]), "--aligned", str(ckpt["aligned"])]
    assert main([*argv, "--out", str(ckpt["sft"])]) == 2
    error = capsys.readouterr().err
    assert f"--out '{ckpt['sft']}" in error and "the --sft folder" in error and error.count("\n") == 1
    assert snapshot(ckpt["sft"]) == before


def test_merge_command_refuses_a_folder_of_someone_elses_files(ckpt, tmp_path, capsys):
    out = tmp_path / "other_model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"another model")
    argv = ["merge", "--method", "ma", "--alpha", "0.5", "--sft", str(ckpt["sft"]), "--aligned", str(ckpt["aligned"])]
    assert main([*argv, "--out", str(out)]) == 2
    assert "already holds files this package did not write (model.safetensors)" in capsys.readouterr().err
    assert snapshot(out) == {"model.safetensors": b"another model"}


# -- task-vector ------------------------------------------------------------------------------------------------------


def test_task_vector_save_is_staged_and_0644(tmp_path, monkeypatch):
    path = tmp_path / "tau.safetensors"
    TaskVector({"w": torch.ones(3)}).save(path)
    assert mode(path) == 0o644
    before = path.read_bytes()
    import safetensors.torch

    def half_then_crash(tensors, filename, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise Crash

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_crash)
    with pytest.raises(Crash):
        TaskVector({"w": torch.zeros(3)}).save(path)
    assert path.read_bytes() == before and no_leftovers(tmp_path)


@pytest.mark.parametrize("role", ["base", "finetuned"])
def test_task_vector_command_refuses_an_out_that_is_an_input(ckpt, role, capsys):
    models = {"base": ckpt["base"] / "model.safetensors", "finetuned": ckpt["sft"] / "model.safetensors"}
    before = {name: path.read_bytes() for name, path in models.items()}
    argv = ["task-vector", "--base", str(models["base"]), "--finetuned", str(models["finetuned"])]
    assert main([*argv, "--out", str(models[role])]) == 2
    assert f"--out '{models[role]}' is the --{role} file" in capsys.readouterr().err
    assert {name: path.read_bytes() for name, path in models.items()} == before
    folders = {"base": ckpt["base"], "finetuned": ckpt["sft"]}
    argv = ["task-vector", "--base", str(folders["base"]), "--finetuned", str(folders["finetuned"])]
    assert main([*argv, "--out", str(folders[role] / "tau.safetensors")]) == 2
    assert f"lies inside the --{role} folder" in capsys.readouterr().err
    assert {name: path.read_bytes() for name, path in models.items()} == before


def test_task_vector_command_replaces_only_its_own_output(ckpt, tmp_path, capsys):
    """Another file at --out (another model's weights, say, which would then load holding τ) is refused before any
    work; a τ this command wrote is replaced."""
    argv = ["task-vector", "--base", str(ckpt["base"]), "--finetuned", str(ckpt["sft"]), "--out"]
    other = tmp_path / "model.safetensors"
    shutil.copy(ckpt["sft"] / "model.safetensors", other)
    before = other.read_bytes()
    assert main([*argv, str(other)]) == 2
    assert "exists and is not a task vector written by this package" in capsys.readouterr().err
    assert other.read_bytes() == before
    ours = tmp_path / "tau.safetensors"
    assert main([*argv, str(ours)]) == 0 and main([*argv, str(ours)]) == 0
    assert set(TaskVector.load(ours)) == set(TaskVector.from_models(ckpt["base"], ckpt["sft"]))


# -- train ------------------------------------------------------------------------------------------------------------


def _no_world(*args, **kwargs):
    raise AssertionError("work started")


@pytest.mark.parametrize("key", ["model_name_or_path", "base_model_name_or_path"])
def test_train_command_refuses_an_output_dir_that_is_a_model_folder(ckpt, key, monkeypatch, capsys):
    monkeypatch.setattr("online_merging.integrations.run._embedded_world", _no_world)
    before = snapshot(ckpt["sft"])
    models = ["--model_name_or_path", str(ckpt["sft"]), "--base_model_name_or_path", str(ckpt["base"])]
    target = ckpt["sft"] if key == "model_name_or_path" else ckpt["base"]
    assert main(["train", str(ROOT / "recipes" / "dpo_ondare.yaml"), *models, "--output_dir", str(target)]) == 2
    assert f"output_dir '{target}' is the {key} folder" in capsys.readouterr().err
    assert snapshot(ckpt["sft"]) == before


def test_train_refuses_the_embedded_worlds_model_folder_before_loading_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from online_merging.integrations import load_recipe, run_recipe

    world = SimpleNamespace(sft_dir=tmp_path / "sft", base_dir=tmp_path / "base")
    world.sft_dir.mkdir()
    world.base_dir.mkdir()
    monkeypatch.setattr("online_merging.integrations.run._embedded_world", lambda recipe, progress: world)
    monkeypatch.setattr("online_merging.integrations.run._load_model", _no_world)
    recipe, config = load_recipe(ROOT / "recipes" / "dpo_adamw.yaml", ["--output_dir", str(world.sft_dir / "run")])
    with pytest.raises(ValueError, match=r"output_dir .* lies inside the embedded world's SFT model folder"):
        run_recipe(recipe, config)


def test_train_writes_summary_json_0644_beside_the_trainers_files(tmp_path, monkeypatch):
    from online_merging.integrations import load_recipe, run, run_recipe

    out = tmp_path / "out"
    monkeypatch.setattr(run, "_embedded_world", lambda recipe, progress: None)
    result = run.RunResult("ondare", str(out), 1e-5, 1, 0.5, {}, None)
    monkeypatch.setattr(run, "_load_dataset", lambda recipe, world: None)
    monkeypatch.setattr(run, "_train", lambda *args: (out / "checkpoint-1").mkdir() or result)  # the Trainer's, kept
    overrides = ["--model_name_or_path", "org/sft", "--base_model_name_or_path", "org/base", "--output_dir", str(out)]
    recipe, config = load_recipe(ROOT / "recipes" / "dpo_ondare.yaml", [*overrides, "--dataset_name", "org/data"])
    summary = run_recipe(recipe, config)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert mode(out / "summary.json") == 0o644 and (out / "checkpoint-1").is_dir() and no_leftovers(out)


# -- the lab ----------------------------------------------------------------------------------------------------------


def test_lab_job_cache_files_are_0644(tmp_path, monkeypatch):
    from online_merging.lab import runner

    monkeypatch.setenv("ONLINE_MERGING_CACHE", str(tmp_path))
    assert runner._cached("runs", "k", lambda: {"points": [1]}) == {"points": [1]}
    path = tmp_path / "lab" / "runs" / "k.json"
    assert json.loads(path.read_text()) == {"points": [1]} and mode(path) == 0o644


def test_lab_report_that_crashes_midway_leaves_the_earlier_report(tmp_path, monkeypatch):
    from online_merging.lab import report

    out = tmp_path / "lab"

    def write(results, folder):
        (folder / "results.json").write_text(json.dumps(results))
        if results.get("crash"):
            raise Crash
        (folder / "fronts.png").write_bytes(b"png")

    monkeypatch.setattr(report, "_write_report", write)
    report.write_report({"n": 1}, out)
    before = snapshot(out)
    assert mode(out / "results.json") == mode(out / "fronts.png") == 0o644 and mode(out) == 0o755
    with pytest.raises(Crash):
        report.write_report({"crash": True}, out)
    assert snapshot(out) == before and no_leftovers(tmp_path)


def test_lab_command_refuses_a_folder_of_someone_elses_files_before_any_job(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("online_merging.lab.lab._execute", _no_world)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main(["bench", "tax-lab", "--quick", "--out", str(out)]) == 2
    assert "already holds files this package did not write (thesis.tex)" in capsys.readouterr().err
    assert snapshot(out) == {"thesis.tex": b"years of work"}


# -- the other files the package writes -------------------------------------------------------------------------------


def test_hma_result_is_staged_and_0644(tmp_path, monkeypatch):
    from online_merging.offline.hma_search import HMAResult

    path = tmp_path / "ratios.json"
    path.write_text("old")
    os.chmod(path, 0o600)
    result = HMAResult((0.4, 0.5, 0.6), 0.5, -1.0, -0.9, 3, 1.0)
    assert HMAResult.load(result.save(path)) == result and mode(path) == 0o644 and no_leftovers(tmp_path)

    def crash(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr("online_merging._files.os.replace", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        HMAResult((0.1, 0.2, 0.3), 0.2, -1.0, -0.9, 3, 1.0).save(path)
    assert HMAResult.load(path) == result and no_leftovers(tmp_path)
