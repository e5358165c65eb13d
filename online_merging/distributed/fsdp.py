"""Which piece of which named parameter each rank holds under FSDP2 (``torch.distributed.fsdp.fully_shard``).

``fully_shard`` replaces every parameter by an ``nn.Parameter`` wrapping a ``DTensor`` with placements
``(Shard(0),)`` on a 1-D mesh (``(Replicate(), Shard(0))`` on a 2-D mesh for HSDP): each rank holds a run of whole
rows, ``ceil(rows / world)`` of them on the first ranks, fewer or none on the last ones (uneven sizes are not padded
in the DTensor's local tensor, only in FSDP's own all-gather buffer). A run of whole rows is one contiguous range
of the row-major flattened parameter, described by a :class:`~online_merging.distributed.zero.Fragment` with
``start=0`` (the optimizer updates the local shard itself, :func:`local_tensor`).

:func:`dtensor_fragment` refuses, with a ``ValueError`` naming the parameter and its placements, any layout whose
pieces are not each one contiguous range (``Shard(d)`` for ``d > 0`` of a tensor with more than one row,
``_StridedShard``, ``Partial``).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist

from online_merging.distributed.zero import Fragment

__all__ = ["dtensor_fragment", "fragment_group", "is_dtensor", "local_tensor"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without torch.distributed
        return None
    return DTensor


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 / tensor-parallel parameter)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding this rank's elements of ``param``, sharing its storage.

    For a DTensor, its local shard (``DTensor._local_tensor``: not an ``nn.Parameter``, no autograd history;
    writing into it writes the parameter FSDP all-gathers); a plain tensor (or ``nn.Parameter``) is returned as is.
    """
    if not is_dtensor(param):
        return param
    local = getattr(param, "_local_tensor", None)
    if isinstance(local, torch.Tensor) and not is_dtensor(local):
        return local
    with torch.no_grad():
        return param.to_local()


def _placement_kinds(placements) -> list[str]:
    from torch.distributed.tensor import Replicate, Shard

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # older torch
        _StridedShard = ()
    kinds = []
    for p in placements:
        if _StridedShard and isinstance(p, _StridedShard):
            kinds.append("strided")
        elif isinstance(p, Shard):
            kinds.append("shard")
        elif isinstance(p, Replicate):
            kinds.append("replicate")
        else:  # Partial and anything else: the local tensor is not a piece of the parameter's values
            kinds.append("other")
    return kinds


def _box_range(shape: tuple[int, ...], local_shape: tuple[int, ...], offsets: tuple[int, ...]):
    """(flat offset, numel) of the box ``offsets + [0, local_shape)`` in the row-major flattening of ``shape``,
    or None when the box is not one contiguous range."""
    numel = math.prod(local_shape)
    total = math.prod(shape)
    if numel == 0:
        flat = sum(o * math.prod(shape[d + 1 :]) for d, o in enumerate(offsets))
        return min(flat, total), 0
    # contiguous iff, scanning from the last dim: full dims, then one dim of any size, then dims of size 1
    d = len(shape) - 1
    while d >= 0 and local_shape[d] == shape[d]:
        d -= 1
    if any(local_shape[e] != 1 for e in range(d)):
        return None
    return sum(o * math.prod(shape[e + 1 :]) for e, o in enumerate(offsets)), numel


def _describe(name: str, param) -> str:
    return f"parameter {name!r} (DTensor of shape {tuple(param.shape)}, placements {tuple(param.placements)})"


def dtensor_fragment(name: str, param: torch.Tensor) -> Fragment:
    """The :class:`~online_merging.distributed.zero.Fragment` of ``param`` that this rank holds.

    ``start=0``; ``numel`` = the number of elements of :func:`local_tensor` (possibly 0); ``offset`` = global flat
    (row-major) index of its first element in the full parameter (for an empty shard: where it would start, at
    most the parameter's numel); ``shape`` = the full (global) shape. A plain tensor, or a DTensor replicated on
    every mesh dim, is the whole parameter (offset 0).

    Raises ``ValueError`` naming the parameter and its placements when the pieces of the mesh's ranks are not each
    one contiguous range of the flattened parameter: ``Partial``, ``_StridedShard``, ``Shard(d)`` for ``d > 0``
    of a tensor with more than one row, and the like. The check covers every mesh coordinate, not only this
    rank's, so all ranks raise alike.
    """
    shape = tuple(int(s) for s in param.shape)
    if not is_dtensor(param):
        return Fragment(name, 0, math.prod(shape), 0, shape)
    from torch.distributed.tensor._utils import (
        _compute_local_shape_and_global_offset,
        compute_local_shape_and_global_offset,
    )

    placements = tuple(param.placements)
    kinds = _placement_kinds(placements)
    if "strided" in kinds or "other" in kinds:
        bad = [repr(p) for p, k in zip(placements, kinds, strict=True) if k in ("strided", "other")]
        raise ValueError(
            f"{_describe(name, param)}: placement(s) {', '.join(bad)} are not supported; only Shard and Replicate "
            "placements whose local shards are contiguous ranges of the row-major flattened parameter are"
        )
    mesh = param.device_mesh
    mesh_shape = tuple(int(s) for s in mesh.shape)
    for coordinate in itertools.product(*(range(s) for s in mesh_shape)):
        local_shape, offsets = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coordinate), placements)
        if _box_range(shape, tuple(local_shape), tuple(offsets)) is None:
            raise ValueError(
                f"{_describe(name, param)}: the shard at mesh coordinate {coordinate} (local shape "
                f"{tuple(local_shape)}, global offset {tuple(offsets)}) is not one contiguous range of the row-major "
                "flattened parameter; shard dim 0 only (FSDP2's fully_shard default), or a tensor whose dims "
                "before the sharded one have size 1"
            )
    local_shape, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    local = local_tensor(param)
    if tuple(local_shape) != tuple(local.shape):
        raise ValueError(
            f"{_describe(name, param)}: the local tensor has shape {tuple(local.shape)} where its placements give "
            f"{tuple(local_shape)}"
        )
    flat, numel = _box_range(shape, tuple(local_shape), tuple(offsets))
    return Fragment(name, 0, numel, flat, shape)


def fragment_group(param: torch.Tensor):
    """The process group over which the pieces of ``param`` are spread, for collectives over its whole tensor
    (e.g. :func:`~online_merging.distributed.topk.distributed_topk_cuts`).

    ``None`` when this rank holds the whole parameter: a plain tensor, or a DTensor replicated on every mesh dim.
    Careful: ``None`` means "no collective needed", not the default (world) group. For a DTensor sharded on one
    mesh dim, that dim's group (``device_mesh.get_group(dim)``; ranks along replicated mesh dims hold copies of the
    same pieces and are left out). Sharded on several mesh dims: the world group if the mesh spans the world, else
    ``ValueError`` (no existing group holds exactly the pieces).
    """
    if not is_dtensor(param):
        return None
    placements = tuple(param.placements)
    kinds = _placement_kinds(placements)
    if "strided" in kinds or "other" in kinds:
        raise ValueError(f"parameter of shape {tuple(param.shape)}: placements {placements} are not supported")
    mesh = param.device_mesh
    shard_dims = [d for d, k in enumerate(kinds) if k == "shard" and mesh.size(d) > 1]
    if not shard_dims:
        return None
    if len(shard_dims) == 1:
        return mesh.get_group(shard_dims[0])
    if math.prod(mesh.size(d) for d in shard_dims) == mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    raise ValueError(
        f"parameter of shape {tuple(param.shape)}: placements {placements} shard it over mesh dims {shard_dims} of "
        f"a mesh of shape {tuple(mesh.shape)}; no existing process group holds exactly its pieces"
    )
