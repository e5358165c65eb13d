"""`online-merging train` runs: its output folder follows the package's rules (new, empty, or an earlier run, which
is resumed or, with --overwrite_output_dir, replaced, its files only), a killed run resumes bit for bit, and what a
user would not expect (a learning rate that moves one run of two, a τ of zeros) is said."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from online_merging import TaskVector
from online_merging._files import MANIFEST, check_folder_target
from online_merging.cli import main
from online_merging.integrations import build_optimizer, load_recipe, run_recipe
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
ONTIES = str(ROOT / "recipes" / "dpo_onties.yaml")
QUICK = ["--embedded_world", "quick", "--per_device_train_batch_size", "4", "--logging_steps", "1"]


def named_world(world_cache) -> list[str]:
    """The quick world's SFT and base models named by path (its pairs are the data): a named model is not scored."""
    from online_merging.world import WorldConfig, build_world

    world = build_world(WorldConfig.quick(), cache_dir=world_cache, progress=False)
    return [
        "--model_name_or_path", str(world.sft_dir), "--base_model_name_or_path", str(world.base_dir),
        "--tax_eval_every", "0",
    ]  # fmt: skip


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the output folder ------------------------------------------------------------------------------------------------


def test_a_folder_of_the_users_files_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONLINE_MERGING_CACHE", str(tmp_path / "cache"))  # a world built would land here
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    (out / "summary.json").write_text('{"mine": true}\n')
    assert main(["train", ONTIES, *QUICK, "--max_steps", "1", "--output_dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"output_dir {str(out)!r} already holds files" in error and "README.md, summary.json" in error
    assert tree(out) == {"README.md": b"my notes\n", "summary.json": b'{"mine": true}\n'}
    assert not (tmp_path / "cache").exists()


def test_a_second_run_needs_overwrite_output_dir_and_then_replaces_the_first_whole(tmp_path, world_cache, capsys):
    out = tmp_path / "out"
    first = [*QUICK, *named_world(world_cache), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"]
    assert main(["train", ONTIES, *first, "--compare_with_adamw", "true", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    made = {p.name for p in out.iterdir()}
    assert {"checkpoint-1", "checkpoint-2", "adamw_baseline", "summary.json", "model.safetensors"} <= made
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == made - {MANIFEST}
    with pytest.raises(FileExistsError, match="is the output folder of a train run"):
        check_folder_target(out, name="--out")  # merge's --out: a run's checkpoints are no files it may replace
    before = tree(out)

    second = [*QUICK, *named_world(world_cache), "--max_steps", "1", "--save_strategy", "no", "--output_dir", str(out)]
    assert main(["train", ONTIES, *second]) == 2
    error = capsys.readouterr().err
    assert f"output_dir {str(out)!r} holds an earlier run" in error and "--overwrite_output_dir true" in error
    (out / "adamw_baseline" / "notes.txt").write_text("mine\n")  # a file of the user's, in the run's subfolder
    assert main(["train", ONTIES, *second, "--overwrite_output_dir", "true"]) == 2
    assert "files it did not write (adamw_baseline/notes.txt)" in capsys.readouterr().err
    assert tree(out) == {**before, "adamw_baseline/notes.txt": b"mine\n"}  # nothing removed, nothing written

    (out / "adamw_baseline" / "notes.txt").unlink()
    assert main(["train", ONTIES, *second, "--overwrite_output_dir", "true"]) == 0
    left = {p.name for p in out.iterdir()} - {MANIFEST}
    assert not any(name.startswith("checkpoint-") for name in left) and "adamw_baseline" not in left
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == left
    (run,) = json.loads((out / "summary.json").read_text())["runs"]
    assert run["steps"] == 1
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]  # the second run's model

    recipe, config = load_recipe(ONTIES)  # the first run's summary said at which rate each run trained, and why
    rates = f"learning rates: onties {config.learning_rate:g} (learning_rate), adamw {recipe.adamw_learning_rate:g}"
    assert f"{rates} (adamw_learning_rate): each method at its own tuned rate" in printed


# -- resume -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("models", ["named", "embedded"])
def test_a_killed_run_resumes_bit_for_bit(models, tmp_path, world_cache, monkeypatch):
    """τ comes from the SFT and base models, not from the resumed weights: the resumed run's optimizer loads its
    checkpoint and ends where the uninterrupted run does, every weight equal. On the embedded world the AdamW
    baseline trains after the recipe's run: it is killed there, and resumes from its own checkpoint."""
    from transformers import Trainer

    chosen = named_world(world_cache) if models == "named" else []
    keys = [*QUICK, *chosen, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    run = ["train", ONTIES, *keys]
    assert main([*run, "--output_dir", str(tmp_path / "full")]) == 0
    killed_in = Path("adamw_baseline") if models == "embedded" else Path()

    save = Trainer._save_checkpoint

    def save_then_die(trainer, *args, **kwargs):
        save(trainer, *args, **kwargs)
        if trainer.state.global_step == 2 and Path(trainer.args.output_dir) == out / killed_in:
            raise KeyboardInterrupt  # killed right after the checkpoint is written

    out = tmp_path / "killed"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(*load_recipe(ONTIES, [*keys, "--output_dir", str(out)]), progress=False)
    assert (out / killed_in / "checkpoint-2").is_dir() and not (out / killed_in / "model.safetensors").exists()
    checkpoint = str(out / "checkpoint-2") if models == "named" else "true"  # true: output_dir's last checkpoint
    assert main([*run, "--output_dir", str(out), "--resume_from_checkpoint", checkpoint]) == 0
    sft = load_file(Path(named_world(world_cache)[1]) / "model.safetensors")
    for folder in {Path(), killed_in}:
        full, resumed = (load_file(root / folder / "model.safetensors") for root in (tmp_path / "full", out))
        assert full.keys() == resumed.keys()
        for name, tensor in full.items():
            assert torch.equal(resumed[name], tensor), (folder, name)
        assert any(not torch.equal(sft[name], tensor) for name, tensor in full.items())  # it trained


def test_a_checkpoint_that_is_not_there_is_named_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONLINE_MERGING_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    run = ["train", ONTIES, *QUICK, "--output_dir", str(out), "--resume_from_checkpoint"]
    assert main([*run, str(tmp_path / "nowhere")]) == 2
    assert "resume_from_checkpoint: no such checkpoint folder: " in capsys.readouterr().err
    assert main([*run, "true"]) == 2
    assert f"resume_from_checkpoint: true, but output_dir {str(out)!r} holds no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


# -- what the user would not expect -----------------------------------------------------------------------------------


def test_a_learning_rate_that_moves_one_run_of_two_is_warned_about():
    recipe, _ = load_recipe(ONTIES)
    assert recipe.adamw_learning_rate is not None and recipe.adamw_baseline() is not None  # two runs, two rates
    with pytest.warns(UserWarning, match=r"--learning_rate 5e-06 moves the recipe's run only: .* adamw_learning_rate "
                                         rf"{recipe.adamw_learning_rate:g}"):  # fmt: skip
        load_recipe(ONTIES, ["--learning_rate", "5e-6"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_recipe(ONTIES, ["--learning_rate", "5e-6", "--adamw_learning_rate", "5e-6"])  # both moved
        load_recipe(ONTIES, ["--learning_rate", "5e-6", "--compare_with_adamw", "false"])  # one run


def test_a_task_vector_of_zeros_or_round_off_is_warned_about():
    """Warned at ‖τ‖ ≤ 1e-6 ‖θ_sft‖: the same model twice (zeros), or with a relative change of 1e-7 (round-off);
    a change of 1e-5, far below any fine-tuning's, is not."""
    model = tiny_llama()
    sft = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"task vector τ = finetuned − base is all zeros.*base_model_name_or_path"):
        TaskVector.from_models(sft, sft)
    with pytest.warns(UserWarning, match=r"is tiny: ‖τ‖ = \S+, \S+ of ‖θ_sft‖"):
        TaskVector.from_models({name: tensor * (1 - 1e-7) for name, tensor in sft.items()}, sft)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TaskVector.from_models({name: tensor * (1 - 1e-5) for name, tensor in sft.items()}, sft)
    with pytest.warns(UserWarning, match="all zeros"):  # an API user building the optimizer gets it too
        build_optimizer(model, base_model=sft, merge="onties")
