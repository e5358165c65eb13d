"""What an online-merging optimizer holds per parameter, τ included, against AdamW: τ stored as its merge reads it.

Run from the repository root:

    python benchmarks/tau_memory.py                    # ~10M parameters in 78 tensors, bf16 τ, CPU
    python benchmarks/tau_memory.py --millions 10 100 --repeats 31   # and the step speed, packed against dense τ
    python benchmarks/tau_memory.py --quick --out /tmp/bench   # ~0.1M parameters, seconds

τ is saved to a safetensors file and loaded lazily (``TaskVector.load(path, lazy=True)``: each entry read when it is
asked for, nothing else kept), as a user who holds no other reference does; each optimizer takes two steps. Held
bytes (``step_speed.state_bytes_per_param``) are those of every tensor in ``optimizer.state`` (0-d step counters
excluded) and of the τ each parameter's binding keeps (``optimizer.binding(p).tau``: dense, or a ``PackedTau``'s
values, bitmask and block starts), per parameter. Targets (issue 24): OnTIES at p = 0.1 holds at most AdamW + 0.5
bytes a parameter, OnDARE at p = 0.01 with τ's mask drawn once at most AdamW + 0.1; OnDARE with a mask drawn every
step reads all of τ and keeps it dense.

With ``--repeats``, also the step time of OnDARE and OnTIES (the published p = 0.01, as ``step_speed.py``) with τ
packed and with τ kept dense (the optimizer before packing: a subclass that keeps the dense τ), against fused AdamW,
the providers taking turns, medians of the repeats: what packing costs in speed, side by side in one run.

Writes ``tau_memory.json`` to ``--out`` (default: the scratch folder of the benchmarks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_speed, timing: beside this file
import step_speed
from timing import SCRATCH, machine_info, time_ms

from online_merging import OnlineMergingAdam, TaskVector

PROVIDERS = {  # name: (merge keywords, target over AdamW in bytes a parameter; None: no target)
    "onties_p0.1": ({"merge": "onties", "reserve_p": 0.1}, 0.5),
    "ondare_p0.01_once": ({"merge": "ondare", "reserve_p": 0.01, "tau_mask": "once"}, 0.1),
    "ondare_p0.01_every_step": ({"merge": "ondare", "reserve_p": 0.01, "tau_mask": "every_step"}, None),
}


def measure(millions: float, folder: Path) -> list[dict]:
    setup = step_speed.make_setup(millions, torch.device("cpu"), torch.bfloat16)
    path = folder / "tau.safetensors"
    setup.task_vector.save(path)
    setup.task_vector = None  # from here on, τ is only in the file
    numel = setup.numel
    builds = {"adamw": lambda: torch.optim.AdamW([p for _, p in setup.params], lr=1e-5)}
    for name, (merge, _) in PROVIDERS.items():
        builds[name] = lambda merge=merge: OnlineMergingAdam(
            setup.params, lr=1e-5, task_vector=TaskVector.load(path, lazy=True), alpha=1e-7, alpha_unit="absolute",
            **merge,
        )  # fmt: skip
    rows = []
    for name, build in builds.items():
        optimizer = build()
        for _ in range(2):
            setup.new_gradients()
            optimizer.step()
        held = step_speed.state_bytes_per_param(optimizer, numel)
        rows.append({"provider": name, "numel": numel, "tensors": len(setup.params), "held_bytes_per_param": held})
        del optimizer
    adamw = rows[0]["held_bytes_per_param"]
    for row in rows:
        row["over_adamw"] = row["held_bytes_per_param"] - adamw
        target = PROVIDERS.get(row["provider"], (None, None))[1]
        row["target_over_adamw"] = target
        row["met"] = None if target is None else row["over_adamw"] <= target
    return rows


class DenseTauAdam(OnlineMergingAdam):
    """OnlineMergingAdam keeping τ dense, as before τ was packed: the speed baseline."""

    def _stored_tau(self, plan, form, record, param):
        return record


def step_ratios(millions: float, repeats: int) -> list[dict]:
    """Median step times of fused AdamW and of OnDARE and OnTIES with packed and dense τ, taking turns."""
    setup = step_speed.make_setup(millions, torch.device("cpu"), torch.bfloat16)
    merge = {"lr": step_speed.LR, "task_vector": setup.task_vector, "reserve_p": step_speed.RESERVE_P,
             "alpha": step_speed.ALPHA, "alpha_unit": "absolute"}  # fmt: skip
    optimizers = {"adamw_fused": torch.optim.AdamW([p for _, p in setup.params], lr=step_speed.LR, fused=True)}
    for name in ("ondare", "onties"):
        for form, cls in (("packed", OnlineMergingAdam), ("dense", DenseTauAdam)):
            optimizers[f"{name}_{form}"] = cls(setup.params, merge=name, **merge)
    samples = {name: [] for name in optimizers}
    for round_ in range(repeats + 1):
        for name, optimizer in optimizers.items():
            setup.new_gradients()
            elapsed = time_ms(optimizer.step, torch.device("cpu"))
            if round_:  # the first round builds the kernel's state and packs τ
                samples[name].append(elapsed)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    return [{"provider": name, "numel": setup.numel, "median_ms": ms, "ratio_to_adamw_fused": ms /
             medians["adamw_fused"]} for name, ms in medians.items()]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--millions", type=float, nargs="+", default=[10.0], help="parameters, in millions")
    parser.add_argument("--repeats", type=int, default=0, help="also time the steps, this many samples each")
    parser.add_argument("--quick", action="store_true", help="~0.1M parameters")
    parser.add_argument("--out", type=Path, default=SCRATCH, help="directory of the JSON (default %(default)s)")
    args = parser.parse_args(argv)
    sizes = [0.1] if args.quick else args.millions
    with tempfile.TemporaryDirectory() as folder:
        rows = measure(sizes[0], Path(folder))
    print(f"{'provider':<26} {'held B/param':>12} {'over AdamW':>11}  target")
    for r in rows:
        target = r["target_over_adamw"]
        target = "-" if target is None else f"<= {target}: {'met' if r['met'] else 'MISSED'}"
        print(f"{r['provider']:<26} {r['held_bytes_per_param']:>12.3f} {r['over_adamw']:>+11.3f}  {target}")
    speed = [row for millions in sizes for row in step_ratios(millions, args.repeats)] if args.repeats else []
    for r in speed:
        ratio = r["ratio_to_adamw_fused"]
        print(f"{r['provider']:<14} {r['numel'] / 1e6:6.1f}M {r['median_ms']:9.2f} ms {ratio:6.2f}x")
    result = {"machine": machine_info(torch.device("cpu")), "rows": rows, "speed": speed}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tau_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
