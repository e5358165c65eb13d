"""The lab's plan and its execution: tune every method's grid on some replicates of the default world, run the
best setting on other replicates of every test world; worlds, training runs and offline merges run in parallel
worker processes."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

from online_merging._files import check_folder_target, write_text
from online_merging.evaluation.fronts import MRA_LEVELS, RL_LEVELS
from online_merging.integrations.builder import ONLINE_RL
from online_merging.lab import runner
from online_merging.lab.methods import GRID_SIZE, METHODS, RL_METHODS, run_overrides, setting_label
from online_merging.lab.tuning import pick_settings
from online_merging.provenance import provenance
from online_merging.world import World, WorldConfig, build_world, default_cache_dir

__all__ = ["TEST_WORLDS", "LabConfig", "read_tuned", "run_lab", "second_world", "trajectory", "tune", "write_tuned"]


def second_world(world: WorldConfig) -> WorldConfig:
    """The second test world: ``world`` with a ¾-wide model (hidden and MLP sizes; from the default world's 128 and
    384: 96 and 288, about 0.56× the non-embedding weights) and 30 % of the SFT targets in the rewarded style
    instead of 20 %. Narrower, so it builds and trains faster than ``world``; the reward share keeps its SFT model
    below the lowest reward level (0.3) while it still aligns within the lab's 40 steps (measured in
    docs/results.md, "Second test world"). Made from the plan's world, so that quick and smoke plans get a second
    world as small as their first."""
    return replace(world, hidden_size=world.hidden_size * 3 // 4, intermediate_size=world.intermediate_size * 3 // 4,
                   sure_fraction=0.3)  # fmt: skip


TEST_WORLDS: dict[str, Callable[[WorldConfig], WorldConfig]] = {"default": lambda world: world, "second": second_world}
"""The worlds a plan can test on, each made from the plan's world (``LabConfig.world``, the one tuned on)."""


@dataclass(frozen=True)
class LabConfig:
    """What the lab runs: the world (its ``seed`` replaced by each model seed), the tuning replicates (model seed
    × data order, of ``world``), the test worlds (``TEST_WORLDS``, made from ``world``) and their replicates, the
    training budget shared by every method, and how many settings of each grid to search."""

    world: WorldConfig = field(default_factory=WorldConfig)
    tune_seeds: tuple[int, ...] = (0, 1)
    tune_orders: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] = (2, 3, 4)  # the test replicates: seeds × data_orders
    data_orders: tuple[int, ...] = (0, 1)
    steps: int = 40
    eval_every: int = 4
    batch_size: int = 32
    lr: float = 4.5e-5  # AdamW's centre; a setting's "lr" is a multiple of it
    grid: int = GRID_SIZE
    levels: tuple[float, ...] = MRA_LEVELS  # reward levels of the MRA (those the compared runs reach count)
    methods: tuple[str, ...] = tuple(name for name, m in METHODS.items() if not (m.adapters or m.online_rl))
    test_worlds: tuple[str, ...] = tuple(TEST_WORLDS)  # tuned on the default world, tested on each of these
    smoke_test: bool = False  # the quick plan's: the report recommends nothing (``report.SMOKE_TEST``)
    trainer: str = "dpo"  # every run's, unless its setting names another (KTO, RLOO rows)
    beta: float = 0.1  # every run's β (DPO's, or GRPO's KL weight), unless its setting names another
    rl_skill: str = ""  # the RL plan's: the skill whose correctness GRPO/RLOO rewards (:meth:`rl`)
    num_generations: int = 8  # the RL plan's completions per prompt (``batch_size`` counts completions)

    @classmethod
    def quick(cls, **overrides) -> LabConfig:
        """Tune on one replicate, test on one other, on a 2-layer world that builds in about two minutes: 20 steps,
        two settings of each grid. A smoke test of the pipeline: its report recommends nothing."""
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
        settings = dict(world=world, tune_seeds=(0,), tune_orders=(0,), seeds=(1,), data_orders=(0,), steps=20,
                        eval_every=2, lr=9e-5, grid=2, smoke_test=True)  # fmt: skip
        return cls(**{**settings, **overrides})

    @classmethod
    def rl(cls, *, quick: bool = False, **overrides) -> LabConfig:
        """The RL plan (issue 27's table): GRPO with β 0 (TRL's default) from the SFT model on one skill's
        training prompts, rewarded by exact-match correctness (``world.rewards.correct``), 8 prompts × 8
        completions of at most 32 tokens per step, 80 steps around lr 1e-4, evaluated every 10 steps, tested on
        both worlds; the axes are the share of the SFT model's errors on the skill's held-out probes removed, and
        the other skills' ability kept (``report.kept``). Translation by default: the skill the SFT model samples
        right often enough for GRPO to learn in the budget (addition, its weakest, gave no gain at any rate:
        docs/results.md, "Online RL"). ``quick``: the quick plan's world and replicates, 20 steps, on facts (the
        one skill its small SFT model mostly gets right)."""
        settings = dict(trainer="grpo", beta=0.0, rl_skill="translation", methods=RL_METHODS, steps=80, eval_every=10,
                        batch_size=64, lr=1e-4, levels=RL_LEVELS)  # fmt: skip
        if quick:
            base = cls.quick()
            settings |= dict(world=base.world, tune_seeds=base.tune_seeds, seeds=base.seeds,
                             data_orders=base.data_orders, steps=20, eval_every=5, grid=2, smoke_test=True,
                             rl_skill="facts")  # fmt: skip
        return cls(**{**settings, **overrides})

    def __post_init__(self):
        for name, known in (("methods", METHODS), ("test_worlds", TEST_WORLDS)):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            unknown = set(getattr(self, name)) - set(known)
            if unknown:
                raise ValueError(f"Invalid {name}: {sorted(unknown)} (known: {', '.join(known)})")
        for name in ("tune_seeds", "tune_orders", "seeds", "data_orders", "test_worlds"):
            if not getattr(self, name):
                raise ValueError(f"Invalid {name}: empty (the lab needs at least one)")
        if not 1 <= self.grid <= GRID_SIZE:
            raise ValueError(f"Invalid grid: {self.grid} (expected 1 … {GRID_SIZE} settings per method)")
        online_rl = self.trainer in ONLINE_RL
        if online_rl != bool(self.rl_skill):
            raise ValueError(f"Invalid rl_skill: {self.rl_skill!r} with trainer {self.trainer!r} (the RL plan, "
                             "LabConfig.rl, sets both)")  # fmt: skip
        misplaced = sorted(set(self.methods) - set(RL_METHODS)) if online_rl else [
            name for name in self.methods if METHODS[name].online_rl]  # fmt: skip
        if misplaced:
            plan = f"the RL plan's (known: {', '.join(RL_METHODS)})" if online_rl else "the RL plan's only (--rl)"
            raise ValueError(f"Invalid methods: {misplaced} are not rows of this plan: {plan}")

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

    def tuning_replicates(self) -> list[tuple[str, int, int]]:
        """(world, model seed, data order) triples, all of the default world."""
        return [("default", s, o) for s in self.tune_seeds for o in self.tune_orders]

    def test_replicates(self) -> list[tuple[str, int, int]]:
        """(world, model seed, data order) triples: ``seeds`` × ``data_orders`` on every test world."""
        return [(w, s, o) for w in self.test_worlds for s in self.seeds for o in self.data_orders]

    def test_world(self, name: str, seed: int) -> WorldConfig:
        return replace(TEST_WORLDS[name](self.world), seed=seed)

    def run_config(self, seed: int, order: int, overrides: dict, world: str = "default") -> runner.RunConfig:
        plan = {"trainer": self.trainer, "beta": self.beta}
        if self.rl_skill:
            plan |= {"rl_skill": self.rl_skill, "num_generations": self.num_generations}
        fields = {**plan, **{k: v for k, v in overrides.items() if k != "lr"}}
        return runner.RunConfig(
            world=self.test_world(world, seed),
            data_seed=order,
            lr=self.lr * overrides.get("lr", 1.0),
            steps=self.steps,
            eval_every=self.eval_every,
            batch_size=self.batch_size,
            **fields,
        )

    def source(
        self, seed: int, order: int, setting: dict, world: str = "default"
    ) -> tuple[runner.RunConfig, runner.MergeJob | None]:
        """The run a setting's trajectory comes from, and the merge job for an offline sweep."""
        run = self.run_config(seed, order, run_overrides(setting), world)
        if "merge_weights" not in setting:
            return run, None
        specs = tuple(("ma", (("method", "ma"), ("alpha", w))) for w in setting["merge_weights"])
        return run, runner.MergeJob(run, specs)


def replicate_label(seed: int, order: int) -> str:
    return f"seed{seed}/order{order}"


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


def _execute(jobs, workers: int, progress: bool, prebuild=()) -> tuple[dict, dict, dict]:
    """Run the worlds, runs and merges that ``jobs`` ((RunConfig, MergeJob or None) pairs) need, each as soon as
    what it needs is done, and build the ``prebuild`` worlds meanwhile. Returns the SFT metrics per world key, and
    the run and merge results per job key. A run that differs from another only by not saving its model reads
    that one's result (the same training: a stack X → MA and its row X share it)."""
    worlds = {world.key(): world for world in prebuild} | {run.world.key(): run.world for run, _ in jobs}
    runs = {run.key(): run for run, _ in jobs}
    saving = {key: replace(run, save_model=True).key() for key, run in runs.items() if not run.save_model}
    shared = {key: other for key, other in saving.items() if other in runs}
    runs = {key: run for key, run in runs.items() if key not in shared}
    merges = {merge.key(): merge for _, merge in jobs if merge is not None}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(worlds) + len(runs) + len(merges), desc="tax lab", unit="job", disable=not progress)
    if workers > 1:
        context = multiprocessing.get_context("spawn")
        executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
    else:
        _init_worker()
        executor = _Inline()
    sft: dict[str, dict] = {}
    run_results: dict[str, dict] = {}
    merge_results: dict[str, dict] = {}
    pending: dict[Future, tuple] = {}
    try:
        for key, world in worlds.items():
            pending[executor.submit(_build, world)] = ("world", key)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind, key = pending.pop(future)
                result = future.result()
                bar.update()
                if kind == "world":
                    sft[key] = result
                    for run_key, run in runs.items():
                        if run.world.key() == key:
                            pending[executor.submit(runner.train_run, run)] = ("run", run_key)
                elif kind == "run":
                    run_results[key] = result
                    for merge_key, merge in merges.items():
                        if merge.run.key() == key:
                            pending[executor.submit(runner.evaluate_merges, merge)] = ("merge", merge_key)
                else:
                    merge_results[key] = result
            bar.set_postfix_str(f"{len(pending)} pending", refresh=True)
    finally:
        executor.shutdown(cancel_futures=True)
        bar.close()
    run_results |= {key: run_results[other] for key, other in shared.items()}
    return sft, run_results, merge_results


def trajectory(setting: dict, run: runner.RunConfig, merge: runner.MergeJob | None, done: tuple) -> list[dict]:
    """A setting's trajectory on one replicate: points ``{"reward", "ability", ..., "step" or "weight"}`` in
    order, the SFT point first; ability as the fraction of the SFT model's kept (see ``report.kept``)."""
    from online_merging.lab.report import kept

    sft_metrics, runs, merges = done
    sft = sft_metrics[run.world.key()]
    skill = run.rl_skill or None
    points = [kept(sft, sft, skill=skill, step=0)]
    own = [p for p in runs[run.key()]["points"] if p["variant"] == setting.get("variant", "")]
    if merge is None:
        if not own:
            raise ValueError(f"Invalid variant: {setting.get('variant')!r} (the run tracks no such average)")
        return points + [kept(p, sft, skill=skill, step=p["step"]) for p in own]
    swept = sorted(merges[merge.key()]["points"], key=lambda p: p["setting"]["alpha"])
    points += [kept(p, sft, skill=skill, weight=p["setting"]["alpha"]) for p in swept]
    return [*points, kept(own[-1], sft, skill=skill, weight=1.0)]  # the aligned model: MA at weight 1


def _trajectories(config: LabConfig, settings: dict, replicates, workers: int, progress: bool, prebuild=()) -> dict:
    """{world: {name: {replicate label: trajectory}}} of each setting of ``settings`` (keyed by a method, or
    anything) on each (world, seed, order) of ``replicates``."""
    planned = {(name, *replicate): config.source(*replicate[1:], setting, replicate[0])
               for name, setting in settings.items() for replicate in replicates}  # fmt: skip
    done = _execute(list(planned.values()), workers, progress, prebuild)
    found: dict = {world: {name: {} for name in settings} for world in dict.fromkeys(r[0] for r in replicates)}
    for (name, world, seed, order), (run, merge) in planned.items():
        found[world][name][replicate_label(seed, order)] = trajectory(settings[name], run, merge, done)
    return found


def tune(config: LabConfig, *, workers: int = 2, progress: bool = True) -> tuple[dict, dict]:
    """Search the first ``config.grid`` settings of every method on the tuning replicates (of the default world)
    by MRA; return the picked setting per method and the search (``pick_settings``'s figures, with the settings'
    labels)."""
    from online_merging.lab.report import xy

    grid = {(name, i): s for name in config.methods for i, s in enumerate(METHODS[name].grid[: config.grid])}
    test_worlds = [config.test_world(w, s) for w, s, _ in config.test_replicates()]  # built while the tuning trains
    (found,) = _trajectories(config, grid, config.tuning_replicates(), workers, progress, test_worlds).values()
    grids = {name: {} for name in config.methods}
    for (name, i), per_replicate in found.items():
        grids[name][i] = {r: xy(t) for r, t in per_replicate.items()}
    labels = [replicate_label(s, o) for _, s, o in config.tuning_replicates()]
    picked = pick_settings(grids, labels, config.levels)
    for name, figures in picked.items():
        figures["settings"] = [setting_label(s) for s in METHODS[name].grid[: config.grid]]
    return {name: METHODS[name].grid[picked[name]["best"]] for name in config.methods}, picked


def _check_split(config: LabConfig) -> None:
    shared = set(config.tuning_replicates()) & set(config.test_replicates())
    if shared:
        shown = ", ".join(replicate_label(s, o) for _, s, o in sorted(shared))
        raise ValueError(f"Invalid seeds/data_orders: the test replicates {shown} are tuning replicates too")


TUNED_FORMAT = "online-merging tax-lab tuned settings"


def write_tuned(path: str | os.PathLike, settings: dict) -> None:
    """Save the tuned setting of each method (what ``--tuned`` reads)."""
    write_text(path, json.dumps({"format": TUNED_FORMAT, "methods": settings}, indent=1) + "\n")


def read_tuned(path: str | os.PathLike) -> dict[str, dict]:
    """The settings saved by :func:`write_tuned`, checked: every method known, every key a setting of the run,
    a variant one that the run tracks. Raises ``ValueError`` naming the file and the key at fault."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"Invalid tuned file {str(path)!r}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"Invalid tuned file {str(path)!r}: not JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != TUNED_FORMAT or not isinstance(data.get("methods"), dict):
        raise ValueError(f"Invalid tuned file {str(path)!r}: expected {{\"format\": {TUNED_FORMAT!r}, \"methods\": "
                         f"{{METHOD: SETTING}}}} as written by the lab (tuned.json)")  # fmt: skip
    if not data["methods"]:
        raise ValueError(f"Invalid tuned file {str(path)!r}: methods: no methods")
    allowed = {f.name for f in dataclasses.fields(runner.RunConfig)} - {"world", "data_seed"}
    allowed |= {"variant", "merge_weights"}
    settings = {}
    for name, setting in data["methods"].items():
        if name not in METHODS:
            raise ValueError(f"Invalid tuned file {str(path)!r}: methods.{name}: unknown method (known: "
                             f"{', '.join(METHODS)})")  # fmt: skip
        if not isinstance(setting, dict):
            raise ValueError(f"Invalid tuned file {str(path)!r}: methods.{name}: expected an object of settings")
        for key in setting:
            if key not in allowed:
                raise ValueError(f"Invalid tuned file {str(path)!r}: methods.{name}.{key}: not a setting (expected "
                                 f"one of {', '.join(sorted(allowed))})")  # fmt: skip
        variants = {s["variant"] for s in METHODS[name].grid if "variant" in s}
        if "variant" in setting and setting["variant"] not in variants:
            raise ValueError(f"Invalid tuned file {str(path)!r}: methods.{name}.variant: {setting['variant']!r} is "
                             f"not tracked (expected one of {', '.join(sorted(variants))})")  # fmt: skip
        settings[name] = {k: tuple(v) if isinstance(v, list) else v for k, v in setting.items()}
    return settings


def run_lab(
    out_dir: str | os.PathLike,
    *,
    quick: bool = False,
    seeds: tuple[int, ...] | None = None,
    data_orders: tuple[int, ...] | None = None,
    methods: tuple[str, ...] | None = None,
    workers: int = 2,
    config: LabConfig | None = None,
    tuned: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Tune every method on the tuning replicates, run its best setting on the test replicates of every test world,
    and write ``results.json``, ``results.md``, ``tuned.json`` and the PNG plots into ``out_dir``.

    ``config`` (default ``LabConfig.quick()`` or ``LabConfig()``) is the plan; ``seeds``, ``data_orders`` (the test
    replicates) and ``methods`` override its fields. With ``tuned`` (a ``tuned.json``) nothing is tuned: its
    settings run on the test replicates. Finished jobs are cached under ``$ONLINE_MERGING_CACHE/lab``, so a rerun
    resumes. The quick plan (``smoke_test``) recommends nothing and says so: in results.json (``mode``), results.md
    and a printed note. Returns the content of ``results.json``. An ``out_dir`` holding files this package did not
    write is refused before any job runs; the report is written beside it and moved into place at the end.
    """
    from online_merging.lab.report import SMOKE_TEST, summarize, write_report

    check_folder_target(out_dir, name="out_dir")
    config = config or (LabConfig.quick() if quick else LabConfig())
    overrides = {"seeds": seeds, "data_orders": data_orders, "methods": methods}
    config = replace(config, **{k: tuple(v) for k, v in overrides.items() if v is not None})
    start = time.perf_counter()
    if tuned is None:
        _check_split(config)
        settings, search = tune(config, workers=workers, progress=progress)
    else:
        settings = read_tuned(tuned)
        settings = {name: s for name, s in settings.items() if name in config.methods}
        search = None
    found = _trajectories(config, settings, config.test_replicates(), workers, progress)
    results = summarize(config, found, settings, search)
    results["run"] = {
        "config": dataclasses.asdict(config),
        "tuned_from": None if tuned is None else str(tuned),
        "seconds": round(time.perf_counter() - start, 1),
        "workers": workers,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "provenance": provenance(),  # CPU, Python and library versions
        "fingerprints": _fingerprints(config),
    }
    write_report(results, Path(out_dir))
    if config.smoke_test:
        print(f"Note: {SMOKE_TEST}", flush=True)
    return results


def _fingerprints(config: LabConfig) -> dict[str, str | None]:
    """The weights fingerprint of every world the lab ran on, by world and seed (``"default/seed2"``): another
    machine's results compare bit for bit only where these agree. Read from the cache, never built here (None: a
    world the run did not build, as when its jobs came from elsewhere)."""
    replicates = config.tuning_replicates() + config.test_replicates()
    fingerprints = {}
    for name, seed in dict.fromkeys((name, seed) for name, seed, _ in replicates):
        world = config.test_world(name, seed)
        root = default_cache_dir() / "world" / world.key()
        fingerprints[f"{name}/seed{seed}"] = World(world, root).fingerprint if root.is_dir() else None
    return fingerprints
