"""Which pieces of which named parameters each flat fp32 partition holds under DeepSpeed ZeRO.

Under ZeRO the client optimizer never sees the model's parameters.  DeepSpeed replaces its
``param_groups[g]["params"]`` by flat fp32 partitions:

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): one partition per param group,
  ``single_partition_of_fp32_groups[g]``, permanently installed in ``param_groups[g]["params"]``.
  Each rank holds a contiguous slice of the group's (padded) flattened parameters, flattened in
  ``round_robin_bit16_groups`` order at ``round_robin_bit16_offsets`` (read here; DeepSpeed's
  own ``param._hp_mapping`` addresses are wrong in 0.19.8 with ``round_robin_gradients``).
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): one partition per sub-group,
  ``fp32_partitioned_groups_flat[s]``, installed in ``param_groups[g]["params"]`` only while
  ``_optimizer_step(s)`` runs (``[]`` otherwise).  Every parameter is split on its own into
  ``ceil(numel / world)`` elements per rank (``param.ds_tensor``); the sub-group partition is
  the concatenation of those pieces, its position given by ``grad_position``; the last rank's
  piece of a parameter ends in padding.

:func:`zero_fragments` returns ``{flat partition tensor: [Fragment, ...]}`` (tensor identity
as key).  :func:`zero_setup` tells which configuration is in use and refuses, with a
``ValueError`` naming the config field, what the fragments cannot describe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Fragment", "ZeroSetup", "zero_fragments", "zero_setup"]


@dataclass(frozen=True)
class Fragment:
    """A contiguous run of one parameter's elements inside a flat partition."""

    name: str  # the parameter's name in model.named_parameters()
    start: int  # index of the fragment's first element in the flat partition tensor
    numel: int
    offset: int  # global flat (row-major) index, within the full parameter, of the fragment's first element
    shape: tuple[int, ...]  # the full parameter's shape


@dataclass(frozen=True)
class ZeroSetup:
    """The DeepSpeed configuration as far as the client optimizer is concerned."""

    stage: int  # 0 (no ZeRO), 1, 2 or 3
    offload_optimizer: str  # "none" or "cpu"
    offload_param: str  # "none" or "cpu" (ZeRO-3 only)
    dtype: str  # "fp32", "fp16" or "bf16": the dtype of the model's (low-precision) weights
    sub_group_size: int | None  # ZeRO-3 only

    @property
    def flat_partitions(self) -> bool:
        """Whether the client optimizer steps flat fp32 partitions instead of the parameters."""
        return self.stage in (1, 2, 3)


def _section(config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"DeepSpeed config field {key!r} must be a mapping, got {type(value).__name__}")
    return value


def _device(section: Mapping[str, Any]) -> str:
    device = section.get("device", "none") if section else "none"
    return str(getattr(device, "value", device) or "none").lower()


def _enabled(config: Mapping[str, Any], key: str) -> bool:
    section = config.get(key)
    if isinstance(section, Mapping):
        return bool(section.get("enabled", False))
    return bool(section)


def _config_dict(config_or_engine: Any) -> dict[str, Any]:
    if isinstance(config_or_engine, Mapping):
        return dict(config_or_engine)
    if isinstance(config_or_engine, str):
        import json

        with open(config_or_engine) as f:
            return json.load(f)
    ds_config = getattr(config_or_engine, "_config", None)  # DeepSpeedEngine
    if ds_config is not None and isinstance(getattr(ds_config, "_param_dict", None), Mapping):
        return dict(ds_config._param_dict)
    config = getattr(config_or_engine, "config", None)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(
        f"expected a DeepSpeed config dict, a path to one, or a DeepSpeedEngine, got {type(config_or_engine)}"
    )


def zero_setup(config_or_engine: Any, *, client_optimizer: bool = True) -> ZeroSetup:
    """Read the ZeRO configuration of a DeepSpeed config (dict or JSON path) or engine.

    Raises ``ValueError``, naming the config field at fault, for configurations in which the
    client optimizer (an online-merging optimizer passed to ``deepspeed.initialize(optimizer=...)``)
    would not be the one stepping every flat partition, or would step tensors that
    :func:`zero_fragments` cannot describe.  ``client_optimizer=True`` (default) means an optimizer
    object is, or will be, passed to ``deepspeed.initialize``.
    """
    config = _config_dict(config_or_engine)
    zero = _section(config, "zero_optimization")
    stage = int(zero.get("stage", 0) or 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config field 'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage}")

    if client_optimizer and config.get("optimizer"):
        opt_type = _section(config, "optimizer").get("type")
        raise ValueError(
            f"DeepSpeed config has an 'optimizer' section (type {opt_type!r}) while a client optimizer is passed "
            "to deepspeed.initialize: DeepSpeed would silently ignore one of the two. Remove the 'optimizer' "
            "section from the DeepSpeed config."
        )

    fp16, bf16 = _enabled(config, "fp16"), _enabled(config, "bf16") or _enabled(config, "bfloat16")
    if fp16 and bf16:
        raise ValueError("DeepSpeed config fields 'fp16.enabled' and 'bf16.enabled' are both true")
    dtype = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    if stage == 0 and dtype != "fp32":
        # DeepSpeed wraps the client optimizer in FP16_Optimizer / BF16_Optimizer, whose flat
        # fp32 groups are another layout than ZeRO's.
        raise ValueError(
            f"DeepSpeed config field 'zero_optimization.stage' is 0 with '{dtype}' enabled: the fp16/bf16 "
            "optimizer wrappers without ZeRO are not supported; use ZeRO stage 1, 2 or 3 (or fp32)"
        )

    offload_opt = _section(zero, "offload_optimizer")
    offload_par = _section(zero, "offload_param")
    opt_device, par_device = _device(offload_opt), _device(offload_par)
    if stage == 0 and (opt_device != "none" or par_device != "none"):
        raise ValueError(
            "DeepSpeed config field 'zero_optimization.offload_optimizer'/'offload_param' needs stage >= 1"
        )
    if opt_device not in ("none", "cpu"):
        raise ValueError(
            f"DeepSpeed config field 'zero_optimization.offload_optimizer.device' is {opt_device!r}: only 'none' "
            "and 'cpu' are supported (NVMe swaps the fp32 partitions and DeepSpeed's own optimizer states in "
            "and out; the online-merging state would not follow)"
        )
    if par_device not in ("none", "cpu"):
        raise ValueError(
            f"DeepSpeed config field 'zero_optimization.offload_param.device' is {par_device!r}: only 'none' "
            "and 'cpu' are supported"
        )
    ratio = float(offload_opt.get("ratio", 1.0)) if offload_opt else 1.0
    if opt_device != "none" and ratio < 1.0:
        raise ValueError(
            f"DeepSpeed config field 'zero_optimization.offload_optimizer.ratio' is {ratio}: partial offload "
            "(ratio < 1) requires DeepSpeedCPUAdam and steps the non-offloaded sub-groups with DeepSpeed's own "
            "backup torch.optim.AdamW instead of the client optimizer; use ratio 1.0"
        )
    if opt_device != "none" and client_optimizer and config.get("zero_force_ds_cpu_optimizer", True):
        raise ValueError(
            "DeepSpeed config field 'zero_force_ds_cpu_optimizer' must be false with "
            "'zero_optimization.offload_optimizer.device' = 'cpu' and a client optimizer: otherwise DeepSpeed "
            "refuses any optimizer but DeepSpeedCPUAdam/DeepSpeedCPULion (ZeRORuntimeException)"
        )
    for field in ("super_offload",):
        if offload_opt.get(field):
            raise ValueError(f"DeepSpeed config field 'zero_optimization.offload_optimizer.{field}' is not supported")
    if zero.get("elastic_checkpoint"):
        raise ValueError(
            "DeepSpeed config field 'zero_optimization.elastic_checkpoint' is not supported: elastic checkpoints "
            "bypass the client optimizer's state_dict()/load_state_dict() and cut every tensor state to the "
            "unpadded flat length"
        )
    if zero.get("zenflow"):
        raise ValueError(
            "DeepSpeed config field 'zero_optimization.zenflow' is not supported: ZenFlow steps its own "
            "CPU optimizer instead of the client optimizer"
        )
    if stage == 3 and int(zero.get("mics_shard_size", -1) or -1) > 0:
        raise ValueError("DeepSpeed config field 'zero_optimization.mics_shard_size' (MiCS) is not supported")
    sub_group_size = int(zero.get("sub_group_size", 1_000_000_000)) if stage == 3 else None
    return ZeroSetup(
        stage=stage,
        offload_optimizer=opt_device,
        offload_param=par_device,
        dtype=dtype,
        sub_group_size=sub_group_size,
    )


def _zero_optimizer_and_module(engine_or_zero_optimizer: Any) -> tuple[Any, Any]:
    obj = engine_or_zero_optimizer
    if hasattr(obj, "module") and hasattr(obj, "optimizer") and hasattr(obj, "zero_optimization_stage"):
        return obj.optimizer, obj.module  # DeepSpeedEngine
    return obj, getattr(obj, "module", None)


def _names(module: Any, zero_optimizer: Any, names: Mapping[torch.Tensor, str] | None = None) -> dict[int, str]:
    if names is not None:
        return {id(p): name for p, name in names.items()}
    if module is not None:
        return {id(p): name for name, p in module.named_parameters()}
    param_names = getattr(zero_optimizer, "param_names", None)  # stage 1/2: {param: name}
    if isinstance(param_names, Mapping) and param_names:
        return {id(p): name for p, name in param_names.items()}
    raise ValueError("cannot name the parameters: pass the DeepSpeedEngine (or module=...) rather than its optimizer")


def _empty(name: str, shape) -> Fragment:
    """A parameter of the partition's group of which this rank holds no element."""
    return Fragment(name=name, start=0, numel=0, offset=0, shape=tuple(shape))


def _name_of(names: dict[int, str], param: torch.Tensor) -> str:
    try:
        return names[id(param)]
    except KeyError:
        raise ValueError(
            f"a parameter of shape {tuple(getattr(param, 'ds_shape', param.shape))} stepped by the ZeRO optimizer "
            "is not among the module's named_parameters()"
        ) from None


def _stage_1_2(zero_optimizer: Any, names: dict[int, str]) -> dict[torch.Tensor, list[Fragment]]:
    if not all(hasattr(zero_optimizer, a) for a in ("round_robin_bit16_groups", "round_robin_bit16_offsets")):
        return _stage_1_2_from_hp_mapping(zero_optimizer, names)
    import deepspeed.comm as dist

    out: dict[torch.Tensor, list[Fragment]] = {}
    for g, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        # The group's flat buffer holds the parameters in round-robin order (the identity unless
        # round_robin_gradients), each at its recorded offset (parameter_alignment may pad between
        # them), padded at the end to a multiple of the world size; rank r holds
        # [r * partition_size, (r + 1) * partition_size).
        group = zero_optimizer.real_dp_process_group[g]
        partition_size = zero_optimizer.bit16_groups_flat[g].numel() // dist.get_world_size(group=group)
        partition_start = dist.get_rank(group=group) * partition_size
        partition_end = partition_start + partition_size
        metas = getattr(zero_optimizer, "round_robin_bit16_meta", None)
        params = zero_optimizer.round_robin_bit16_groups[g]
        metas = metas[g] if metas is not None else params  # shape/numel independent of offloaded .data
        fragments = []
        for param, meta, param_start in zip(params, metas, zero_optimizer.round_robin_bit16_offsets[g], strict=True):
            begin = max(param_start, partition_start)
            end = min(param_start + meta.numel(), partition_end)
            if end <= begin:
                fragments.append(_empty(_name_of(names, param), meta.shape))
                continue
            fragments.append(
                Fragment(
                    name=_name_of(names, param),
                    start=int(begin - partition_start),
                    numel=int(end - begin),
                    offset=int(begin - param_start),
                    shape=tuple(meta.shape),
                )
            )
        if any(f.start + f.numel > flat.numel() for f in fragments):
            raise AssertionError(f"fragments of group {g} overrun its flat partition of {flat.numel()} elements")
        out[flat] = fragments
    return out


def _stage_1_2_from_hp_mapping(zero_optimizer: Any, names: dict[int, str]) -> dict[torch.Tensor, list[Fragment]]:
    # Older DeepSpeed without round-robin offsets: DeepSpeed's own lp -> hp fragment addresses.
    # (With round_robin_gradients and no per-parameter padding, DeepSpeed 0.19.8 computes these
    # addresses in the original order although the flat buffer is in round-robin order.)
    out: dict[torch.Tensor, list[Fragment]] = {}
    for g, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        fragments = []
        for param in zero_optimizer.bit16_groups[g]:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None or mapping.hp_fragment_address.numel <= 0:  # none of it in this rank's partition
                fragments.append(_empty(_name_of(names, param), param.shape))
                continue
            hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
            fragments.append(
                Fragment(
                    name=_name_of(names, param),
                    start=int(hp.start),
                    numel=int(hp.numel),
                    offset=int(lp.start),
                    shape=tuple(param.shape),
                )
            )
        out[flat] = fragments
    return out


def _stage_3(zero_optimizer: Any, names: dict[int, str]) -> dict[torch.Tensor, list[Fragment]]:
    import deepspeed.comm as dist

    out: dict[torch.Tensor, list[Fragment]] = {}
    for s, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat):
        fragments = []
        for param in zero_optimizer.fp16_groups[s]:
            group_id, start, partition_numel = zero_optimizer.grad_position[zero_optimizer.get_param_id(param)]
            if group_id != s:
                raise AssertionError(f"grad_position of a parameter of sub-group {s} points to sub-group {group_id}")
            rank = dist.get_rank(group=zero_optimizer._get_param_partition_group(param))
            offset = rank * partition_numel
            numel = min(partition_numel, param.ds_numel - offset)
            if numel <= 0:  # this rank's piece of the parameter is all padding
                fragments.append(_empty(_name_of(names, param), param.ds_shape))
                continue
            fragments.append(
                Fragment(
                    name=_name_of(names, param),
                    start=int(start),
                    numel=int(numel),
                    offset=int(offset),
                    shape=tuple(param.ds_shape),
                )
            )
        out[flat] = fragments
    return out


def zero_fragments(
    engine_or_zero_optimizer: Any, module: Any = None, *, names: Mapping[torch.Tensor, str] | None = None
) -> dict[torch.Tensor, list[Fragment]]:
    """For every flat fp32 partition the client optimizer will step, the parameter fragments it holds.

    Keys are the partition tensors themselves (``optimizer.param_groups[g]["params"][0]`` during
    ``step()``); values list one fragment per parameter of the partition's group, in the group's
    order, which is the same on every rank: ``numel == 0`` where this rank holds none of the
    parameter (so that per-parameter collectives line up).  Elements of a partition not covered
    by any fragment are padding.  Names are ``names[param]`` when given, else those of
    ``module.named_parameters()`` (``engine.module`` when an engine is given).  The mapping is tied
    to tensor identity: rebuild it after anything that re-creates the partitions.
    """
    zero_optimizer, own_module = _zero_optimizer_and_module(engine_or_zero_optimizer)
    names = _names(module if module is not None else own_module, zero_optimizer, names)
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat") and hasattr(zero_optimizer, "grad_position"):
        return _stage_3(zero_optimizer, names)
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups") and hasattr(zero_optimizer, "bit16_groups"):
        return _stage_1_2(zero_optimizer, names)
    raise ValueError(
        f"{type(zero_optimizer).__name__} is not a DeepSpeed ZeRO stage 1/2/3 optimizer: the client optimizer "
        "steps the parameters themselves (set 'zero_optimization.stage' to 1, 2 or 3)"
    )
