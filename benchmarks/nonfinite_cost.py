"""What keeping non-finite gradients visible costs per OnDARE step on the CPU (fused C++ backend).

Run from the repository root:

    python benchmarks/nonfinite_cost.py
    python benchmarks/nonfinite_cost.py --baseline-source OLD/fused_cpu.cpp   # also time another kernel source

Variants, timed in turns on the same tensors (8 of 1024x1024 by default, 2 threads, medians of 15 steps):
``default`` (nonfinite_grads=None: the merged update carries 0·Δ, so a NaN/inf update reaches θ at once),
``detect`` (nonfinite_grads="raise": one isfinite pass and a host sync per tensor before the step, which a
"detect and warn" default would add), and with ``--baseline-source`` the default step with that kernel (e.g. the
kernel before 0·Δ was added, from ``git show REV:online_merging/kernels/fused_cpu.cpp``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-source", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from online_merging import PUBLISHED, OnlineMergingAdam, TaskVector
    from online_merging.kernels import cpu

    kernels = {"default": cpu._ext}
    if args.baseline_source:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-march=native"]
        kernels["baseline"] = load(
            name="online_merging_fused_cpu_baseline",
            sources=[args.baseline_source],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
        )
    torch.manual_seed(0)
    shape = (args.size, args.size)
    names = [f"w{i}" for i in range(args.tensors)]
    tau = TaskVector({n: torch.randn(shape) * 1e-3 for n in names})
    variants = {"default": (None, "default"), "detect": ("raise", "default")}
    if "baseline" in kernels:
        variants["baseline"] = (None, "baseline")
    runs = {}
    for variant, (policy, _) in variants.items():
        params = [torch.nn.Parameter(torch.randn(shape)) for _ in names]
        for p in params:
            p.grad = torch.randn(shape)
        opt = OnlineMergingAdam(
            list(zip(names, params, strict=True)), task_vector=tau, nonfinite_grads=policy, **PUBLISHED
        )
        runs[variant] = (opt, [])
    for _ in range(args.steps + 2):  # the first two rounds warm up
        for variant, (opt, times) in runs.items():
            cpu._ext = kernels[variants[variant][1]]
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
    cpu._ext = kernels["default"]
    medians = {variant: statistics.median(times[2:]) * 1e3 for variant, (_, times) in runs.items()}
    for variant, ms in medians.items():
        print(f"{variant:>9}: {ms:7.2f} ms per step ({args.tensors} x {shape}, {args.threads} threads)")
    return medians


if __name__ == "__main__":
    main()
