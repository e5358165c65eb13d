"""Run a recipe: load the SFT model, τ and the data, train with TRL's DPO/KTO trainer, evaluate, summarise."""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from online_merging._files import (
    check_not_input,
    check_run_folder,
    record_run,
    staged_file,
    start_run_folder,
    write_text,
)
from online_merging.integrations.builder import (
    ONLINE_RL,
    TrainSpec,
    build_trainer,
    key_neurons,
    run_training,
    save_run_model,
    unlearn,
)
from online_merging.integrations.recipe import RecipeArguments, last_checkpoint, resume_checkpoint
from online_merging.provenance import provenance

__all__ = ["RunResult", "run_recipe"]

TRL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@dataclass
class RunResult:
    """One training run: where it went, how long it took, and its final figures."""

    method: str
    output_dir: str
    learning_rate: float
    steps: int
    seconds: float
    train_metrics: dict[str, float]
    evaluation: dict[str, float] | None  # reward and ability (the embedded world's, or tax_eval_*'s), else None
    trajectory: list[dict[str, float]] | None = None  # step, reward, ability every tax_eval_every steps and at the end
    average: dict[str, Any] | None = None  # average_with_sft: alpha, output_dir, evaluation, sweep (weight, figures)


def method_name(recipe: RecipeArguments, config: Any = None) -> str:
    """``adamw`` for the trainer's own optimizer, else e.g. ``ondare``, ``sgd_onties``, ``ondare_k10``; with
    ``_normalized`` for pairwise-normalised DPO, ``_keyneurons`` for key neurons only, ``allo_`` for ALLO's stages,
    ``_pull`` with a pull toward SFT, ``rpo_`` for RPO's loss (``config.loss_type`` with ``"sft"``), ``lora_`` for
    adapters."""
    if recipe.merge == "none":
        name = "adamw"
    else:
        name = recipe.merge if recipe.optimizer == "adam" else f"{recipe.optimizer}_{recipe.merge}"
        name = name if recipe.merge_every == 1 else f"{name}_k{recipe.merge_every}"
    if recipe.masked:
        name = f"{name}_keyneurons"
    if recipe.unlearn_steps or recipe.noisy_token_percentile:
        name = f"allo_{name}"
    if recipe.pull:
        name = f"{name}_pull"
    if "sft" in (getattr(config, "loss_type", None) or ()):
        name = f"rpo_{name}"
    if recipe.use_peft:
        name = f"lora_{name}"
    if recipe.trainer in ONLINE_RL:
        name = f"{recipe.trainer}_{name}"
    return f"{name}_normalized" if recipe.pairwise_normalized else name


def run_recipe(recipe: RecipeArguments, config: Any, *, progress: bool = True) -> dict[str, Any]:
    """Train as the recipe says (and the AdamW baseline when ``compare_with_adamw``); write and return a summary.

    On the embedded default, or with ``tax_eval_every`` on a named model, the summary holds the SFT model's reward
    and ability figures, each run's along its trajectory, and their ability kept at matched reward; ``summary.json``
    goes to ``config.output_dir``, written atomically. An ``output_dir`` that is, lies inside or contains the model
    or the base model is refused before any work: the Trainer writes and rotates checkpoints there. So is one that
    holds files no run wrote, or an earlier run, unless resumed (``resume_from_checkpoint`` in it) or replaced
    (``overwrite_output_dir``: the earlier run's files are removed, only those).
    """
    named = {"model_name_or_path": recipe.model_name_or_path, "base_model_name_or_path": recipe.base_model_name_or_path}
    check_not_input(config.output_dir, named, name="output_dir")
    config = copy.copy(config)
    config.resume_from_checkpoint = resume_checkpoint(config)
    resuming = config.resume_from_checkpoint is not None and _inside(config.resume_from_checkpoint, config.output_dir)
    check_run_folder(config.output_dir, overwrite=recipe.overwrite_output_dir, resuming=resuming)
    # a named data set is read and its columns checked before any model loads (or world builds)
    dataset = None if recipe.dataset_name is None else _load_dataset(recipe, None)
    world = _embedded_world(recipe, progress)
    if world is not None and recipe.embedded:
        embedded = {"embedded world's SFT model": world.sft_dir, "embedded world's base model": world.base_dir}
        check_not_input(config.output_dir, embedded, name="output_dir")
    if dataset is None:
        dataset = _load_dataset(recipe, world)
    runs = [(recipe, config)]
    plain = recipe.adamw_baseline()  # the trainer's own AdamW, the rest of the recipe
    if plain is not None:
        baseline = _plain_loss(copy.copy(config))
        baseline.output_dir = str(Path(config.output_dir) / "adamw_baseline")
        baseline.learning_rate = recipe.adamw_learning_rate or config.learning_rate
        # resumed too: from its own last checkpoint, when it got to one, else from the start
        baseline.resume_from_checkpoint = last_checkpoint(baseline.output_dir) if resuming else None
        runs.append((plain, baseline))
    summary: dict[str, Any] = {"recipe": asdict(recipe), "provenance": provenance(world), "runs": []}
    score = _scorer(recipe, world)
    if config.should_save:  # every check passed: the folder is the run's now
        start_run_folder(config.output_dir, replace=recipe.overwrite_output_dir and not resuming)
    if score is not None:
        model, tokenizer = _load_model(recipe, world)
        summary["sft"] = _evaluate(score, model, tokenizer)
        del model
    for run_args, run_config in runs:
        if run_config.output_dir != config.output_dir and config.should_save:  # adamw_baseline/: a run folder too
            record_run(config.output_dir, coming=(Path(run_config.output_dir).name,))
            start_run_folder(run_config.output_dir, replace=run_config.resume_from_checkpoint is None)
        summary["runs"].append(asdict(_train(run_args, run_config, world, dataset, score, summary.get("sft"))))
    if score is not None:
        summary["matched_reward"] = matched_reward(summary["sft"], summary["runs"], rl=recipe.trainer in ONLINE_RL)
    write_text(Path(config.output_dir) / "summary.json", json.dumps(summary, indent=2))
    if config.should_save:
        record_run(config.output_dir)
    return summary


def _inside(path: str, folder: str) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def _run_folder_recorder():
    """A callback keeping the run folder's manifest current; what a save writes (the checkpoint, TRL's model card
    beside it) is listed before it is written, so a run killed while saving can still be resumed or replaced."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class RunFolderRecorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save and args.should_save:
                record_run(args.output_dir, coming=(f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", "README.md"))

        on_epoch_end = on_step_end

        def on_save(self, args, state, control, **kwargs):
            if args.should_save:
                record_run(args.output_dir)

    return RunFolderRecorder()


def _plain_loss(config: Any) -> Any:
    """``config`` with TRL's default loss (RPO's ``loss_type=["sigmoid", "sft"]`` is part of a pipeline, not of the
    AdamW baseline it is compared with)."""
    import dataclasses

    defaults = {f.name: f for f in dataclasses.fields(config)}
    for key in ("loss_type", "loss_weights"):
        if key in defaults:
            field = defaults[key]
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            setattr(config, key, default)
    return config


def matched_reward(sft: dict[str, float], runs: list[dict], *, rl: bool = False) -> dict[str, Any]:
    """The runs' ability kept (ability / SFT's) at the reward levels every run reaches along its trajectory (the SFT
    model, the evaluations every ``tax_eval_every`` steps, the end), and its mean over them per run (MRA). ``rl``:
    the reward axis is the share of the SFT model's errors removed, at ``RL_LEVELS`` (as the lab's RL plan)."""
    from online_merging.evaluation import common_levels, matched_reward_ability
    from online_merging.evaluation.fronts import MRA_LEVELS, RL_LEVELS
    from online_merging.world.rewards import errors_removed

    def point(figures: dict) -> tuple[float, float]:
        reward = errors_removed(figures["reward"], sft["reward"]) if rl else figures["reward"]
        return reward, figures["ability"] / sft["ability"]

    paths = {run["method"]: [point(sft)] + [point(p) for p in run["trajectory"]] for run in runs}
    for run in runs:  # a pipeline with an offline average: the sweep from SFT to the run's model is its path
        if run.get("average") and run["average"]["sweep"]:
            sweep = [point(p) for p in run["average"]["sweep"]]
            paths[pipeline_name(run)] = [point(sft), *sweep, paths[run["method"]][-1]]
    levels = common_levels(paths.values(), RL_LEVELS if rl else MRA_LEVELS)
    return {"levels": levels, "mra": {method: matched_reward_ability(path, levels) for method, path in paths.items()}}


def compared_rates(summary: dict) -> str | None:
    """The line saying at which learning rate each run of ``summary`` trained, and why, when it has a baseline."""
    if len(summary["runs"]) < 2:
        return None
    (run, ours), (baseline, theirs) = ((r["method"], format(r["learning_rate"], "g")) for r in summary["runs"])
    if summary["recipe"]["adamw_learning_rate"] is None:
        return f"learning rates: {run} {ours}, {baseline} {theirs} (both learning_rate)."
    return (
        f"learning rates: {run} {ours} (learning_rate), {baseline} {theirs} (adamw_learning_rate): each method at "
        "its own tuned rate; --adamw_learning_rate moves the baseline's."
    )


def pipeline_name(run: dict) -> str:
    """The name of a run followed by its average with SFT: ``onties+ma``."""
    return f"{run['method']}+ma"


def _average_with_sft(recipe: RecipeArguments, config: Any, world, model, tokenizer, score) -> dict[str, Any]:
    """``average_with_sft``: write α·θ_run + (1 − α)·θ_sft into output_dir/average_with_sft and score it; on the
    embedded world also score the sweep of α (``MA_SWEEP``), the pipeline's path from SFT to the run's model."""
    from online_merging.offline import MergeSpec, save_merged
    from online_merging.offline.merge import MA_SWEEP, merge

    sft = _sft_source(recipe, world)
    trained = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    out = Path(config.output_dir) / "average_with_sft"
    if config.should_save:
        record_run(config.output_dir, coming=(out.name,))
    save_merged(MergeSpec("ma", alpha=recipe.average_with_sft), out, sft=sft, aligned=trained)
    average: dict[str, Any] = {"alpha": recipe.average_with_sft, "output_dir": str(out), "evaluation": None}
    average["sweep"] = []
    if score is None:
        return average
    scratch, _ = _load_model(recipe, world)  # a fresh model: a copy of the trained one may still run its forward
    weights = MA_SWEEP if recipe.embedded else ()
    for alpha in sorted({*weights, recipe.average_with_sft}):
        scratch.load_state_dict(merge(MergeSpec("ma", alpha=alpha), sft=sft, aligned=trained), strict=False)
        figures = _evaluate(score, scratch, tokenizer)
        if alpha in weights:
            average["sweep"].append({"weight": alpha, "reward": figures["reward"], "ability": figures["ability"]})
        if alpha == recipe.average_with_sft:
            average["evaluation"] = figures
    return average


def _scorer(recipe: RecipeArguments, world):
    """``score(model, tokenizer)``: reward and ability, from the embedded world's probes, or on a named model with
    ``tax_eval_every`` from lm-eval tasks and a reward model (checked and loaded here, before any training);
    ``None`` when nothing scores the runs."""
    if world is not None and recipe.embedded:
        if recipe.trainer in ONLINE_RL:  # reward: the trained skill's correctness; ability: the other skills'
            from online_merging.world.rewards import rl_metrics

            return lambda model, tokenizer: rl_metrics(world.evaluate(model, tokenizer), recipe.rl_skill)
        return world.evaluate
    if not recipe.scores_named_model:
        if recipe.tax_eval_every and not recipe.embedded:
            warnings.warn(
                f"tax_eval_every: {recipe.tax_eval_every} is ignored: a named model is scored during training only "
                "with tax_eval_tasks, tax_eval_reward_model and tax_eval_prompts (docs/evaluation.md)",
                stacklevel=3,
            )
        return None
    from online_merging.evaluation import ability_scores, check_tasks, load_reward_model, read_records, reward_score

    tasks = [task.strip() for task in recipe.tax_eval_tasks.split(",") if task.strip()]
    try:
        check_tasks(tasks, recipe.tax_eval_include_path)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"tax_eval_tasks: {error}") from None
    rows = read_records(recipe.tax_eval_prompts, ("prompt",), option="tax_eval_prompts")
    prompts = [row["prompt"] for row in rows]
    reward_model, reward_tokenizer = load_reward_model(recipe.tax_eval_reward_model, option="tax_eval_reward_model")

    def score(model, tokenizer) -> dict[str, float]:
        abilities = ability_scores(
            model, tokenizer, tasks, include_path=recipe.tax_eval_include_path, limit=recipe.tax_eval_limit
        )
        reward = reward_score(
            model, tokenizer, reward_model.to(next(model.parameters()).device), reward_tokenizer, prompts,
            max_new_tokens=recipe.tax_eval_max_new_tokens,
        )  # fmt: skip
        ability = sum(value.score for value in abilities.values()) / len(abilities)
        return {"reward": reward, "ability": ability, **{f"ability/{t}": v.score for t, v in abilities.items()}}

    return score


def _embedded_world(recipe: RecipeArguments, progress: bool):
    if not recipe.embedded and recipe.dataset_name is not None:
        return None
    from online_merging.world import WorldConfig, build_world

    config = WorldConfig.quick() if recipe.embedded_world == "quick" else WorldConfig()
    return build_world(config, progress=progress)


def _train(recipe: RecipeArguments, config: Any, world, dataset, score, sft: dict[str, float] | None) -> RunResult:
    spec = _train_spec(recipe, world)
    model, tokenizer = _load_model(recipe, world)
    masks = _neuron_masks(recipe, spec, config, model, dataset, tokenizer, world) if recipe.masked else None
    if spec.unlearn_steps:
        unlearn(spec, model, config, dataset, tokenizer, neuron_masks=masks)
    callbacks = [_run_folder_recorder()]
    if recipe.entanglement_every:
        callbacks.append(_entanglement_monitor(recipe, world, dataset))
    trainer = build_trainer(spec, model, config, dataset, tokenizer, neuron_masks=masks, callbacks=callbacks)
    tax = None
    if score is not None and recipe.tax_eval_every:
        from online_merging.integrations.tax_eval import TaxEvalCallback

        tax = TaxEvalCallback(trainer, lambda m: _evaluate(score, m, tokenizer), recipe.tax_eval_every, reference=sft)
        trainer.add_callback(tax)
    start = time.perf_counter()
    run_training(trainer, config.resume_from_checkpoint)
    seconds = time.perf_counter() - start
    save_run_model(trainer, config.output_dir)
    if config.should_save:
        record_run(config.output_dir)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = logged[-1] if logged else {}
    metrics = {k: v for k, v in last.items() if k in TRL_METRICS or k.startswith("normalized/")}
    evaluation = _evaluate(score, model, tokenizer) if score is not None else None
    steps = trainer.state.global_step
    points = None
    if score is not None:
        points = [{key: p[key] for key in ("step", "reward", "ability")} for p in (tax.points if tax else [])]
        if not points or points[-1]["step"] != steps:
            points.append({"step": steps, "reward": evaluation["reward"], "ability": evaluation["ability"]})
    average = None
    if recipe.average_with_sft is not None:
        average = _average_with_sft(recipe, config, world, model, tokenizer, score)
    name = method_name(recipe, config)
    return RunResult(
        name, config.output_dir, config.learning_rate, steps, seconds, metrics, evaluation, points, average
    )  # fmt: skip


def _train_spec(recipe: RecipeArguments, world) -> TrainSpec:
    """The recipe's trainer and optimizer: the trainer's own with ``merge: none``, unless a pull or key neurons
    need OnlineMergingAdam/SGD; τ from a saved task vector, else from the SFT model's files and the base's."""
    online = recipe.merge != "none" or recipe.masked or recipe.pull
    if recipe.task_vector_path is not None:
        sources = {"task_vector": recipe.task_vector_path}
    else:
        base = recipe.base_model_name_or_path or (str(world.base_dir) if recipe.embedded else None)
        sources = {"base_model": base, "sft_model": _sft_source(recipe, world)}
    optimizer = recipe.optimizer if online else "adamw"
    extra = {"peft_config": recipe.peft_config(), "reward_funcs": recipe.rewards()}
    return TrainSpec.of(recipe, optimizer=optimizer, **extra, **sources)


def _neuron_masks(recipe: RecipeArguments, spec: TrainSpec, config: Any, model, dataset, tokenizer, world):
    """ALLO's key neurons: loaded from ``neuron_mask_path``, or located by a DPO probe and saved in output_dir."""
    from online_merging.neurons import load_neuron_masks, save_neuron_masks

    if recipe.neuron_mask_path is not None:
        return load_neuron_masks(recipe.neuron_mask_path)
    pairs = world.preference_dataset() if world is not None else dataset
    if not {"prompt", "chosen", "rejected"} <= set(pairs.column_names):
        raise ValueError("neuron_k locates key neurons by a DPO probe: dataset_name needs prompt/chosen/rejected pairs")
    masks = key_neurons(spec, model, pairs, tokenizer, config)
    with staged_file(Path(config.output_dir) / "neuron_masks.safetensors") as path:
        save_neuron_masks(masks, path, k=recipe.neuron_k, scope=recipe.neuron_scope)
    if config.should_save:
        record_run(config.output_dir)
    return masks


def _evaluate(score, model, tokenizer) -> dict[str, float]:
    """``score(model, tokenizer)``, the model's parameters gathered first if ZeRO-3 partitions them."""
    if not any(hasattr(p, "ds_tensor") for p in model.parameters()):
        return score(model, tokenizer)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return score(model, tokenizer)


def _entanglement_monitor(recipe: RecipeArguments, world, dataset):
    from online_merging.diagnostics import GradientEntanglementCallback

    probe = world.preference_dataset("test") if world is not None else dataset
    if not {"prompt", "chosen", "rejected"} <= set(probe.column_names):
        raise ValueError("entanglement_every needs preference pairs (prompt/chosen/rejected) in dataset_name")
    return GradientEntanglementCallback(probe, every_n_steps=recipe.entanglement_every)


def _sft_source(recipe: RecipeArguments, world) -> str:
    """Where the SFT model is: ``model_name_or_path``, or the embedded world's."""
    return str(world.sft_dir) if recipe.embedded else recipe.model_name_or_path


def _load_model(recipe: RecipeArguments, world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = _sft_source(recipe, world)
    model = _from_hub_or_path(
        lambda: AutoModelForCausalLM.from_pretrained(name, dtype=recipe.dtype, **recipe.quantization()),
        name,
        "model_name_or_path",
    )
    tokenizer = _from_hub_or_path(lambda: AutoTokenizer.from_pretrained(name), name, "model_name_or_path")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_dataset(recipe: RecipeArguments, world):
    if recipe.dataset_name is None:
        split = recipe.dataset_train_split
        if recipe.trainer in ONLINE_RL:
            return world.prompt_dataset(recipe.rl_skill, split)
        return world.kto_dataset(split) if recipe.trainer == "kto" else world.preference_dataset(split)
    import datasets

    name = recipe.dataset_name
    path = Path(name)
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.suffix in builders:
        if not path.is_file():
            raise FileNotFoundError(f"dataset_name: no data file at {name!r}")

        def load():
            try:
                return datasets.load_dataset(builders[path.suffix], data_files=name, split="train")
            except datasets.exceptions.DatasetGenerationError as error:  # malformed file: name it, one line
                raise ValueError(f"dataset_name: {name!r} is not valid {path.suffix[1:]} ({error.__cause__})") from None
    else:

        def load():
            return datasets.load_dataset(name, recipe.dataset_config, split=recipe.dataset_train_split)

    dataset = _from_hub_or_path(load, name, "dataset_name")
    _check_columns(dataset, recipe)
    if recipe.trainer == "kto" and "chosen" in dataset.column_names:
        from trl.data_utils import unpair_preference_dataset

        dataset = unpair_preference_dataset(dataset)
    return dataset


def _check_columns(dataset, recipe: RecipeArguments) -> None:
    """TRL's formats: DPO reads chosen/rejected (with a prompt column, or the prompt inside both); KTO reads
    prompt/completion/label, or preference pairs, which it unpairs."""
    columns = set(getattr(dataset, "column_names", None) or ())
    paired = {"chosen", "rejected"}
    if recipe.trainer in ONLINE_RL:  # the world's `correct` reward reads the answer column
        needed = [{"prompt", "answer"} if "correct" in (recipe.reward_funcs or ["correct"]) else {"prompt"}]
    else:
        needed = [paired] if recipe.trainer == "dpo" else [{"prompt", "completion", "label"}, paired]
    if not any(want <= columns for want in needed):
        missing = sorted(min((want - columns for want in needed), key=len))
        forms = " or ".join("/".join(sorted(want)) for want in needed)
        raise ValueError(
            f"dataset_name: {recipe.dataset_name!r} lacks the column(s) {', '.join(map(repr, missing))} "
            f"({recipe.trainer.upper()} needs {forms}; its columns: {', '.join(sorted(columns)) or 'none'})"
        )


def _from_hub_or_path(load, name: str, key: str):
    """Call ``load``; when ``name`` is neither a local path nor reachable on the Hub, say how to fix it."""
    try:
        return load()
    except (OSError, ConnectionError, FileNotFoundError) as error:
        if Path(name).exists():
            raise
        raise OSError(
            f"{key}: {name!r} is not a local path and could not be loaded from the Hugging Face Hub "
            f"({type(error).__name__}). Offline, download it where there is a network "
            f"(`hf download {name} --local-dir DIR`, with --repo-type dataset for data) and set {key}: DIR"
        ) from error
