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
    assert kinds == {"triton_vs_eager", "dare_masks", "pieces_equal_whole", "plain_vs_torch_adamw"}
    assert result["checks_failed"] == 0 and all(check["ok"] for check in result["checks"])
    speed = {row["provider"]: row for row in result["speed"]}
    assert speed["adamw_fused"]["ratio_to_adamw_fused"] == pytest.approx(1.0)
    assert speed["om_adam_ondare_k1_cpu"]["bytes_per_param_per_pass"] == 30  # θ, g, m, v read, θ, m, v written, τ


def test_compare_reports_one_element_off():
    """The check can fail: one element of one moment moved by a thousandth is reported, by name and shape."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCHMARKS))
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
