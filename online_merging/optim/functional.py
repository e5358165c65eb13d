"""Functional cores of the optimizers: one step over lists of tensors, dispatched to a backend per tensor.

:class:`OnlineMergingAdam` and :class:`OnlineMergingSGD` gather their state into lists and call these. A tensor may
be a piece of a named parameter: ``offsets``, ``update_cuts`` and ``tau_cuts`` (per tensor, default 0 and ``None``)
go to the backend's ``offset``, ``update_cut`` and ``tau_cut`` (see :mod:`online_merging.kernels.eager`).
``masks`` (per tensor, default ``None``) are the bool element masks of masked updates: the backend's ``mask``.

An update cut that is a :class:`~online_merging.merging.PendingCut` (a piece of a sharded tensor) is selected for
all such tensors together, after their Δ is computed and before they merge: one batched selection (5 collectives)
per step instead of one per tensor, holding the tensors' Δ meanwhile, at most ``DEFER_NUMEL`` elements of whole
tensors at a time.
"""

from __future__ import annotations

import torch

from online_merging.distributed import select_pending
from online_merging.kernels import get_backend
from online_merging.kernels.eager import CutFn, Rest
from online_merging.settings import MergeSettings

__all__ = ["DEFER_NUMEL", "adam", "sgd"]

DEFER_NUMEL = 2**28
"""Whole-tensor elements whose Δ may wait for one batched OnTIES selection (each rank holds its pieces' share, in
float32): more go in several batches. Decided on whole-tensor sizes, so every rank batches alike."""


def adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor | None],
    steps: list[torch.Tensor],
    merge_buffers: list[torch.Tensor | None],
    taus: list[torch.Tensor | None],
    names: list[str | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    settings: MergeSettings,
    backend: str | None = None,
    offsets: list[int] | None = None,
    update_cuts: list[CutFn | None] | None = None,
    tau_cuts: list[CutFn | None] | None = None,
    masks: list[torch.Tensor | None] | None = None,
) -> None:
    """AdamW followed by the online merge; ``steps`` are incremented in place."""
    pieces = _pieces(len(params), offsets, update_cuts, tau_cuts, masks)
    waiting = _Waiting()
    for i, param in enumerate(params):
        steps[i] += 1
        rest = get_backend(backend, param.device).adam_step(
            param, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i], merge_buffers[i], taus[i],
            step=int(steps[i]), name=names[i], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, settings=settings, **pieces[i],
        )  # fmt: skip
        waiting.add(rest, pieces[i]["update_cut"])
    waiting.finish()


def sgd(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    steps: list[torch.Tensor],
    merge_buffers: list[torch.Tensor | None],
    taus: list[torch.Tensor | None],
    names: list[str | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    settings: MergeSettings,
    backend: str | None = None,
    offsets: list[int] | None = None,
    update_cuts: list[CutFn | None] | None = None,
    tau_cuts: list[CutFn | None] | None = None,
    masks: list[torch.Tensor | None] | None = None,
    first_momentum: list[bool] | None = None,
) -> None:
    """SGD (as ``torch.optim.SGD``) followed by the online merge; ``steps`` are incremented in place.

    ``first_momentum`` (per tensor; default: on its first step) says which momentum buffers start now, set to the
    gradient as torch sets a missing buffer.
    """
    pieces = _pieces(len(params), offsets, update_cuts, tau_cuts, masks)
    waiting = _Waiting()
    for i, param in enumerate(params):
        steps[i] += 1
        first = int(steps[i]) == 1 if first_momentum is None else first_momentum[i]
        rest = get_backend(backend, param.device).sgd_step(
            param, grads[i], momentum_buffers[i], merge_buffers[i], taus[i],
            step=int(steps[i]), name=names[i], lr=lr, momentum=momentum, dampening=dampening,
            nesterov=nesterov, weight_decay=weight_decay, maximize=maximize, settings=settings,
            first_momentum=first, **pieces[i],
        )  # fmt: skip
        waiting.add(rest, pieces[i]["update_cut"])
    waiting.finish()


class _Waiting:
    """The rests of the steps waiting for their batched OnTIES cut (see the module docstring)."""

    def __init__(self) -> None:
        self.rests: list[Rest] = []
        self.cuts: list = []
        self.numel = 0

    def add(self, rest: Rest, cut) -> None:
        if rest is None:
            return
        self.rests.append(rest)
        self.cuts.append(cut)
        self.numel += cut.numel
        if self.numel >= DEFER_NUMEL:
            self.finish()

    def finish(self) -> None:
        """Select the waiting cuts together, then run the rests of their steps, in order."""
        if self.rests:
            select_pending(self.cuts)
            for rest in self.rests:
                rest()
        self.rests, self.cuts, self.numel = [], [], 0


def _pieces(
    n: int,
    offsets: list[int] | None,
    update_cuts: list[CutFn | None] | None,
    tau_cuts: list[CutFn | None] | None,
    masks: list[torch.Tensor | None] | None,
) -> list[dict]:
    """The backend's piece (and mask) arguments of each of ``n`` tensors."""
    return [
        {"offset": offset, "update_cut": update_cut, "tau_cut": tau_cut, "mask": mask}
        for offset, update_cut, tau_cut, mask in zip(
            offsets or [0] * n, update_cuts or [None] * n, tau_cuts or [None] * n, masks or [None] * n, strict=True
        )
    ]
