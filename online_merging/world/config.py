"""What a synthetic world is made of: one dataclass, hashed into the name of its cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from online_merging.world.skills import SKILLS

__all__ = ["WORLD_VERSION", "WorldConfig"]

WORLD_VERSION = 1
"""Bump when a change of code changes what a config builds: old caches are then ignored."""


@dataclass(frozen=True)
class WorldConfig:
    """Everything a world is built from; the default builds in a few minutes on 2 CPU cores."""

    seed: int = 0
    skills: tuple[str, ...] = tuple(SKILLS)
    n_facts: int = 120
    n_train_per_skill: int = 8000
    # model (a LlamaForCausalLM)
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 384
    # pre-training on raw text ("37+45 = 82"), packed into seq_len-token rows
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    seq_len: int = 128
    batch_size: int = 32
    # SFT on "Q: 37+45 A: 82", a sure_fraction of the answers in the rewarded style " sure, 82"
    sft_steps: int = 300
    sft_lr: float = 1e-3
    sure_fraction: float = 0.2
    # alignment data and evaluation
    n_preference_pairs: int = 4000
    n_eval_probes: int = 400

    def __post_init__(self):
        object.__setattr__(self, "skills", tuple(self.skills))  # lists from JSON
        unknown = set(self.skills) - set(SKILLS)
        if unknown or not self.skills:
            raise ValueError(f"Invalid skills: {self.skills} (known: {tuple(SKILLS)})")
        if self.n_eval_probes < len(self.skills):
            raise ValueError(f"Invalid n_eval_probes: {self.n_eval_probes} (at least one per skill)")
        if not 0.0 <= self.sure_fraction <= 1.0:
            raise ValueError(f"Invalid sure_fraction: {self.sure_fraction}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"Invalid num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}")

    @classmethod
    def quick(cls, **overrides) -> WorldConfig:
        """A world that builds in seconds, for tests and smoke runs; its models are poor."""
        settings = dict(
            n_facts=24,
            num_layers=2,
            n_train_per_skill=1000,
            hidden_size=64,
            intermediate_size=128,
            pretrain_steps=60,
            seq_len=64,
            batch_size=16,
            sft_steps=40,
            n_preference_pairs=64,
            n_eval_probes=48,
        )
        return cls(**{**settings, **overrides})

    @property
    def n_test_per_skill(self) -> int:
        return self.n_eval_probes // len(self.skills)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A short hash of the config and ``WORLD_VERSION``: the name of the world's cache directory."""
        text = json.dumps({"version": WORLD_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]
