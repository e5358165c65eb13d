"""DeepSpeed under HF ``Trainer`` / TRL: refuse the setups in which the online-merging optimizer would not be the one
the engine steps, and tell it which ZeRO optimizer steps it.

What transformers 5.23 + accelerate 1.15 do with a client optimizer under DeepSpeed (``TrainingArguments(
deepspeed=...)`` or ``accelerate launch`` with a DeepSpeed config), checked in ``tests/test_integrations_deepspeed.py``:

* ``Trainer(optimizers=(optimizer, None))`` is **silently ignored**: ``deepspeed_init`` sets ``trainer.optimizer =
  None`` and calls ``trainer.create_optimizer()``, which builds the default AdamW (or the class of
  ``optimizer_cls_and_kwargs``). Setting ``trainer.optimizer`` before ``train()`` is discarded the same way.
  :func:`~online_merging.integrations.trainer.build_optimizer` therefore arms a check (:func:`require_engine_steps`)
  that raises at the first training forward pass if DeepSpeed was set up with another optimizer.
* ``Trainer(optimizer_cls_and_kwargs=...)`` works, unless the DeepSpeed config has an ``optimizer`` section (then
  Trainer hands DeepSpeed a ``DummyOptim`` and DeepSpeed builds its own): the way in is
  :func:`~online_merging.integrations.trainer.trainer_optimizer` or
  :func:`~online_merging.integrations.trainer.use_online_merging_optimizer`.
* With ``zero_optimization.offload_optimizer.device`` set, accelerate replaces any client optimizer by
  ``DeepSpeedCPUAdam`` (``map_pytorch_optim_to_deepspeed``) unless ``"zero_force_ds_cpu_optimizer": false``.
* DeepSpeed refuses an untested client optimizer under ZeRO without ``zero_allow_untested_optimizer``; Trainer and
  accelerate set it themselves (a raw ``deepspeed.initialize`` needs it in the config).

:func:`check_deepspeed_config` refuses, naming the config field, every configuration in which the client optimizer
would not step (plus what :func:`online_merging.distributed.zero.zero_setup` cannot describe).
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

from torch import nn

from online_merging.distributed.zero import ZeroSetup, zero_setup

__all__ = [
    "bind_engine",
    "bind_engine_at_train_begin",
    "check_deepspeed_config",
    "deepspeed_config_of",
    "require_engine_steps",
]


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def _config_from_accelerate_env() -> dict[str, Any] | None:
    """The DeepSpeed config ``accelerate launch`` passes to the processes through the environment, if any."""
    if not _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED")):
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path and path != "none":
        with open(path) as f:
            return json.load(f)
    # no config file: accelerate's DeepSpeedPlugin builds the config from these fields (it cannot carry
    # zero_force_ds_cpu_optimizer, so an offloading config without a file is refused below)
    return {
        "zero_optimization": {
            "stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2)),
            "offload_optimizer": {"device": os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")},
            "offload_param": {"device": os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")},
        }
    }


def _plugin_config(plugin: Any) -> dict[str, Any] | None:
    config = getattr(plugin, "deepspeed_config", None)  # accelerate DeepSpeedPlugin
    if isinstance(config, Mapping):
        return dict(config)
    hf_config = getattr(getattr(plugin, "hf_ds_config", None), "config", None)
    return dict(hf_config) if isinstance(hf_config, Mapping) else None


def deepspeed_config_of(args_or_config: Any = None) -> dict[str, Any] | None:
    """The DeepSpeed config in use, or ``None`` when DeepSpeed is not.

    ``args_or_config``: ``TrainingArguments`` (or ``DPOConfig``, ...: its ``deepspeed_plugin``, else its
    ``deepspeed`` field, a dict or a JSON path), an accelerate ``DeepSpeedPlugin``, a config dict or JSON path, or
    ``None``. Without a config there, the one of an initialised accelerate state or of ``accelerate launch``
    (``ACCELERATE_USE_DEEPSPEED`` and ``ACCELERATE_DEEPSPEED_*`` in the environment) is used.
    """
    if isinstance(args_or_config, Mapping):
        return dict(args_or_config)
    if isinstance(args_or_config, (str, os.PathLike)):
        with open(args_or_config) as f:
            return json.load(f)
    if args_or_config is not None:
        config = _plugin_config(args_or_config)  # a DeepSpeedPlugin itself
        if config is None:
            config = _plugin_config(getattr(args_or_config, "deepspeed_plugin", None))  # TrainingArguments
        if config is None:
            deepspeed = getattr(args_or_config, "deepspeed", None)
            if deepspeed:
                return deepspeed_config_of(deepspeed)
        if config is not None:
            return config
    try:
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state:  # initialised: do not create it here
            config = _plugin_config(getattr(AcceleratorState(), "deepspeed_plugin", None))
            if config is not None:
                return config
    except ImportError:
        pass
    return _config_from_accelerate_env()


def check_deepspeed_config(args_or_config: Any = None) -> ZeroSetup | None:
    """Refuse, before training, a DeepSpeed setup in which the online-merging optimizer would not be stepped.

    Returns ``None`` when DeepSpeed is not in use (see :func:`deepspeed_config_of` for what is read), else the
    :class:`~online_merging.distributed.zero.ZeroSetup`. Raises ``ValueError`` naming the config field for: an
    ``optimizer`` section (Trainer would hand DeepSpeed a ``DummyOptim`` and DeepSpeed build its own optimizer);
    ``zero_optimization.offload_optimizer`` without ``"zero_force_ds_cpu_optimizer": false`` (accelerate would swap
    the optimizer for ``DeepSpeedCPUAdam``); partial offload (``ratio`` < 1), NVMe offload, ZenFlow, MiCS, elastic
    checkpoints and fp16/bf16 without ZeRO (see :func:`~online_merging.distributed.zero.zero_setup`).
    """
    config = deepspeed_config_of(args_or_config)
    if config is None:
        return None
    if not isinstance(config.get("zero_optimization"), Mapping):
        raise ValueError(
            "DeepSpeed config field 'zero_optimization' is missing: accelerate requires it (set its 'stage')"
        )
    stage = config["zero_optimization"].get("stage", 0)
    if stage == "auto":
        raise ValueError("DeepSpeed config field 'zero_optimization.stage' is 'auto': set 0, 1, 2 or 3")
    return zero_setup(config, client_optimizer=True)


def _inner_optimizers(optimizer: Any):
    """``optimizer``, then what it wraps: accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> the client one."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        yield optimizer
        optimizer = getattr(optimizer, "optimizer", None)


def engine_client_optimizer(engine_or_optimizer: Any) -> Any:
    """The optimizer a DeepSpeed engine (or accelerate's wrapper of its optimizer) finally steps."""
    from online_merging.optim import OnlineMergingOptimizer

    start = getattr(engine_or_optimizer, "optimizer", engine_or_optimizer)
    chain = list(_inner_optimizers(start))
    ours = [o for o in chain if isinstance(o, OnlineMergingOptimizer)]
    return ours[0] if ours else (chain[-1] if chain else None)


def bind_engine(engine_or_optimizer: Any) -> Any:
    """Bind the online-merging optimizer a DeepSpeed engine steps to the ZeRO optimizer stepping it; returns that ZeRO
    optimizer, or None when there is none (no ZeRO, or the engine steps another optimizer).

    Call it after ``deepspeed.initialize`` (``bind_engine(engine)``; accelerate's wrapper of the engine's optimizer
    works too). Without it, our optimizer finds the ZeRO optimizer on the call stack at its first step.
    """
    from online_merging.optim import OnlineMergingOptimizer
    from online_merging.optim.pieces import bind_zero_optimizer, is_zero_optimizer_of

    for outer, inner in pairwise(_inner_optimizers(engine_or_optimizer)):
        if isinstance(inner, OnlineMergingOptimizer) and is_zero_optimizer_of(outer, inner):
            bind_zero_optimizer(inner, outer)
            return outer
    return None


def bind_engine_at_train_begin(trainer: Any) -> None:
    """Bind, when ``trainer`` starts training, the optimizer it built to the ZeRO optimizer of its DeepSpeed engine
    (:func:`bind_engine`); ``deepspeed.initialize`` runs inside ``trainer.train()``, before that."""
    from transformers import TrainerCallback

    trainer_ref = weakref.ref(trainer)  # the trainer holds the callback

    class BindEngine(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            bind_engine(trainer_ref().model_wrapped)

    trainer.add_callback(BindEngine())


_GUARDED = "_online_merging_deepspeed_guard"


def require_engine_steps(model: nn.Module, optimizer: Any) -> None:
    """Raise at ``model``'s first training forward pass if DeepSpeed ZeRO was set up with another optimizer.

    Under ZeRO (stage 1-3) ``deepspeed.initialize(optimizer=ours)`` replaces our param groups' parameters by flat
    fp32 partitions (stage 1/2) or empties them (stage 3). If, when the model first runs in training mode with
    gradients enabled, a group still holds one of the model's own parameters, DeepSpeed is stepping another
    optimizer (Trainer built its AdamW in place of ``Trainer(optimizers=(ours, None))``): ``RuntimeError``.
    """
    own = {id(p) for g in optimizer.param_groups for p in g["params"]}
    optimizer_ref = weakref.ref(optimizer)
    handle = None

    def check(module: nn.Module, args: Any) -> None:
        import torch

        if not module.training or not torch.is_grad_enabled():
            return
        opt = optimizer_ref()
        if opt is not None and any(id(p) in own for g in opt.param_groups for p in g["params"]):
            raise RuntimeError(
                f"DeepSpeed is training the model with another optimizer than the {type(opt).__name__} built for "
                "it: no online merging would happen. Under DeepSpeed, transformers' Trainer ignores "
                "Trainer(optimizers=(optimizer, None)) (and a later trainer.optimizer = ...) and builds its own; "
                "pass optimizer_cls_and_kwargs=online_merging.integrations.trainer_optimizer(args, ...) "
                "instead (same keyword arguments as build_optimizer)"
            )
        handle.remove()
        if getattr(module, _GUARDED, None) is handle:
            delattr(module, _GUARDED)

    previous = getattr(model, _GUARDED, None)
    if previous is not None:  # the latest optimizer built for this model is the one that must be stepped
        previous.remove()
    handle = model.register_forward_pre_hook(check)
    setattr(model, _GUARDED, handle)
