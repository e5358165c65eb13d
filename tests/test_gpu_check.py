"""benchmarks/gpu_check.py on its CPU path: the Triton kernels under the interpreter, checked against eager."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_quick_cpu_path_passes_every_check(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # read when the kernels are decorated: a fresh process
    command = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    kinds = {check["check"] for check in result["checks"]}
    assert kinds == {"triton_vs_eager", "dare_masks", "pieces_equal_whole", "plain_vs_torch_adamw", "no_host_sync"}
    assert result["checks_failed"] == 0 and all(check["ok"] for check in result["checks"])
    speed = {row["provider"]: row for row in result["speed"]}
    assert speed["adamw_fused"]["ratio_to_adamw_fused"] == pytest.approx(1.0)
    assert speed["om_adam_ondare_k1_cpu"]["bytes_per_param_per_pass"] == 30  # θ, g, m, v read, θ, m, v written, τ
    assert len(result["targets"]) == 8 and result["targets"][5].endswith("every merge: not measured")


def import_gpu_check():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCHMARKS))
    return gpu_check


def test_targets_say_met_missed_or_not_measured():
    """A target line per issue-24 target, from the speed rows and the sync checks."""
    gpu_check = import_gpu_check()
    rows = [
        {"provider": "om_adam_onties_k1_triton", "size_m": 100, "tensors": 48, "ratio_to_adamw_fused": 1.5},
        {"provider": "om_adam_onties_k1_triton", "size_m": 302, "tensors": 36, "ratio_to_adamw_fused": 1.7},
    ]
    checks = [{"check": "no_host_sync", "optimizer": "adam", "case": "onties", "ok": False}]
    lines = gpu_check.targets(rows, checks, [])
    assert lines[1] == "om_adam_onties_k1_triton <= 1.6x fused AdamW at 100M in 48 tensors: 1.50x, met"
    assert lines[2] == "om_adam_onties_k1_triton <= 1.6x fused AdamW at 302M in 36 tensors: 1.70x, MISSED"
    assert lines[0].endswith("at 10M: not measured")
    assert lines[5] == "no host sync in step() for every merge: MISSED: adam onties"


def test_compare_reports_one_element_off():
    """The check can fail: one element of one moment moved by a thousandth is reported, by name and shape."""
    gpu_check = import_gpu_check()
    params, tau = gpu_check._named_params(gpu_check.QUICK_SHAPES, torch.float32, torch.device("cpu"), seed=0)
    copies = [(name, p.clone()) for name, p in params]
    ref = gpu_check._optimizer("adam", params, tau, gpu_check.CASES["onties"], "eager")
    out = gpu_check._optimizer("adam", copies, tau, gpu_check.CASES["onties"], "eager")
    for (_, a), (_, b) in zip(params, copies, strict=True):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    ref.step()
    gpu_check._resync(out, ref)
    errors = []
    assert gpu_check._compare(out, ref, "here", errors) == 0.0 and errors == []
    out.state[copies[1][1]]["exp_avg"][5] *= 1.001
    gpu_check._compare(out, ref, "here", errors)
    assert errors == ["here: exp_avg of shape (2101,): 1 elements off"]
