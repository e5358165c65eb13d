"""Hugging Face ``Trainer`` glue: τ for the model being trained, and the optimizer built the way Trainer builds AdamW.

Works for every trainer built on ``transformers.Trainer`` (TRL's ``DPOTrainer``, ``KTOTrainer``, ...): pass
``optimizers=(build_optimizer(model, args, base_model=...), None)`` and Trainer makes the LR scheduler. Under
DeepSpeed Trainer ignores that argument; let Trainer build ours instead, which works with and without DeepSpeed:
``optimizer_cls_and_kwargs=trainer_optimizer(args, ...)`` or ``use_online_merging_optimizer(trainer, ...)``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from online_merging.distributed import is_dtensor
from online_merging.integrations.deepspeed import (
    bind_engine_at_train_begin,
    check_deepspeed_config,
    deepspeed_config_of,
    require_engine_steps,
)
from online_merging.merging import TaskVector, WeightsSource, canonical_name
from online_merging.optim import OnlineMergingAdam, OnlineMergingOptimizer, OnlineMergingSGD
from online_merging.optim.lora import is_lora
from online_merging.settings import MERGE_DEFAULTS

__all__ = [
    "OnlineMergingOptimizerFactory",
    "build_optimizer",
    "decay_parameter_names",
    "task_vector_for",
    "trainer_optimizer",
    "use_online_merging_optimizer",
]

OPTIMIZERS: dict[str, type[OnlineMergingOptimizer]] = {"adam": OnlineMergingAdam, "sgd": OnlineMergingSGD}


def task_vector_for(
    model: nn.Module,
    *,
    base_model: WeightsSource | None = None,
    task_vector: TaskVector | str | os.PathLike | None = None,
    sft_model: WeightsSource | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> TaskVector:
    """τ = θ_sft − θ_base for ``model``, or a saved τ checked against ``model``.

    ``base_model`` is a module, state dict, safetensors file/directory or Hub id; from disk it is read one
    tensor at a time and never built as a model. θ_sft is ``sft_model`` (in the same forms), else ``model``'s
    parameters as they are now: pass ``sft_model`` when they may not be the SFT weights any more (a Trainer resuming
    from a checkpoint loads its weights before it builds the optimizer). A base whose architecture, parameter names
    or shapes differ from ``model`` raises ``ValueError`` naming the first mismatch, before any training. A saved τ
    whose entry has another shape than the model's parameter of that name raises too; entries naming no parameter
    of the model are left to the optimizer, which warns about them (as it does for any τ).
    """
    if (base_model is None) == (task_vector is None):
        raise ValueError("pass exactly one of base_model (to compute τ = model − base) and task_vector (a saved τ)")
    if sft_model is not None and base_model is None:
        raise ValueError("sft_model is τ's SFT side: it goes with base_model, not with a saved task_vector")
    # loaded under ZeRO-3's zero.Init, or sharded by FSDP2: the SFT weights are read from where the model came from
    partitioned = any(hasattr(p, "ds_shape") or is_dtensor(p) for p in model.parameters())
    if base_model is not None:
        _check_same_architecture(model, base_model)
        if sft_model is None:
            sft_model = _sft_weights(model) if partitioned else _without_adapters(model)
        return TaskVector.from_models(base_model, sft_model, dtype=dtype)
    tau = task_vector if isinstance(task_vector, TaskVector) else TaskVector.load(task_vector)
    shapes = {
        canonical_name(n): getattr(p, "ds_shape", p.shape) for n, p in model.named_parameters(remove_duplicate=False)
    }
    for name, tensor in tau.items():
        if name in shapes and tensor.shape != shapes[name]:
            raise ValueError(
                f"task vector entry {name!r} has shape {tuple(tensor.shape)}, the model's has {tuple(shapes[name])}"
            )
    return tau


def _warn_moving_reference(trainer: Any, merge: str | None) -> None:
    """Warn when a LoRA run's reference is its policy with the adapter off, whose base weights the merge moves."""
    model, args = getattr(trainer, "model", None), trainer.args
    if merge is None or model is None or getattr(trainer, "ref_model", None) is not None:
        return
    if not any(is_lora(name) for name, _ in model.named_parameters()):
        return
    drift = (
        "this LoRA run's reference model is the policy with its adapter off, whose base weights online merging "
        "moves along τ: the reference would drift from the SFT model"
    )
    if hasattr(args, "precompute_ref_log_probs") and not args.precompute_ref_log_probs:
        warnings.warn(
            f"{drift}. Set precompute_ref_log_probs=True in the trainer's config (TRL then computes the reference "
            "log-probs once, before training)",
            stacklevel=3,
        )
    elif not hasattr(args, "precompute_ref_log_probs") and getattr(args, "beta", 0.0) > 0:  # GRPO, RLOO
        warnings.warn(f"{drift}, and the KL term (beta > 0) holds the policy near it, not near SFT", stacklevel=3)


def _without_adapters(model: nn.Module) -> nn.Module | dict[str, torch.Tensor]:
    """``model``, or its state dict less its LoRA tensors when it has some: a PEFT model's SFT side is its base."""
    state = model.state_dict()
    kept = {name: tensor for name, tensor in state.items() if not is_lora(name)}
    return model if len(kept) == len(state) else kept


def _sft_weights(model: nn.Module) -> str:
    """Where a model whose parameters ZeRO-3 partitioned at load time was loaded from: its SFT weights."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "")
    if not source:
        raise ValueError(
            "the model's parameters are partitioned by ZeRO-3 and it was not loaded from a checkpoint: pass "
            "task_vector= (a saved τ) instead of base_model="
        )
    return source


def _check_same_architecture(model: nn.Module, base_model: WeightsSource) -> None:
    """Compare ``model_type`` and ``architectures`` of the two configs where both are known."""
    ours = getattr(model, "config", None)
    theirs = getattr(base_model, "config", None)
    if theirs is None and isinstance(base_model, (str, os.PathLike)):
        config_file = Path(base_model) / "config.json"
        theirs = json.loads(config_file.read_text()) if config_file.is_file() else None
    if ours is None or theirs is None:
        return
    ours = ours.to_dict()
    theirs = theirs if isinstance(theirs, dict) else theirs.to_dict()
    for field in ("model_type", "architectures"):
        mine, base = ours.get(field), theirs.get(field)
        if mine is not None and base is not None and mine != base:
            raise ValueError(
                f"base model does not match the model being trained: config field {field!r} is "
                f"{base!r} in the base, {mine!r} in the model"
            )


def decay_parameter_names(model: nn.Module) -> set[str]:
    """The names Trainer applies weight decay to (not biases, not norms): Trainer's own rule."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # the method does not use self


def build_optimizer(
    model: nn.Module,
    args: Any = None,
    *,
    base_model: WeightsSource | None = None,
    task_vector: TaskVector | str | os.PathLike | None = None,
    sft_model: WeightsSource | None = None,
    optimizer: str = "adam",
    **settings: Any,
) -> OnlineMergingOptimizer:
    """An online-merging optimizer for ``model`` with Trainer's weight-decay groups.

    ``lr``, ``betas``, ``eps`` and ``weight_decay`` come from ``args`` (``TrainingArguments``, ``DPOConfig``, ...)
    when given; ``settings`` (``merge``, ``reserve_p``, ``alpha``, ``momentum``, ...) go to the optimizer and win
    over ``args``. τ comes from ``base_model`` (and ``sft_model``) or a saved ``task_vector`` (see
    :func:`task_vector_for`), unless ``merge=None``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {optimizer!r} (expected one of {sorted(OPTIMIZERS)})")
    # DeepSpeed (args.deepspeed, accelerate's DeepSpeed plugin): refuse configs where ours would not step
    zero = check_deepspeed_config(args)
    kwargs: dict[str, Any] = {}
    if args is not None:
        kwargs = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
        if optimizer == "adam":
            kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    kwargs.update(settings)
    weight_decay = kwargs.pop("weight_decay", 0.0)
    tau = None
    if kwargs.get("merge", MERGE_DEFAULTS["merge"]) is not None:
        tau = task_vector_for(model, base_model=base_model, task_vector=task_vector, sft_model=sft_model)
    decay = decay_parameter_names(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [(n, p) for n, p in trainable if n in decay], "weight_decay": weight_decay},
        {"params": [(n, p) for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]
    # module=model: τ entries of frozen parameters are expected, only names the model lacks are reported
    built = OPTIMIZERS[optimizer]([g for g in groups if g["params"]], task_vector=tau, module=model, **kwargs)
    if zero is not None and zero.flat_partitions:
        require_engine_steps(model, built)  # Trainer(optimizers=(built, None)) is ignored under DeepSpeed
    return built


class OnlineMergingOptimizerFactory:
    """An optimizer factory in the form ``Trainer(optimizer_cls_and_kwargs=(factory, kwargs))`` accepts.

    transformers calls ``OnlineMergingOptimizerFactory()(model, **kwargs)`` when Trainer creates its optimizer
    (under DeepSpeed: in ``deepspeed_init``, before ``deepspeed.initialize``); ``kwargs`` are
    :func:`build_optimizer`'s (``args``, ``base_model`` / ``task_vector``,
    ``optimizer``, ``merge``, ...). Build the pair with :func:`trainer_optimizer`.
    """

    def __call__(self, model: nn.Module, **kwargs: Any):
        return build_optimizer(model, **kwargs)


def trainer_optimizer(args: Any, **build_optimizer_kwargs: Any) -> tuple[type, dict[str, Any]]:
    """``optimizer_cls_and_kwargs`` for ``Trainer`` / TRL trainers: the way in that works under DeepSpeed (and
    without it)::

        trainer = DPOTrainer(model=model, args=args, ..., optimizer_cls_and_kwargs=trainer_optimizer(
            args, base_model="path/to/base", merge="ondare"))

    The DeepSpeed config is checked now (:func:`~online_merging.integrations.deepspeed.check_deepspeed_config`);
    the optimizer is built by Trainer, on its model, through :func:`build_optimizer`. Pass a saved
    ``task_vector`` (or a ``TaskVector``) rather than ``base_model`` to compute τ only once.
    """
    check_deepspeed_config(args)
    return OnlineMergingOptimizerFactory, {"args": args, **build_optimizer_kwargs}


def use_online_merging_optimizer(trainer: Any, **build_optimizer_kwargs: Any) -> Any:
    """Make ``trainer`` build the online-merging optimizer itself, the way that works under DeepSpeed (and without).

    For trainers that do not take ``optimizer_cls_and_kwargs`` (TRL 1.16's ``DPOTrainer``, ``KTOTrainer``)::

        trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
        use_online_merging_optimizer(trainer, base_model="path/to/base", merge="ondare")
        trainer.train()

    Sets ``trainer.optimizer_cls_and_kwargs`` to :func:`trainer_optimizer` of ``trainer.args`` (checking the
    DeepSpeed config now) and, under DeepSpeed, binds the optimizer to the engine's ZeRO optimizer when training
    begins; returns ``trainer``. Refuses a trainer given ``optimizers=(optimizer, ...)``. To resume from a
    checkpoint, also pass ``sft_model`` (the SFT weights' source): Trainer builds the optimizer after it loaded the
    checkpoint's weights into the model, which are not θ_sft.
    """
    if getattr(trainer, "optimizer", None) is not None:
        raise ValueError(
            "the trainer already has an optimizer (optimizers=(optimizer, ...)): build it without one, "
            "use_online_merging_optimizer makes Trainer build the online-merging optimizer"
        )
    trainer.optimizer_cls_and_kwargs = trainer_optimizer(trainer.args, **build_optimizer_kwargs)
    _warn_moving_reference(trainer, build_optimizer_kwargs.get("merge", MERGE_DEFAULTS["merge"]))
    if deepspeed_config_of(trainer.args) is not None:
        bind_engine_at_train_begin(trainer)
    return trainer
