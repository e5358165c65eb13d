"""A one-minute, CPU-only picture of the alignment tax, built from nothing but torch.

A small MLP is "pre-trained" on skill A (base), fine-tuned on skill B (SFT), then "aligned" on objective C
starting from SFT, once with each optimizer. Reward is how much the loss on C fell; tax is how much the
losses on A and B rose. τ = SFT − base is what the online-merging optimizers merge into every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from online_merging.kernels import get_backend
from online_merging.merging import TaskVector
from online_merging.optim import OnlineMergingAdam

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    method: str
    reward_gain: float
    ability_loss: float
    seconds: float


def _task(seed: int, dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A random smooth target function R^dim -> R^dim (one hidden tanh layer)."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(dim, 4 * dim, generator=g) / dim**0.5, torch.randn(4 * dim, dim, generator=g) / (2 * dim**0.5)
    return lambda x: torch.tanh(x @ w1) @ w2


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, target, steps: int, seed: int, dim: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(64, dim, generator=g)
        loss = nn.functional.mse_loss(model(x), target(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def _loss(model: nn.Module, target, dim: int) -> float:
    x = torch.randn(2048, dim, generator=torch.Generator().manual_seed(12345))
    return float(nn.functional.mse_loss(model(x), target(x)))


def run_demo(*, steps: int = 300, seed: int = 0, dim: int = 16, lr: float = 3e-3) -> list[DemoResult]:
    """Align the SFT model on objective C with AdamW, OnDARE and OnTIES; return reward and tax of each."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r} (expected an integer ≥ 1)")
    torch.manual_seed(seed)
    skill_a, skill_b, objective_c = _task(seed + 1, dim), _task(seed + 2, dim), _task(seed + 3, dim)
    model = nn.Sequential(nn.Linear(dim, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, dim))
    _train(model, torch.optim.AdamW(model.parameters(), lr=3e-3), skill_a, 600, seed, dim)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    both = lambda x: skill_a(x) + skill_b(x[:, torch.arange(dim).flip(0)])  # noqa: E731 (SFT teaches B on top of A)
    _train(model, torch.optim.AdamW(model.parameters(), lr=1e-3), both, 600, seed + 1, dim)
    sft = {k: v.clone() for k, v in model.state_dict().items()}
    tau = TaskVector.from_models(base, sft, dtype=torch.float32)

    def ability(m):
        return _loss(m, both, dim)

    merging = dict(lr=lr, task_vector=tau, reserve_p=0.1, alpha=1e-3, alpha_unit="absolute")
    optimizers = {
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=lr),
        "OnDARE": lambda m: OnlineMergingAdam(m.named_parameters(), merge="ondare", **merging),
        "OnTIES": lambda m: OnlineMergingAdam(m.named_parameters(), merge="onties", **merging),
    }
    get_backend(None, torch.device("cpu"))  # builds the fused CPU kernel on first use: keep it out of the timings
    results = []
    for method, make in optimizers.items():
        model.load_state_dict(sft)
        reward_before, ability_before = _loss(model, objective_c, dim), ability(model)
        start = time.perf_counter()
        _train(model, make(model), objective_c, steps, seed + 2, dim)
        seconds = time.perf_counter() - start
        results.append(
            DemoResult(method, reward_before - _loss(model, objective_c, dim), ability(model) - ability_before, seconds)
        )
    return results


def format_results(results: list[DemoResult]) -> str:
    lines = [f"{'method':<8} {'reward gain':>12} {'ability loss':>13} {'ratio':>7} {'seconds':>8}"]
    for r in results:
        ratio = r.reward_gain / r.ability_loss if r.ability_loss > 0 else float("inf")
        lines.append(f"{r.method:<8} {r.reward_gain:>12.4f} {r.ability_loss:>13.4f} {ratio:>7.2f} {r.seconds:>8.2f}")
    return "\n".join(lines)
