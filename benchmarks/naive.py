"""The step-speed benchmarks' naive baseline: online merging the way the published code does it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.optim import Optimizer

from online_merging import TaskVector


class NaiveOnlineMergingAdamW(Optimizer):
    """The published code's way of doing it, as a timing baseline: a Python loop over parameters, eager ops.

    OnDARE: τ' = clamp(dropout(τ), ±1) once; each step θ += (1−α)·dropout(Δ) + α·τ' (``F.dropout`` keeps with
    probability p and scales by 1/p). OnTIES: τ' = top-p(τ) once; each step Δ' = top-p(Δ) by a full argsort, the
    sign elected from the unweighted τ' + Δ', disagreeing elements dropped, θ += (1−α)·Δ' + α·τ'. Weight decay
    after the update. Not a correctness oracle.
    """

    def __init__(
        self,
        named_params,
        task_vector: TaskVector,
        merge: str,
        lr: float,
        weight_decay: float,
        reserve_p: float,
        alpha: float,
    ):
        named_params = list(named_params)
        super().__init__([p for _, p in named_params], dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, wd=weight_decay))
        self.merge, self.reserve_p, self.alpha = merge, reserve_p, alpha
        self._taus: dict[torch.Tensor, torch.Tensor] = {}
        for name, param in named_params:
            tau = task_vector[name].to(param.device).float()
            tau = F.dropout(tau, 1.0 - reserve_p).clamp_(-1.0, 1.0) if merge == "ondare" else _top_p(tau, reserve_p)
            self._taus[param] = tau.to(task_vector[name].dtype)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for param in group["params"]:
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                m.mul_(beta1).add_(param.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                update = m / denom * (-lr / (1 - beta1**t))
                tau = self._taus[param].float()
                if self.merge == "ondare":
                    merged = F.dropout(update, 1.0 - self.reserve_p) * (1 - self.alpha) + tau * self.alpha
                else:
                    update = _top_p(update, self.reserve_p)
                    sign = torch.sign(tau + update)
                    merged = torch.where(torch.sign(update) == sign, update, 0.0) * (1 - self.alpha)
                    merged += torch.where(torch.sign(tau) == sign, tau, 0.0) * self.alpha
                param.add_(merged)
                param.mul_(1 - lr * group["wd"])


def _top_p(x: torch.Tensor, reserve_p: float) -> torch.Tensor:
    flat = x.reshape(-1)
    order = torch.argsort(flat.abs(), descending=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[: max(1, int(flat.numel() * reserve_p))]] = True
    return torch.where(keep, flat, 0.0).view_as(x)
