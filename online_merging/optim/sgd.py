"""OnlineMergingSGD: torch's SGD whose every update is sparsified and merged with the SFT task vector."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from online_merging.kernels.plan import Plan
from online_merging.merging import TaskVector
from online_merging.optim import functional
from online_merging.optim.base import OnlineMergingOptimizer
from online_merging.settings import MERGE_DEFAULTS, MergeSettings, check_range

__all__ = ["OnlineMergingSGD"]


class OnlineMergingSGD(OnlineMergingOptimizer):
    r"""SGD (with momentum, as :class:`torch.optim.SGD`) with online merging (Lu et al. 2024).

    .. math::
        \Delta\theta_t = -\eta\, b_t, \qquad
        \theta_t = \theta_{t-1} + F(\Delta\theta_t) \oplus F(\tau)

    where :math:`b_t` is torch's (Nesterov) momentum buffer of :math:`g_t + \lambda\theta_{t-1}`: weight decay
    is coupled, as in :class:`torch.optim.SGD`, so it is part of Δθ and merged with it. The merge arguments,
    ``neuron_mask`` (masked updates) included, are those of :class:`~online_merging.OnlineMergingAdam`.
    """

    group_keys = ("momentum", "dampening", "nesterov")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        task_vector: TaskVector | None = None,
        module: nn.Module | None = None,
        merge: str | None = MERGE_DEFAULTS["merge"],
        reserve_p: float = MERGE_DEFAULTS["reserve_p"],
        alpha: float = MERGE_DEFAULTS["alpha"],
        alpha_unit: str = MERGE_DEFAULTS["alpha_unit"],
        merge_every: int = MERGE_DEFAULTS["merge_every"],
        seed: int = MERGE_DEFAULTS["seed"],
        dare_rescale: bool = MERGE_DEFAULTS["dare_rescale"],
        tau_mask: str = MERGE_DEFAULTS["tau_mask"],
        tau_clamp: float | None = MERGE_DEFAULTS["tau_clamp"],
        ties_sign: str = MERGE_DEFAULTS["ties_sign"],
        pull: float = MERGE_DEFAULTS["pull"],
        pull_unit: str = MERGE_DEFAULTS["pull_unit"],
        pull_elements: str = MERGE_DEFAULTS["pull_elements"],
        nonfinite_grads: str | None = None,
        backend: str | None = None,
        neuron_mask: Mapping[str, torch.Tensor] | None = None,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            merge=merge,
            reserve_p=reserve_p,
            alpha=alpha,
            alpha_unit=alpha_unit,
            merge_every=merge_every,
            seed=seed,
            dare_rescale=dare_rescale,
            tau_mask=tau_mask,
            tau_clamp=tau_clamp,
            ties_sign=ties_sign,
            pull=pull,
            pull_unit=pull_unit,
            pull_elements=pull_elements,
        )
        super().__init__(
            params,
            defaults,
            task_vector=task_vector,
            module=module,
            nonfinite_grads=nonfinite_grads,
            backend=backend,
            neuron_mask=neuron_mask,
        )

    def _check_group(self, group: dict[str, Any], where: str) -> MergeSettings:
        check_range(where, "lr", group["lr"], 0.0, float("inf"), high_open=True)
        check_range(where, "momentum", group["momentum"], 0.0, float("inf"), high_open=True)
        check_range(where, "dampening", group["dampening"], 0.0, 1.0)
        check_range(where, "weight_decay", group["weight_decay"], 0.0, float("inf"), high_open=True)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"Invalid {where}'nesterov': Nesterov momentum requires momentum > 0 and dampening = 0")
        return MergeSettings.from_group(group, where)

    def _step_group(
        self, group: dict[str, Any], settings: MergeSettings, params: list[torch.Tensor], skip: dict
    ) -> None:
        states, new_buffers = [], []
        for param in params:
            state = self.state[param]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
            # as torch.optim.SGD: a missing buffer (momentum switched on mid-run included) starts as the gradient
            new_buffers.append(group["momentum"] != 0 and "momentum_buffer" not in state)
            if new_buffers[-1]:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            states.append({"momentum_buffer": state.get("momentum_buffer")})
        plan = Plan(
            "sgd", settings, lr=group["lr"], weight_decay=group["weight_decay"], maximize=group["maximize"],
            momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"],
        )  # fmt: skip
        records = self._records(plan, settings, params, states, skip, new_buffers=new_buffers)
        functional.step(plan, records, backend=self.backend)
