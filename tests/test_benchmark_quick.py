"""benchmarks/step_speed.py --quick runs, times every provider and counts the optimizer state as documented."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_speed.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("step_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def expected_bytes_per_param(provider: str, p: float) -> float:
    """Stated independently of the benchmark: fp32 moments, an fp32 step-K buffer when K > 1, and τ as its merge
    reads it: its kept entries in bf16 (p of them) with an int64 start per block of 1024, placed by a bitmask (OnTIES
    on Triton) or by int16 positions.

    The per-tensor 0-d ``step`` counters are excluded (the benchmark skips 0-d tensors).
    """
    fp32, bf16 = 4, torch.finfo(torch.bfloat16).bits // 8
    bitmask = "onties" in provider and provider.endswith("_triton")
    tau = p * bf16 + 8 / 1024 + (1 / 8 if bitmask else p * 2)
    if provider.startswith("om_sgd_"):
        return fp32 + tau  # momentum buffer + τ
    k = int(provider.split("_k")[1].split("_")[0])
    return 2 * fp32 + tau + (fp32 if k > 1 else 0)  # exp_avg, exp_avg_sq, τ (+ step-K buffer)


@pytest.mark.slow
def test_quick_mode(tmp_path):
    bench = load_benchmark()
    result = bench.main(["--quick", "--out", str(tmp_path)])
    written = json.loads((tmp_path / f"step_speed_{result['machine']['device']}.json").read_text())
    rows = {row["provider"]: row for row in written["results"]}
    device = torch.device(result["machine"]["device"])

    assert set(rows) == set(bench.providers(device, quick=True))
    assert {"om_adam_ondare_k1_eager", "om_adam_onties_k1_eager", "om_adam_ondare_k10_eager"} <= set(rows)
    assert written["machine"]["torch"] == torch.__version__
    for name, row in rows.items():
        if row["status"] == "skipped":
            # only an optional compiled backend may be missing; it is reported with its error
            assert name.endswith(("_cpu", "_triton")), f"{name} was skipped: {row['error']}"
            assert row["error"]
            continue
        assert row["status"] == "ok"
        assert len(row["samples_ms"]) == 2
        times = [row["first_step_ms"], row["median_ms"], row["min_ms"], row["max_ms"], *row["samples_ms"]]
        assert all(math.isfinite(t) and t > 0 for t in times), (name, times)
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["ratio_to_adamw_fused"] > 0
        if name.startswith("om_"):  # per tensor: a block start more, a part byte of bitmask; DARE's count drawn
            expected = expected_bytes_per_param(name, bench.RESERVE_P)
            assert row["state_bytes_per_param"] == pytest.approx(expected, rel=2e-3), name
    assert rows["adamw_fused"]["state_bytes_per_param"] == pytest.approx(8.0)


def test_failing_provider_is_skipped_one_at_a_time(tmp_path, monkeypatch):
    bench = load_benchmark()

    def broken(setup):
        raise RuntimeError("backend not built")

    table = {"adamw_fused": bench.providers(torch.device("cpu"), quick=True)["adamw_fused"], "broken": (broken, 1)}
    monkeypatch.setattr(bench, "providers", lambda device, quick: table)
    monkeypatch.setattr(bench, "_fits_together", lambda *args: False)  # the sequential path
    result = bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    rows = {row["provider"]: row for row in result["results"]}
    assert rows["broken"]["status"] == "skipped"
    assert rows["broken"]["error"] == "RuntimeError: backend not built"
    assert rows["adamw_fused"]["mode"] == "sequential"
    assert rows["adamw_fused"]["ratio_to_adamw_fused"] == 1.0


def test_normalized_dpo_cost_quick_mode(tmp_path, world_cache):
    spec = importlib.util.spec_from_file_location("normalized_dpo_cost", SCRIPT.parent / "normalized_dpo_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "normalized_dpo_cost.json").read_text())
    assert written["ratio"] == result["ratio"] > 0
    assert all(len(values) == 3 and min(values) > 0 for values in written["seconds"].values())


@pytest.mark.distributed
def test_sharded_step_quick_mode(tmp_path, monkeypatch):
    """Every provider steps FSDP2 shards on 2 ranks; OnTIES issues the collectives of one batched distributed top-k
    per merge step (radix rounds + 2, whatever the number of tensors), the others none."""
    from online_merging.distributed import radix_rounds

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the spawned ranks import the script's module by name
    bench = importlib.import_module("sharded_step")
    result = bench.main(["--quick", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "sharded_step_cpu.json").read_text())
    rows = {row["provider"]: row for row in written["results"]}
    assert list(rows) == ["adamw_foreach", "om_adam_plain", "om_adam_ondare", "om_adam_onties"]
    assert result["setup"]["layers"] > 1
    batched = radix_rounds([torch.float32]) + 2
    assert {name: row["collectives"] for name, row in rows.items()} == {
        "adamw_foreach": 0, "om_adam_plain": 0, "om_adam_ondare": 0, "om_adam_onties": batched,
    }  # fmt: skip
    for name, row in rows.items():
        assert len(row["samples_ms"]) == 2 and all(math.isfinite(t) and t > 0 for t in row["samples_ms"]), name
    assert rows["adamw_foreach"]["ratio_to_adamw"] == 1.0


def test_python_share_times_the_kernel_inside_the_step():
    """benchmarks/python_share.py: the C++ call it times is part of each step it times, for both merges."""
    spec = importlib.util.spec_from_file_location("python_share", SCRIPT.with_name("python_share.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--sizes", "0.05", "--steps", "3"])
    assert [row["merge"] for row in rows] == ["ondare", "onties"]
    for row in rows:
        assert 0 < row["kernel_ms"] < row["step_ms"], row
        assert row["tensors"] > 1 and row["adamw_ms"] > 0


def test_tau_memory_quick_mode_meets_the_targets(tmp_path):
    """τ stored as the merge reads it, loaded lazily from a file: OnTIES (p 0.1) and OnDARE (p 0.01, once) within
    their targets over AdamW; a mask drawn every step keeps τ dense, 2 bytes a parameter in bf16."""
    spec = importlib.util.spec_from_file_location("tau_memory", SCRIPT.parent / "tau_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick", "--out", str(tmp_path)])
    rows = {row["provider"]: row for row in result["rows"]}
    assert rows["adamw"]["held_bytes_per_param"] == 8.0
    assert rows["onties_p0.1"]["met"] and rows["ondare_p0.01_once"]["met"], rows
    assert rows["ondare_p0.01_every_step"]["over_adamw"] == 2.0
