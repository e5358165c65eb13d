"""Step time of the online-merging optimizers on FSDP2 shards against torch's AdamW on the same shards: what the
exact distributed top-k of OnTIES costs, and what OnDARE (no communication) costs.

Run from the repository root:

    python benchmarks/sharded_step.py                      # 2 CPU ranks (gloo, loopback), 24 tensors of 512x512
    python benchmarks/sharded_step.py --quick --out /tmp/b # 2 ranks, 4 tensors of 64x64, seconds

Each rank runs one torch thread. The model is a stack of bias-free linear layers, each ``fully_shard``-ed; one
backward fills the (DTensor) gradients, which stay fixed; τ is random in bf16; p = 0.01, α = 1e-7, lr = 1e-5. One
sample is one ``optimizer.step()`` followed by a barrier, timed on rank 0: the slowest rank's step. ``--warmup``
samples are discarded, then ``--repeats`` rounds in which the providers take turns. The collectives of a step after
the first (which also selects τ's top-p, once) are counted by wrapping ``torch.distributed``'s functions. Writes
``sharded_step_cpu.json`` to ``--out`` (default ``benchmarks/results``). Loopback gloo is not a GPU interconnect:
the collective counts carry over, the times do not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

try:
    import online_merging
except ImportError:  # run as a script from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import online_merging

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing, beside this file
from timing import SCRATCH, time_ms

from online_merging import OnlineMergingAdam, TaskVector

RESERVE_P, ALPHA, LR = 0.01, 1e-7, 1e-5
BASELINE = "adamw_foreach"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier")


def providers(model: nn.Module, tau: TaskVector) -> dict[str, torch.optim.Optimizer]:
    named = list(model.named_parameters())
    merging = {"lr": LR, "task_vector": tau, "reserve_p": RESERVE_P, "alpha": ALPHA, "alpha_unit": "absolute"}
    return {
        BASELINE: torch.optim.AdamW([p for _, p in named], lr=LR, foreach=True),
        "om_adam_plain": OnlineMergingAdam(named, lr=LR, merge=None),
        "om_adam_ondare": OnlineMergingAdam(named, merge="ondare", **merging),
        "om_adam_onties": OnlineMergingAdam(named, merge="onties", **merging),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_collectives(step) -> int:
    """How many collectives ``step()`` issues on this rank."""
    calls = 0
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(original):
        def wrapper(*args, **kwargs):
            nonlocal calls
            calls += 1
            return original(*args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(dist, name, counting(original))
    try:
        step()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return calls


def _rank(rank: int, args: argparse.Namespace, port: int, out_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.hidden, args.hidden, bias=False) for _ in range(args.layers)])
    generator = torch.Generator().manual_seed(1)
    tau = TaskVector(
        {n: (torch.randn(p.shape, generator=generator) * 1e-3).bfloat16() for n, p in model.named_parameters()}
    )
    mesh = init_device_mesh("cpu", (args.world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model(torch.randn(8, args.hidden)).pow(2).mean().backward()
    optimizers = providers(model, tau)
    for opt in optimizers.values():  # the first step: state, kernels, τ's cuts
        opt.step()
    collectives = {name: count_collectives(opt.step) for name, opt in optimizers.items()}
    samples = {name: [] for name in optimizers}
    names = list(optimizers)

    def step_and_wait(optimizer: torch.optim.Optimizer) -> None:  # timed up to the barrier: the slowest rank's step
        optimizer.step()
        dist.barrier()

    for round_ in range(args.warmup + args.repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            dist.barrier()
            ms = time_ms(lambda opt=optimizers[name]: step_and_wait(opt))
            if round_ >= args.warmup:
                samples[name].append(ms)
    if rank == 0:
        rows = []
        for name in names:
            median = statistics.median(samples[name])
            rows.append(dict(provider=name, median_ms=median, samples_ms=samples[name], collectives=collectives[name]))
        base = rows[0]["median_ms"]
        for row in rows:
            row["ratio_to_adamw"] = row["median_ms"] / base
        Path(out_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (processes)")
    parser.add_argument("--layers", type=int, default=24, help="tensors (layers of hidden x hidden)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="4 tensors of 64x64, 1 warm-up, 2 repeats")
    parser.add_argument("--out", type=Path, default=SCRATCH, help="directory of the JSON (default %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.warmup, args.repeats = 4, 64, 1, 2
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as scratch:
        out_file = os.path.join(scratch, "rows.json")
        mp.spawn(_rank, args=(args, free_port(), out_file), nprocs=args.world, join=True)
        rows = json.loads(Path(out_file).read_text())
    result = {
        "machine": dict(
            cpu_cores=os.cpu_count(),
            torch=torch.__version__,
            online_merging=online_merging.__version__,
            date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            load_average_at_start=os.getloadavg(),
        ),
        "setup": dict(
            world=args.world,
            layers=args.layers,
            hidden=args.hidden,
            params=args.layers * args.hidden**2,
            warmup=args.warmup,
            repeats=args.repeats,
        ),
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharded_step_cpu.json").write_text(json.dumps(result, indent=1))
    print(f"{args.world} ranks, {args.layers} tensors of {args.hidden}x{args.hidden}, median of {args.repeats}")
    print(f"{'provider':<16} {'ms/step':>9} {'x AdamW':>8} {'collectives':>12}")
    for row in rows:
        print(f"{row['provider']:<16} {row['median_ms']:9.2f} {row['ratio_to_adamw']:8.2f} {row['collectives']:12d}")
    return result


if __name__ == "__main__":
    main()
