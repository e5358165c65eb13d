"""How much of an online-merging CPU step is the fused C++ call, and how much the Python around it.

Run from the repository root:

    python benchmarks/python_share.py              # 10.2M parameters in 78 tensors, as step_speed.py --sizes 10
    python benchmarks/python_share.py --sizes 100

Per merge (OnDARE, OnTIES), the optimizer steps the tensors of ``step_speed.py`` with random gradients drawn anew
before each step (untimed), taking turns with torch's fused AdamW; the C++ call (``step_group``) is timed inside the
step. Medians of ``--steps`` steps after five warm-up steps; the Python share is the step's median less the call's,
and per tensor, that divided by the number of tensors.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

if importlib.util.find_spec("online_merging") is None:  # run as a script from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import ALPHA, LR, RESERVE_P, WEIGHT_DECAY, make_setup

from online_merging import OnlineMergingAdam
from online_merging.kernels import cpu


class TimedKernel:
    """``cpu._ext`` whose ``step_group`` calls are timed."""

    def __init__(self, ext):
        self.ext, self.seconds = ext, []

    def step_group(self, *args, **kwargs):
        start = time.perf_counter()
        result = self.ext.step_group(*args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        return result

    def __getattr__(self, name):
        return getattr(self.ext, name)


def measure(millions: float, steps: int) -> list[dict]:
    setup = make_setup(millions, torch.device("cpu"), torch.bfloat16)
    plain = [param for _, param in setup.params]
    adamw = torch.optim.AdamW(plain, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    rows = []
    for merge in ("ondare", "onties"):
        optimizer = OnlineMergingAdam(
            setup.params, lr=LR, weight_decay=WEIGHT_DECAY, task_vector=setup.task_vector, merge=merge,
            reserve_p=RESERVE_P, alpha=ALPHA, alpha_unit="absolute", backend="cpu",
        )  # fmt: skip
        kernel = cpu._ext = TimedKernel(cpu._ext)
        try:
            times = {"step": [], "adamw": []}
            for round_ in range(steps + 5):
                for name, step in (("step", optimizer.step), ("adamw", adamw.step)):
                    setup.new_gradients()
                    start = time.perf_counter()
                    step()
                    if round_ >= 5:
                        times[name].append(time.perf_counter() - start)
        finally:
            cpu._ext = kernel.ext
        step_ms, adamw_ms = (statistics.median(times[key]) * 1e3 for key in ("step", "adamw"))
        kernel_ms = statistics.median(kernel.seconds[5:]) * 1e3
        rows.append(dict(merge=merge, numel=setup.numel, tensors=len(setup.params), step_ms=step_ms,
                         kernel_ms=kernel_ms, adamw_ms=adamw_ms))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[10], help="millions of parameters")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    rows = [row for millions in args.sizes for row in measure(millions, args.steps)]
    print(f"{'merge':<8} {'params':>8} {'tensors':>7} {'step ms':>8} {'C++ ms':>7} {'Python ms':>9} "
          f"{'µs/tensor':>9} {'AdamW ms':>8}")  # fmt: skip
    for r in rows:
        python_ms = r["step_ms"] - r["kernel_ms"]
        print(f"{r['merge']:<8} {r['numel'] / 1e6:>7.1f}M {r['tensors']:>7} {r['step_ms']:>8.2f} "
              f"{r['kernel_ms']:>7.2f} {python_ms:>9.2f} {python_ms / r['tensors'] * 1e3:>9.1f} "
              f"{r['adamw_ms']:>8.2f}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
