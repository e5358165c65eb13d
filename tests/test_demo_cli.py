import subprocess
import sys

from online_merging.cli import main
from online_merging.demo import run_demo
from online_merging.lab import LabConfig


def test_demo_runs_every_optimizer_and_reports_finite_numbers():
    results = run_demo(steps=20)
    assert [r.method for r in results] == ["AdamW", "OnDARE", "OnTIES"]
    for r in results:
        assert r.reward_gain == r.reward_gain and r.ability_loss == r.ability_loss  # not NaN
        assert r.reward_gain > 0  # 20 steps on the objective lower its loss


def test_cli_demo_and_help(capsys):
    assert main(["demo", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "OnDARE" in out and "reward gain" in out
    help_text = subprocess.run([sys.executable, "-m", "online_merging.cli", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "demo" in help_text.stdout


def test_cli_task_vector_writes_the_difference(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from online_merging import TaskVector

    base = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    sft = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(sft, tmp_path / "sft.safetensors")
    out = tmp_path / "tau.safetensors"
    argv = [
        "task-vector",
        "--base",
        str(tmp_path / "base.safetensors"),
        "--finetuned",
        str(tmp_path / "sft.safetensors"),
    ]
    assert main([*argv, "--out", str(out), "--dtype", "fp32"]) == 0
    tau = TaskVector.load(out)
    for name in base:
        torch.testing.assert_close(tau[name], sft[name] - base[name])
    assert "written to" in capsys.readouterr().out


def test_bench_tax_lab_passes_its_options_to_the_lab(monkeypatch, tmp_path):
    import online_merging.lab

    calls = []
    monkeypatch.setattr(online_merging.lab, "run_lab", lambda out, **kwargs: calls.append((out, kwargs)))
    args = ["bench", "tax-lab", "--quick", "--seeds", "0,3", "--methods", "adamw,ondare", "--out", str(tmp_path)]
    settings = ["--set", "steps=7", "--set", "world.skills=addition,facts", "--set", "world.num_layers=1"]
    assert main([*args, *settings]) == 0
    ((out, kwargs),) = calls
    config = kwargs.pop("config")
    expected = {"quick": True, "workers": 2, "seeds": (0, 3), "data_orders": None}
    assert (out, kwargs) == (str(tmp_path), expected)
    assert (config.steps, config.world.skills, config.world.num_layers) == (7, ("addition", "facts"), 1)
    assert config.methods == ("adamw", "ondare")
    assert config.lr == LabConfig.quick().lr  # the rest of the quick plan is kept


def test_bench_tax_lab_refuses_an_unknown_setting(capsys):
    assert main(["bench", "tax-lab", "--set", "world.layers=2"]) == 2
    assert "Invalid setting 'world.layers=2'" in capsys.readouterr().err
