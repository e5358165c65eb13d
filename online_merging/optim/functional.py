"""Functional core of the optimizers: one step of a param group's records, by a backend.

:class:`OnlineMergingAdam` and :class:`OnlineMergingSGD` build a :class:`~online_merging.kernels.plan.Plan` and
one :class:`~online_merging.kernels.plan.Record` per stepped tensor or piece, and call :func:`step`. A backend's
``step(plan, records)`` does each record's whole step, except for OnTIES's pieces of larger tensors (ZeRO
partitions, FSDP2 shards): there it updates the optimizer state and returns the flat float32 update Δ (Δc + Δ on a
step-K roll-back, 0 where masked); this layer selects the whole tensor's top-p cut of Δ, takes τ's (the piece's
cached cut of the whole) and calls the backend's ``ties_merge(plan, record, total, update_cut, tau_cut)``.

A piece whose update cut is a :class:`~online_merging.merging.PendingCut` waits: the cuts of all such records are
selected together, after their Δ is computed: one batched selection (5 collectives) per step instead of one per
tensor, holding the tensors' Δ meanwhile, at most ``DEFER_NUMEL`` elements of whole tensors at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import torch

from online_merging.distributed import select_pending
from online_merging.kernels import get_backend
from online_merging.kernels.plan import Plan, Record
from online_merging.merging import num_kept
from online_merging.merging.sparsify import constant_cut

__all__ = ["DEFER_NUMEL", "finish_ties", "step"]

DEFER_NUMEL = 2**28
"""Whole-tensor elements whose Δ may wait for one batched OnTIES selection (each rank holds its pieces' share, in
float32): more go in several batches. Decided on whole-tensor sizes, so every rank batches alike."""


def step(plan: Plan, records: list[Record], backend: str | ModuleType | None = None) -> None:
    """Step every record with ``plan``; ``backend``: a name of :data:`~online_merging.kernels.BACKENDS`, a backend
    module, or ``None`` for the fastest on each tensor's device."""
    waiting = _Waiting(plan)
    for kernels, batch in _batches(records, backend):
        for record, total in zip(batch, kernels.step(plan, batch), strict=True):
            if total is None:
                continue
            if record.waits:
                record.update_cut.total = total
                waiting.add(kernels, record, total)
            else:
                finish_ties(kernels, plan, record, total)
    waiting.finish()


def finish_ties(kernels: ModuleType, plan: Plan, record: Record, total: torch.Tensor) -> None:
    """OnTIES's second phase of a piece whose Δ is ``total`` (from ``kernels.step``): the whole tensor's top-p cuts
    of Δ and of τ (without a cut function, τ is the record's own: its cut is computed once), then the backend's
    merge."""
    tau = record.tau.reshape(-1)
    if record.tau_cut is None:
        threshold, cutoff = constant_cut(record.tau, num_kept(plan.settings.reserve_p, tau.numel()))
        tau_cut = threshold, cutoff + record.offset
    else:
        tau_cut = record.tau_cut(tau)
    kernels.ties_merge(plan, record, total, record.update_cut(total), tau_cut)


def _batches(records: list[Record], backend: str | ModuleType | None) -> Iterator[tuple[ModuleType, list[Record]]]:
    """Runs of consecutive records stepped by one backend call: one backend each, and ending where the waiting
    records' whole tensors reach ``DEFER_NUMEL`` elements, where :class:`_Waiting` selects their cuts."""
    batch: list[Record] = []
    kernels, numel = None, 0
    for record in records:
        module = backend if isinstance(backend, ModuleType) else get_backend(backend, record.param.device)
        if batch and module is not kernels:
            yield kernels, batch
            batch = []
        kernels = module
        batch.append(record)
        if record.waits:
            numel += record.update_cut.numel
            if numel >= DEFER_NUMEL:
                yield kernels, batch
                batch, numel = [], 0
    if batch:
        yield kernels, batch


class _Waiting:
    """The OnTIES records waiting for their batched cut (see the module docstring)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.entries: list[tuple[ModuleType, Record, torch.Tensor]] = []
        self.numel = 0

    def add(self, kernels: ModuleType, record: Record, total: torch.Tensor) -> None:
        self.entries.append((kernels, record, total))
        self.numel += record.update_cut.numel
        if self.numel >= DEFER_NUMEL:
            self.finish()

    def finish(self) -> None:
        """Select the waiting cuts together, then merge their records, in order."""
        if self.entries:
            select_pending([record.update_cut for _, record, _ in self.entries])
            for kernels, record, total in self.entries:
                finish_ties(kernels, self.plan, record, total)
        self.entries, self.numel = [], 0
