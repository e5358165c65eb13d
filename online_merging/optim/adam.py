"""OnlineMergingAdam: AdamW whose every update is sparsified and merged with the SFT task vector."""

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

__all__ = ["OnlineMergingAdam"]


class OnlineMergingAdam(OnlineMergingOptimizer):
    r"""AdamW with online merging (Lu et al. 2024, arXiv 2405.17931).

    .. math::
        \begin{aligned}
        &\Delta\theta_t = -\eta\,\hat m_t / (\sqrt{\hat v_t} + \epsilon)
            \quad\text{(Adam, bias-corrected moments)} \\
        &\theta_t = (1 - \eta\lambda)\,\theta_{t-1} + F(\Delta\theta_t) \oplus F(\tau)
            \;[+\,\mu(\theta_{sft} - \theta_{t-1})],
            \qquad \tau = \theta_{sft} - \theta_{base} \\
        &\text{OnDARE: } (1-\alpha)\,F_R(\Delta\theta_t) + \alpha\,F_R(\tau),
            \ F_R \text{ keeps each element with probability } p \\
        &\text{OnTIES: } (1-\alpha)\,F_T(\Delta\theta_t) \oplus_{sign} \alpha\,F_T(\tau),
            \ F_T \text{ keeps the top-}p\text{ fraction by } |x|
        \end{aligned}

    Arguments as :class:`torch.optim.AdamW`, plus (all per param group, saved in checkpoints, changeable
    between steps):

    Args:
        task_vector: τ as a :class:`~online_merging.TaskVector`; required unless ``merge=None``.
        module: the module being trained, to name unnamed params (as HF ``Trainer`` passes them). Not
            ``model``: ``Trainer`` takes a ``model`` key out of its optimizer kwargs.
        merge: ``"ondare"``, ``"onties"`` or ``None`` (plain AdamW).
        reserve_p: fraction p of elements kept, 0 < p <= 1.
        alpha: merging weight α in [0, 1], or in learning-rate units (see ``alpha_unit``).
        alpha_unit: ``"absolute"`` (the paper's α) or ``"lr"``: the weight at each step is α·lr, so that it follows
            the learning rate and its scheduler and means the same at any learning rate (docs/algorithm.md).
        merge_every: K of step-K: merge every K steps, plain steps in between (Alg. 2).
        seed: key of the counter-based DARE masks.
        dare_rescale: scale kept elements by 1/p (the published code); ``False`` is the paper's text.
        tau_mask: ``"once"`` draws τ's DARE mask once (published code), ``"every_step"`` anew each step.
        tau_clamp: clamp the rescaled, sparsified τ to ±this in OnDARE (published code); ``None`` disables.
        ties_sign: OnTIES sign election from the ``"unweighted"`` sum τ + Δ (published code) or the
            ``"weighted"`` sum of Eq. 7.
        pull: λ of a pull toward the SFT model, decoupled like the weight decay: each step also adds
            λ·(θ_sft − θ), θ_sft being the parameter's value at its first step (kept in the optimizer state: one
            more copy of the parameters, in their dtype). 0 (default) disables it; it needs no task vector.
        pull_unit: ``"lr"`` (default: λ·lr per step, as AdamW's weight decay) or ``"absolute"``.
        pull_elements: ``"all"`` elements; ``"kept"``: those the step's sparsification of Δ keeps (OnDARE's
            draw, OnTIES's top-p; all without a merge); ``"consensus"``: TIES's sign consensus of the merged update
            and the pull (where they disagree, the larger wins).
        nonfinite_grads: ``None`` (no check, no device sync), ``"raise"`` (naming the parameter, before any
            change) or ``"skip"`` (that parameter keeps its value and moments; see ``nonfinite_skips``).
        backend: ``"eager"``, ``"cpu"`` (fused C++), ``"triton"`` (CUDA) or ``None``: the fastest for each
            parameter's device.
        neuron_mask: masked updates (ALLO, arXiv 2406.12606): parameter name → bool mask of its rows (shape
            ``(shape[0],)``, a linear layer's output neurons) or of its full shape. Masked-out elements, and their
            optimizer state, keep their values exactly; see :class:`~online_merging.optim.base.OnlineMergingOptimizer`.
            A setting, like τ: not saved in ``state_dict()``.
    """

    group_keys = ("betas", "eps", "amsgrad")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
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
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
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
        check_range(where, "eps", group["eps"], 0.0, float("inf"), high_open=True)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid {where}'betas': {betas!r} (expected two numbers)")
        for i, beta in enumerate(betas):
            check_range(where, f"betas[{i}]", beta, 0.0, 1.0, high_open=True)
        check_range(where, "weight_decay", group["weight_decay"], 0.0, float("inf"), high_open=True)
        return MergeSettings.from_group(group, where)

    def _step_group(
        self, group: dict[str, Any], settings: MergeSettings, params: list[torch.Tensor], skip: dict
    ) -> None:
        states = []
        for param in params:
            state = self.state[param]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            states.append({key: state.get(key) for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")})
        beta1, beta2 = group["betas"]
        plan = Plan(
            "adam", settings, lr=group["lr"], weight_decay=group["weight_decay"], maximize=group["maximize"],
            beta1=beta1, beta2=beta2, eps=group["eps"], amsgrad=group["amsgrad"],
        )  # fmt: skip
        functional.step(plan, self._records(plan, settings, params, states, skip), backend=self.backend)
