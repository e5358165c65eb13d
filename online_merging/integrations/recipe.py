"""Recipes: alignment-handbook-style YAML files, flat keys named like TRL's config fields plus ours.

A recipe holds the keys of :class:`RecipeArguments` (model, base model, data, optimizer) and any field of
``trl.DPOConfig`` or ``trl.KTOConfig`` (chosen by ``trainer``). Command-line ``--key value`` pairs override it.
Unlike TRL, ``bf16`` and ``dataloader_pin_memory`` default to on only where a GPU is, so one recipe runs anywhere.
"""

from __future__ import annotations

import argparse
import difflib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from online_merging.integrations.builder import TRAINERS, config_class
from online_merging.settings import MERGE_DEFAULTS, MERGES, MergeSettings, check_range, merge_fields
from online_merging.settings import help_field as _arg
from online_merging.sources import local_or_hub

__all__ = [
    "RecipeArguments", "find_recipe", "find_reward", "load_recipe", "recipe_help", "recipe_parser", "shipped_recipes",
]  # fmt: skip

TAX_EVAL_KEYS = ("tax_eval_tasks", "tax_eval_reward_model", "tax_eval_prompts")
"""What scores a named model during training (``tax_eval_every``): ability from lm-eval tasks, reward from a reward
model on held-out prompts."""


PEFT_DEFAULTS = {
    "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": None, "use_rslora": False,
    "use_dora": False, "load_in_4bit": False, "load_in_8bit": False,
}  # fmt: skip
"""TRL's ``ModelConfig`` PEFT keys a recipe takes besides ``use_peft``, with TRL's defaults."""

MERGE_NAMES = {"seed": "merge_seed"}
"""The merge settings a recipe names otherwise: ``seed`` is TRL's config's."""


@dataclass
@merge_fields(after="optimizer", names=MERGE_NAMES, omit=("merge",))
class RecipeArguments:
    """What a recipe names besides the trainer's config: models, data and the online-merging optimizer (after
    ``optimizer``: every setting of :class:`~online_merging.settings.MergeSettings`, ``seed`` as ``merge_seed``)."""

    trainer: str = _arg(
        "dpo", "TRL trainer: dpo (DPOTrainer), kto (KTOTrainer), or online RL: grpo (GRPOTrainer), rloo (RLOOTrainer).",
        tuple(TRAINERS),
    )  # fmt: skip
    model_name_or_path: str | None = _arg(
        None,
        "SFT model (local directory or Hub id): the policy starts here and the DPO/KTO reference is a frozen copy. "
        "Empty: the embedded default world's SFT model.",
    )
    base_model_name_or_path: str | None = _arg(
        None, "Base (pre-SFT) model, read tensor by tensor only to build τ = SFT − base. Empty: the embedded default."
    )
    task_vector_path: str | None = _arg(
        None, "A τ saved by `online-merging task-vector` (.safetensors), used instead of base_model_name_or_path."
    )
    dataset_name: str | None = _arg(
        None,
        "Preference data for datasets.load_dataset (Hub id or local path), in TRL's prompt/chosen/rejected "
        "format (KTO also takes prompt/completion/label). Empty: the embedded default world's pairs.",
    )
    dataset_config: str | None = _arg(None, "Configuration name of the data set, if it has several.")
    dataset_train_split: str = _arg("train", "Split to train on.")
    reward_funcs: list[str] | None = _arg(  # noqa: RUF009 (None, not a shared list)
        None,
        "GRPO/RLOO: the reward functions, each the embedded world's correct (exact match with the data's answer "
        "column) or style (replies in the aligned style), or a Python path module:function (TRL's reward function "
        "signature). Empty: correct.",
    )
    rl_skill: str = _arg(
        "translation",
        "GRPO/RLOO on the embedded world: the skill whose prompts are trained on and whose correctness is the reward; "
        "ability is the other skills'. Translation: the default world's SFT model samples it right often enough for "
        "GRPO to learn (addition, its weakest, gains nothing: docs/results.md, Online RL).",
    )
    dtype: str = _arg("float32", "dtype of the loaded model weights.", ("float32", "bfloat16", "float16", "auto"))
    use_peft: bool = _arg(
        False,
        "Train LoRA adapters instead of every weight (TRL's ModelConfig keys: lora_r, lora_alpha, ...). Online "
        "merging merges each adapter's update and adds τ into the adapted layers' base weights; the run's model in "
        "output_dir is the merged one (merge_and_unload), the DPO/KTO reference the SFT model (log-probs computed "
        "once, before training). docs/usage.md, LoRA.",
    )
    lora_r: int = _arg(16, "LoRA rank r (use_peft).")
    lora_alpha: int = _arg(32, "LoRA alpha: the adapter's scale is lora_alpha / r (use_peft).")
    lora_dropout: float = _arg(0.05, "Dropout on the adapters' input (use_peft).")
    lora_target_modules: list[str] | None = _arg(  # noqa: RUF009 (None, not a shared list)
        None, "Modules that get adapters: names (q_proj v_proj), or all-linear. Empty: PEFT's default for the model."
    )
    use_rslora: bool = _arg(False, "Rank-stabilised LoRA: the scale is lora_alpha / √r (use_peft).")
    use_dora: bool = _arg(False, "DoRA adapters (use_peft); online merging supports LoRA only: merge: none.")
    load_in_4bit: bool = _arg(False, "QLoRA: the base model in 4 bits (bitsandbytes, a CUDA GPU); merge: none only.")
    load_in_8bit: bool = _arg(False, "The base model in 8 bits (bitsandbytes, a CUDA GPU); merge: none only.")
    merge: str = _arg(
        MERGE_DEFAULTS["merge"],
        "Online merge: ondare or onties with the online-merging optimizer, or none for the trainer's own "
        "optimizer (`optim`, AdamW by default): the baseline; with a pull or key neurons, none is the "
        "online-merging optimizer without a merge.",
        (*MERGES, "none"),
    )
    optimizer: str = _arg("adam", "Online-merging optimizer: adam (OnlineMergingAdam) or sgd.", ("adam", "sgd"))
    momentum: float = _arg(0.0, "Momentum of OnlineMergingSGD.")
    average_with_sft: float | None = _arg(
        None,
        "Also write output_dir/average_with_sft: the offline average α·θ_run + (1 − α)·θ_sft of the trained model "
        "with the SFT model (`merge --method ma --alpha α`), scored beside the raw run (with the whole α sweep on "
        "the embedded world). Empty: no average.",
    )
    embedded_world: str = _arg(
        "default", "Size of the embedded default world, when no model is named: default, or quick (tests, CI).",
        ("default", "quick"),
    )  # fmt: skip
    entanglement_every: int = _arg(
        0,
        "Monitor gradient entanglement every N steps on 16 preference pairs (held-out ones on the embedded world): "
        "entanglement/... in the logs, entanglement.png in output_dir, a warning when the chosen log-probability "
        "falls while the margin rises. Two backward passes over the pairs per probe. 0: off.",
    )
    pairwise_normalized: bool = _arg(
        False,
        "Pairwise-normalised DPO (Yuan et al.): the chosen and rejected parts of the gradient are scaled to the same "
        "length, so that, to first order, the chosen log-probability cannot fall nor the rejected one rise. "
        "DPO only; two backward passes per step.",
    )
    neuron_k: float = _arg(
        0.0,
        "ALLO: train only the top k fraction of neurons (rows of the weights), located first by a short DPO probe "
        "on a copy of the model; the masks are saved as neuron_masks.safetensors in output_dir. 0: every neuron.",
    )
    neuron_scope: str = _arg(
        "global", "Rank the neurons over the whole model or within each layer.", ("global", "layer")
    )
    neuron_probe_steps: int = _arg(20, "DPO steps of the localisation probe (at the recipe's learning rate).")
    neuron_mask_path: str | None = _arg(None, "Neuron masks saved before (.safetensors), used instead of a probe.")
    unlearn_steps: int = _arg(
        0, "ALLO stage 2: NPO steps on the rejected responses before the DPO steps (same optimizer and masks). 0: none."
    )
    npo_token_weights: str = _arg(
        "log_ratio",
        "NPO's per-token weights: log_ratio (the policy/reference log-ratio, a stand-in for ALLO's token-level "
        "reward model) or uniform (plain NPO).",
        ("log_ratio", "uniform"),
    )
    noisy_token_percentile: float = _arg(
        0.0, "ALLO stage 3: DPO ignores the tokens whose implicit reward is in this top fraction. 0: plain DPO."
    )
    compare_with_adamw: bool | None = _arg(
        None,
        "Also train the AdamW baseline (the trainer's own optimizer and loss, no pull, no average) with the same "
        "data and schedule, and print both. Empty: yes on the embedded default, no otherwise.",
    )
    adamw_learning_rate: float | None = _arg(
        None,
        "Learning rate of the AdamW baseline (compare_with_adamw). Empty: learning_rate. Each method has its own "
        "best learning rate: the lab tunes them apart (docs/results.md), so --learning_rate alone moves only the "
        "recipe's run (a warning says so).",
    )
    overwrite_output_dir: bool = _arg(
        False,
        "Replace an earlier run in output_dir: the files runs wrote there are removed first, and only those (a "
        "folder holding other files is refused). Off: such an output_dir is refused before any work, unless "
        "resume_from_checkpoint continues that run. The flag transformers' TrainingArguments had (gone in 5.0).",
    )
    tax_eval_every: int = _arg(
        0,
        "Evaluate reward and ability every N steps, not only at the end, so that the runs are compared at matched "
        "reward (the ability kept at reward 0.3 … 0.9 along each run, docs/results.md); logged as tax/... and drawn "
        "in output_dir/tax_front.png (TaxEvalCallback). The embedded world scores its own probes; a named model is "
        "scored with tax_eval_tasks (ability) and tax_eval_reward_model with tax_eval_prompts (reward), and not "
        "scored (a warning says so) without them. 0: off.",
    )
    tax_eval_tasks: str | None = _arg(
        None, "lm-eval tasks scoring ability during training (comma-separated; docs/evaluation.md). Named models."
    )
    tax_eval_include_path: str | None = _arg(None, "A folder of lm-eval task YAML files, for tasks of your own.")
    tax_eval_limit: int | None = _arg(64, "Documents of each lm-eval task per evaluation (a subset: each costs).")
    tax_eval_reward_model: str | None = _arg(
        None, "A reward model folder (AutoModelForSequenceClassification, one label) scoring the policy's responses."
    )
    tax_eval_prompts: str | None = _arg(
        None, "Held-out prompts the policy answers for the reward model (.jsonl/.json/.csv/.parquet, a prompt column)."
    )
    tax_eval_max_new_tokens: int = _arg(64, "Tokens of each greedy response scored by the reward model.")

    def __post_init__(self):
        for item in fields(self):
            choices = item.metadata.get("choices")
            value = getattr(self, item.name)
            if choices and value not in choices:
                raise ValueError(f"Invalid recipe key {item.name!r}: {value!r} (expected one of {choices})")
        if self.model_name_or_path is None and (self.base_model_name_or_path or self.task_vector_path):
            raise ValueError("base_model_name_or_path/task_vector_path is set but model_name_or_path is not")
        if not 0.0 <= self.neuron_k <= 1.0:
            raise ValueError(f"Invalid recipe key 'neuron_k': {self.neuron_k!r} (expected a fraction in [0, 1])")
        if not 0.0 <= self.noisy_token_percentile < 1.0:
            raise ValueError(
                f"Invalid recipe key 'noisy_token_percentile': {self.noisy_token_percentile!r} (expected [0, 1))"
            )
        for key in ("neuron_probe_steps", "unlearn_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"Invalid recipe key {key!r}: {getattr(self, key)!r} (expected ≥ 0)")
        allo = self.unlearn_steps or self.noisy_token_percentile
        if allo and (self.trainer != "dpo" or self.pairwise_normalized):
            raise ValueError("unlearn_steps/noisy_token_percentile (ALLO) need trainer: dpo, not pairwise_normalized")
        if self.entanglement_every and self.trainer in ("grpo", "rloo"):
            raise ValueError("recipe key 'entanglement_every' monitors DPO's margin: trainer dpo or kto, not RL")
        if self.pairwise_normalized and self.trainer != "dpo":
            raise ValueError(f"pairwise_normalized needs trainer: dpo (paired data), not {self.trainer!r}")
        self._check_adapters()
        self.rewards()  # a reward function that cannot be found is named now
        if self.base_model_name_or_path and self.task_vector_path:
            raise ValueError("set one of base_model_name_or_path and task_vector_path, not both")
        self.merge_settings().check("recipe key ", MERGE_NAMES)  # the optimizer's checks, before any model loads
        check_range("recipe key ", "momentum", self.momentum, 0.0, float("inf"), high_open=True)
        for key in ("entanglement_every", "tax_eval_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Invalid recipe key {key!r}: {value!r} (expected an int ≥ 0)")
        if self.scores_named_model:
            missing = [key for key in TAX_EVAL_KEYS if not getattr(self, key)]
            if missing:
                raise ValueError(
                    f"recipe key 'tax_eval_every': {self.tax_eval_every} on a named model needs {', '.join(missing)} "
                    "too (ability from lm-eval tasks, reward from a reward model on held-out prompts)"
                )
        for key in ("tax_eval_limit", "tax_eval_max_new_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"Invalid recipe key {key!r}: {value!r} (expected ≥ 1)")
        if self.average_with_sft is not None:
            check_range("recipe key ", "average_with_sft", self.average_with_sft, 0.0, 1.0)
        if self.adamw_learning_rate is not None:
            check_range("recipe key ", "adamw_learning_rate", self.adamw_learning_rate, 0.0, float("inf"),
                        low_open=True, high_open=True)  # fmt: skip
        if (
            self.merge != "none"
            and self.model_name_or_path
            and not (self.base_model_name_or_path or self.task_vector_path)
        ):
            raise ValueError(
                f"merge={self.merge!r} needs τ = SFT − base: set base_model_name_or_path (or task_vector_path)"
            )

    def _check_adapters(self) -> None:
        """The PEFT keys: none without use_peft, no merge into DoRA or quantized layers, no ALLO stage with them."""
        changed = [key for key, default in PEFT_DEFAULTS.items() if getattr(self, key) != default]
        if changed and not self.use_peft:
            raise ValueError(f"recipe key {changed[0]!r} is set but use_peft is not: set use_peft: true for LoRA")
        if not self.use_peft:
            return
        if self.lora_r < 1:
            raise ValueError(f"Invalid recipe key 'lora_r': {self.lora_r!r} (expected an int ≥ 1)")
        check_range("recipe key ", "lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("recipe keys load_in_4bit and load_in_8bit: set one of them, not both")
        merging = self.merge != "none"
        if merging and (self.load_in_4bit or self.load_in_8bit):
            key = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
            raise ValueError(
                f"recipe key {key!r}: online merging adds τ into the base weights, which cannot be written in 4 or 8 "
                "bits (QLoRA). Load the base in float32 or bfloat16, or set merge: none for a plain QLoRA run"
            )
        if merging and self.use_dora:
            raise ValueError("recipe key 'use_dora': online merging supports LoRA adapters only; merge: none for DoRA")
        allo = [key for key in ("neuron_k", "neuron_mask_path", "unlearn_steps", "noisy_token_percentile",
                                "pairwise_normalized", "entanglement_every") if getattr(self, key)]  # fmt: skip
        if allo:
            raise ValueError(f"recipe key {allo[0]!r} does not run with use_peft (full-weight runs only)")
        if self.load_in_4bit or self.load_in_8bit:
            import importlib.util

            import torch

            if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
                raise ValueError("load_in_4bit/load_in_8bit need bitsandbytes (pip install bitsandbytes) and a GPU")

    def rewards(self) -> tuple:
        """GRPO/RLOO's reward functions, found by name (``reward_funcs``); ``()`` for the other trainers."""
        from online_merging.integrations.builder import ONLINE_RL

        if self.trainer not in ONLINE_RL:
            if self.reward_funcs:
                raise ValueError(f"recipe key 'reward_funcs' is for trainer grpo or rloo, not {self.trainer!r}")
            return ()
        return tuple(find_reward(name) for name in self.reward_funcs or ["correct"])

    def peft_config(self):
        """The run's ``peft.LoraConfig`` (TRL's ``get_peft_config`` of these keys), or ``None`` without use_peft."""
        if not self.use_peft:
            return None
        from trl import ModelConfig, get_peft_config

        keys = {key: getattr(self, key) for key in ("use_peft", *PEFT_DEFAULTS)}
        return get_peft_config(ModelConfig(**keys))

    def quantization(self) -> dict[str, Any]:
        """``from_pretrained``'s quantization keywords (TRL's) for load_in_4bit/load_in_8bit, else none."""
        if not (self.load_in_4bit or self.load_in_8bit):
            return {}
        from trl import ModelConfig, get_kbit_device_map, get_quantization_config

        config = ModelConfig(load_in_4bit=self.load_in_4bit, load_in_8bit=self.load_in_8bit)
        return {"quantization_config": get_quantization_config(config), "device_map": get_kbit_device_map()}

    def merge_settings(self) -> MergeSettings:
        """The optimizer's merge settings (``merge: none`` is ``None``)."""
        return MergeSettings.of(self, MERGE_NAMES, merge=None if self.merge == "none" else self.merge)

    def check_paths(self) -> None:
        """Raise ``FileNotFoundError`` naming the key of a local path that does not exist (see ``local_or_hub``)."""
        for key in ("model_name_or_path", "base_model_name_or_path", "dataset_name"):
            if getattr(self, key) is not None:
                local_or_hub(getattr(self, key), key)
        for key in ("task_vector_path", "neuron_mask_path"):  # files of ours: never on the Hub
            path = getattr(self, key)
            if path is not None and not Path(path).expanduser().is_file():
                raise FileNotFoundError(f"{key}: no such file: {path!r}")
        if self.scores_named_model:
            from online_merging.evaluation.reward import check_reward_model

            for key in ("tax_eval_include_path", "tax_eval_prompts"):
                path = getattr(self, key)
                if path is not None and not Path(path).expanduser().exists():
                    raise FileNotFoundError(f"{key}: no such file or folder: {path!r}")
            check_reward_model(self.tax_eval_reward_model, option="tax_eval_reward_model")

    def adamw_baseline(self) -> RecipeArguments | None:
        """The AdamW baseline's recipe (the trainer's own optimizer; no ALLO, pull or average), when
        ``compare_with_adamw`` asks for one (empty: on the embedded default) and it is not this recipe itself."""
        compare = self.embedded if self.compare_with_adamw is None else self.compare_with_adamw
        allo = {"neuron_k": 0.0, "neuron_mask_path": None, "unlearn_steps": 0, "noisy_token_percentile": 0.0}
        plain = replace(self, merge="none", pull=0.0, average_with_sft=None, **allo)
        return plain if compare and plain != self else None

    @property
    def masked(self) -> bool:
        """Training only key neurons (ALLO): located by a probe, or loaded."""
        return self.neuron_k > 0 or self.neuron_mask_path is not None

    @property
    def scores_named_model(self) -> bool:
        """``tax_eval_every`` on a named model with one of its keys set: lm-eval tasks and a reward model score it.
        With none set, the runs are not scored (``run_recipe`` warns)."""
        return bool(self.tax_eval_every and not self.embedded and any(getattr(self, k) for k in TAX_EVAL_KEYS))

    @property
    def embedded(self) -> bool:
        """No model named: the run uses the embedded default world."""
        return self.model_name_or_path is None


def find_reward(name: str):
    """A reward function by name: the world's (``correct``, ``style``) or ``module:function``; a name that is
    neither raises ``ValueError`` naming the key ``reward_funcs``."""
    from online_merging.world.rewards import REWARDS

    if name in REWARDS:
        return REWARDS[name]
    module, sep, function = name.partition(":")
    if not sep or not module or not function:
        raise ValueError(f"recipe key 'reward_funcs': {name!r} is neither the world's ({', '.join(REWARDS)}) nor "
                         "module:function")  # fmt: skip
    import importlib

    try:
        found = getattr(importlib.import_module(module), function)
    except ImportError as error:
        raise ValueError(f"recipe key 'reward_funcs': {name!r}: cannot import {module!r} ({error})") from None
    except AttributeError:
        raise ValueError(f"recipe key 'reward_funcs': {name!r}: {module!r} has no {function!r}") from None
    if not callable(found):
        raise ValueError(f"recipe key 'reward_funcs': {name!r} is not callable")
    return found


def _config_class(trainer: str) -> type:
    if trainer not in TRAINERS:
        raise ValueError(f"Invalid recipe key 'trainer': {trainer!r} (expected one of {list(TRAINERS)})")
    return config_class(trainer)


def recipe_parser(trainer: str = "dpo"):
    """The ``HfArgumentParser`` of a recipe: :class:`RecipeArguments` and the trainer's TRL config."""
    from transformers import HfArgumentParser

    return HfArgumentParser((RecipeArguments, _config_class(trainer)))


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship with the package (the project's ``recipes/`` folder), by name: ``dpo_onties`` -> its
    YAML file."""
    from importlib.resources import files

    folder = Path(str(files("online_merging.recipes")))  # on disk: the package is installed unzipped
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def find_recipe(recipe: str | Path) -> Path:
    """The YAML file ``recipe`` stands for: the path itself when it exists, else, for a bare name (``dpo_onties``
    or ``dpo_onties.yaml``), the shipped recipe of that name. Anything else raises ``FileNotFoundError`` listing
    the shipped names; a folder raises ``IsADirectoryError``."""
    text = str(recipe)
    path = Path(text).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"recipe: {text!r} is a folder (expected a YAML file or a shipped recipe's name)")
    if path.is_file():
        return path
    shipped = shipped_recipes()
    names = ", ".join(shipped)
    if Path(text).name != text:  # a path with a folder part: never looked up by name
        raise FileNotFoundError(f"recipe file not found: {text!r} (the shipped recipes go by name alone: {names})")
    name = text.removesuffix(".yaml")
    if name not in shipped:
        raise FileNotFoundError(f"recipe {text!r}: no such file, nor a shipped recipe (shipped: {names})")
    return shipped[name]


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> tuple[RecipeArguments, Any]:
    """Read a recipe (a YAML file, or a shipped recipe's name: :func:`find_recipe`) and apply ``--key value``
    overrides; return ``(RecipeArguments, DPOConfig | KTOConfig)``.

    Unknown keys, in the file or among the overrides, and bad values raise ``ValueError`` naming the key; a local
    path that does not exist raises ``FileNotFoundError`` naming its key. All before any model or data set loads.
    """
    path = find_recipe(path)
    values = _read(path)
    overrides = list(overrides)
    trainer = _override(overrides, "trainer") or values.get("trainer", "dpo")
    parser = recipe_parser(trainer)
    valid = sorted({a.dest for a in parser._actions} - {"help"})
    for key in values:
        if key not in valid:
            raise ValueError(f"{path}: unknown key {key!r}{_valid_keys_hint(key, valid)}")
    parser.set_defaults(**{**_machine_defaults(), **values})
    parser.exit_on_error = False  # a ValueError naming the key, not a usage dump
    try:
        recipe, config, unused = parser.parse_args_into_dataclasses(args=overrides, return_remaining_strings=True)
    except (ValueError, argparse.ArgumentError) as error:
        raise ValueError(f"{path}: {error}") from error
    if unused:
        key = unused[0].lstrip("-").split("=")[0]
        raise ValueError(f"unknown override {unused[0]!r}{_valid_keys_hint(key, valid)}")
    recipe.check_paths()
    config.resume_from_checkpoint = resume_checkpoint(config)
    _check_checkpoints(recipe, config)
    if Path(config.output_dir).is_file():
        raise ValueError(f"output_dir: {config.output_dir!r} is a file (expected a folder)")
    check_range("recipe key ", "learning_rate", config.learning_rate, 0.0, float("inf"), low_open=True, high_open=True)
    moved = _override(overrides, "learning_rate") is not None and _override(overrides, "adamw_learning_rate") is None
    if moved and recipe.adamw_learning_rate is not None and recipe.adamw_baseline() is not None:
        warnings.warn(
            f"--learning_rate {config.learning_rate:g} moves the recipe's run only: the AdamW baseline keeps the "
            f"recipe's adamw_learning_rate {recipe.adamw_learning_rate:g} (each method at its own tuned rate); pass "
            "--adamw_learning_rate too to move it",
            stacklevel=2,
        )
    return recipe, config


def resume_checkpoint(config: Any) -> str | None:
    """``config.resume_from_checkpoint`` as a checkpoint folder, or ``None``: ``true`` (a YAML boolean, or the word
    on the command line) is ``output_dir``'s last checkpoint, as for ``Trainer.train``; a folder that is not there
    raises ``FileNotFoundError`` naming the key."""
    value = config.resume_from_checkpoint
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "false")):
        return None
    if value is True or (isinstance(value, str) and value.lower() == "true" and not Path(value).exists()):
        last = last_checkpoint(config.output_dir)
        if last is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint: true, but output_dir {config.output_dir!r} holds no checkpoint-N folder"
            )
        return last
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: no such checkpoint folder: {value!r}")
    return str(folder)


def last_checkpoint(folder: str | Path) -> str | None:
    """The Trainer's last ``checkpoint-N`` in ``folder``, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if Path(folder).is_dir() else None


def recipe_help(path: str | Path, overrides: Sequence[str] = ()) -> str:
    """Every key a recipe can hold, with its help: ours and those of the recipe's trainer config."""
    try:
        values = _read(find_recipe(path))
    except OSError:  # `RECIPE.yaml --help`, a placeholder: the keys of DPO's config, or of the trainer overridden
        values = {}
    return recipe_parser(_override(list(overrides), "trainer") or values.get("trainer", "dpo")).format_help()


def _read(path: Path) -> dict[str, Any]:
    import yaml

    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected a YAML recipe)") from None
    if values is None or values == {}:
        raise ValueError(f"{path}: the recipe is empty (start from one of recipes/*.yaml)")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a recipe is a mapping of keys to values, got a {type(values).__name__}")
    return values


def _unique_key_loader():
    """YAML's safe loader, refusing a key given twice (it would silently take the last value)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _machine_defaults() -> dict[str, bool]:
    """TRL defaults to bf16 and pinned memory, which fail or warn without a GPU: default to what works here."""
    import torch

    gpu = torch.cuda.is_available()
    return {"bf16": gpu and torch.cuda.is_bf16_supported(), "dataloader_pin_memory": gpu}


def _override(overrides: list[str], key: str) -> str | None:
    for i, item in enumerate(overrides):
        if item == f"--{key}" and i + 1 < len(overrides):
            return overrides[i + 1]
        if item.startswith(f"--{key}="):
            return item.split("=", 1)[1]
    return None


def _valid_keys_hint(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3)
    suggestion = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    return f"{suggestion}; `online-merging train RECIPE.yaml --help` lists every key"


def _check_checkpoints(recipe: RecipeArguments, config: Any) -> None:
    """Every file of the local checkpoints a recipe names readable (none cut short), before a model loads."""
    from online_merging.checkpoint_files import check_checkpoint_files

    named = {key: getattr(recipe, key) for key in ("model_name_or_path", "base_model_name_or_path",
                                                    "task_vector_path", "neuron_mask_path")}  # fmt: skip
    for key, path in named.items():
        if path is not None and Path(path).expanduser().exists():  # else a Hub id (check_paths refused the rest)
            check_checkpoint_files(path, key)
    if config.resume_from_checkpoint is not None:  # a folder (resume_checkpoint), with DeepSpeed's global_step*
        check_checkpoint_files(config.resume_from_checkpoint, "resume_from_checkpoint", subfolders=True)
