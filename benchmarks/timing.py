"""What the benchmarks share to time things: milliseconds of a call with the device synchronised, the machine the
timings were taken on (recorded beside them), and where results go unless ``--out`` says otherwise."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

SCRATCH = Path("outputs") / "benchmarks"
"""The benchmarks' default output folder, under the working directory (git ignores ``outputs/``): a run never
overwrites the committed figures in ``benchmarks/results/`` unless ``--out`` names them."""


def sync(device: torch.device | None) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously); nothing to wait for on the CPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device | None = None, calls: int = 1) -> float:
    """Milliseconds per call of ``fn`` over ``calls`` consecutive calls, ``device`` synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3 / calls


def machine_info(device: torch.device) -> dict:
    """The CPU, GPU, versions and load average the timings were taken with."""
    import online_merging

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return dict(
        device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
        online_merging=online_merging.__version__, python=platform.python_version(), platform=platform.platform(),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        load_average_at_start=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )  # fmt: skip
