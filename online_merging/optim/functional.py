"""Functional core of the optimizers: one step of a param group's records, by a backend.

:class:`OnlineMergingAdam` and :class:`OnlineMergingSGD` build a :class:`~online_merging.kernels.plan.Plan` and
one :class:`~online_merging.kernels.plan.Record` per stepped tensor or piece, and call :func:`step`. A backend's
``step(plan, records)`` does each record's whole step, except for OnTIES's pieces of larger tensors (ZeRO
partitions, FSDP2 shards): there it updates the optimizer state and returns the flat float32 update Δ (Δc + Δ on a
step-K roll-back, 0 where masked); this layer selects the whole tensor's top-p cut of Δ, takes τ's (the piece's
cached cut of the whole) and calls the backend's ``ties_merge(plan, record, total, update_cut, tau_cut)``.

A piece whose update cut is a :class:`~online_merging.merging.PendingCut` waits: the cuts of all such records are
selected together, after their Δ is computed: one batched selection (5 collectives) per step instead of one per
tensor, holding the tensors' Δ meanwhile (here, beside their records), at most ``DEFER_NUMEL`` elements of whole
tensors at a time. A backend whose ``ties_merge`` takes a cut held on the device (``CUTS_ON_DEVICE``) gets them so,
and nothing is read back to the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import torch

from online_merging.distributed import select_pending
from online_merging.kernels import get_backend
from online_merging.kernels.plan import Plan, Record
from online_merging.merging import Cut

__all__ = ["DEFER_NUMEL", "finish_ties", "step"]

DEFER_NUMEL = 2**28
"""Whole-tensor elements whose Δ may wait for one batched OnTIES selection (each rank holds its pieces' share, in
float32): more go in several batches. Decided on whole-tensor sizes, so every rank batches alike."""


def step(plan: Plan, records: list[Record], backend: str | ModuleType | None = None) -> None:
    """Step every record with ``plan``; ``backend``: a name of :data:`~online_merging.kernels.BACKENDS`, a backend
    module, or ``None`` for the fastest on each tensor's device."""
    waiting: list[tuple[ModuleType, Record, torch.Tensor]] = []
    for kernels, batch, select_now in _batches(records, backend):
        for record, total in zip(batch, kernels.step(plan, batch), strict=True):
            if total is None:
                continue
            if record.cut_pending:
                waiting.append((kernels, record, total))
            else:
                finish_ties(kernels, plan, record, total, record.update_cut(total))
        if select_now:
            _select_and_finish(plan, waiting)
            waiting = []
    _select_and_finish(plan, waiting)


def finish_ties(kernels: ModuleType, plan: Plan, record: Record, total: torch.Tensor, update_cut: Cut) -> None:
    """OnTIES's second phase of a piece whose Δ is ``total`` (from ``kernels.step``): given the whole tensor's top-p
    cut of Δ, τ's, then the backend's merge."""
    kernels.ties_merge(plan, record, total, update_cut, plan.tau_cut(record))


def _batches(
    records: list[Record], backend: str | ModuleType | None
) -> Iterator[tuple[ModuleType, list[Record], bool]]:
    """Runs of consecutive records stepped by one backend call, one backend each, and whether the waiting records'
    cuts are to be selected after the run: when their whole tensors reach ``DEFER_NUMEL`` elements."""
    batch: list[Record] = []
    kernels, numel, device = None, 0, None
    for record in records:
        if isinstance(backend, ModuleType):
            module = backend
        elif record.param.device != device:
            device = record.param.device
            module = get_backend(backend, device)
        if batch and module is not kernels:
            yield kernels, batch, False
            batch = []
        kernels = module
        batch.append(record)
        if record.cut_pending:
            numel += record.update_cut.numel
            if numel >= DEFER_NUMEL:
                yield kernels, batch, True
                batch, numel = [], 0
    if batch:
        yield kernels, batch, False


def _select_and_finish(plan: Plan, waiting: list[tuple[ModuleType, Record, torch.Tensor]]) -> None:
    """Select the waiting records' cuts together, then merge the records, in order."""
    if waiting:
        on_device = all(getattr(kernels, "CUTS_ON_DEVICE", False) for kernels, _, _ in waiting)
        pending, totals = [record.update_cut for _, record, _ in waiting], [total for _, _, total in waiting]
        cuts = select_pending(pending, totals, on_device=on_device)
        for (kernels, record, total), cut in zip(waiting, cuts, strict=True):
            finish_ties(kernels, plan, record, total, cut)
