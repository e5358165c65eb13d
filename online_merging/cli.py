"""The ``online-merging`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from online_merging.settings import OFFLINE_METHODS as METHODS

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from online_merging.demo import format_results, run_demo

    print(f"Aligning a small SFT'd MLP on a new objective for {args.steps} steps (CPU, seed {args.seed})...")
    print("(the first run on a machine also builds the fused CPU kernel: about a minute)")
    print(format_results(run_demo(steps=args.steps, seed=args.seed)))
    print("reward gain: fall of the alignment loss; ability loss: rise of the SFT-skills loss (the tax).")
    return 0


def _task_vector(args: argparse.Namespace) -> int:
    import time

    import torch

    from online_merging._files import check_not_input
    from online_merging.merging import TaskVector

    base, finetuned = _weights(args, "base", "finetuned")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    check_not_input(args.out, {"--base": args.base, "--finetuned": args.finetuned}, name="--out")
    _check_out_file(args.out)
    start = time.perf_counter()
    print(f"τ = {args.finetuned} − {args.base}, stored as {args.dtype} ...")
    tau = TaskVector.from_models(base, finetuned, dtype=dtype, progress=True)
    tau.save(args.out)
    print(f"{tau} written to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _merge(args: argparse.Namespace) -> int:
    import time

    from online_merging._files import check_folder_target, check_not_input
    from online_merging.offline import MergeSpec, save_merged

    alphas = args.alpha or [None]
    if len(alphas) > 1 and args.method != "ma":
        raise ValueError(f"--alpha: several values sweep MA only, not --method {args.method}")
    specs = [MergeSpec(args.method, alpha=alpha, ratios=args.ratios, weights=args.weights or MergeSpec.weights,
                       density=args.density, seed=args.seed) for alpha in alphas]  # fmt: skip
    if specs[0].merges_task_vectors and args.base is None:
        raise ValueError(f"--base: method {args.method!r} merges task vectors: it needs the base model")
    for spec in specs:  # every setting of a sweep before the first merge
        spec.check(base=args.base)
    _check_out_folder(args.out)
    outs = [args.out if len(alphas) == 1 else f"{args.out}/ma-{alpha:g}" for alpha in alphas]
    for out in outs:  # every output of a sweep, before the first merge
        check_not_input(out, {"--sft": args.sft, "--aligned": args.aligned, "--base": args.base}, name="--out")
        check_folder_target(out, name="--out")
    sft, aligned, base = _weights(args, "sft", "aligned", "base")
    for spec, out in zip(specs, outs, strict=True):
        extra = {}
        if args.mergekit_config:
            import yaml

            from online_merging.offline import mergekit_config

            config = mergekit_config(spec, sft=args.sft, aligned=args.aligned, base=args.base)
            extra["mergekit.yaml"] = yaml.safe_dump(config, sort_keys=False)
        start = time.perf_counter()
        save_merged(spec, out, sft=sft, aligned=aligned, base=base, extra_files=extra)
        print(f"{args.method} merge written to {out} in {time.perf_counter() - start:.1f} s")
        if extra:
            path = Path(out) / "mergekit.yaml"
            print(f"the same merge as a mergekit config: {path} (mergekit-yaml {path} OUT)")
    return 0


def _hma_search(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from online_merging.offline.hma_search import search_hma_ratios
    from online_merging.sources import hub_unreachable

    sft = _check_sources(args, "sft", "aligned")[0]
    if Path(args.out).is_dir():
        raise IsADirectoryError(f"--out: {args.out!r} is a folder (expected a .json file path)")
    if args.prompts is None:
        from online_merging.world import WorldConfig, build_world

        prompts = build_world(WorldConfig()).preference_dataset()["prompt"]
        print("prompts: the embedded default world's")
    else:
        from online_merging.evaluation.data import read_records

        prompts = [record["prompt"] for record in read_records(args.prompts, ("prompt",), option="--prompts")]
    prompts = list(prompts)[: args.num_prompts]
    try:
        tokenizer = AutoTokenizer.from_pretrained(sft)
    except OSError as error:
        if isinstance(sft, Path):
            raise ValueError(f"--sft: no tokenizer in {str(sft)!r} ({type(error).__name__})") from None
        raise hub_unreachable(sft, "--sft", error) from error
    print(f"proxy distillation over {args.blocks} block ratios with mean {args.alpha}, {len(prompts)} prompts ...")
    result = search_hma_ratios(args.sft, args.aligned, tokenizer, prompts, alpha=args.alpha, blocks=args.blocks,
                               steps=args.steps, lr=args.lr, max_new_tokens=args.max_new_tokens, seed=args.seed,
                               progress=True)  # fmt: skip
    result.save(args.out)
    ratios = ",".join(f"{r:.4f}" for r in result.ratios)
    print(f"ratios (input to output): {ratios}")
    print(f"log-likelihood per response token: {result.log_likelihood_before:.5f} (MA) -> "
          f"{result.log_likelihood_after:.5f} (HMA), {result.seconds:.0f} s; saved to {args.out}")  # fmt: skip
    print(f"merge with: online-merging merge --method hma --ratios {ratios} --sft {args.sft} --aligned {args.aligned}")
    return 0


def _tax_lab(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from online_merging._files import check_folder_target
    from online_merging.lab import LabConfig, read_tuned, run_exploration, run_lab

    check_folder_target(args.out, name="--out")  # before the plan is read; the lab checks it again, as out_dir
    config = LabConfig.rl(quick=args.quick) if args.rl else (LabConfig.quick() if args.quick else LabConfig())
    config = config.with_settings(args.set)
    if args.methods:
        try:
            config = replace(config, methods=tuple(args.methods.split(",")))
        except ValueError as error:
            raise ValueError(f"--methods: {error}") from None
    if args.explore:
        if args.tuned or args.methods or args.seeds or args.data_orders or args.rl:
            raise ValueError("--explore runs its own rows on the tuning replicates: drop --tuned, --methods, --seeds, "
                             "--data-orders and --rl (set tune_seeds=..., tune_orders=... with --set)")  # fmt: skip
        run_exploration(args.out, workers=args.workers, config=config)
        print(f"exploration: {args.out}/explore.json, {args.out}/explore.md")
        return 0
    if args.tuned:
        read_tuned(args.tuned)  # a bad file fails here, before any job runs
    tuned = {"tuned": args.tuned} if args.tuned else {}
    run_lab(args.out, quick=args.quick, workers=args.workers, config=config, seeds=args.seeds,
            data_orders=args.data_orders, **tuned)  # fmt: skip
    print(f"results: {args.out}/results.json, {args.out}/results.md, {args.out}/tuned.json and the plots beside them")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from online_merging._files import check_folder_target, check_not_input, staged_folder
    from online_merging.evaluation.plot import plot_front
    from online_merging.evaluation.runs import evaluate_plan, format_table, plan_evaluation

    if not (args.tasks or args.reward_model or args.pairs):
        for option in ("include_path", "limit", "reference", "prompts", "out", "seed", "beta", "batch_size",
                       "max_new_tokens"):  # fmt: skip
            if getattr(args, option) is not None:
                raise ValueError(f"--{option.replace('_', '-')}: applies to evaluations with --tasks, --reward-model "
                                 f"or --pairs; without them evaluate scores models of the embedded world")  # fmt: skip
        args.embedded_world = args.embedded_world or "default"
        return _evaluate_world(args)
    if args.embedded_world is not None:
        raise ValueError("--embedded_world: only without --tasks, --reward-model and --pairs (the embedded world's "
                         "own reward and ability)")  # fmt: skip
    if args.out is not None:
        check_folder_target(args.out, name="--out")
        sources = {"--reference": args.reference, "--reward-model": args.reward_model, "--prompts": args.prompts,
                   "--pairs": args.pairs, "--include-path": args.include_path}  # fmt: skip
        check_not_input(args.out, {**sources, **{f"checkpoint {c}": c for c in args.checkpoints}}, name="--out")
    defaults = {"batch_size": 8, "max_new_tokens": 64, "beta": 0.1}
    settings = {key: default if getattr(args, key) is None else getattr(args, key) for key, default in defaults.items()}
    try:
        plan = plan_evaluation(args.checkpoints, reference=args.reference, tasks=args.tasks or (),
                               include_path=args.include_path, limit=args.limit, reward_model=args.reward_model,
                               prompts=args.prompts, pairs=args.pairs, seed=args.seed, **settings)  # fmt: skip
    except ImportError as error:  # an optional dependency the plan needs: its install command, in one line
        raise ValueError(str(error)) from None
    result = evaluate_plan(plan)
    print(format_table(result))
    if args.out is None:
        return 0
    with staged_folder(args.out, name="--out") as staged:
        (staged / "evaluation.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        drawn = plot_front(result, staged / "front.png")
    print(f"written: {Path(args.out) / 'evaluation.json'}" + (f", {Path(args.out) / 'front.png'}" if drawn else ""))
    if not drawn:
        why = "matplotlib is not installed (pip install matplotlib)" if result["front"] else (
            "it needs both axes: --tasks, and --reward-model or --pairs")  # fmt: skip
        print(f"no front.png: {why}")
    return 0


def _evaluate_world(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from online_merging.world import WorldConfig, build_world

    for checkpoint in args.checkpoints:  # all of them before the world builds or any model loads
        _check_world_checkpoint(checkpoint, args.embedded_world)
    world = build_world(WorldConfig.quick() if args.embedded_world == "quick" else WorldConfig())
    tokenizer = world.tokenizer()
    rows = [("sft", world.sft_dir), *((str(c), c) for c in args.checkpoints)]
    sft_ability = None
    print(f"{'checkpoint':<40} {'reward':>7} {'ability':>7} {'retained':>8}")
    for label, path in rows:
        figures = world.evaluate(AutoModelForCausalLM.from_pretrained(path), tokenizer)
        sft_ability = sft_ability or figures["ability"]
        print(
            f"{label:<40} {figures['reward']:>7.3f} {figures['ability']:>7.3f} {figures['ability'] / sft_ability:>8.3f}"
        )
    return 0


def _check_world_checkpoint(checkpoint: str, world: str) -> None:
    """Refuse a checkpoint whose architecture or tokenizer is not the world's: it would score 0, or nonsense."""
    from transformers import AutoConfig, AutoTokenizer

    from online_merging.checkpoint_files import check_checkpoint_files
    from online_merging.world import WorldConfig, architecture_mismatch
    from online_merging.world.tokenizer import build_tokenizer

    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint folder: {checkpoint!r}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{checkpoint!r} has no config.json (expected a from_pretrained folder)")
    check_checkpoint_files(path, checkpoint)
    config = AutoConfig.from_pretrained(path)
    worlds = {"default": WorldConfig(), "quick": WorldConfig.quick()}
    mismatch = architecture_mismatch(config, worlds[world])
    if mismatch:
        fits = [name for name, other in worlds.items() if name != world and not architecture_mismatch(config, other)]
        hint = f"; it is one of the {fits[0]} world: add --embedded_world {fits[0]}" if fits else ""
        raise ValueError(f"{checkpoint!r} is not a model of the embedded {world} world ({mismatch}){hint}")
    has_tokenizer = any((path / file).is_file() for file in ("tokenizer.json", "tokenizer_config.json"))
    if has_tokenizer and AutoTokenizer.from_pretrained(path).get_vocab() != build_tokenizer().get_vocab():
        raise ValueError(f"the tokenizer of {checkpoint!r} is not the embedded {world} world's")


def _numbers(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers, for argparse."""
    try:
        return tuple(float(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _integers(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers, for argparse."""
    try:
        return tuple(int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names, for argparse."""
    names = tuple(item.strip() for item in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _positive_int(text: str) -> int:
    """An integer ≥ 1, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {value}")
    return value


def _check_sources(args: argparse.Namespace, *options: str) -> list:
    """Each model option as a local ``Path`` or a Hub id; a missing local path fails here, naming its option."""
    from online_merging.sources import local_or_hub

    return [None if getattr(args, o) is None else local_or_hub(getattr(args, o), f"--{o}") for o in options]


def _weights(args: argparse.Namespace, *options: str) -> list:
    """Each model option as a local safetensors file or folder, a Hub id downloaded first; errors name the option."""
    from online_merging.merging.weights import locate_weights

    return [None if getattr(args, o) is None else locate_weights(getattr(args, o), f"--{o}") for o in options]


def _check_out_file(out: str) -> None:
    """A new file, or a task vector this package wrote (replaced): never another file, a model's weights say."""
    from online_merging.merging.task_vector import WRITTEN_BY

    if Path(out).is_dir():
        raise IsADirectoryError(f"--out: {out!r} is a folder (expected a file path, e.g. tau.safetensors)")
    if Path(out).exists():
        try:
            from safetensors import safe_open

            with safe_open(out, "pt") as existing:
                ours = (existing.metadata() or {}).items() >= WRITTEN_BY.items()
        except Exception:  # not a safetensors file at all
            ours = False
        if not ours:
            raise FileExistsError(
                f"--out: {out!r} exists and is not a task vector written by this package; choose another path "
                "(nothing was written)"
            )


def _check_out_folder(out: str) -> None:
    """The parent of an MA sweep's folders must be a folder (each of them is checked with check_folder_target)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise NotADirectoryError(f"--out: {out!r} is a file (expected a folder)")


def _train(args: argparse.Namespace) -> int:
    from online_merging.integrations import load_recipe, run_recipe
    from online_merging.integrations.recipe import find_recipe, recipe_help

    if any(item in ("-h", "--help") for item in args.overrides):
        print(recipe_help(args.recipe, args.overrides))
        return 0
    path = find_recipe(args.recipe)
    recipe, config = load_recipe(path, args.overrides)
    where = "the embedded default world" if recipe.embedded else recipe.model_name_or_path
    first = int(os.environ.get("RANK", "0")) == 0  # print once per multi-process launch (torchrun, accelerate)
    if first:
        print(f"{path}: {recipe.trainer.upper()} with merge={recipe.merge} on {where}, output in {config.output_dir}")
    try:
        summary = run_recipe(recipe, config)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_kept_by_training(config.output_dir)) from None
    if first:
        print(format_summary(summary))
    return 0


def _kept_by_training(output_dir: str) -> str:
    """What an interrupted training leaves: the Trainer's checkpoints in output_dir, and how to resume."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if last is None:
        return f"no checkpoint was saved yet in {output_dir} (one every save_steps steps); the inputs are untouched"
    return f"the checkpoints saved so far are kept in {output_dir}; resume with --resume_from_checkpoint {last}"


def format_summary(summary: dict) -> str:
    """The end-of-run table: steps, time, TRL's reward metrics and, on the embedded world, reward and ability."""
    from online_merging.integrations.run import compared_rates, pipeline_name

    lines = []
    sft = summary.get("sft")
    matched = summary.get("matched_reward")
    header = f"{'run':<12} {'steps':>5} {'time':>7} {'margin':>7} {'accuracy':>8}"
    if sft:
        header += f" {'reward':>7} {'ability':>7} {'retained':>8}"
    if matched:
        header += f" {'MRA':>6}"
    lines.append(header)
    if sft:
        lines.append(
            f"{'sft':<12} {'':>5} {'':>7} {'':>7} {'':>8} {sft['reward']:>7.3f} {sft['ability']:>7.3f} {1:>8.3f}"
        )
    for run in summary["runs"]:
        margin, accuracy = (_figure(run["train_metrics"].get(k)) for k in ("rewards/margins", "rewards/accuracies"))
        line = f"{run['method']:<12} {run['steps']:>5} {run['seconds']:>6.0f}s {margin:>7} {accuracy:>8}"
        if sft and run["evaluation"]:
            figures = run["evaluation"]
            line += f" {figures['reward']:>7.3f} {figures['ability']:>7.3f} {figures['ability'] / sft['ability']:>8.3f}"
        if matched:
            line += f" {_figure(matched['mra'].get(run['method'])):>6}"
        lines.append(line)
        average = run.get("average")
        if average and average["evaluation"] and sft:
            figures, name = average["evaluation"], pipeline_name(run)
            line = f"{name:<12} {'':>5} {'':>7} {'':>7} {'α ' + format(average['alpha'], 'g'):>8}"
            line += f" {figures['reward']:>7.3f} {figures['ability']:>7.3f} {figures['ability'] / sft['ability']:>8.3f}"
            if matched:
                line += f" {_figure(matched['mra'].get(name)):>6}"
            lines.append(line)
    recipe = summary["recipe"]
    if sft and recipe["trainer"] in ("grpo", "rloo"):
        lines.append(
            f"reward: P(the correct answer) on held-out {recipe['rl_skill']} prompts; ability: P(the correct answer), "
            "mean over the other skills; retained: ability / SFT's ability."
        )
    elif sft:
        lines.append(
            "reward: P(the aligned style ' sure,') on held-out prompts; ability: P(the correct answer), mean over "
            "skills; retained: ability / SFT's ability."
        )
    if matched:
        levels = ", ".join(f"{level:g}" for level in matched["levels"]) or "none"
        what = "levels of the share of SFT's errors removed" if recipe["trainer"] in ("grpo", "rloo") else "levels"
        lines.append(
            "MRA: the ability retained at matched reward, along each run's evaluations, averaged over the reward "
            f"{what} every run reached ({levels}): the runs end at different rewards, compare them here."
        )
    lines.append(
        "margin, accuracy: TRL's rewards/margins and rewards/accuracies at the last logged step (-: not logged)."
    )
    rates = compared_rates(summary)
    if rates:
        lines.append(rates)
    if any(run.get("average") for run in summary["runs"]):
        lines.append(
            "+ma: the run's model averaged with the SFT model, α·θ_run + (1 − α)·θ_sft; its MRA is along the sweep "
            "of α from SFT to the run's model."
        )
    lines.extend(f"{run['method']}: model saved in {run['output_dir']}" for run in summary["runs"])
    lines.extend(
        f"{pipeline_name(run)}: model saved in {run['average']['output_dir']}"
        for run in summary["runs"]
        if run.get("average")
    )
    made = summary.get("provenance")
    if made:
        line = f"made on {made['cpu']}, torch {made['torch']}, transformers {made['transformers']}, trl {made['trl']}"
        world = made.get("world")
        if world:
            how = "shipped with the package: the same on every machine" if world["shipped"] else "built on this machine"
            line += f"; world {world['key']} ({how}), weights fingerprint {world['fingerprint']}"
        lines.append(line)
    return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="online-merging", description="Online merging optimizers for alignment.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="compare AdamW, OnDARE and OnTIES on an embedded toy, in seconds")
    demo.add_argument("--steps", type=_positive_int, default=300, help="alignment steps per optimizer (default 300)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the toy tasks and model (default 0)")
    demo.set_defaults(run=_demo)
    tv = commands.add_parser(
        "task-vector",
        help="precompute the SFT task vector τ = finetuned − base once, as one safetensors file",
        description="Compute τ = finetuned − base tensor by tensor (the two models are never in memory together) "
        "and save it for TaskVector.load.",
    )
    tv.add_argument("--base", required=True, help="base model: safetensors file or directory, or a Hub id")
    tv.add_argument("--finetuned", required=True, help="fine-tuned (SFT) model, in the same forms as --base")
    tv.add_argument("--out", required=True, help="where to write τ (a .safetensors file)")
    tv.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="storage dtype of τ (default bf16)")
    tv.set_defaults(run=_task_vector)
    train = commands.add_parser(
        "train",
        help="run a DPO/KTO recipe (recipes/*.yaml) with an online-merging optimizer",
        description="Train as RECIPE.yaml says. Keys not named (model, base model, data) run on the embedded "
        "default world, built in a few minutes on first use and cached; there the AdamW baseline is trained too "
        "and reward and ability are printed side by side. Override any recipe key with --key value, e.g. "
        "--learning_rate 5e-6 --max_steps 20; `online-merging train RECIPE.yaml --help` lists every key.",
    )
    train.add_argument("recipe", help="a shipped recipe's name (dpo_recommended, dpo_onties, ...) or a recipe YAML "
                       "file, e.g. recipes/dpo_ondare.yaml")  # fmt: skip
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs overriding the recipe's keys")
    train.set_defaults(run=_train)
    merge = commands.add_parser(
        "merge",
        help="merge an SFT and an aligned checkpoint offline: MA, HMA, or mergekit's linear, DARE and TIES",
        description="Merge tensor by tensor (one tensor of each model in memory at a time) into a checkpoint that "
        "AutoModelForCausalLM.from_pretrained(OUT) loads, with the SFT model's config and tokenizer. "
        "See docs/offline.md.",
    )
    merge.add_argument("--method", required=True, choices=METHODS, help="ma: α·aligned + (1−α)·sft; hma: one α per "
                       "layer block; linear, dare, ties: mergekit's methods (dare = dare_linear)")  # fmt: skip
    merge.add_argument("--sft", required=True, help="SFT checkpoint: directory of safetensors files, or a Hub id")
    merge.add_argument("--aligned", required=True, help="aligned (DPO/KTO/RLHF) checkpoint, same architecture")
    merge.add_argument("--base", help="base (pre-SFT) checkpoint: needed by dare and ties, which merge task vectors")
    merge.add_argument("--out", required=True, help="output directory (MA sweeps: one subdirectory per α)")
    merge.add_argument("--alpha", type=_numbers, help="MA's α in [0, 1]; several (0.2,0.5,0.8) sweep")
    merge.add_argument("--ratios", type=_numbers, help="HMA's ratios in [0, 1], one per block from input to output")
    merge.add_argument(
        "--weights",
        type=_numbers,
        help="w_sft,w_aligned for linear, dare, ties (default 0.5,0.5; dare does not normalise them)",
    )
    merge.add_argument("--density", type=float, default=1.0, help="fraction kept by dare and ties (default 1)")
    merge.add_argument("--seed", type=int, default=0, help="key of dare's random masks (default 0)")
    merge.add_argument("--mergekit-config", action="store_true",
                       help="also write OUT/mergekit.yaml, the same merge for mergekit-yaml")  # fmt: skip
    merge.set_defaults(run=_merge)
    search = commands.add_parser(
        "hma-search",
        help="find HMA's per-block ratios by proxy distillation (Lin et al.), for `merge --method hma --ratios`",
        description="Sample responses from the aligned model, then maximise their log-likelihood under the "
        "HMA-merged model over the block ratios only (mean fixed to --alpha). Prints and saves the ratios.",
    )
    search.add_argument("--sft", required=True, help="SFT checkpoint directory (its tokenizer is used)")
    search.add_argument("--aligned", required=True, help="aligned checkpoint directory")
    search.add_argument("--alpha", type=float, default=0.5, help="target mean of the ratios, in (0, 1) (default 0.5)")
    search.add_argument("--blocks", type=int, default=3, help="K, number of blocks of layers (default 3)")
    search.add_argument("--prompts", help="prompts: .txt (one per line), or .jsonl/.json/.csv/.parquet or a saved "
                        "dataset with a 'prompt' column; default: the embedded default world's")  # fmt: skip
    search.add_argument("--num-prompts", type=int, default=256, help="use at most this many prompts (default 256)")
    search.add_argument("--steps", type=int, default=100, help="Adam steps on the ratios (default 100)")
    search.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate (default 0.05)")
    search.add_argument("--max-new-tokens", type=int, default=64, help="length of sampled responses (default 64)")
    search.add_argument("--seed", type=int, default=0, help="seed of the sampled responses (default 0)")
    search.add_argument("--out", default="hma_ratios.json", help="where to save the result (default hma_ratios.json)")
    search.set_defaults(run=_hma_search)
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="benchmark", required=True)
    lab = bench.add_parser(
        "tax-lab",
        help="the alignment-tax lab: reward gained per ability lost, every method, on the embedded world",
        description="Tune every method's grid (AdamW, EMA, BEMA, MA, a larger β, RPO, TR-DPO, OnDARE, OnTIES, the "
        "pull toward SFT, ALLO's key neurons, stacks X → MA, KTO) on tuning replicates of the embedded world, run each "
        "best setting on test replicates of every test world (set test_worlds=default,second), and write "
        "matched-reward ability (MRA) with bootstrap intervals against AdamW, a table per world, the recommended "
        "pipeline, tuned.json and plots; --explore varies online merging's factors one at a time instead. See "
        "docs/results.md.",
    )
    lab.add_argument("--quick", action="store_true", help="tune on one replicate, test on another, smaller world")
    lab.add_argument("--rl", action="store_true",
                     help="the RL plan: GRPO and RLOO rewarded by one skill's correctness")  # fmt: skip
    lab.add_argument("--seeds", type=_integers, help="test model seeds, e.g. 2,3,4 (default: the mode's)")
    lab.add_argument("--data-orders", type=_integers, help="test data-order seeds, e.g. 0,1 (default: the mode's)")
    lab.add_argument("--tuned", metavar="FILE", help="run a tuned.json's settings on the test replicates, no tuning")
    lab.add_argument("--explore", action="store_true",
                     help="the exploration: online merging's factors one at a time, tuning replicates")  # fmt: skip
    lab.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    lab.add_argument(
        "--workers", type=_positive_int, default=2, help="parallel training processes, one thread each (default 2)"
    )
    lab.add_argument("--out", default="tax_lab", help="output directory (default tax_lab)")
    lab.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="change the plan: steps=60, lr=3e-5, world.skills=addition,facts, world.num_layers=2, ... "
                     "(repeatable; fields of LabConfig and, prefixed world., of WorldConfig)")  # fmt: skip
    lab.set_defaults(run=_tax_lab)
    evaluate = commands.add_parser(
        "evaluate",
        help="score checkpoints on ability (lm-eval tasks) and reward (a reward model, or a proxy on preference "
        "pairs) and draw the front; without --tasks/--reward-model/--pairs: models of the embedded world",
        description="Each CHECKPOINT is a model folder, a Trainer output folder (its checkpoint-* subfolders in step "
        "order: one run, one line of the front) or a PEFT adapter folder. Ability: lm-evaluation-harness tasks "
        "(--tasks, yours in --include-path), as the fraction of --reference's score kept. Reward: the mean score of "
        "--reward-model on the policy's responses to --prompts, or, without a reward model, the PROXY of TRL's DPO "
        "held-out preference accuracy and margin on --pairs against --reference. See docs/evaluation.md.",
    )
    evaluate.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                          help="model, Trainer output or PEFT adapter folders (or Hub ids)")  # fmt: skip
    evaluate.add_argument("--embedded_world", choices=["default", "quick"],
                          help="with no axis option: which embedded world (default: default)")  # fmt: skip
    evaluate.add_argument("--tasks", type=_names, help="lm-eval task names, comma-separated (ability axis)")
    evaluate.add_argument("--include-path", help="a folder of your own lm-eval task YAML files")
    evaluate.add_argument("--limit", type=_positive_int, help="the first N documents of each task")
    evaluate.add_argument("--reference", help="the model whose ability is 1 (the SFT model); needed by --pairs")
    evaluate.add_argument("--reward-model", help="a reward model folder: AutoModelForSequenceClassification, 1 label")
    evaluate.add_argument("--prompts", help="held-out prompts for --reward-model: .txt (one per line), or "
                          ".jsonl/.json/.csv/.parquet or a saved dataset with a 'prompt' column")  # fmt: skip
    evaluate.add_argument("--pairs", help="held-out preference pairs (prompt, chosen, rejected columns), in the same "
                          "forms: the PROXY reward when there is no reward model")  # fmt: skip
    evaluate.add_argument("--beta", type=float, help="β of the proxy reward (default 0.1)")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, help="length of the responses (default 64)")
    evaluate.add_argument("--seed", type=int, help="sample the responses under this seed (default: greedy)")
    evaluate.add_argument("--batch-size", type=_positive_int, help="batch size of every model call (default 8)")
    evaluate.add_argument("--out", help="a new folder for evaluation.json and front.png")
    evaluate.set_defaults(run=_evaluate)
    return parser


EXTRAS = {"transformers": "trl", "trl": "trl", "datasets": "trl", "accelerate": "trl", "yaml": "trl",
          "deepspeed": "deepspeed", "matplotlib": "bench", "scipy": "bench", "lm_eval": "eval", "peft": "trl",
          "mergekit": "mergekit"}  # fmt: skip
"""The extra of setup.cfg that installs each optional module."""

NOTHING_PARTIAL = (
    "the inputs are untouched and nothing partial was written (outputs are written beside their target and moved "
    "into place only when complete)"
)


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad input, a missing optional dependency, a full disk and Ctrl-C end with one line saying what
    is wrong and what was kept, exit status 2 (130 for Ctrl-C). ONLINE_MERGING_TRACEBACK=1: the traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BaseException as error:
        line, status = _user_error(args, error)
        if line is None or os.environ.get("ONLINE_MERGING_TRACEBACK"):
            raise
        print(f"online-merging {args.command}: {line}", file=sys.stderr)
        return status


def _user_error(args: argparse.Namespace, error: BaseException) -> tuple[str | None, int]:
    """The line that ``error`` ends the command with, and the exit status; ``(None, 1)`` for a bug (its traceback)."""
    if isinstance(error, KeyboardInterrupt):
        kept = str(error) or NOTHING_PARTIAL  # train says what it kept
        if args.command == "bench":
            from online_merging.lab.runner import lab_cache_dir

            kept += f"; the jobs finished so far are cached in {lab_cache_dir()}: the same command continues from them"
        return f"interrupted (Ctrl-C): {kept}", 130
    module = _missing_module(error) if isinstance(error, ModuleNotFoundError) else None
    if module in EXTRAS:
        return f"error: {module} is not installed: pip install 'online-merging[{EXTRAS[module]}]'", 2
    if _disk_full(error) and args.command == "train":  # the Trainer writes its checkpoints in place
        return ("error: no space left on the device; the checkpoint being written may be cut short (resuming from "
                "it names the file): free some space and resume from the last complete one"), 2  # fmt: skip
    if _disk_full(error):
        out = getattr(args, "out", None)
        where = f" writing --out {out!r}" if out else ""
        return f"error: no space left on the device{where}; {NOTHING_PARTIAL}: free some space and run it again", 2
    if isinstance(error, (ValueError, OSError)):  # FileNotFoundError is an OSError
        message = " ".join(line.strip() for line in str(error).splitlines())  # one line, whatever the source
        return f"error: {message}", 2
    return None, 1


def _missing_module(error: ModuleNotFoundError) -> str | None:
    """The top-level module that is not installed, or None when it is (a submodule missing from it is a bug)."""
    import importlib.util

    top = (error.name or "").split(".")[0]
    try:
        return top if top and importlib.util.find_spec(top) is None else None
    except ValueError:  # a module in sys.modules without a spec
        return None


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a write that found the disk (or the quota) full: an OSError, or safetensors' own."""
    import errno

    from safetensors import SafetensorError

    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, SafetensorError) and any(
        text in str(error) for text in ("StorageFull", "QuotaExceeded", "No space left on device")
    )


if __name__ == "__main__":
    sys.exit(main())
