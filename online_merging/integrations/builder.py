"""One trainer builder: a run's TRL trainer, its optimizer and callbacks, and ALLO's stages, from a
:class:`TrainSpec`; ``online-merging train`` (``integrations.run``) and the alignment-tax lab (``lab.runner``) both
train through it, each with its own model, data, TRL config and callbacks::

    spec = TrainSpec(optimizer="adam", merge_settings=MergeSettings(), base_model="base/", sft_model="sft/")
    trainer = build_trainer(spec, model, trl.DPOConfig(...), pairs, tokenizer)
    run_training(trainer)

A new trainer kind (GRPO, RLOO) is a ``TRAINERS`` entry, an adapter config a spec field, both handled here.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from online_merging._quiet import quiet_trl_training
from online_merging.settings import MergeSettings

__all__ = [
    "ONLINE_RL", "OPTIMIZERS", "TRAINERS", "TrainSpec", "build_trainer", "config_class", "key_neurons", "run_training",
    "save_run_model", "unlearn",
]  # fmt: skip

TRAINERS = {
    "dpo": ("DPOTrainer", "DPOConfig"), "kto": ("KTOTrainer", "KTOConfig"),
    "grpo": ("GRPOTrainer", "GRPOConfig"), "rloo": ("RLOOTrainer", "RLOOConfig"),
}  # fmt: skip
"""The kinds of trainer: each one's TRL trainer and config classes."""
ONLINE_RL = ("grpo", "rloo")
"""The trainers that sample completions and score them with reward functions (``TrainSpec.reward_funcs``)."""
OPTIMIZERS = ("adamw", "adam", "sgd")
"""``adamw``: the trainer's own optimizer (TRL's ``optim``); ``adam``, ``sgd``: OnlineMergingAdam/SGD."""
TRAINER_STATE = "trainer_state.json"
"""In a Trainer checkpoint: its step and log history."""


@dataclass(frozen=True)
class TrainSpec:
    """How a run trains, besides its model, data and TRL config: the trainer kind and its loss variants, the
    optimizer with its merge and τ's sources, and ALLO's stages. :meth:`of` reads it from a recipe or a lab run."""

    trainer: str = "dpo"  # one of TRAINERS
    optimizer: str = "adamw"  # one of OPTIMIZERS
    merge_settings: MergeSettings = field(default_factory=MergeSettings)  # with adam/sgd
    momentum: float = 0.0  # OnlineMergingSGD's
    base_model: str | None = None  # τ = sft_model − base_model (folders or Hub ids), when the settings merge
    sft_model: str | None = None  # the SFT weights' files: a resumed or unlearned model holds others
    task_vector: str | None = None  # a saved τ, instead of base_model and sft_model
    pairwise_normalized: bool = False  # DPO with PairwiseNormalizedDPOTrainer
    noisy_token_percentile: float = 0.0  # ALLO stage 3: DPO without the tokens of the top implicit rewards
    unlearn_steps: int = 0  # ALLO stage 2: NPO steps on the rejected responses before training (unlearn)
    npo_token_weights: str = "log_ratio"  # or "uniform" (plain NPO)
    neuron_k: float = 0.0  # ALLO: train only the top k fraction of neurons (key_neurons)
    neuron_scope: str = "global"  # or "layer"
    neuron_probe_steps: int = 20
    peft_config: Any = None  # a peft.LoraConfig: train LoRA adapters (TRL's peft_config), τ into their base weights
    reward_funcs: tuple = ()  # GRPO/RLOO: TRL reward functions (callables, or reward model ids)

    def __post_init__(self):
        if self.trainer not in TRAINERS:
            raise ValueError(f"Invalid trainer: {self.trainer!r} (expected one of {tuple(TRAINERS)})")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer: {self.optimizer!r} (expected one of {OPTIMIZERS})")
        if self.trainer in ONLINE_RL and not self.reward_funcs:
            raise ValueError(f"Invalid reward_funcs: empty (trainer {self.trainer!r} samples and scores completions)")
        if self.trainer not in ONLINE_RL and self.reward_funcs:
            raise ValueError(f"Invalid reward_funcs: trainer {self.trainer!r} takes none (GRPO and RLOO do)")
        if self.optimizer == "adamw" and (self.merge_settings.pull or self.neuron_k):
            what = "the pull toward SFT is" if self.merge_settings.pull else "key neurons are"
            raise ValueError(f"Invalid optimizer: 'adamw' ({what} OnlineMergingAdam's: optimizer='adam')")

    @classmethod
    def of(cls, config: Any, **values: Any) -> TrainSpec:
        """The spec of a run described by ``config`` (a ``RecipeArguments``, a lab ``RunConfig``): its fields of
        the names of this spec's and its ``merge_settings()``, ``values`` winning."""
        names = {item.name for item in fields(cls)} - {"merge_settings"}
        held = {name: getattr(config, name) for name in names if hasattr(config, name)}
        return cls(**{"merge_settings": config.merge_settings(), **held, **values})


def config_class(trainer: str) -> type:
    """The TRL config class of a kind of trainer (``DPOConfig`` for ``dpo``)."""
    import trl

    return getattr(trl, TRAINERS[trainer][1])


def key_neurons(spec: TrainSpec, model, pairs, tokenizer, args):
    """ALLO's key neurons of ``model``: the top ``spec.neuron_k`` fraction, located by a DPO probe of
    ``spec.neuron_probe_steps`` steps on ``pairs`` (on a copy of the model) at ``args``' learning rate, β, batch
    size and seed."""
    from online_merging.neurons import locate_key_neurons

    return locate_key_neurons(
        model, pairs, tokenizer, k=spec.neuron_k, scope=spec.neuron_scope, steps=spec.neuron_probe_steps,
        learning_rate=args.learning_rate, beta=args.beta, batch_size=args.per_device_train_batch_size, seed=args.seed,
    )  # fmt: skip


def build_trainer(spec: TrainSpec, model, args, dataset, tokenizer, *, neuron_masks=None, callbacks=()):
    """The TRL trainer of ``spec`` over ``model`` with ``args`` (its ``DPOConfig``/``KTOConfig``), its optimizer
    (:func:`_use_optimizer`) and ``callbacks``."""
    import trl

    trainer_cls, extra = getattr(trl, TRAINERS[spec.trainer][0]), {}
    if spec.pairwise_normalized:
        from online_merging.integrations.normalized_dpo import PairwiseNormalizedDPOTrainer

        trainer_cls = PairwiseNormalizedDPOTrainer
    if spec.noisy_token_percentile:
        from online_merging.integrations.allo_trainers import TokenWeightedDPOTrainer

        trainer_cls, extra = TokenWeightedDPOTrainer, {"noisy_token_percentile": spec.noisy_token_percentile}
    if spec.trainer in ONLINE_RL:
        extra["reward_funcs"] = list(spec.reward_funcs)
    if spec.peft_config is not None:
        extra["peft_config"] = spec.peft_config
        if spec.optimizer != "adamw" and spec.merge_settings.merge is not None and spec.trainer not in ONLINE_RL:
            args = copy.copy(args)  # the reference: the SFT model, not the adapter-off policy whose base τ moves
            args.precompute_ref_log_probs = True
    trainer = trainer_cls(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks), **extra
    )
    return _use_optimizer(trainer, spec, neuron_masks)


def save_run_model(trainer, output_dir: str) -> None:
    """Save the run's model in ``output_dir`` (Trainer's ``save_model``): an adapter run's merged into its base
    (``merge_and_unload``, in place), since online merging moved the base weights too; the adapters are gone then."""
    if hasattr(trainer.model, "merge_and_unload"):
        trainer.model = trainer.model.merge_and_unload()
    trainer.save_model(output_dir)


def unlearn(spec: TrainSpec, model, args, dataset, tokenizer, *, neuron_masks=None, callbacks=()) -> None:
    """ALLO stage 2: ``spec.unlearn_steps`` NPO steps on the rejected responses of ``dataset``, with the run's
    optimizer and neuron masks (a fresh optimizer state), saving nothing; ``args``' other settings."""
    from online_merging.integrations.allo_trainers import NPOTrainer

    stage = copy.copy(args)
    stage.max_steps, stage.save_strategy = spec.unlearn_steps, "no"
    stage.output_dir = str(Path(args.output_dir) / "unlearn")
    trainer = NPOTrainer(
        model=model, args=stage, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks),
        token_weights=spec.npo_token_weights,
    )  # fmt: skip
    run_training(_use_optimizer(trainer, spec, neuron_masks))


def run_training(trainer, resume_from_checkpoint: str | None = None) -> None:
    """``trainer.train()``, quietly (:func:`~online_merging._quiet.quiet_trl_training`); from a checkpoint at the
    run's last step (``max_steps``), its weights and state only: Trainer would take one step past ``max_steps``."""
    if resume_from_checkpoint is not None and _at_the_end(trainer.args, resume_from_checkpoint):
        from transformers.trainer_callback import TrainerState

        trainer._load_from_checkpoint(resume_from_checkpoint)
        trainer.state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / TRAINER_STATE))
        return
    with quiet_trl_training():
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)


def _at_the_end(args, checkpoint: str) -> bool:
    if args.max_steps <= 0:
        return False
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())["global_step"] >= args.max_steps


def _use_optimizer(trainer, spec: TrainSpec, neuron_masks):
    """``trainer`` with the online-merging optimizer of ``spec`` (built by Trainer, the way that also works under
    DeepSpeed), unless ``spec.optimizer`` is the trainer's own."""
    if spec.optimizer == "adamw":
        return trainer
    from online_merging.integrations.trainer import use_online_merging_optimizer

    settings: dict[str, Any] = {**asdict(spec.merge_settings), "optimizer": spec.optimizer}
    if spec.merge_settings.merge is not None:  # τ from the SFT model's files: the model may hold other weights
        settings |= {"base_model": spec.base_model, "sft_model": spec.sft_model, "task_vector": spec.task_vector}
    if spec.optimizer == "sgd":
        settings["momentum"] = spec.momentum
    if neuron_masks is not None:
        settings["neuron_mask"] = neuron_masks
    return use_online_merging_optimizer(trainer, **settings)
