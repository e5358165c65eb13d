"""Run a function on N gloo processes on this machine (loopback) and collect what each rank returns; the small
model the distributed tests shard."""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, timeout: float, results, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the host name resolves to
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
        try:
            # plain pickle copies tensors, where the queue's would share memory that dies with this process
            results.put((rank, True, pickle.dumps(fn(*args))))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn, world_size: int, *args, timeout: float = 60.0) -> list:
    """``fn(*args)`` on ``world_size`` spawned processes, each in an initialised gloo process group (the world);
    returns each rank's return value, by rank.

    ``fn``, ``args`` and the return values must pickle (``fn`` at module level). Raises ``RuntimeError`` with each
    failing rank's traceback when a rank raises, dies, or all have not returned within ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    env = {"OMP_NUM_THREADS": "1"}  # set before spawning: a child reads it when it starts, before _worker runs
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        port = free_port()
        procs = [
            ctx.Process(target=_worker, args=(rank, world_size, port, timeout, results, fn, args), daemon=True)
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    returned, failures = {}, {}
    deadline, grace = time.monotonic() + timeout, None  # grace: when to stop waiting for ranks after a failure
    try:
        while len(returned) + len(failures) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                for r, p in enumerate(procs):
                    if p.exitcode not in (None, 0) and r not in returned:
                        failures.setdefault(r, f"exited with code {p.exitcode} without reporting")
                if failures and grace is None:
                    grace = time.monotonic() + 2.0
                if time.monotonic() > min(deadline, grace or deadline):
                    break
                continue
            if ok:
                returned[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                grace = grace or time.monotonic() + 2.0
    finally:
        missing = "stopped after another rank failed" if failures else f"no result after {timeout:g} s"
        for r in range(world_size):
            if r not in returned and r not in failures:
                failures[r] = missing
        for p in procs:
            p.join(timeout=0 if failures else 10)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        report = "\n".join(f"--- rank {r}: {failures[r]}" for r in sorted(failures))
        raise RuntimeError(f"{len(failures)} of {world_size} ranks failed:\n{report}")
    return [returned[r] for r in range(world_size)]


class BiasOnly(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x + self.bias


def tiny_model() -> nn.Module:
    """Identical on every rank (seeded); tensors of 35, 5, 15, 3 and 3 elements: none divides by 2."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3), BiasOnly(3))
