"""The fused CPU kernel: the CPU step runs it (not the eager fallback), and each binary is built once, in its own
folder, and then imported without torch's build (so no ninja, whichever is on PATH)."""

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from online_merging import OnlineMergingAdam, TaskVector
from online_merging.kernels import build, cpu, get_backend
from tests.conftest import stderr_of_a_waiting_build

SOURCE = Path(cpu.__file__).with_name("fused_cpu.cpp")
FLAGS = ["-O3", "-fopenmp"]


class Recorder:
    """``cpu._ext`` that counts the calls of each of its functions."""

    def __init__(self, ext):
        self.ext, self.calls = ext, []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            return getattr(self.ext, name)(*args, **kwargs)

        return call


def test_a_float32_cpu_step_runs_the_compiled_kernel(monkeypatch):
    """Fails when the CPU backend is unavailable (the kernel source missing from an install, no compiler) and
    steps fall back to eager."""
    assert get_backend(None, torch.device("cpu")) is cpu
    assert Path(cpu._ext.__file__).parent.parent == build.extensions_root()
    recorder = Recorder(cpu._ext)
    monkeypatch.setattr(cpu, "_ext", recorder)
    weight = torch.nn.Parameter(torch.randn(64, 33))
    tau = TaskVector({"weight": 0.01 * torch.randn(64, 33)})
    optimizer = OnlineMergingAdam([("weight", weight)], lr=1e-3, task_vector=tau, merge="ondare", reserve_p=0.3)
    before = weight.detach().clone()
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert recorder.calls == ["step_group"]
    assert not torch.equal(weight.detach(), before)


def test_the_key_changes_with_what_changes_the_binary(tmp_path):
    source = tmp_path / "a.cpp"
    source.write_text("int a;")
    key = build.build_key(source, FLAGS, [])
    assert build.build_key(source, FLAGS, []) == key
    assert build.build_key(source, [*FLAGS, "-march=native"], []) != key
    assert build.build_key(source, FLAGS, ["-fopenmp"]) != key
    source.write_text("int b;")
    assert build.build_key(source, FLAGS, []) != key


def test_portable_compiles_without_march_native(monkeypatch):
    seen = []
    monkeypatch.setattr(cpu, "load_extension", lambda name, source, *, cflags, ldflags: seen.append(cflags))
    monkeypatch.setenv("ONLINE_MERGING_PORTABLE", "1")
    cpu._compile()
    monkeypatch.delenv("ONLINE_MERGING_PORTABLE")
    cpu._compile()
    assert "-march=native" not in seen[0] and "-march=native" in seen[1]


def test_a_built_kernel_is_imported_without_building(tmp_path, monkeypatch, capsys):
    """The loaded kernel's folder copied under a fresh root: loading it neither calls torch's build nor prints."""
    built = Path(cpu._ext.__file__).parent
    shutil.copytree(built, tmp_path / built.name)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    def no_build(*args, **kwargs):
        raise AssertionError("torch.utils.cpp_extension.load called for a built kernel")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_build)
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if os.environ.get("ONLINE_MERGING_PORTABLE") != "1":
        flags.append("-march=native")
    assert build.build_key(SOURCE, flags, ["-fopenmp"]) in built.name  # cpu._compile's flags
    ext = build.load_extension("online_merging_fused_cpu", SOURCE, cflags=flags, ldflags=["-fopenmp"])
    assert ext.topk_threshold(torch.tensor([3.0, -1.0, 2.0]), 1) == cpu._ext.topk_threshold(
        torch.tensor([3.0, -1.0, 2.0]), 1
    )
    assert capsys.readouterr().err == ""


TINY = """
#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", [] { return 42; }); }
"""

LOAD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from online_merging.kernels.build import load_extension
    print(load_extension("tiny", Path(sys.argv[1]), cflags=[], ldflags=[]).answer())
""")


@pytest.mark.slow
def test_two_processes_build_once_then_a_changed_ninja_builds_nothing(tmp_path):
    """Two processes at once: one builds (and says so), the other waits and imports; a third, with a ninja on PATH
    that would leave a mark, imports the same file silently."""
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY)
    root = tmp_path / "extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    command = [sys.executable, "-c", LOAD, str(source)]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outputs]
    assert [out for out, _ in outputs] == ["42\n", "42\n"]
    assert sum("online-merging: building" in err for _, err in outputs) == 1
    (folder,) = (p for p in root.iterdir() if p.is_dir())
    (library,) = folder.glob("*.so")
    stamp = library.stat()

    fake = tmp_path / "bin"
    fake.mkdir()
    mark = tmp_path / "ninja_ran"
    (fake / "ninja").write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    (fake / "ninja").chmod(0o755)
    again = subprocess.run(command, env={**env, "PATH": f"{fake}{os.pathsep}{env['PATH']}"}, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0 and again.stdout == "42\n", again.stderr
    assert "online-merging:" not in again.stderr and not mark.exists()
    assert (library.stat().st_ino, library.stat().st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    assert sorted(p.name for p in root.iterdir()) == [folder.name, f"{folder.name}.lock"]  # no temporary left


def test_a_kernel_build_waiting_for_another_process_says_for_whom(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    source = tmp_path / "probe.cpp"
    source.write_text("int probe() { return 1; }\n")
    folder = tmp_path / f"probe-{build.build_key(source, [], [])}"
    monkeypatch.setattr(build, "_import", lambda folder: folder)  # the folder the other process built
    err = stderr_of_a_waiting_build(capsys, tmp_path / f"{folder.name}.lock",
                                    lambda: build.load_extension("probe", source, cflags=[], ldflags=[]),
                                    folder.mkdir)  # fmt: skip  # its build done: the waiter imports it, builds nothing
    holder = f"pid {os.getpid()} on {socket.gethostname()}, since "
    assert f"waiting for another process ({holder}" in err and f"building the CPU kernel in {folder}" in err, err
    assert "building the CPU kernel once" not in err
