"""Stepping tensors that hold pieces of named parameters (DeepSpeed ZeRO partitions, FSDP2 shards).

A :class:`Piece` is a contiguous run of one parameter's row-major elements inside the tensor the optimizer steps.
Each piece is stepped as the whole parameter would be: DARE draws by the element's global index, OnTIES keeps the
top-p of the whole parameter, selected exactly across the ranks that hold its pieces, for all the tensors of a step
at once (:func:`~online_merging.distributed.select_pending`). A masked parameter's piece holds its slice of the
element mask (``neuron_mask``), as it holds its slice of τ. Every rank lists every parameter of a partition in the
same order, with empty pieces for those it holds none of, so that these collectives line up.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from online_merging.distributed import distributed_topk_cut
from online_merging.distributed.fsdp import dtensor_fragment, fragment_group, is_dtensor, local_tensor
from online_merging.kernels.plan import Binding
from online_merging.merging import Cut, PendingCut, TaskVector, num_kept

__all__ = [
    "Piece",
    "bind_zero_optimizer",
    "calling_zero_optimizer",
    "dtensor_pieces",
    "is_dtensor",
    "is_zero_optimizer_of",
    "zero_pieces",
]


@dataclass(eq=False, kw_only=True)
class Piece(Binding):
    """``numel`` elements of parameter ``name`` at ``start`` of the stepped tensor; global index ``offset`` on. The
    piece's :class:`~online_merging.kernels.plan.Binding`: ``tau`` and ``mask`` are its slices of the parameter's
    (flat; ``None`` when τ has no entry for it, or it is not masked), its records carry it."""

    start: int
    numel: int
    offset: int
    full_numel: int
    group: Any = None  # process group of the ranks holding the parameter's pieces (None: the default group)

    def view(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """The piece's elements of ``tensor`` (shaped like the stepped tensor), as a flat view."""
        return None if tensor is None else local_tensor(tensor).view(-1)[self.start : self.start + self.numel]

    @property
    def whole(self) -> bool:
        """This rank holds all of the parameter (a replicated DTensor): no collective is needed."""
        return self.group is None and self.numel == self.full_numel

    def update_cut(self, p: float) -> PendingCut | None:
        """The whole parameter's top-p cut of this step's update, selected with the other tensors' of the step
        (:func:`~online_merging.distributed.select_pending`)."""
        if self.whole:
            return None
        return PendingCut(self.offset, num_kept(p, self.full_numel), self.full_numel, self.group)

    def tau_cut(self, p: float) -> Callable[[torch.Tensor], Cut] | None:
        """The whole τ's top-p cut, by one distributed selection (the plan calls it once per p and keeps the cut in
        ``tau_cuts``)."""
        if self.whole:
            return None
        return lambda tau: distributed_topk_cut(tau, self.offset, num_kept(p, self.full_numel), self.group)


def tau_slice(task_vector: TaskVector | None, name: str, offset: int, numel: int, like: torch.Tensor):
    """τ's elements [offset, offset + numel) of parameter ``name``, flat, on ``like``'s device; None without one."""
    if task_vector is None or name not in task_vector:
        return None
    tau = task_vector[name]  # read from the file when the task vector is lazy
    return tau.reshape(-1)[offset : offset + numel].to(like.device, copy=True)  # only the slice stays in memory


def _mask_piece(masks: Mapping[str, torch.Tensor] | None, name: str, offset: int, numel: int, like: torch.Tensor):
    """The piece's slice of the parameter's element mask (global range [offset, offset + numel)), or None."""
    if not masks or name not in masks:
        return None
    return masks[name].reshape(-1)[offset : offset + numel].to(like.device, copy=True)


def zero_pieces(
    zero_optimizer: Any,
    names: Mapping[torch.Tensor, str],
    task_vector: TaskVector | None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[torch.Tensor, list[Piece]]:
    """The pieces of every flat fp32 partition of a DeepSpeed ZeRO-1/2/3 optimizer, with their slices of τ and of
    the element masks ``masks`` (by parameter name; see ``neuron_mask``)."""
    from online_merging.distributed.zero import zero_fragments

    group = getattr(zero_optimizer, "dp_process_group", None)
    layouts = {}
    for flat, fragments in zero_fragments(zero_optimizer, names=names).items():
        layouts[flat] = [
            Piece(
                name=f.name,
                start=f.start,
                numel=f.numel,
                offset=f.offset,
                full_numel=_numel(f.shape),
                tau=tau_slice(task_vector, f.name, f.offset, f.numel, flat),
                group=group,
                mask=_mask_piece(masks, f.name, f.offset, f.numel, flat),
            )
            for f in fragments
        ]
    return layouts


def dtensor_pieces(
    name: str, param: torch.Tensor, task_vector: TaskVector | None, mask: torch.Tensor | None = None
) -> list[Piece]:
    """The one piece of a DTensor parameter (FSDP2) held by this rank; ``mask``: the parameter's element mask."""
    f = dtensor_fragment(name, param)
    shard = local_tensor(param)
    tau = tau_slice(task_vector, name, f.offset, f.numel, shard)
    mask = _mask_piece(None if mask is None else {name: mask}, name, f.offset, f.numel, shard)
    return [
        Piece(
            name=name, start=f.start, numel=f.numel, offset=f.offset, full_numel=_numel(f.shape), tau=tau,
            group=fragment_group(param), mask=mask,
        )
    ]  # fmt: skip


_BOUND_ZERO_OPTIMIZER = "_online_merging_zero_optimizer"


def is_zero_optimizer_of(owner: Any, optimizer: Any) -> bool:
    """``owner`` is a DeepSpeed ZeRO-1/2/3 optimizer that steps ``optimizer`` (its client optimizer)."""
    return getattr(owner, "optimizer", None) is optimizer and (
        hasattr(owner, "single_partition_of_fp32_groups") or hasattr(owner, "fp32_partitioned_groups_flat")
    )


def bind_zero_optimizer(optimizer: Any, zero_optimizer: Any) -> None:
    """Record that the DeepSpeed ZeRO optimizer ``zero_optimizer`` steps ``optimizer``, for
    :func:`calling_zero_optimizer`; the integrations call it once DeepSpeed has built the engine."""
    if not is_zero_optimizer_of(zero_optimizer, optimizer):
        raise ValueError(f"{type(zero_optimizer).__name__} is not a DeepSpeed ZeRO optimizer stepping this optimizer")
    # a weak reference: the ZeRO optimizer holds ours, not the other way round
    setattr(optimizer, _BOUND_ZERO_OPTIMIZER, weakref.ref(zero_optimizer))


def _holds_param_groups(zero_optimizer: Any, optimizer: Any) -> bool:
    """The tensors in ``optimizer``'s param groups are flat partitions of ``zero_optimizer`` (not of an engine
    built later with the same optimizer)."""
    flats = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
    if flats is None:
        flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", [])
    owned = {id(flat) for flat in flats}
    return all(id(p) in owned for g in optimizer.param_groups for p in g["params"])


def calling_zero_optimizer(optimizer: Any) -> Any:
    """The DeepSpeed ZeRO optimizer that steps ``optimizer``, or None.

    DeepSpeed gives the client optimizer flat partitions without saying whose pieces they are. The integrations
    bind the ZeRO optimizer that owns them (:func:`bind_zero_optimizer`); when none is bound, or the bound one does
    not own the partitions, it is found as the ``self`` of a calling frame whose ``.optimizer`` is ours: the
    fallback for a ``deepspeed.initialize`` the integrations do not see (a user's own, or Trainer's given
    ``trainer_optimizer``).
    """
    bound = getattr(optimizer, _BOUND_ZERO_OPTIMIZER, None)
    bound = bound() if bound is not None else None
    if bound is not None and is_zero_optimizer_of(bound, optimizer) and _holds_param_groups(bound, optimizer):
        return bound
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if is_zero_optimizer_of(owner, optimizer):
            return owner
        frame = frame.f_back
    return None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
