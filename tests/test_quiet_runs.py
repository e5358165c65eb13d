"""What a command imports and prints besides its own output: `--help` imports no torch (so it answers at once),
no DeepSpeed and no TRL; a training run prints no library notice or warning a user cannot act on."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "deepspeed")
HELP = [["--help"], ["train", "--help"], ["merge", "--help"], ["task-vector", "--help"], ["demo", "--help"],
        ["evaluate", "--help"], ["hma-search", "--help"], ["bench", "tax-lab", "--help"]]  # fmt: skip


def _python(script: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          **kwargs)  # fmt: skip


def test_help_imports_neither_torch_nor_deepspeed_nor_trl():
    script = f"""
import contextlib, io, json, sys
from online_merging.cli import main
imported = {{}}
for argv in {json.dumps(HELP)}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
    imported[" ".join(argv)] = [name for name in {HEAVY!r} if name in sys.modules]
with contextlib.redirect_stdout(io.StringIO()):
    main(["train", "kto_ondare", "--help"])  # lists TRL's KTOConfig keys: TRL's configs, not its trainers
imported["train kto_ondare --help"] = [name for name in sys.modules if name in ("deepspeed", "trl.trainer.kto_trainer")]
print(json.dumps(imported))
"""
    run = _python(script)
    assert run.returncode == 0, run.stderr
    commands = [*(" ".join(argv) for argv in HELP), "train kto_ondare --help"]
    assert json.loads(run.stdout) == {command: [] for command in commands}


def test_a_training_run_prints_no_library_notice_or_warning(world_cache, tmp_path):
    argv = ["train", str(ROOT / "recipes" / "dpo_onties.yaml"), "--embedded_world", "quick", "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--output_dir", str(tmp_path)]  # fmt: skip
    run = _python(f"import sys; from online_merging.cli import main; sys.exit(main({argv!r}))")
    assert run.returncode == 0, run.stderr
    # DeepSpeed's, printed when accelerate imports it (TRL's trainers, save_pretrained), though unused
    assert "Setting accelerator to CPU" not in run.stdout + run.stderr
    # e.g. TRL's call of transformers' deprecated is_gradient_checkpointing at every step
    assert not re.search(r"(Future|Deprecation)Warning", run.stderr), run.stderr
