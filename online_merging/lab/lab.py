"""The lab's plan and its execution: worlds, then training runs, then offline merges, in parallel worker processes."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

from online_merging._files import check_folder_target
from online_merging.lab import runner
from online_merging.lab.methods import (
    EMA,
    ENTANGLEMENT_PROBED,
    HMA_ALPHAS,
    MERGES,
    METHODS,
    OFFLINE,
    TRAINED,
    setting_label,
)
from online_merging.world import WorldConfig, build_world

__all__ = ["LabConfig", "run_lab"]


@dataclass(frozen=True)
class LabConfig:
    """What the lab runs: the world (its ``seed`` replaced by each model seed), the data orders, the training
    budget shared by every method, and how many settings of each method's sweep to try."""

    world: WorldConfig = field(default_factory=WorldConfig)
    seeds: tuple[int, ...] = (0, 1)
    data_orders: tuple[int, ...] = (0, 1)
    steps: int = 40
    eval_every: int = 5
    batch_size: int = 32
    lr: float = 4.5e-5  # AdamW's; every Adam-based method uses it, scaled by its sweep's "lr" factor
    sweep: int = 2
    methods: tuple[str, ...] = tuple(METHODS)
    hma_steps: int = 30

    @classmethod
    def quick(cls, **overrides) -> LabConfig:
        """One seed and data order, a 2-layer world that builds in about two minutes, 20 steps, one setting per
        method."""
        world = WorldConfig(
            num_layers=2,
            intermediate_size=256,
            pretrain_steps=500,
            sft_steps=200,
            n_train_per_skill=4000,
            n_facts=60,
            n_preference_pairs=1000,
            n_eval_probes=200,
        )
        settings = dict(world=world, seeds=(0,), data_orders=(0,), steps=20, eval_every=5, lr=9e-5, sweep=1)
        return cls(**{**settings, **overrides})

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"Invalid methods: {sorted(unknown)} (known: {', '.join(METHODS)})")
        if not self.seeds or not self.data_orders:
            raise ValueError("the lab needs at least one seed and one data order")

    def with_settings(self, items: list[str]) -> LabConfig:
        """This plan with ``KEY=VALUE`` settings: a field of the plan (``steps=60``, ``lr=3e-5``) or, prefixed
        ``world.``, of its world (``world.skills=addition,facts``, ``world.num_layers=2``); lists comma-separated."""
        config = self
        for item in items:
            key, sep, text = item.partition("=")
            target, name = (config.world, key[len("world.") :]) if key.startswith("world.") else (config, key)
            known = {f.name for f in dataclasses.fields(target)}
            if not sep or name not in known:
                prefix = "world." if target is config.world else ""
                raise ValueError(f"Invalid setting {item!r} (expected KEY=VALUE, KEY one of: "
                                 f"{', '.join(prefix + k for k in sorted(known))})")  # fmt: skip
            value = _parse_like(getattr(target, name), text, item)
            if target is config.world:
                config = replace(config, world=replace(config.world, **{name: value}))
            else:
                config = replace(config, **{name: value})
        return config

    def worlds(self) -> dict[int, WorldConfig]:
        return {seed: replace(self.world, seed=seed) for seed in self.seeds}

    def run_config(self, seed: int, order: int, overrides: dict, **extra) -> runner.RunConfig:
        fields = {k: v for k, v in overrides.items() if k not in ("lr", "unlearn_fraction")}
        if "unlearn_fraction" in overrides:  # ALLO's NPO stage: a share of the same step budget
            fields["unlearn_steps"] = max(1, round(overrides["unlearn_fraction"] * self.steps))
        return runner.RunConfig(
            world=self.worlds()[seed],
            data_seed=order,
            lr=self.lr * overrides.get("lr", 1.0),
            steps=self.steps,
            eval_every=self.eval_every,
            batch_size=self.batch_size,
            **fields,
            **extra,
        )


def _parse_like(current, text: str, item: str):
    """``text`` as a value of the type of ``current``: tuples comma-separated, numbers, booleans, strings."""
    try:
        if isinstance(current, tuple):
            kind = type(current[0]) if current else str
            return tuple(kind(part) for part in text.split(","))
        if isinstance(current, bool):
            return {"true": True, "false": False}[text.lower()]
        return type(current)(text)
    except (ValueError, KeyError):
        raise ValueError(f"Invalid setting {item!r}: {text!r} is not a {type(current).__name__}") from None


@dataclass(frozen=True)
class _Planned:
    method: str
    setting: str
    seed: int
    order: int
    run: runner.RunConfig


def _plan(config: LabConfig) -> tuple[list[_Planned], list[tuple[int, int, runner.MergeJob]]]:
    """Training runs (method, setting, seed, order, RunConfig) and merge jobs (seed, order, MergeJob)."""
    wanted = set(config.methods)
    needs_adamw = wanted & set(OFFLINE)
    runs, merges = [], []
    for seed in config.seeds:
        for order in config.data_orders:
            for name, method in TRAINED.items():
                if name not in wanted and not (name == "adamw" and needs_adamw):
                    continue
                for i, overrides in enumerate(method.settings[: config.sweep]):
                    extra = {"probe_entanglement": i == 0 and name in ENTANGLEMENT_PROBED}
                    if name == "adamw":
                        extra |= {"ema": EMA if "ema" in wanted else (), "save_model": i == 0}
                    run = config.run_config(seed, order, overrides, **extra)
                    runs.append(_Planned(name, setting_label(overrides), seed, order, run))
            offline = [name for name in ("ma", "dare", "ties") if name in wanted]
            specs = tuple((name, tuple(spec.items())) for name in offline for spec in MERGES[name])
            alphas = HMA_ALPHAS if "hma" in wanted else ()
            if specs or alphas:
                adamw = next(p.run for p in runs if p.method == "adamw" and (p.seed, p.order) == (seed, order))
                merges.append((seed, order, runner.MergeJob(adamw, specs, alphas, hma_steps=config.hma_steps)))
    return runs, merges


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    _quiet()


def _quiet() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _build(world: WorldConfig) -> dict:
    build_world(world, progress=False)
    return runner.world_metrics(world)


class _Inline:
    """The executor interface, run in this process (``workers=1``)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, **kwargs) -> None:
        pass


def _execute(config: LabConfig, workers: int, progress: bool) -> tuple[dict, list, list]:
    """Run every job, each as soon as what it needs is done; return SFT metrics, runs and merges with results."""
    runs, merges = _plan(config)
    total = len(config.seeds) + len(runs) + len(merges)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="tax lab", unit="job", disable=not progress)
    if workers > 1:
        context = multiprocessing.get_context("spawn")
        executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
    else:
        _init_worker()
        executor = _Inline()
    sft: dict[int, dict] = {}
    run_results: dict[str, dict] = {}
    merge_results: list = []
    pending: dict[Future, tuple] = {}
    try:
        for seed, world in config.worlds().items():
            pending[executor.submit(_build, world)] = ("world", seed)
        submitted_runs: set[str] = set()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind, item = pending.pop(future)
                result = future.result()
                bar.update()
                if kind == "world":
                    sft[item] = result
                    for planned in runs:
                        key = planned.run.key()
                        if planned.seed == item and key not in submitted_runs:
                            submitted_runs.add(key)
                            pending[executor.submit(runner.train_run, planned.run)] = ("run", key)
                elif kind == "run":
                    run_results[item] = result
                    for seed, order, job in merges:
                        if job.run.key() == item:
                            pending[executor.submit(runner.evaluate_merges, job)] = ("merge", (seed, order))
                else:
                    merge_results.append((*item, result))
            bar.set_postfix_str(f"{len(pending)} pending", refresh=True)
    finally:
        executor.shutdown(cancel_futures=True)
        bar.close()
    # several planned runs can share a key (same config): count each once per method and setting
    return sft, [(p, run_results[p.run.key()]) for p in runs], merge_results


def run_lab(
    out_dir: str | os.PathLike,
    *,
    quick: bool = False,
    seeds: tuple[int, ...] | None = None,
    data_orders: tuple[int, ...] | None = None,
    methods: tuple[str, ...] | None = None,
    workers: int = 2,
    config: LabConfig | None = None,
    progress: bool = True,
) -> dict:
    """Run the alignment-tax lab and write ``results.json``, ``results.md`` and the PNG plots into ``out_dir``.

    ``config`` (default ``LabConfig.quick()`` or ``LabConfig()``) is the plan; ``seeds``, ``data_orders`` and
    ``methods`` override its fields. Finished jobs are cached under ``$ONLINE_MERGING_CACHE/lab``, so a rerun
    resumes. Returns the content of ``results.json``. An ``out_dir`` holding files this package did not write is
    refused before any job runs; the report is written beside it and moved into place at the end.
    """
    from online_merging.lab.report import summarize, write_report

    check_folder_target(out_dir, name="out_dir")
    config = config or (LabConfig.quick() if quick else LabConfig())
    overrides = {"seeds": seeds, "data_orders": data_orders, "methods": methods}
    config = replace(config, **{k: tuple(v) for k, v in overrides.items() if v is not None})
    start = time.perf_counter()
    sft, runs, merges = _execute(config, workers, progress)
    seconds = time.perf_counter() - start
    results = summarize(config, sft, runs, merges)
    results["run"] = {
        "config": dataclasses.asdict(config),
        "seconds": round(seconds, 1),
        "workers": workers,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "computed_seconds": round(sum(r["seconds"] for _, r in runs) + sum(m["seconds"] for *_, m in merges), 1),
    }
    write_report(results, Path(out_dir))
    return results
