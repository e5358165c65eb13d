"""Build a world once (pre-train, SFT, save) and load it from the cache afterwards."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from online_merging._build_lock import build_lock
from online_merging.world import evaluate as _evaluate
from online_merging.world.config import WORLD_VERSION, WorldConfig
from online_merging.world.lm_eval_tasks import write_lm_eval_tasks
from online_merging.world.skills import QA, SkillData, completion, make_skills, prompt
from online_merging.world.tokenizer import build_tokenizer
from online_merging.world.train import make_model, pretrain, sft

__all__ = ["SHIPPED", "World", "build_world", "default_cache_dir", "weights_fingerprint"]

SHIPPED = Path(__file__).with_name("shipped")
"""Worlds whose base and SFT weights ship with the package (the default world), by ``WorldConfig.key()``: they
are copied, not trained, so they are the same on every machine. Elsewhere a build's rounding depends on the CPU
and the library versions; its fingerprint (``world.json``) tells two builds apart."""


def default_cache_dir() -> Path:
    """``$ONLINE_MERGING_CACHE``, else ``~/.cache/online_merging``."""
    return Path(os.environ.get("ONLINE_MERGING_CACHE") or Path.home() / ".cache" / "online_merging")


class World:
    """A built world: its base and SFT models on disk, its data, and the evaluation of reward and ability."""

    def __init__(self, config: WorldConfig, root: str | os.PathLike):
        self.config = config
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"World({self.root})"

    @functools.cached_property
    def info(self) -> dict:
        """``world.json``: the config, ``fingerprint`` (of the base and SFT weights), ``shipped`` (copied from the
        package rather than trained here), the SFT model's metrics and the build time."""
        return json.loads((self.root / "world.json").read_text())

    @property
    def fingerprint(self) -> str:
        """A hash of the base and SFT weights: equal on two machines only if the worlds are equal bit for bit."""
        return self.info.get("fingerprint") or weights_fingerprint(self.base_dir, self.sft_dir)

    @property
    def base_dir(self) -> Path:
        """The pre-trained model and its tokenizer (``from_pretrained`` directory)."""
        return self.root / "base"

    @property
    def sft_dir(self) -> Path:
        """The SFT model, the starting point of alignment, and its tokenizer."""
        return self.root / "sft"

    @functools.cached_property
    def data(self) -> dict[str, SkillData]:
        cfg = self.config
        return make_skills(
            cfg.seed, cfg.skills, n_test=cfg.n_test_per_skill, n_train=cfg.n_train_per_skill, n_facts=cfg.n_facts
        )

    def tokenizer(self):
        """The world's character-level ``PreTrainedTokenizerFast``."""
        return build_tokenizer()

    def probes(self, split: str = "test") -> dict[str, list[QA]]:
        """Per skill, the (question, answer) pairs scored by ``evaluate``: held-out ones for ``"test"``, a draw of
        training pairs for ``"train"``."""
        if split == "test":
            return {name: data.test for name, data in self.data.items()}
        if split == "train":
            rng = random.Random(f"{self.config.seed}/train-probes")
            return {name: rng.sample(data.train, len(data.test)) for name, data in self.data.items()}
        raise ValueError(f"Invalid split: {split!r} (expected 'train' or 'test')")

    def _preference_pairs(self, split: str) -> list[QA]:
        if split == "test":
            return [pair for pairs in self.probes("test").values() for pair in pairs]
        if split == "train":
            rng, names = random.Random(f"{self.config.seed}/preference"), list(self.data)
            return [rng.choice(self.data[names[i % len(names)]].train) for i in range(self.config.n_preference_pairs)]
        raise ValueError(f"Invalid split: {split!r} (expected 'train' or 'test')")

    def preference_dataset(self, split: str = "train"):
        """TRL's standard preference format: ``prompt`` "Q: ... A:", ``chosen`` " sure, <answer>", ``rejected``
        " <answer>"; the test split holds the evaluation probes."""
        from datasets import Dataset

        pairs = self._preference_pairs(split)
        return Dataset.from_dict(
            {
                "prompt": [prompt(q) for q, _ in pairs],
                "chosen": [completion(a, sure=True) for _, a in pairs],
                "rejected": [completion(a) for _, a in pairs],
            }
        )

    def kto_dataset(self, split: str = "train"):
        """TRL's unpaired format, from the preference pairs: (prompt, chosen, ``label`` True) and (prompt, rejected,
        False) in turn."""
        from datasets import Dataset

        pairs = self._preference_pairs(split)
        return Dataset.from_dict(
            {
                "prompt": [prompt(q) for q, _ in pairs for _ in (True, False)],
                "completion": [completion(a, sure=sure) for _, a in pairs for sure in (True, False)],
                "label": [sure for _ in pairs for sure in (True, False)],
            }
        )

    def prompt_dataset(self, skill: str = "addition", split: str = "train"):
        """Prompts of one skill for RL (GRPO, RLOO): ``prompt`` "Q: ... A:" and ``answer``, the column the reward
        ``correct`` (:mod:`online_merging.world.rewards`) checks replies against; the test split holds the probes."""
        from datasets import Dataset

        if skill not in self.data:
            raise ValueError(f"Invalid skill: {skill!r} (this world's: {', '.join(self.data)})")
        if split not in ("train", "test"):
            raise ValueError(f"Invalid split: {split!r} (expected 'train' or 'test')")
        pairs = getattr(self.data[skill], split)
        return Dataset.from_dict({"prompt": [prompt(q) for q, _ in pairs], "answer": [a for _, a in pairs]})

    def evaluate(self, model: nn.Module, tokenizer=None, split: str = "test") -> dict[str, float]:
        """``reward``, ``reward_greedy``, ``ability``, ``ability_greedy`` and per skill ``ability/<skill>``,
        ``ability_greedy/<skill>`` (see ``online_merging.world.evaluate``); leaves the model's mode as it was."""
        return _evaluate.evaluate(model, tokenizer or self.tokenizer(), self.probes(split))

    @property
    def lm_eval_dir(self) -> Path:
        """Where ``lm_eval_tasks`` writes the lm-eval task folder."""
        return self.root / "lm_eval"

    def lm_eval_tasks(self) -> Path:
        """The lm-evaluation-harness task folder of the test probes (``lm_eval --include_path``), written on first
        request (see ``online_merging.world.lm_eval_tasks``); its tasks score ``ability_greedy/<skill>``."""
        return write_lm_eval_tasks(self.lm_eval_dir, self.probes("test"))


def _log(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _no_transformers_progress_bars():
    """``save_pretrained`` draws a bar per file; silence it for the duration."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def weights_fingerprint(*directories: Path) -> str:
    """sha256 (16 hex digits) of the tensors of each directory's ``model.safetensors``, by name: their bytes, not
    the file's metadata."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    for directory in directories:
        with safe_open(directory / "model.safetensors", "pt") as tensors:
            for name in sorted(tensors.keys()):
                digest.update(name.encode())
                digest.update(tensors.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _build_into(cfg: WorldConfig, root: Path, final: Path, progress: bool) -> None:
    world, tokenizer, start = World(cfg, root), build_tokenizer(), time.perf_counter()
    shipped = SHIPPED / cfg.key()
    if shipped.is_dir():
        _log(f"Copying the shipped world {cfg.key()} into {final}", progress)
        for directory in (world.base_dir, world.sft_dir):
            shutil.copytree(shipped / directory.name, directory)
            tokenizer.save_pretrained(directory)
        from transformers import LlamaForCausalLM

        with _no_transformers_progress_bars():
            model = LlamaForCausalLM.from_pretrained(world.sft_dir)
    else:
        from tqdm.auto import tqdm

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = make_model(cfg)
        steps = cfg.pretrain_steps + cfg.sft_steps
        _log(
            f"Building the synthetic world ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M-parameter "
            f"Llama, {cfg.pretrain_steps} pre-training and {cfg.sft_steps} SFT steps) into {final}; the bar's "
            f"estimate of the time left covers all {steps} steps",
            progress,
        )
        with tqdm(total=steps, desc=f"world {cfg.key()}", unit="step", disable=not progress, leave=False) as bar:
            pretrain(model, world.data, cfg, progress=bar)
            for directory in (world.base_dir, world.sft_dir):
                if directory == world.sft_dir:
                    sft(model, world.data, cfg, progress=bar)
                with _no_transformers_progress_bars():
                    model.save_pretrained(directory)
                tokenizer.save_pretrained(directory)
    metrics = world.evaluate(model, tokenizer)
    seconds = round(time.perf_counter() - start, 1)
    info = {
        "world_version": WORLD_VERSION, "config": cfg.to_dict(), "shipped": shipped.is_dir(),
        "fingerprint": weights_fingerprint(world.base_dir, world.sft_dir), "build_seconds": seconds,
        "sft_metrics": metrics,
    }  # fmt: skip
    (root / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    summary = ", ".join(f"{k} {metrics[k]:.2f}" for k in ("reward", "reward_greedy", "ability", "ability_greedy"))
    _log(f"Built in {seconds} s; the SFT model scores {summary}", progress)


def build_world(config: WorldConfig | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True):
    """The world of ``config`` (default ``WorldConfig()``), built into ``<cache_dir>/world/<config.key()>/`` on
    first use and loaded from there afterwards.

    The build writes into a hidden sibling directory renamed into place at the end, so an interrupted build
    leaves no partial world (a killed one may leave the hidden ``.<key>-*`` directory behind). Concurrent builds
    wait for one another under a file lock, and one that waits says for whom (even with ``progress=False``). With
    ``progress``, a bar counts the pre-training and SFT steps together, with an estimate of the time left. In a
    multi-process launch (torch.distributed initialised) rank 0 builds while the others wait at a barrier, as
    ``save_pretrained`` writes on rank 0 only. Every random number comes from ``config.seed``; the caller's RNG
    state and thread count are left as they were.
    """
    cfg = config or WorldConfig()
    root = Path(cache_dir or default_cache_dir()) / "world" / cfg.key()
    if root.is_dir():
        return World(cfg, root)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        _build_once(cfg, root, progress)
    if distributed:
        torch.distributed.barrier()
    return World(cfg, root)


def _build_once(cfg: WorldConfig, root: Path, progress: bool) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = root.parent / f".{root.name}.lock"
    with build_lock(lock_path, f"world {root.name} into {root}"):
        if root.is_dir():  # another process built it while this one waited
            return
        scratch = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            _build_into(cfg, scratch, root, progress)
            try:
                scratch.rename(root)
            except OSError:
                if not root.is_dir():  # not a build that finished first (after a lock file was removed)
                    raise
            # after the rename: its files name their data by absolute path
            World(cfg, root).lm_eval_tasks()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
