"""Optimizers stepping in several threads at once: each thread's OnTIES scratch buffer is its own."""

import sys
import threading

import pytest
import torch

from online_merging import OnlineMergingAdam, TaskVector

SIZE = 1 << 18  # large enough that each C++ pass outlasts a thread switch
STEPS = 6


def _setup(seed: int):
    g = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(SIZE, generator=g))
    tau = TaskVector({"weight": 0.01 * torch.randn(SIZE, generator=g)})
    optimizer = OnlineMergingAdam([("weight", weight)], lr=1e-2, task_vector=tau, merge="onties", reserve_p=0.3,
                                  alpha=0.5, alpha_unit="absolute", backend="cpu")  # fmt: skip
    grads = [torch.randn(SIZE, generator=g) for _ in range(STEPS)]
    return weight, optimizer, grads


def _train(weight, optimizer, grads, start: threading.Barrier | None = None):
    if start is not None:
        start.wait()
    for grad in grads:
        weight.grad = grad
        optimizer.step()


@pytest.fixture
def frequent_switches():
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("frequent_switches")
def test_two_threads_step_as_if_one_after_the_other():
    alone = []
    for seed in (1, 2):
        weight, optimizer, grads = _setup(seed)
        _train(weight, optimizer, grads)
        alone.append(weight.detach().clone())
    for _ in range(4):
        setups = [_setup(seed) for seed in (1, 2)]
        start = threading.Barrier(2)
        threads = [threading.Thread(target=_train, args=(*setup, start)) for setup in setups]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for (weight, _, _), expected in zip(setups, alone, strict=True):
            assert torch.equal(weight.detach(), expected)
