"""Step speed and state memory of the online-merging optimizers against torch's AdamW and SGD.

Run from the repository root:

    python benchmarks/step_speed.py                  # full: ~10M, 30M, 100M, 300M parameters on CPU (long)
    python benchmarks/step_speed.py --sizes 10 30    # chosen sizes, in millions of parameters
    python benchmarks/step_speed.py --matrices 8 1024   # instead: 8 square tensors of 1024 x 1024
    python benchmarks/step_speed.py --quick --out /tmp/bench   # ~0.1M parameters, a few providers, seconds

Every provider steps the same fp32 parameters (2-D, shaped like a transformer's layers) with the same random
gradients, drawn anew (untimed) before each sample as in training, and the same τ (bf16 by default), with the
published settings p = 0.01, α = 1e-7, lr = 1e-5. (With one fixed gradient Adam's update is ±lr in every element, a
tie that no training run shows after its first step and that makes OnTIES's top-p selection its slowest.) Per
provider and size: the first step is timed on its own (it may compile a kernel), then ``--warmup`` samples are
discarded and ``--repeats`` samples are timed, the providers taking turns in each round so that machine noise hits
all alike (when all their states fit in memory together; otherwise one provider after the other). One sample is
one step, or for step-K providers one full cycle of K steps divided by K: the amortized cost per step, merge
included. State bytes/param counts every tensor of ``optimizer.state`` except 0-d ones (the step counters) plus
the τ tensors the optimizer holds, divided by the number of parameters.

Writes ``step_speed_<device>.json`` (raw timings, machine) and ``step_speed_<device>.png`` (needs matplotlib) to
``--out`` (default ``benchmarks/results``). On a 2-core CPU ``--sizes 10 30`` takes ~15 minutes and the eager
backend's steps take seconds from 30M on; keep to some providers with e.g. ``--providers 'adamw_*' '*_cpu'``. Other
processes on the machine inflate the medians; the JSON records the load average at the start. A provider whose
construction or first step raises, e.g. a backend that is not built on this machine, is recorded as skipped with
the error.

The naive baseline is ``naive.py``; ``timing.py`` (the timer and the machine record) is shared with the other
benchmarks.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import importlib.util
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim import Optimizer

if importlib.util.find_spec("online_merging") is None:  # run as a script from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # naive, timing: beside this file
from naive import NaiveOnlineMergingAdamW
from timing import SCRATCH, machine_info, time_ms

from online_merging import OnlineMergingAdam, OnlineMergingSGD, TaskVector

RESERVE_P, ALPHA, LR, WEIGHT_DECAY, MOMENTUM = 0.01, 1e-7, 1e-5, 0.01, 0.9
HIDDEN_SIZES = (64, 128, 256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 8192)
TAU_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASELINE = "adamw_fused"


# -- setup ---------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Named fp32 parameters with fixed gradients, and τ over the same names."""

    params: list[tuple[str, torch.Tensor]]
    task_vector: TaskVector
    hidden: int
    layers: int
    generator: torch.Generator

    def new_gradients(self) -> None:
        """Draw every gradient anew, in place."""
        for _, param in self.params:
            torch.randn(param.shape, generator=self.generator, device=param.device, out=param.grad).mul_(1e-3)

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


def make_setup(millions: float, device: torch.device, tau_dtype: torch.dtype, seed: int = 0) -> Setup:
    """About ``millions``·1e6 parameters as transformer layers of 12·h² (q, k, v, o: h×h; MLP: 4h×h, h×4h).

    h is the largest hidden size that still gives at least four layers (the smallest one for tiny sizes).
    """
    target = millions * 1e6
    hidden = max([h for h in HIDDEN_SIZES if 12 * h * h * 4 <= target] or [HIDDEN_SIZES[0]])
    layers = max(1, round(target / (12 * hidden * hidden)))
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden)}
    shapes |= {"up": (4 * hidden, hidden), "down": (hidden, 4 * hidden)}
    gen = torch.Generator(device).manual_seed(seed)
    params, taus = [], {}
    for layer in range(layers):
        for part, shape in shapes.items():
            name = f"layers.{layer}.{part}.weight"
            param = torch.randn(shape, generator=gen, device=device).mul_(0.02)
            param.grad = torch.randn(shape, generator=gen, device=device).mul_(1e-3)
            params.append((name, param))
            taus[name] = torch.randn(shape, generator=gen, device=device).mul_(1e-3).to(tau_dtype)
    return Setup(params, TaskVector(taus), hidden, layers, gen)


def make_matrices(count: int, size: int, device: torch.device, tau_dtype: torch.dtype, seed: int = 0) -> Setup:
    """``count`` square tensors of ``size`` x ``size`` (as one layer each of hidden size ``size``)."""
    gen = torch.Generator(device).manual_seed(seed)
    params, taus = [], {}
    for layer in range(count):
        name = f"matrices.{layer}.weight"
        param = torch.randn((size, size), generator=gen, device=device).mul_(0.02)
        param.grad = torch.randn((size, size), generator=gen, device=device).mul_(1e-3)
        params.append((name, param))
        taus[name] = torch.randn((size, size), generator=gen, device=device).mul_(1e-3).to(tau_dtype)
    return Setup(params, TaskVector(taus), size, count, gen)


# -- providers -----------------------------------------------------------------------------------------------


def providers(device: torch.device, quick: bool) -> dict[str, tuple[Callable[[Setup], Optimizer], int]]:
    """name -> (constructor from a setup, steps per sample). ``quick`` keeps a subset."""

    def plain(s):
        return [p for _, p in s.params]

    table = {
        "adamw_foreach": (lambda s: torch.optim.AdamW(plain(s), lr=LR, weight_decay=WEIGHT_DECAY, foreach=True), 1),
        "adamw_fused": (lambda s: torch.optim.AdamW(plain(s), lr=LR, weight_decay=WEIGHT_DECAY, fused=True), 1),
        "sgd_momentum": (lambda s: torch.optim.SGD(plain(s), lr=LR, momentum=MOMENTUM), 1),
    }
    for merge in ("ondare", "onties"):
        table[f"naive_{merge}"] = (
            lambda s, m=merge: NaiveOnlineMergingAdamW(s.params, s.task_vector, m, LR, WEIGHT_DECAY, RESERVE_P, ALPHA),
            1,
        )
    backends = ["eager", "triton" if device.type == "cuda" else "cpu"]
    merge_kw = dict(reserve_p=RESERVE_P, alpha=ALPHA, alpha_unit="absolute")
    for backend in backends:
        for merge in ("ondare", "onties"):
            for k in (1, 10):
                table[f"om_adam_{merge}_k{k}_{backend}"] = (
                    lambda s, m=merge, k=k, b=backend: OnlineMergingAdam(
                        s.params, lr=LR, weight_decay=WEIGHT_DECAY, task_vector=s.task_vector,
                        merge=m, merge_every=k, backend=b, **merge_kw,
                    ),
                    k,
                )  # fmt: skip
        table[f"om_sgd_ondare_k1_{backend}"] = (
            lambda s, b=backend: OnlineMergingSGD(
                s.params, lr=LR, momentum=MOMENTUM, task_vector=s.task_vector, merge="ondare", backend=b, **merge_kw
            ),
            1,
        )
    if quick:
        keep = ("adamw_*", "sgd_momentum", "naive_*", "om_adam_*_k1_*", "om_adam_ondare_k10_*", "om_sgd_*")
        table = {n: v for n, v in table.items() if any(fnmatch.fnmatch(n, pattern) for pattern in keep)}
    return table


def state_bytes_per_param(optimizer: Optimizer, numel: int) -> float:
    """Bytes of the optimizer's state tensors (0-d step counters excluded) and of the τ it holds (dense, or as its
    merge reads it: ``PackedTau``), per parameter."""
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    if hasattr(optimizer, "binding"):  # ours: the τ each tensor's binding holds
        taus = [optimizer.binding(p).tau for group in optimizer.param_groups for p in group["params"]]
    else:  # the naive loop's
        taus = list(getattr(optimizer, "_taus", {}).values())
    held = sum(t.nbytes for t in tensors if t.dim() > 0)
    return (held + sum(t.nbytes for t in taus if t is not None)) / numel  # a PackedTau: values, bitmask, starts


# -- measuring -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One provider at one size."""

    name: str
    steps_per_sample: int
    optimizer: Optimizer | None = None
    error: str | None = None
    first_step_ms: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    state_bytes_per_param: float | None = None


def _start(run: Run, build: Callable[[Setup], Optimizer], setup: Setup, device: torch.device) -> None:
    """Construct and take the first step; a provider that fails here is skipped with its error."""
    try:
        run.optimizer = build(setup)
        run.first_step_ms = time_ms(run.optimizer.step, device)
    except Exception as error:  # a backend missing on this machine, out of memory, ...
        run.optimizer, run.error = None, f"{type(error).__name__}: {error}"


def _finish(run: Run, numel: int) -> None:
    run.state_bytes_per_param = state_bytes_per_param(run.optimizer, numel)
    run.optimizer = None


def _fits_together(numel: int, count: int, device: torch.device) -> bool:
    """Whether ``count`` optimizers' states (at most 16 bytes per parameter each) fit in half the free memory."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            meminfo = Path("/proc/meminfo").read_text().split("\n")
            free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable"))
        except (OSError, StopIteration):
            free = 0
    return numel * 16 * count < free / 2


def measure_size(millions: float, table: dict, args: argparse.Namespace, device: torch.device) -> list[dict]:
    tau_dtype = TAU_DTYPES[args.tau_dtype]
    if args.matrices:
        setup = make_matrices(*args.matrices, device, tau_dtype, seed=args.seed)
    else:
        setup = make_setup(millions, device, tau_dtype, seed=args.seed)
    numel = setup.numel
    runs = {name: Run(name, k) for name, (_, k) in table.items()}
    interleaved = _fits_together(numel, len(runs), device)
    print(f"\n{numel / 1e6:.1f}M parameters (hidden {setup.hidden}, {setup.layers} layers, {len(setup.params)} "
          f"tensors), {'interleaved' if interleaved else 'one provider at a time'}", flush=True)  # fmt: skip

    def samples(run: Run, count: int) -> list[float]:
        timed = []
        for _ in range(count):
            setup.new_gradients()
            timed.append(time_ms(run.optimizer.step, device, run.steps_per_sample))
        return timed

    if interleaved:
        for name, run in runs.items():
            _start(run, table[name][0], setup, device)
        live = [run for run in runs.values() if run.optimizer is not None]
        for run in live:
            samples(run, args.warmup)
        for round_ in range(args.repeats):
            shift = round_ % max(1, len(live))
            for run in live[shift:] + live[:shift]:
                run.samples_ms += samples(run, 1)
        for run in live:
            _finish(run, numel)
    else:
        for name, run in runs.items():
            _start(run, table[name][0], setup, device)
            if run.optimizer is not None:
                samples(run, args.warmup)
                run.samples_ms = samples(run, args.repeats)
                _finish(run, numel)
            gc.collect()
    for run in runs.values():
        status = f"skipped ({run.error})" if run.error else f"{statistics.median(run.samples_ms):.2f} ms"
        print(f"  {run.name:<28} {status}", flush=True)
    return [_row(run, millions, setup, interleaved) for run in runs.values()]


def _row(run: Run, millions: float, setup: Setup, interleaved: bool) -> dict:
    row = dict(
        provider=run.name, size_m=millions, numel=setup.numel, tensors=len(setup.params), hidden=setup.hidden,
        layers=setup.layers, status="skipped" if run.error else "ok", error=run.error,
        mode="interleaved" if interleaved else "sequential", steps_per_sample=run.steps_per_sample,
        first_step_ms=run.first_step_ms, samples_ms=run.samples_ms,
        state_bytes_per_param=run.state_bytes_per_param,
    )  # fmt: skip
    if run.samples_ms:
        samples = run.samples_ms * 2 if len(run.samples_ms) == 1 else run.samples_ms
        q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        row |= dict(median_ms=median, q1_ms=q1, q3_ms=q3,
                    min_ms=min(run.samples_ms), max_ms=max(run.samples_ms))  # fmt: skip
    return row


# -- output --------------------------------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> None:
    baseline = {r["size_m"]: r.get("median_ms") for r in rows if r["provider"] == BASELINE}
    for row in rows:
        base = baseline.get(row["size_m"])
        row["ratio_to_adamw_fused"] = row["median_ms"] / base if base and "median_ms" in row else None


def print_table(rows: list[dict]) -> None:
    header = f"{'provider':<28} {'params':>8} {'median ms':>10} {'min ms':>9} {'q1–q3 ms':>17} {'x fused':>8}"
    print(f"\n{header} {'B/param':>8}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['provider']:<28} {r['numel'] / 1e6:>7.1f}M  skipped: {r['error'][:80]}")
            continue
        spread = f"{r['q1_ms']:.2f}–{r['q3_ms']:.2f}"
        ratio = f"{r['ratio_to_adamw_fused']:.2f}" if r["ratio_to_adamw_fused"] else "-"
        print(f"{r['provider']:<28} {r['numel'] / 1e6:>7.1f}M {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} "
              f"{spread:>17} {ratio:>8} {r['state_bytes_per_param']:>8.2f}")  # fmt: skip


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(9, 6))
    names = list(dict.fromkeys(r["provider"] for r in rows))
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        points = sorted((r["numel"], r["median_ms"]) for r in rows if r["provider"] == name and r["status"] == "ok")
        if points:
            style = "--" if name.startswith(("adamw", "sgd")) else ":" if name.startswith("naive") else "-"
            ax.plot(*zip(*points, strict=True), style, marker="o", color=colors[i % len(colors)], label=name)
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="median step time (ms)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# -- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", help="millions of parameters (default by device)")
    parser.add_argument("--matrices", type=int, nargs=2, metavar=("COUNT", "SIZE"),
                        help="instead of --sizes: COUNT square tensors of SIZE x SIZE")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per provider and size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed samples after the first step")
    parser.add_argument("--providers", nargs="+", help="keep only providers matching these glob patterns")
    parser.add_argument("--tau-dtype", choices=TAU_DTYPES, default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=SCRATCH, help="directory of the JSON and PNG (default %(default)s)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quick", action="store_true", help="~0.1M parameters, 2 repeats, fewer providers, no plot")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.no_plot = args.sizes or [0.1], 2, True
    if args.matrices:
        if args.sizes or min(args.matrices) < 1:
            parser.error("--matrices takes two positive ints and replaces --sizes")
        args.sizes = [args.matrices[0] * args.matrices[1] ** 2 / 1e6]
    if args.sizes is None:
        args.sizes = [100, 300, 1000] if torch.device(args.device).type == "cuda" else [10, 30, 100, 300]
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    table = providers(device, args.quick)
    if args.providers:
        table = {n: v for n, v in table.items() if any(fnmatch.fnmatch(n, pattern) for pattern in args.providers)}
    if not table:
        raise SystemExit(f"no provider matches {args.providers}")
    info = machine_info(device)
    gpu = f" ({info['gpu']})" if info["gpu"] else ""
    print(f"{info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads), torch {info['torch']}, "
          f"device {device}{gpu}")  # fmt: skip
    rows = [row for millions in args.sizes for row in measure_size(millions, table, args, device)]
    add_ratios(rows)
    print_table(rows)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config |= dict(reserve_p=RESERVE_P, alpha=ALPHA, lr=LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM)
    result = dict(machine=info, config=config, results=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"step_speed_{device.type}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}")
    if not args.no_plot:
        plot(rows, args.out / f"step_speed_{device.type}.png", f"optimizer step, {info['gpu'] or info['cpu']}")
    return result


if __name__ == "__main__":
    main()
